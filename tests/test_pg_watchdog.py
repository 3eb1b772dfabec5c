"""The suite's embedded PostgreSQL does not outlive a pytest that is killed
(a CI timeout's SIGKILL): tests/pg_watchdog.py, started beside it by
``helpers.start_test_postgres``, stops it and removes its directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from helpers import wait_for

TESTS = Path(__file__).resolve().parent

# A process that starts the suite's PostgreSQL as the pg_dsn fixture does,
# says which postmaster (and watchdog) that is, and waits to be killed.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import helpers
    data = Path(sys.argv[1])
    dsn, watchdog = helpers.start_test_postgres(data)
    assert helpers.fetchval(dsn, "SELECT 1") == 1
    postmaster = int((data / "pg" / "postmaster.pid").read_text().split()[0])
    print(postmaster, watchdog.pid, flush=True)
    time.sleep(600)
""")


def running(pid: int, mark: str = "") -> bool:
    """``pid`` runs (not a zombie), with ``mark`` in its command line."""
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and mark in " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False


def test_a_killed_pytest_leaves_no_postgres_running_and_no_data_dir(public_tmp):
    data = public_tmp / "pg-of-a-killed-run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], cwd=TESTS,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    postmaster = watchdog = None
    try:
        line = child.stdout.readline()  # ends at the child's exit, if it fails
        assert line, f"the child did not start PostgreSQL (exit {child.wait(30)})"
        postmaster, watchdog = map(int, line.split())
        assert running(postmaster, str(data)) and running(watchdog, "pg_watchdog.py")
        assert data.is_dir()

        child.send_signal(signal.SIGKILL)
        child.wait(30)
        wait_for(lambda: not running(postmaster), timeout=30,
                 what="the postmaster to stop after the process that started it was killed")
        wait_for(lambda: not data.exists(), timeout=30, what="its data dir to be removed")
        wait_for(lambda: not running(watchdog), timeout=30, what="the watchdog to exit")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdout.close()
        # The test failed: leave nothing behind (checking each is still what it was).
        for pid, mark, sig in ((watchdog, "pg_watchdog.py", signal.SIGKILL),
                               (postmaster, str(data), signal.SIGQUIT)):
            if pid is not None and running(pid, mark):
                os.kill(pid, sig)

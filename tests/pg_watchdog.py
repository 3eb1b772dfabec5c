"""Stops the suite's embedded PostgreSQL when the pytest process that started
it dies, however it dies (a CI timeout's SIGKILL included), and removes its
directory: ``python tests/pg_watchdog.py PARENT_PID DATA_DIR``.

Started by ``helpers.start_test_postgres`` (the ``pg_dsn`` fixture) as a
child of the process it watches, in a session of its own (a signal to
pytest's process group does not reach it). It waits on a pidfd of the
parent, so it wakes the moment the parent is gone; it then shuts the
postmaster down at once (SIGQUIT, PostgreSQL's immediate shutdown: the
test database is thrown away anyway). A parent that stops PostgreSQL
itself kills the watchdog first (``helpers.stop_test_postgres``).
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path


def wait_for_exit(pid: int, timeout: float | None = None) -> bool:
    """Wait until ``pid`` has exited (a zombie counts as exited); False if
    it still runs after ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (old kernel): poll
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def wait_for_parent(parent: int) -> None:
    """Return once ``parent``, the process that started this one, has exited."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel): poll for being handed to another parent
        while os.getppid() == parent:
            time.sleep(0.5)
        return
    try:
        if os.getppid() == parent:  # so the fd is our parent's, not a reused pid's
            select.select([fd], [], [])
    finally:
        os.close(fd)


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in postmaster.pid, if that process is still a postmaster of
    ``pgdata`` (a stale file's pid may belong to anything by now)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if os.fsencode(pgdata) in cmdline else None


def stop(data_dir: Path, grace: float = 10.0) -> None:
    """SIGQUIT the postmaster of ``data_dir``/pg (SIGKILL if it is still
    there after ``grace`` seconds), then remove ``data_dir``."""
    pid = postmaster_pid(data_dir / "pg")
    if pid is not None:
        try:
            os.kill(pid, signal.SIGQUIT)
            if not wait_for_exit(pid, grace):
                os.kill(pid, signal.SIGKILL)
                wait_for_exit(pid, grace)
        except ProcessLookupError:
            pass
    shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parent, data_dir = int(sys.argv[1]), Path(sys.argv[2]).resolve()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C to the terminal is for pytest
    wait_for_parent(parent)
    if data_dir.exists():
        stop(data_dir)


if __name__ == "__main__":
    main()

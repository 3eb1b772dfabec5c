"""``haltless serve``: the granian server, run as a supervised child.

The ``haltless serve`` process prepares once (embedded PostgreSQL, migrations,
secrets: ``runtime.prepare``), checks that the port is free, then runs
granian's main process as a child in its own process group and supervises it:

* SIGTERM/SIGINT are forwarded to granian, which stops gracefully; whatever
  is still running ``STOP_GRACE`` seconds later (say, workers still starting,
  when granian defers the signal) is killed with the whole group, so the
  server stops within seconds at any moment;
* if granian's main process exits on its own, its workers are killed and
  granian is started again (the embedded PostgreSQL, held by this process,
  stays up): granian respawns a worker that dies (``respawn_failed_workers``)
  while the others keep serving, but gives up and exits when one worker dies
  twice within about 5 s ("crash loop"); a dead worker must never take the
  service down. Only a granian that keeps failing at start (5 times in a row,
  each within ``STARTUP_FAILURE`` seconds) ends ``haltless serve``;
* the embedded PostgreSQL (held by this process) is started again when its
  postmaster exits while serve runs (the OOM killer, a crash, a pg_ctl
  stop): ``PostgresKeeper`` looks every second and restarts it with backoff;
  meanwhile the workers answer 503 and store nothing, and they reconnect by
  themselves once it is back (crash recovery keeps every commit);
* the child gets the prepared settings through its environment
  (``Settings.to_env``) and dies with this process (``PR_SET_PDEATHSIG``);
* the workers share a private run dir (0700, removed at exit): the
  Prometheus multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set before any
  worker starts) and the rate-limit buckets.

Connections: HTTP/1.1 only, so that hyper times out a connection that sends
no (or half its) request headers within ``HALTLESS_HEADER_TIMEOUT`` (in the
auto mode, a connection that sends nothing is never timed out); request
bodies are timed out by the app (``server/bodies.py``). Each worker takes up
to ``HALTLESS_MAX_CONNECTIONS`` connections (granian's backpressure; by
default it was backlog/workers = 1,024, so ~2,100 idle connections on 2
workers held every slot and every request waited), and the open-files limit
is raised to its hard limit to allow them.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..core.config import Settings
from ..core.errors import ConfigError

STOP_GRACE = 8.0  # seconds between the forwarded SIGTERM and SIGKILL of the group
WORKER_KILL_TIMEOUT = 5  # granian: seconds a worker may take to stop gracefully
STARTUP_FAILURE = 10.0  # granian exiting sooner than this after its start is a failed start
MAX_FAILED_STARTS = 5
BACKLOG = 4096  # the kernel's accept queue (capped by net.core.somaxconn)


def check_port(host: str, port: int) -> None:
    """Bind host:port once, as granian will, but without SO_REUSEPORT: a
    listener already there (granian sets SO_REUSEPORT, so a second server
    would otherwise share the port silently) or a missing privilege is a
    clear error naming the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            where = f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is already in use on {host} (another haltless "
                                  "serve?); stop it or choose another --port") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host}: permission denied; ports below 1024 "
                                  "need root or CAP_NET_BIND_SERVICE - use --port 8000 (or "
                                  "another port from 1024) behind a reverse proxy") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine") from None
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from None


def supervise(settings: Settings, access_log: bool = False) -> int:
    """Run granian until we are told to stop (0), restarting it when it
    exits on its own; its exit code when it keeps failing at start."""
    run_dir = Path(tempfile.mkdtemp(prefix="haltless-run-"))  # 0700
    (run_dir / "metrics").mkdir()
    env = {**os.environ, **settings.but(run_dir=run_dir).to_env(),
           "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics")}
    argv = [sys.executable, "-m", "haltless.server.serve"] + (["--access-log"] if access_log else [])
    _raise_open_files_limit()
    deadline = None
    child = None

    def stop(signum, frame):
        nonlocal deadline
        if keeper is not None:
            keeper.stopping.set()  # a postmaster stopped by the same Ctrl-C stays stopped
        if deadline is None:
            deadline = time.monotonic() + STOP_GRACE
            if child is not None:
                _signal_group(child.pid, signal.SIGTERM)

    keeper = PostgresKeeper(settings.data_dir) if settings.prepared == "embedded" else None
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    from ..core.stopping import stop_requested
    if stop_requested():  # before these handlers, and its KeyboardInterrupt was lost
        stop(signal.SIGINT, None)
    failed_starts = 0
    if keeper is not None:
        keeper.start()
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(argv, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
            if deadline is not None:  # told to stop while starting it
                _signal_group(child.pid, signal.SIGTERM)
            while child.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    print("haltless: the server did not stop in time; killing it",
                          file=sys.stderr, flush=True)
                    _signal_group(child.pid, signal.SIGKILL)
                    child.wait()
                    break
                time.sleep(0.1)
            _signal_group(child.pid, signal.SIGKILL)  # no worker outlives its granian
            if deadline is not None:
                return 0
            failed_starts = failed_starts + 1 if time.monotonic() - started < STARTUP_FAILURE else 0
            if failed_starts >= MAX_FAILED_STARTS:
                print(f"haltless: the server exited with code {child.returncode} "
                      f"{failed_starts} times in a row right after starting; giving up",
                      file=sys.stderr, flush=True)
                return child.returncode or 1
            print(f"haltless: granian exited with code {child.returncode} (a worker died "
                  "repeatedly?); starting it again", file=sys.stderr, flush=True)
            time.sleep(min(8.0, 0.5 * 2 ** failed_starts))
    finally:
        if keeper is not None:
            keeper.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if child is not None:
            _signal_group(child.pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)


class PostgresKeeper(threading.Thread):
    """Starts the embedded PostgreSQL again when its postmaster exits while
    ``haltless serve`` runs: checked every ``CHECK`` seconds; a start that
    fails (the dead postmaster's backends still leaving, a full disk) is
    retried after 1, 2, 4 ... 60 s. Each event is one line on stderr."""

    CHECK = 1.0
    MAX_DELAY = 60.0

    def __init__(self, data_dir: Path) -> None:
        super().__init__(name="haltless-postgres-keeper", daemon=True)
        self.data_dir = Path(data_dir)
        self.stopping = threading.Event()
        self.starting = threading.Lock()  # stop() waits for a start under way

    def run(self) -> None:
        from . import db
        while not self.stopping.wait(self.CHECK):
            if db.embedded_alive(self.data_dir):
                continue
            print("haltless: the embedded PostgreSQL is down (its postmaster exited); "
                  "starting it again", file=sys.stderr, flush=True)
            delay = 1.0
            while True:
                with self.starting:
                    if self.stopping.is_set():
                        return
                    try:
                        db.restart_embedded(self.data_dir)
                        problem = None
                    except Exception as exc:  # noqa: BLE001 - the keeper must go on
                        problem = (str(exc).splitlines() or [type(exc).__name__])[0]
                if problem is None:
                    print("haltless: the embedded PostgreSQL is up again (crash recovery "
                          "done); the workers reconnect by themselves", file=sys.stderr,
                          flush=True)
                    break
                print(f"haltless: cannot start the embedded PostgreSQL yet: {problem}; "
                      f"trying again in {delay:.0f} s", file=sys.stderr, flush=True)
                if self.stopping.wait(delay):
                    return
                delay = min(delay * 2, self.MAX_DELAY)

    def stop(self) -> None:
        self.stopping.set()
        with self.starting:  # a start under way ends first: its handle is stopped at exit
            pass
        self.join(timeout=5)


def _raise_open_files_limit() -> None:
    """Idle connections cost a file descriptor each; the soft limit (often
    1,024) would refuse connections long before memory or CPU run short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the group is still killed when we exit normally


def run_granian(settings: Settings, access_log: bool) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings

    _raise_open_files_limit()
    Granian(
        "haltless.server.app:app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=settings.workers,
        loop=Loops.uvloop,
        log_access=access_log,
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout * 1000)),
        backlog=BACKLOG,
        backpressure=settings.max_connections,
        respawn_failed_workers=True,
        workers_kill_timeout=WORKER_KILL_TIMEOUT,
    ).serve()


if __name__ == "__main__":
    run_granian(Settings.from_env(), "--access-log" in sys.argv[1:])

"""``haltless serve``: the granian server, run as a supervised child.

The ``haltless serve`` process prepares once (embedded PostgreSQL, migrations,
secrets: ``runtime.prepare``), checks that the port is free, then runs
granian's main process as a child in its own process group and supervises it:

* SIGTERM/SIGINT are forwarded to granian, which stops gracefully; whatever
  is still running ``STOP_GRACE`` seconds later (say, workers still starting,
  when granian defers the signal) is killed with the whole group, so the
  server stops within seconds at any moment;
* if granian's main process dies, its workers are killed too, and the exit
  code says so;
* the child gets the prepared settings through its environment
  (``Settings.to_env``) and dies with this process (``PR_SET_PDEATHSIG``).

granian respawns a worker that dies (``respawn_failed_workers``) while the
others keep serving.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

from .config import Settings
from .errors import ConfigError

STOP_GRACE = 8.0  # seconds between the forwarded SIGTERM and SIGKILL of the group
WORKER_KILL_TIMEOUT = 5  # granian: seconds a worker may take to stop gracefully


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
    """Run granian until it exits or we are told to stop; its exit code."""
    env = {**os.environ, **settings.to_env()}
    argv = [sys.executable, "-m", "haltless.server.serve"] + (["--access-log"] if access_log else [])
    child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    deadline = None

    def stop(signum, frame):
        nonlocal deadline
        if deadline is None:
            deadline = time.monotonic() + STOP_GRACE
            _signal_group(child.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while child.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                print("haltless: the server did not stop in time; killing it", file=sys.stderr,
                      flush=True)
                _signal_group(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.1)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _signal_group(child.pid, signal.SIGKILL)  # no worker outlives the server
    if deadline is not None:
        return 0
    print(f"haltless: the server exited with code {child.returncode}", file=sys.stderr, flush=True)
    return child.returncode or 1


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
    from granian.constants import Interfaces, Loops

    Granian(
        "haltless.server.app:app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=settings.workers,
        loop=Loops.uvloop,
        log_access=access_log,
        backlog=2048,
        respawn_failed_workers=True,
        workers_kill_timeout=WORKER_KILL_TIMEOUT,
    ).serve()


if __name__ == "__main__":
    run_granian(Settings.from_env(), "--access-log" in sys.argv[1:])

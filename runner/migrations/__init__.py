"""The store's schema history (Alembic revisions in `versions/`) and the one function that applies it.

`Store` calls `upgrade` when it opens a database: an empty one is built by the revisions, one written
by a servelab from before Alembic (a `meta` table saying `schema_version` 1) is checked against the
baseline revision and stamped with it, then every database is brought to head. Two processes opening
the same database at once take turns: the upgrade is one transaction that first takes the database's
write lock (SQLite `BEGIN IMMEDIATE`) or an advisory lock (PostgreSQL), then reads the revision again.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from runner.errors import StoreError

BASELINE = "0001"
_HERE = Path(__file__).parent
_PG_LOCK_KEY = 0x5E_12E1AB  # pg_advisory_xact_lock key of servelab's migrations


def _config(conn: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = conn
    return cfg


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this servelab knows."""
    return str(_scripts().get_current_head())


def current(conn: sa.Connection) -> str | None:
    """The revision recorded in the database, None when Alembic never ran on it."""
    return MigrationContext.configure(conn).get_current_revision()


_IN_PROCESS = threading.Lock()
"""Alembic's `context` is module-global: two threads migrating (even two different stores) at once mix their
operations (seen: `KeyError: 'config'`, an index created on the other store's connection)."""


@contextmanager
def _file_lock(engine: sa.Engine) -> Iterator[None]:
    """Processes opening one new SQLite file at once (a worker and a dashboard) take turns: pysqlite's
    `BEGIN IMMEDIATE` alone let two of them run the same revision (seen: `table benchresult already exists`)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:" or path.startswith("file:"):
        yield
        return
    with open(f"{path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(engine: sa.Engine, where: str) -> None:
    """Bring the database of `engine` to head (`where` names it in errors)."""
    with engine.connect() as conn:
        found = current(conn)
    if found == head():
        return
    # Three locks, each for what the others miss: `_IN_PROCESS` for threads of this process (Alembic's context
    # is module-global, so even two different stores, on any backend, collide; a file lock does not cover two
    # stores); `_file_lock` for processes opening one SQLite file (a thread lock does not reach them, and
    # `BEGIN IMMEDIATE` alone let two run one revision); the database's own lock (`BEGIN IMMEDIATE`, the
    # PostgreSQL advisory lock) for every other opener of the database, such as another host on PostgreSQL.
    with _IN_PROCESS, _file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before reading: migrations never interleave
        elif conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        found = current(conn)  # another process may have migrated while we waited
        if found == head():
            return
        if found is not None and found not in {s.revision for s in _scripts().walk_revisions()}:
            raise StoreError(
                f"database {where} has schema revision {found}, newer than this servelab's {head()}; "
                "upgrade servelab (pip install -U servelab) or point SERVELAB_DB elsewhere."
            )
        cfg = _config(conn)
        if found is None and _pre_alembic(conn):
            if problems := _differences_from_baseline(conn):
                raise StoreError(
                    f"database {where} was written by a servelab from before schema migrations, but its tables "
                    f"differ from that servelab's ({'; '.join(problems)}); open it with the servelab that wrote "
                    "it, or point SERVELAB_DB elsewhere."
                )
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")


def _pre_alembic(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table("meta")


def _differences_from_baseline(conn: sa.Connection) -> list[str]:
    """What keeps a pre-Alembic database from being the baseline: missing tables or columns, extra
    columns, another `schema_version`. Indexes may differ (revision 0002 settles them)."""
    inspector = sa.inspect(conn)
    problems = []
    version = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    if version != "1":
        problems.append(f"meta.schema_version is {version!r}, not '1'")
    present = set(inspector.get_table_names())
    for table, columns in _baseline_tables().items():
        if table not in present:
            problems.append(f"no table {table}")
            continue
        have = {c["name"] for c in inspector.get_columns(table)}
        if missing := sorted(columns - have):
            problems.append(f"{table} lacks {', '.join(missing)}")
        if extra := sorted(have - columns):
            problems.append(f"{table} has unknown {', '.join(extra)}")
    return problems


@cache
def _baseline_tables() -> dict[str, frozenset[str]]:
    """Table → column names of the baseline revision, read from a scratch in-memory database built by it."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), BASELINE)
            inspector = sa.inspect(conn)
            return {
                t: frozenset(c["name"] for c in inspector.get_columns(t))
                for t in inspector.get_table_names()
                if t != "alembic_version"
            }
    finally:
        engine.dispose()

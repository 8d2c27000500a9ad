"""Alembic migrations on SQLite and PostgreSQL: the committed stores of servelab's pre-Alembic schema reach
head with every row intact, a fresh database at head equals the models, and what cannot be migrated is refused."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from runner import migrations
from runner.errors import StoreError
from runner.models import RunStatus
from runner.store import Store

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(REPO.glob("docs/gpu-runs/*/servelab.db"))
TABLES = ("sweep", "run", "benchresult", "evalresult", "sample", "phaseevent")  # parents before children


def _columns(conn: sa.Connection, table: str) -> list[str]:
    return sorted(c["name"] for c in sa.inspect(conn).get_columns(table))


def _rows(conn: sa.Connection, table: str, columns: list[str] | None = None) -> list[tuple[Any, ...]]:
    """Every row of `table` by id, every column (or `columns`) in name order, values made comparable across
    databases."""
    columns = columns or _columns(conn, table)
    query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"  # noqa: S608
    return [tuple(_plain(v) for v in row) for row in conn.exec_driver_sql(query)]


def _plain(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == " ":  # SQLite's datetimes
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _pre_alembic_copy(source: Path, db_url: str, db_path: Path) -> None:
    """The committed store as servelab wrote it before Alembic, on the backend of `db_url`: the file copied
    for SQLite; for PostgreSQL, the same schema (baseline revision, the file's sample index, no
    alembic_version) filled with the file's rows. Plus a sweep and an eval result, so that every table has rows."""
    if not db_url.startswith("postgresql"):
        shutil.copy(source, db_path)
    else:
        engine = sa.create_engine(db_url)
        with engine.begin() as conn, sqlite3.connect(source) as old:
            command.upgrade(migrations._config(conn), migrations.BASELINE)
            conn.exec_driver_sql("DROP TABLE alembic_version")
            indexes = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            if "ix_sample_run_id_t" in indexes:  # written before the (run_id, t, gpu_index) index
                conn.exec_driver_sql("DROP INDEX ix_sample_run_id_t_gpu_index")
                conn.exec_driver_sql("CREATE INDEX ix_sample_run_id_t ON sample (run_id, t)")
            meta = sa.MetaData()
            meta.reflect(conn)
            for table in (*TABLES, "meta"):
                cursor = old.execute(f"SELECT * FROM {table}")  # noqa: S608
                names = [d[0] for d in cursor.description]
                rows = [{n: _plain(v) for n, v in zip(names, row)} for row in cursor]
                if rows:
                    conn.execute(meta.tables[table].insert(), rows)
                if table != "meta":
                    conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                                         f"coalesce(max(id), 0) + 1, false) FROM {table}")
        engine.dispose()
    engine = sa.create_engine(db_url if db_url.startswith("postgresql") else f"sqlite:///{db_path}")
    with engine.begin() as conn:
        sweep_id = conn.execute(sa.text("INSERT INTO sweep (name, spec_json, created_at) VALUES "
                                        "('old sweep', '{}', '2026-11-29 05:00:00') RETURNING id")).scalar_one()
        run_id = conn.exec_driver_sql("SELECT min(id) FROM run").scalar_one()
        conn.execute(sa.text("UPDATE run SET sweep_id = :s WHERE id = :r"), {"s": sweep_id, "r": run_id})
        conn.execute(sa.text("INSERT INTO evalresult (run_id, task, filter, metric, value, stderr, n_shot) VALUES "
                             "(:r, 'gsm8k', 'strict-match', 'exact_match', 0.9409, 0.0065, 5)"), {"r": run_id})
    engine.dispose()


@pytest.mark.parametrize("committed", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_a_committed_pre_alembic_store_reaches_head_with_nothing_lost(
    committed: Path, db_url: str, db_path: Path
) -> None:
    _pre_alembic_copy(committed, db_url, db_path)
    url = db_url if db_url.startswith("postgresql") else str(db_path)
    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    with engine.connect() as conn:
        before = {t: _rows(conn, t) for t in TABLES}
        columns = {t: _columns(conn, t) for t in TABLES}
        assert migrations.current(conn) is None and sa.inspect(conn).has_table("meta")
    engine.dispose()
    with sqlite3.connect(committed) as old:  # the copy holds every row of the committed file, and the two added
        for table in TABLES:
            expected = old.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            assert len(before[table]) == expected + (table in ("sweep", "evalresult")), table

    with Store(url) as store:
        assert store.revision() == migrations.head()
        with store.engine.connect() as conn:
            assert {t: _rows(conn, t, columns[t]) for t in TABLES} == before  # every row, every column
            added = {t: sorted(set(_columns(conn, t)) - set(columns[t])) for t in TABLES}
            assert {t: c for t, c in added.items() if c} == {"run": ["commands_json", "node_ip", "node_name",
                                                                             "ray_node_id"], "sample": ["ray_node_id"]}
            assert {row for row in _rows(conn, "run", added["run"])} == {(None,) * 4}  # new: empty
            assert {row for row in _rows(conn, "sample", added["sample"])} <= {(None,)}
            inspector = sa.inspect(conn)
            assert not inspector.has_table("meta")
            assert {ix["name"] for ix in inspector.get_indexes("sample")} == {"ix_sample_run_id_t_gpu_index"}
        # the product reads them as the file holds them, and writes after them
        runs = sorted(store.list_runs(), key=lambda r: r.id)
        with sqlite3.connect(committed) as old:
            label, created = old.execute("SELECT label, created_at FROM run ORDER BY id LIMIT 1").fetchone()
            statuses = [r[0] for r in old.execute("SELECT status FROM run ORDER BY id")]
            bench = old.execute("SELECT run_id, request_throughput FROM benchresult ORDER BY id").fetchall()
            samples = dict(old.execute("SELECT run_id, count(*) FROM sample GROUP BY run_id").fetchall())
            phases = old.execute("SELECT run_id, phase FROM phaseevent ORDER BY run_id, t, id").fetchall()
        first = runs[0]
        assert (first.label, first.created_at) == (label, datetime.fromisoformat(created).replace(tzinfo=UTC))
        assert [r.status for r in runs] == [RunStatus(s) for s in statuses]
        assert [(b.run_id, b.request_throughput) for r in runs for b in store.bench_results(r.id)] == bench
        assert {r.id: len(store.samples_frame([r.id])) for r in runs if r.id in samples} == samples
        assert [(p.run_id, p.phase) for r in runs for p in store.phases(r.id)] == phases
        assert [(e.task, e.value, e.n_shot) for e in store.eval_results(first.id)] == [("gsm8k", 0.9409, 5)]
        assert [s.name for s in store.list_sweeps() if s.id == first.sweep_id] == ["old sweep"]
        new = store.create_run(label="after the migration")
        assert new.id == max(r.id for r in runs) + 1
        store.add_samples([{"run_id": new.id, "t": 1.0, "gpu_index": 0}])
        assert len(store.samples_frame([new.id])) == 1


def test_a_fresh_database_at_head_equals_the_models(db_url: str) -> None:
    with Store(db_url) as store, store.engine.connect() as conn:
        assert store.revision() == migrations.head() == "0007"
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_a_newer_database_is_refused_not_touched(db_url: str) -> None:
    with Store(db_url) as store:
        store.create_run(label="kept")
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match=r"schema revision 9999, newer than this servelab's 0007; upgrade servelab"):
        Store(db_url)
    engine = sa.create_engine(db_url if "://" in db_url else f"sqlite:///{db_url}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == "9999"
        assert conn.exec_driver_sql("SELECT label FROM run").scalars().all() == ["kept"]
    engine.dispose()


def test_a_pre_alembic_store_of_another_schema_is_refused_not_stamped(db_path: Path) -> None:
    shutil.copy(COMMITTED[0], db_path)
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE run ADD COLUMN mystery INTEGER")
    with pytest.raises(StoreError, match=r"differ from that servelab's \(run has unknown mystery\)"):
        Store(db_path)
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "alembic_version" not in tables and "meta" in tables


def test_processes_opening_a_new_database_at_once_migrate_it_once(db_url: str) -> None:
    barrier = threading.Barrier(4)

    def open_store(_: int) -> str | None:
        barrier.wait()
        with Store(db_url) as store:
            return store.revision()

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(open_store, range(4), timeout=60)) == ["0007"] * 4
    with Store(db_url) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar_one() == 1


def test_every_revision_downgrades_to_nothing_and_upgrades_again(db_url: str) -> None:
    with Store(db_url) as store:
        with store.engine.begin() as conn:
            command.downgrade(migrations._config(conn), "base")
        with store.engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
            if conn.dialect.name == "postgresql":  # the enum types went with their tables
                enums = "SELECT count(*) FROM pg_type WHERE typname IN ('runstatus', 'runsource')"
                assert conn.exec_driver_sql(enums).scalar_one() == 0
        migrations.upgrade(store.engine, db_url)
        with store.engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []

"""The job database is the single record of a row's progress: exactly once on SQL, recorded downloads.

Creation intent (token, planned backend), who holds a row (owner, lease) and the download state of its
results are all in the job database; these tests check that reruns and other workers act on exactly that,
with the simulator's own records as the truth.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import openeo
import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import POSTGRES_URL, ndvi_job, tiles_df

from prefect_openeo import JobDatabaseError, MultiBackendJobManager, create_job_db
from prefect_openeo.backends import creation_token, make_resilient
from prefect_openeo.jobdb.owners import Owner, is_dead, this_worker
from prefect_openeo.jobdb.sql import SCHEMA_VERSION, SqlJobDatabase

pytestmark = pytest.mark.timeout(240)

WORKER = str(Path(__file__).parent / "sql_worker.py")
CHAOS = str(Path(__file__).parent.parent / "benchmarks" / "chaos.py")


def manager_for(sim, **kwargs) -> MultiBackendJobManager:
    kwargs.setdefault("poll_sleep", 0.1)
    parallel_jobs = kwargs.pop("parallel_jobs", 2)
    manager = MultiBackendJobManager(**kwargs)
    manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=parallel_jobs)
    return manager


def dead_owner() -> str:
    """The owner identity of a process that has ended (on this machine)."""
    code = "from prefect_openeo.jobdb.owners import this_worker; print(this_worker('gone'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def peak_active(jobs: list[dict]) -> int:
    """Most jobs queued or running at once (from the start request to the end), from the simulator's records."""
    events = []
    for job in jobs:
        if job["started_at"] is not None:
            end = job["ended_at"] if job["ended_at"] is not None else job["canceled_at"]
            events += [(job["started_at"], 1), (end if end is not None else float("inf"), -1)]
    current = peak = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return peak


def orphan_job(sim, row: pd.Series, token: str, *, start: bool) -> str:
    """A job created (and maybe started) by a run that died before recording its id."""
    connection = make_resilient(openeo.connect(sim.url))
    with creation_token(token):
        job = ndvi_job(row, connection)
    if start:
        job.start()
    return job.job_id


# -- owners -----------------------------------------------------------------------------------------------


def test_owner_liveness_on_this_machine():
    me = this_worker("run-1")
    assert Owner.parse(str(me)) == me
    assert not is_dead(str(me))  # this process
    assert is_dead(dead_owner())  # a process that ended
    reused = Owner(me.host, me.boot, me.pidns, me.pid, "12345.00", "run")  # same pid, another process start
    assert is_dead(str(reused))
    assert is_dead(str(Owner(me.host, "otherboot", me.pidns, me.pid, me.started, "r")))  # the machine rebooted
    # Other machines, other containers and foreign values cannot be judged here: their leases apply.
    assert not is_dead(str(Owner("elsewhere", me.boot, me.pidns, 1, "1.00", "r")))
    assert not is_dead(str(Owner(me.host, me.boot, "4026530000", 999999, "1.00", "r")))
    assert not is_dead("w0") and not is_dead(None)


# -- exactly once: unresolved creations -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "csv"])
def test_an_interrupted_creation_is_adopted_and_holds_its_slot(openeo_simulator, tmp_path, kind):
    """Row 0's job was created and started by a run that died before recording its id: the rerun finds it
    by its token (no second job), and with parallel_jobs=1 starts nothing else while it runs."""
    openeo_simulator.config.run_duration = 1.0
    df = tiles_df(3)
    job_id = orphan_job(openeo_simulator, df.loc[0], "poj-0000000000aa", start=True)
    df["create_token"] = ["poj-0000000000aa", None, None]
    df["planned_backend"] = [openeo_simulator.name, None, None]
    if kind == "sqlite":
        db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(df)
        with db.engine.begin() as conn:  # held by a worker whose process is gone; its lease runs for an hour
            conn.execute(
                sa.update(db.table)
                .where(db.table.c.idx == 0)
                .values(owner=dead_owner(), lease_until=time.time() + 3600)
            )
    else:
        db = create_job_db(tmp_path / "jobs.csv", df)
    started = time.monotonic()
    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root", parallel_jobs=1).run_jobs(
        job_db=db, start_job=ndvi_job
    )
    assert time.monotonic() - started < 60  # no waiting out the dead worker's lease
    out = db.read()
    assert list(out["status"]) == ["finished"] * 3
    assert out.loc[0, "id"] == job_id and stats["job adopted"] == 1 and stats["start_job call"] == 2
    assert openeo_simulator.created_count() == 3
    assert peak_active(openeo_simulator.jobs()) == 1


def test_a_creation_interrupted_mid_run_is_reconciled_by_a_running_worker(openeo_simulator, tmp_path):
    """Reconciliation runs every sweep, not only at start: a row left tokened by a dead worker while this
    worker runs is searched for and adopted."""
    openeo_simulator.config.run_duration = 3.0
    db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(tiles_df(1))
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root", parallel_jobs=3)
    manager.start_job_thread(start_job=ndvi_job, job_db=db)
    try:
        deadline = time.monotonic() + 30
        while not db.count_by_status(["queued", "running"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        extra = tiles_df(2).iloc[[1]]
        job_id = orphan_job(openeo_simulator, extra.loc[1], "poj-0000000000bb", start=False)
        extra = extra.assign(status="not_started", create_token="poj-0000000000bb", planned_backend="sim")
        SqlJobDatabase(tmp_path / "jobs.db").persist(extra)
        with db.engine.begin() as conn:
            conn.execute(
                sa.update(db.table)
                .where(db.table.c.idx == 1)
                .values(owner=dead_owner(), lease_until=time.time() + 3600)
            )
        while set(db.read()["status"]) != {"finished"} and time.monotonic() < deadline + 60:
            time.sleep(0.2)
    finally:
        manager.stop_job_thread(timeout_seconds=10)
    out = db.read()
    assert list(out["status"]) == ["finished", "finished"]
    assert out.loc[1, "id"] == job_id
    assert openeo_simulator.created_count() == 2


def test_a_row_held_by_a_live_worker_is_left_alone(openeo_simulator, tmp_path):
    """A tokened row whose owner is alive (here: this very process, another run) and whose lease holds is
    neither reconciled nor created by another worker: it keeps its slot."""
    openeo_simulator.config.run_duration = 0.2
    df = tiles_df(2)
    df["create_token"], df["planned_backend"] = ["poj-0000000000cc", None], ["sim", None]
    db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(df)
    with db.engine.begin() as conn:
        conn.execute(
            sa.update(db.table)
            .where(db.table.c.idx == 0)
            .values(owner=str(this_worker("other")), lease_until=time.time() + 3600)
        )
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root", parallel_jobs=1)
    manager.start_job_thread(start_job=ndvi_job, job_db=SqlJobDatabase(tmp_path / "jobs.db"))
    time.sleep(3)
    manager.stop_job_thread(timeout_seconds=10)
    out = db.read()
    assert out.loc[0, "status"] == "not_started" and out.loc[0, "create_token"] == "poj-0000000000cc"
    assert openeo_simulator.created_count() == 0  # its held slot (parallel_jobs=1) kept row 1 waiting too


def test_rows_on_a_backend_only_another_live_worker_has_are_left_to_it(openeo_simulator, tmp_path):
    """Workers with different backends on one database: rows running on a backend this worker does not have
    are no error while a live worker holds them, and are not taken over (it could not track them); held by
    nobody, they are the same clear error as in a file job database."""
    df = tiles_df(3).assign(status="not_started")
    df.loc[0, ["status", "id", "backend_name"]] = ["running", "j-elsewhere", "elsewhere"]
    db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(df)
    other = str(this_worker("other"))
    with db.engine.begin() as conn:
        conn.execute(sa.update(db.table).where(db.table.c.idx == 0).values(owner=other, lease_until=time.time() + 3600))
    manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
        start_job=ndvi_job, job_db=SqlJobDatabase(tmp_path / "jobs.db")
    )
    out = db.read()
    assert list(out["status"]) == ["running", "finished", "finished"]
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(db.table.c.owner).where(db.table.c.idx == 0)).scalar_one() == other
    with db.engine.begin() as conn:
        conn.execute(sa.update(db.table).where(db.table.c.idx == 0).values(lease_until=time.time() - 1))
    with pytest.raises(ValueError, match="names backend 'elsewhere', which is not registered"):
        manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
            start_job=ndvi_job, job_db=SqlJobDatabase(tmp_path / "jobs.db")
        )


def test_persist_never_overwrites_a_row_another_live_worker_holds(tmp_path, caplog):
    a = SqlJobDatabase(tmp_path / "jobs.db", worker_id="a").initialize_from_df(tiles_df(2))
    a.prepare_run({"sim": 2})
    claimed = a.claim_new({"sim": 5}, ["sim"])
    assert list(claimed.index) == [0, 1]
    b = SqlJobDatabase(tmp_path / "jobs.db", worker_id="b")
    stale = b.get_by_indices([0]).assign(status="skipped")
    with caplog.at_level(logging.WARNING, logger="prefect_openeo"):
        b.persist(stale)
    assert b.read().loc[0, "status"] == "not_started"
    assert "another live worker holds them" in caplog.text
    a.persist(a.get_by_indices([0]).assign(status="skipped"))  # the holder itself writes; the row is released
    assert a.read().loc[0, "status"] == "skipped"


# -- no waiting on the dead, starting together -------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs kill")
def test_sqlite_chaos_one_process_killed_and_rerun_at_once(tmp_path):
    out = subprocess.run(
        [sys.executable, CHAOS, "--db", "sqlite", "--rounds", "2", "--kills", "3", "--jobs", "12", "--seed", "5",
         "--workdir", str(tmp_path), "--lease-bound", "90"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["kills"] >= 3 and summary["duplicates"] == summary["lost_rows"] == summary["missing_results"] == 0
    assert summary["peak_active_per_backend"] <= summary["parallel_jobs"] and summary["waited_out_a_lease"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs kill")
def test_postgres_chaos_workers_killed_and_replaced(postgres_engine, tmp_path):
    out = subprocess.run(
        [sys.executable, CHAOS, "--db", "postgres", "--workers", "3", "--rounds", "1", "--kills", "4", "--jobs", "30",
         "--seed", "5", "--workdir", str(tmp_path), "--lease-bound", "90"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["kills"] >= 2 and summary["duplicates"] == summary["lost_rows"] == summary["missing_results"] == 0
    assert summary["peak_active_per_backend"] <= summary["parallel_jobs"] and summary["waited_out_a_lease"] == 0


def test_workers_initializing_a_new_postgres_database_together(postgres_engine, pg_table):
    """Three processes create the same new database from the same dataframe at the same moment."""
    at = time.time() + 3
    code = (
        "import sys, time; from conftest import tiles_df; from prefect_openeo.jobdb.sql import SqlJobDatabase;"
        f"time.sleep(max(0, {at} - time.time()));"
        f"SqlJobDatabase({POSTGRES_URL!r}, {pg_table!r}).initialize_from_df(tiles_df(40), on_exists='skip');"
        "print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err[-3000:]
    db = SqlJobDatabase(POSTGRES_URL, pg_table)
    assert db.count_by_status() == {"not_started": 40}
    with pytest.raises(FileExistsError):
        db.initialize_from_df(tiles_df(1))


def test_run_jobs_with_a_dataframe_uses_a_database_another_worker_just_created(openeo_simulator, tmp_path):
    """The manager's "create from df, else resume" tolerates losing the race to another worker."""
    db = SqlJobDatabase(tmp_path / "jobs.db")

    class Late(SqlJobDatabase):
        looked = False

        def exists(self) -> bool:  # saw no table, then another worker created it before this one could
            first, self.looked = not self.looked, True
            return False if first else super().exists()

    db.initialize_from_df(tiles_df(2))
    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
        df=tiles_df(2), job_db=Late(tmp_path / "jobs.db"), start_job=ndvi_job
    )
    assert stats["job finished"] == 2 and openeo_simulator.created_count() == 2


# -- one budget per backend -------------------------------------------------------------------------------


def test_one_budget_per_backend_is_recorded_and_told(tmp_path, caplog):
    first = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(tiles_df(1))
    assert first.prepare_run({"a": 2, "b": 3}) == {"a": 2, "b": 3}
    second = SqlJobDatabase(tmp_path / "jobs.db")
    with caplog.at_level(logging.WARNING, logger="prefect_openeo"):
        assert second.prepare_run({"a": 5, "b": 3, "c": 1}) == {"a": 2, "b": 3, "c": 1}
    assert "parallel_jobs=5 differs from the budget 2" in caplog.text and "2 applies" in caplog.text
    assert "'b'" not in caplog.text
    second.set_budget("a", 4)
    assert first.budgets() == {"a": 4, "b": 3, "c": 1}


def test_workers_with_different_parallel_jobs_share_the_recorded_budget(openeo_simulator, pg_table):
    openeo_simulator.config.run_duration = 0.5
    SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_df(16))
    args = [POSTGRES_URL, pg_table]
    first = subprocess.Popen(
        [sys.executable, WORKER, *args, "w2", "30", "0.1", openeo_simulator.url, "--parallel-jobs", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)  # the first worker records its budget
    second = subprocess.Popen(
        [sys.executable, WORKER, *args, "w5", "30", "0.1", openeo_simulator.url, "--parallel-jobs", "5"],
        stderr=subprocess.PIPE,
        text=True,
    )
    errors = [p.communicate(timeout=180)[1] for p in (first, second)]
    assert first.returncode == second.returncode == 0, errors
    assert "parallel_jobs=5 differs from the budget 2" in errors[1]
    assert set(SqlJobDatabase(POSTGRES_URL, pg_table).read()["status"]) == {"finished"}
    assert openeo_simulator.created_count() == 16
    assert peak_active(openeo_simulator.jobs()) <= 2


# -- schema versions --------------------------------------------------------------------------------------


def _old_table(
    engine: sa.Engine, table: str, *, meta: bool = True, status_type: str = "VARCHAR(32)", data: bool = True
) -> None:  # noqa: E501
    """A job database table as an earlier version wrote it: no lease/owner/results columns, no version."""
    columns = [
        "idx BIGINT PRIMARY KEY", f"status {status_type}", "id VARCHAR(255)", "backend_name VARCHAR(255)",
        "start_time VARCHAR(64)", "running_start_time VARCHAR(64)", "costs FLOAT", "message TEXT",
        "create_token VARCHAR(64)", "retry_count INTEGER", "retry_after VARCHAR(64)",
    ] + (["data TEXT"] if data else [])  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE "{table}" ({", ".join(columns)})'))
        if data:
            for i in range(3):
                payload = json.dumps({"west": 5.0 + i, "year": 2021})
                conn.execute(
                    sa.text(f"INSERT INTO \"{table}\" (idx, status, data) VALUES ({i}, 'not_started', '{payload}')")
                )
        if meta:
            conn.execute(sa.text(f'CREATE TABLE "{table}_meta" (key VARCHAR(64) PRIMARY KEY, value TEXT)'))
            for key, value in {
                "columns": ["west", "year", "status"],
                "index_type": "integer",
                "geometry": None,
            }.items():
                conn.execute(sa.text(f"INSERT INTO \"{table}_meta\" VALUES ('{key}', '{json.dumps(value)}')"))


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "no-meta"])
def test_an_older_schema_is_upgraded_in_place(openeo_simulator, postgres_engine, pg_table, tmp_path, meta, caplog):
    _old_table(postgres_engine, pg_table, meta=meta)
    db = SqlJobDatabase(POSTGRES_URL, pg_table)
    with caplog.at_level(logging.WARNING, logger="prefect_openeo"):
        stats = manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(job_db=db, start_job=ndvi_job)
    assert f"Upgraded job database table {pg_table!r} to schema version {SCHEMA_VERSION}" in caplog.text
    assert "owner" in caplog.text and "results" in caplog.text
    columns = {c["name"] for c in sa.inspect(postgres_engine).get_columns(pg_table)}
    assert {"owner", "lease_until", "planned_backend", "results"} <= columns
    out = SqlJobDatabase(POSTGRES_URL, pg_table).read()
    assert stats["job finished"] == 3 and list(out["status"]) == ["finished"] * 3
    assert list(out["west"]) == [5.0, 6.0, 7.0] and list(out["results"]) == ["done"] * 3


def test_a_narrower_column_is_a_clear_error(postgres_engine, pg_table):
    _old_table(postgres_engine, pg_table, status_type="VARCHAR(12)")
    with pytest.raises(JobDatabaseError) as info:
        SqlJobDatabase(POSTGRES_URL, pg_table).count_by_status()
    message = str(info.value)
    assert pg_table in message and "'status'" in message and "VARCHAR(12)" in message
    assert f'ALTER TABLE "{pg_table}" ALTER COLUMN status TYPE VARCHAR(32)' in message or "ALTER TABLE" in message
    assert {c["name"] for c in sa.inspect(postgres_engine).get_columns(pg_table)} >= {"status"}
    assert "owner" not in {c["name"] for c in sa.inspect(postgres_engine).get_columns(pg_table)}  # nothing changed


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("no-data", "has no column 'data': it was not made by prefect-openeo"),
        ("status-int", "column 'status' has type INTEGER, expected VARCHAR(32)"),
        ("newer", "newer than this prefect-openeo knows"),
    ],
)
def test_a_table_it_cannot_use_is_a_clear_error(postgres_engine, pg_table, damage, expected):
    if damage == "no-data":
        _old_table(postgres_engine, pg_table, data=False)
    elif damage == "status-int":
        _old_table(postgres_engine, pg_table, status_type="INTEGER", data=False)
        with postgres_engine.begin() as conn:
            conn.execute(sa.text(f'ALTER TABLE "{pg_table}" ADD COLUMN data TEXT'))
    else:
        SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_df(1))
        with postgres_engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE \"{pg_table}_meta\" SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(JobDatabaseError, match=pg_table) as info:
        SqlJobDatabase(POSTGRES_URL, pg_table).get_by_status(["not_started"])
    assert expected in str(info.value)


# -- downloads recorded and claimed -----------------------------------------------------------------------


def test_two_workers_download_each_result_once(openeo_simulator, pg_table, tmp_path):
    openeo_simulator.config.asset_size = 100_000
    db = SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_df(12))
    manager_for(openeo_simulator, root_dir=tmp_path / "unused", parallel_jobs=6, download_results=False).run_jobs(
        job_db=db, start_job=ndvi_job
    )
    with db.engine.begin() as conn:  # every result owed, as after a run whose downloads were interrupted
        conn.execute(sa.update(db.table).values(results="pending", backend_name="b0"))  # sql_worker's name
    before = openeo_simulator.request_counts().get("GET /jobs/{job_id}/results/{asset}", 0)
    root = tmp_path / "results"
    args = [POSTGRES_URL, pg_table]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *args, f"d{i}", "30", "0.1", openeo_simulator.url, "--root-dir", str(root)],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert openeo_simulator.request_counts()["GET /jobs/{job_id}/results/{asset}"] - before == 12
    out = SqlJobDatabase(POSTGRES_URL, pg_table).read()
    assert list(out["results"]) == ["done"] * 12
    assert all((root / f"job_{job_id}" / "job-results.json").exists() for job_id in out["id"])
    assert openeo_simulator.created_count() == 12


def test_results_gone_from_the_backend_are_recorded_once(openeo_simulator, tmp_path):
    db_path = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path / "root", download_results=False).run_jobs(
        job_db=db_path, df=tiles_df(2), start_job=ndvi_job
    )
    df = pd.read_csv(db_path)
    df["results"] = "pending"
    df.to_csv(db_path, index=False)
    openeo_simulator.delete_job(df.loc[0, "id"])  # expired, or deleted by someone
    before = openeo_simulator.request_counts().get("GET /jobs/{job_id}/results", 0)

    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(job_db=db_path, start_job=ndvi_job)

    out = pd.read_csv(db_path)
    assert list(out["results"]) == ["gone", "done"]
    assert "gone from the backend (404)" in out.loc[0, "message"]
    assert stats["results gone"] == 1 and stats.get("on_job_done error", 0) == 0
    assert openeo_simulator.request_counts()["GET /jobs/{job_id}/results"] - before == 2  # one each, no retries
    again = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(job_db=db_path, start_job=ndvi_job)
    assert again["run_jobs loop"] == 0  # nothing owed: the rerun ends at once


def test_a_finished_row_records_its_download_state_with_its_status(openeo_simulator, tmp_path):
    """Killed between the status write and the download, a rerun downloads: the state says pending."""
    openeo_simulator.config.run_duration = 0.2

    script = tmp_path / "crashing.py"
    script.write_text(
        "import os, sys, openeo\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import ndvi_job, tiles_df\n"
        "from prefect_openeo import MultiBackendJobManager\n"
        "class Crashing(MultiBackendJobManager):\n"
        "    def on_job_done(self, job, row):\n"
        "        os._exit(9)  # the process dies before the download\n"
        f"m = Crashing(poll_sleep=0.1, root_dir={str(tmp_path / 'root')!r})\n"
        f"m.add_backend('sim', connection=openeo.connect({openeo_simulator.url!r}))\n"
        f"m.run_jobs(job_db={str(tmp_path / 'jobs.csv')!r}, df=tiles_df(1), start_job=ndvi_job)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    recorded = pd.read_csv(tmp_path / "jobs.csv")
    assert recorded.loc[0, "status"] == "finished" and recorded.loc[0, "results"] == "pending"
    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
        job_db=tmp_path / "jobs.csv", start_job=ndvi_job
    )
    assert stats["job download"] == 1 and pd.read_csv(tmp_path / "jobs.csv").loc[0, "results"] == "done"
    assert openeo_simulator.created_count() == 1


# -- resume at scale --------------------------------------------------------------------------------------


def test_resume_requests_do_not_depend_on_rows_that_ended_earlier(openeo_simulator, tmp_path):
    """A database whose finished rows were downloaded elsewhere (and whose backend jobs are gone) resumes
    with requests for its active jobs only."""
    openeo_simulator.config.run_duration = 0.5
    n_done, n_active = 3000, 5
    df = tiles_df(n_done + n_active)
    df["status"], df["backend_name"] = "finished", "sim"
    df["id"] = [f"j-gone-{i}" for i in range(len(df))]
    df["results"] = ["done" if i % 2 else None for i in range(len(df))]
    connection = openeo.connect(openeo_simulator.url)
    for i in range(n_done, n_done + n_active):
        job = ndvi_job(df.loc[i], connection)
        job.start()
        df.loc[i, ["status", "id", "results"]] = ["queued", job.job_id, None]
    create_job_db(tmp_path / "jobs.parquet", df)
    before = collections.Counter(openeo_simulator.request_counts())

    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
        job_db=tmp_path / "jobs.parquet", start_job=ndvi_job
    )

    spent = collections.Counter(openeo_simulator.request_counts())
    spent.subtract(before)
    assert stats["job finished"] == n_active and stats["job download"] == n_active
    assert spent["GET /jobs/{job_id}"] <= n_active and spent["GET /jobs/{job_id}/results"] == n_active
    assert sum(spent.values()) < 20 * n_active


def test_one_run_at_a_time_on_a_local_file_job_database(openeo_simulator, tmp_path):
    """Two runs on one CSV file would create jobs for the same rows: the second is refused, saying who holds it."""
    from prefect_openeo.jobdb.errors import JobDatabaseBusy

    openeo_simulator.config.run_duration = 2.0
    db_path = tmp_path / "jobs.csv"
    create_job_db(db_path, tiles_df(2))
    first = manager_for(openeo_simulator, root_dir=tmp_path / "root")
    first.start_job_thread(start_job=ndvi_job, job_db=db_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "jobs.csv.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(JobDatabaseBusy, match=f"pid {os.getpid()}"):
            manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(job_db=db_path, start_job=ndvi_job)
    finally:
        first.stop_job_thread(timeout_seconds=10)
    assert openeo_simulator.created_count() == 2
    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(job_db=db_path, start_job=ndvi_job)
    assert stats["job finished"] + stats.get("job adopted", 0) >= 1  # the lock went with the first run
    assert set(pd.read_csv(db_path)["status"]) == {"finished"} and openeo_simulator.created_count() == 2


def test_retrying_a_start_failed_row_adopts_its_job_if_it_exists(openeo_simulator, tmp_path):
    """start_job raised after the backend had created the job (a lost answer, say): `retry` keeps the row's
    token, so the next run finds that job instead of creating a second one."""
    from typer.testing import CliRunner

    from prefect_openeo.cli import app

    df = tiles_df(2)
    job_id = orphan_job(openeo_simulator, df.loc[0], "poj-0000000000dd", start=False)
    df["status"] = ["start_failed", "not_started"]
    df["create_token"], df["planned_backend"] = ["poj-0000000000dd", None], ["sim", None]
    df["backend_name"], df["message"] = ["sim", None], ["start_job raised ReadTimeout()", None]
    create_job_db(tmp_path / "jobs.csv", df)
    result = CliRunner().invoke(app, ["retry", str(tmp_path / "jobs.csv"), "--status", "start_failed"])
    assert result.exit_code == 0, result.output
    reset = pd.read_csv(tmp_path / "jobs.csv")
    assert reset.loc[0, "status"] == "not_started" and reset.loc[0, "create_token"] == "poj-0000000000dd"
    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(
        job_db=tmp_path / "jobs.csv", start_job=ndvi_job
    )
    out = pd.read_csv(tmp_path / "jobs.csv")
    assert list(out["status"]) == ["finished", "finished"] and out.loc[0, "id"] == job_id
    assert stats["job adopted"] == 1 and openeo_simulator.created_count() == 2

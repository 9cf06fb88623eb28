"""One way to change a row: transitions are pure patches, the job store is the one writer, and the paths
that used to be written twice (reconcile, retry reset, the unregistered-backend check, download outcomes)
now behave the same wherever they run."""

from __future__ import annotations

import datetime

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, tiles_df
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo import MultiBackendJobManager, transitions
from prefect_openeo.engine import Observer
from prefect_openeo.jobdb import JobDatabaseError, JobStore, create_job_db, get_job_db, open_store
from prefect_openeo.jobdb.local import InterfaceStore
from prefect_openeo.jobdb.sql import SqlJobDatabase
from prefect_openeo.schema import BOOKKEEPING, COLUMN_REQUIREMENTS, usage_column_allowed
from prefect_openeo.states import Event

NOW = "2026-12-07T10:00:00Z"


def row(**cells) -> pd.Series:
    return pd.Series({"status": "not_started", "id": None, "backend_name": None, **cells})


# -- pure transitions ---------------------------------------------------------------------------------
def test_a_usage_field_never_overwrites_a_bookkeeping_column():
    details = {
        "usage": {
            "cpu": {"value": 10, "unit": "cpu-seconds"},
            "message": {"value": 1, "unit": "x"},
            "results": {"value": 2, "unit": "y"},
            "create_token": {"value": 3, "unit": "z"},
            "network": {"value": 4, "unit": "GB"},
        },
        "costs": 2.5,
    }
    patch = transitions.observed(row(status="running", id="j-1"), 0, "finished", now=NOW, details=details)
    assert patch.cells["cpu"] == "10 cpu-seconds" and patch.cells["network"] == "4 GB"
    assert patch.cells["results"] == "pending" and patch.cells["message"] is None  # ours, not the backend's
    assert "create_token" not in patch.cells
    assert set(patch.refused_usage) == {"message", "results", "create_token"}
    assert patch.cells["costs"] == 2.5 and patch.events == (Event.FINISHED,)
    assert all(not usage_column_allowed(c) for c in BOOKKEEPING if c not in ("cpu", "memory", "duration"))


def test_an_unknown_status_changes_nothing_and_says_so():
    patch = transitions.observed(row(status="running", id="j-1"), 3, "paused", now=NOW)
    assert not patch and patch.cells == {}
    assert "'paused'" in patch.problem


def test_every_patch_expects_the_status_it_was_made_from():
    before = row(status="queued_for_start", id="j-1", backend_name="a")
    patch = transitions.observed(before, 1, "running", now=NOW)
    assert patch.expect == "queued_for_start" and patch.status == "running"
    assert patch.cells["running_start_time"] == NOW and patch.events == (Event.STARTED_RUNNING,)
    merged = transitions.merge(
        [patch, transitions.observed(pd.Series({**before, "status": "running"}), 1, "error", now=NOW)]
    )
    assert merged[1].expect == "queued_for_start" and merged[1].status == "error"
    assert merged[1].events == (Event.STARTED_RUNNING, Event.FAILED)


@pytest.mark.parametrize("status", ["error", "start_failed"])
def test_one_reset_for_the_cli_and_the_engines_retries(status):
    """Both keep a start_failed row's creation token (its job may exist: the next run looks for it) and clear
    an error row's; both clear what belonged to the last job."""
    failed = row(status=status, id="j-1", create_token="poj-1", planned_backend="a", results="failed", message="x")
    by_cli = transitions.reset(failed, 0)
    later = datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc)
    by_engine = transitions.retry_scheduled(failed, 0, limit=2, backoff=10.0, now=later)
    for patch in (by_cli, by_engine):
        assert patch.status == "not_started"
        assert all(patch.cells[c] is None for c in ("id", "start_time", "running_start_time", "results"))
        kept = status == "start_failed"
        assert ("create_token" not in patch.cells) == kept and ("planned_backend" not in patch.cells) == kept
    assert by_engine.cells["retry_count"] == 1 and by_engine.cells["retry_after"] == "2026-12-07T00:00:10Z"
    assert by_engine.cells["message"].startswith(f"attempt 1 ended {status} (job j-1): x; retry 1/2")
    assert (
        transitions.retry_scheduled(pd.Series({**failed, "retry_count": 2}), 0, limit=2, backoff=1, now=later) is None
    )


def test_normalize_df_is_openeos():
    df = COLUMN_REQUIREMENTS.normalize_df(pd.DataFrame({"year": [2020]}))
    assert list(df.columns) == ["year", "id", "backend_name", "status", "start_time", "running_start_time", "costs"]
    assert df.at[0, "status"] == "not_started"
    assert MultiBackendJobManager._column_requirements.dtype_mapping()["costs"] == "float64"


# -- one store contract ----------------------------------------------------------------------------------
def test_every_job_database_is_a_job_store(tmp_path):
    sql = SqlJobDatabase(tmp_path / "jobs.db")
    assert isinstance(sql, JobStore) and open_store(sql) is sql
    csv = get_job_db(tmp_path / "jobs.csv")
    assert not isinstance(csv, JobStore) and isinstance(open_store(csv), InterfaceStore)


class HidingJobDatabase(JobDatabaseInterface):
    """A job database that never returns rows by index (as openeo's STACAPIJobDatabase, whose index is not the
    row's): the engine writes the rows it holds from what it holds."""

    def __init__(self, df: pd.DataFrame):
        self.rows = COLUMN_REQUIREMENTS.normalize_df(df)

    def exists(self):
        return True

    def persist(self, df):
        known = df.index.intersection(self.rows.index)
        for column in df.columns.difference(self.rows.columns):
            self.rows[column] = None
        self.rows.loc[known, df.columns] = df.loc[known, df.columns]

    def count_by_status(self, statuses=()):
        counts = self.rows["status"].value_counts().to_dict()
        return {s: n for s, n in counts.items() if not statuses or s in statuses}

    def get_by_status(self, statuses, max=None):  # noqa: A002
        return self.rows[self.rows["status"].isin(statuses)].copy()

    def get_by_indices(self, indices):
        return self.rows.iloc[0:0]


def test_a_job_database_that_hides_rows_by_index_still_finishes(openeo_simulator, tmp_path):
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
    db = HidingJobDatabase(tiles_df(3))
    stats = manager.run_jobs(job_db=db, start_job=ndvi_job)
    assert list(db.rows["status"]) == ["finished"] * 3
    assert list(db.rows["results"]) == ["done"] * 3
    assert stats["job download"] == 3 and openeo_simulator.created_count() == 3


def test_a_row_the_store_lost_is_a_clear_error(tmp_path):
    store = InterfaceStore(HidingJobDatabase(tiles_df(2)))
    with pytest.raises(JobDatabaseError, match=r"does not return row\(s\) \[1\]"):
        store.apply([transitions.cancel_sent(row(), 1, "x")])  # held by nobody: not to be invented
    held = pd.DataFrame([row(status="running")], index=[1])
    assert store.apply([transitions.cancel_sent(held.loc[1], 1, "x")], held) == [1]


# -- the paths that were written twice ---------------------------------------------------------------
def test_an_unplanned_creation_on_a_backend_without_listing_is_never_created_again(
    openeo_simulator, tmp_path, monkeypatch
):
    """A creation recorded without its planned backend (older versions), on a backend that has no job listing:
    whether its job exists cannot be known. The engine's reconcile used to clear the token and create the job
    a second time; it now decides as a lane does (``lanes.reconcile``)."""
    df = tiles_df(2)
    df["create_token"] = ["poj-000000000001", None]
    db = create_job_db(tmp_path / "jobs.csv", df)
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path, download_results=False)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
    monkeypatch.setattr(type(manager.backends["sim"]), "advertises_listing", lambda self: False)

    manager.run_jobs(job_db=db, start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    assert list(result["status"]) == ["start_failed", "finished"]
    assert "no job listing" in result.at[0, "message"] and "[poj-000000000001]" in result.at[0, "message"]
    assert pd.isna(result.at[0, "create_token"])  # `prefect-openeo retry` (once checked) creates it anew
    assert openeo_simulator.created_count() == 1


class Recording(Observer):
    def __init__(self):
        self.seen: list[tuple] = []

    def row_status(self, index, row, status):
        self.seen.append((index, status))


def test_an_adopted_job_reaches_the_observers(openeo_simulator, tmp_path):
    """Every applied transition reaches the observers (the Prefect UI): adopting a job created before a run
    stopped too (the engine's own reconcile wrote it without telling anyone)."""
    connection = openeo.connect(openeo_simulator.url)
    token = "poj-0000000000aa"
    graph = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}
    connection.create_job(graph, title=f"tile 0 [{token}]", validate=False)  # its reply was lost
    df = tiles_df(1)
    df["create_token"] = [token]
    db = create_job_db(tmp_path / "jobs.csv", df)
    from prefect_openeo.engine import JobEngine, RunSettings

    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path, download_results=False)
    manager.add_backend("sim", connection=connection, parallel_jobs=1)
    observer = Recording()
    engine = JobEngine(
        settings=RunSettings(backends=manager.backends, poll_sleep=0.1, results_owed=False),
        job_db=db,
        start_job=ndvi_job,
        observer=observer,
    )
    engine.run()
    assert openeo_simulator.created_count() == 1  # adopted, not created again
    statuses = [status for index, status in observer.seen if index == 0]
    assert statuses[-1] == "finished" and statuses[0] in ("created", "queued_for_start", "queued")


def test_a_shared_store_applies_a_patch_only_while_its_row_is_as_expected(tmp_path):
    df = tiles_df(2).assign(status="running", backend_name="a", id=["j-1", "j-2"])
    a = SqlJobDatabase(tmp_path / "jobs.db", worker_id="a").initialize_from_df(df)
    b = SqlJobDatabase(tmp_path / "jobs.db", worker_id="b")
    held = a.claim_active(["a"])
    details = {"usage": {"cpu": {"value": 3, "unit": "cpu-seconds"}}}
    finished = transitions.observed(held.loc[0], 0, "finished", now=NOW, details=details)

    assert b.apply([finished]) == []  # the row is a's
    assert a.apply([finished]) == [0]
    assert a.apply([transitions.observed(held.loc[0], 0, "error", now=NOW)]) == []  # stale: no longer running
    rows = a.read()
    assert rows.at[0, "status"] == "finished" and rows.at[0, "results"] == "pending"
    assert rows.at[0, "cpu"] == "3 cpu-seconds" and rows.at[0, "year"] == df.at[0, "year"]  # merged, kept
    assert rows.at[1, "status"] == "running"
    done = transitions.download_ended(rows.loc[0], 0, "done", None)
    assert a.apply([done]) == [0]
    assert b.apply([transitions.cancel_sent(a.read().loc[0], 0, "x")]) == [0]  # ended and released: anyone's


def test_the_tunables_come_from_prefect_openeo_variables(monkeypatch):
    from pydantic import ValidationError

    from prefect_openeo.settings import Settings

    monkeypatch.setenv("PREFECT_OPENEO_LANE_WAIT", "2.5")
    monkeypatch.setenv("PREFECT_OPENEO_MAX_SWEEP_GAP", "30")
    assert Settings().lane_wait == 2.5 and Settings().max_sweep_gap == 30.0
    monkeypatch.setenv("PREFECT_OPENEO_DOWNLOAD_WORKERS", "0")
    with pytest.raises(ValidationError, match="download_workers"):
        Settings()

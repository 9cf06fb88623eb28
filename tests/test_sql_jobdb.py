"""The SQL job database: SQLite by default, PostgreSQL for shared use by several workers."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import openeo
import pytest
from conftest import POSTGRES_URL, max_overlap, ndvi_job, tiles_df
from shapely.geometry import box

from prefect_openeo import MultiBackendJobManager, create_job_db, get_job_db
from prefect_openeo.jobdb.sql import SqlJobDatabase
from prefect_openeo.transitions import Patch

pytestmark = pytest.mark.timeout(180)

WORKER = str(Path(__file__).parent / "sql_worker.py")


def tiles_gdf(n: int) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"west": [5.0 + 0.1 * i for i in range(n)], "year": 2021, "name": [f"t{i}" for i in range(n)]},
        geometry=[box(5.0 + 0.1 * i, 51.0, 5.1 + 0.1 * i, 51.1) for i in range(n)],
        crs="EPSG:4326",
    )


def test_sqlite_round_trip_keeps_types_geometry_and_order(tmp_path):
    db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(tiles_gdf(12))
    df = db.read()
    assert isinstance(df, gpd.GeoDataFrame) and df.crs.to_epsg() == 4326
    assert list(df.index) == list(range(12))
    assert df.geometry.iloc[3].equals_exact(tiles_gdf(12).geometry.iloc[3], tolerance=0)
    assert df["year"].tolist() == [2021] * 12 and df["name"].iloc[11] == "t11"
    assert set(df["status"]) == {"not_started"}
    assert db.count_by_status() == {"not_started": 12}
    assert list(db.get_by_status(["not_started"], max=5).index) == [0, 1, 2, 3, 4]
    with pytest.raises(FileExistsError):
        SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(tiles_gdf(1))


def test_persist_writes_only_the_given_rows_and_merges_columns(tmp_path):
    db = SqlJobDatabase(tmp_path / "jobs.db").initialize_from_df(tiles_df(5))
    update = db.get_by_indices([2]).copy()
    update.loc[2, "status"] = "finished"
    update["cpu"] = "12 cpu-seconds"
    db.persist(update[["status", "cpu"]])
    df = db.read()
    assert df.loc[2, "status"] == "finished" and df.loc[2, "cpu"] == "12 cpu-seconds"
    assert df.loc[2, "west"] == pytest.approx(5.2)  # the columns not given are kept
    assert list(df["status"]) == ["not_started", "not_started", "finished", "not_started", "not_started"]
    assert db.count_by_status(["finished"]) == {"finished": 1}


def test_manager_runs_on_sqlite_by_path_and_url(openeo_simulator, tmp_path):
    for job_db in (str(tmp_path / "a.db"), f"sqlite:///{tmp_path / 'b.sqlite'}"):
        manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "root")
        manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url))
        stats = manager.run_jobs(job_db=job_db, df=tiles_df(3), start_job=ndvi_job)
        assert stats["job finished"] == 3
        df = get_job_db(job_db).read()
        assert list(df["status"]) == ["finished"] * 3
        assert df["cpu"].str.endswith("cpu-seconds").all() and (df["costs"] == 1.0).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "geoparquet"])
def test_import_and_export_keep_rows_and_geometry(tmp_path, fmt):
    source = tmp_path / f"in.{fmt}"
    create_job_db(source, tiles_gdf(4) if fmt != "csv" else tiles_df(4))
    db = SqlJobDatabase.from_file(source, tmp_path / "jobs.db")
    out = db.export(tmp_path / f"out.{fmt}")
    original, exported = get_job_db(source).read(), get_job_db(out).read()
    assert list(exported.columns) == list(original.columns)
    assert exported["status"].tolist() == original["status"].tolist()
    if fmt != "csv":
        assert isinstance(exported, gpd.GeoDataFrame)
        assert exported.geometry.iloc[2].equals(original.geometry.iloc[2])
    with pytest.raises(FileExistsError):
        db.export(out)


def test_postgres_runs_the_manager(openeo_simulator, pg_table, tmp_path):
    db = SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_gdf(4))
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=3)
    manager.run_jobs(job_db=db, start_job=ndvi_job)
    df = SqlJobDatabase(POSTGRES_URL, pg_table).read()
    assert list(df["status"]) == ["finished"] * 4 and df.crs.to_epsg() == 4326
    assert openeo_simulator.created_count() == 4


def test_three_workers_share_one_postgres_job_database(openeo_simulator_factory, pg_table):
    sims = [openeo_simulator_factory("b0", run_duration=0.4), openeo_simulator_factory("b1", run_duration=0.4)]
    SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_df(30))
    workers = [
        subprocess.Popen(
            [sys.executable, WORKER, POSTGRES_URL, pg_table, f"w{i}", "30", "0.1", *(s.url for s in sims)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=150)
        assert worker.returncode == 0, err[-3000:]
    df = SqlJobDatabase(POSTGRES_URL, pg_table).read()
    assert list(df["status"]) == ["finished"] * 30
    jobs = [job for sim in sims for job in sim.jobs()]
    assert len(jobs) == 30  # no row was started twice
    by_row = collections.Counter(job["title"].split(" by ")[0] for job in jobs)
    assert set(by_row.values()) == {1}
    # Slot budgets (2 per backend) held across the three workers together.
    assert max(max_overlap(sim.jobs()) for sim in sims) <= 2
    creators = collections.Counter(job["title"].split(" by ")[1].split(" [")[0] for job in jobs)
    assert len(creators) >= 2, creators


def test_workers_share_a_backends_slots_fairly_and_leave_none_idle(pg_table):
    """The worker that sees its job end refills only its share; a share nobody takes is its after a sweep."""
    first = SqlJobDatabase(POSTGRES_URL, pg_table, worker_id="first").initialize_from_df(tiles_df(12))
    first.prepare_run({"b": 4})
    assert len(first.claim_new({"b": 4}, ["b"])) == 4  # alone: the whole budget
    second = SqlJobDatabase(POSTGRES_URL, pg_table, worker_id="second")
    assert second.claim_new({"b": 4}, ["b"]).empty  # every slot held; it is a claimant now
    ended = first.read().index[:3]  # three of the first worker's jobs end
    first.apply([Patch(i, {"status": "finished"}) for i in ended], first.read())
    refill = first.claim_new({"b": 4}, ["b"])
    assert len(refill) == 1  # its share: ceil(4 / 2) = 2, it holds 1
    taken = second.claim_new({"b": 4}, ["b"])
    assert len(taken) == 2  # the rest for the worker that joined
    second.release()  # gone: its share is the first's again once free
    assert first.claim_new({"b": 4}, ["b"]).empty  # no slot free yet
    third = SqlJobDatabase(POSTGRES_URL, pg_table, worker_id="third")
    first.apply([Patch(i, {"status": "finished"}) for i in taken.index], first.read())
    assert third.claim_new({"b": 0}, ["b"]).empty  # a claimant whose lane is busy: claims nothing now
    assert len(first.claim_new({"b": 4}, ["b"])) == 0  # its share (2) is full: it leaves 2 to the third
    assert len(first.claim_new({"b": 4}, ["b"])) == 2  # the third took none for a sweep: no slot stays idle


def test_a_dead_workers_rows_are_taken_over(openeo_simulator, pg_table):
    openeo_simulator.config.run_duration = 3.0
    SqlJobDatabase(POSTGRES_URL, pg_table).initialize_from_df(tiles_df(4))
    args = [POSTGRES_URL, pg_table]
    first = subprocess.Popen([sys.executable, WORKER, *args, "dead", "2", "0.1", openeo_simulator.url])
    deadline = time.monotonic() + 30
    db = SqlJobDatabase(POSTGRES_URL, pg_table)
    while time.monotonic() < deadline and not db.count_by_status(["queued", "running"]):
        time.sleep(0.1)
    first.kill()
    first.wait()
    taken = db.count_by_status(["created", "queued", "running", "queued_for_start"])
    assert taken, "the first worker should have had jobs on the backend when it died"
    second = subprocess.run(
        [sys.executable, WORKER, *args, "heir", "2", "0.1", openeo_simulator.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    df = db.read()
    assert list(df["status"]) == ["finished"] * 4
    assert openeo_simulator.created_count() == 4  # the dead worker's jobs were tracked, not created again

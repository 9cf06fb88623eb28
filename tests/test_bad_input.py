"""Bad input gets a clear error that names the file, row and column, and nothing is lost or created."""

from __future__ import annotations

from pathlib import Path

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, static_server, tiles_df

from prefect_openeo import JobDatabaseError, MultiBackendJobManager, create_job_db
from prefect_openeo.backends import BackendError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def manager(openeo_simulator, tmp_path):
    manager = MultiBackendJobManager(poll_sleep=0.05, root_dir=tmp_path / "root")
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url))
    return manager


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def job_csv(path: Path, **columns) -> Path:
    df = tiles_df(3)
    for name, values in columns.items():
        df[name] = values
    df.to_csv(path, index=False)
    return path


# Each case: (file name, writer, expected message pattern). Every one must leave the file byte-identical.
BAD_FILES = {
    "empty csv": ("jobs.csv", lambda p: write_csv(p, ""), r"jobs.csv.*cannot be read"),
    "headerless csv": ("jobs.csv", lambda p: write_csv(p, "5.0,2020\n5.1,2021\n"), r"jobs.csv.*no 'status' column"),
    "csv of tiles, not a job db": (
        "jobs.csv",
        lambda p: tiles_df(2).to_csv(p, index=False),
        r"no 'status' column .*create_job_db",
    ),
    "binary noise": ("jobs.csv", lambda p: p.write_bytes(bytes(range(256)) * 20), r"jobs.csv"),
    "unclosed quote": (
        "jobs.csv",
        lambda p: write_csv(p, 'year,status\n2020,"not_started\n2021,not_started\n'),
        r"jobs.csv",
    ),
    "truncated parquet": (
        "jobs.parquet",
        lambda p: (tiles_df(50).assign(status="not_started").to_parquet(p), p.write_bytes(p.read_bytes()[:200])),
        r"jobs.parquet.*cannot be read",
    ),
    "csv bytes named parquet": (
        "jobs.parquet",
        lambda p: write_csv(p, "year,status\n2020,not_started\n"),
        r"jobs.parquet.*cannot be read",
    ),
    "unknown status": (
        "jobs.csv",
        lambda p: job_csv(p, status=["not_started", "done", "not_started"]),
        r"'status' has unknown values \['done'\] at row 1",
    ),
    "empty status": (
        "jobs.csv",
        lambda p: job_csv(p, status=["not_started", None, "finished"]),
        r"'status' is empty at row 1",
    ),
    "numeric status": (
        "jobs.parquet",
        lambda p: tiles_df(2).assign(status=[1, 2]).to_parquet(p),
        r"'status' has unknown values \['1', '2'\] at rows 0, 1",
    ),
    "numeric job ids": (
        "jobs.parquet",
        lambda p: tiles_df(2).assign(status="running", id=[17, 18], backend_name="sim").to_parquet(p),
        r"column 'id' must hold text, found 17 at rows 0, 1",
    ),
    "garbage running_start_time": (
        "jobs.csv",
        lambda p: job_csv(p, status="running", id="j-1", backend_name="sim", running_start_time="yesterday"),
        r"'running_start_time' must hold RFC 3339 times, found 'yesterday' at rows 0, 1, 2",
    ),
    "text costs": (
        "jobs.csv",
        lambda p: job_csv(p, status="finished", costs=["1.5", "a lot", None]),
        r"'costs' must hold numbers, found 'a lot' at row 1",
    ),
    "active rows without backend_name column": (
        "jobs.csv",
        lambda p: job_csv(p, status="running", id="j-1"),
        r"active rows without a 'backend_name' column at rows 0, 1, 2",
    ),
    "duplicate column names": (
        "jobs.csv",
        lambda p: write_csv(p, "status,year,year\nnot_started,1,2\n"),
        None,  # pandas renames duplicates (year.1) when reading: must still run; checked separately below
    ),
    "invalid geometry": (
        "jobs.csv",
        lambda p: job_csv(p, status="not_started", geometry=["POINT (1 2)", "POLYGON ((0 0, 1", "POINT (3 4)"]),
        r"jobs.csv.*cannot be read",
    ),
}


@pytest.mark.parametrize("case", [k for k, v in BAD_FILES.items() if v[2] is not None])
def test_malformed_job_database(case, manager, tmp_path, openeo_simulator):
    name, write, pattern = BAD_FILES[case]
    path = tmp_path / name
    write(path)
    before = path.read_bytes()
    with pytest.raises(JobDatabaseError, match=pattern):
        manager.run_jobs(job_db=path, start_job=ndvi_job)
    assert path.read_bytes() == before, "the job database must be left untouched"
    assert openeo_simulator.created_count() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_folder_where_the_job_database_should_be(manager, tmp_path):
    (tmp_path / "jobs.csv").mkdir()
    with pytest.raises(JobDatabaseError, match="jobs.csv.*cannot be read"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", start_job=ndvi_job)


def test_unknown_job_database_extension(manager, tmp_path):
    with pytest.raises(
        JobDatabaseError, match=r"jobs.xlsx.*use .csv, .parquet, .geoparquet, .db/.sqlite, or an SQLAlchemy URL"
    ):
        manager.run_jobs(job_db=tmp_path / "jobs.xlsx", df=tiles_df(1), start_job=ndvi_job)
    assert list(tmp_path.iterdir()) == []


def test_not_a_job_database_object(manager):
    with pytest.raises(ValueError, match="Unsupported job_db"):
        manager.run_jobs(job_db={"rows": []}, start_job=ndvi_job)


def test_dataframe_with_duplicate_index(manager, tmp_path):
    df = tiles_df(3)
    df.index = [0, 1, 1]
    with pytest.raises(JobDatabaseError, match=r"duplicate index values \['1'\]"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=df, start_job=ndvi_job)
    assert not (tmp_path / "jobs.csv").exists()


def test_start_job_that_is_not_callable(manager, tmp_path):
    with pytest.raises(TypeError, match="start_job must be callable"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job="make_job")


def test_bad_parallel_jobs_and_connection():
    manager = MultiBackendJobManager()
    with pytest.raises(ValueError, match="parallel_jobs must be a non-negative int"):
        manager.add_backend("x", connection=lambda: None, parallel_jobs=-1)
    with pytest.raises(TypeError, match="must be an openeo Connection or a callable"):
        manager.add_backend("x", connection="https://openeo.example")


def test_row_pinned_to_unregistered_backend(manager, tmp_path, openeo_simulator):
    path = tmp_path / "jobs.csv"
    create_job_db(path, tiles_df(2).assign(backend_name=[None, "vito"]))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"row 1 .*names backend 'vito', which is not registered \(registered: sim\)"):
        manager.run_jobs(job_db=path, start_job=ndvi_job)
    assert path.read_bytes() == before and openeo_simulator.created_count() == 0


def test_callback_returning_a_non_job_marks_the_row(manager, tmp_path):
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=lambda row, connection, **kw: "j-123")
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["start_failed", "start_failed"]
    assert df["message"].str.contains("start_job returned str 'j-123'; expected an openeo BatchJob or None").all()


def test_running_row_without_job_id(manager, tmp_path):
    path = tmp_path / "jobs.csv"
    create_job_db(path, tiles_df(2).assign(status=["running", "not_started"], backend_name=["sim", None]))
    manager.run_jobs(job_db=path, start_job=ndvi_job)
    df = pd.read_csv(path)
    assert list(df["status"]) == ["start_failed", "finished"]
    assert "row is 'running' but has no job id" in df.loc[0, "message"]


def test_backend_url_that_is_not_openeo(tmp_path):
    with static_server(b"<html>hello</html>", "text/html") as url:
        manager = MultiBackendJobManager(poll_sleep=0.05, root_dir=tmp_path)
        manager.add_backend("web", connection=lambda: openeo.connect(url))
        path = tmp_path / "jobs.csv"
        create_job_db(path, tiles_df(2))
        before = path.read_bytes()
        with pytest.raises(BackendError, match=r"Backend 'web': cannot connect \(is it an openEO API\?\)"):
            manager.run_jobs(job_db=path, start_job=ndvi_job)
    assert path.read_bytes() == before


def test_unreachable_backend_at_connect(tmp_path):
    def refuse():
        raise ConnectionRefusedError("connection refused")

    manager = MultiBackendJobManager(poll_sleep=0.05, root_dir=tmp_path)
    manager.add_backend("down", connection=refuse)
    with pytest.raises(
        BackendError, match=r"Backend 'down': cannot connect \(is it an openEO API\?\): connection refused"
    ):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)


def test_duplicate_columns_from_pandas_still_run(manager, tmp_path):
    name, write, _ = BAD_FILES["duplicate column names"]
    path = tmp_path / name
    write(path)
    manager.run_jobs(job_db=path, start_job=lambda row, connection, **kw: None)
    assert list(pd.read_csv(path)["status"]) == ["skipped"]

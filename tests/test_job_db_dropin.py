"""Our CSV/Parquet job databases behave as openeo's, except where they deliberately keep more safe.

Behaviours users rely on run against openeo's classes and ours alike; the deliberate differences
(atomic writes, no shrinking, clear errors, merging into unread files, clearing cells) have tests of their
own, and so does the shape check the manager runs where it opens a job database.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import geopandas
import openeo
import pandas as pd
import pytest
import shapely.geometry
from openeo.extra.job_management import CsvJobDatabase, ParquetJobDatabase
from openeo.extra.job_management import create_job_db as openeo_create_job_db
from openeo.extra.job_management import get_job_db as openeo_get_job_db
from openeo.extra.job_management._manager import MultiBackendJobManager as OpeneoManager

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.jobdb import (
    AtomicCsvJobDatabase,
    AtomicParquetJobDatabase,
    JobDatabaseError,
    create_job_db,
    get_job_db,
)
from prefect_openeo.jobdb.checks import check_job_frame

pytestmark = pytest.mark.timeout(120)

CSV_CLASSES = [CsvJobDatabase, AtomicCsvJobDatabase]
PARQUET_CLASSES = [ParquetJobDatabase, AtomicParquetJobDatabase]
ALL_CLASSES = CSV_CLASSES + PARQUET_CLASSES
OURS = [AtomicCsvJobDatabase, AtomicParquetJobDatabase]
SUFFIX = {
    CsvJobDatabase: "csv",
    AtomicCsvJobDatabase: "csv",
    ParquetJobDatabase: "parquet",
    AtomicParquetJobDatabase: "parquet",
}


def db_path(tmp_path: Path, db_class: type) -> Path:
    return tmp_path / f"jobs.{SUFFIX[db_class]}"


def plain_table() -> pd.DataFrame:
    return pd.DataFrame({"tile": [7, 8, 9], "crop": ["maize", "wheat", "rye"]})


def point_table() -> geopandas.GeoDataFrame:
    return geopandas.GeoDataFrame(
        {"tile": [1, 2], "geometry": [shapely.geometry.Point(4, 51), shapely.geometry.Point(5, 52)]}
    )


def geojson_text_table() -> pd.DataFrame:
    text = '{"type":"Point","coordinates":[4,51]}'
    return pd.DataFrame({"tile": [1, 2], "geometry": [text, text]})


TABLES = {"plain": plain_table, "points": point_table, "geojson text": geojson_text_table}


def job_rows(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "west": [5.0 + i for i in range(n)],
            "status": ["error"] * n,
            "id": [f"j-{i}" for i in range(n)],
            "backend_name": ["sim"] * n,
        }
    )


# -- the same behaviour as openeo's classes ---------------------------------------------------------------


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_any_table_persists_and_reads_back_unchanged(tmp_path, db_class, table):
    original = TABLES[table]()
    path = db_path(tmp_path, db_class)
    db_class(path).persist(original)

    loaded = db_class(path).read()

    assert type(loaded) is type(original)
    assert loaded.dtypes.to_dict() == original.dtypes.to_dict()
    assert loaded.equals(original)


@pytest.mark.parametrize("db_class", CSV_CLASSES, ids=lambda c: c.__name__)
def test_csv_geometry_text_becomes_shapes_only_when_it_is_wkt(tmp_path, db_class):
    wkt, other = tmp_path / "wkt.csv", tmp_path / "other.csv"
    pd.DataFrame({"crs": [4326], "geometry": ["POINT (4 51)"]}).to_csv(wkt, index=False)
    pd.DataFrame({"name": ["x"], "geometry": ["somewhere near Ghent"]}).to_csv(other, index=False)

    shapes = db_class(wkt).read()
    text = db_class(other).read()

    assert isinstance(shapes, geopandas.GeoDataFrame)
    assert shapes.to_dict(orient="list") == {"crs": [4326], "geometry": [shapely.geometry.Point(4, 51)]}
    assert text.loc[0, "geometry"] == "somewhere near Ghent"


@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_initialize_adds_openeos_bookkeeping_columns(tmp_path, db_class):
    path = db_path(tmp_path, db_class)
    table = pd.DataFrame({"year": [2021, 2022]})

    db_class(path).initialize_from_df(table)

    expected = set(OpeneoManager._column_requirements.normalize_df(table).columns)
    assert set(db_class(path).read().columns) == expected
    assert list(db_class(path).read()["status"]) == ["not_started", "not_started"]


@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_initialize_on_an_existing_database_errors_or_skips(tmp_path, db_class):
    path = db_path(tmp_path, db_class)
    db_class(path).initialize_from_df(pd.DataFrame({"year": [2021]}))

    with pytest.raises(FileExistsError, match="already exists"):
        db_class(path).initialize_from_df(pd.DataFrame({"year": [1999]}))
    kept = db_class(path).initialize_from_df(pd.DataFrame({"year": [1999]}), on_exists="skip")
    with pytest.raises(ValueError, match="on_exists"):
        db_class(path).initialize_from_df(pd.DataFrame({"year": [1999]}), on_exists="merge")

    assert list(kept.read()["year"]) == [2021]


@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_counts_and_selects_by_status(tmp_path, db_class):
    statuses = ["not_started", "running", "finished", "not_started", "error", "not_started"]
    db = db_class(db_path(tmp_path, db_class)).initialize_from_df(pd.DataFrame({"status": statuses}))

    assert db.count_by_status() == {"error": 1, "finished": 1, "not_started": 3, "running": 1}
    assert db.count_by_status(statuses={"running", "error"}) == {"error": 1, "running": 1}
    assert list(db.get_by_status(["not_started"]).index) == [0, 3, 5]
    assert list(db.get_by_status(["not_started"], max=2).index) == [0, 3]


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_persisting_some_rows_updates_them_and_keeps_the_rest(tmp_path, db_class, table):
    original = TABLES[table]().assign(status="not_started", id=None)
    db = db_class(db_path(tmp_path, db_class))
    db.persist(original)

    picked = db.get_by_status(["not_started"], max=1).copy()
    picked["status"] = "running"
    db.persist(picked)

    again = db_class(db.path).read()
    assert len(again) == len(original)
    assert list(again["status"]) == ["running"] + ["not_started"] * (len(original) - 1)


@pytest.mark.parametrize("db_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_reading_a_missing_file_is_file_not_found(tmp_path, db_class):
    with pytest.raises(FileNotFoundError):
        db_class(db_path(tmp_path, db_class)).read()


@pytest.mark.parametrize(
    "name, openeo_class",
    [("a.csv", CsvJobDatabase), ("a.parquet", ParquetJobDatabase), ("a.geoparquet", ParquetJobDatabase)],
)
@pytest.mark.parametrize("factory", [openeo_get_job_db, get_job_db], ids=["openeo", "ours"])
def test_get_job_db_picks_the_class_by_suffix_without_creating_the_file(tmp_path, factory, name, openeo_class):
    db = factory(tmp_path / name)

    assert isinstance(db, openeo_class)
    assert not db.exists() and not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="guess job database type"):
        factory(tmp_path / "jobs.xlsx")


@pytest.mark.parametrize("factory", [openeo_create_job_db, create_job_db], ids=["openeo", "ours"])
@pytest.mark.parametrize("name", ["jobs.csv", "jobs.parquet"])
def test_create_job_db_writes_a_normalized_database(tmp_path, factory, name):
    db = factory(tmp_path / name, df=pd.DataFrame({"year": [2023, 2024]}))

    assert db.exists()
    read = type(db)(tmp_path / name).read()
    assert list(read["year"]) == [2023, 2024] and list(read["status"]) == ["not_started"] * 2
    with pytest.raises(FileExistsError):
        factory(tmp_path / name, df=pd.DataFrame({"year": [1]}))


@pytest.mark.parametrize("db_class", CSV_CLASSES, ids=lambda c: c.__name__)
def test_text_in_a_numeric_column_is_a_value_error(tmp_path, db_class):
    path = tmp_path / "jobs.csv"
    path.write_text("year,status,costs\n2020,finished,1.5\n2021,finished,a lot\n")
    with pytest.raises(ValueError):
        db_class(path).read()


# -- deliberate differences ------------------------------------------------------------------------------


@pytest.mark.parametrize("db_class", OURS, ids=lambda c: c.__name__)
def test_persist_writes_aside_and_renames(tmp_path, db_class):
    path = db_path(tmp_path, db_class)
    db = db_class(path).initialize_from_df(pd.DataFrame({"year": [2020, 2021]}))
    inode = path.stat().st_ino
    stale = tmp_path / f".{path.name}.leftover.tmp"  # what a writer killed mid-write leaves behind
    stale.write_text("half a table")

    rows = db.get_by_status(["not_started"]).copy()
    rows["status"] = "skipped"
    db_class(path).persist(rows)

    assert path.stat().st_ino != inode  # a new file took the old one's name
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert list(db_class(path).read()["status"]) == ["skipped", "skipped"]


_WRITE_INTO_A_FULL_DISK = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of being killed
from {module} import {name} as DB
db = DB(sys.argv[1])
rows = db.get_by_status(["not_started"]).copy()
rows["notes"] = [os.urandom(20_000).hex() for _ in rows.index]  # grows the file past the limit
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
try:
    db.persist(rows)
except Exception as e:
    print("write failed:", type(e).__name__, e)
    sys.exit(3)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs file size limits (POSIX)")
@pytest.mark.parametrize("db_class", OURS, ids=lambda c: c.__name__)
def test_a_write_that_fails_half_way_leaves_the_file_as_it_was(tmp_path, db_class):
    """A disk that fills up in the middle of a write (here: a file size limit) leaves the old file intact."""
    path = db_path(tmp_path, db_class)
    db_class(path).initialize_from_df(pd.DataFrame({"year": [2020, 2021, 2022]}))
    before = path.read_bytes()
    script = _WRITE_INTO_A_FULL_DISK.format(module=db_class.__module__, name=db_class.__name__)

    out = subprocess.run(
        [sys.executable, "-c", script, str(path), str(2 * len(before))], capture_output=True, text=True, timeout=60
    )

    assert out.returncode == 3, out.stdout + out.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("db_class", OURS, ids=lambda c: c.__name__)
def test_persist_refuses_to_shrink_the_file(tmp_path, db_class):
    path = db_path(tmp_path, db_class)
    db_class(path).initialize_from_df(pd.DataFrame({"year": range(5)}))
    db = db_class(path)
    db.df.drop(index=[1, 2], inplace=True)  # rows lost in memory, e.g. by a careless filter
    before = path.read_bytes()

    with pytest.raises(JobDatabaseError, match=rf"Refusing to write 3 rows to '.*{path.name}', which held 5"):
        db.persist(db.df.loc[[0]])

    assert path.read_bytes() == before


def _empty(path: Path) -> None:
    path.write_text("")


def _noise(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def _unclosed_quote(path: Path) -> None:
    path.write_text('year,status\n2020,"not_started\n2021,not_started\n')


def _truncated_parquet(path: Path) -> None:
    pd.DataFrame({"year": range(100), "status": "not_started"}).to_parquet(path)
    path.write_bytes(path.read_bytes()[:300])


def _csv_named_parquet(path: Path) -> None:
    path.write_text("year,status\n2020,not_started\n")


UNREADABLE = {
    "empty csv": ("jobs.csv", _empty),
    "binary noise": ("jobs.csv", _noise),
    "unclosed quote": ("jobs.csv", _unclosed_quote),
    "empty parquet": ("jobs.parquet", _empty),
    "truncated parquet": ("jobs.parquet", _truncated_parquet),
    "csv bytes named parquet": ("jobs.parquet", _csv_named_parquet),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_file_is_an_error_naming_it(tmp_path, case):
    name, write = UNREADABLE[case]
    path = tmp_path / name
    write(path)
    before = path.read_bytes()

    with pytest.raises(JobDatabaseError, match=rf"Job database '.*{name}' cannot be read") as caught:
        get_job_db(path).read()

    assert isinstance(caught.value, ValueError)  # what openeo's callers may catch
    assert caught.value.__cause__ is not None  # pandas' or pyarrow's own words stay attached
    assert path.read_bytes() == before


def test_a_folder_in_place_of_the_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "jobs.csv").mkdir()
    with pytest.raises(JobDatabaseError, match=r"jobs.csv' cannot be read"):
        AtomicCsvJobDatabase(tmp_path / "jobs.csv").read()


def test_text_in_a_numeric_column_names_column_value_and_row(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text("year,status,costs\n2020,finished,1.5\n2021,finished,a lot\n")
    with pytest.raises(JobDatabaseError, match=r"jobs.csv': column 'costs' must hold numbers, found 'a lot' at row 1"):
        AtomicCsvJobDatabase(path).read()


@pytest.mark.parametrize("db_class", OURS, ids=lambda c: c.__name__)
def test_persist_on_an_unread_object_merges_into_the_file(tmp_path, db_class):
    path = db_path(tmp_path, db_class)
    db_class(path).initialize_from_df(job_rows(4))

    fresh = db_class(path)  # has not read its file
    fresh.persist(pd.DataFrame({"status": ["running"]}, index=[2]))
    db_class(path).persist(pd.DataFrame({"west": [42.0], "status": ["not_started"]}, index=[9]))

    out = db_class(path).read()
    assert list(out["status"]) == ["error", "error", "running", "error", "not_started"]
    assert list(out["id"].iloc[:4]) == ["j-0", "j-1", "j-2", "j-3"]
    assert list(out["west"]) == [5.0, 6.0, 7.0, 8.0, 42.0]


@pytest.mark.parametrize("read_first", [True, False], ids=["loaded", "unread"])
@pytest.mark.parametrize("db_class", OURS, ids=lambda c: c.__name__)
def test_an_emptied_cell_is_written_empty(tmp_path, db_class, read_first):
    path = db_path(tmp_path, db_class)
    db_class(path).initialize_from_df(job_rows(3))
    db = db_class(path)
    if read_first:
        db.get_by_status(["error"])

    db.persist(pd.DataFrame({"status": ["not_started"], "id": [None]}, index=[1]))

    out = db_class(path).read()
    assert pd.isna(out.loc[1, "id"]) and out.loc[1, "status"] == "not_started"
    assert out.loc[0, "id"] == "j-0" and out.loc[2, "id"] == "j-2"


# -- the shape check happens where the manager opens a job database ---------------------------------------


def test_check_job_frame_names_the_source_and_the_problem():
    check_job_frame(OpeneoManager._column_requirements.normalize_df(plain_table()), source="tiles.csv")
    with pytest.raises(
        JobDatabaseError, match=r"Job database 'tiles.csv' has no 'status' column \(columns: tile, crop\)"
    ):
        check_job_frame(plain_table(), source="tiles.csv")
    with pytest.raises(JobDatabaseError, match=r"'status' has unknown values \['done'\] at row 1"):
        check_job_frame(plain_table().assign(status=["finished", "done", "error"]), source="tiles.csv")


@pytest.fixture
def manager(openeo_simulator, tmp_path) -> MultiBackendJobManager:
    manager = MultiBackendJobManager(poll_sleep=0.05, root_dir=tmp_path / "results")
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url))
    return manager


def _skip_row(row: pd.Series, connection: openeo.Connection, **kwargs) -> None:
    return None


@pytest.mark.parametrize("name", ["tiles.csv", "tiles.parquet"])
def test_a_table_that_reads_fine_is_refused_by_the_manager_when_not_a_job_database(
    manager, openeo_simulator, tmp_path, name
):
    path = tmp_path / name
    get_job_db(path).persist(plain_table())  # persisting a plain table is fine, as with openeo
    assert get_job_db(path).read().equals(plain_table())
    before = path.read_bytes()

    with pytest.raises(JobDatabaseError, match=rf"Job database '.*{name}' has no 'status' column"):
        manager.run_jobs(job_db=path, start_job=_skip_row)

    assert path.read_bytes() == before
    assert openeo_simulator.created_count() == 0


def test_the_manager_adds_missing_bookkeeping_columns_to_a_hand_written_database(manager, tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text("year,status\n2020,not_started\n2021,finished\n")
    assert list(AtomicCsvJobDatabase(path).read().columns) == ["year", "status"]

    manager.run_jobs(job_db=path, start_job=_skip_row)

    out = pd.read_csv(path)
    assert list(out["status"]) == ["skipped", "finished"]
    assert {"id", "backend_name", "start_time", "running_start_time", "costs"} <= set(out.columns)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_repr_names_openeos_class_and_the_path(cls, tmp_path):
    """Logs and code that print a job database read the same with ours ("Resuming `run_jobs` from existing
    CsvJobDatabase('jobs.csv')")."""
    suffix = ".csv" if cls in CSV_CLASSES else ".parquet"
    db = cls(tmp_path / f"db{suffix}")
    expected = f"{'CsvJobDatabase' if cls in CSV_CLASSES else 'ParquetJobDatabase'}({str(db.path)!r})"
    assert repr(db) == str(db) == expected

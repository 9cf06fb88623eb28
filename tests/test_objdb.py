"""CSV/Parquet job databases in object storage, against a real S3 server (moto, its own process).

Writes are whole-object PUTs conditional on the ETag read (``If-Match``, or ``If-None-Match: *`` to create), so a
second writer is refused, never silently overwritten; stores without conditional writes (``memory://``) compare
before writing and say so with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import uuid
import warnings
from pathlib import Path

import geopandas
import openeo
import pandas as pd
import pytest
import shapely.geometry
from conftest import ndvi_job, tiles_df
from openeo.extra.job_management import CsvJobDatabase, ParquetJobDatabase
from typer.testing import CliRunner

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.jobdb import (
    AtomicCsvJobDatabase,
    AtomicParquetJobDatabase,
    JobDatabaseConflict,
    JobDatabaseCreated,
    JobDatabaseError,
    RemoteCsvJobDatabase,
    RemoteParquetJobDatabase,
    SqlJobDatabase,
    create_job_db,
    get_job_db,
    resolve_job_db,
)
from prefect_openeo.jobdb.remote import ConcurrentWriteWarning

pytestmark = pytest.mark.timeout(180)

SUFFIXES = ["csv", "parquet", "geoparquet"]


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.new_bucket()


def body(s3_server, bucket: str, key: str) -> bytes:
    return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def job_rows(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "west": [5.0 + i for i in range(n)],
            "status": ["error"] * n,
            "id": [f"j-{i}" for i in range(n)],
            "backend_name": ["sim"] * n,
        }
    )


def point_table() -> geopandas.GeoDataFrame:
    return geopandas.GeoDataFrame(
        {"tile": [1, 2], "geometry": [shapely.geometry.Point(4, 51), shapely.geometry.box(5, 52, 5.1, 52.1)]},
        crs="EPSG:4326",
    )


@contextlib.contextmanager
def s3_calls(db):
    """Count the S3 API calls of the database's client (botocore's ``before-call`` event), by operation."""
    counts: collections.Counter = collections.Counter()

    def count(model, **kwargs):
        counts[model.name] += 1

    db.fs.connect()
    db.fs.s3.meta.events.register("before-call.s3", count)
    try:
        yield counts
    finally:
        db.fs.s3.meta.events.unregister("before-call.s3", count)


# -- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_table_round_trips_through_s3_in_the_local_file_format(s3_server, bucket, tmp_path, suffix):
    url = f"s3://{bucket}/runs/2024/jobs.{suffix}"
    df = pd.DataFrame({"tile": [7, 8, 9], "crop": ["maize", "wheat", "rye"]})

    db = create_job_db(url, df)

    assert type(db) is (RemoteCsvJobDatabase if suffix == "csv" else RemoteParquetJobDatabase)
    assert repr(db) == f"{type(db).__name__}({url!r})" and db.path == url
    out = get_job_db(url).read()
    assert list(out["crop"]) == ["maize", "wheat", "rye"] and list(out["status"]) == ["not_started"] * 3
    # The object is the very file openeo's own class reads (same format as a local job database).
    local = tmp_path / f"copy.{suffix}"
    local.write_bytes(body(s3_server, bucket, f"runs/2024/jobs.{suffix}"))
    openeo_class = CsvJobDatabase if suffix == "csv" else ParquetJobDatabase
    pd.testing.assert_frame_equal(openeo_class(local).read(), out)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"runs/2024/jobs.{suffix}")
    assert head["ContentType"] == ("text/csv" if suffix == "csv" else "application/vnd.apache.parquet")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_geometries_round_trip(bucket, suffix):
    url = f"s3://{bucket}/jobs.{suffix}"
    create_job_db(url, point_table())

    out = get_job_db(url).read()

    assert isinstance(out, geopandas.GeoDataFrame)
    assert list(out.geometry) == list(point_table().geometry)
    if suffix != "csv":  # GeoParquet keeps the CRS (CSV has WKT text only, as openeo's)
        assert out.crs == "EPSG:4326"


def test_persisting_updates_rows_and_keeps_the_rest(bucket):
    url = f"s3://{bucket}/jobs.parquet"
    create_job_db(url, job_rows(4))
    db = get_job_db(url)
    rows = db.get_by_status(["error"]).loc[[1, 3]].copy()
    rows["status"] = ["running", "finished"]
    rows["id"] = ["j-1", None]  # a cleared cell is written empty

    db.persist(rows)

    out = get_job_db(url).read()
    assert list(out["status"]) == ["error", "running", "error", "finished"]
    assert list(out["id"].iloc[:3]) == ["j-0", "j-1", "j-2"] and pd.isna(out.loc[3, "id"])
    fresh = get_job_db(url)
    assert fresh.count_by_status() == {"error": 2, "running": 1, "finished": 1}
    assert list(fresh.get_by_indices([0, 3])["status"].sort_index()) == ["error", "finished"]


def test_persist_on_an_unread_object_merges_into_what_it_holds(bucket):
    url = f"s3://{bucket}/jobs.csv"
    create_job_db(url, job_rows(4))

    get_job_db(url).persist(pd.DataFrame({"status": ["running"]}, index=[2]))
    get_job_db(url).persist(pd.DataFrame({"west": [42.0], "status": ["not_started"]}, index=[9]))

    out = get_job_db(url).read()
    assert list(out["status"]) == ["error", "error", "running", "error", "not_started"]
    assert list(out["west"]) == [5.0, 6.0, 7.0, 8.0, 42.0]


def test_initialize_on_an_existing_object_errors_or_skips(bucket):
    url = f"s3://{bucket}/jobs.csv"
    create_job_db(url, job_rows(2))
    before = get_job_db(url).read()

    with pytest.raises(FileExistsError):
        create_job_db(url, job_rows(3))
    create_job_db(url, job_rows(3), on_exists="skip")

    pd.testing.assert_frame_equal(get_job_db(url).read(), before)


def test_persist_refuses_to_write_fewer_rows_than_it_read(s3_server, bucket):
    url = f"s3://{bucket}/jobs.parquet"
    create_job_db(url, pd.DataFrame({"year": range(5)}))
    db = get_job_db(url)
    db.df.drop(index=[1, 2], inplace=True)  # rows lost in memory, e.g. by a careless filter
    before = body(s3_server, bucket, "jobs.parquet")

    with pytest.raises(JobDatabaseError, match=rf"Refusing to write 3 rows to '{url}', which held 5"):
        db.persist(db.df.loc[[0]])

    assert body(s3_server, bucket, "jobs.parquet") == before


# -- concurrent writers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_second_writer_is_refused_and_the_object_keeps_the_first_writers_rows(s3_server, bucket, suffix):
    url = f"s3://{bucket}/jobs.{suffix}"
    create_job_db(url, job_rows(3))
    first, second = get_job_db(url), get_job_db(url)
    first.get_by_status(["error"]), second.get_by_status(["error"])  # both read the same version

    first.persist(pd.DataFrame({"status": ["finished"]}, index=[0]))
    written = body(s3_server, bucket, f"jobs.{suffix}")
    with pytest.raises(JobDatabaseConflict, match="changed by another process") as caught:
        second.persist(pd.DataFrame({"status": ["running"]}, index=[1]))

    message = str(caught.value)
    assert url in message and "nothing was written" in message and "stop the other run" in message
    assert isinstance(caught.value, JobDatabaseError) and not isinstance(caught.value, FileExistsError)
    assert body(s3_server, bucket, f"jobs.{suffix}") == written
    assert list(get_job_db(url).read()["status"]) == ["finished", "error", "error"]
    with pytest.raises(JobDatabaseConflict):  # and it stays refused: no later write sneaks through
        second.persist(pd.DataFrame({"status": ["running"]}, index=[2]))
    assert body(s3_server, bucket, f"jobs.{suffix}") == written
    first.persist(pd.DataFrame({"status": ["finished"]}, index=[1]))  # the first writer goes on
    assert list(get_job_db(url).read()["status"]) == ["finished", "finished", "error"]


def test_an_object_deleted_by_another_process_is_a_conflict_not_a_recreation(s3_server, bucket):
    url = f"s3://{bucket}/jobs.csv"
    db = create_job_db(url, job_rows(2))
    s3_server.client().delete_object(Bucket=bucket, Key="jobs.csv")

    with pytest.raises(JobDatabaseConflict, match="changed by another process"):
        db.persist(pd.DataFrame({"status": ["finished"]}, index=[0]))

    assert not get_job_db(url).exists()


def test_a_write_the_object_already_holds_is_not_a_conflict(s3_server, bucket):
    """As when s3fs retries a PUT whose answer was lost: the store refuses the retry, yet holds our bytes."""
    url = f"s3://{bucket}/jobs.csv"
    create_job_db(url, job_rows(2))
    first, second = get_job_db(url), get_job_db(url)
    first.get_by_status(["error"]), second.get_by_status(["error"])  # both read the same version
    change = pd.DataFrame({"status": ["finished"]}, index=[0])

    first.persist(change)
    second.persist(change)  # the same bytes: refused by If-Match, recognised by the ETag (MD5)

    second.persist(pd.DataFrame({"status": ["running"]}, index=[1]))  # and it goes on from that version
    assert list(get_job_db(url).read()["status"]) == ["finished", "running"]


def test_creation_race_the_second_creator_loses_cleanly(s3_server, bucket):
    """Both creators saw no object; the first PUT creates it, the second (If-None-Match: *) is refused.

    The interleaving is forced rather than left to threads: moto checks a condition and stores the object in two
    steps, so truly simultaneous PUTs could both pass there (S3 itself decides atomically)."""
    url = f"s3://{bucket}/jobs.csv"
    winner, loser = get_job_db(url), get_job_db(url)
    assert not winner.exists() and not loser.exists()
    put = loser._object.put

    def put_after_the_winner(*args, **kwargs):  # the winner's create lands between the loser's check and PUT
        winner.initialize_from_df(job_rows(2))
        return put(*args, **kwargs)

    loser._object.put = put_after_the_winner
    with pytest.raises(JobDatabaseCreated, match="created by another process") as caught:
        loser.initialize_from_df(job_rows(5))

    assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, JobDatabaseError)
    assert len(get_job_db(url).read()) == 2
    loser._object.put = put
    assert len(loser.df) == 2  # the loser now works with what the winner wrote
    loser.persist(pd.DataFrame({"status": ["finished"]}, index=[1]))
    assert list(get_job_db(url).read()["status"]) == ["error", "finished"]


def test_creation_race_with_skip_uses_the_winners_object(bucket):
    url = f"s3://{bucket}/jobs.parquet"
    winner, loser = get_job_db(url), get_job_db(url)
    put = loser._object.put

    def put_after_the_winner(*args, **kwargs):
        winner.initialize_from_df(job_rows(2))
        return put(*args, **kwargs)

    loser._object.put = put_after_the_winner
    assert loser.initialize_from_df(job_rows(5), on_exists="skip") is loser
    loser._object.put = put
    assert len(loser.df) == 2 and len(get_job_db(url).read()) == 2


# -- errors ----------------------------------------------------------------------------------------------
def _truncated_parquet() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"year": range(100), "status": "not_started"}).to_parquet(buffer)
    return buffer.getvalue()[:300]


UNREADABLE = {
    "empty csv": ("jobs.csv", b""),
    "binary noise": ("jobs.csv", bytes(range(256)) * 8),
    "unclosed quote": ("jobs.csv", b'year,status\n2020,"not_started\n2021,not_started\n'),
    "empty parquet": ("jobs.parquet", b""),
    "truncated parquet": ("jobs.parquet", _truncated_parquet()),
    "csv bytes named parquet": ("jobs.parquet", b"year,status\n2020,not_started\n"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_object_is_an_error_naming_its_url(s3_server, bucket, case):
    name, data = UNREADABLE[case]
    s3_server.client().put_object(Bucket=bucket, Key=f"p/{name}", Body=data)
    url = f"s3://{bucket}/p/{name}"

    with pytest.raises(JobDatabaseError, match=rf"Job database '{url}' cannot be read") as caught:
        get_job_db(url).read()
    assert caught.value.__cause__ is not None  # pandas' or pyarrow's own words stay attached
    with pytest.raises(JobDatabaseError, match="cannot be read"):  # persist reads first: it never replaces it
        get_job_db(url).persist(pd.DataFrame({"status": ["finished"]}, index=[0]))

    assert body(s3_server, bucket, f"p/{name}") == data


def test_text_in_a_numeric_column_names_url_column_value_and_row(s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="jobs.csv", Body=b"year,status,costs\n2020,x,1.5\n2021,y,a lot\n")
    with pytest.raises(JobDatabaseError, match=rf"'s3://{bucket}/jobs.csv': column 'costs' .* 'a lot' at row 1"):
        get_job_db(f"s3://{bucket}/jobs.csv").read()


def test_missing_object_and_missing_bucket(s3_server, bucket):
    missing = get_job_db(f"s3://{bucket}/nothing/jobs.csv")
    assert not missing.exists()
    with pytest.raises(FileNotFoundError, match=rf"Job database 's3://{bucket}/nothing/jobs.csv' does not exist"):
        missing.read()

    no_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/jobs.csv"
    assert not get_job_db(no_bucket).exists()
    with pytest.raises(JobDatabaseError, match=rf"'{no_bucket}' cannot be written: the bucket does not exist"):
        create_job_db(no_bucket, job_rows(1))


def test_without_credentials_the_error_says_where_to_put_them(s3_server, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{bucket}/jobs.csv"
    with pytest.raises(JobDatabaseError, match=rf"'{url}' cannot be read: no credentials found. Set AWS_ACCESS_KEY_ID"):
        get_job_db(url, storage_options={"skip_instance_cache": True}).exists()


def test_credentials_from_storage_options_and_a_prefect_aws_block(s3_server, bucket, monkeypatch):
    from prefect_aws import AwsCredentials

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    url = f"s3://{bucket}/jobs.csv"
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server.endpoint}
    create_job_db(url, job_rows(2), storage_options=options)

    block = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3_server.endpoint},
    )
    assert len(get_job_db(url, storage_options=block).read()) == 2


@pytest.mark.parametrize(
    "url",
    ["http://example.com/jobs.csv", "ftp://example.com/jobs.parquet", "nosuchdialect+driver://u@h/db", "jobs://x.csv"],
)
def test_an_unknown_scheme_is_an_error_naming_the_url_and_what_is_accepted(url):
    with pytest.raises(JobDatabaseError) as caught:
        get_job_db(url)
    message = str(caught.value)
    assert url in message and "neither an SQLAlchemy dialect nor an object store" in message
    assert "s3://bucket/prefix/jobs.parquet" in message and "postgresql+psycopg://" in message


@pytest.mark.parametrize(
    "url, match",
    [
        ("s3://bucket/jobs.txt", "on object storage a job database is a .csv, .parquet or .geoparquet file"),
        ("s3://bucket/jobs.db", "on object storage a job database is a .csv, .parquet or .geoparquet file"),
        ("s3:///jobs.csv", "names no bucket and file"),
        ("file://server/share/jobs.csv", "a file:// URL names a local path"),
    ],
)
def test_unusable_object_storage_urls(url, match):
    with pytest.raises(JobDatabaseError, match=match):
        get_job_db(url)


def test_a_store_whose_package_is_missing_names_the_install(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(JobDatabaseError, match=r"'gs://bucket/jobs.csv' needs the package 'gcsfs': pip install gcsfs"):
        get_job_db("gs://bucket/jobs.csv")


def test_a_url_mangled_by_pathlib_is_refused_rather_than_written_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobDatabaseError, match=r"whose '//' was lost .* s3://bucket/jobs.csv"):
        get_job_db(Path("s3://bucket/jobs.csv"))
    assert list(tmp_path.iterdir()) == []


def test_storage_options_are_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(JobDatabaseError, match="storage_options given for the local job database"):
        get_job_db(tmp_path / "jobs.csv", storage_options={"key": "k"})
    with pytest.raises(JobDatabaseError, match="storage_options given for the SQL job database"):
        get_job_db(f"sqlite:///{tmp_path}/jobs.db", storage_options={"key": "k"})


# -- routing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/jobs.db",
        "sqlite+pysqlite:///{tmp}/jobs.csv",  # the scheme decides, not the suffix
        "postgresql://user@127.0.0.1:5432/test",
        "postgresql+psycopg://user@127.0.0.1:5432/test",
    ],
)
def test_sqlalchemy_urls_are_still_sql_job_databases(tmp_path, url):
    assert isinstance(get_job_db(url.format(tmp=tmp_path)), SqlJobDatabase)


def test_a_known_dialect_without_its_driver_is_sqls_own_error():
    # mysql:// is routed to SQL (not "unknown scheme"); its default driver is not installed here.
    with pytest.raises(JobDatabaseError, match=r"Job database URL 'mysql://u@h/db' cannot be used"):
        get_job_db("mysql://u@h/db")


def test_file_urls_and_paths_are_local_files(tmp_path):
    db = get_job_db((tmp_path / "jobs.csv").as_uri())
    assert type(db) is AtomicCsvJobDatabase and db.path == tmp_path / "jobs.csv"
    assert type(get_job_db(f"file://localhost{tmp_path}/jobs.parquet")) is AtomicParquetJobDatabase
    assert type(resolve_job_db(str(tmp_path / "jobs.parquet"))) is AtomicParquetJobDatabase


# -- stores without conditional writes ----------------------------------------------------------------------
@pytest.fixture
def memory_url():
    import fsspec

    name = f"prefect-openeo-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}/jobs.csv"
    fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def test_memory_store_warns_at_open_and_still_refuses_a_second_writer(memory_url):
    with pytest.warns(ConcurrentWriteWarning, match="without conditional writes"):
        create_job_db(memory_url, job_rows(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConcurrentWriteWarning)
        first, second = get_job_db(memory_url), get_job_db(memory_url)
        first.get_by_status(["error"]), second.get_by_status(["error"])

        first.persist(pd.DataFrame({"status": ["finished"]}, index=[0]))
        with pytest.raises(JobDatabaseConflict, match="changed by another process"):
            second.persist(pd.DataFrame({"status": ["running"]}, index=[1]))

        assert list(get_job_db(memory_url).read()["status"]) == ["finished", "error", "error"]


def test_s3_opens_without_a_warning(bucket):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConcurrentWriteWarning)
        create_job_db(f"s3://{bucket}/jobs.csv", job_rows(1))


# -- requests --------------------------------------------------------------------------------------------
def test_requests_per_operation(bucket):
    url = f"s3://{bucket}/jobs.parquet"
    db = get_job_db(url)
    change = pd.DataFrame({"status": ["running"]}, index=[0])

    with s3_calls(db) as create:
        db.initialize_from_df(job_rows(3))  # exists (HEAD 404), read (GET 404), create (PUT If-None-Match)
    with s3_calls(db) as read:
        fresh = get_job_db(url)
        fresh.get_by_status(["error"])
        fresh.count_by_status()
    with s3_calls(db) as persists:
        for _ in range(3):
            fresh.persist(change)
    with s3_calls(db) as unread:
        get_job_db(url).persist(change)

    assert create == {"HeadObject": 1, "GetObject": 1, "PutObject": 1}
    assert read == {"GetObject": 1}  # the body and its ETag in one answer
    assert persists == {"PutObject": 3}  # one conditional PUT per persist
    assert unread == {"GetObject": 1, "PutObject": 1}


# -- the manager, the flow and the command line ---------------------------------------------------------
def test_manager_runs_on_an_s3_job_database(openeo_simulator, s3_server, bucket, tmp_path):
    url = f"s3://{bucket}/runs/jobs.parquet"
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "results")
    manager.add_backend(openeo_simulator.name, connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
    db = get_job_db(url)
    persist, persisted = db.persist, []
    db.persist = lambda df: (persisted.append(len(df)), persist(df))[1]

    with s3_calls(db) as calls:
        stats = manager.run_jobs(job_db=db, df=tiles_df(4), start_job=ndvi_job)

    out = get_job_db(url).read()
    assert list(out["status"]) == ["finished"] * 4 and out["id"].notna().all()
    assert stats["job finished"] == 4 and stats["job download"] == 4
    for job_id in out["id"]:
        assert (tmp_path / "results" / f"job_{job_id}" / "job-results.json").is_file()
    assert openeo_simulator.created_count() == 4
    # Each persist is one PUT; reading happens once (the object did not exist: a 404).
    assert calls["PutObject"] == len(persisted) and calls["GetObject"] == 1 and calls["HeadObject"] <= 2
    print(f"\nrun on s3:// job database: {dict(calls)} for {len(persisted)} persists")


def test_manager_resumes_an_s3_job_database_given_as_a_url(openeo_simulator, bucket, tmp_path):
    url = f"s3://{bucket}/jobs.csv"
    create_job_db(url, tiles_df(2))
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path, download_results=False)
    manager.add_backend(openeo_simulator.name, connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)

    manager.run_jobs(job_db=url, start_job=ndvi_job)

    assert list(get_job_db(url).read()["status"]) == ["finished"] * 2


def test_manager_refuses_an_s3_object_that_is_not_a_job_database(s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="jobs.csv", Body=b"year,status\n2020,bogus\n")
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path)
    with pytest.raises(JobDatabaseError, match=rf"Job database 's3://{bucket}/jobs.csv': column 'status'"):
        manager.run_jobs(job_db=f"s3://{bucket}/jobs.csv", start_job=ndvi_job)


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.timeout(300)
def test_flow_runs_on_an_s3_job_database(openeo_simulator, bucket, tmp_path):
    from prefect_openeo.flows import run_openeo_jobs

    url = f"s3://{bucket}/flow/jobs.csv"
    stats = run_openeo_jobs(
        job_db=url,
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.1,
        root_dir=str(tmp_path),
        download_results=False,
        df=tiles_df(2),
    )
    assert stats["job finished"] == 2
    assert list(get_job_db(url).read()["status"]) == ["finished"] * 2


def test_cli_status_reads_an_s3_job_database(bucket):
    from prefect_openeo.cli import app

    url = f"s3://{bucket}/jobs.csv"
    rows = job_rows(3)
    rows.loc[2, "status"] = "finished"
    create_job_db(url, rows)

    result = CliRunner().invoke(app, ["status", url, "--json"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == 3 and summary["by_status"] == {"error": 2, "finished": 1}
    missing = CliRunner().invoke(app, ["status", f"s3://{bucket}/missing.csv"])
    assert missing.exit_code == 2 and "does not exist" in missing.output

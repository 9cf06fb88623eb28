"""Job databases: openeo's ``JobDatabaseInterface``, with crash-safe CSV and Parquet files (local or in object
storage) and SQL tables; ``get_job_db``/``create_job_db``/``resolve_job_db`` pick the one for a path or URL.

The modules, each importing only those before it: ``errors`` (the exceptions), ``checks`` (of a job table),
``files`` (local CSV/Parquet), ``remote`` (CSV/Parquet in object storage), ``owners`` and ``sql`` (SQLAlchemy),
``local`` (the job store of a job database that one run works alone); this package (the factory) imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from openeo.extra.job_management import CsvJobDatabase, JobDatabaseInterface, ParquetJobDatabase

from prefect_openeo.jobdb.errors import JobDatabaseBusy, JobDatabaseConflict, JobDatabaseCreated, JobDatabaseError
from prefect_openeo.jobdb.files import FILE_SUFFIXES, AtomicCsvJobDatabase, AtomicParquetJobDatabase, open_file
from prefect_openeo.jobdb.remote import RemoteCsvJobDatabase, RemoteParquetJobDatabase, open_remote_job_db
from prefect_openeo.jobdb.store import JobStore, for_worker, open_store
from prefect_openeo.paths import SCHEMES, lost_slashes

if TYPE_CHECKING:
    import pandas as pd

    from prefect_openeo.jobdb.sql import SqlJobDatabase

__all__ = [
    "AtomicCsvJobDatabase",
    "AtomicParquetJobDatabase",
    "JobDatabaseBusy",
    "JobDatabaseConflict",
    "JobDatabaseCreated",
    "JobDatabaseError",
    "JobStore",
    "RemoteCsvJobDatabase",
    "RemoteParquetJobDatabase",
    "SqlJobDatabase",
    "create_job_db",
    "for_worker",
    "get_job_db",
    "open_store",
    "resolve_job_db",
]

_UPGRADES = {CsvJobDatabase: AtomicCsvJobDatabase, ParquetJobDatabase: AtomicParquetJobDatabase}


SQL_SUFFIXES = (".db", ".sqlite", ".sqlite3")

#: What ``get_job_db`` accepts, for its error messages.
ACCEPTED = (
    "a local .csv, .parquet, .geoparquet or .db/.sqlite path; file:///path/jobs.csv; a .csv/.parquet/.geoparquet "
    "file in object storage (s3://bucket/prefix/jobs.parquet, gs://, az://, memory://); or an SQLAlchemy URL "
    "(sqlite:///jobs.db, postgresql+psycopg://user@host/db)"
)


def get_job_db(path: str | Path, *, storage_options: Any = None) -> JobDatabaseInterface:
    """Like openeo's ``get_job_db``, returning the atomic flavours (``.csv``, ``.parquet``, ``.geoparquet``).

    URLs are routed by scheme: an SQLAlchemy URL (``dialect[+driver]://``) is a SQL job database; an
    object-storage URL (``s3://``, ``gs://``, ``az://``, ``memory://``) of a CSV/Parquet file is the file in object
    storage (``prefect_openeo.jobdb.remote``), with ``storage_options`` (fsspec options or a prefect-aws
    ``AwsCredentials``/``MinIOCredentials`` block); ``file://`` is a local path. Any other URL is a
    ``JobDatabaseError`` that names it and what is accepted.
    """
    if isinstance(path, str) and "://" in path:
        return _from_url(path, storage_options)
    text = str(path)
    meant = lost_slashes(text)
    if meant:
        raise JobDatabaseError(
            f"Job database {text!r} looks like a URL whose '//' was lost (pathlib.Path collapses it): "
            f"pass it as a string, e.g. {meant}"
        )
    if storage_options is not None:
        raise JobDatabaseError(f"storage_options given for the local job database {text!r}: they are for URLs")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SQL_SUFFIXES:
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase(path)
    if suffix in FILE_SUFFIXES:
        return open_file(path)
    raise JobDatabaseError(
        f"Could not guess job database type from {str(path)!r} (use .csv, .parquet, .geoparquet, .db/.sqlite, "
        "or an SQLAlchemy URL such as postgresql+psycopg://..., or a .csv/.parquet/.geoparquet file in object "
        "storage such as s3://bucket/prefix/jobs.parquet)"
    )


def _from_url(url: str, storage_options: Any) -> JobDatabaseInterface:
    """The job database at a URL, by its scheme (see ``get_job_db``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise JobDatabaseError(f"Job database {url!r}: a file:// URL names a local path (file:///path/jobs.csv)")
        return get_job_db(Path(url2pathname(parts.path)), storage_options=storage_options)
    if scheme in SCHEMES:
        return open_remote_job_db(url, storage_options)
    if _is_sqlalchemy_url(url):
        if storage_options is not None:
            raise JobDatabaseError(f"storage_options given for the SQL job database {url!r}: they are for files")
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase(url)
    raise JobDatabaseError(
        f"Job database {url!r}: {scheme!r} is neither an SQLAlchemy dialect nor an object store. Use {ACCEPTED}"
    )


def _is_sqlalchemy_url(url: str) -> bool:
    """Whether ``url``'s scheme names an SQLAlchemy dialect (``dialect[+driver]``), installed or built in."""
    import sqlalchemy as sa

    try:
        sa.engine.make_url(url).get_dialect()
    except sa.exc.ArgumentError:  # not a URL, or no such dialect (NoSuchModuleError)
        return False
    except Exception:  # a dialect that exists but fails to load: SqlJobDatabase says why
        return True
    return True


def create_job_db(
    path: str | Path, df: pd.DataFrame, *, on_exists: str = "error", storage_options: Any = None
) -> JobDatabaseInterface:
    """Like openeo's ``create_job_db``, returning the atomic flavours (``storage_options``: see ``get_job_db``)."""
    job_db = get_job_db(path, storage_options=storage_options)
    job_db.initialize_from_df(df=df, on_exists=on_exists)
    return job_db


def resolve_job_db(job_db: str | Path | JobDatabaseInterface) -> JobDatabaseInterface:
    """Turn what ``run_jobs(job_db=...)`` accepts into a job database.

    openeo's own ``CsvJobDatabase``/``ParquetJobDatabase`` objects are upgraded in place to their atomic
    subclasses (same object, same state, same file format), so users' objects keep working unchanged.
    """
    if isinstance(job_db, (str, Path)):
        return get_job_db(job_db)
    if not isinstance(job_db, JobDatabaseInterface):
        raise ValueError(f"Unsupported job_db {job_db!r}")
    upgrade = _UPGRADES.get(type(job_db))
    if upgrade is not None:
        job_db.__class__ = upgrade
        if getattr(job_db, "_df", None) is not None:
            job_db._rows_read = len(job_db._df)
    return job_db


def __getattr__(name: str) -> Any:
    if name == "SqlJobDatabase":  # imports SQLAlchemy only when used
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase
    raise AttributeError(f"module 'prefect_openeo.jobdb' has no attribute {name!r}")

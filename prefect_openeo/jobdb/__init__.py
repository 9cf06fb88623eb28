"""Job databases: openeo's ``JobDatabaseInterface``, with crash-safe CSV and Parquet files (local or in object
storage)."""

from prefect_openeo.jobdb.files import (
    AtomicCsvJobDatabase,
    AtomicParquetJobDatabase,
    JobDatabaseError,
    create_job_db,
    get_job_db,
    resolve_job_db,
)
from prefect_openeo.jobdb.remote import (
    JobDatabaseConflict,
    JobDatabaseCreated,
    RemoteCsvJobDatabase,
    RemoteParquetJobDatabase,
)

__all__ = [
    "AtomicCsvJobDatabase",
    "AtomicParquetJobDatabase",
    "JobDatabaseConflict",
    "JobDatabaseCreated",
    "JobDatabaseError",
    "RemoteCsvJobDatabase",
    "RemoteParquetJobDatabase",
    "SqlJobDatabase",
    "create_job_db",
    "get_job_db",
    "resolve_job_db",
]


def __getattr__(name: str):
    if name == "SqlJobDatabase":  # imports SQLAlchemy only when used
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase
    raise AttributeError(f"module 'prefect_openeo.jobdb' has no attribute {name!r}")

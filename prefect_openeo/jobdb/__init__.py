"""Job databases: openeo's ``JobDatabaseInterface``, with crash-safe CSV and Parquet files."""

from prefect_openeo.jobdb.files import (
    AtomicCsvJobDatabase,
    AtomicParquetJobDatabase,
    JobDatabaseError,
    create_job_db,
    get_job_db,
    resolve_job_db,
)

__all__ = [
    "AtomicCsvJobDatabase",
    "AtomicParquetJobDatabase",
    "JobDatabaseError",
    "create_job_db",
    "get_job_db",
    "resolve_job_db",
]

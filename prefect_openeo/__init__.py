"""prefect-openeo: run thousands of openEO batch jobs with Prefect.

``MultiBackendJobManager`` is a drop-in for openeo's class. Importing this package does not import
Prefect: the flow and tasks (``run_openeo_jobs``, ``prefect_openeo.tasks``) load it when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openeo.extra.job_management import (
    CsvJobDatabase,
    JobDatabaseInterface,
    ParquetJobDatabase,
    ProcessBasedJobCreator,
)

from prefect_openeo.jobdb import (
    AtomicCsvJobDatabase,
    AtomicParquetJobDatabase,
    JobDatabaseError,
    create_job_db,
    get_job_db,
)
from prefect_openeo.manager import MultiBackendJobManager
from prefect_openeo.states import Status

if TYPE_CHECKING:
    from prefect_openeo.blocks import OpenEOBackend
    from prefect_openeo.flows import run_openeo_jobs
    from prefect_openeo.jobdb.sql import SqlJobDatabase

__version__ = "0.1.0"

__all__ = [
    "AtomicCsvJobDatabase",
    "AtomicParquetJobDatabase",
    "CsvJobDatabase",
    "JobDatabaseError",
    "JobDatabaseInterface",
    "MultiBackendJobManager",
    "OpenEOBackend",
    "ParquetJobDatabase",
    "ProcessBasedJobCreator",
    "SqlJobDatabase",
    "Status",
    "create_job_db",
    "get_job_db",
    "run_openeo_jobs",
]


_LAZY = ("run_openeo_jobs", "SqlJobDatabase", "OpenEOBackend")


def __dir__() -> list[str]:  # lets `prefect block register -m prefect_openeo` find the blocks
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str) -> Any:
    if name == "OpenEOBackend":  # imports Prefect
        from prefect_openeo.blocks import OpenEOBackend

        return OpenEOBackend
    if name == "run_openeo_jobs":
        from prefect_openeo.flows import run_openeo_jobs

        return run_openeo_jobs
    if name == "SqlJobDatabase":
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase
    raise AttributeError(f"module 'prefect_openeo' has no attribute {name!r}")

"""The job databases' exceptions (imports nothing of prefect-openeo, so every job database module may use it)."""

from __future__ import annotations

__all__ = ["JobDatabaseBusy", "JobDatabaseConflict", "JobDatabaseCreated", "JobDatabaseError"]


class JobDatabaseError(ValueError):
    """A job database that cannot be used as it is; the message names the file and what is wrong."""


class JobDatabaseBusy(JobDatabaseError):
    """Another run works on this job database (a CSV/Parquet file is worked by one run at a time)."""


class JobDatabaseConflict(JobDatabaseError):
    """Another process changed the job database object since this one read it; nothing was written."""


class JobDatabaseCreated(JobDatabaseConflict, FileExistsError):
    """Another process created the job database object first; nothing was written."""

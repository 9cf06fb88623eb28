"""The lifecycle actions of one batch job, as plain functions.

The engine calls these directly outside a flow run; inside one, ``prefect_openeo.tasks`` runs a backend's
work of a sweep (``run_lane``) as a Prefect task (a task run in the UI). Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd
from openeo import BatchJob
from openeo.rest import OpenEoApiError
from openeo.util import rfc3339

from prefect_openeo.backends import (
    AUTH_CODES,
    Backend,
    SweepResult,
    creation_token,
    is_transient,
    sweep_statuses,
    uncertain,
)
from prefect_openeo.downloads import DownloadReport, download_job_results
from prefect_openeo.paths import atomic_write
from prefect_openeo.schema import TOKEN

_log = logging.getLogger("prefect_openeo")

T = TypeVar("T")


__all__ = [
    "Steps",
    "CreateOutcome",
    "StartOutcome",
    "cancel_job",
    "create_jobs",
    "download_results",
    "fetch_error_logs",
    "run_lane",
    "start_jobs",
    "sweep_statuses",
    "SweepResult",
]


@dataclass
class CreateOutcome:
    """What calling the user's ``start_job`` for one row gave."""

    index: object
    job_id: str | None = None
    skipped: bool = False
    error: str | None = None
    start_time: str | None = None
    #: The job may have been created all the same (its answer was lost): looked for before creating again.
    uncertain: bool = False
    #: The backend refused the access token: nothing was created, the row waits for a signed-in run.
    signed_out: bool = False
    #: When ``start_job`` raised: the formatted traceback, and what identifies "the same failure".
    traceback: str | None = None
    signature: str | None = None


@dataclass
class StartOutcome:
    job_id: str
    started: bool
    #: The backend refused for now (``ConcurrentJobLimit``): try again in a later sweep.
    retry_later: bool = False
    error: str | None = None
    #: The backend failed the start for now (5xx, unreachable, its retries spent): tried again next sweep.
    transient: bool = False


def create_jobs(
    start_job: Callable[..., BatchJob | None],
    rows: pd.DataFrame,
    backend: Backend,
    connection_provider: Callable[[str], object],
) -> list[CreateOutcome]:
    """Call the user's ``start_job`` for each row, in order; one failing row does not stop the others."""
    outcomes = []
    connection = backend.connection()
    for index, row in rows.iterrows():
        outcome = CreateOutcome(index=index)
        token = row.get(TOKEN)
        try:
            _log.info(f"Starting job on backend {backend.name} for row {index}")
            with creation_token(token if isinstance(token, str) else None):
                job = start_job(
                    row=row, connection_provider=connection_provider, connection=connection, provider=backend.name
                )
        except Exception as e:  # the user's callback: record, go on with the next row (the engine logs it)
            outcome.error = f"start_job raised {e!r}"
            outcome.uncertain = uncertain(e)
            outcome.signed_out = isinstance(e, OpenEoApiError) and e.code in AUTH_CODES
            outcome.traceback = traceback.format_exc()
            outcome.signature = failure_signature(e)
        else:
            outcome.start_time = rfc3339.now_utc()
            if job is None:
                outcome.skipped = True
            elif isinstance(job, BatchJob) and isinstance(job.job_id, str) and job.job_id:
                outcome.job_id = job.job_id
                _log.info(f"Job created: {job.job_id}")
            else:
                outcome.error = (
                    f"start_job returned {type(job).__name__} {job!r:.80}; expected an openeo BatchJob or None"
                )
                _log.error(f"Row {index}: {outcome.error}")
        outcomes.append(outcome)
    return outcomes


def failure_signature(error: BaseException) -> str:
    """What makes two failures "the same": the exception type and message, numbers left out."""
    return re.sub(r"\d+", "#", f"{type(error).__name__}: {error}")[:300]


def start_jobs(backend: Backend, job_ids: list[str]) -> list[StartOutcome]:
    """Ask the backend to start created jobs (``POST /jobs/{id}/results``)."""
    connection = backend.connection()
    backend.refresh_token(connection)
    outcomes = []
    for job_id in job_ids:
        try:
            connection.job(job_id).start()
            outcomes.append(StartOutcome(job_id, started=True))
        except OpenEoApiError as e:
            if e.code == "ConcurrentJobLimit":
                _log.info(f"Backend {backend.name} refused to start {job_id} for now: {e.message}")
                outcomes.append(StartOutcome(job_id, started=False, retry_later=True, error=str(e)))
            else:
                _log.error(f"Failed to start job {job_id!r}: {e!r}")
                outcomes.append(StartOutcome(job_id, False, error=f"start failed: {e}", transient=is_transient(e)))
        except Exception as e:  # transport errors after the request's retries: tried again next sweep
            _log.error(f"Failed to start job {job_id!r}: {e!r}")
            outcomes.append(StartOutcome(job_id, False, error=f"start failed: {e!r}", transient=is_transient(e)))
    return outcomes


def cancel_job(backend: Backend, job_id: str) -> None:
    """Cancel a job (``DELETE /jobs/{id}/results``)."""
    backend.connection().job(job_id).stop()


def download_results(job: BatchJob, job_dir: Path, job_metadata: dict | None = None) -> DownloadReport:
    """Download a finished job's results and metadata, verified and atomically."""
    return download_job_results(job, job_dir, job_metadata=job_metadata)


def fetch_error_logs(job: BatchJob, path: Path) -> int:
    """Save the job's error-level logs as JSON at ``path`` (nothing written when there are none)."""
    return save_error_logs([dict(entry) for entry in job.logs(level="error")], path)


def save_error_logs(logs: list[dict], path: Path) -> int:
    """Write error log entries as JSON at ``path`` (nothing written when there are none)."""
    if logs:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(logs, indent=2)))
    return len(logs)


def run_lane(work: Callable[[], T]) -> T:
    """Run a backend's work of one sweep (reconcile, sweep, cancel, start, create): here, as it is."""
    return work()


@dataclass
class Steps:
    """The lifecycle actions the engine calls; partly swapped for Prefect tasks inside a flow run."""

    run_lane: Callable = field(default=run_lane)
    create_jobs: Callable = field(default=create_jobs)
    sweep_statuses: Callable = field(default=sweep_statuses)
    start_jobs: Callable = field(default=start_jobs)
    cancel_job: Callable = field(default=cancel_job)
    download_results: Callable = field(default=download_results)
    fetch_error_logs: Callable = field(default=fetch_error_logs)

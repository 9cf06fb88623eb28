"""Prefect tasks for each lifecycle step of openEO batch jobs.

Thin wrappers over ``prefect_openeo.steps``: each adds retries, backoff and a timeout that fit the step,
and a task run (named after the backend or job) in the Prefect UI. Sweeps and batched actions are one task
run each, never one per job per poll. Job creation is not retried by Prefect: the user's ``start_job``
is not idempotent, so a retry could create a second backend job.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from prefect_openeo import steps
from prefect_openeo.engine import Steps

create_jobs = task(
    steps.create_jobs,
    name="create openEO jobs",
    task_run_name="create jobs on {backend.name}",
    cache_policy=NO_CACHE,
    retries=0,
    timeout_seconds=1800,
    log_prints=True,
)

sweep_statuses = task(
    steps.sweep_statuses,
    name="sweep openEO job statuses",
    task_run_name="sweep {backend.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    timeout_seconds=600,
)

start_jobs = task(
    steps.start_jobs,
    name="start openEO jobs",
    task_run_name="start jobs on {backend.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    timeout_seconds=600,
)

cancel_job = task(
    steps.cancel_job,
    name="cancel openEO job",
    task_run_name="cancel {job_id} on {backend.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    timeout_seconds=300,
)

download_results = task(
    steps.download_results,
    name="download openEO job results",
    task_run_name="download {job.job_id}",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    timeout_seconds=3600,
)

fetch_error_logs = task(
    steps.fetch_error_logs,
    name="fetch openEO job error logs",
    task_run_name="error logs of {job.job_id}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    timeout_seconds=300,
)


def prefect_steps() -> Steps:
    """The engine's steps as Prefect tasks (used by the manager inside a flow run)."""
    return Steps(
        create_jobs=create_jobs,
        sweep_statuses=sweep_statuses,
        start_jobs=start_jobs,
        cancel_job=cancel_job,
        download_results=download_results,
        fetch_error_logs=fetch_error_logs,
    )

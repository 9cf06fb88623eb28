"""Prefect tasks for each lifecycle step of openEO batch jobs.

Thin wrappers over ``prefect_openeo.steps``: each adds retries and backoff that fit the step,
and a task run (named after the backend or job) in the Prefect UI. Sweeps and batched actions are one task
run each, never one per job per poll. Job creation is not retried by Prefect: the user's ``start_job``
is not idempotent, so a retry could create a second backend job.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from prefect_openeo import steps
from prefect_openeo.steps import Steps


def _step_task(fn, name: str, run_name: str, *, retries: int, backoff: float):
    """A lifecycle step as an uncached Prefect task with exponential backoff (and jitter) between retries.

    No ``timeout_seconds``: steps run in their backend's lane thread, where Prefect cannot interrupt them;
    every request has a timeout instead (openeo's default: 20 minutes per request).
    """
    return task(
        fn,
        name=name,
        task_run_name=run_name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=backoff),
        retry_jitter_factor=0.5,
    )


# Not retried: the user's start_job is not idempotent, so a retry could create a second backend job.
create_jobs = _step_task(steps.create_jobs, "create openEO jobs", "create jobs on {backend.name}", retries=0, backoff=1)
sweep_statuses = _step_task(
    steps.sweep_statuses, "sweep openEO job statuses", "sweep {backend.name}", retries=2, backoff=5
)
start_jobs = _step_task(steps.start_jobs, "start openEO jobs", "start jobs on {backend.name}", retries=2, backoff=5)
cancel_job = _step_task(
    steps.cancel_job, "cancel openEO job", "cancel {job_id} on {backend.name}", retries=2, backoff=5
)
download_results = _step_task(
    steps.download_results, "download openEO job results", "download {job.job_id}", retries=3, backoff=10
)
fetch_error_logs = _step_task(
    steps.fetch_error_logs,
    "fetch openEO job error logs",
    "error logs of {job.job_id}",
    retries=2,
    backoff=5,
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

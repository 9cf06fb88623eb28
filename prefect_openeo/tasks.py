"""Prefect tasks for the lifecycle steps of openEO batch jobs.

Inside a flow run, a backend's work of one sweep (what ``prefect_openeo.lanes.BackendWork`` does: reconcile,
sweep statuses, cancel, start, create) is one task run; every job has its own task run whose state follows
the backend job (``prefect_openeo.observe``). The rules:

- Work that will not ask the backend anything (a sweep that can learn nothing yet) has no task run.
- Result downloads have no task run: a download's outcome is a patch of its row (``results``), retried by
  the engine as outside a flow run, and shown in the row's message and the run's summary.
- The sweep task runs in the backend's lane (a worker thread), where Prefect cannot enforce
  ``timeout_seconds``: every request carries its own timeout instead.
- It is never cached, carries no tags (a tag's concurrency limit would cost an API round trip per task run)
  and is never retried by Prefect: it calls the user's ``start_job``, which is not idempotent, and the next
  sweep tries again anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_openeo.steps import Steps

#: Tag of the task runs that mirror openEO batch jobs (one per job: filter on it in the UI).
JOB_TAG = "openeo-job"


def backend_tag(name: str) -> str:
    """The tag of a backend's per-job task runs."""
    return f"backend:{name}"


@task(name="sweep openEO backend", task_run_name="sweep {backend}", cache_policy=NO_CACHE)
def sweep_backend(work: Callable[[], Any], backend: str) -> Any:
    """A backend's work of one sweep: reconcile, sweep statuses, cancel overdue jobs, start and create jobs."""
    return work()


def run_lane(work: Callable[[], Any]) -> Any:
    """``Steps.run_lane`` in a flow run: the work as one task run when it will ask its backend something."""
    needs_backend = getattr(work, "needs_backend", None)
    if needs_backend is not None and not needs_backend():
        return work()
    return sweep_backend(work, work.backend.name)


def prefect_steps() -> Steps:
    """The engine's steps inside a flow run: a task run per backend sweep (its steps run as plain functions
    inside it); the rest as outside a flow run."""
    return Steps(run_lane=run_lane)

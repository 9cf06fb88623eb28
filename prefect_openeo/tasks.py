"""Prefect tasks for the lifecycle steps of openEO batch jobs.

Inside a flow run, a backend's work of one sweep (reconcile, sweep statuses, cancel, start, create: what
``prefect_openeo.lanes.BackendWork`` does) is one task run; every job has its own task run whose state
follows the backend job (``prefect_openeo.observe``). Work that will not ask the backend anything (a sweep
that can learn nothing yet) runs without a task run. Result downloads run as plain functions, retried by the
engine as outside a flow run: a task run per download meant three more state records per job for the
Prefect server, which at 1,000 jobs kept a SQLite server too busy to record the jobs' own states in time
(a failed download shows in the row's message and the run's summary).

The task runs in a worker thread (the backend's lane), where Prefect cannot enforce ``timeout_seconds``:
every request has a timeout instead (openeo's default: 20 minutes). Nothing is cached. It carries no tags:
Prefect takes a slot of each tag's concurrency limit through the API before a tagged task runs, a round trip
per task run that held sweeps up (the per-job task runs, created and never run, carry the tags). It is not
retried by Prefect: it calls the user's ``start_job``, which is not idempotent (a retry could create a
second backend job), and the next sweep tries again anyway.
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

"""Fan-out over a work pool: one flow run of a deployment starts N runs of the same deployment that work one
shared job database together, waits for them, and ends with a state that says how they ended.

The worker flow runs are ordinary runs of the deployment (``workers=1``, every other parameter and the job
variables as the coordinator's), so the pool places them wherever it places runs, possibly on other machines.
That only works when everything they share is reachable from anywhere: a PostgreSQL (or other server) job
database, whose row claims, leases and recorded budgets keep them apart, and results in object storage. Anything
else is refused before a worker flow run exists, as is a flow run that is not a deployment run, or a deployment or
pool whose concurrency limit could never let the coordinator and its workers run together.

In the UI each worker is a flow run named ``<coordinator>-worker-<i>``, tagged ``openeo-fan-out`` and
``coordinator:<coordinator>``, shown as a subflow of its coordinator. Cancelling the coordinator cancels them.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from openeo.extra.job_management import JobDatabaseInterface

__all__ = [
    "FAN_OUT_TAG",
    "FanOutError",
    "cancel_fan_out_workers",
    "check_pool_room",
    "check_shareable",
    "fan_out",
    "outcome",
]

_log = logging.getLogger("prefect_openeo")

#: Tag of every worker flow run started by a coordinator.
FAN_OUT_TAG = "openeo-fan-out"


class FanOutError(ValueError):
    """A fan-out that cannot work as asked; the message says why and what to use instead."""


def coordinator_tag(name: str) -> str:
    """The tag that names a worker flow run's coordinator in the UI."""
    return f"coordinator:{name}"


def check_shareable(job_db: Any, root_dir: Any, download_results: bool, workers: int) -> None:
    """Raise ``FanOutError`` unless every worker, wherever it runs, can reach the same job database and results:
    a server database (not SQLite) and, when results are downloaded, object storage."""
    from prefect_openeo.jobdb import get_job_db, open_store
    from prefect_openeo.storage import ResultStore

    why = f"workers={workers} starts flow runs that may run on other machines"
    if not isinstance(job_db, str):
        raise FanOutError(
            f"{why}: give job_db as a database URL they can all reach (e.g. postgresql+psycopg://user@host/db), "
            f"not {type(job_db).__name__}"
        )
    store = open_store(get_job_db(job_db))
    if not store.shared:
        where = "a file in object storage" if "://" in job_db else "a file on this machine's disk"
        raise FanOutError(
            f"{why}, and they cannot share the job database {job_db!r}: it is {where}, which one run at a time "
            "works on. Use a PostgreSQL job database (postgresql+psycopg://user@host/db, the password in "
            "PGPASSWORD where the flow runs): import this one with SqlJobDatabase.from_file(path, url)."
        )
    if not store.across_machines:
        raise FanOutError(
            f"{why}, and they cannot share the job database {job_db!r}: an SQLite file is on one machine's disk. "
            "Use a PostgreSQL job database (postgresql+psycopg://user@host/db)."
        )
    store = ResultStore.from_root(root_dir)
    if download_results and not store.shareable:
        raise FanOutError(
            f"{why}, and they cannot share the results folder {str(root_dir)!r}: it is on one machine's disk. Use "
            "object storage (root_dir=s3://bucket/prefix; gs://, az:// too), or download_results=false."
        )


def check_pool_room(workers: int, deployment: Any, work_pool: Any) -> None:
    """Raise ``FanOutError`` when a concurrency limit of the deployment or its work pool can never let the
    coordinator and its ``workers`` run at once (the workers would wait forever for the coordinator to end)."""
    needed = workers + 1
    limit = getattr(getattr(deployment, "global_concurrency_limit", None), "limit", None)
    if limit is not None and limit < needed:
        raise FanOutError(
            f"workers={workers}: the deployment {deployment.name!r} runs at most {limit} flow run(s) at once, and "
            f"the coordinator and its workers are {needed}. Raise its concurrency_limit or lower workers."
        )
    pool_limit = getattr(work_pool, "concurrency_limit", None)
    if pool_limit is not None and pool_limit < needed:
        raise FanOutError(
            f"workers={workers}: the work pool {work_pool.name!r} runs at most {pool_limit} flow run(s) at once, "
            f"and the coordinator and its workers are {needed}. Raise its concurrency limit or lower workers."
        )


def outcome(runs: Iterable[Any], rows: Mapping[str, int] | None = None) -> Any:
    """The coordinator's final state from its workers' flow runs: Failed when one failed or crashed, else
    Cancelled when one was cancelled, else Completed; the message counts them (and the rows by status)."""
    from prefect.states import Cancelled, Completed, Failed

    runs = sorted(runs, key=lambda r: r.name)
    counts = collections.Counter(r.state.name if r.state else "Unknown" for r in runs)
    message = f"{len(runs)} worker flow run(s): " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    if rows:
        message += "; rows: " + ", ".join(f"{status} {n}" for status, n in sorted(rows.items()))
    failed = [r for r in runs if r.state is None or r.state.is_failed() or r.state.is_crashed()]
    cancelled = [r for r in runs if r.state is not None and r.state.is_cancelled()]
    detail = "".join(f"\n- {r.name}: {r.state.name if r.state else 'Unknown'}: {_message(r)}" for r in failed)
    if failed:
        return Failed(message=message + detail)
    if cancelled:
        return Cancelled(message=message)
    return Completed(message=message)


def _message(run: Any) -> str:
    return ((run.state.message if run.state else None) or "no message").strip().splitlines()[0][:300]


def fan_out(workers: int, job_db: str, root_dir: str, download_results: bool, poll_seconds: float) -> Any:
    """In a deployment's flow run: start ``workers`` flow runs of the deployment on its work pool, wait until
    they all ended, rewrite the results' STAC collection once from the job database (each worker rewrote it
    at its own end, so the last one written may lack rows another worker finished meanwhile), and return the
    coordinator's final state (``outcome``). Raises ``FanOutError`` before starting any when the flow run is
    not a deployment run or the pool could never run them all at once."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is None or flow_run.deployment_id is None:
        raise FanOutError(
            f"workers={workers} starts flow runs of this flow run's deployment, and this run is not a "
            "deployment run: run it through a deployment (prefect deployment run FLOW/DEPLOYMENT --param "
            f"workers={workers}), or leave workers at 1."
        )
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id)
        work_pool = client.read_work_pool(deployment.work_pool_name) if deployment.work_pool_name else None
        check_pool_room(workers, deployment, work_pool)
        parameters = {**(flow_run.parameters or {}), "workers": 1}
        tags = [FAN_OUT_TAG, coordinator_tag(flow_run.name)]
        started = []
        for i in range(1, workers + 1):
            run = run_deployment(
                deployment.id,
                parameters=parameters,
                flow_run_name=f"{flow_run.name}-worker-{i}",
                tags=tags,
                job_variables=dict(flow_run.job_variables or {}) or None,
                idempotency_key=f"{flow_run.id}-worker-{i}",  # a retried coordinator finds its workers again
                timeout=0,
                as_subflow=True,
            )
            started.append(run.id)
            logger.info(f"Started worker flow run {run.name!r} ({run.id}) on work pool {deployment.work_pool_name!r}")
        runs = wait_for_runs(client, started, poll_seconds, logger)
    if download_results:
        _update_catalog(job_db, root_dir, logger)
    rows = _rows_by_status(job_db, logger)
    state = outcome(runs, rows)
    logger.info(f"Workers ended: {state.message}")
    return state


def wait_for_runs(client: Any, ids: list[Any], poll_seconds: float, logger: Any) -> list[Any]:
    """The flow runs ``ids`` once every one is in a final state (polling the API); logs each state change."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    seen: dict[Any, str] = {}
    while True:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
        for run in runs:
            name = run.state.name if run.state else "Unknown"
            if seen.get(run.id) != name:
                seen[run.id] = name
                logger.info(f"Worker flow run {run.name!r}: {name}")
        if len(runs) == len(ids) and all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        time.sleep(poll_seconds)


def _update_catalog(job_db: str, root_dir: str, logger: Any) -> None:
    from prefect_openeo import catalog
    from prefect_openeo.jobdb import resolve_job_db
    from prefect_openeo.storage import ResultStore

    try:
        report = catalog.update_catalog(ResultStore.from_root(root_dir), resolve_job_db(job_db))
        logger.info(f"STAC collection of {report.items} job(s) at {report.location}")
    except catalog.NothingToCatalog:
        pass
    except Exception as e:  # the results are safe; `prefect-openeo catalog` writes it later
        logger.warning(f"Could not update the STAC collection of the results: {e!r} (`prefect-openeo catalog`)")


def _rows_by_status(job_db: str | JobDatabaseInterface, logger: Any) -> dict[str, int]:
    from prefect_openeo.jobdb import resolve_job_db

    try:
        return dict(resolve_job_db(job_db).count_by_status())
    except Exception as e:  # the summary only: never hide how the workers ended
        logger.warning(f"Could not count the job database's rows: {e!r}")
        return {}


def cancel_fan_out_workers(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` hook: cancelling a coordinator cancels its worker flow runs that have not ended."""
    if not isinstance((flow_run.parameters or {}).get("workers"), int) or flow_run.parameters["workers"] <= 1:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterTags
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]),
                tags=FlowRunFilterTags(all_=[FAN_OUT_TAG]),
            )
        )
        for run in runs:
            if run.state is None or not run.state.is_final():
                cancelling = Cancelling(message=f"its coordinator {flow_run.name!r} was cancelled")
                client.set_flow_run_state(run.id, cancelling)
                _log.info(f"Cancelling worker flow run {run.name!r} with its coordinator")

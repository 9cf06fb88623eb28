"""The manager loop as a Prefect flow: ``run_openeo_jobs``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import openeo
import pandas as pd
from openeo import Connection
from prefect import flow, get_run_logger

from prefect_openeo.manager import MultiBackendJobManager


def load_callable(spec: str | Mapping | Callable) -> Callable:
    """A callable; an import path ``"package.module:function"`` to one; or a ``ProcessBasedJobCreator``
    spec: ``{"process_id": ..., "namespace": ..., "parameter_defaults": {...}, "parameter_column_map": {...}}``."""
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        from openeo.extra.job_management.process_based import ProcessBasedJobCreator

        allowed = {"process_id", "namespace", "parameter_defaults", "parameter_column_map"}
        unknown = sorted(set(spec) - allowed)
        if unknown or not (spec.get("process_id") or spec.get("namespace")):
            raise ValueError(
                f"A ProcessBasedJobCreator spec needs process_id and/or namespace and only {sorted(allowed)}; "
                f"got {dict(spec)!r}"
            )
        return ProcessBasedJobCreator(**dict(spec))
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"start_job must be a callable or 'module:function', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"Cannot import start_job {spec!r}: {e}") from e
    if not callable(target):
        raise ValueError(f"start_job {spec!r} is not callable")
    return target


BLOCK_PREFIX = "block:"


def connect(spec: Connection | str | Mapping | Callable[[], Connection]) -> Connection | Callable[[], Connection]:
    """A backend given as a Connection, a callable, a URL, ``"block:NAME"`` (an ``OpenEOBackend`` block),
    or ``{"url": ..., "username": ..., "password": ...}``."""
    if isinstance(spec, Connection) or callable(spec):
        return spec
    if isinstance(spec, str) and spec.startswith(BLOCK_PREFIX):
        return load_block(spec).get_connection
    if isinstance(spec, str):
        return lambda: openeo.connect(spec)
    if isinstance(spec, Mapping) and "url" in spec:

        def make() -> Connection:
            connection = openeo.connect(spec["url"])
            if spec.get("username"):
                connection.authenticate_basic(spec["username"], spec.get("password"))
            elif spec.get("auth") == "oidc":
                connection.authenticate_oidc()
            return connection

        return make
    raise ValueError(f"Cannot make a backend connection from {spec!r}")


def load_block(spec: str):
    """The ``OpenEOBackend`` block named in ``"block:NAME"``."""
    from prefect_openeo.blocks import OpenEOBackend

    return OpenEOBackend.load(spec[len(BLOCK_PREFIX) :])


def cancel_backend_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` hook: with ``cancel_backend_jobs=True``, cancel the run's active backend jobs too
    and mark their rows ``canceled``. Without it, active rows stay as they are and a later run tracks them
    (the job database is always consistent: every write is atomic)."""
    import logging

    from openeo.extra.job_management import JobDatabaseInterface

    from prefect_openeo.frames import blank, set_cell
    from prefect_openeo.jobdb import resolve_job_db
    from prefect_openeo.states import ACTIVE

    log = logging.getLogger("prefect_openeo")
    params = flow_run.parameters or {}
    if not params.get("cancel_backend_jobs"):
        return
    job_db = params.get("job_db")
    if not isinstance(job_db, (str, JobDatabaseInterface)):
        log.warning("cancel_backend_jobs: the job database is not known to the hook")
        return
    db = resolve_job_db(job_db)
    rows = db.get_by_status(statuses=list(ACTIVE)).copy()
    backends = {name: connect(spec) for name, spec in (params.get("backends") or {}).items()}
    connections: dict[str, Connection] = {}
    for index, row in rows.iterrows():
        name, job_id = row.get("backend_name"), row.get("id")
        if blank(job_id) or name not in backends:
            continue
        try:
            if name not in connections:
                spec = backends[name]
                connections[name] = spec if isinstance(spec, Connection) else spec()
            connections[name].job(job_id).stop()
            rows.at[index, "status"] = "canceled"
            set_cell(rows, index, "message", "canceled with its flow run")
        except Exception as e:
            log.warning(f"Could not cancel job {job_id} on {name}: {e!r}")
    db.persist(rows)
    log.info(f"Canceled {(rows['status'] == 'canceled').sum()} backend job(s) with the flow run")


@flow(name="run-openeo-jobs", log_prints=True, validate_parameters=False, on_cancellation=[cancel_backend_jobs])
def run_openeo_jobs(
    job_db: Any,
    backends: Mapping[str, Any],
    start_job: Any,
    parallel_jobs: int | Mapping[str, int] = 2,
    poll_sleep: float = 60,
    root_dir: str | Path = ".",
    download_results: bool = True,
    cancel_running_job_after: int | None = None,
    df: pd.DataFrame | None = None,
    global_concurrency: bool = True,
    cancel_backend_jobs: bool = False,
) -> dict:
    """Run one openEO batch job per row of a job database, across backends, until every row ended.

    :param job_db: a CSV/Parquet path or a ``JobDatabaseInterface``; resumed when it exists.
    :param backends: backend name -> ``Connection``, URL, ``"block:NAME"`` of an ``OpenEOBackend`` block, or
        ``{"url", "username", "password"}``; filled in this order.
    :param start_job: the callback that creates one row's job: a callable (e.g. a ``ProcessBasedJobCreator``),
        ``"module:function"``, or a dict spec ``{"process_id", "namespace", "parameter_defaults",
        "parameter_column_map"}`` of a ``ProcessBasedJobCreator`` (plain data, for deployments).
    :param parallel_jobs: jobs active at once per backend (one int for all, or per backend name).
    :param df: rows to initialize a new job database with.
    :param global_concurrency: also hold every job's slot in the Prefect global concurrency limit
        ``openeo-<backend>`` (created with ``parallel_jobs`` if missing), so that several flow runs and
        deployments together never exceed a backend's budget.
    :param cancel_backend_jobs: when the flow run is cancelled in Prefect, cancel its active backend jobs too
        (and mark their rows ``canceled``); by default they keep running and a later run tracks them.
    :return: the run stats, as openeo's ``MultiBackendJobManager.run_jobs``.
    """
    logger = get_run_logger()
    if not backends:
        raise ValueError("run_openeo_jobs needs at least one backend")
    manager = MultiBackendJobManager(
        poll_sleep=poll_sleep,
        root_dir=root_dir,
        download_results=download_results,
        cancel_running_job_after=cancel_running_job_after,
    )
    manager.global_concurrency = global_concurrency
    for name, spec in backends.items():
        if isinstance(spec, str) and spec.startswith(BLOCK_PREFIX):
            block = load_block(spec)  # its parallel_jobs, unless given per backend name
            slots = parallel_jobs.get(name, block.parallel_jobs) if isinstance(parallel_jobs, Mapping) else None
            slots = block.parallel_jobs if slots is None else slots
            manager.add_backend(name, connection=block.get_connection, parallel_jobs=slots)
            continue
        slots = parallel_jobs.get(name, 2) if isinstance(parallel_jobs, Mapping) else parallel_jobs
        manager.add_backend(name, connection=connect(spec), parallel_jobs=slots)
    stats = manager.run_jobs(df=df, start_job=load_callable(start_job), job_db=job_db)
    logger.info(f"Run stats: {dict(stats)}")
    return dict(stats)

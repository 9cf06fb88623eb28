"""The deployable flow ``run_openeo_jobs``: the manager loop as a Prefect flow, with typed plain-data parameters."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import pandas as pd
from openeo import Connection
from openeo.extra.job_management import JobDatabaseInterface
from prefect import Flow, get_run_logger
from prefect.states import Cancelled
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from prefect_openeo.fanout import cancel_fan_out_workers, check_shareable, fan_out
from prefect_openeo.jobdb.errors import JobDatabaseBusy
from prefect_openeo.manager import MultiBackendJobManager
from prefect_openeo.outcome import check_threshold, final_state
from prefect_openeo.parameters import (
    BLOCK_PREFIX,
    BackendSpec,
    JobCreatorSpec,
    PlainSecretError,
    connect,
    describe,
    load_block,
    refuse_plain_secrets,
)

__all__ = [
    "BLOCK_PREFIX",
    "BackendRef",
    "OpenEOFlow",
    "ParallelJobs",
    "PlainSecretError",
    "StartJobRef",
    "connect",
    "load_block",
    "load_callable",
    "openeo_flow",
    "run_openeo_jobs",
]

#: A backend: ``"block:NAME"``, a URL, or a ``BackendSpec``; in-process also a Connection or a callable making one.
BackendRef = str | BackendSpec | SkipJsonSchema[Connection] | SkipJsonSchema[Callable[[], Connection]]
#: The job callback: ``"module:function"`` or a ``ProcessBasedJobCreator`` spec; in-process also any callable.
StartJobRef = str | JobCreatorSpec | SkipJsonSchema[Callable[..., Any]]
#: Jobs active at once per backend: one number for all, or per backend name; None: each block's own.
ParallelJobs = Annotated[int, Field(ge=0)] | dict[str, Annotated[int, Field(ge=0)]] | None

DEFAULT_PARALLEL_JOBS = 2


class OpenEOFlow(Flow):
    """A flow whose parameters are checked for plain secrets before its run is created, and stored as plain
    data (live objects as a short description, never their attributes)."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refuse_plain_secrets(parameters)
        return super().serialize_parameters({key: describe(value) for key, value in parameters.items()})

    def with_options(self, **kwargs: Any) -> OpenEOFlow:
        new_flow = super().with_options(**kwargs)
        new_flow.__class__ = type(self)
        return new_flow


def openeo_flow(**kwargs: Any) -> Callable[[Callable[..., Any]], OpenEOFlow]:
    """``@flow(...)`` for flows that take backends: an ``OpenEOFlow`` (no plain secrets in parameters)."""

    def decorate(fn: Callable[..., Any]) -> OpenEOFlow:
        return OpenEOFlow(fn=fn, **kwargs)

    return decorate


def budgets(
    parallel_jobs: int | Mapping[str, int] | None, names: list[str], block_budgets: Mapping[str, int]
) -> dict[str, int]:
    """Jobs active at once per backend: an explicit number (for all, or per name) wins; otherwise a block's
    own ``parallel_jobs``, else 2. A per-name mapping must name only given backends."""
    if isinstance(parallel_jobs, Mapping):
        unknown = sorted(set(parallel_jobs) - set(names))
        if unknown:
            raise ValueError(f"parallel_jobs names backends that are not given: {unknown} (backends: {names})")
    result = {}
    for name in names:
        value = parallel_jobs.get(name) if isinstance(parallel_jobs, Mapping) else parallel_jobs
        if value is None:
            value = block_budgets.get(name, DEFAULT_PARALLEL_JOBS)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"parallel_jobs for backend {name!r} must be a whole number >= 0, got {value!r}")
        result[name] = value
    return result


def load_callable(spec: str | Mapping | Callable) -> Callable:
    """A callable; one named by ``"package.module:function"`` or ``"path/to/file.py:function"``; or a
    ``ProcessBasedJobCreator`` spec: ``{"process_id": ..., "namespace": ..., "parameter_defaults": {...},
    "parameter_column_map": {...}}``.

    A module that is not installed is looked for in the current folder too (as ``python -m`` finds it).
    A ``.py`` file is loaded as a module named after it, its folder added to the end of ``sys.path`` so
    that it can import its neighbours. Raises ``ValueError`` naming what is missing or what went wrong."""
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
    source, _, attr = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not source or not attr:
        raise ValueError(f"start_job must be a callable, 'module:function' or 'path/to/file.py:function', got {spec!r}")
    module = _load_file(source, spec) if source.endswith(".py") else _import_module(source, spec)
    target = _attribute(module, attr, spec)
    if not callable(target):
        raise ValueError(f"start_job {spec!r} is not callable: it is {type(target).__name__} {target!r:.80}")
    return target


def _attribute(module: ModuleType, attr: str, spec: str) -> Any:
    """``module``'s (dotted) attribute ``attr``; else an error listing the functions the module defines."""
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            defined = sorted(
                name
                for name, value in vars(module).items()
                if callable(value)
                and not name.startswith("_")
                and getattr(value, "__module__", None) == module.__name__
            )
            listed = ", ".join(defined[:10]) + (", ..." if len(defined) > 10 else "")
            raise ValueError(
                f"start_job {spec!r}: {getattr(module, '__file__', None) or module.__name__} has no {attr!r}"
                f" (it defines: {listed or 'no functions'})"
            ) from None
    return target


def _import_module(name: str, spec: str) -> ModuleType:
    """``name`` imported from ``sys.path``, or else from the current folder."""
    for attempt in (1, 2):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and (name == e.name or name.startswith(e.name + "."))):
                raise ValueError(f"Cannot import start_job {spec!r}: {_where_it_failed(e)}") from e
            if attempt == 1 and _add_current_folder_for(name):
                continue
            raise ValueError(
                f"Cannot import start_job {spec!r}: no module named {e.name!r} (not installed, and no "
                f"{e.name.replace('.', '/')}.py or {e.name.replace('.', '/')}/ in the current folder {os.getcwd()})"
            ) from e
        except Exception as e:
            raise ValueError(f"Cannot import start_job {spec!r}: {_where_it_failed(e)}") from e
    raise AssertionError("unreachable")


def _add_current_folder_for(name: str) -> bool:
    """Add the current folder to the end of ``sys.path`` when it holds ``name``'s top package (and is not
    there already); whether it did."""
    folder = os.getcwd()
    if any(os.path.abspath(entry or ".") == folder for entry in sys.path):
        return False
    importlib.invalidate_caches()
    if importlib.machinery.PathFinder.find_spec(name.partition(".")[0], [folder]) is None:
        return False
    sys.path.append(folder)
    return True


def _load_file(source: str, spec: str) -> ModuleType:
    """The Python file ``source`` as a module named after it (reused when that file is loaded already)."""
    path = Path(source).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the current folder {os.getcwd()})"
        raise ValueError(f"start_job file {source!r} does not exist{where}")
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return loaded
        name = f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"  # another module has the name
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"start_job file {source!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"Cannot import start_job {spec!r}: {_where_it_failed(e)}") from e
    return module


def _where_it_failed(error: Exception) -> str:
    """``error`` with the file and line it came from: the innermost frame outside Python's import system."""
    if isinstance(error, SyntaxError):
        return f"{error.filename}, line {error.lineno}: SyntaxError: {error.msg}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen ")]
    frames = [f for f in frames if Path(f.filename).resolve() != Path(__file__).resolve()]
    where = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames else ""
    return f"{where}{type(error).__name__}: {error}"


def _described(value: Any) -> bool:
    """A live object's description, as ``describe`` stores it (not something to connect to)."""
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def for_this_run(job_db: Any) -> Any:
    """A SQL job database named by URL or path, opened with this flow run's id in the ``owner`` of the rows
    it holds (``cancel_backend_jobs`` finds them by it); anything else as given."""
    from prefect.runtime import flow_run

    if not isinstance(job_db, (str, Path)) or not flow_run.id:
        return job_db
    from prefect_openeo.jobdb import for_worker, resolve_job_db

    db = resolve_job_db(job_db)
    opened = for_worker(db, str(flow_run.id))
    return job_db if opened is db else opened


def cancel_backend_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` hook: with ``cancel_backend_jobs=True``, cancel the run's active backend jobs too
    and mark their rows ``canceled``. Without it, active rows stay as they are and a later run tracks them
    (the job database is always consistent: every write is atomic)."""
    params = flow_run.parameters or {}
    if params.get("cancel_backend_jobs"):
        cancel_active_jobs(str(flow_run.id), params)


def cancel_active_jobs(run_id: str, params: Mapping[str, Any]) -> int:
    """Cancel the backend jobs that the flow run ``run_id`` (with parameters ``params``) was tracking and mark
    their rows ``canceled``; how many rows were."""
    from prefect_openeo import transitions
    from prefect_openeo.backends import Backend
    from prefect_openeo.frames import blank
    from prefect_openeo.jobdb import open_store, resolve_job_db
    from prefect_openeo.states import ACTIVE
    from prefect_openeo.steps import cancel_job

    log = logging.getLogger("prefect_openeo")
    job_db = params.get("job_db")
    if not isinstance(job_db, (str, JobDatabaseInterface)) or _described(job_db):
        log.warning("cancel_backend_jobs: the job database is not known to the hook")
        return 0
    store = open_store(resolve_job_db(job_db))
    # A shared store: only the jobs this flow run was tracking, not other workers'; a file job database has
    # one run at a time (JobDatabaseBusy), so its active rows are this run's.
    rows = store.held_by_run(run_id, ACTIVE).copy()
    backends = {
        name: Backend(name, connect(spec, name), parallel_jobs=1)
        for name, spec in (params.get("backends") or {}).items()
        if not _described(spec)  # a live connection given in-process is not stored: its jobs are left as they are
    }
    patches = []
    for index, row in rows.iterrows():
        name, job_id = row.get("backend_name"), row.get("id")
        if blank(job_id) or name not in backends:
            continue
        try:
            cancel_job(backends[name], job_id)  # through the backend's connection: retries, re-authentication
            patches.append(transitions.canceled(row, index, "canceled with its flow run"))
        except Exception as e:
            log.warning(f"Could not cancel job {job_id} on {name}: {e!r}")
    landed = store.apply(patches, rows)
    log.info(f"Canceled {len(patches)} backend job(s) with the flow run; {len(landed)} row(s) recorded canceled")
    return len(landed)


def carry_state(state: Any) -> Any:
    """A new state of the same type, name and message as ``state`` (a subflow's), holding its result: what a
    parent flow returns to end as its subflow ended (Prefect would aggregate a returned subflow state into
    "All states completed.")."""
    from prefect.states import State

    data = state.result(raise_on_failure=False) if state.is_completed() or state.is_failed() else None
    return State(type=state.type, name=state.name, message=state.message, data=data)


def _cancelled(why: str, job_db: Any, backends: Mapping[str, Any], cancel_jobs: bool) -> Any:
    """The final state of a run that stopped because it was asked to cancel (``CancelWatch``): its active backend
    jobs canceled where ``cancel_jobs``, else left to a later run; the message says which."""
    from prefect.runtime import flow_run

    from prefect_openeo.jobdb import resolve_job_db
    from prefect_openeo.jobdb.store import open_store
    from prefect_openeo.states import ACTIVE

    logger = get_run_logger()
    if cancel_jobs:
        named = str(job_db) if isinstance(job_db, Path) else job_db
        canceled = cancel_active_jobs(str(flow_run.id), {"job_db": named, "backends": backends})
        left = f"{canceled} active backend job(s) canceled"
    else:
        active = open_store(resolve_job_db(job_db)).held_by_run(str(flow_run.id), ACTIVE)
        left = f"{len(active)} active backend job(s) left running (a later run tracks them)"
    message = f"Cancelled: {why}; no more jobs created, {left}"
    logger.warning(message)
    return Cancelled(message=message)


@openeo_flow(
    name="run-openeo-jobs",
    log_prints=True,
    validate_parameters=False,
    on_cancellation=[cancel_backend_jobs, cancel_fan_out_workers],
)
def run_openeo_jobs(
    job_db: str | SkipJsonSchema[Path] | SkipJsonSchema[JobDatabaseInterface],
    backends: Mapping[str, BackendRef],
    start_job: StartJobRef,
    parallel_jobs: ParallelJobs = None,
    poll_sleep: Annotated[float, Field(ge=0)] = 60,
    root_dir: str = ".",
    download_results: bool = True,
    cancel_running_job_after: Annotated[int, Field(gt=0)] | None = None,
    df: SkipJsonSchema[pd.DataFrame | None] = None,
    global_concurrency: bool = False,
    cancel_backend_jobs: bool = False,
    workers: Annotated[int, Field(ge=1)] = 1,
    fail_when_failed_rows: int | float | None = None,
    retry_failed_jobs: Annotated[int, Field(ge=0)] = 0,
    retry_backoff: Annotated[float, Field(ge=0)] = 60.0,
) -> dict:
    """Run one openEO batch job per row of a job database, across backends, until every row ended.

    Args:
        job_db: The job database: a CSV or Parquet path, a `.db`/`.sqlite` file, or a database URL without a
            password (e.g. `postgresql+psycopg://user@host/db`); resumed when it exists. Relative paths are
            relative to the flow run's working directory.
        backends: Backend name -> `block:NAME` (an OpenEOBackend block: URL, credentials, parallel_jobs), a URL
            (no authentication), or a spec whose secrets are named, never given: password/client_secret/token as
            {"secret": NAME} (a Prefect Secret block) or {"env": VAR} (an environment variable of the worker).
            Backends are filled in this order.
        start_job: The callback that creates one row's job: `package.module:function` (installed, or in the
            working directory), `path/to/file.py:function`, or a ProcessBasedJobCreator spec {process_id,
            namespace, parameter_defaults, parameter_column_map}.
        parallel_jobs: Jobs active at once per backend: one number for all backends, or backend name -> number.
            Left empty: each OpenEOBackend block's own parallel_jobs, and 2 for other backends. An explicit
            number wins over a block's.
        poll_sleep: Seconds between two sweeps of the backends' job listings.
        root_dir: Folder for the results: one job_{id}/ folder per job. Relative to the flow run's working
            directory.
        download_results: Download the results of finished jobs (and their metadata) into root_dir.
        cancel_running_job_after: Cancel jobs that have been running longer than this many seconds.
        df: In-process only: rows to initialize a new job database with.
        global_concurrency: Hold every job's slot in the Prefect global concurrency limit `openeo-<backend>`
            (created with the backend's parallel_jobs when missing), so that flow runs on different job
            databases together never exceed a backend's budget. Off by default: runs sharing a SQL job database
            already share its budget, and a slot costs two Prefect API requests per job.
        cancel_backend_jobs: When the flow run is cancelled in Prefect, cancel its active backend jobs too (and
            mark their rows canceled); by default they keep running and a later run tracks them.
        workers: Flow runs that work the job database together. With N > 1 (a deployment run only), this run
            starts N runs of its deployment on its work pool (named `<this run>-worker-<i>`, tagged
            `coordinator:<this run>`), which may run on other machines, waits for them, and ends Failed when one
            of them failed. They share job_db and root_dir, so job_db must be a server database (PostgreSQL) and
            root_dir object storage (s3://...), unless download_results is off.
        fail_when_failed_rows: End the flow run Failed when at least this many rows failed (a whole number), or
            this fraction of all rows (a number in (0, 1]); rows that ended error, start_failed or canceled
            count. Left empty, the flow run ends Completed, its message saying how many rows failed.
        retry_failed_jobs: Give a row whose job ends in error (or cannot be started) up to this many new jobs;
            counted per row in the job database (column retry_count), so a rerun does not start over.
        retry_backoff: Seconds before a row's first retry, doubling with each further one.

    Returns:
        The run stats, as openeo's `MultiBackendJobManager.run_jobs`: the result of the flow run's final
        state, whose message says what the run came to (e.g. "7 of 10 rows ended in error"). Past
        fail_when_failed_rows the flow run is Failed and raises `TooManyFailedRows` (which has the stats). A
        run that finds another one working on the same CSV/Parquet job database (a lock file beside it) ends
        Cancelled at once. With workers > 1, a state that says how the worker flow runs ended.
    """
    refuse_plain_secrets({"backends": backends, "job_db": job_db, "root_dir": root_dir})  # runs created through the API
    logger = get_run_logger()
    logger.info(f"Working directory: {Path.cwd()}")  # where relative paths point (a worker's folder, on its machine)
    check_threshold(fail_when_failed_rows)
    if not backends:
        raise ValueError("run_openeo_jobs needs at least one backend")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    if workers > 1:
        check_shareable(job_db, root_dir, download_results, workers)
    if df is None and isinstance(job_db, (str, Path)):
        from prefect_openeo.jobdb import resolve_job_db

        if not resolve_job_db(job_db).exists():
            raise ValueError(
                f"The job database {str(job_db)!r} does not exist (working directory {Path.cwd()}): create it "
                "first, e.g. with the tile-and-run deployment or `prefect-openeo init`, or pass rows as df"
            )
    if workers > 1:
        return fan_out(workers, job_db, root_dir, download_results, poll_seconds=max(1.0, min(float(poll_sleep), 10.0)))
    connections: dict[str, Any] = {}
    block_budgets: dict[str, int] = {}
    for name, spec in backends.items():
        if isinstance(spec, str) and spec.startswith(BLOCK_PREFIX):
            block = load_block(spec)
            connections[name] = block.get_connection
            block_budgets[name] = block.parallel_jobs
        else:
            connections[name] = connect(spec, name)
    slots = budgets(parallel_jobs, list(backends), block_budgets)
    logger.info("Jobs active at once per backend: " + ", ".join(f"{n}: {s}" for n, s in slots.items()))
    manager = MultiBackendJobManager(
        poll_sleep=poll_sleep,
        root_dir=root_dir,
        download_results=download_results,
        cancel_running_job_after=cancel_running_job_after,
        retry_failed_jobs=retry_failed_jobs,
        retry_backoff=retry_backoff,
        stac_catalog=True,
    )
    manager.global_concurrency = global_concurrency
    for name, connection in connections.items():
        manager.add_backend(name, connection=connection, parallel_jobs=slots[name])
    if isinstance(start_job, JobCreatorSpec):  # a validated spec (e.g. from tile_and_run)
        start_job = start_job.model_dump(exclude_none=True)
    callback = load_callable(start_job)
    try:
        stats = manager.run_jobs(df=df, start_job=callback, job_db=for_this_run(job_db))
    except JobDatabaseBusy as e:  # another run works on this CSV/Parquet job database: leave it to that one
        logger.warning(f"{e}: this run leaves it to that one and ends")
        return Cancelled(message=f"{e}: this run leaves it to that one and ends")
    logger.info(f"Run stats: {dict(stats)}")
    if manager.cancel_requested:
        return _cancelled(manager.cancel_requested, job_db, backends, cancel_backend_jobs)
    from prefect_openeo.jobdb import resolve_job_db
    from prefect_openeo.jobdb.store import open_store

    store = open_store(resolve_job_db(job_db))
    return final_state(store.job_db.count_by_status(), stats, fail_when_failed_rows, store.count_results())

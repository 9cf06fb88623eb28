"""The manager loop as a Prefect flow: ``run_openeo_jobs``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import openeo
import pandas as pd
from openeo import Connection
from prefect import flow, get_run_logger

from prefect_openeo.manager import MultiBackendJobManager


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

"""``MultiBackendJobManager``: openeo's class, rebuilt on the prefect-openeo engine.

Outside a Prefect flow run, ``run_jobs`` runs the engine in-process with no Prefect API at all (Prefect
is not even imported). Inside a flow run, each backend's sweep runs as a Prefect task, with per-job task-run
states, events and artifacts reported in the background (``prefect_openeo.observe``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from openeo import BatchJob, Connection
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo import catalog
from prefect_openeo.backends import Backend
from prefect_openeo.downloads import DownloadReport
from prefect_openeo.engine import JobEngine, Observer, RunSettings, SlotGate, cancel_after
from prefect_openeo.jobdb import AtomicCsvJobDatabase, AtomicParquetJobDatabase, JobDatabaseError, resolve_job_db
from prefect_openeo.jobdb.checks import check_job_frame, normalize_job_frame
from prefect_openeo.schema import COLUMN_REQUIREMENTS
from prefect_openeo.steps import Steps, save_error_logs
from prefect_openeo.storage import ResultStore

_log = logging.getLogger("prefect_openeo")

_UNSET = object()


def _start_job_default(row: pd.Series, connection: Connection, *args, **kwargs):
    raise NotImplementedError("No 'start_job' callable provided")


def in_flow_run() -> bool:
    """Whether we run inside a Prefect flow run (without importing Prefect when it is not loaded)."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def _cancel_watch() -> Any:
    """Inside a flow run, a started ``CancelWatch`` of it (the engine stops once it is asked to cancel)."""
    if not in_flow_run():
        return None
    from prefect.context import FlowRunContext

    from prefect_openeo.cancel_watch import CancelWatch

    flow_run = FlowRunContext.get().flow_run
    return CancelWatch(flow_run.id).start() if flow_run is not None else None


class MultiBackendJobManager:
    """Tracker for many openEO batch jobs on one or more backends; a drop-in for openeo's class.

    :param poll_sleep: seconds to sleep between sweeps.
    :param root_dir: where per-job results, metadata and error logs go (``job_{id}/``): a folder, or
        (prefect-openeo) an object-store URL such as ``s3://bucket/prefix`` (``gs://``, ``az://``, ``file://``
        too), a prefect-aws ``S3Bucket`` block, or a ``prefect_openeo.storage.ResultStore``.
    :param download_results: download the results of finished jobs.
    :param cancel_running_job_after: cancel jobs running longer than this (seconds).
    :param retry_failed_jobs: (prefect-openeo) give rows that end ``error`` or ``start_failed`` up to this many
        new jobs; the n-th retry waits ``retry_backoff * 2**(n-1)`` seconds. Counted in column ``retry_count``.
    :param give_up_after: (prefect-openeo) stop waiting for a backend that stays unreachable this long (seconds):
        the run ends once the others have nothing left, raising ``BackendsGaveOut`` if rows remain for it. By
        default a backend that is down is waited for (the others go on meanwhile).
    :param stac_catalog: (prefect-openeo) keep a STAC catalogue of the downloaded results beside them
        (``prefect_openeo.catalog``): an item per job (``job_{id}/stac-item.json``) and ``collection.json``. Off
        by default, so ``root_dir`` holds exactly openeo's layout; ``run_openeo_jobs`` and the CLI turn it on.
    :param storage_options: (prefect-openeo) for a URL ``root_dir``: options of its fsspec filesystem (e.g.
        ``{"key": ..., "secret": ..., "endpoint_url": ...}`` for s3fs), or a prefect-aws ``AwsCredentials`` block.
        Without them, credentials come from the environment.
    """

    #: openeo's column requirements (``normalize_df``, dtypes when reading CSV), as openeo's class has them.
    _column_requirements = COLUMN_REQUIREMENTS

    def __init__(
        self,
        poll_sleep: int = 60,
        root_dir: str | Path | ResultStore | Any | None = ".",
        *,
        download_results: bool = True,
        cancel_running_job_after: int | None = None,
        retry_failed_jobs: int = 0,
        retry_backoff: float = 60.0,
        storage_options: dict | Any | None = None,
        give_up_after: float | None = None,
        stac_catalog: bool = False,
    ):
        if not isinstance(retry_failed_jobs, int) or retry_failed_jobs < 0:
            raise ValueError(f"retry_failed_jobs must be a non-negative int, got {retry_failed_jobs!r}")
        self._retry_failed_jobs = retry_failed_jobs
        self._retry_backoff = float(retry_backoff)
        self._give_up_after = give_up_after
        self.stac_catalog = stac_catalog
        self.backends: dict[str, Backend] = {}
        self.poll_sleep = poll_sleep
        #: Where results live (``prefect_openeo.storage``): a local folder or object storage.
        self.result_store = ResultStore.from_root(root_dir or ".", storage_options)
        #: As openeo's: a ``Path`` for a local folder; the root URL for object storage.
        self._root_dir = self.result_store.location
        self._download_results = download_results
        self._cancel_running_job_after = cancel_after(cancel_running_job_after)
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        #: Stats of the last (or current) run, also while ``start_job_thread`` runs.
        self.stats: dict = collections.defaultdict(int)
        #: Inside a flow run: why the last ``run_jobs`` stopped before its work was done, when the flow run
        #: (or one it is a subflow of) was asked to cancel (``prefect_openeo.cancel_watch``); else None.
        self.cancel_requested: str | None = None

    # -- backends ---------------------------------------------------------------------------------
    def add_backend(self, name: str, connection: Connection | Callable[[], Connection], parallel_jobs: int = 2) -> None:
        """Register a backend by name with a ``Connection`` (or a callable that makes one)."""
        self.backends[name] = Backend(name, connection, parallel_jobs)

    def _get_connection(self, backend_name: str, resilient: bool = True) -> Connection:
        """The backend's (shared, resilient) connection; also the ``connection_provider`` of ``start_job``."""
        if backend_name not in self.backends:
            raise ValueError(f"Backend {backend_name!r} is not registered (registered: {', '.join(self.backends)})")
        return self.backends[backend_name].connection()

    @classmethod
    def _normalize_df(cls, df: pd.DataFrame) -> pd.DataFrame:
        return cls._column_requirements.normalize_df(df)

    # -- running ----------------------------------------------------------------------------------
    def run_jobs(
        self,
        df: pd.DataFrame | None = None,
        start_job: Callable[..., BatchJob | None] = _start_job_default,
        job_db: str | Path | JobDatabaseInterface | None = None,
        **kwargs,
    ) -> dict:
        """Run the jobs of ``job_db`` (or ``df``) until none is pending or active; returns the stats dict.

        ``start_job(row, connection, connection_provider, provider)`` creates one row's batch job and
        returns it (or None to skip the row). The manager starts created jobs itself.
        """
        if not callable(start_job):
            raise TypeError(f"start_job must be callable (a function or a ProcessBasedJobCreator), got {start_job!r}")
        job_db = self._prepare(df, job_db, kwargs)
        self.stats = collections.defaultdict(int)
        watch = _cancel_watch()
        try:
            stats = self._engine(job_db, start_job, should_stop=watch).run()
        finally:
            if watch is not None:
                watch.stop()
        self.cancel_requested = watch.reason if watch is not None else None
        self._update_catalog(job_db)
        return stats

    def _prepare(self, df: pd.DataFrame | None, job_db: Any, kwargs: dict) -> JobDatabaseInterface:
        if "output_file" in kwargs:
            if job_db is not None:
                raise ValueError("Only one of `output_file` and `job_db` should be provided")
            warnings.warn(
                "The `output_file` argument is deprecated. Use `job_db` instead.",
                DeprecationWarning,
                stacklevel=3,
            )
            job_db = kwargs.pop("output_file")
        if kwargs:
            raise TypeError(f"Unexpected keyword arguments: {kwargs!r}")
        if job_db is None:
            raise ValueError("run_jobs needs a job_db (a CSV/Parquet path or a JobDatabaseInterface)")
        self._check_result_store()
        job_db = resolve_job_db(job_db)
        if job_db.exists():
            _log.info(f"Resuming `run_jobs` from existing {job_db}")
            if isinstance(job_db, (AtomicCsvJobDatabase, AtomicParquetJobDatabase)):  # files take any table
                check_job_frame(job_db.df, source=str(job_db.path))
                normalize_job_frame(job_db.df)
        elif df is not None:
            if not df.index.is_unique:
                dups = sorted({str(i) for i in df.index[df.index.duplicated()]})[:5]
                raise JobDatabaseError(f"The dataframe given to run_jobs has duplicate index values {dups}")
            try:
                job_db.initialize_from_df(df)
            except FileExistsError:  # another worker created it just now, from the same dataframe: use it
                _log.info(f"Resuming `run_jobs` from {job_db}, created meanwhile by another worker")
        return job_db

    def _check_result_store(self) -> None:
        """Object storage: fail on bad credentials or a missing bucket now, before any job or download."""
        if not self.result_store.is_local:
            self.result_store.check()

    def _engine(self, job_db: JobDatabaseInterface, start_job: Callable, should_stop=None) -> JobEngine:
        steps, observer, gate = Steps(), Observer(), SlotGate()
        if in_flow_run():
            from prefect_openeo.observe import PrefectObserver
            from prefect_openeo.tasks import prefect_steps

            steps = prefect_steps()
            keeps_catalog = self.stac_catalog and self._download_results and not self._overrides("get_job_dir")
            observer = PrefectObserver(
                self.get_job_dir if self._download_results else None,
                self._root_dir,
                catalog.catalog_location(self.result_store) if keeps_catalog else None,
            )
            if self.global_concurrency:
                from prefect_openeo.limits import GlobalConcurrencyGate

                gate = GlobalConcurrencyGate(
                    {name: b.parallel_jobs for name, b in self.backends.items()}, poll_sleep=self.poll_sleep
                )
        self._active_steps = steps
        return JobEngine(
            settings=self._settings(),
            job_db=job_db,
            start_job=start_job,
            steps=steps,
            observer=observer,
            stats=self.stats,
            should_stop=should_stop or (lambda: False),
            stoppable=should_stop is not None,
            gate=gate,
        )

    def start_job_thread(self, start_job: Callable[..., BatchJob | None], job_db: JobDatabaseInterface) -> None:
        """Run the jobs in a background thread; returns at once. Stop it with ``stop_job_thread``."""
        job_db = self._prepare(None, job_db, {})
        self._stop_thread = False
        self.stats = collections.defaultdict(int)
        engine = self._engine(job_db, start_job, should_stop=lambda: self._stop_thread)

        def run_loop() -> None:
            try:
                engine.run()
            except Exception:
                _log.exception("Job manager thread stopped with an error")
            else:
                self._update_catalog(job_db)

        self._thread = threading.Thread(target=run_loop, name="prefect-openeo-job-manager", daemon=True)
        self._thread.start()

    def join_job_thread(self, timeout_seconds: float | None = None) -> bool:
        """(prefect-openeo) Wait up to ``timeout_seconds`` for the background thread to end; whether it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout_seconds)
        return not self._thread.is_alive()

    def stop_job_thread(self, timeout_seconds: float | None = _UNSET) -> None:  # type: ignore[assignment]
        """Stop the background thread (waits up to ``2 * poll_sleep`` by default); the job db is saved."""
        if self._thread is None:
            _log.error("No job thread to stop")
            return
        self._stop_thread = True
        if timeout_seconds is _UNSET:
            timeout_seconds = 2 * self.poll_sleep
        self._thread.join(timeout_seconds)
        if self._thread.is_alive():
            _log.warning("Job thread did not stop after timeout")

    def _settings(self) -> RunSettings:
        """What the engine needs from this manager for a run."""
        custom_done = type(self).on_job_done is not MultiBackendJobManager.on_job_done
        return RunSettings(
            backends=self.backends,
            poll_sleep=self.poll_sleep,
            cancel_after=self._cancel_running_job_after,
            retry_failed_jobs=self._retry_failed_jobs,
            retry_backoff=self._retry_backoff,
            results_owed=self._download_results or custom_done,
            on_done=self._job_done,
            on_error=self._job_error,
            on_cancel=self.on_job_cancel,
            connection_provider=self._get_connection,
            give_up_after=self._give_up_after,
        )

    # -- hooks ------------------------------------------------------------------------------------
    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(MultiBackendJobManager, name)

    def _job_done(self, job: BatchJob, row: pd.Series, details: dict | None) -> DownloadReport | None:
        """A finished job's ``on_job_done``; the default downloads with the job document already fetched (and
        returns what it downloaded: the engine counts it)."""
        if self._overrides("on_job_done"):
            self.on_job_done(job, row)
            return None
        return self._download(job, row, details)

    def _job_error(self, job: BatchJob, row: pd.Series, logs: list[dict]) -> None:
        """A failed job's ``on_job_error``; the default saves the error logs the sweep already fetched."""
        if self._overrides("on_job_error"):
            self.on_job_error(job, row)
        else:
            self._save_error_logs(job.job_id, logs)

    def _save_error_logs(self, job_id: str, logs: list[dict]) -> None:
        if self.result_store.is_local or self._overrides("get_error_log_path"):
            save_error_logs(logs, self.get_error_log_path(job_id))
        elif logs:
            self.result_store.write_bytes(job_id, f"job_{job_id}_errors.json", json.dumps(logs, indent=2).encode())

    def _download(self, job: BatchJob, row: pd.Series, details: dict | None) -> DownloadReport | None:
        if not self._download_results:
            return None
        steps = self._active_steps or Steps()
        backend = self.backends.get(row.get("backend_name")) if hasattr(row, "get") else None
        if backend is not None:
            backend.refresh_token(job.connection)
        # Object storage: hand over the store (its credentials) rather than the folder's URL.
        remote = not self.result_store.is_local and not self._overrides("get_job_dir")
        report = steps.download_results(job, self.result_store if remote else self.get_job_dir(job.job_id), details)
        if self.stac_catalog and not self._overrides("get_job_dir"):
            try:  # the results are safe: a missing item is written by the run's end or `prefect-openeo catalog`
                catalog.write_item(self.result_store, job.job_id, row)
            except Exception as e:
                _log.warning(f"Job {job.job_id}: results downloaded, but not its STAC item: {e!r}")
        return report

    def _update_catalog(self, job_db: JobDatabaseInterface) -> None:
        """Rewrite the STAC collection of the downloaded results (``prefect_openeo.catalog``); never fails."""
        if not (self.stac_catalog and self._download_results) or self._overrides("get_job_dir"):
            return
        try:
            report = catalog.update_catalog(self.result_store, job_db)
            _log.info(f"STAC collection of {report.items} job(s) at {report.location}")
        except catalog.NothingToCatalog:
            pass
        except Exception as e:
            _log.warning(f"Could not update the STAC collection of the results: {e!r} (`prefect-openeo catalog`)")

    def fetch_results(
        self,
        job_db: str | Path | JobDatabaseInterface,
        *,
        missing: bool = True,
        per_second: float = 2.0,
        workers: int = 4,
    ) -> dict[str, int]:
        """Download the results of finished rows on request (``on_job_done``), recording each row's ``results``
        state (done / failed / gone) as a run would.

        :param missing: only rows whose results are not recorded ``done`` (default); else every finished row.
        :param per_second: downloads started per second, at most (``workers`` at once).
        :return: rows per outcome (``done``, ``failed``, ``gone``, ``skipped`` for unregistered backends).
        """
        from prefect_openeo import transitions
        from prefect_openeo.frames import column
        from prefect_openeo.jobdb import open_store

        if per_second <= 0 or workers < 1:
            raise ValueError(f"per_second must be > 0 and workers >= 1, got {per_second!r} and {workers!r}")
        self._check_result_store()
        job_db = resolve_job_db(job_db)
        store = open_store(job_db)
        rows = job_db.get_by_status(statuses=["finished"]).copy()
        if missing:
            rows = rows[column(rows, "results") != "done"]
        known = rows["backend_name"].isin(list(self.backends))
        outcomes: dict[str, int] = collections.Counter(skipped=int((~known).sum()))
        rows = rows[known]

        def fetch(row: pd.Series) -> None:
            self._job_done(self.backends[row["backend_name"]].connection().job(row["id"]), row, None)

        def record(index: Any, future: concurrent.futures.Future) -> None:
            state, message = transitions.download_state(rows.at[index, "id"], future.exception())
            outcomes[state] += 1
            store.apply([transitions.download_ended(rows.loc[index], index, state, message)], rows)

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            running: dict[concurrent.futures.Future, Any] = {}
            next_start = time.monotonic()
            for index, row in rows.iterrows():
                time.sleep(max(0.0, next_start - time.monotonic()))
                next_start = max(next_start, time.monotonic()) + 1.0 / per_second
                running[pool.submit(fetch, row)] = index
                for future in [f for f in running if f.done()]:
                    record(running.pop(future), future)
            for future in concurrent.futures.as_completed(list(running)):
                record(running.pop(future), future)
        self._update_catalog(job_db)
        return dict(outcomes)

    def on_job_done(self, job: BatchJob, row: pd.Series) -> None:
        """A job finished. Default: download its results and metadata into ``get_job_dir``."""
        self._download(job, row, None)

    def on_job_error(self, job: BatchJob, row: pd.Series) -> None:
        """A job failed. Default: save its error logs as ``job_{id}_errors.json``."""
        if not self.result_store.is_local and not self._overrides("get_error_log_path"):
            self._save_error_logs(job.job_id, [dict(entry) for entry in job.logs(level="error")])
            return
        steps = self._active_steps or Steps()
        steps.fetch_error_logs(job, self.get_error_log_path(job.job_id))

    def on_job_cancel(self, job: BatchJob, row: pd.Series) -> None:
        """A job was canceled. Default: nothing."""

    _active_steps: Steps | None = None
    #: Inside a flow run: hold each backend's slots in the Prefect global concurrency limit
    #: ``openeo-<backend>`` too, so several flow runs together stay within it (see ``prefect_openeo.limits``).
    global_concurrency: bool = False

    # -- paths ------------------------------------------------------------------------------------
    def get_job_dir(self, job_id: str) -> Path | str:
        """Folder for a job's results, metadata and error logs: a ``Path`` under a local ``root_dir``, the
        folder's URL under object storage (read and write it through ``result_store``)."""
        return self.result_store.job_location(job_id)

    def _job_file(self, job_id: str, name: str) -> Path | str:
        job_dir = self.get_job_dir(job_id)
        return job_dir / name if isinstance(job_dir, Path) else f"{job_dir}/{name}"

    def get_error_log_path(self, job_id: str) -> Path | str:
        return self._job_file(job_id, f"job_{job_id}_errors.json")

    def get_job_metadata_path(self, job_id: str) -> Path | str:
        return self._job_file(job_id, f"job_{job_id}.json")

    def ensure_job_dir_exists(self, job_id: str) -> Path | str:
        """The job's folder, created when local (object storage has no folders to create)."""
        job_dir = self.get_job_dir(job_id)
        if isinstance(job_dir, Path):
            job_dir.mkdir(parents=True, exist_ok=True)
        return job_dir

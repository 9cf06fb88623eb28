"""The manager loop: fill slots, sweep statuses, handle transitions, call hooks, persist.

One engine, run two ways. ``Steps`` carries the lifecycle actions: plain functions outside a flow run,
Prefect tasks inside one (see ``prefect_openeo.tasks``). The engine itself never imports Prefect.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import requests
from openeo import BatchJob
from openeo.extra.job_management import JobDatabaseInterface
from openeo.rest import OpenEoApiError
from openeo.util import deep_get, rfc3339

from prefect_openeo import steps as plain_steps
from prefect_openeo.backends import TOKEN_PREFIX, Backend, JobReport
from prefect_openeo.states import ACTIVE, Event, observe

if TYPE_CHECKING:
    from prefect_openeo.manager import MultiBackendJobManager

_log = logging.getLogger("prefect_openeo")

#: Statuses that keep ``run_jobs`` going (upstream's set).
WORK_STATUSES = ["not_started", "created", "queued_for_start", "queued", "running"]
#: Columns the manager owns; usage fields reported by a backend never overwrite them.
BOOKKEEPING_COLUMNS = ("id", "backend_name", "status", "start_time", "running_start_time", "costs")
#: How often a failing ``on_job_done``/``on_job_error`` hook (e.g. a result download) is tried in all.
HOOK_ATTEMPTS = 3
MESSAGE_COLUMN = "message"
#: The creation token of a row's job (also at the end of the job's title), recorded before creating it.
TOKEN_COLUMN = "create_token"
RETRY_COUNT_COLUMN = "retry_count"
RETRY_AFTER_COLUMN = "retry_after"


@dataclass
class Steps:
    """The lifecycle actions the engine calls; swapped for Prefect tasks inside a flow run."""

    create_jobs: Callable = plain_steps.create_jobs
    sweep_statuses: Callable = plain_steps.sweep_statuses
    start_jobs: Callable = plain_steps.start_jobs
    cancel_job: Callable = plain_steps.cancel_job
    download_results: Callable = plain_steps.download_results
    fetch_error_logs: Callable = plain_steps.fetch_error_logs


class Observer:
    """Receives what happens during a run (artifacts, events, UI states). The default does nothing."""

    def row_status(self, index: Any, row: pd.Series, status: str) -> None:  # noqa: B027
        pass

    def sweep_done(self, job_db: JobDatabaseInterface, stats: dict) -> None:  # noqa: B027
        pass

    def run_done(self, job_db: JobDatabaseInterface, stats: dict, problems: dict) -> None:  # noqa: B027
        pass


@dataclass
class _PendingHook:
    kind: str  # "done" | "error" | "cancel"
    job: BatchJob
    row: pd.Series
    attempts: int = 0


def set_cell(df: pd.DataFrame, index: Any, column: str, value: Any) -> None:
    """Set one cell, adding the column (as objects) or widening its dtype when a value would not fit."""
    if column not in df.columns:
        df[column] = pd.Series([None] * len(df), index=df.index, dtype=object)
    elif df[column].dtype != object and not (
        isinstance(value, (int, float)) and pd.api.types.is_numeric_dtype(df[column].dtype)
    ):
        df[column] = df[column].astype(object)
    df.at[index, column] = value


def format_usage(details: dict, field_name: str) -> str:
    """``"1234.5 cpu-seconds"``, as upstream writes usage columns."""
    value = deep_get(details, "usage", field_name, "value", default=0)
    unit = deep_get(details, "usage", field_name, "unit", default="")
    return f"{value} {unit}".strip()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or value == ""


@dataclass
class JobEngine:
    """Runs the jobs of one job database to completion (or until stopped)."""

    manager: MultiBackendJobManager
    job_db: JobDatabaseInterface
    start_job: Callable[..., BatchJob | None]
    steps: Steps = field(default_factory=Steps)
    observer: Observer = field(default_factory=Observer)
    stats: dict = field(default_factory=lambda: collections.defaultdict(int))
    should_stop: Callable[[], bool] = lambda: False
    #: Whether ``should_stop`` may become true while sleeping (a background thread).
    stoppable: bool = False

    def __post_init__(self) -> None:
        self._hooks: list[_PendingHook] = []
        #: Rows whose last problem is still unresolved, with a message (for the summary).
        self._problems: dict[Any, str] = {}
        #: ``GET /jobs/{id}`` documents fetched when jobs ended, handed to the hooks (saves a request).
        self._details: dict[Any, dict] = {}
        #: Jobs this process asked to start: a ``queued_for_start`` row whose job is still ``created`` and
        #: not in here was stranded by a crash between recording and sending the start, so it is sent again.
        self._start_issued: set[str] = set()
        #: The status each backend last reported per row (this sweep).
        self._reported: dict[Any, str] = {}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        if not self.manager.backends:
            raise RuntimeError("No backends registered")
        self._check_backend_names()
        for backend in self.manager.backends.values():
            backend.check()
        self._reconcile_creations()
        self._queue_missing_downloads()
        try:
            while not self.should_stop() and self.has_work():
                self.iteration()
                self.stats["run_jobs loop"] += 1
                _log.info(f"Job status histogram: {self.job_db.count_by_status()}. Run stats: {dict(self.stats)}")
                self.observer.sweep_done(self.job_db, self.stats)
                self._sleep()
        finally:
            self.observer.run_done(self.job_db, self.stats, dict(self._problems))
        return self.stats

    def has_work(self) -> bool:
        return sum(self.job_db.count_by_status(statuses=WORK_STATUSES).values()) > 0 or bool(self._hooks)

    def _sleep(self) -> None:
        """Sleep ``poll_sleep`` through ``time.sleep`` looked up now, so patches and time machines apply.

        One call per loop, as upstream's ``run_jobs``; a stoppable run (``start_job_thread``) sleeps in
        steps of at most a second so that ``stop_job_thread`` is answered quickly, as upstream's thread.
        """
        if self.stoppable:
            remaining = float(self.manager.poll_sleep)
            while remaining > 0 and not self.should_stop():
                step = min(1.0, remaining)
                time.sleep(step)
                remaining -= step
        else:
            time.sleep(self.manager.poll_sleep)
        self.stats["sleep"] += 1

    def iteration(self) -> None:
        """One sweep: track active jobs, fill free slots, persist what changed, run hooks."""
        active = self.job_db.get_by_status(statuses=list(ACTIVE)).copy()
        changed: set = set()
        events: list[tuple[Event, Any]] = []
        try:
            self._track(active, changed, events)
            self._persist(active, changed)
            self._fill(active)
        finally:
            self._persist(active, changed)
        self._queue_hooks(active, events)
        self._run_hooks()
        self._schedule_retries()

    # -- tracking ---------------------------------------------------------------------------------
    def _track(self, rows: pd.DataFrame, changed: set, events: list) -> None:
        """Sweep the backends of ``rows``, fold statuses in, cancel overdue jobs, start created ones."""
        if rows.empty:
            return
        for index in rows.index[rows["id"].map(_blank)]:
            self._fail_row(rows, index, "start_failed", f"row is {rows.at[index, 'status']!r} but has no job id")
            changed.add(index)
        trackable = rows[~rows["id"].map(_blank) & rows["status"].isin(ACTIVE)]
        for backend_name, group in trackable.groupby("backend_name", sort=False):
            backend = self.manager.backends[backend_name]
            ids = dict(zip(group["id"], group.index, strict=True))
            try:
                result = self.steps.sweep_statuses(backend, list(ids))
            except requests.exceptions.ConnectionError as e:
                self.stats["job tracking error"] += 1
                _log.warning(f"Could not reach backend {backend_name!r} to track jobs: {e!r}")
                continue
            self.stats["track_statuses"] += 1
            self.stats["job describe"] += result.describe_requests
            self.stats["job listing"] += result.listing_requests
            for job_id, report in result.reports.items():
                self._apply_report(rows, ids[job_id], report, changed, events)
            for job_id, error in result.errors.items():
                self._tracking_error(rows, ids[job_id], backend_name, error, changed)
            self._cancel_overdue(backend, rows.loc[list(ids.values())])
            self._start_created(backend, rows, list(ids.values()), changed)

    def _apply_report(self, rows: pd.DataFrame, index: Any, report: JobReport, changed: set, events: list) -> None:
        previous = rows.at[index, "status"]
        self._reported[index] = report.status
        transition = observe(previous, report.status, start_requested=previous == "queued_for_start")
        _log.info(
            f"Status of job {rows.at[index, 'id']!r} (on backend {rows.at[index, 'backend_name']}) is "
            f"{report.status!r} (previously {previous!r})"
        )
        for event in transition.events:
            self.stats[event.value] += 1
            events.append((event, index))
            if event is Event.STARTED_RUNNING:
                set_cell(rows, index, "running_start_time", rfc3339.now_utc())
        if transition.status == "running" and _blank(rows.at[index, "running_start_time"]):
            _log.warning(f"Unknown 'running_start_time' for running job {rows.at[index, 'id']}: using now.")
            set_cell(rows, index, "running_start_time", rfc3339.now_utc())
            changed.add(index)
        if report.details is not None:
            for key in report.details.get("usage") or {}:
                if key in BOOKKEEPING_COLUMNS:
                    _log.warning(f"Skipping usage field {key!r}: collides with a job db column")
                    continue
                set_cell(rows, index, key, format_usage(report.details, key))
            if report.details.get("costs") is not None:
                set_cell(rows, index, "costs", report.details["costs"])
            self._details[index] = report.details
        if transition.status != previous or (report.details is not None and transition.events):
            rows.at[index, "status"] = transition.status
            changed.add(index)
            if transition.status != previous:
                self.observer.row_status(index, rows.loc[index], transition.status)

    def _tracking_error(self, rows: pd.DataFrame, index: Any, backend: str, error: Exception, changed: set) -> None:
        self.stats["job tracking error"] += 1
        job_id = rows.at[index, "id"]
        if isinstance(error, OpenEoApiError) and error.http_status_code == 404:
            _log.warning(f"Job {job_id!r} vanished from backend {backend!r}: {error}")
            self._fail_row(rows, index, "error", f"job {job_id} not found on backend {backend} (404)")
            changed.add(index)
        else:
            _log.warning(f"Error while tracking status of job {job_id!r} on backend {backend}: {error!r}")

    def _fail_row(self, rows: pd.DataFrame, index: Any, status: str, message: str) -> None:
        rows.at[index, "status"] = status
        set_cell(rows, index, MESSAGE_COLUMN, message)
        self._problems[index] = message
        self.observer.row_status(index, rows.loc[index], status)

    def _cancel_overdue(self, backend: Backend, rows: pd.DataFrame) -> None:
        limit = self.manager._cancel_running_job_after
        if limit is None:
            return
        now = rfc3339.parse_datetime(rfc3339.now_utc(), with_timezone=True)
        for index, row in rows[rows["status"] == "running"].iterrows():
            try:
                since = rfc3339.parse_datetime(row["running_start_time"], with_timezone=True)
            except Exception as e:
                _log.error(f"Row {index}: unusable running_start_time {row['running_start_time']!r}: {e}")
                continue
            elapsed = now - since
            if elapsed > limit:
                _log.info(f"Cancelling long-running job {row['id']} (after {elapsed}, running since {since})")
                try:
                    self.steps.cancel_job(backend, row["id"])
                    self.stats["job cancel"] += 1
                except Exception as e:
                    self.stats["job cancel error"] += 1
                    _log.error(f"Failed to cancel job {row['id']!r}: {e!r}")

    def _start_created(self, backend: Backend, rows: pd.DataFrame, indices: list, changed: set) -> None:
        stranded = [
            i
            for i in indices
            if rows.at[i, "status"] == "queued_for_start"
            and self._reported.get(i) == "created"
            and rows.at[i, "id"] not in self._start_issued
        ]
        to_start = [i for i in indices if rows.at[i, "status"] == "created"] + stranded
        limit = backend.limit()
        if limit is not None and to_start:  # the backend refused more: start only as jobs there end
            here = rows["backend_name"] == backend.name
            started = int((here & rows["status"].isin(["queued", "running"])).sum())
            to_start = to_start[: max(0, limit - started)]
        if not to_start:
            return
        for index in to_start:
            rows.at[index, "status"] = "queued_for_start"
            self.stats["job_queued_for_start"] += 1
            changed.add(index)
        # Record "start requested" before sending it: a crash in between is recovered (``stranded``).
        self._persist(rows, changed)
        by_id = {rows.at[i, "id"]: i for i in to_start}
        self._start_issued.update(by_id)
        refused = 0
        for outcome in self.steps.start_jobs(backend, list(by_id)):
            index = by_id[outcome.job_id]
            changed.add(index)
            if outcome.started:
                self.stats["job start"] += 1
                rows.at[index, "status"] = "queued"
                self.observer.row_status(index, rows.loc[index], "queued")
            elif outcome.retry_later:
                self.stats["job start retry"] += 1
                rows.at[index, "status"] = "created"
                self._start_issued.discard(outcome.job_id)
                refused += 1
            else:
                self.stats["start_job error"] += 1
                self._fail_row(rows, index, "start_failed", outcome.error or "start failed")
        if refused:
            here = rows["backend_name"] == backend.name
            backend.refuse_more(int((here & rows["status"].isin(["queued", "running"])).sum()))

    # -- filling slots ----------------------------------------------------------------------------
    def _fill(self, active: pd.DataFrame) -> None:
        counts = active[active["status"].isin(ACTIVE)].groupby("backend_name").size().to_dict()
        free = {name: b.slots() - counts.get(name, 0) for name, b in self.manager.backends.items()}
        total_free = sum(max(0, f) for f in free.values())
        if total_free <= 0:
            return
        candidates = self.job_db.get_by_status(statuses=["not_started"], max=max(200, 4 * total_free))
        if candidates.empty:
            return
        plan: dict[str, list] = collections.defaultdict(list)
        now = rfc3339.now_utc()
        for index, row in candidates.iterrows():
            if not _blank(row.get(RETRY_AFTER_COLUMN)) and str(row[RETRY_AFTER_COLUMN]) > now:
                continue
            pinned = row.get("backend_name")
            names = [pinned] if not _blank(pinned) else list(self.manager.backends)
            target = next((n for n in names if free.get(n, 0) > 0), None)
            if target is not None:
                plan[target].append(index)
                free[target] -= 1
            if sum(max(0, f) for f in free.values()) <= 0:
                break
        for backend_name in self.manager.backends:  # registration order
            if plan.get(backend_name):
                self._launch(backend_name, candidates.loc[plan[backend_name]].copy())

    def _launch(self, backend_name: str, rows: pd.DataFrame) -> None:
        backend = self.manager.backends[backend_name]
        # Record the intent, with a token that goes into the job's title, before asking the backend:
        # after a crash, a rerun finds the job by its token instead of creating it again.
        for index in rows.index:
            set_cell(rows, index, TOKEN_COLUMN, f"{TOKEN_PREFIX}{uuid.uuid4().hex[:12]}")
        self._persist(rows, set(rows.index))
        set_cell_all(rows, "backend_name", backend_name)
        self.stats["start_job call"] += len(rows)
        outcomes = self.steps.create_jobs(self.start_job, rows, backend, self.manager._get_connection)
        changed: set = set()
        created = []
        for outcome in outcomes:
            index = outcome.index
            changed.add(index)
            self.stats["job launch"] += 1
            if outcome.start_time:
                set_cell(rows, index, "start_time", outcome.start_time)
            if outcome.error:
                self.stats["start_job error"] += 1
                self._fail_row(rows, index, "start_failed", outcome.error)
            elif outcome.skipped:
                self.stats["start_job skipped"] += 1
                rows.at[index, "status"] = "skipped"
                self.observer.row_status(index, rows.loc[index], "skipped")
            else:
                set_cell(rows, index, "id", outcome.job_id)
                rows.at[index, "status"] = "created"
                self.observer.row_status(index, rows.loc[index], "created")
                created.append(index)
        # Record the job ids before anything else talks to the backend about them.
        self._persist(rows, changed)
        if created:
            new = rows.loc[created].copy()
            events: list = []
            track_changed: set = set()
            self._track(new, track_changed, events)
            self._persist(new, track_changed)
            self._queue_hooks(new, events)

    # -- hooks ------------------------------------------------------------------------------------
    def _queue_hooks(self, rows: pd.DataFrame, events: list) -> None:
        kinds = {Event.FINISHED: "done", Event.FAILED: "error", Event.CANCELED: "cancel"}
        for event, index in events:
            if event in kinds:
                row = rows.loc[index]
                job = self.manager._get_connection(row["backend_name"]).job(row["id"])
                self._hooks.append(_PendingHook(kinds[event], job, row))

    def _run_hooks(self) -> None:
        pending, self._hooks = self._hooks, []
        for hook in pending:
            method = {"done": self.manager.on_job_done, "error": self.manager.on_job_error}.get(
                hook.kind, self.manager.on_job_cancel
            )
            hook.attempts += 1
            try:
                self.manager._current_details = self._details.get(hook.row.name)
                method(hook.job, hook.row)
                self._problems.pop(hook.row.name, None)
            except Exception as e:
                _log.error(f"on_job_{hook.kind} failed for job {hook.job.job_id} (attempt {hook.attempts}): {e!r}")
                self.stats[f"on_job_{hook.kind} error"] += 1
                message = f"on_job_{hook.kind} failed after {hook.attempts} attempt(s): {e!r}"
                self._problems[hook.row.name] = message
                if hook.attempts < HOOK_ATTEMPTS:
                    self._hooks.append(hook)
                else:
                    self._record_message(hook.row.name, message)
            finally:
                self.manager._current_details = None

    def _record_message(self, index: Any, message: str) -> None:
        rows = self.job_db.get_by_indices([index]).copy()
        if index in rows.index:
            set_cell(rows, index, MESSAGE_COLUMN, message)
            self._persist(rows, {index})

    def _queue_missing_downloads(self) -> None:
        """Finished rows of an earlier run whose results are not on disk get their download again."""
        if not self.manager._download_results:
            return
        from prefect_openeo.downloads import results_present

        finished = self.job_db.get_by_status(statuses=["finished"])
        for _, row in finished.iterrows():
            if _blank(row.get("id")) or row.get("backend_name") not in self.manager.backends:
                continue
            if not results_present(self.manager.get_job_dir(row["id"]), row["id"]):
                job = self.manager._get_connection(row["backend_name"]).job(row["id"])
                self._hooks.append(_PendingHook("done", job, row))

    def _reconcile_creations(self) -> None:
        """Rows whose creation was under way when a run stopped: adopt the job if the backend has it."""
        pending = self.job_db.get_by_status(statuses=["not_started"])
        if pending.empty or TOKEN_COLUMN not in pending.columns:
            return
        pending = pending[~pending[TOKEN_COLUMN].map(_blank)].copy()
        if pending.empty:
            return
        tokens = dict(zip(pending[TOKEN_COLUMN], pending.index, strict=True))
        found: dict[str, tuple[str, dict]] = {}
        for name, backend in self.manager.backends.items():
            try:
                for token, entry in backend.find_created(set(tokens) - set(found)).items():
                    found[token] = (name, entry)
            except Exception as e:
                _log.warning(f"Could not look for jobs of an interrupted run on backend {name!r}: {e!r}")
        for token, index in tokens.items():
            if token in found:
                name, entry = found[token]
                _log.info(f"Row {index}: adopting job {entry['id']} on {name}, created before the last run stopped")
                set_cell(pending, index, "backend_name", name)
                set_cell(pending, index, "id", entry["id"])
                set_cell(pending, index, "start_time", entry.get("created") or rfc3339.now_utc())
                pending.at[index, "status"] = "created"
                self.stats["job adopted"] += 1
            else:
                set_cell(pending, index, TOKEN_COLUMN, None)
        self._persist(pending, set(pending.index))

    def _schedule_retries(self) -> None:
        """Optionally give ``error``/``start_failed`` rows another go, after a backoff, up to a maximum."""
        limit = self.manager._retry_failed_jobs
        if not limit:
            return
        changed = set()
        rows = self.job_db.get_by_status(statuses=["error", "start_failed"]).copy()
        for index, row in rows.iterrows():
            count = 0 if _blank(row.get(RETRY_COUNT_COLUMN)) else int(row[RETRY_COUNT_COLUMN])
            if count >= limit:
                continue
            delay = self.manager._retry_backoff * (2**count)
            after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delay)
            job = "" if _blank(row["id"]) else f" (job {row['id']})"
            note = f"attempt {count + 1} ended {row['status']}{job}"
            set_cell(rows, index, RETRY_COUNT_COLUMN, count + 1)
            set_cell(rows, index, RETRY_AFTER_COLUMN, rfc3339.datetime(after))
            set_cell(rows, index, MESSAGE_COLUMN, f"{note}; retry {count + 1}/{limit} after {delay:g} s")
            for column in ("id", TOKEN_COLUMN, "start_time", "running_start_time"):
                if column in rows.columns:
                    set_cell(rows, index, column, None)
            rows.at[index, "status"] = "not_started"
            self.stats["job retry scheduled"] += 1
            changed.add(index)
        self._persist(rows, changed)

    # -- persistence ------------------------------------------------------------------------------
    def _persist(self, rows: pd.DataFrame, changed: set) -> None:
        if not changed:
            return
        self.job_db.persist(rows.loc[[i for i in rows.index if i in changed]])
        self.stats["job_db persist"] += 1
        changed.clear()

    def _check_backend_names(self) -> None:
        """Rows that name a backend that is not registered get a clear error before anything starts."""
        rows = self.job_db.get_by_status(statuses=WORK_STATUSES)
        if rows.empty or "backend_name" not in rows.columns:
            return
        names = rows["backend_name"]
        unknown = rows[~names.map(_blank) & ~names.isin(list(self.manager.backends))]
        if not unknown.empty:
            first = unknown.index[0]
            raise ValueError(
                f"Job database row {first} (status {unknown.at[first, 'status']!r}) names backend "
                f"{unknown.at[first, 'backend_name']!r}, which is not registered "
                f"(registered: {', '.join(self.manager.backends)}); {len(unknown)} row(s) in all"
            )


def set_cell_all(df: pd.DataFrame, column: str, value: Any) -> None:
    for index in df.index:
        set_cell(df, index, column, value)


def cancel_after(seconds: float | None) -> datetime.timedelta | None:
    return datetime.timedelta(seconds=seconds) if seconds is not None else None

"""One backend's share of a sweep, run in that backend's own lane (a worker thread).

A backend in an outage retries its requests with backoff (honouring ``Retry-After``) inside its lane,
while the other backends' lanes go on: one backend's outage never stalls the others. Lanes only work on
their backend's rows and report back; the engine's loop, in the calling thread, writes the job database
and talks to the observer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import requests
from openeo.rest import OpenEoApiError
from openeo.util import deep_get, rfc3339

from prefect_openeo.backends import Backend, JobReport
from prefect_openeo.states import ACTIVE, Event, observe

if TYPE_CHECKING:
    from prefect_openeo.engine import JobEngine

_log = logging.getLogger("prefect_openeo")

#: Columns the manager owns; usage fields reported by a backend never overwrite them.
BOOKKEEPING_COLUMNS = ("id", "backend_name", "status", "start_time", "running_start_time", "costs")
MESSAGE_COLUMN = "message"


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


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value)) or value == ""


def _stack(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Rows of both frames (their columns may differ, or be all empty in one of them)."""
    if second.empty:
        return first
    if first.empty:
        return second.copy()
    with warnings.catch_warnings():  # pandas' notice about all-NA columns in concat: the result is what we want
        warnings.simplefilter("ignore", FutureWarning)
        return pd.concat([first, second])


class Lane:
    """Runs one piece of work at a time for a backend, in a daemon thread with the caller's context
    (so Prefect tasks called there belong to the current flow run)."""

    def __init__(self, name: str):
        self.name = name
        self.future: concurrent.futures.Future | None = None

    def busy(self) -> bool:
        return self.future is not None and not self.future.done()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        if self.busy():
            raise RuntimeError(f"Lane {self.name!r} is busy")
        future: concurrent.futures.Future = concurrent.futures.Future()
        context = contextvars.copy_context()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(context.run(fn))
                except BaseException as e:  # handed to the engine's loop, which re-raises what must stop the run
                    future.set_exception(e)

        threading.Thread(target=run, name=f"prefect-openeo-{self.name}", daemon=True).start()
        self.future = future
        return future


@dataclass
class Hook:
    """A hook call (``on_job_done``/``on_job_error``/``on_job_cancel``) owed for a row."""

    kind: str  # "done" | "error" | "cancel"
    index: Any
    job_id: str
    row: pd.Series
    attempts: int = 0
    error: str | None = None
    #: The sweep (``run_jobs loop`` count) before which a failed hook is not tried again (backoff).
    not_before: int = 0


@dataclass
class LaneResult:
    """What a backend's work changed, for the engine's loop to persist and report."""

    backend: str
    rows: pd.DataFrame
    changed: set = field(default_factory=set)
    events: list[tuple[Event, Any]] = field(default_factory=list)
    notes: list[tuple[Any, str]] = field(default_factory=list)
    stats: collections.Counter = field(default_factory=collections.Counter)
    problems: dict[Any, str] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)


class BackendWork:
    """Hooks owed, status sweep, cancels, starts and creations for one backend, in its lane."""

    def __init__(self, engine: JobEngine, backend: Backend, active: pd.DataFrame, new: pd.DataFrame, hooks: list):
        self.engine = engine
        self.backend = backend
        self.hooks = hooks
        self.result = LaneResult(backend.name, rows=_stack(active, new))
        self.new_indices = list(new.index)

    def __call__(self) -> LaneResult:
        self._run_hooks()
        new = set(self.new_indices)
        self._track([i for i in self.rows.index if i not in new])
        if self.new_indices:
            self._track(self._create(self.new_indices))
        return self.result

    # -- bookkeeping helpers ----------------------------------------------------------------------
    @property
    def rows(self) -> pd.DataFrame:
        return self.result.rows

    def _status(self, index: Any, status: str) -> None:
        self.rows.at[index, "status"] = status
        self.result.changed.add(index)
        self.result.notes.append((index, status))

    def _fail(self, index: Any, status: str, message: str) -> None:
        set_cell(self.rows, index, MESSAGE_COLUMN, message)
        self.result.problems[index] = message
        self._status(index, status)

    # -- hooks ------------------------------------------------------------------------------------
    def _run_hooks(self) -> None:
        manager = self.engine.manager
        for hook in self.hooks:
            method = {"done": manager.on_job_done, "error": manager.on_job_error}.get(hook.kind, manager.on_job_cancel)
            hook.attempts += 1
            job = self.backend.connection().job(hook.job_id)
            manager._hook_details.details = self.engine._details.get(hook.index)
            try:
                method(job, hook.row)
                hook.error = None
            except Exception as e:
                _log.error(f"on_job_{hook.kind} failed for job {hook.job_id} (attempt {hook.attempts}): {e!r}")
                self.result.stats[f"on_job_{hook.kind} error"] += 1
                hook.error = f"on_job_{hook.kind} failed after {hook.attempts} attempt(s): {e!r}"
            finally:
                manager._hook_details.details = None
            self.result.hooks.append(hook)

    # -- tracking ---------------------------------------------------------------------------------
    def _track(self, indices: list) -> None:
        """Sweep the backend for ``indices``, fold statuses in, cancel overdue jobs, start created ones."""
        if not indices:
            return
        rows = self.rows
        for index in indices:
            if blank(rows.at[index, "id"]) and rows.at[index, "status"] in ACTIVE:
                self._fail(index, "start_failed", f"row is {rows.at[index, 'status']!r} but has no job id")
        ids = {rows.at[i, "id"]: i for i in indices if rows.at[i, "status"] in ACTIVE and not blank(rows.at[i, "id"])}
        if not ids:
            return
        try:
            sweep = self.engine.steps.sweep_statuses(self.backend, list(ids))
        except requests.exceptions.ConnectionError as e:
            self.result.stats["job tracking error"] += 1
            _log.warning(f"Could not reach backend {self.backend.name!r} to track jobs: {e!r}")
            return
        stats = self.result.stats
        stats["track_statuses"] += 1
        stats["job describe"] += sweep.describe_requests
        stats["job listing"] += sweep.listing_requests
        for job_id, report in sweep.reports.items():
            self._apply_report(ids[job_id], report)
        for job_id, error in sweep.errors.items():
            self._tracking_error(ids[job_id], error)
        self._cancel_overdue(list(ids.values()))
        self._start_created(list(ids.values()))

    def _apply_report(self, index: Any, report: JobReport) -> None:
        rows, stats = self.rows, self.result.stats
        previous = rows.at[index, "status"]
        self.engine._reported[index] = report.status
        transition = observe(previous, report.status, start_requested=previous == "queued_for_start")
        _log.info(
            f"Status of job {rows.at[index, 'id']!r} (on backend {self.backend.name}) is "
            f"{report.status!r} (previously {previous!r})"
        )
        for event in transition.events:
            stats[event.value] += 1
            self.result.events.append((event, index))
            if event is Event.STARTED_RUNNING:
                set_cell(rows, index, "running_start_time", rfc3339.now_utc())
        if transition.status == "running" and blank(rows.at[index, "running_start_time"]):
            _log.warning(f"Unknown 'running_start_time' for running job {rows.at[index, 'id']}: using now.")
            set_cell(rows, index, "running_start_time", rfc3339.now_utc())
            self.result.changed.add(index)
        if report.details is not None:
            for key in report.details.get("usage") or {}:
                if key in BOOKKEEPING_COLUMNS:
                    _log.warning(f"Skipping usage field {key!r}: collides with a job db column")
                    continue
                set_cell(rows, index, key, format_usage(report.details, key))
            if report.details.get("costs") is not None:
                set_cell(rows, index, "costs", report.details["costs"])
            self.engine._details[index] = report.details
            if transition.events:
                self.result.changed.add(index)
        if transition.status != previous:
            self._status(index, transition.status)

    def _tracking_error(self, index: Any, error: Exception) -> None:
        self.result.stats["job tracking error"] += 1
        job_id = self.rows.at[index, "id"]
        if isinstance(error, OpenEoApiError) and error.http_status_code == 404:
            _log.warning(f"Job {job_id!r} vanished from backend {self.backend.name!r}: {error}")
            self._fail(index, "error", f"job {job_id} not found on backend {self.backend.name} (404)")
        else:
            _log.warning(f"Error while tracking status of job {job_id!r} on backend {self.backend.name}: {error!r}")

    def _cancel_overdue(self, indices: list) -> None:
        limit = self.engine.manager._cancel_running_job_after
        if limit is None:
            return
        now = rfc3339.parse_datetime(rfc3339.now_utc(), with_timezone=True)
        for index in indices:
            row = self.rows.loc[index]
            if row["status"] != "running":
                continue
            try:
                since = rfc3339.parse_datetime(row["running_start_time"], with_timezone=True)
            except Exception as e:
                _log.error(f"Row {index}: unusable running_start_time {row['running_start_time']!r}: {e}")
                continue
            elapsed = now - since
            if elapsed > limit:
                _log.info(f"Cancelling long-running job {row['id']} (after {elapsed}, running since {since})")
                try:
                    self.engine.steps.cancel_job(self.backend, row["id"])
                    self.result.stats["job cancel"] += 1
                except Exception as e:
                    self.result.stats["job cancel error"] += 1
                    _log.error(f"Failed to cancel job {row['id']!r}: {e!r}")

    def _start_created(self, indices: list) -> None:
        rows, stats, engine = self.rows, self.result.stats, self.engine
        stranded = [
            i
            for i in indices
            if rows.at[i, "status"] == "queued_for_start"
            and engine._reported.get(i) == "created"
            and rows.at[i, "id"] not in engine._start_issued
        ]
        to_start = [i for i in indices if rows.at[i, "status"] == "created"] + stranded
        limit = self.backend.limit()
        if limit is not None and to_start:  # the backend refused more: start only as jobs there end
            started = int(rows["status"].isin(["queued", "running"]).sum())
            to_start = to_start[: max(0, limit - started)]
        if not to_start:
            return
        for index in to_start:
            rows.at[index, "status"] = "queued_for_start"
            stats["job_queued_for_start"] += 1
            self.result.changed.add(index)
        by_id = {rows.at[i, "id"]: i for i in to_start}
        engine._start_issued.update(by_id)
        refused = 0
        for outcome in engine.steps.start_jobs(self.backend, list(by_id)):
            index = by_id[outcome.job_id]
            if outcome.started:
                stats["job start"] += 1
                self._status(index, "queued")
            elif outcome.retry_later:
                stats["job start retry"] += 1
                rows.at[index, "status"] = "created"
                engine._start_issued.discard(outcome.job_id)
                refused += 1
            else:
                stats["start_job error"] += 1
                self._fail(index, "start_failed", outcome.error or "start failed")
        if refused:
            self.backend.refuse_more(int(rows["status"].isin(["queued", "running"]).sum()))

    # -- creating ---------------------------------------------------------------------------------
    def _create(self, indices: list) -> list:
        """Call the user's ``start_job`` for the planned rows; returns the rows that got a job."""
        rows, stats, engine = self.rows, self.result.stats, self.engine
        for index in indices:
            set_cell(rows, index, "backend_name", self.backend.name)
        stats["start_job call"] += len(indices)
        outcomes = engine.steps.create_jobs(
            engine.start_job, rows.loc[indices], self.backend, engine.manager._get_connection
        )
        created = []
        for outcome in outcomes:
            index = outcome.index
            self.result.changed.add(index)
            stats["job launch"] += 1
            if outcome.start_time:
                set_cell(rows, index, "start_time", outcome.start_time)
            if outcome.error:
                stats["start_job error"] += 1
                self._fail(index, "start_failed", outcome.error)
            elif outcome.skipped:
                stats["start_job skipped"] += 1
                self._status(index, "skipped")
            else:
                set_cell(rows, index, "id", outcome.job_id)
                self._status(index, "created")
                created.append(index)
        return created

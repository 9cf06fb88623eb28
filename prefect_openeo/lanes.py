"""Per-backend lanes: each backend's work runs in its own thread, so a backend that is slow or in an outage
(waiting out ``Retry-After``, retrying 5xx) never holds up the others.

Each sweep the engine hands every idle backend a ``BackendWork``: the rows to reconcile (creations a
stopped run may or may not have finished), its active rows and the rows planned for it, with everything
the work needs in a ``LaneConfig``. The work reconciles, sweeps statuses (learning why failed jobs failed),
cancels overdue jobs, starts created ones and creates the planned ones, then returns a ``LaneResult``: the
rows it changed and what happened. Lanes never write the job database; the engine's loop does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import datetime
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import requests
from openeo import BatchJob, Connection
from openeo.rest import OpenEoApiError
from openeo.util import deep_get, rfc3339

from prefect_openeo.backends import Backend, BackendUnavailable, JobReport
from prefect_openeo.frames import blank, set_cell
from prefect_openeo.placement import SlotGate
from prefect_openeo.reasons import failure_reason
from prefect_openeo.states import ACTIVE, TERMINAL, Event, observe
from prefect_openeo.steps import Steps

_log = logging.getLogger("prefect_openeo")

#: Columns the manager owns; usage fields reported by a backend never overwrite them.
BOOKKEEPING_COLUMNS = ("id", "backend_name", "status", "start_time", "running_start_time", "costs")
MESSAGE_COLUMN = "message"
TOKEN_COLUMN = "create_token"
PLANNED_COLUMN = "planned_backend"
RESULTS_COLUMN = "results"


def _epoch(value: Any) -> float | None:
    """An RFC 3339 cell as epoch seconds (None when blank or unreadable)."""
    if blank(value):
        return None
    try:
        return rfc3339.parse_datetime(str(value), with_timezone=True).timestamp()
    except (ValueError, TypeError):
        return None


def format_usage(details: dict, field_name: str) -> str:
    """``"1234.5 cpu-seconds"``, as upstream writes usage columns."""
    value = deep_get(details, "usage", field_name, "value", default=0)
    unit = deep_get(details, "usage", field_name, "unit", default="")
    return f"{value} {unit}".strip()


def stack(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Rows of both frames (their columns may differ, or be all empty in one of them)."""
    if second.empty:
        return first
    if first.empty:
        return second.copy()
    with warnings.catch_warnings():  # pandas' notice about all-NA columns in concat: the result is what we want
        warnings.simplefilter("ignore", FutureWarning)
        return pd.concat([first, second])


class Lane:
    """Runs one piece of work at a time, in a daemon thread with the caller's context (so Prefect tasks
    called there belong to the current flow run)."""

    def __init__(self, name: str):
        self.name = name
        self.future: concurrent.futures.Future | None = None
        #: Rows whose creation the current work may be doing (kept claimed if the run stops meanwhile).
        self.creating: list = []
        #: Whether the current work only checks that the backend is reachable (it has no rows).
        self.checking = False

    def busy(self) -> bool:
        """Working, or done with a result the engine has not applied yet (new work would lose it)."""
        return self.future is not None

    def submit(
        self, fn: Callable[[], Any], runner: Callable[[Callable[[], Any]], Any] | None = None
    ) -> concurrent.futures.Future:
        """Run ``fn`` (through ``runner(fn)`` when given, e.g. as a Prefect task) in the lane's thread."""
        if self.busy():
            raise RuntimeError(f"Lane {self.name!r} is busy")
        self.creating = list(getattr(fn, "creating", []))
        self.checking = bool(getattr(fn, "only_checks", False))
        target = fn if runner is None else (lambda: runner(fn))
        self.future = run_in_thread(target, f"prefect-openeo-{self.name}")
        return self.future


def run_in_thread(fn: Callable[[], Any], name: str) -> concurrent.futures.Future:
    """Run ``fn`` in a new daemon thread with the caller's context; its outcome in a future."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    context = contextvars.copy_context()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(context.run(fn))
            except BaseException as e:  # handed to the engine's loop, which re-raises what must stop the run
                future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


@dataclass(frozen=True)
class LaneConfig:
    """What a backend's work needs from the run, handed over explicitly."""

    steps: Steps
    start_job: Callable[..., BatchJob | None]
    connection_provider: Callable[[str], Connection]
    cancel_after: datetime.timedelta | None
    #: Whether a finished job owes a result download (or a custom ``on_job_done``): ``results`` = pending.
    results_owed: bool
    #: Skip a backend's status sweep while none of its jobs can have ended yet (from durations seen).
    adaptive_sweeps: bool
    #: Called when a job ended in error, with its error log entries (the default saves them as JSON).
    on_error: Callable[[BatchJob, pd.Series, list[dict]], None]
    on_cancel: Callable[[BatchJob, pd.Series], None]
    #: Slots shared beyond this run, taken here (in the backend's thread) just before creating jobs.
    gate: SlotGate = field(default_factory=SlotGate)


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
    #: ``GET /jobs/{id}`` documents of jobs that ended (handed to the downloads: saves a request each).
    details: dict[Any, dict] = field(default_factory=dict)
    #: Rows (planned or unresolved) whose creation this work dealt with, one way or another.
    creations: set = field(default_factory=set)
    #: Why the backend could not be used this time (it is down): the work did nothing.
    unavailable: str | None = None
    #: Planned rows that got no slot of the shared limit (``gate``): not created, to be given back.
    refused: list = field(default_factory=list)
    #: Outcomes of ``start_job`` calls, in order: (row, None) for a job created, (row, outcome) for a failure.
    start_job_calls: list[tuple[Any, Any]] = field(default_factory=list)


class BackendWork:
    """Reconcile, sweep, cancel, start and create for one backend, in its lane."""

    def __init__(
        self,
        config: LaneConfig,
        backend: Backend,
        active: pd.DataFrame,
        new: pd.DataFrame,
        unresolved: pd.DataFrame | None = None,
    ):
        self.config = config
        self.backend = backend
        unresolved = unresolved if unresolved is not None else new.iloc[0:0]
        self.result = LaneResult(backend.name, rows=stack(stack(active, new), unresolved))
        self.active_indices = list(active.index)
        self.new_indices = list(new.index)
        self.unresolved_indices = list(unresolved.index)

    @property
    def creating(self) -> list:
        """Rows whose creation this work may be doing."""
        return self.new_indices + self.unresolved_indices

    @property
    def only_checks(self) -> bool:
        """Whether this work has no rows: it only checks that its backend is reachable."""
        return not (self.active_indices or self.new_indices or self.unresolved_indices)

    def needs_backend(self) -> bool:
        """Whether this work will ask the backend something: reconcile or create rows, or sweep statuses (a sweep
        that can learn nothing yet is skipped). Work that will not only updates rows (or checks a backend that
        could not be reached)."""
        if self.new_indices or self.unresolved_indices:
            return True
        rows = self.rows
        ids = [i for i in self.active_indices if rows.at[i, "status"] in ACTIVE and not blank(rows.at[i, "id"])]
        return bool(ids) and (not self.config.adaptive_sweeps or self._due(ids, time.time()))

    def __call__(self) -> LaneResult:
        try:
            self.backend.ensure_ready()
        except BackendUnavailable as e:
            self.result.unavailable = str(e)
            self.result.stats["backend unavailable"] += 1
            return self.result
        adopted = self._reconcile(self.unresolved_indices)
        self._track(self.active_indices + adopted)
        if self.new_indices:
            granted = self.config.gate.acquire(self.backend.name, self.new_indices)
            self.result.refused = [i for i in self.new_indices if i not in set(granted)]
            if granted:
                self._track(self._create(granted))
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

    # -- reconciling ------------------------------------------------------------------------------
    def _reconcile(self, indices: list) -> list:
        """Rows whose creation was recorded but whose job id was not: adopt the job if the backend's listing
        has one with the row's token, otherwise clear the token so the row can be created. Returns the
        adopted rows. Nothing is decided while the listing cannot be read: the rows keep their slot."""
        if not indices:
            return []
        rows, stats = self.rows, self.result.stats
        tokens = {rows.at[i, TOKEN_COLUMN]: i for i in indices}
        if not self.backend.advertises_listing():
            for index in indices:  # no way to know whether the job exists: never create it a second time
                self.result.creations.add(index)
                self._fail(
                    index,
                    "start_failed",
                    f"a creation on backend {self.backend.name} was interrupted and the backend has no job "
                    f"listing to check whether the job exists (token {rows.at[index, TOKEN_COLUMN]}): check "
                    "its jobs, then reset the row with `prefect-openeo retry`",
                )
            return []
        try:
            found = self.backend.find_created(tokens)
        except Exception as e:
            stats["reconcile error"] += 1
            _log.warning(f"Could not search backend {self.backend.name!r} for interrupted creations: {e!r}")
            return []
        stats["job listing"] += 1
        adopted = []
        for token, index in tokens.items():
            self.result.creations.add(index)
            self.result.changed.add(index)
            entry = found.get(token)
            if entry is None:
                set_cell(rows, index, TOKEN_COLUMN, None)
                set_cell(rows, index, PLANNED_COLUMN, None)
                stats["creation not found"] += 1
                continue
            _log.info(f"Row {index}: adopting job {entry['id']} on {self.backend.name}, created by an interrupted run")
            set_cell(rows, index, "backend_name", self.backend.name)
            set_cell(rows, index, "id", entry["id"])
            set_cell(rows, index, "start_time", entry.get("created") or rfc3339.now_utc())
            self._status(index, "created")
            stats["job adopted"] += 1
            adopted.append(index)
        return adopted

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
        now = time.time()
        if self.config.adaptive_sweeps and not self._due(list(ids.values()), now):
            self.result.stats["sweep skipped"] += 1
            return
        self.backend.note_sweep(now)
        try:
            sweep = self.config.steps.sweep_statuses(self.backend, list(ids))
        except requests.exceptions.ConnectionError as e:
            self.result.stats["job tracking error"] += 1
            _log.warning(f"Could not reach backend {self.backend.name!r} to track jobs: {e!r}")
            return
        stats = self.result.stats
        stats["track_statuses"] += 1
        stats["job describe"] += sweep.describe_requests
        stats["job listing"] += sweep.listing_requests
        stats["job logs"] += sweep.log_requests
        reported = {}
        for job_id, report in sweep.reports.items():
            reported[ids[job_id]] = report.status
            self._apply_report(ids[job_id], report)
        for job_id, error in sweep.errors.items():
            self._tracking_error(ids[job_id], error)
        self._cancel_overdue(list(ids.values()))
        self._start_created(list(ids.values()), reported)

    def _due(self, indices: list, now: float) -> bool:
        """Whether a sweep may learn something: a job to start, or one that may have ended by now."""
        rows = self.rows
        if any(rows.at[i, "status"] in ("created", "queued_for_start") for i in indices):
            return True
        jobs = [(rows.at[i, "id"], _epoch(rows.at[i, "start_time"]), rows.at[i, "status"]) for i in indices]
        return self.backend.sweep_due(jobs, now)

    def _apply_report(self, index: Any, report: JobReport) -> None:
        rows, stats = self.rows, self.result.stats
        previous = rows.at[index, "status"]
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
                if (created := _epoch(rows.at[index, "start_time"])) is not None:
                    self.backend.note_running(time.time() - created)
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
            self.result.details[index] = report.details
            if transition.events:
                self.result.changed.add(index)
        if transition.status == previous:
            return
        if transition.status in TERMINAL and (created := _epoch(rows.at[index, "start_time"])) is not None:
            self.backend.note_end(time.time() - created)
        if transition.status == "finished" and self.config.results_owed:
            set_cell(rows, index, RESULTS_COLUMN, "pending")  # recorded with the status, in the same write
        if transition.status == "error":
            reason = failure_reason(report.error_logs, logs_error=report.logs_error)
            self._fail(index, "error", reason)
            self._call_hook("error", index, report.error_logs or [])
            return
        self._status(index, transition.status)
        if transition.status == "canceled":
            self._call_hook("cancel", index)

    def _call_hook(self, kind: str, index: Any, logs: list[dict] | None = None) -> None:
        """``on_job_error`` / ``on_job_cancel`` for a row that just ended so (before its status is written:
        a crash before then calls it again on rerun)."""
        job = self.backend.connection().job(self.rows.at[index, "id"])
        row = self.rows.loc[index]
        try:
            if kind == "error":
                self.config.on_error(job, row, logs or [])
            else:
                self.config.on_cancel(job, row)
        except Exception as e:
            _log.error(f"on_job_{kind} failed for job {job.job_id}: {e!r}")
            self.result.stats[f"on_job_{kind} error"] += 1

    def _tracking_error(self, index: Any, error: Exception) -> None:
        self.result.stats["job tracking error"] += 1
        job_id = self.rows.at[index, "id"]
        if isinstance(error, OpenEoApiError) and error.http_status_code in (404, 410):
            _log.warning(f"Job {job_id!r} vanished from backend {self.backend.name!r}: {error}")
            self._fail(
                index, "error", f"job {job_id} not found on backend {self.backend.name} ({error.http_status_code})"
            )
        else:
            _log.warning(f"Error while tracking status of job {job_id!r} on backend {self.backend.name}: {error!r}")

    def _cancel_overdue(self, indices: list) -> None:
        limit = self.config.cancel_after
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
                    self.config.steps.cancel_job(self.backend, row["id"])
                    self.result.stats["job cancel"] += 1
                    set_cell(self.rows, index, MESSAGE_COLUMN, f"canceled after running longer than {limit}")
                    self.result.changed.add(index)
                except Exception as e:
                    self.result.stats["job cancel error"] += 1
                    _log.error(f"Failed to cancel job {row['id']!r}: {e!r}")

    def _start_created(self, indices: list, reported: dict[Any, str]) -> None:
        """Start created jobs, and ``queued_for_start`` ones the backend still reports ``created`` (a start
        that a stopped run recorded but may not have sent: sending it again is harmless)."""
        rows, stats = self.rows, self.result.stats
        to_start = [
            i
            for i in indices
            if rows.at[i, "status"] == "created"
            or (rows.at[i, "status"] == "queued_for_start" and reported.get(i) == "created")
        ]
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
        refused = 0
        for outcome in self.config.steps.start_jobs(self.backend, list(by_id)):
            index = by_id[outcome.job_id]
            if outcome.started:
                stats["job start"] += 1
                self._status(index, "queued")
            elif outcome.retry_later:
                stats["job start retry"] += 1
                rows.at[index, "status"] = "created"
                refused += 1
            else:
                stats["start_job error"] += 1
                self._fail(index, "start_failed", outcome.error or "start failed")
        if refused:
            self.backend.refuse_more(int(rows["status"].isin(["queued", "running"]).sum()))

    # -- creating ---------------------------------------------------------------------------------
    def _create(self, indices: list) -> list:
        """Call the user's ``start_job`` for the planned rows; returns the rows that got a job."""
        rows, stats = self.rows, self.result.stats
        for index in indices:
            set_cell(rows, index, "backend_name", self.backend.name)
        stats["start_job call"] += len(indices)
        outcomes = self.config.steps.create_jobs(
            self.config.start_job, rows.loc[indices], self.backend, self.config.connection_provider
        )
        created = []
        for outcome in outcomes:
            index = outcome.index
            self.result.changed.add(index)
            self.result.creations.add(index)
            stats["job launch"] += 1
            if outcome.start_time:
                set_cell(rows, index, "start_time", outcome.start_time)
            self.result.start_job_calls.append((index, outcome if outcome.error else None))
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

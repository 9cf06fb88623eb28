"""Per-backend lanes: each backend's work runs in its own thread, so a backend that is slow or in an outage
(waiting out ``Retry-After``, retrying 5xx) never holds up the others.

Each sweep the engine hands every idle backend a ``BackendWork``: the rows to reconcile (creations a
stopped run may or may not have finished), its active rows and the rows planned for it, with everything
the work needs in a ``LaneConfig``. The work reconciles, sweeps statuses (learning why failed jobs failed),
cancels overdue jobs, starts created ones and creates the planned ones, then returns a ``LaneResult``: the
patches it made (``prefect_openeo.transitions``) and what happened. Lanes never write the job database; the
engine applies their patches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import requests
from openeo import BatchJob, Connection
from openeo.rest import OpenEoApiError
from openeo.util import rfc3339

from prefect_openeo import transitions
from prefect_openeo.backends import Backend, BackendUnavailable, JobReport
from prefect_openeo.frames import blank, stack
from prefect_openeo.placement import SlotGate
from prefect_openeo.reasons import failure_reason
from prefect_openeo.schema import BACKEND, ID, RUNNING_START_TIME, START_TIME, STATUS, TOKEN
from prefect_openeo.states import ACTIVE, TERMINAL, Event
from prefect_openeo.steps import Steps
from prefect_openeo.transitions import Patch

_log = logging.getLogger("prefect_openeo")


def _epoch(value: Any) -> float | None:
    """An RFC 3339 cell as epoch seconds (None when blank or unreadable)."""
    if blank(value):
        return None
    try:
        return rfc3339.parse_datetime(str(value), with_timezone=True).timestamp()
    except (ValueError, TypeError):
        return None


class Lane:
    """Runs one piece of work at a time, in a daemon thread with the caller's context (so Prefect tasks
    called there belong to the current flow run)."""

    def __init__(self, name: str):
        self.name = name
        self.future: concurrent.futures.Future | None = None
        self.work: Any = None
        #: When the current work began (monotonic).
        self.since = 0.0
        #: Whether the current work only checks that the backend is reachable (it has no rows).
        self.checking = False

    @property
    def creating(self) -> list:
        """Rows whose creation the current work may be doing (kept claimed if the run stops meanwhile)."""
        return list(getattr(self.work, "creating", []))

    def busy(self) -> bool:
        """Working, or done with a result the engine has not applied yet (new work would lose it)."""
        return self.future is not None

    def submit(
        self, fn: Callable[[], Any], runner: Callable[[Callable[[], Any]], Any] | None = None
    ) -> concurrent.futures.Future:
        """Run ``fn`` (through ``runner(fn)`` when given, e.g. as a Prefect task) in the lane's thread."""
        if self.busy():
            raise RuntimeError(f"Lane {self.name!r} is busy")
        self.work = fn
        self.since = time.monotonic()
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
    #: Track, then fill: ``refill(backend, patches, rows)`` applies the patches made so far (the engine's
    #: one writer) and returns the rows planned for the backend's slots that are free now, so a slot freed by
    #: what a sweep learnt gets its next job in that same sweep. None: only the rows planned before.
    refill: Callable[[str, list, pd.DataFrame], pd.DataFrame] | None = None
    #: Whether a row's creations lost their answers often enough in this run: not found on reconciling, it is
    #: ``start_failed`` instead of created again.
    creation_given_up: Callable[[Any], bool] = lambda index: False
    #: Counts a start that failed for now and says whether the row's starts failed often enough in this run
    #: (``settings.start_attempts``): then it is ``start_failed`` instead of started again next sweep.
    start_given_up: Callable[[Any], bool] = lambda index: True
    #: The least time between two status sweeps of a backend (the user's ``poll_sleep``).
    min_gap: float = 0.0
    #: Epoch seconds on the clock that times sweeps (``RunClock.now`` of the engine).
    clock: Callable[[], float] = time.time


@dataclass
class LaneResult:
    """What a backend's work of one sweep did, for the engine to apply and report."""

    backend: str
    #: The rows the work was given, as it left them (every patch applied): the rows this run holds.
    rows: pd.DataFrame
    #: The changes it made to rows, in order; the first ``applied`` of them are in the job store already.
    patches: list[Patch] = field(default_factory=list)
    applied: int = 0
    stats: collections.Counter = field(default_factory=collections.Counter)
    #: ``GET /jobs/{id}`` documents of jobs that ended (handed to the downloads: saves a request each).
    details: dict[Any, dict] = field(default_factory=dict)
    #: Why the backend could not be used this time (it is down, or did not answer the sweep).
    unavailable: str | None = None
    #: Planned rows that got no slot of the shared limit (``gate``): not created, to be given back.
    refused: list = field(default_factory=list)
    #: Outcomes of ``start_job`` calls, in order: (row, None) for a job created, (row, outcome) for a failure.
    start_job_calls: list[tuple[Any, Any]] = field(default_factory=list)
    #: When (epoch seconds) a sweep of the backend's active jobs may next learn something (None: no jobs,
    #: or sweeps are not adaptive): the engine wakes then rather than on a fixed grid.
    next_look: float | None = None


@dataclass
class Reconciled:
    """What searching the backends for recorded creations found."""

    patches: list[Patch] = field(default_factory=list)
    adopted: list = field(default_factory=list)
    stats: collections.Counter = field(default_factory=collections.Counter)


def reconcile(
    rows: pd.DataFrame, indices: list, backends: list[Backend], given_up: Callable[[Any], bool] = lambda i: False
) -> Reconciled | None:
    """Rows whose creation token was recorded but whose job id was not: a job with the row's token in one of
    ``backends``' listings is adopted, and where no listing has it the token is cleared so the row can be
    created (or, where ``given_up(row)``, it is ``start_failed``). Where a backend has no job listing, whether
    its job exists cannot be known: the row is ``start_failed`` (never created a second time). None while a
    listing cannot be read: nothing is decided, the rows keep their slot."""
    outcome = Reconciled()
    tokens = {rows.at[i, TOKEN]: i for i in indices}
    blind = [b.name for b in backends if not b.advertises_listing()]
    if blind:
        for index in indices:
            outcome.patches.append(transitions.creation_unknowable(rows.loc[index], index, ", ".join(blind)))
        return outcome
    found: dict[str, tuple[str, dict]] = {}
    for backend in backends:
        try:
            entries = backend.find_created(set(tokens) - set(found))
        except Exception as e:
            _log.warning(f"Could not search backend {backend.name!r} for interrupted creations: {e!r}")
            return None
        outcome.stats["job listing"] += 1
        found.update({token: (backend.name, entry) for token, entry in entries.items()})
    for token, index in tokens.items():
        if token not in found:
            row = rows.loc[index]
            if given_up(index):
                why = f"the backend lost the answer of every creation of this row ({row.get('message')})"
                outcome.patches.append(transitions.create_failed(row, index, backends[0].name, why))
            else:
                outcome.patches.append(transitions.unplanned(row, index))
            outcome.stats["creation not found"] += 1
            continue
        name, entry = found[token]
        _log.info(f"Row {index}: adopting job {entry['id']} on {name}, created by an interrupted run")
        created = entry.get("created") or rfc3339.now_utc()
        outcome.patches.append(transitions.adopted(rows.loc[index], index, name, entry["id"], created))
        outcome.stats["job adopted"] += 1
        outcome.adopted.append(index)
    return outcome


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
        return bool(ids) and (not self.config.adaptive_sweeps or self._due(ids, self.config.clock()))

    def __call__(self) -> LaneResult:
        try:
            self.backend.ensure_ready()
        except BackendUnavailable as e:
            self.result.unavailable = str(e)
            self.result.stats["backend unavailable"] += 1
            return self.result
        adopted = self._reconcile(self.unresolved_indices)
        self._track(self.active_indices + adopted)
        self._refill()
        if self.new_indices:
            granted = self.config.gate.acquire(self.backend.name, self.new_indices)
            self.result.refused = [i for i in self.new_indices if i not in set(granted)]
            if granted:
                self._track(self._create(granted))
        if self.config.adaptive_sweeps:
            rows = self.rows
            active = [i for i in rows.index if rows.at[i, STATUS] in ACTIVE and not blank(rows.at[i, ID])]
            self.result.next_look = self.backend.next_look(self._jobs(active), self.config.min_gap)
        return self.result

    # -- bookkeeping helpers ----------------------------------------------------------------------
    @property
    def rows(self) -> pd.DataFrame:
        return self.result.rows

    def _patch(self, patch: Patch) -> Patch:
        """Record a change of a row (applied to the rows this work holds, and handed to the engine)."""
        transitions.apply_to(self.rows, patch)
        self.result.patches.append(patch)
        for key in patch.refused_usage:
            _log.warning(f"Skipping usage field {key!r} of job {self.rows.at[patch.index, ID]}: a bookkeeping column")
        return patch

    def _refill(self) -> None:
        """Where this sweep ended jobs (or gave up creations), their slots get new rows now (``refill``)."""
        freed = any(p.status in TERMINAL or (TOKEN in p.cells and p.cells[TOKEN] is None) for p in self.result.patches)
        if self.config.refill is None or not freed or self.result.unavailable:
            return
        more = self.config.refill(self.backend.name, self.result.patches, self.rows)
        self.result.applied = len(self.result.patches)
        if more.empty:
            return
        # A row this work holds may be planned again (its creation was not found): the store's row is newer.
        held = self.rows.index.intersection(more.index)
        self.result.rows = stack(self.rows.drop(index=held), more)
        self.new_indices += [i for i in more.index if i not in self.new_indices]
        self.result.stats["slot refilled"] += len(more)

    # -- reconciling ------------------------------------------------------------------------------
    def _reconcile(self, indices: list) -> list:
        """Rows whose creation was recorded but whose job id was not (``reconcile``); returns the adopted rows."""
        if not indices:
            return []
        outcome = reconcile(self.rows, indices, [self.backend], self.config.creation_given_up)
        if outcome is None:
            self.result.stats["reconcile error"] += 1
            return []
        self.result.stats.update(outcome.stats)
        for patch in outcome.patches:
            self._patch(patch)
        return outcome.adopted

    # -- tracking ---------------------------------------------------------------------------------
    def _track(self, indices: list) -> None:
        """Sweep the backend for ``indices``, fold statuses in, cancel overdue jobs, start created ones."""
        if not indices:
            return
        rows = self.rows
        for index in indices:
            if blank(rows.at[index, ID]) and rows.at[index, STATUS] in ACTIVE:
                self._patch(transitions.untrackable(rows.loc[index], index, "job id"))
        ids = {rows.at[i, ID]: i for i in indices if rows.at[i, STATUS] in ACTIVE and not blank(rows.at[i, ID])}
        if not ids:
            return
        now = self.config.clock()
        if self.config.adaptive_sweeps and not self._due(list(ids.values()), now):
            self.result.stats["sweep skipped"] += 1
            return
        self.backend.note_sweep(now)
        try:
            sweep = self.config.steps.sweep_statuses(self.backend, list(ids))
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            self.result.stats["job tracking error"] += 1
            self.result.unavailable = f"Backend {self.backend.name!r}: cannot be reached to track jobs: {e!r}"
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
        if any(rows.at[i, STATUS] in ("created", "queued_for_start") for i in indices):
            return True
        return self.backend.sweep_due(self._jobs(indices), now, self.config.min_gap)

    def _jobs(self, indices: list) -> list[tuple[str, float | None, str]]:
        """(job id, creation time, status) of rows, as the backend's sweep timing wants them."""
        rows = self.rows
        return [(rows.at[i, ID], _epoch(rows.at[i, START_TIME]), rows.at[i, STATUS]) for i in indices]

    def _apply_report(self, index: Any, report: JobReport) -> None:
        rows, stats = self.rows, self.result.stats
        row = rows.loc[index]
        previous = row[STATUS]
        reason = failure_reason(report.error_logs, logs_error=report.logs_error) if report.status == "error" else None
        patch = transitions.observed(
            row,
            index,
            report.status,
            now=rfc3339.now_utc(),
            details=report.details,
            error_reason=reason,
            results_owed=self.config.results_owed,
        )
        _log.info(
            f"Status of job {row[ID]!r} (on backend {self.backend.name}) is {report.status!r} (previously {previous!r})"
        )
        if patch.problem and not patch.cells:  # a status openEO does not define: looked at again next sweep
            stats["unknown status"] += 1
            if self.backend.first_time(f"status {report.status}"):
                _log.warning(
                    f"Backend {self.backend.name!r}: {patch.problem} (job {row[ID]}); its rows keep their "
                    "status and are looked at again each sweep"
                )
            self.result.patches.append(patch)
            return
        if previous == "running" and patch.cells.get(RUNNING_START_TIME) and Event.STARTED_RUNNING not in patch.events:
            _log.warning(f"Unknown 'running_start_time' for running job {row[ID]}: using now.")
        self._patch(patch)
        for event in patch.events:
            stats[event.value] += 1
            if event is Event.STARTED_RUNNING:
                self.backend.note_running(row[ID], self.config.clock())
        if report.details is not None:
            self.result.details[index] = report.details
        if patch.status in TERMINAL:
            self.backend.note_end(row[ID], self.config.clock(), report.details)
        if patch.status == "error":
            self._call_hook("error", index, report.error_logs or [])
        elif patch.status == "canceled":
            self._call_hook("cancel", index)

    def _call_hook(self, kind: str, index: Any, logs: list[dict] | None = None) -> None:
        """``on_job_error`` / ``on_job_cancel`` for a row that just ended so (before its status is written:
        a crash before then calls it again on rerun)."""
        job = self.backend.connection().job(self.rows.at[index, ID])
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
        job_id = self.rows.at[index, ID]
        if isinstance(error, OpenEoApiError) and error.http_status_code in (404, 410):
            _log.warning(f"Job {job_id!r} vanished from backend {self.backend.name!r}: {error}")
            row = self.rows.loc[index]
            self._patch(transitions.vanished(row, index, self.backend.name, error.http_status_code))
        else:
            _log.warning(f"Error while tracking status of job {job_id!r} on backend {self.backend.name}: {error!r}")
            why = f"the backend's answer about job {job_id} could not be used ({error!r:.200}); looked at again"
            self._patch(transitions.unreadable(self.rows.loc[index], index, why))

    def _cancel_overdue(self, indices: list) -> None:
        limit = self.config.cancel_after
        if limit is None:
            return
        now = rfc3339.parse_datetime(rfc3339.now_utc(), with_timezone=True)
        for index in indices:
            row = self.rows.loc[index]
            if row[STATUS] != "running":
                continue
            try:
                since = rfc3339.parse_datetime(row[RUNNING_START_TIME], with_timezone=True)
            except Exception as e:
                _log.error(f"Row {index}: unusable running_start_time {row[RUNNING_START_TIME]!r}: {e}")
                continue
            elapsed = now - since
            if elapsed > limit:
                _log.info(f"Cancelling long-running job {row[ID]} (after {elapsed}, running since {since})")
                try:
                    self.config.steps.cancel_job(self.backend, row[ID])
                    self.result.stats["job cancel"] += 1
                    self._patch(transitions.cancel_sent(row, index, f"canceled after running longer than {limit}"))
                except Exception as e:
                    self.result.stats["job cancel error"] += 1
                    _log.error(f"Failed to cancel job {row[ID]!r}: {e!r}")

    def _start_created(self, indices: list, reported: dict[Any, str]) -> None:
        """Start created jobs, and ``queued_for_start`` ones the backend still reports ``created`` (a start
        that a stopped run recorded but may not have sent: sending it again is harmless)."""
        rows, stats = self.rows, self.result.stats
        to_start = [
            i
            for i in indices
            if rows.at[i, STATUS] == "created"
            or (rows.at[i, STATUS] == "queued_for_start" and reported.get(i) == "created")
        ]
        limit = self.backend.limit()
        if limit is not None and to_start:  # the backend refused more: start only as jobs there end
            started = int(rows[STATUS].isin(["queued", "running"]).sum())
            to_start = to_start[: max(0, limit - started)]
        if not to_start:
            return
        for index in to_start:
            self._patch(transitions.start_requested(rows.loc[index], index))
            stats["job_queued_for_start"] += 1
        by_id = {rows.at[i, ID]: i for i in to_start}
        refused = 0
        for outcome in self.config.steps.start_jobs(self.backend, list(by_id)):
            index = by_id[outcome.job_id]
            row = rows.loc[index]
            if outcome.started:
                stats["job start"] += 1
                self._patch(transitions.started(row, index))
            elif outcome.retry_later:
                stats["job start retry"] += 1
                self._patch(transitions.start_deferred(row, index))
                refused += 1
            elif outcome.transient and not self.config.start_given_up(index):
                stats["job start deferred"] += 1
                self._patch(transitions.start_deferred(row, index, f"{outcome.error}; started again next sweep"))
            else:
                stats["start_job error"] += 1
                self._patch(transitions.start_failed(row, index, outcome.error or "start failed"))
        if refused:
            self.backend.refuse_more(int(rows[STATUS].isin(["queued", "running"]).sum()))

    # -- creating ---------------------------------------------------------------------------------
    def _create(self, indices: list) -> list:
        """Call the user's ``start_job`` for the planned rows; returns the rows that got a job."""
        rows, stats, name = self.rows, self.result.stats, self.backend.name
        stats["start_job call"] += len(indices)
        given = rows.loc[indices].copy()
        given[BACKEND] = name  # as upstream: start_job sees the backend it creates on
        outcomes = self.config.steps.create_jobs(
            self.config.start_job, given, self.backend, self.config.connection_provider
        )
        created = []
        for outcome in outcomes:
            index = outcome.index
            row = rows.loc[index]
            stats["job launch"] += 1
            self.result.start_job_calls.append((index, outcome if outcome.error else None))
            if outcome.error and (outcome.uncertain or outcome.signed_out):
                # The job may exist (created before a later request was refused, or its answer lost): the
                # row keeps its token and is looked for before it is created again (by this run or the next).
                stats["creation uncertain"] += 1
                self._patch(transitions.creation_uncertain(row, index, outcome.error))
            elif outcome.error:
                stats["start_job error"] += 1
                self._patch(transitions.create_failed(row, index, name, outcome.error, outcome.start_time))
            elif outcome.skipped:
                stats["start_job skipped"] += 1
                self._patch(transitions.skipped(row, index, name, outcome.start_time))
            else:
                self._patch(transitions.created(row, index, name, outcome.job_id, outcome.start_time))
                self.backend.note_created(outcome.job_id, self.config.clock())  # the backend has it by now
                created.append(index)
        return created

"""The manager loop: plan, dispatch each backend's work to its lane, persist what changed, sleep.

One engine, run two ways. ``Steps`` carries the lifecycle actions: plain functions outside a flow run,
Prefect tasks inside one (see ``prefect_openeo.tasks``). The engine itself never imports Prefect.

Each sweep, in the calling thread: decide which ``not_started`` rows go to which backend (row order,
backends in registration order, up to their free slots, honouring pinned rows), record a creation token
for each, then hand every backend its rows and owed hooks in its own lane (``prefect_openeo.lanes``),
wait for the lanes (a bounded time: a backend in an outage keeps retrying in its lane while the others go
on), and write back only the rows that changed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from openeo import BatchJob
from openeo.extra.job_management import JobDatabaseInterface
from openeo.util import rfc3339

from prefect_openeo import steps as plain_steps
from prefect_openeo.backends import TOKEN_PREFIX
from prefect_openeo.lanes import MESSAGE_COLUMN, BackendWork, Hook, Lane, LaneResult, blank, set_cell
from prefect_openeo.states import ACTIVE, TERMINAL, Event

if TYPE_CHECKING:
    from prefect_openeo.manager import MultiBackendJobManager

_log = logging.getLogger("prefect_openeo")

#: Statuses that keep ``run_jobs`` going (upstream's set).
WORK_STATUSES = ["not_started", "created", "queued_for_start", "queued", "running"]
#: How often a failing ``on_job_done``/``on_job_error`` hook (e.g. a result download) is tried in all.
HOOK_ATTEMPTS = 3
#: The creation token of a row's job (also at the end of the job's title), recorded before creating it.
TOKEN_COLUMN = plain_steps.TOKEN_COLUMN
RETRY_COUNT_COLUMN = "retry_count"
RETRY_AFTER_COLUMN = "retry_after"
#: Longest a sweep waits for a backend's lane before going on without it (seconds).
LANE_WAIT = 10.0

__all__ = ["JobEngine", "Observer", "SlotGate", "Steps", "set_cell", "MESSAGE_COLUMN", "TOKEN_COLUMN"]


@dataclass
class Steps:
    """The lifecycle actions the engine calls; swapped for Prefect tasks inside a flow run."""

    create_jobs: Callable = plain_steps.create_jobs
    sweep_statuses: Callable = plain_steps.sweep_statuses
    start_jobs: Callable = plain_steps.start_jobs
    cancel_job: Callable = plain_steps.cancel_job
    download_results: Callable = plain_steps.download_results
    fetch_error_logs: Callable = plain_steps.fetch_error_logs


class SlotGate:
    """Slots shared beyond this run (e.g. Prefect global concurrency limits). The default grants all."""

    def acquire(self, backend: str, indices: list) -> list:
        """The rows among ``indices`` (in order) that may be created on ``backend`` now."""
        return indices

    def release(self, index: Any) -> None:  # noqa: B027
        """Row ``index`` ended (or was not created): give its slot back."""

    def renew(self) -> None:  # noqa: B027
        """Called once per sweep: keep the slots of active jobs."""

    def close(self) -> None:  # noqa: B027
        """The run ends: give every slot back."""


class Observer:
    """Receives what happens during a run (artifacts, events, UI states). The default does nothing."""

    def row_status(self, index: Any, row: pd.Series, status: str) -> None:  # noqa: B027
        pass

    def sweep_done(self, job_db: JobDatabaseInterface, stats: dict) -> None:  # noqa: B027
        pass

    def run_done(self, job_db: JobDatabaseInterface, stats: dict, problems: dict) -> None:
        """Say which rows need attention (e.g. finished without results), and why."""
        for index, message in list(problems.items())[:50]:
            _log.warning(f"Row {index} needs attention: {message}")
        if len(problems) > 50:
            _log.warning(f"... and {len(problems) - 50} more rows need attention (see the 'message' column)")


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
    lane_wait: float = LANE_WAIT
    gate: SlotGate = field(default_factory=SlotGate)

    def __post_init__(self) -> None:
        #: Hooks owed per backend, handed to its lane with its next work.
        self._hooks: dict[str, list[Hook]] = collections.defaultdict(list)
        #: Rows whose last problem is still unresolved, with a message (for the summary).
        self._problems: dict[Any, str] = {}
        #: ``GET /jobs/{id}`` documents fetched when jobs ended, handed to the hooks (saves a request).
        self._details: dict[Any, dict] = {}
        #: Jobs this process asked to start: a ``queued_for_start`` row whose job is still ``created`` and
        #: not in here was stranded by a crash between recording and sending the start, so it is sent again.
        self._start_issued: set[str] = set()
        #: The status each backend last reported per row.
        self._reported: dict[Any, str] = {}
        self._lanes = {name: Lane(name) for name in self.manager.backends}
        #: A database shared by several workers (``SqlJobDatabase``): rows are claimed, with leases.
        self._shared = all(hasattr(self.job_db, m) for m in ("claim_new", "claim_active", "stale_creations"))

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
                self.gate.renew()
                self._sleep()
        finally:
            self.gate.close()
            if self._shared and not any(lane.busy() for lane in self._lanes.values()):
                self.job_db.release()
            self.observer.run_done(self.job_db, self.stats, dict(self._problems))
        return self.stats

    def has_work(self) -> bool:
        return (
            sum(self.job_db.count_by_status(statuses=WORK_STATUSES).values()) > 0
            or any(self._hooks.values())
            or any(lane.busy() for lane in self._lanes.values())
        )

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
        """One sweep: collect finished lanes, plan, dispatch every idle backend's work, collect, retry."""
        self._collect()
        rows = self.job_db.claim_active() if self._shared else self.job_db.get_by_status(statuses=list(ACTIVE))
        active = self._orphans(rows)
        plan = self._plan(active)
        submitted = []
        for name, backend in self.manager.backends.items():
            lane = self._lanes[name]
            if lane.busy():
                self.stats["lane busy"] += 1
                continue
            mine = active[active["backend_name"] == name].copy()
            new = plan.get(name, mine.iloc[0:0])
            sweep = self.stats["run_jobs loop"]
            hooks = [h for h in self._hooks[name] if h.not_before <= sweep]
            self._hooks[name] = [h for h in self._hooks[name] if h.not_before > sweep]
            if mine.empty and new.empty and not hooks:
                continue
            submitted.append(lane.submit(BackendWork(self, backend, mine, new, hooks)))
        if submitted:
            concurrent.futures.wait(submitted, timeout=self.lane_wait)
        self._collect()
        self._schedule_retries()

    def _orphans(self, active: pd.DataFrame) -> pd.DataFrame:
        """Active rows with no backend cannot be tracked: mark them (the run would never end otherwise)."""
        lost = active["backend_name"].map(blank)
        if not lost.any():
            return active
        rows = active[lost].copy()
        for index in rows.index:
            message = f"row is {rows.at[index, 'status']!r} but has no backend_name"
            rows.at[index, "status"] = "start_failed"
            set_cell(rows, index, MESSAGE_COLUMN, message)
            self._problems[index] = message
            self.observer.row_status(index, rows.loc[index], "start_failed")
        self._persist(rows, set(rows.index))
        return active[~lost]

    # -- lanes ------------------------------------------------------------------------------------
    def _collect(self) -> None:
        """Apply the results of finished lanes: persist, report, queue hooks; re-raise what must stop."""
        errors = []
        for lane in self._lanes.values():
            future = lane.future
            if future is None or not future.done():
                continue
            lane.future = None
            try:
                result: LaneResult = future.result()
            except Exception as e:
                errors.append(e)
                continue
            self._apply(result)
        if errors:
            raise errors[0]

    def _apply(self, result: LaneResult) -> None:
        for key, value in result.stats.items():
            self.stats[key] += value
        self._persist(result.rows, result.changed)
        self._problems.update(result.problems)
        for index, status in result.notes:
            self.observer.row_status(index, result.rows.loc[index], status)
            if status in TERMINAL:
                self.gate.release(index)
        kinds = {Event.FINISHED: "done", Event.FAILED: "error", Event.CANCELED: "cancel"}
        for event, index in result.events:
            if event in kinds:
                row = result.rows.loc[index]
                self._hooks[result.backend].append(Hook(kinds[event], index, row["id"], row))
        for hook in result.hooks:
            if hook.error is None:
                self._problems.pop(hook.index, None)
            elif hook.attempts < HOOK_ATTEMPTS:
                self._problems[hook.index] = hook.error
                # Back off: after the n-th failed attempt, wait 2**n - 1 sweeps (1, 3, ...) before the next.
                hook.not_before = self.stats["run_jobs loop"] + 2**hook.attempts - 1
                self._hooks[result.backend].append(hook)
            else:
                self._problems[hook.index] = hook.error
                self._record_message(hook.index, hook.error)

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, active: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Which ``not_started`` rows each idle backend creates now; their creation tokens are recorded."""
        idle = {name: not self._lanes[name].busy() for name in self.manager.backends}
        if self._shared:  # the database picks and claims rows, counting every worker's active jobs
            budgets = {name: b.slots() if idle[name] else 0 for name, b in self.manager.backends.items()}
            planned = self.job_db.claim_new(budgets, list(self.manager.backends))
            if planned.empty:
                return {}
            by_backend = planned.pop("planned_backend")
            claimed = {name: list(planned.index[by_backend == name]) for name in self.manager.backends}
            plan = {name: self.gate.acquire(name, rows) for name, rows in claimed.items() if rows}
            refused = [i for name, rows in claimed.items() for i in rows if i not in set(plan.get(name, []))]
            if refused:
                self.job_db.unclaim(refused)
            return {name: planned.loc[rows] for name, rows in plan.items() if rows}
        counts = active.groupby("backend_name").size().to_dict()
        free = {
            name: (b.slots() - counts.get(name, 0) if idle[name] else 0) for name, b in self.manager.backends.items()
        }
        total_free = sum(max(0, f) for f in free.values())
        if total_free <= 0:
            return {}
        candidates = self.job_db.get_by_status(statuses=["not_started"], max=max(200, 4 * total_free))
        plan = assign_rows(candidates, free, list(self.manager.backends))
        plan = {name: granted for name, rows in plan.items() if (granted := self.gate.acquire(name, rows))}
        if not plan:
            return {}
        planned = candidates.loc[[i for name in self.manager.backends for i in plan.get(name, [])]].copy()
        # Record the intent, with a token that goes into the job's title, before asking the backend:
        # after a crash, a rerun finds the job by its token instead of creating it again.
        for index in planned.index:
            set_cell(planned, index, TOKEN_COLUMN, f"{TOKEN_PREFIX}{uuid.uuid4().hex[:12]}")
        self._persist(planned, set(planned.index))
        return {name: planned.loc[indices] for name, indices in plan.items()}

    # -- after a crash or restart -----------------------------------------------------------------
    def _reconcile_creations(self) -> None:
        """Rows whose creation was under way when a run stopped: adopt the job if the backend has it."""
        if self._shared:
            pending = self.job_db.stale_creations()
        else:
            pending = self.job_db.get_by_status(statuses=["not_started"])
        if pending.empty or TOKEN_COLUMN not in pending.columns:
            return
        pending = pending[~pending[TOKEN_COLUMN].map(blank)].copy()
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

    def _queue_missing_downloads(self) -> None:
        """Finished rows of an earlier run whose results are not on disk get their download again."""
        if not self.manager._download_results:
            return
        from prefect_openeo.downloads import results_present

        finished = self.job_db.get_by_status(statuses=["finished"])
        for index, row in finished.iterrows():
            if blank(row.get("id")) or row.get("backend_name") not in self.manager.backends:
                continue
            if not results_present(self.manager.get_job_dir(row["id"]), row["id"]):
                self._hooks[row["backend_name"]].append(Hook("done", index, row["id"], row))

    def _schedule_retries(self) -> None:
        """Optionally give ``error``/``start_failed`` rows another go, after a backoff, up to a maximum."""
        limit = self.manager._retry_failed_jobs
        if not limit:
            return
        changed = set()
        rows = self.job_db.get_by_status(statuses=["error", "start_failed"]).copy()
        owed = {hook.index for hooks in self._hooks.values() for hook in hooks}
        for index, row in rows.iterrows():
            count = 0 if blank(row.get(RETRY_COUNT_COLUMN)) else int(row[RETRY_COUNT_COLUMN])
            if count >= limit or index in owed:  # let on_job_error see the failed attempt first
                continue
            delay = self.manager._retry_backoff * (2**count)
            after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delay)
            job = "" if blank(row["id"]) else f" (job {row['id']})"
            set_cell(rows, index, RETRY_COUNT_COLUMN, count + 1)
            set_cell(rows, index, RETRY_AFTER_COLUMN, rfc3339.datetime(after))
            set_cell(
                rows,
                index,
                MESSAGE_COLUMN,
                f"attempt {count + 1} ended {row['status']}{job}; retry {count + 1}/{limit} after {delay:g} s",
            )
            for column in ("id", TOKEN_COLUMN, "start_time", "running_start_time"):
                if column in rows.columns:
                    set_cell(rows, index, column, None)
            rows.at[index, "status"] = "not_started"
            self.stats["job retry scheduled"] += 1
            changed.add(index)
        self._persist(rows, changed)

    # -- persistence ------------------------------------------------------------------------------
    def _record_message(self, index: Any, message: str) -> None:
        rows = self.job_db.get_by_indices([index]).copy()
        if index in rows.index:
            set_cell(rows, index, MESSAGE_COLUMN, message)
            self._persist(rows, {index})

    def _persist(self, rows: pd.DataFrame, changed: set) -> None:
        """Write the changed rows (only those) to the job database, once."""
        if not changed:
            return
        self.job_db.persist(rows.loc[[i for i in rows.index if i in changed]])
        self.stats["job_db persist"] += 1

    def _check_backend_names(self) -> None:
        """Rows that name a backend that is not registered get a clear error before anything starts."""
        if hasattr(self.job_db, "unknown_backends"):
            rows = self.job_db.unknown_backends(WORK_STATUSES, list(self.manager.backends))
        else:
            rows = self.job_db.get_by_status(statuses=WORK_STATUSES)
        if rows.empty or "backend_name" not in rows.columns:
            return
        names = rows["backend_name"]
        unknown = rows[~names.map(blank) & ~names.isin(list(self.manager.backends))]
        if not unknown.empty:
            first = unknown.index[0]
            raise ValueError(
                f"Job database row {first} (status {unknown.at[first, 'status']!r}) names backend "
                f"{unknown.at[first, 'backend_name']!r}, which is not registered "
                f"(registered: {', '.join(self.manager.backends)}); {len(unknown)} row(s) in all"
            )


def assign_rows(candidates: pd.DataFrame, free: dict[str, int], order: list[str]) -> dict[str, list]:
    """Rows (in order) to backends with free slots: a row's preset ``backend_name`` pins it; others go
    to the first backend in ``order`` with room. Rows waiting for a retry (``retry_after``) are skipped."""
    free = dict(free)
    plan: dict[str, list] = collections.defaultdict(list)
    if candidates.empty or sum(max(0, f) for f in free.values()) <= 0:
        return plan
    now = rfc3339.now_utc()
    for index, row in candidates.iterrows():
        if not blank(row.get(RETRY_AFTER_COLUMN)) and str(row[RETRY_AFTER_COLUMN]) > now:
            continue
        pinned = row.get("backend_name")
        names = [pinned] if not blank(pinned) else order
        target = next((n for n in names if free.get(n, 0) > 0), None)
        if target is not None:
            plan[target].append(index)
            free[target] -= 1
            if sum(max(0, f) for f in free.values()) <= 0:
                break
    return plan


def cancel_after(seconds: float | None) -> datetime.timedelta | None:
    return datetime.timedelta(seconds=seconds) if seconds is not None else None

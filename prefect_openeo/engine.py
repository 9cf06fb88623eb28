"""The manager loop: claim rows, dispatch each backend's work to its lane, persist what changed, sleep.

One engine, run two ways. ``Steps`` carries the lifecycle actions: plain functions outside a flow run,
Prefect tasks inside one (see ``prefect_openeo.tasks``). The engine itself never imports Prefect.

The job database is the single record of every row's progress; the engine keeps in memory only what
concerns its own work under way. Each sweep, in the calling thread:

1. apply what finished lanes and downloads returned (one write of the changed rows);
2. claim the rows to work on: active rows (to track), unresolved creations (rows whose creation token
   was recorded but whose job id was not: a stopped run, or a worker that died), and new rows for the free
   slots of each backend (their token and planned backend recorded before any job is created);
3. hand every idle backend its rows in its own lane (``prefect_openeo.lanes``) and wait for the lanes a
   bounded time: a backend in an outage keeps retrying in its lane while the others go on;
4. start the result downloads that are owed (``results = pending``), off the sweep's critical path.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from openeo import BatchJob, Connection
from openeo.extra.job_management import JobDatabaseInterface
from openeo.rest import OpenEoApiError
from openeo.util import rfc3339

from prefect_openeo.backends import Backend, BackendUnavailable
from prefect_openeo.frames import blank, set_cell
from prefect_openeo.jobdb.local import LocalRows
from prefect_openeo.lanes import (
    MESSAGE_COLUMN,
    PLANNED_COLUMN,
    RESULTS_COLUMN,
    TOKEN_COLUMN,
    BackendWork,
    Lane,
    LaneConfig,
    LaneResult,
    run_in_thread,
)
from prefect_openeo.placement import SlotGate, assign_rows
from prefect_openeo.states import TERMINAL
from prefect_openeo.steps import Steps

_log = logging.getLogger("prefect_openeo")

#: Statuses that keep ``run_jobs`` going (upstream's set).
WORK_STATUSES = ["not_started", "created", "queued_for_start", "queued", "running"]
#: How often a failing result download (``on_job_done``) is tried in one run.
DOWNLOAD_ATTEMPTS = 3
#: Result downloads running at once.
DOWNLOAD_WORKERS = 4
RETRY_COUNT_COLUMN = "retry_count"
RETRY_AFTER_COLUMN = "retry_after"
#: Longest the start of a run waits for its backend checks (a slow one goes on in its lane; seconds).
CHECK_WAIT = 10.0
#: Longest a sweep waits for a backend's lane before going on without it (seconds).
LANE_WAIT = 10.0
#: A cap on new rows that does not limit anything (the budget does).
NO_CAP = 1_000_000
#: After this many identical ``start_job`` failures in a row, the run stops creating jobs and fails.
IDENTICAL_FAILURES_STOP = 5


class BackendsGaveOut(RuntimeError):
    """The run ended with rows left that only backends it gave up on (unreachable for too long) could do."""


class StartJobFailing(RuntimeError):
    """``start_job`` failed the same way for several rows in a row: most likely a bug or a wrong parameter in
    it (a band the collection lacks, say), which every further row would repeat."""


__all__ = [
    "JobEngine",
    "Observer",
    "RunSettings",
    "SlotGate",
    "Steps",
    "assign_rows",
    "set_cell",
    "MESSAGE_COLUMN",
    "TOKEN_COLUMN",
]


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


def _no_results(job: BatchJob, row: pd.Series, details: dict | None) -> None:
    return None


def _no_error_hook(job: BatchJob, row: pd.Series, logs: list[dict]) -> None:
    return None


def _no_cancel_hook(job: BatchJob, row: pd.Series) -> None:
    return None


@dataclass(frozen=True)
class RunSettings:
    """What a run needs from the manager, handed over explicitly."""

    backends: Mapping[str, Backend]
    poll_sleep: float = 60.0
    cancel_after: datetime.timedelta | None = None
    retry_failed_jobs: int = 0
    retry_backoff: float = 60.0
    #: Whether finished jobs owe a result download (or a custom ``on_job_done``).
    results_owed: bool = True
    #: Fetch a finished job's results (``on_job_done``): ``(job, row, GET /jobs/{id} document or None)``.
    on_done: Callable[[BatchJob, pd.Series, dict | None], Any] = _no_results
    on_error: Callable[[BatchJob, pd.Series, list[dict]], None] = _no_error_hook
    on_cancel: Callable[[BatchJob, pd.Series], None] = _no_cancel_hook
    connection_provider: Callable[[str], Connection] | None = None
    #: Stop after this many identical ``start_job`` failures in a row (None: never).
    identical_failures_stop: int | None = IDENTICAL_FAILURES_STOP
    #: Give up on a backend that stays unreachable this long (seconds; None: wait for it, as for an outage).
    #: The run then ends when the other backends have nothing left, with ``BackendsGaveOut`` if rows remain.
    give_up_after: float | None = None


@dataclass
class _Download:
    """A result download owed for a row, and how it went so far in this run."""

    attempts: int = 0
    #: The sweep (``run_jobs loop`` count) before which it is not tried again (backoff).
    not_before: int = 0


@dataclass
class JobEngine:
    """Runs the jobs of one job database to completion (or until stopped)."""

    settings: RunSettings
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
    download_workers: int = DOWNLOAD_WORKERS

    def __post_init__(self) -> None:
        self.backends = dict(self.settings.backends)
        #: The row claims: the SQL job database's own (shared by workers), or a local stand-in.
        self.rows = self.job_db if getattr(self.job_db, "shared", False) else LocalRows(self.job_db)
        self._lanes = {name: Lane(name) for name in self.backends}
        self._lane_config = LaneConfig(
            steps=self.steps,
            start_job=self.start_job,
            connection_provider=self.settings.connection_provider or (lambda name: self.backends[name].connection()),
            cancel_after=self.settings.cancel_after,
            results_owed=self.settings.results_owed,
            adaptive_sweeps=self.settings.cancel_after is None,
            on_error=self.settings.on_error,
            on_cancel=self.settings.on_cancel,
            gate=self.gate,
        )
        #: Budgets per backend (``parallel_jobs``; for a shared database, the one recorded in it).
        self._budgets = {name: backend.parallel_jobs for name, backend in self.backends.items()}
        #: Backends that could not be reached, with why (their lanes keep trying).
        self._down: dict[str, str] = {}
        self._down_since: dict[str, float] = {}
        #: Backends unreachable for longer than ``give_up_after``: no more work goes to them in this run.
        self._given_up: set[str] = set()
        #: Rows whose last problem is still unresolved, with a message (for the run's summary).
        self._problems: dict[Any, str] = {}
        #: ``GET /jobs/{id}`` documents of jobs that ended, handed to their downloads (saves a request).
        self._details: dict[Any, dict] = {}
        #: Downloads running (row -> future) and those owed in this run (attempts and backoff).
        self._downloading: dict[Any, concurrent.futures.Future] = {}
        self._downloads: dict[Any, _Download] = {}
        self._download_ended = threading.Event()
        #: ``start_job`` failures in a row that are the same failure, and the failures already logged in full.
        self._same_failures: list[tuple[Any, Any]] = []
        self._logged_failures: set[str] = set()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        if not self.backends:
            raise RuntimeError("No backends registered")
        self._check_backend_names()
        self._check_backends()
        try:
            self._budgets = self.rows.prepare_run(self._budgets)
            elsewhere = self.rows.pending_downloads() - self.rows.pending_downloads(list(self.backends))
            if elsewhere:
                _log.warning(
                    f"{elsewhere} finished row(s) owe result downloads from backends not registered in this run: "
                    "they stay pending (register their backends to download them)"
                )
            self._reconcile_unplanned()
            while not self.should_stop() and self.has_work():
                self.iteration()
                self._stop_if_start_job_keeps_failing()
                self.stats["run_jobs loop"] += 1
                _log.info(f"Job status histogram: {self.job_db.count_by_status()}. Run stats: {dict(self.stats)}")
                self.observer.sweep_done(self.job_db, self.stats)
                self.gate.renew()
                self._sleep()
        finally:
            self.gate.close()
            self._release()
            self.observer.run_done(self.job_db, self.stats, dict(self._problems))
        if self._given_up and not self.should_stop():
            left = self._work_by_backend()
            raise BackendsGaveOut(
                f"Gave up on backend(s) {', '.join(sorted(self._given_up))}: unreachable for more than "
                f"{self.settings.give_up_after:g} s; {sum(left.values())} row(s) are left for them (pinned or with "
                "their jobs there): run again once they are back"
            )
        return self.stats

    def _release(self) -> None:
        """At the end of a run: apply what is done, give up every claim but those of work still under way
        (a creation or download a stopped run's threads may yet finish), so no one waits for leases."""
        try:
            self._collect()
        except Exception as e:  # already raised once by the loop, or a lane that failed as the run stopped
            _log.debug(f"Ignoring an error of work that ended with the run: {e!r}")
        keep = [i for lane in self._lanes.values() if lane.busy() for i in lane.creating] + list(self._downloading)
        self.rows.release(keep)

    def has_work(self) -> bool:
        if self._busy():
            return True
        usable = [name for name in self.backends if name not in self._given_up]
        if not usable:
            return False
        if self.rows.pending_downloads(usable) > 0:
            return True
        if not self._given_up:
            return self.rows.work_left(WORK_STATUSES, usable) > 0
        left = self._work_by_backend()
        return any(name not in self._given_up for name in left)

    def _work_by_backend(self) -> dict[str, int]:
        """Rows still to work on, by the backend they are tied to ("" for rows any backend may take)."""
        rows = self.job_db.get_by_status(statuses=WORK_STATUSES)
        names = rows["backend_name"].map(lambda v: "" if blank(v) else v)
        return names.value_counts().to_dict()

    def _busy(self) -> bool:
        """Work under way that the run must wait for (a lane only checking whether its backend is back is not)."""
        return any(lane.busy() and not lane.checking for lane in self._lanes.values()) or bool(self._downloading)

    def _sleep(self) -> None:
        """Sleep ``poll_sleep`` through ``time.sleep`` looked up now, so patches and time machines apply.

        While downloads run, the first part of the sleep is spent waiting for them instead: each one that
        ends is recorded at once and the next owed download starts, so results never wait for a sweep.
        Then one ``time.sleep`` call for the rest, as upstream's ``run_jobs``; a stoppable run
        (``start_job_thread``) sleeps in steps of at most a second so that ``stop_job_thread`` is answered
        quickly, as upstream's thread.
        """
        remaining = float(self.settings.poll_sleep)
        while self._downloading and remaining > 0 and not self.should_stop():
            began = time.monotonic()
            self._download_ended.wait(min(remaining, 1.0))
            self._download_ended.clear()
            self._collect_downloads()
            self._start_downloads()
            remaining -= time.monotonic() - began
        if remaining <= 0:
            pass
        elif self.stoppable:
            while remaining > 0 and not self.should_stop():
                step = min(1.0, remaining)
                time.sleep(step)
                remaining -= step
        else:
            time.sleep(remaining)
        self.stats["sleep"] += 1

    def iteration(self) -> None:
        """One sweep: apply finished work, claim rows, dispatch every idle backend's work, start downloads."""
        self._collect()
        known = list(self.backends)
        active = self._orphans(self.rows.claim_active(known))
        unresolved = self.rows.claim_unresolved(known)
        if not unresolved.empty and (PLANNED_COLUMN not in unresolved or unresolved[PLANNED_COLUMN].map(blank).any()):
            self._reconcile_unplanned()
        plan = self._plan()
        submitted = []
        for name, backend in self.backends.items():
            lane = self._lanes[name]
            if name in self._given_up:
                continue
            if lane.busy():
                self.stats["lane busy"] += 1
                continue
            mine = active[active["backend_name"] == name]
            pending = unresolved[unresolved[PLANNED_COLUMN] == name] if PLANNED_COLUMN in unresolved else None
            new = plan.get(name, mine.iloc[0:0])
            if mine.empty and new.empty and (pending is None or pending.empty):
                if name not in self._down or not self.job_db.count_by_status(statuses=["not_started"]):
                    continue  # nothing to do; a backend that is down is tried again while rows wait
            work = BackendWork(self._lane_config, backend, mine.copy(), new, pending)
            submitted.append(lane.submit(work, self.steps.run_lane))
        if submitted:
            concurrent.futures.wait(submitted, timeout=self.lane_wait)
        self._collect()
        self._schedule_retries()
        self._start_downloads()

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

    # -- applying what lanes and downloads did ------------------------------------------------------
    def _collect(self) -> None:
        """Apply the results of finished lanes and downloads; re-raise what must stop the run."""
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
        self._collect_downloads()
        if errors:
            raise errors[0]

    def _collect_downloads(self) -> None:
        """Record the outcome of every download that ended (one write for all of them)."""
        ended = [(index, future) for index, future in self._downloading.items() if future.done()]
        if not ended:
            return
        for index, _ in ended:
            del self._downloading[index]
        rows = self.job_db.get_by_indices([index for index, _ in ended]).copy()
        changed = {index for index, future in ended if index in rows.index and self._download_done(rows, index, future)}
        self._persist(rows, changed)

    def _apply(self, result: LaneResult) -> None:
        for key, value in result.stats.items():
            self.stats[key] += value
        self._note_availability(result.backend, result.unavailable)
        self._persist(result.rows, result.changed)
        self._problems.update(result.problems)
        if result.refused:  # no slot in the shared limit now: the rows wait for a later sweep
            self.rows.unclaim(result.refused)
        self._note_start_job_calls(result.start_job_calls)
        for index, status in result.notes:
            self.observer.row_status(index, result.rows.loc[index], status)
            if status in TERMINAL:
                self.gate.release(index)
            if status == "finished" and self.settings.results_owed and index in result.details:
                self._details[index] = result.details[index]

    def _note_availability(self, name: str, unavailable: str | None) -> None:
        now = time.monotonic()
        if unavailable and name not in self._down:
            _log.warning(f"{unavailable}; its jobs wait while the other backends go on (trying again each sweep)")
            self._down_since[name] = now
        elif not unavailable and name in self._down:
            _log.warning(f"Backend {name!r} is reachable again")
        if unavailable:
            self._down[name] = unavailable
            limit = self.settings.give_up_after
            if limit is not None and now - self._down_since[name] > limit and name not in self._given_up:
                _log.error(f"Giving up on backend {name!r} for this run: unreachable for more than {limit:g} s")
                self._given_up.add(name)
                self.stats["backend given up"] += 1
        else:
            self._down.pop(name, None)

    def _note_start_job_calls(self, calls: list[tuple[Any, Any]]) -> None:
        """Log each distinct ``start_job`` failure once in full (later ones in a line), and count identical
        failures in a row."""
        for index, outcome in calls:
            if outcome is None:
                self._same_failures.clear()
                continue
            signature = outcome.signature or outcome.error
            if signature in self._logged_failures:
                _log.warning(f"Row {index}: {outcome.error} (the same failure as before)")
            else:
                self._logged_failures.add(signature)
                _log.warning(f"Row {index}: {outcome.error}\n{outcome.traceback or ''}".rstrip())
            if (
                self._same_failures
                and (self._same_failures[0][1].signature or self._same_failures[0][1].error) != signature
            ):
                self._same_failures.clear()
            self._same_failures.append((index, outcome))

    def _stop_if_start_job_keeps_failing(self) -> None:
        """Identical ``start_job`` failures in a row: stop, with one clear error showing the first traceback;
        the rows it failed on go back to ``not_started`` (the fix of ``start_job`` is all a rerun needs)."""
        limit = self.settings.identical_failures_stop
        if not limit or len(self._same_failures) < limit:
            return
        failures = list(self._same_failures)
        rows = self.job_db.get_by_indices([index for index, _ in failures]).copy()
        for index in rows.index:
            rows.at[index, "status"] = "not_started"
            for column in (MESSAGE_COLUMN, "start_time"):
                if column in rows.columns:
                    set_cell(rows, index, column, None)
            self._problems.pop(index, None)
        self._persist(rows, set(rows.index))
        first_index, first = failures[0]
        raise StartJobFailing(
            f"start_job failed the same way for {len(failures)} rows in a row ({first.error}); stopped creating "
            f"jobs. Those rows are not_started again: fix start_job and run again. "
            f"The first failure (row {first_index}):\n{first.traceback or first.error}"
        )

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self) -> dict[str, pd.DataFrame]:
        """Which ``not_started`` rows each idle backend creates now (their tokens and planned backend are
        recorded, with this worker's claim, before any job is created).

        The job database applies the budgets; this worker only caps them: no new rows for a busy or
        unreachable backend's lane, and fewer for a backend that refuses more jobs (``ConcurrentJobLimit``).
        """
        caps = {}
        for name, backend in self.backends.items():
            limit = backend.limit()
            caps[name] = 0 if self._lanes[name].busy() or name in self._down else (NO_CAP if limit is None else limit)
        if not any(caps.values()):
            return {}
        planned = self.rows.claim_new(caps, list(self.backends))
        if planned.empty:
            return {}
        by_backend = planned[PLANNED_COLUMN]
        return {name: planned[by_backend == name] for name in self.backends if (by_backend == name).any()}

    # -- downloads --------------------------------------------------------------------------------
    def _start_downloads(self) -> None:
        """Start the owed result downloads this run may take (claimed first, so no other worker does them)."""
        sweep = self.stats["run_jobs loop"]
        waiting = [i for i, d in self._downloads.items() if d.not_before > sweep]
        free = self.download_workers - len(self._downloading)
        if free <= 0:
            return
        rows = self.rows.claim_downloads(free, exclude=[*self._downloading, *waiting], backends=list(self.backends))
        for index, row in rows.iterrows():
            backend = self.backends[row["backend_name"]]
            download = self._downloads.setdefault(index, _Download())
            download.attempts += 1
            details = self._details.get(index)

            def fetch(backend=backend, row=row, details=details, on_done=self.settings.on_done) -> Any:
                try:
                    return on_done(backend.connection().job(row["id"]), row, details)
                finally:
                    self._download_ended.set()

            self._downloading[index] = run_in_thread(fetch, f"prefect-openeo-download-{row['id']}")

    def _download_done(self, rows: pd.DataFrame, index: Any, future: concurrent.futures.Future) -> bool:
        """Fold a download's outcome into its row; whether the row changed (not during a retry's backoff)."""
        download = self._downloads[index]
        job_id = rows.at[index, "id"]
        error = future.exception()
        state, message = download_outcome(job_id, error, download.attempts)
        if state == "done":
            if index in self._problems:
                set_cell(rows, index, MESSAGE_COLUMN, None)
            self._problems.pop(index, None)
            self._details.pop(index, None)
        elif state == "gone":
            _log.warning(f"Row {index}: {message}")
            self._problems[index] = message
            self.stats["results gone"] += 1
        else:
            _log.error(f"on_job_done failed for job {job_id} (attempt {download.attempts}): {error!r}")
            self.stats["on_job_done error"] += 1
            self._problems[index] = message
            if download.attempts < DOWNLOAD_ATTEMPTS:
                # Back off: after the n-th failed attempt, wait 2**n - 1 sweeps (1, 3, ...) before the next.
                download.not_before = self.stats["run_jobs loop"] + 2**download.attempts - 1
                return False
        del self._downloads[index]
        set_cell(rows, index, RESULTS_COLUMN, state)
        if message:
            set_cell(rows, index, MESSAGE_COLUMN, message)
        return True

    # -- after a crash or restart -----------------------------------------------------------------
    def _check_backends(self) -> None:
        """Every backend is checked before anything starts (in parallel, for up to ``CHECK_WAIT`` seconds): one
        that is not a usable openEO API stops the run here; one that cannot be reached now (or not yet known)
        waits, and its lane keeps trying, while the others work."""
        checks = {
            name: run_in_thread(backend.check, f"prefect-openeo-check-{name}")
            for name, backend in self.backends.items()
        }
        concurrent.futures.wait(checks.values(), timeout=CHECK_WAIT)
        for name, future in checks.items():
            if not future.done():
                self._note_availability(name, f"Backend {name!r}: still connecting after {CHECK_WAIT:g} s")
                continue
            try:
                future.result()
            except BackendUnavailable as e:
                self._note_availability(name, str(e))

    def _reconcile_unplanned(self) -> None:
        """Unresolved creations without a planned backend (recorded by older versions): search every backend's
        listing for their token; adopt the job where found, else clear the token."""
        pending = self.rows.claim_unresolved(list(self.backends))
        if pending.empty:
            return
        pending = pending[pending.get(PLANNED_COLUMN, pd.Series(index=pending.index, dtype=object)).map(blank)].copy()
        if pending.empty:
            return
        tokens = dict(zip(pending[TOKEN_COLUMN], pending.index, strict=True))
        found: dict[str, tuple[str, dict]] = {}
        for name, backend in self.backends.items():
            if name in self._down:
                return  # cannot be sure the job is not there: decide when every backend can be searched
            try:
                for token, entry in backend.find_created(set(tokens) - set(found)).items():
                    found[token] = (name, entry)
            except Exception as e:
                _log.warning(f"Could not look for jobs of an interrupted run on backend {name!r}: {e!r}")
                return
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
        """Optionally give ``error``/``start_failed`` rows another go, after a backoff, up to a maximum.

        A ``start_failed`` row keeps its creation token: its job may exist after all (a response lost after
        the backend created it), so the listing is searched for it before the row is created again.
        """
        limit = self.settings.retry_failed_jobs
        if not limit:
            return
        changed = set()
        rows = self.job_db.get_by_status(statuses=["error", "start_failed"]).copy()
        for index, row in rows.iterrows():
            count = 0 if blank(row.get(RETRY_COUNT_COLUMN)) else int(row[RETRY_COUNT_COLUMN])
            if count >= limit:
                continue
            delay = self.settings.retry_backoff * (2**count)
            after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delay)
            job = "" if blank(row["id"]) else f" (job {row['id']})"
            set_cell(rows, index, RETRY_COUNT_COLUMN, count + 1)
            set_cell(rows, index, RETRY_AFTER_COLUMN, rfc3339.datetime(after))
            reason = "" if blank(row.get(MESSAGE_COLUMN)) else f": {row[MESSAGE_COLUMN]}"
            set_cell(
                rows,
                index,
                MESSAGE_COLUMN,
                f"attempt {count + 1} ended {row['status']}{job}{reason}; retry {count + 1}/{limit} after {delay:g} s",
            )
            cleared = ["id", "start_time", "running_start_time", RESULTS_COLUMN]
            if row["status"] == "error" or blank(row.get(PLANNED_COLUMN)):
                cleared += [TOKEN_COLUMN, PLANNED_COLUMN]
            for column in cleared:
                if column in rows.columns:
                    set_cell(rows, index, column, None)
            rows.at[index, "status"] = "not_started"
            self.stats["job retry scheduled"] += 1
            changed.add(index)
        self._persist(rows, changed)

    # -- persistence ------------------------------------------------------------------------------
    def _persist(self, rows: pd.DataFrame, changed: set) -> None:
        """Write the changed rows (only those) to the job database, once."""
        if not changed:
            return
        self.job_db.persist(rows.loc[[i for i in rows.index if i in changed]])
        self.stats["job_db persist"] += 1

    def _check_backend_names(self) -> None:
        """Rows that name a backend that is not registered get a clear error before anything starts."""
        if hasattr(self.job_db, "unknown_backends"):
            rows = self.job_db.unknown_backends(WORK_STATUSES, list(self.backends))
        else:
            rows = self.job_db.get_by_status(statuses=WORK_STATUSES)
        if rows.empty or "backend_name" not in rows.columns:
            return
        names = rows["backend_name"]
        unknown = rows[~names.map(blank) & ~names.isin(list(self.backends))]
        if not unknown.empty:
            first = unknown.index[0]
            raise ValueError(
                f"Job database row {first} (status {unknown.at[first, 'status']!r}) names backend "
                f"{unknown.at[first, 'backend_name']!r}, which is not registered "
                f"(registered: {', '.join(self.backends)}); {len(unknown)} row(s) in all"
            )


def download_outcome(job_id: str, error: BaseException | None, attempts: int = 1) -> tuple[str, str | None]:
    """The ``results`` state a download leaves (``done``, ``gone``: the backend no longer has the job or its
    results, ``failed``) and the row's message for it."""
    if error is None:
        return "done", None
    if isinstance(error, OpenEoApiError) and error.http_status_code in (404, 410):
        return "gone", f"results of job {job_id} are gone from the backend ({error.http_status_code}): {error.message}"
    return "failed", f"on_job_done failed after {attempts} attempt(s): {error!r}"


def cancel_after(seconds: float | None) -> datetime.timedelta | None:
    return datetime.timedelta(seconds=seconds) if seconds is not None else None

"""The manager loop: claim rows, dispatch each backend's work to its lane, apply the patches, sleep.

One engine, run two ways. ``Steps`` carries the lifecycle actions: plain functions outside a flow run,
Prefect tasks inside one (see ``prefect_openeo.tasks``). The engine itself never imports Prefect.

The job store is the single record of every row's progress; the engine keeps in memory only what concerns
its own work under way, and is the only writer of rows: it applies the ``transitions.Patch`` objects that
lanes, downloads and retries make (``_write``) and tells the observers of each one that landed. Each sweep:

1. apply what finished lanes and downloads returned;
2. claim the rows to work on: active rows (to track), unresolved creations (rows whose creation token
   was recorded but whose job id was not: a stopped run, a lost answer, a worker that died), and new rows
   for the free slots of each backend (their token and planned backend recorded before any job is created);
3. hand every idle backend its rows in its own lane (``prefect_openeo.lanes``) and wait for the lanes a
   bounded time: a backend in an outage keeps retrying in its lane while the others go on. A lane whose
   sweep ended jobs fills their slots at once (``_refill``: track, then fill);
4. start the result downloads that are owed (``results = pending``), off the sweep's critical path.

The engine's thread holds ``_lock`` while it uses the job store; a lane refilling its slots takes it too.
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
import requests
from openeo import BatchJob, Connection
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo import transitions
from prefect_openeo.backends import Backend, BackendUnavailable
from prefect_openeo.frames import blank
from prefect_openeo.jobdb.errors import JobDatabaseError
from prefect_openeo.jobdb.store import open_store
from prefect_openeo.lanes import BackendWork, Lane, LaneConfig, LaneResult, reconcile, run_in_thread
from prefect_openeo.placement import SlotGate, speed_caps
from prefect_openeo.run_clock import RunClock
from prefect_openeo.schema import BACKEND, ID, PLANNED, RETRY_COUNT, TOKEN
from prefect_openeo.settings import settings
from prefect_openeo.states import TERMINAL
from prefect_openeo.steps import Steps
from prefect_openeo.transitions import Patch

_log = logging.getLogger("prefect_openeo")

#: Statuses that keep ``run_jobs`` going (upstream's set).
WORK_STATUSES = ["not_started", "created", "queued_for_start", "queued", "running"]
#: A cap on new rows that does not limit anything (the budget does).
NO_CAP = 1_000_000


#: While a backend stays unreachable, the run says what it waits for this often (seconds).
STILL_WAITING_EVERY = 60.0


#: Rows claimed for download at once, per download worker: one query of the store per batch, not per download.
DOWNLOADS_AHEAD = 4
#: Between sweeps, download outcomes are written at most this often (seconds): see ``_collect_downloads``.
OUTCOMES_EVERY = 1.0


class BackendsGaveOut(RuntimeError):
    """The run ended with rows left that only backends it gave up on (unreachable for too long) could do."""


class StartJobFailing(RuntimeError):
    """``start_job`` failed the same way for several rows in a row: most likely a bug or a wrong parameter in
    it (a band the collection lacks, say), which every further row would repeat."""


__all__ = ["JobEngine", "Observer", "RunSettings", "SlotGate", "Steps"]


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
    identical_failures_stop: int | None = field(default_factory=lambda: settings.identical_failures_stop)
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
    lane_wait: float = field(default_factory=lambda: settings.lane_wait)
    gate: SlotGate = field(default_factory=SlotGate)
    download_workers: int = field(default_factory=lambda: settings.download_workers)

    def __post_init__(self) -> None:
        self.backends = dict(self.settings.backends)
        #: The row claims: the SQL job database's own (shared by workers), or a local stand-in.
        self.store = open_store(self.job_db)
        #: Held while applying patches and claiming rows: lanes refill their slots from their own threads.
        self._lock = threading.RLock()
        self._ended = False
        self._lanes = {name: Lane(name) for name in self.backends}
        #: Times the sweeps: a sleep that returned early (a patched ``time.sleep``) counts as slept.
        self.clock = RunClock()
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
            refill=self._refill,
            creation_given_up=lambda index: self._uncertain[index] >= settings.uncertain_creations,
            start_given_up=self._start_given_up,
            min_gap=float(self.settings.poll_sleep),
            clock=self.clock.now,
        )
        #: Per backend: when a sweep of its jobs may next learn something (``LaneResult.next_look``).
        self._next_look: dict[str, float | None] = {}
        #: Backends that could not be reached, with why (their lanes keep trying).
        self._down: dict[str, str] = {}
        self._down_since: dict[str, float] = {}
        self._said_waiting: dict[str, float] = {}
        #: Backends unreachable for longer than ``give_up_after``: no more work goes to them in this run.
        self._given_up: set[str] = set()
        #: Rows whose last problem is still unresolved, with a message (for the run's summary).
        self._problems: dict[Any, str] = {}
        #: ``GET /jobs/{id}`` documents of jobs that ended, handed to their downloads (saves a request).
        self._details: dict[Any, dict] = {}
        #: Downloads running (row -> future, and the row as claimed) and those owed in this run (attempts, backoff).
        self._downloading: dict[Any, concurrent.futures.Future] = {}
        self._download_rows: dict[Any, pd.Series] = {}
        #: Rows claimed for download, not started yet (a stopped run's release lets go of them).
        self._claimed_downloads: dict[Any, pd.Series] = {}
        #: Downloads that ended, their outcome not written yet (``_collect_downloads``): (patch, row) by row.
        self._download_outcomes: dict[Any, tuple[Patch | None, pd.Series]] = {}
        self._outcomes_written = time.monotonic()
        self._downloads: dict[Any, _Download] = {}
        self._download_ended = threading.Event()
        #: ``start_job`` failures in a row that are the same failure, and the failures already logged in full.
        self._same_failures: list[tuple[Any, Any, pd.Series]] = []
        #: Creations per row whose answer was lost, in this run (``settings.uncertain_creations`` at most).
        self._uncertain: collections.Counter = collections.Counter()
        #: Starts per row that failed for now, in this run (``settings.start_attempts`` at most).
        self._start_failures: collections.Counter = collections.Counter()
        self._logged_failures: set[str] = set()
        #: Slots per backend as the job database records them for this run (``prepare_run``).
        self._slots: dict[str, int] = {}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        if not self.backends:
            raise RuntimeError("No backends registered")
        self._check_backend_names()
        self._check_backends()
        try:
            self._slots = self.store.prepare_run({n: backend.parallel_jobs for n, backend in self.backends.items()})
            elsewhere = self.store.pending_downloads() - self.store.pending_downloads(list(self.backends))
            if elsewhere:
                _log.warning(
                    f"{elsewhere} finished row(s) owe result downloads from backends not registered in this run: "
                    "they stay pending (register their backends to download them)"
                )
            self._reconcile_unplanned()
            while not self.should_stop() and self._has_work():
                self.iteration()
                with self._lock:
                    self._stop_if_start_job_keeps_failing()
                    self.stats["run_jobs loop"] += 1
                    histogram = self.job_db.count_by_status()
                    _log.info(f"Job status histogram: {histogram}. Run stats: {dict(self.stats)}")
                    self.observer.sweep_done(self.job_db, self.stats)
                self.gate.renew()
                self._sleep()
        finally:
            self.gate.close()
            self._release()
            with self._lock:
                self.observer.run_done(self.job_db, self.stats, dict(self._problems))
        if self._given_up and not self.should_stop():
            with self._lock:
                left = self._work_by_backend()
            why = "; ".join(self._down.get(name, f"{name} unreachable") for name in sorted(self._given_up))
            raise BackendsGaveOut(
                f"Gave up on backend(s) {', '.join(sorted(self._given_up))}: {why}; {sum(left.values())} row(s) are "
                "left for them (pinned or with their jobs there): run again once they are back"
            )
        return self.stats

    def _release(self) -> None:
        """At the end of a run: apply what is done, give up every claim but those of work still under way
        (a creation or download a stopped run's threads may yet finish), so no one waits for leases."""
        with self._lock:
            self._ended = True  # no lane refills its slots any more
            try:
                self._collect()
            except Exception as e:  # already raised once by the loop, or a lane that failed as the run stopped
                _log.debug(f"Ignoring an error of work that ended with the run: {e!r}")
            busy = [lane for lane in self._lanes.values() if lane.busy()]
            keep = [i for lane in busy for i in lane.creating] + list(self._downloading)
            self.store.release(keep)

    def _has_work(self) -> bool:
        with self._lock:
            return self.has_work()

    def has_work(self) -> bool:
        if self._busy():
            return True
        usable = [name for name in self.backends if name not in self._given_up]
        if not usable:
            return False
        if self.store.pending_downloads(usable) > 0:
            return True
        if not self._given_up:
            return self.store.work_left(WORK_STATUSES, usable) > 0
        left = self._work_by_backend()
        return any(name not in self._given_up for name in left)

    def _work_by_backend(self) -> dict[str, int]:
        """Rows still to work on, by the backend they are tied to ("" for rows any backend may take)."""
        rows = self.job_db.get_by_status(statuses=WORK_STATUSES)
        names = rows["backend_name"].map(lambda v: "" if blank(v) else v)
        return names.value_counts().to_dict()

    def _busy(self) -> bool:
        """Work under way that the run must wait for (a lane only checking whether its backend is back is not)."""
        waited = [lane for name, lane in self._lanes.items() if name not in self._given_up and not lane.checking]
        return any(lane.busy() for lane in waited) or bool(self._downloading)

    def _sleep_seconds(self) -> float:
        """Until the next sweep: ``poll_sleep``, or less where a backend's jobs may have ended sooner (its
        ``next_look``, itself never sooner than ``poll_sleep`` after that backend's last sweep)."""
        poll = float(self.settings.poll_sleep)
        looks = [t for name, t in self._next_look.items() if t is not None and name not in self._given_up]
        if not looks:
            return poll
        return min(poll, max(min(looks) - self.clock.now(), min(poll, 0.05)))

    def _sleep(self) -> None:
        """Sleep until the next sweep (``_sleep_seconds``) through ``time.sleep`` looked up now, so patches and
        time machines apply (``RunClock.sleep``: a patched sleep counts as slept).

        While downloads run, the first part of the sleep is spent waiting for them instead: each one that
        ends is recorded at once and the next owed download starts, so results never wait for a sweep.
        Where those were the run's last work, it ends without sleeping on. Else one ``time.sleep`` call for
        the rest, as upstream's ``run_jobs``; a stoppable run
        (``start_job_thread``) sleeps in steps of at most a second so that ``stop_job_thread`` is answered
        quickly, as upstream's thread.
        """
        remaining = self._sleep_seconds()
        waited_for_downloads = False
        while self._downloading and remaining > 0 and not self.should_stop():
            waited_for_downloads = True
            began = time.monotonic()
            self._download_ended.wait(min(remaining, 1.0))
            self._download_ended.clear()
            with self._lock:
                self._collect_downloads(at_once=False)
                self._start_downloads()
            remaining -= time.monotonic() - began
        if remaining <= 0 or (waited_for_downloads and not self._has_work()):
            pass  # the last downloads were the run's last work: it ends now, not a poll later
        elif self.stoppable:
            while remaining > 0 and not self.should_stop():
                step = min(1.0, remaining)
                self.clock.sleep(step)
                remaining -= step
        else:
            self.clock.sleep(remaining)
        self.stats["sleep"] += 1

    def iteration(self) -> None:
        """One sweep: apply finished work, claim rows, dispatch every idle backend's work, start downloads.

        The engine's thread holds ``_lock`` while it reads and writes the job store; a lane that frees slots
        takes it to refill them (``_refill``), so the store is only ever used by one thread at a time."""
        with self._lock:
            submitted = self._dispatch()
        if submitted:
            concurrent.futures.wait(submitted, timeout=self.lane_wait)
        with self._lock:
            self._collect()
            self._schedule_retries()
            self._start_downloads()

    def _dispatch(self) -> list[concurrent.futures.Future]:
        """Apply finished work, claim the rows to work on, hand every idle backend its work."""
        self._collect()
        known = list(self.backends)
        active = self._orphans(self.store.claim_active(known))
        unresolved = self.store.claim_unresolved(known)
        if not unresolved.empty and (PLANNED not in unresolved or unresolved[PLANNED].map(blank).any()):
            self._reconcile_unplanned()
        plan = self._plan()
        submitted = []
        for name, backend in self.backends.items():
            lane = self._lanes[name]
            if name in self._given_up:
                continue
            if lane.busy():
                self.stats["lane busy"] += 1
                waited = time.monotonic() - lane.since
                if waited > settings.stuck_after:  # a hung request: an outage of that backend, as far as we know
                    self._note_availability(name, f"Backend {name!r} has not answered for {waited:.0f} s", lane.since)
                continue
            mine = active[active["backend_name"] == name]
            pending = unresolved[unresolved[PLANNED] == name] if PLANNED in unresolved else None
            new = plan.get(name, mine.iloc[0:0])
            if mine.empty and new.empty and (pending is None or pending.empty):
                if name not in self._down or not self.job_db.count_by_status(statuses=["not_started"]):
                    continue  # nothing to do; a backend that is down is tried again while rows wait
            work = BackendWork(self._lane_config, backend, mine.copy(), new, pending)
            submitted.append(lane.submit(work, self.steps.run_lane))
        return submitted

    def _orphans(self, active: pd.DataFrame) -> pd.DataFrame:
        """Active rows with no backend cannot be tracked: mark them (the run would never end otherwise)."""
        lost = active[BACKEND].map(blank)
        if not lost.any():
            return active
        rows = active[lost].copy()
        self._write([transitions.untrackable(row, index, "backend_name") for index, row in rows.iterrows()], rows)
        return active[~lost]

    # -- applying what lanes and downloads did ------------------------------------------------------
    def _collect(self) -> None:
        """Apply the results of finished lanes and downloads; re-raise what must stop the run.

        A lane's work that failed (a backend's answer that no step foresaw) is that backend's fault, like an
        outage: logged once in full, counted against ``give_up_after``; its rows are claimed again next sweep
        (a creation it may have begun is reconciled by its token). What stops the run: a job database that
        fails, and (as openeo's manager) a request whose whole retry budget was spent (``RetryError``)."""
        errors = []
        for name, lane in self._lanes.items():
            future = lane.future
            if future is None or not future.done():
                continue
            lane.future = None
            try:
                result: LaneResult = future.result()
            except (JobDatabaseError, requests.exceptions.RetryError) as e:
                errors.append(e)
                continue
            except Exception as e:
                self._lane_failed(name, e)
                continue
            self._apply(result)
        self._collect_downloads()
        if errors:
            raise errors[0]

    def _collect_downloads(self, at_once: bool = True) -> None:
        """Record the outcome of every download that ended, in one write for all of them.

        Between sweeps (``at_once`` False) outcomes are written at most once per ``OUTCOMES_EVERY`` seconds,
        and as soon as no download is running: a write of a file job database costs as much as its rows,
        and one per download made a 10,000-row campaign quadratic. An outcome not written yet is not lost
        work: its results are on disk, and a run stopped before the write downloads them again."""
        for index, future in [(i, f) for i, f in self._downloading.items() if f.done()]:
            del self._downloading[index]
            row = self._download_rows.pop(index)
            self._download_outcomes[index] = (self._download_done(row, index, future), row)
        if not self._download_outcomes:
            return
        due = time.monotonic() - self._outcomes_written >= OUTCOMES_EVERY or not self._downloading
        if not (at_once or due):
            return
        outcomes, self._download_outcomes = self._download_outcomes, {}
        self._outcomes_written = time.monotonic()
        rows = pd.DataFrame([row for _, row in outcomes.values()])
        self._write([patch for patch, _ in outcomes.values() if patch], rows)

    def _apply(self, result: LaneResult) -> None:
        for key, value in result.stats.items():
            self.stats[key] += value
        self._note_availability(result.backend, result.unavailable)
        self._next_look[result.backend] = result.next_look
        signed_out = self.backends[result.backend].signed_out
        if signed_out and result.backend not in self._given_up:  # nothing this run can do about it
            _log.error(f"{signed_out}. Giving up on it for this run; its rows wait for the next run")
            self._down[result.backend] = signed_out
            self._given_up.add(result.backend)
            self.stats["backend given up"] += 1
        self._write(result.patches[result.applied :], result.rows)
        if result.refused:  # no slot in the shared limit now: the rows wait for a later sweep
            self.store.unclaim(result.refused, held=result.rows)
        self._note_start_job_calls(result.start_job_calls, result.rows)
        for index, details in result.details.items():
            if self.settings.results_owed and result.rows.at[index, "status"] == "finished":
                self._details[index] = details

    def _refill(self, name: str, patches: list[Patch], held: pd.DataFrame) -> pd.DataFrame:
        """A lane's sweep freed slots: apply its patches so far, then plan rows for the backend's free slots."""
        with self._lock:
            if self._ended:  # the run let go of the job database: the next run reconciles what this work did
                return held.iloc[0:0]
            self._write(patches, held)
            if self.should_stop() or name in self._down:
                return held.iloc[0:0]
            limit = self.backends[name].limit()
            caps = {name: NO_CAP if limit is None else limit}
            return self.store.claim_new(caps, [name], new_at_most=self._speed_caps())

    def _write(self, patches: list[Patch], held: pd.DataFrame) -> None:
        """Apply patches to the job store (one write), then tell the observers of every one that landed.

        ``held``: the rows as this run holds them, patched. A patch a shared store refuses (the row changed
        under this run, or another live worker holds it now) is dropped: the row is that worker's.
        """
        if not patches:
            return
        with self._lock:
            self._write_locked(patches, held)

    def _write_locked(self, patches: list[Patch], held: pd.DataFrame) -> None:
        landed = set(self.store.apply(patches, held))
        if landed:
            self.stats["job_db persist"] += 1
        refused = sorted({p.index for p in patches if p and p.index not in landed}, key=str)
        if refused:
            self.stats["patch not applied"] += len(refused)
            _log.warning(
                f"Rows {refused[:10]} changed under this run (another worker holds them now, or their status "
                "moved on): this run's update of them was not written"
            )
        for patch in patches:
            if patch and patch.index not in landed:
                continue
            if patch.problem:
                self._problems[patch.index] = patch.problem
            elif patch.resolved:
                self._problems.pop(patch.index, None)
            if patch.status:
                self.observer.row_status(patch.index, held.loc[patch.index], patch.status)
            if patch.status in TERMINAL or (TOKEN in patch.cells and patch.cells[TOKEN] is None):
                self.gate.release(patch.index)  # the row's slot of a shared limit: it ended, or was not created

    def _start_given_up(self, index: Any) -> bool:
        """A start of row ``index`` failed for now: whether its starts failed often enough in this run."""
        with self._lock:
            self._start_failures[index] += 1
            return self._start_failures[index] >= settings.start_attempts

    def _lane_failed(self, name: str, error: Exception) -> None:
        self.stats["backend work failed"] += 1
        signature = f"{name}: {type(error).__name__}"
        if signature not in self._logged_failures:
            self._logged_failures.add(signature)
            _log.error(f"Backend {name!r}: its work of a sweep failed ({error!r})", exc_info=error)
        self._note_availability(name, f"Backend {name!r} answered what could not be used: {error!r}")

    def _note_availability(self, name: str, unavailable: str | None, since: float | None = None) -> None:
        now = time.monotonic()
        if unavailable and name not in self._down:
            others = " while the other backends go on" if len(self.backends) > 1 else ""
            _log.warning(f"{unavailable}; its jobs wait{others} (trying again each sweep)")
            self._down_since[name] = now if since is None else since
        elif not unavailable and name in self._down:
            _log.warning(f"Backend {name!r} is reachable again")
            self._said_waiting.pop(name, None)
        if unavailable:
            self._down[name] = unavailable
            self._say_still_waiting(name, unavailable, now)
            limit = self.settings.give_up_after
            if limit is not None and now - self._down_since[name] > limit and name not in self._given_up:
                _log.error(f"Giving up on backend {name!r} for this run: unreachable for more than {limit:g} s")
                self._given_up.add(name)
                self.stats["backend given up"] += 1
        else:
            self._down.pop(name, None)

    def _say_still_waiting(self, name: str, why: str, now: float) -> None:
        """Once a minute while a backend stays unreachable: what the run waits for, and until when."""
        down_for = now - self._down_since[name]
        if (
            down_for < STILL_WAITING_EVERY
            or now - self._said_waiting.get(name, self._down_since[name]) < STILL_WAITING_EVERY
        ):
            return
        self._said_waiting[name] = now
        limit = self.settings.give_up_after
        until = f"gives up after {limit:g} s" if limit is not None else "waits until it is back (give_up_after: never)"
        _log.warning(f"Still waiting for backend {name!r}, unreachable for {down_for:.0f} s ({why}); the run {until}")

    def _note_start_job_calls(self, calls: list[tuple[Any, Any]], rows: pd.DataFrame) -> None:
        """Log each distinct ``start_job`` failure once in full (later ones in a line), and count identical
        failures in a row."""
        for index, outcome in calls:
            if outcome is None:
                self._same_failures.clear()
                continue
            if outcome.signed_out:  # the backend refused the token: not start_job's fault
                continue
            if outcome.uncertain:  # the backend's fault, not start_job's: looked for, then tried again (bounded)
                self._uncertain[index] += 1
                _log.warning(f"Row {index}: {outcome.error}: the job may exist; looked for before creating again")
                continue
            signature = outcome.signature or outcome.error
            if signature in self._logged_failures:
                _log.warning(f"Row {index}: {outcome.error} (the same failure as before)")
            else:
                self._logged_failures.add(signature)
                _log.warning(f"Row {index}: {outcome.error}\n{outcome.traceback or ''}".rstrip())
            first = self._same_failures[0][1] if self._same_failures else None
            if first is not None and (first.signature or first.error) != signature:
                self._same_failures.clear()
            self._same_failures.append((index, outcome, rows.loc[index]))

    def _stop_if_start_job_keeps_failing(self) -> None:
        """Identical ``start_job`` failures in a row: stop, with one clear error showing the first traceback;
        the rows it failed on go back to ``not_started`` (the fix of ``start_job`` is all a rerun needs)."""
        limit = self.settings.identical_failures_stop
        if not limit or len(self._same_failures) < limit:
            return
        failures = list(self._same_failures)
        rows = pd.DataFrame([row for _, _, row in failures])
        patches = [
            transitions.reset(row, index, retry_count=None if blank(row.get(RETRY_COUNT)) else row[RETRY_COUNT])
            for index, row in rows.iterrows()
        ]
        for patch in patches:
            transitions.apply_to(rows, patch)
        self._write(patches, rows)
        for index in rows.index:
            self._problems.pop(index, None)
        first_index, first, _ = failures[0]
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
        planned = self.store.claim_new(caps, list(self.backends), new_at_most=self._speed_caps())
        if planned.empty:
            return {}
        by_backend = planned[PLANNED]
        return {name: planned[by_backend == name] for name in self.backends if (by_backend == name).any()}

    def _speed_caps(self) -> dict[str, int]:
        """Near the end of a campaign, rows wait for a fast backend rather than start on a slower one that
        would end them later (``placement.speed_caps``; from the durations this run saw, once at least two
        usable backends have some: not one that is down, or whose sweep has hung for longer than its jobs
        take). Each backend's first such wait is logged with why."""
        expected = {}
        for name, backend in self.backends.items():
            duration, lane = backend.expected_duration(), self._lanes[name]
            if duration is None or name in self._down:
                continue
            if lane.busy() and time.monotonic() - lane.since > max(duration, float(self.settings.poll_sleep)):
                continue  # its sweep hangs (e.g. retrying through an outage): it ends nothing sooner now
            expected[name] = duration
        if len(expected) < 2:
            return {}
        slots = {name: self.backends[name].limit() or self._slots.get(name, 0) for name in expected}
        caps = speed_caps(expected, slots, self.store.waiting_rows())
        for name, (_, why) in caps.items():
            self.stats["sweeps waiting for faster backends"] += 1
            if self.backends[name].first_time("speed cap"):
                _log.info(f"{why}: the other rows wait for a slot there")
        return {name: cap for name, (cap, _) in caps.items()}

    # -- downloads --------------------------------------------------------------------------------
    def _start_downloads(self) -> None:
        """Start the owed result downloads this run may take (claimed first, so no other worker does them)."""
        sweep = self.stats["run_jobs loop"]
        waiting = [i for i, d in self._downloads.items() if d.not_before > sweep]
        free = self.download_workers - len(self._downloading)
        if free <= 0:
            return
        if len(self._claimed_downloads) < free:  # claimed ahead: not one query of the store per download
            exclude = [*self._downloading, *self._download_outcomes, *waiting, *self._claimed_downloads]
            more = DOWNLOADS_AHEAD * self.download_workers - len(self._claimed_downloads)
            claimed = self.store.claim_downloads(more, exclude=exclude, backends=list(self.backends))
            self._claimed_downloads.update(dict(claimed.iterrows()))
        for index in list(self._claimed_downloads)[:free]:
            row = self._claimed_downloads.pop(index)
            backend = self.backends[row["backend_name"]]
            download = self._downloads.setdefault(index, _Download())
            download.attempts += 1
            details = self._details.get(index)

            def fetch(backend=backend, row=row, details=details, on_done=self.settings.on_done) -> Any:
                try:
                    return on_done(backend.connection().job(row["id"]), row, details)
                finally:
                    self._download_ended.set()

            self._download_rows[index] = row
            self._downloading[index] = run_in_thread(fetch, f"prefect-openeo-download-{row['id']}")

    def _download_done(self, row: pd.Series, index: Any, future: concurrent.futures.Future) -> Patch | None:
        """A download's outcome as a patch of its row (None during a retry's backoff)."""
        download = self._downloads[index]
        error = future.exception()
        state, message = transitions.download_state(row[ID], error, download.attempts)
        if state == "done":
            self._details.pop(index, None)
            report = future.result()
            if hasattr(report, "assets"):  # the default download's DownloadReport (counted here, in one thread)
                self.stats["job download"] += 1
                self.stats["files downloaded"] += report.assets
        elif state == "gone":
            _log.warning(f"Row {index}: {message}")
            self.stats["results gone"] += 1
        else:
            _log.error(f"on_job_done failed for job {row[ID]} (attempt {download.attempts}): {error!r}")
            self.stats["on_job_done error"] += 1
            if download.attempts < settings.download_attempts:
                self._problems[index] = message
                # Back off: after the n-th failed attempt, wait 2**n - 1 sweeps (1, 3, ...) before the next.
                download.not_before = self.stats["run_jobs loop"] + 2**download.attempts - 1
                return None
        del self._downloads[index]
        return transitions.download_ended(row, index, state, message)

    # -- after a crash or restart -----------------------------------------------------------------
    def _check_backends(self) -> None:
        """Every backend is checked before anything starts (in parallel, for up to ``settings.check_wait`` seconds): one
        that is not a usable openEO API stops the run here; one that cannot be reached now (or not yet known)
        waits, and its lane keeps trying, while the others work."""
        checks = {
            name: run_in_thread(backend.check, f"prefect-openeo-check-{name}")
            for name, backend in self.backends.items()
        }
        concurrent.futures.wait(checks.values(), timeout=settings.check_wait)
        for name, future in checks.items():
            if not future.done():
                self._note_availability(name, f"Backend {name!r}: still connecting after {settings.check_wait:g} s")
                continue
            try:
                future.result()
            except BackendUnavailable as e:
                self._note_availability(name, str(e))

    def _reconcile_unplanned(self) -> None:
        """Unresolved creations without a planned backend (recorded by older versions): search every backend's
        listing for their token, as a lane does for its own (``lanes.reconcile``)."""
        pending = self.store.claim_unresolved(list(self.backends))
        if pending.empty:
            return
        pending = pending[pending.get(PLANNED, pd.Series(index=pending.index, dtype=object)).map(blank)].copy()
        if pending.empty:
            return
        if self._down:
            return  # cannot be sure the job is not there: decide when every backend can be searched
        outcome = reconcile(pending, list(pending.index), list(self.backends.values()))
        if outcome is None:
            return
        for key, value in outcome.stats.items():
            self.stats[key] += value
        self._write(outcome.patches, pending)

    def _schedule_retries(self) -> None:
        """Optionally give ``error``/``start_failed`` rows another go, after a backoff, up to a maximum
        (``transitions.retry_scheduled``)."""
        limit = self.settings.retry_failed_jobs
        if not limit:
            return
        rows = self.job_db.get_by_status(statuses=["error", "start_failed"]).copy()
        now = datetime.datetime.now(datetime.timezone.utc)
        patches = []
        for index, row in rows.iterrows():
            patch = transitions.retry_scheduled(row, index, limit, self.settings.retry_backoff, now)
            if patch is not None:
                transitions.apply_to(rows, patch)
                patches.append(patch)
                self.stats["job retry scheduled"] += 1
        self._write(patches, rows)

    def _check_backend_names(self) -> None:
        """Rows that name a backend that is not registered get a clear error before anything starts."""
        unknown = self.store.unknown_backends(WORK_STATUSES, list(self.backends))
        if not unknown.empty:
            first = unknown.index[0]
            raise ValueError(
                f"Job database row {first} (status {unknown.at[first, 'status']!r}) names backend "
                f"{unknown.at[first, BACKEND]!r}, which is not registered "
                f"(registered: {', '.join(self.backends)}); {len(unknown)} row(s) in all"
            )


def cancel_after(seconds: float | None) -> datetime.timedelta | None:
    return datetime.timedelta(seconds=seconds) if seconds is not None else None

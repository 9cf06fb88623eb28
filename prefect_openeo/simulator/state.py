"""Pure job-lifecycle model of a simulated openEO backend (no HTTP).

Job states advance lazily: every access first replays the event sequence (queue -> run -> end) up to the
clock's ``now``, so the model is exact however long nobody looked. All methods expect the caller to hold
``state.lock``.
"""

from __future__ import annotations

import itertools
import math
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .config import SimulatorConfig
from .metadata import OUTPUT_MEDIA

__all__ = ["STATUSES", "LOG_LEVELS", "BackendState", "Job", "LogEntry", "SimulatorError", "rfc3339"]

STATUSES = ("created", "queued", "running", "finished", "error", "canceled")
ACTIVE = ("queued", "running")
LOG_LEVELS = {"error": 0, "warning": 1, "info": 2, "debug": 3}

# Process-wide id counter (+ per-process salt): job ids are unique across simulators and sort by creation.
_ID_COUNTER = itertools.count(1)
_ID_SALT = secrets.token_hex(3)

_FAILURES = (
    (
        "ExecutorLost",
        "executor lost while computing the result (java.lang.OutOfMemoryError: Java heap space)",
    ),
    ("UpstreamError", "load_collection could not read an input product (HTTP 500 from the data provider)"),
    ("ProcessGraphError", "process graph evaluation raised ValueError('no data in spatio-temporal extent')"),
)


class SimulatorError(Exception):
    """An openEO API error: HTTP status, openEO error code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def rfc3339(wall: float) -> str:
    """RFC 3339 UTC timestamp with second resolution, e.g. ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LogEntry:
    """One job log entry; ``t`` is on the simulator clock."""

    id: str
    level: str
    message: str
    t: float
    code: str | None = None


@dataclass(eq=False)
class Job:
    """A batch job. Times (``*_at``) are on the simulator clock, ``None`` until reached."""

    id: str
    seq: int
    user: str
    process: dict[str, Any]
    title: str | None = None
    description: str | None = None
    plan: str | None = None
    budget: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "created"
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    eligible_at: float | None = None
    running_at: float | None = None
    end_at: float | None = None
    ended_at: float | None = None
    canceled_at: float | None = None
    start_order: int = 0
    start_count: int = 0
    cancel_count: int = 0
    queue_duration: float = 0.0
    run_duration: float = 0.0
    will_fail: bool = False
    failure: tuple[str, str] | None = None
    assets: list[tuple[str, str]] = field(default_factory=list)
    asset_size: int = 0
    logs: list[LogEntry] = field(default_factory=list)

    @property
    def process_graph(self) -> dict[str, Any]:
        return self.process.get("process_graph", {})

    @property
    def run_seconds(self) -> float:
        """Seconds actually spent running (0 when it never ran)."""
        if self.running_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else self.canceled_at
        return max(0.0, (end if end is not None else self.running_at) - self.running_at)


@dataclass
class _UserQueue:
    queued: list[Job] = field(default_factory=list)
    running: list[Job] = field(default_factory=list)
    t: float = -math.inf  # time up to which events were replayed


class BackendState:
    """All mutable state of one simulated backend: jobs, per-user queues, request counters."""

    def __init__(self, config: SimulatorConfig):
        self.config = config
        self.lock = threading.RLock()
        self.reset()

    # -- clock -------------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.config.clock()

    def reset(self) -> None:
        """Forget all jobs and counters; the outage/elapsed epoch restarts now."""
        self.jobs: dict[str, Job] = {}
        self._users: dict[str, _UserQueue] = {}
        self._seq = 0
        self._start_order = 0
        self.created_count = 0
        self.request_counts: Counter[str] = Counter()
        self._rng_429 = random.Random(f"{self.config.seed}:429")
        self.epoch = self.origin = self.now()
        self._wall0 = time.time()

    def restart_origin(self) -> None:
        """Outage windows count from now (called when the server starts)."""
        self.origin = self.now()

    def elapsed(self) -> float:
        """Seconds since server start/reset on the simulator clock (outage windows use this)."""
        return self.now() - self.origin

    def wall(self, t: float) -> float:
        """Map a simulator-clock time to wall-clock epoch seconds."""
        return self._wall0 + (t - self.epoch)

    def timestamp(self, t: float) -> str:
        return rfc3339(self.wall(t))

    # -- request gate --------------------------------------------------------------------------------------
    def count_request(self, key: str) -> None:
        self.request_counts[key] += 1

    def in_outage(self) -> bool:
        elapsed = self.elapsed()
        return any(start <= elapsed < end for start, end in self.config.outages)

    def draw_429(self) -> bool:
        rate = self.config.rate_429
        return rate > 0 and self._rng_429.random() < rate

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _queue(self, user: str) -> _UserQueue:
        uq = self._users.get(user)
        if uq is None:
            uq = self._users[user] = _UserQueue(t=self.epoch)
        return uq

    def _log(self, job: Job, level: str, message: str, t: float, code: str | None = None) -> None:
        job.logs.append(LogEntry(str(len(job.logs)), level, message, t, code))

    def _draw(self, seq: int, what: str) -> random.Random:
        return random.Random(f"{self.config.seed}:{seq}:{what}")

    def _jittered(self, base: float, seq: int, what: str) -> float:
        jitter = self.config.jitter
        factor = 1.0 + jitter * (2.0 * self._draw(seq, what).random() - 1.0) if jitter else 1.0
        return max(0.0, base * factor)

    def _set(self, job: Job, status: str, t: float) -> None:
        job.status = status
        job.updated_at = t

    def _run(self, job: Job, t: float) -> None:
        self._set(job, "running", t)
        job.running_at = t
        job.end_at = t + job.run_duration
        nodes = sorted({n.get("process_id", "?") for n in job.process_graph.values() if isinstance(n, dict)})
        self._log(job, "info", "Job started running on simulated executor", t)
        self._log(job, "debug", f"Evaluating process graph with {len(job.process_graph)} nodes: {nodes}", t)

    def _end(self, job: Job, t: float) -> None:
        job.ended_at = t
        job.end_at = None
        if job.will_fail:
            self._set(job, "error", t)
            code, reason = job.failure or _FAILURES[0]
            self._log(job, "warning", "Task failed, retrying (attempt 2 of 2)", t)
            self._log(job, "error", f"Job failed: simulated error: {reason}", t, code=code)
        else:
            self._set(job, "finished", t)
            self._log(job, "info", f"Job finished successfully: wrote {len(job.assets)} asset(s)", t)

    def _advance_user(self, uq: _UserQueue, now: float) -> None:
        if not uq.queued and not uq.running:
            uq.t = max(uq.t, now)
            return
        capacity = max(0, int(self.config.capacity))
        t = uq.t
        while True:
            next_end = min((j.end_at for j in uq.running if j.end_at is not None), default=math.inf)
            start_t = math.inf
            if len(uq.running) < capacity and uq.queued:
                start_t = max(t, min(j.eligible_at or 0.0 for j in uq.queued))
            if next_end <= start_t:  # an end at the same instant frees its slot first
                if next_end > now:
                    break
                job = min(uq.running, key=lambda j: (j.end_at, j.start_order))
                uq.running.remove(job)
                t = next_end
                self._end(job, t)
            else:
                if start_t > now:
                    break
                t = start_t
                job = min((j for j in uq.queued if (j.eligible_at or 0.0) <= t), key=lambda j: j.start_order)
                uq.queued.remove(job)
                uq.running.append(job)
                self._run(job, t)
        uq.t = max(uq.t, now)

    def advance(self, now: float | None = None) -> float:
        """Replay all job events up to ``now`` (default: the clock); returns ``now``."""
        now = self.now() if now is None else now
        for uq in self._users.values():
            self._advance_user(uq, now)
        return now

    def _detach(self, job: Job) -> None:
        uq = self._users.get(job.user)
        if uq is not None:
            if job in uq.queued:
                uq.queued.remove(job)
            if job in uq.running:
                uq.running.remove(job)

    # -- operations ------------------------------------------------------------------------------------------
    def _find(self, job_id: str, user: str | None) -> Job:
        job = self.jobs.get(job_id)
        if job is None or (user is not None and job.user != user):
            raise SimulatorError(404, "JobNotFound", f"The batch job '{job_id}' does not exist.")
        return job

    def get(self, job_id: str, user: str | None = None) -> Job:
        """The job (advanced to now); ``user`` given: it must own it. Raises 404 JobNotFound."""
        self.advance()
        return self._find(job_id, user)

    def user_jobs(self, user: str) -> list[Job]:
        """The user's jobs (advanced to now), oldest first."""
        self.advance()
        return [j for j in self.jobs.values() if j.user == user]

    def create(self, user: str, body: dict[str, Any]) -> Job:
        """Create a job from a ``POST /jobs`` body (validated by the caller)."""
        now = self.advance()
        self._seq += 1
        known = ("process", "title", "description", "plan", "budget")
        job_id = f"j-{datetime.now(timezone.utc):%y%m%d%H%M%S}{next(_ID_COUNTER):08x}{_ID_SALT}"
        job = Job(
            id=job_id,
            seq=self._seq,
            user=user,
            process=body["process"],
            title=body.get("title"),
            description=body.get("description"),
            plan=body.get("plan"),
            budget=body.get("budget"),
            options={k: v for k, v in body.items() if k not in known},
            created_at=now,
            updated_at=now,
        )
        self.jobs[job.id] = job
        self.created_count += 1
        self._log(job, "info", f"Job created (title: {job.title!r})", now)
        return job

    def _assets(self, job: Job) -> list[tuple[str, str]]:
        fmt = "gtiff"
        for node in job.process_graph.values():
            if isinstance(node, dict) and node.get("process_id") == "save_result":
                fmt = str(node.get("arguments", {}).get("format", fmt)).lower()
        ext, media = OUTPUT_MEDIA.get(fmt, OUTPUT_MEDIA["gtiff"])
        n = max(0, int(self.config.assets_per_job))
        names = ["openEO" + ext] if n == 1 else [f"openEO_{i + 1}{ext}" for i in range(n)]
        return [(name, media) for name in names]

    def start(self, job_id: str, user: str | None = None) -> Job:
        """``POST /jobs/{id}/results``: queue a created or canceled job; anything else is a no-op."""
        now = self.advance()
        job = self._find(job_id, user)
        if job.status not in ("created", "canceled"):
            return job
        uq = self._queue(job.user)
        limit = self.config.job_limit
        if limit is not None and len(uq.queued) + len(uq.running) >= limit:
            raise SimulatorError(
                400,
                "ConcurrentJobLimit",
                f"Job '{job.id}' can not be started: user '{job.user}' already has "
                f"{len(uq.queued) + len(uq.running)} queued or running jobs (limit: {limit}).",
            )
        cfg = self.config
        fail_rng = self._draw(job.seq, "fail")
        job.will_fail = fail_rng.random() < cfg.failure_rate
        job.failure = fail_rng.choice(_FAILURES)
        job.queue_duration = self._jittered(cfg.queue_duration, job.seq, "queue")
        job.run_duration = self._jittered(cfg.run_duration, job.seq, "run")
        job.assets = self._assets(job)
        job.asset_size = max(0, int(cfg.asset_size))
        self._start_order += 1
        job.start_order = self._start_order
        job.start_count += 1
        job.started_at, job.eligible_at = now, now + job.queue_duration
        job.running_at = job.end_at = job.ended_at = job.canceled_at = None
        self._set(job, "queued", now)
        self._log(job, "info", "Job queued for processing", now)
        uq.queued.append(job)
        self.advance(now)
        return job

    def cancel(self, job_id: str, user: str | None = None) -> Job:
        """``DELETE /jobs/{id}/results``: queued/running -> canceled; anything else is a no-op."""
        now = self.advance()
        job = self._find(job_id, user)
        if job.status in ACTIVE:
            self._detach(job)
            job.canceled_at = now
            job.end_at = None
            job.cancel_count += 1
            self._set(job, "canceled", now)
            self._log(job, "info", "Job canceled by user", now)
        return job

    def delete(self, job_id: str, user: str | None = None) -> None:
        """``DELETE /jobs/{id}``: forget the job (frees its slot)."""
        job = self.get(job_id, user)
        self._detach(job)
        del self.jobs[job.id]

    def force_status(self, job_id: str, status: str) -> Job:
        """Test hook: put a job into ``status`` now (queued/running jobs then progress normally)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
        now = self.advance()
        job = self._find(job_id, None)
        self._detach(job)
        if not job.assets:
            job.assets, job.asset_size = self._assets(job), max(0, int(self.config.asset_size))
        if job.run_duration == 0.0:
            job.run_duration = self._jittered(self.config.run_duration, job.seq, "run")
        job.end_at = None
        uq = self._queue(job.user)
        if status in ACTIVE:
            job.will_fail = self._draw(job.seq, "fail").random() < self.config.failure_rate
        if status == "queued":
            self._start_order += 1
            job.start_order = self._start_order
            job.started_at, job.eligible_at = now, now + self.config.queue_duration
            uq.queued.append(job)
        elif status == "running":
            job.running_at, job.end_at = now, now + job.run_duration
            uq.running.append(job)
        elif status in ("finished", "error"):
            job.running_at = job.running_at if job.running_at is not None else now
            job.ended_at = now
            job.will_fail = status == "error"
        elif status == "canceled":
            job.canceled_at = now
        self._set(job, status, now)
        self._log(job, "warning" if status == "error" else "info", f"Status forced to {status!r}", now)
        if status == "error":
            self._log(job, "error", "Job failed: status forced to 'error' by the simulator", now, code="Forced")
        return job

    def page(self, user: str, limit: int, before_seq: int | None) -> tuple[list[Job], int | None]:
        """Newest-first page of ``limit`` jobs older than ``before_seq``; returns (jobs, next cursor seq)."""
        jobs = [j for j in reversed(self.user_jobs(user)) if before_seq is None or j.seq < before_seq]
        page = jobs[:limit]
        return page, (page[-1].seq if len(jobs) > limit else None)

    def snapshot(self, job: Job) -> dict[str, Any]:
        """Plain-dict view of a job for tests and tooling."""
        return {
            "id": job.id,
            "seq": job.seq,
            "user": job.user,
            "title": job.title,
            "description": job.description,
            "status": job.status,
            "process": job.process,
            "process_graph": job.process_graph,
            "plan": job.plan,
            "budget": job.budget,
            "options": dict(job.options),
            "created": self.timestamp(job.created_at),
            "updated": self.timestamp(job.updated_at),
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "started_at": job.started_at,
            "running_at": job.running_at,
            "ended_at": job.ended_at,
            "ended_wall": None if job.ended_at is None else self.wall(job.ended_at),
            "canceled_at": job.canceled_at,
            "start_count": job.start_count,
            "cancel_count": job.cancel_count,
            "queue_duration": job.queue_duration,
            "run_duration": job.run_duration,
            "assets": [name for name, _ in job.assets] if job.status == "finished" else [],
        }

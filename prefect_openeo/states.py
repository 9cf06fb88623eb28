"""Row statuses and the transitions between them: pure, no I/O.

A row's ``status`` is either one of the openEO job statuses (created, queued, running, finished,
error, canceled) or one of the manager's own bookkeeping statuses (not_started, queued_for_start,
start_failed, skipped), exactly as openeo's ``MultiBackendJobManager`` writes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(str, enum.Enum):
    """Every value the ``status`` column can hold."""

    NOT_STARTED = "not_started"
    QUEUED_FOR_START = "queued_for_start"
    CREATED = "created"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"
    CANCELED = "canceled"
    START_FAILED = "start_failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


#: Statuses an openEO backend reports for a batch job.
BACKEND_STATUSES = frozenset({"created", "queued", "running", "finished", "error", "canceled"})
#: Rows waiting to be created on a backend.
PENDING = ("not_started",)
#: Rows with a job on a backend that may still change; they count against ``parallel_jobs``.
ACTIVE = ("created", "queued_for_start", "queued", "running")
#: Rows that are done, one way or another.
TERMINAL = ("finished", "error", "canceled", "start_failed", "skipped")
ALL = tuple(s.value for s in Status)


class Event(str, enum.Enum):
    """What a status change means for the manager (hooks, stats, artifacts)."""

    STARTED_RUNNING = "job started running"
    FINISHED = "job finished"
    FAILED = "job failed"
    CANCELED = "job canceled"


@dataclass(frozen=True)
class Transition:
    """The outcome of observing a backend status for a row."""

    status: str
    events: tuple[Event, ...] = ()


def observe(previous: str, reported: str, *, start_requested: bool) -> Transition:
    """Fold a status reported by the backend into a row's status.

    ``start_requested`` says whether the manager already asked the backend to start the job: a backend
    may keep reporting ``created`` for a while after that, which stays ``queued_for_start`` in the row
    (upstream's convention). A backend status never moves a row back from a terminal status.
    """
    if reported not in BACKEND_STATUSES:
        raise ValueError(f"Unknown openEO job status {reported!r}")
    if previous in TERMINAL:
        return Transition(previous)
    if reported == "created" and (start_requested or previous == "queued_for_start"):
        return Transition("queued_for_start")
    events: list[Event] = []
    if reported == "running" and previous in ("not_started", "created", "queued_for_start", "queued"):
        events.append(Event.STARTED_RUNNING)  # counted once per job, when first seen running
    if reported == "finished":
        events.append(Event.FINISHED)
    elif reported == "error":
        events.append(Event.FAILED)
    elif reported == "canceled":
        events.append(Event.CANCELED)
    return Transition(reported, tuple(events))

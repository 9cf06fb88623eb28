"""Every change of a row, as a pure function: a row (and what was learnt) to a ``Patch``.

A patch is the cells that change, the status the row was seen in when the patch was made (``expect``: a
shared job database applies it only while the row still has that status), the lifecycle events it causes
and, for a row that needs attention, the problem to report. Nothing else writes a row's cells: the engine
applies patches to the job store (``JobStore.apply``) and hands every applied one to its observers, the
CLI's ``retry`` and the cancel hook emit patches too. ``apply_to`` is the one place a patch meets a frame.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
from openeo.rest import OpenEoApiError
from openeo.util import deep_get

from prefect_openeo.frames import blank, set_cell
from prefect_openeo.schema import (
    BACKEND,
    COSTS,
    ID,
    MESSAGE,
    PLANNED,
    RESULTS,
    RETRY_AFTER,
    RETRY_COUNT,
    RUNNING_START_TIME,
    START_TIME,
    STATUS,
    TOKEN,
    usage_column_allowed,
)
from prefect_openeo.states import BACKEND_STATUSES, Event, observe

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Patch:
    """The cells of one row that change (None clears a cell), and what the change means."""

    index: Any
    cells: Mapping[str, Any]
    #: The row's status when the patch was made; a shared job database applies it only while it still is.
    expect: str | None = None
    events: tuple[Event, ...] = ()
    #: Why the row needs attention (the run's summary lists it); None: nothing new to say.
    problem: str | None = None
    #: The problem of an earlier step is resolved (the row succeeded after all).
    resolved: bool = False
    #: Usage fields the backend reported under a bookkeeping column's name (not written).
    refused_usage: tuple[str, ...] = field(default=())

    @property
    def status(self) -> str | None:
        """The row's new status, if the patch changes it."""
        return self.cells.get(STATUS)

    def __bool__(self) -> bool:
        return bool(self.cells)


def _patch(row: Row, index: Any, cells: Mapping[str, Any], **kwargs: Any) -> Patch:
    return Patch(index, dict(cells), expect=row.get(STATUS), **kwargs)


def _failed(row: Row, index: Any, status: str, message: str, **cells: Any) -> Patch:
    return _patch(row, index, {STATUS: status, MESSAGE: message, **cells}, problem=message)


# -- planning and creating ---------------------------------------------------------------------------
def planned(row: Row, index: Any, backend: str, token: str) -> Patch:
    """A ``not_started`` row is to be created on ``backend``: its token and backend, before any request."""
    return _patch(row, index, {TOKEN: token, PLANNED: backend})


def unplanned(row: Row, index: Any) -> Patch:
    """A planned creation that did not begin after all (no slot), or that reconciling showed never reached
    the backend: the row may be planned again."""
    return _patch(row, index, {TOKEN: None, PLANNED: None})


def created(row: Row, index: Any, backend: str, job_id: str, start_time: str | None) -> Patch:
    """``start_job`` returned a job: it exists on the backend, not started yet."""
    cells = {STATUS: "created", ID: job_id, BACKEND: backend}
    if start_time:
        cells[START_TIME] = start_time
    return _patch(row, index, cells)


def adopted(row: Row, index: Any, backend: str, job_id: str, created_at: str) -> Patch:
    """A recorded creation whose job the backend's listing shows (its reply was lost, or the run stopped)."""
    return _patch(row, index, {STATUS: "created", ID: job_id, BACKEND: backend, START_TIME: created_at})


def skipped(row: Row, index: Any, backend: str, start_time: str | None) -> Patch:
    """``start_job`` returned None: the row is not to be run."""
    cells = {STATUS: "skipped", BACKEND: backend}
    if start_time:
        cells[START_TIME] = start_time
    return _patch(row, index, cells)


def create_failed(row: Row, index: Any, backend: str, message: str, start_time: str | None = None) -> Patch:
    """``start_job`` raised (or returned something that is not a job). The token stays: a retry looks for
    the job first, in case the backend created it after all."""
    cells = {BACKEND: backend, **({START_TIME: start_time} if start_time else {})}
    return _failed(row, index, "start_failed", message, **cells)


def creation_uncertain(row: Row, index: Any, error: str) -> Patch:
    """The creation's answer was lost (a 5xx, a timeout): the job may exist. The row keeps its token and
    planned backend, so the next sweep looks for the job in the backend's listing (adopting it) before the
    row may be created again; it stays ``not_started``."""
    message = f"{error}; the backend may have created the job: it is looked for before the row is created again"
    return _patch(row, index, {MESSAGE: message}, problem=message)


def creation_unknowable(row: Row, index: Any, backend: str) -> Patch:
    """A recorded creation on a backend without a job listing: whether its job exists cannot be known, so it
    is not created again by itself. The token goes into the message (the job's title ends with it) and out of
    the row: once the user checked, ``prefect-openeo retry`` creates the row anew."""
    return _failed(
        row,
        index,
        "start_failed",
        f"a creation on backend {backend} was interrupted and the backend has no job listing to check whether "
        f"the job exists: look for a job whose title ends with [{row.get(TOKEN)}]; if there is none, "
        "`prefect-openeo retry` creates the row again",
        **{TOKEN: None, PLANNED: None},
    )


def untrackable(row: Row, index: Any, why: str) -> Patch:
    """An active row without a job id or a backend: nothing can track it (the run would never end)."""
    return _failed(row, index, "start_failed", f"row is {row.get(STATUS)!r} but has no {why}")


# -- starting ----------------------------------------------------------------------------------------
def start_requested(row: Row, index: Any) -> Patch:
    """The start of a created job is about to be sent (upstream's ``queued_for_start``)."""
    return _patch(row, index, {STATUS: "queued_for_start"})


def started(row: Row, index: Any) -> Patch:
    """The backend accepted the start."""
    return _patch(row, index, {STATUS: "queued"})


def start_deferred(row: Row, index: Any, why: str | None = None) -> Patch:
    """The backend refused the start for now (``ConcurrentJobLimit``, 429) or failed it (5xx, unreachable):
    started again later (a started job is not started twice: the backend only starts created jobs)."""
    return _patch(row, index, {STATUS: "created", **({MESSAGE: why} if why else {})}, problem=why)


def start_failed(row: Row, index: Any, message: str) -> Patch:
    return _failed(row, index, "start_failed", message)


# -- tracking ----------------------------------------------------------------------------------------
def format_usage(details: Mapping, field_name: str) -> str:
    """``"1234.5 cpu-seconds"``, as upstream writes usage columns."""
    value = deep_get(details, "usage", field_name, "value", default=0)
    unit = deep_get(details, "usage", field_name, "unit", default="")
    return f"{value} {unit}".strip()


def observed(
    row: Row,
    index: Any,
    reported: str,
    *,
    now: str,
    details: Mapping | None = None,
    error_reason: str | None = None,
    results_owed: bool = True,
) -> Patch:
    """What a backend's status (and, with ``details``, its job document) means for a row.

    A job first seen running gets its ``running_start_time``; usage and costs are copied from the document
    (never over a bookkeeping column); a finished job owes its result download (``results = pending``, in
    the same write as the status); a failed one gets ``error_reason`` as its message. A status the openEO
    API does not define changes nothing but says so (``problem``): the job is looked at again next sweep.
    """
    previous = row.get(STATUS)
    if reported not in BACKEND_STATUSES:
        return _patch(row, index, {}, problem=f"the backend reports status {reported!r}, which openEO does not define")
    transition = observe(previous, reported, start_requested=previous == "queued_for_start")
    cells: dict[str, Any] = {}
    if transition.status != previous:
        cells[STATUS] = transition.status
    if Event.STARTED_RUNNING in transition.events or (
        transition.status == "running" and blank(row.get(RUNNING_START_TIME))
    ):
        cells[RUNNING_START_TIME] = now
    refused: list[str] = []
    if details is not None and (transition.events or cells):
        for key in details.get("usage") or {}:
            if usage_column_allowed(key):
                cells[key] = format_usage(details, key)
            else:
                refused.append(key)
        if details.get("costs") is not None:
            cells[COSTS] = details["costs"]
    problem = None
    if transition.status == "finished" and previous != "finished":
        cells[MESSAGE] = None
        if results_owed:
            cells[RESULTS] = "pending"
    elif transition.status == "error" and previous != "error":
        problem = error_reason or "no reason given"
        cells[MESSAGE] = problem
    return _patch(
        row,
        index,
        cells,
        events=transition.events,
        problem=problem,
        resolved=transition.status == "finished",
        refused_usage=tuple(refused),
    )


def unreadable(row: Row, index: Any, why: str) -> Patch:
    """The backend's answer about the row's job could not be used (an HTML page, a missing field): the row
    keeps its status, and says why."""
    return _patch(row, index, {MESSAGE: why}, problem=why) if row.get(MESSAGE) != why else _patch(row, index, {})


def vanished(row: Row, index: Any, backend: str, http_status: int) -> Patch:
    """The backend no longer knows the job (404/410)."""
    return _failed(row, index, "error", f"job {row.get(ID)} not found on backend {backend} ({http_status})")


def cancel_sent(row: Row, index: Any, why: str) -> Patch:
    """A cancel was sent for the row's job; the backend's ``canceled`` is observed later."""
    return _patch(row, index, {MESSAGE: why})


def canceled(row: Row, index: Any, why: str) -> Patch:
    """The job was canceled by the manager itself (e.g. with its flow run), without waiting to observe it."""
    return _patch(row, index, {STATUS: "canceled", MESSAGE: why}, events=(Event.CANCELED,))


# -- downloads ---------------------------------------------------------------------------------------
def download_state(job_id: str, error: BaseException | None, attempts: int = 1) -> tuple[str, str | None]:
    """The ``results`` state a download leaves (``done``; ``gone``: the backend no longer has the job or its
    results; ``failed``) and the row's message for it."""
    if error is None:
        return "done", None
    if isinstance(error, OpenEoApiError) and error.http_status_code in (404, 410):
        return "gone", f"results of job {job_id} are gone from the backend ({error.http_status_code}): {error.message}"
    return "failed", f"on_job_done failed after {attempts} attempt(s): {error!r}"


def download_ended(row: Row, index: Any, state: str, message: str | None) -> Patch:
    """A finished job's result download ended ``done``, ``failed`` or ``gone`` (see ``download_state``)."""
    if state == "done":
        return _patch(row, index, {RESULTS: "done", MESSAGE: None}, resolved=True)
    return _patch(row, index, {RESULTS: state, MESSAGE: message}, problem=message)


def download_again(row: Row, index: Any) -> Patch:
    """A failed download is owed again (a new run gives it another go)."""
    return _patch(row, index, {RESULTS: "pending"})


# -- retries -----------------------------------------------------------------------------------------
#: Cells a reset row gets back empty: what belonged to its last job.
JOB_CELLS = (ID, START_TIME, RUNNING_START_TIME, RESULTS)


def reset(
    row: Row,
    index: Any,
    *,
    message: str | None = None,
    retry_count: int | None = None,
    retry_after: str | None = None,
) -> Patch:
    """Back to ``not_started`` for another job. A ``start_failed`` row keeps its creation token: its job may
    exist after all (the backend created it, the answer was lost), so the next run looks for it in the
    backend's listing before creating another. Any other row gets a new token when planned again."""
    cells: dict[str, Any] = {STATUS: "not_started", MESSAGE: message, RETRY_COUNT: retry_count}
    cells[RETRY_AFTER] = retry_after
    cells.update(dict.fromkeys(JOB_CELLS))
    if row.get(STATUS) != "start_failed":
        cells.update({TOKEN: None, PLANNED: None})
    return _patch(row, index, cells)


def retry_scheduled(row: Row, index: Any, limit: int, backoff: float, now: datetime.datetime) -> Patch | None:
    """An ``error``/``start_failed`` row gets another go after ``backoff * 2**n`` seconds, up to ``limit``
    retries (None once they are used up)."""
    count = 0 if blank(row.get(RETRY_COUNT)) else int(row[RETRY_COUNT])
    if count >= limit:
        return None
    delay = backoff * (2**count)
    after = (now + datetime.timedelta(seconds=delay)).isoformat().replace("+00:00", "Z")
    job = "" if blank(row.get(ID)) else f" (job {row[ID]})"
    reason = "" if blank(row.get(MESSAGE)) else f": {row[MESSAGE]}"
    history = f"attempt {count + 1} ended {row.get(STATUS)}{job}{reason}; retry {count + 1}/{limit} after {delay:g} s"
    return reset(row, index, message=history, retry_count=count + 1, retry_after=after)


# -- applying ----------------------------------------------------------------------------------------
def apply_to(df: pd.DataFrame, patch: Patch) -> None:
    """Write a patch's cells into a frame holding its row (adding columns, widening dtypes as needed)."""
    for column, value in patch.cells.items():
        set_cell(df, patch.index, column, value)


def merge(patches: Iterable[Patch]) -> dict[Any, Patch]:
    """The patches of each row folded into one write, in order: later cells win, the first ``expect`` holds
    (the status the row had before any of them), events add up."""
    merged: dict[Any, Patch] = {}
    for patch in patches:
        before = merged.get(patch.index)
        merged[patch.index] = (
            patch
            if before is None
            else replace(
                patch, cells={**before.cells, **patch.cells}, expect=before.expect, events=before.events + patch.events
            )
        )
    return merged

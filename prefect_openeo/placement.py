"""Which ``not_started`` rows go to which backend: pure functions, no I/O.

A backend's free slots are its budget less its active rows and its unresolved creations (rows with a
recorded creation token whose job may or may not exist yet: they hold their slot until reconciled).
Rows are taken in order; a row whose ``backend_name`` is set is pinned to that backend; the others go to
the first backend (in registration order) with a free slot. Rows waiting for a retry are skipped.
"""

from __future__ import annotations

import collections
import math
import uuid
from collections.abc import Mapping
from typing import Any

import pandas as pd
from openeo.util import rfc3339

from prefect_openeo.frames import blank
from prefect_openeo.schema import RETRY_AFTER

#: The marker at the start of every creation token; a token also ends the title of the job it names, so a
#: rerun finds the job of an interrupted creation in the backend's job listing.
TOKEN_PREFIX = "poj-"


def new_token() -> str:
    """A fresh creation token."""
    return f"{TOKEN_PREFIX}{uuid.uuid4().hex[:12]}"


def free_slots(budgets: Mapping[str, int], active: Mapping[str, int], unresolved: Mapping[str, int]) -> dict[str, int]:
    """Slots each backend has left: its budget less active jobs and unresolved creations."""
    return {name: budget - active.get(name, 0) - unresolved.get(name, 0) for name, budget in budgets.items()}


def worker_room(
    free: Mapping[str, int],
    budgets: Mapping[str, int],
    mine: Mapping[str, int],
    workers: int,
    spare: Mapping[str, int],
) -> tuple[dict[str, int], dict[str, int]]:
    """Slots one of ``workers`` workers sharing a job database may fill now, and those it leaves to the others.

    A worker fills free slots up to its fair share of each backend's budget (``ceil(budget / workers)``) less
    the slots it holds (``mine``): the worker that sees a job end (and refills at once) does not keep every
    slot from workers that joined later. Slots it left free at its previous claim (``spare``) that are still
    free are its too: a share that no other worker fills stays idle for one sweep at most. Returns the room
    per backend and the free slots left (the next claim's ``spare``).
    """
    room: dict[str, int] = {}
    left: dict[str, int] = {}
    for name, budget in budgets.items():
        available = max(0, free.get(name, 0))
        share = max(0, math.ceil(budget / max(1, workers)) - mine.get(name, 0))
        room[name] = min(available, share + min(spare.get(name, 0), available))
        left[name] = available - room[name]
    return room, left


#: The shortest expected job duration (seconds) a backend's speed is compared with.
MIN_DURATION = 0.001


def speed_caps(
    expected: Mapping[str, float],
    slots: Mapping[str, int],
    waiting: Mapping[str, int],
) -> dict[str, tuple[int, str]]:
    """How many rows a slower backend may start now so that the last rows end soonest, and why.

    ``expected``: a backend's expected time from creation to end (learnt in this run; backends not in it are
    not capped and do not count as faster); ``slots``: its slots; ``waiting``: ``not_started`` rows by the
    backend they are pinned to (``""``: not pinned). In the time a backend ``b`` takes for a job, the
    backends faster than it end about ``sum(slots_f * d_b / d_f)`` rows; ``b`` may start the unpinned rows
    beyond those, and its pinned ones. Returns the caps of the backends that are capped by this (fewer rows
    than are waiting and than its slots), each with a sentence that says why.
    """
    unpinned = waiting.get("", 0)
    caps: dict[str, tuple[int, str]] = {}
    # A job seen ended at once (within a clock tick) took some time all the same.
    expected = {name: max(duration, MIN_DURATION) for name, duration in expected.items()}
    for name, duration in expected.items():
        faster = {f: d for f, d in expected.items() if d < duration and slots.get(f, 0) > 0}
        if not faster or not unpinned:
            continue
        clearable = sum(slots[f] * duration / d for f, d in faster.items())
        room = max(0, math.floor(unpinned - clearable))
        if room >= min(unpinned, slots.get(name, unpinned)):  # not fewer than it could start anyway
            continue
        quicker = ", ".join(f"{f}: {d:.0f} s" for f, d in sorted(faster.items(), key=lambda kv: kv[1]))
        why = (
            f"backend {name!r} starts {room} of the {unpinned} waiting row(s): its jobs take about {duration:.0f} s, "
            f"and in that time the faster backends ({quicker} per job) end about {clearable:.0f}"
        )
        caps[name] = (room + waiting.get(name, 0), why)
    return caps


def assign_rows(candidates: pd.DataFrame, free: Mapping[str, int], order: list[str]) -> dict[str, list]:
    """Rows (in order) to backends with free slots: a row's preset ``backend_name`` pins it; others go
    to the first backend in ``order`` with room. Rows waiting for a retry (``retry_after``) are skipped."""
    free = dict(free)
    plan: dict[str, list] = collections.defaultdict(list)
    if candidates.empty or sum(max(0, f) for f in free.values()) <= 0:
        return plan
    now = rfc3339.now_utc()
    for index, row in candidates.iterrows():
        if not blank(row.get(RETRY_AFTER)) and str(row[RETRY_AFTER]) > now:
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


def unregistered(rows: pd.DataFrame, known: list[str]) -> pd.DataFrame:
    """Rows that name a backend not in ``known`` (pinned there, or with their job there): nothing tends them."""
    if rows.empty or "backend_name" not in rows.columns:
        return rows.iloc[0:0]
    names = rows["backend_name"]
    return rows[~names.map(blank) & ~names.isin(known)]


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

"""Which ``not_started`` rows go to which backend: pure functions, no I/O.

A backend's free slots are its budget less its active rows and its unresolved creations (rows with a
recorded creation token whose job may or may not exist yet: they hold their slot until reconciled).
Rows are taken in order; a row whose ``backend_name`` is set is pinned to that backend; the others go to
the first backend (in registration order) with a free slot. Rows waiting for a retry are skipped.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Mapping
from typing import Any

import pandas as pd
from openeo.util import rfc3339

from prefect_openeo.frames import blank

RETRY_AFTER_COLUMN = "retry_after"
#: The marker at the start of every creation token; a token also ends the title of the job it names, so a
#: rerun finds the job of an interrupted creation in the backend's job listing.
TOKEN_PREFIX = "poj-"


def new_token() -> str:
    """A fresh creation token."""
    return f"{TOKEN_PREFIX}{uuid.uuid4().hex[:12]}"


def free_slots(budgets: Mapping[str, int], active: Mapping[str, int], unresolved: Mapping[str, int]) -> dict[str, int]:
    """Slots each backend has left: its budget less active jobs and unresolved creations."""
    return {name: budget - active.get(name, 0) - unresolved.get(name, 0) for name, budget in budgets.items()}


def assign_rows(candidates: pd.DataFrame, free: Mapping[str, int], order: list[str]) -> dict[str, list]:
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

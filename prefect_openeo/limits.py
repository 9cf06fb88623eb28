"""Per-backend slot budgets shared by every flow run: Prefect global concurrency limits with leases.

Each job holds one slot of the limit ``openeo-<backend>`` from just before it is created until it ends;
the slot is a lease, renewed while the run goes on, so a flow run that dies frees its slots when the
leases expire. The limit is created with the backend's ``parallel_jobs`` when it does not exist yet;
set it lower or higher in the UI (Concurrency) to change the budget of all deployments together.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound

from prefect_openeo.engine import SlotGate
from prefect_openeo.settings import settings

_log = logging.getLogger("prefect_openeo")


def limit_name(backend: str) -> str:
    return f"openeo-{backend}"


def waiting_name(backend: str) -> str:
    """The limit whose slots count the runs refused a slot of ``limit_name(backend)`` (one lease per run while
    it waits): the API shows no other sign of a waiting acquisition."""
    return f"openeo-{backend}-waiting"


#: Slots of a waiting room: never the bound.
WAITING_ROOM = 1_000_000


@dataclass(frozen=True)
class _Waiting:
    """The key of this run's lease in the waiting room of ``backend``."""

    backend: str


class GlobalConcurrencyGate(SlotGate):
    """Slots from Prefect global concurrency limits, one lease per job.

    Slots are taken in the backend's lane, just before its jobs are created; giving them back and renewing
    them goes through one background thread, so the Prefect API's latency never holds up the sweeps.
    """

    def __init__(self, parallel_jobs: dict[str, int], lease_seconds: float | None = None, poll_sleep: float = 60.0):
        #: Lease length (seconds); renewed when less than a third is left.
        self.lease_seconds = settings.concurrency_lease_seconds if lease_seconds is None else lease_seconds
        #: How long slots this run gave back stay left to other runs' waiting acquisitions: a few sweeps.
        self.yield_seconds = max(2.0, 3.0 * poll_sleep)
        self._client = get_client(sync_client=True)
        self._client.__enter__()
        #: Per row: its lease, when it was last renewed, and its backend.
        self._leases: dict[Any, tuple[UUID, float, str]] = {}
        #: Per backend: slots this run gave back (their release landed) that it leaves to waiting runs, and since when.
        self._owed: dict[str, tuple[int, float]] = {}
        #: Per backend: when the limit last refused this run a slot.
        self._denied_at: dict[str, float] = {}
        self._lock = threading.Lock()
        #: Per backend: releases queued whose call has not ended yet (``acquire`` waits for them).
        self._releasing: dict[str, int] = {}
        self._released = threading.Condition(self._lock)
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="prefect-openeo-limits", daemon=True)
        self._thread.start()
        for backend, slots in parallel_jobs.items():
            self._ensure_limit(limit_name(backend), slots)
            self._ensure_limit(waiting_name(backend), WAITING_ROOM, quiet=True)

    def _ensure_limit(self, name: str, slots: int, quiet: bool = False) -> None:
        try:
            self._client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                self._client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                if not quiet:
                    _log.info(f"Created global concurrency limit {name!r} with {slots} slots")
            except Exception as e:  # created meanwhile by another run
                _log.debug(f"Could not create {name!r}: {e!r}")

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call()
            except Exception as e:  # a slot not given back in time expires with its lease
                _log.warning(f"Global concurrency limit: {e!r}")

    def acquire(self, backend: str, indices: list) -> list:
        """Slots for ``indices``, one lease each, while the limit has free ones (``_room_beside_waiters``).
        Slots this run gave back are first seen given back (their calls end), up to a few seconds."""
        with self._released:
            self._released.wait_for(lambda: not self._releasing.get(backend), timeout=5.0)
        if indices:
            indices = indices[: self._room_beside_waiters(backend, len(indices))]
        granted = []
        for index in indices:
            try:
                response = self._client.increment_concurrency_slots_with_lease(
                    names=[limit_name(backend)], slots=1, mode="concurrency", lease_duration=self.lease_seconds
                )
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status == 423:  # no slot free now: this run waits (other runs see it in the waiting room)
                    with self._lock:
                        self._denied_at[backend] = time.monotonic()
                        waits = _Waiting(backend) in self._leases
                    if not waits:
                        self._take_lease(waiting_name(backend), _Waiting(backend), backend)
                else:
                    _log.warning(f"Could not take a slot of {limit_name(backend)!r}: {e!r}")
                break
            with self._lock:
                self._leases[index] = (UUID(response.json()["lease_id"]), time.monotonic(), backend)
            granted.append(index)
        if granted:
            self.release(_Waiting(backend))  # no longer waiting
        return granted

    def _take_lease(self, name: str, key: Any, backend: str) -> None:
        try:
            response = self._client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=self.lease_seconds
            )
        except Exception as e:  # the others do not see this run wait: they take what they release back
            _log.debug(f"Could not take a slot of {name!r}: {e!r}")
            return
        with self._lock:
            self._leases[key] = (UUID(response.json()["lease_id"]), time.monotonic(), backend)

    def _room_beside_waiters(self, backend: str, wanted: int) -> int:
        """How many of ``wanted`` slots to try for. Fair to other runs: the slots this run gave back are left free
        while another run waits (holds a lease in the backend's waiting room, ``waiting_name``), for
        ``yield_seconds`` at most, until others took them; so the run whose job ended does not take every slot
        back in the sweeps after it freed them. A run refused a slot itself lately waits too and leaves nothing."""
        now = time.monotonic()
        with self._lock:
            owed, since = self._owed.get(backend, (0, now))
            waits_too = now - self._denied_at.get(backend, -math.inf) < self.yield_seconds
            if not owed or waits_too or now - since > self.yield_seconds:
                self._owed.pop(backend, None)
                return wanted
        try:
            limit = self._client.read_global_concurrency_limit_by_name(limit_name(backend))
            room = self._client.read_global_concurrency_limit_by_name(waiting_name(backend))
        except Exception as e:  # the API is slow or away: try for them all, as without waiters
            _log.debug(f"Could not read {limit_name(backend)!r}: {e!r}")
            return wanted
        free = max(0, limit.limit - limit.active_slots)
        with self._lock:
            waiting = room.active_slots - (1 if _Waiting(backend) in self._leases else 0)
        owed = min(owed, free)  # the rest were taken by others meanwhile
        with self._lock:
            if not owed or waiting <= 0:
                self._owed.pop(backend, None)
                return wanted
            self._owed[backend] = (owed, since)
        return max(0, min(wanted, free - owed))

    def _owe(self, backend: str) -> None:
        """A slot of ``backend`` was given back: leave it to waiting runs (``_room_beside_waiters``)."""
        with self._lock:
            owed, since = self._owed.get(backend, (0, time.monotonic()))
            self._owed[backend] = (owed + 1, since)

    def release(self, index: Any) -> None:
        with self._lock:
            lease = self._leases.pop(index, None)
            if lease is not None:
                self._releasing[lease[2]] = self._releasing.get(lease[2], 0) + 1
        if lease is not None:
            owes = not isinstance(index, _Waiting)
            self._calls.put(lambda: self._release(*lease, owes=owes))

    def _release(self, lease_id: UUID, _renewed: float, backend: str, owes: bool = True) -> None:
        try:
            self._client.release_concurrency_slots_with_lease(lease_id)
            if owes:
                self._owe(backend)
        finally:
            with self._released:
                self._releasing[backend] -= 1
                self._released.notify_all()

    def renew(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                (i, lease_id)
                for i, (lease_id, renewed, _) in self._leases.items()
                if now - renewed > self.lease_seconds / 3
            ]
            for index, lease_id in due:
                self._leases[index] = (lease_id, now, self._leases[index][2])
        for _, lease_id in due:
            self._calls.put(
                lambda lease_id=lease_id: self._client.renew_concurrency_lease(lease_id, self.lease_seconds)
            )

    def close(self, wait: float = 30.0) -> None:
        """Give every slot back (waiting up to ``wait`` seconds for the API; leases expire otherwise)."""
        with self._lock:
            indices = list(self._leases)
        for index in indices:
            self.release(index)
        self._calls.put(None)
        self._thread.join(wait)
        if self._thread.is_alive():
            _log.warning("Not every global concurrency slot could be given back in time: their leases expire")
            return
        self._client.__exit__(None, None, None)

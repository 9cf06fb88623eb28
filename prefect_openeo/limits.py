"""Per-backend slot budgets shared by every flow run: Prefect global concurrency limits with leases.

Each job holds one slot of the limit ``openeo-<backend>`` from just before it is created until it ends;
the slot is a lease, renewed while the run goes on, so a flow run that dies frees its slots when the
leases expire. The limit is created with the backend's ``parallel_jobs`` when it does not exist yet;
set it lower or higher in the UI (Concurrency) to change the budget of all deployments together.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound

from prefect_openeo.engine import SlotGate

_log = logging.getLogger("prefect_openeo")

#: Lease length (seconds); renewed when less than a third is left.
LEASE_SECONDS = 900.0


def limit_name(backend: str) -> str:
    return f"openeo-{backend}"


class GlobalConcurrencyGate(SlotGate):
    """Slots from Prefect global concurrency limits, one lease per job.

    Slots are taken in the backend's lane, just before its jobs are created; giving them back and renewing
    them goes through one background thread, so the Prefect API's latency never holds up the sweeps.
    """

    def __init__(self, parallel_jobs: dict[str, int], lease_seconds: float = LEASE_SECONDS):
        self.lease_seconds = lease_seconds
        self._client = get_client(sync_client=True)
        self._client.__enter__()
        self._leases: dict[Any, tuple[UUID, float]] = {}
        self._lock = threading.Lock()
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="prefect-openeo-limits", daemon=True)
        self._thread.start()
        for backend, slots in parallel_jobs.items():
            name = limit_name(backend)
            try:
                self._client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    self._client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
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
        granted = []
        for index in indices:
            try:
                response = self._client.increment_concurrency_slots_with_lease(
                    names=[limit_name(backend)], slots=1, mode="concurrency", lease_duration=self.lease_seconds
                )
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status != 423:  # 423: no slot free now
                    _log.warning(f"Could not take a slot of {limit_name(backend)!r}: {e!r}")
                break
            with self._lock:
                self._leases[index] = (UUID(response.json()["lease_id"]), time.monotonic())
            granted.append(index)
        return granted

    def release(self, index: Any) -> None:
        with self._lock:
            lease = self._leases.pop(index, None)
        if lease is not None:
            self._calls.put(lambda: self._client.release_concurrency_slots_with_lease(lease[0]))

    def renew(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                (i, lease_id)
                for i, (lease_id, renewed) in self._leases.items()
                if now - renewed > self.lease_seconds / 3
            ]
            for index, lease_id in due:
                self._leases[index] = (lease_id, now)
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

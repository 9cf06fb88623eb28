"""Per-backend slot budgets shared by every flow run: Prefect global concurrency limits with leases.

Each job holds one slot of the limit ``openeo-<backend>`` from just before it is created until it ends;
the slot is a lease, renewed while the run goes on, so a flow run that dies frees its slots when the
leases expire. The limit is created with the backend's ``parallel_jobs`` when it does not exist yet;
set it lower or higher in the UI (Concurrency) to change the budget of all deployments together.
"""

from __future__ import annotations

import logging
import time
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
    """Slots from Prefect global concurrency limits, one lease per job."""

    def __init__(self, parallel_jobs: dict[str, int], lease_seconds: float = LEASE_SECONDS):
        self.lease_seconds = lease_seconds
        self._client = get_client(sync_client=True)
        self._client.__enter__()
        self._leases: dict[Any, tuple[UUID, float]] = {}
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

    def acquire(self, backend: str, indices: list) -> list:
        granted = []
        for index in indices:
            response = None
            try:
                response = self._client.increment_concurrency_slots_with_lease(
                    names=[limit_name(backend)], slots=1, mode="concurrency", lease_duration=self.lease_seconds
                )
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status != 423:  # 423: no slot free now
                    _log.warning(f"Could not take a slot of {limit_name(backend)!r}: {e!r}")
                break
            self._leases[index] = (UUID(response.json()["lease_id"]), time.monotonic())
            granted.append(index)
        return granted

    def release(self, index: Any) -> None:
        lease = self._leases.pop(index, None)
        if lease is not None:
            try:
                self._client.release_concurrency_slots_with_lease(lease[0])
            except Exception as e:
                _log.warning(f"Could not release a slot (lease {lease[0]}): {e!r}")

    def renew(self) -> None:
        now = time.monotonic()
        for index, (lease_id, renewed) in list(self._leases.items()):
            if now - renewed > self.lease_seconds / 3:
                try:
                    self._client.renew_concurrency_lease(lease_id, self.lease_seconds)
                    self._leases[index] = (lease_id, now)
                except Exception as e:
                    _log.warning(f"Could not renew lease {lease_id}: {e!r}")

    def close(self) -> None:
        for index in list(self._leases):
            self.release(index)
        self._client.__exit__(None, None, None)

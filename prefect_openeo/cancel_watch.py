"""A flow run that obeys a cancel by itself: it reads its own state from the Prefect API.

Prefect stops a cancelled flow run through its runner or worker, which watches for ``Cancelling`` runs; that
watch can die with the API ("Cancellation observer failed. Flow run cancellation disabled.") and the run then
goes on creating paid jobs. So a run also looks for itself: a daemon thread reads, every
``settings.cancel_check_seconds``, the states of the flow run and of the flow runs it is a subflow of (a
tile-and-run parent, a fan-out coordinator), in one request; once any is ``Cancelling`` or ``Cancelled`` the
run stops creating jobs at its next sweep (the engine's ``should_stop``). A request that fails (the server is
down) is tried again next time; the engine never waits for one.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from uuid import UUID

from prefect_openeo.settings import settings

_log = logging.getLogger("prefect_openeo")

#: Prefect state types that ask a run to stop.
STOP_TYPES = ("CANCELLING", "CANCELLED")
#: How many levels of parent flow runs are watched.
MAX_ANCESTORS = 5


class CancelWatch:
    """``watch()`` is True once the flow run ``flow_run_id`` (or a flow run it is a subflow of) is asked to
    cancel; ``reason`` then says which run and its state. Call ``start()`` to begin, ``stop()`` to end."""

    def __init__(self, flow_run_id: UUID | str, every: float | None = None):
        self.flow_run_id = UUID(str(flow_run_id))
        self.every = settings.cancel_check_seconds if every is None else every
        self.reason: str | None = None
        self._watched: list[UUID] | None = None  # the run and the runs above it, found on the first answer
        self._stopped = threading.Event()
        self._requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def __call__(self) -> bool:
        return self._requested.is_set()

    def start(self) -> CancelWatch:
        self._thread = threading.Thread(target=self._loop, name="prefect-openeo-cancel-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def check(self) -> bool:
        """Read the watched runs' states once (the thread does this every ``every`` seconds)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            if self._watched is None:
                self._watched = _lineage(client, self.flow_run_id)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=self._watched)))
        for run in runs:
            if run.state is not None and run.state.type.value in STOP_TYPES:
                which = "this flow run" if run.id == self.flow_run_id else f"flow run {run.name!r} ({run.id})"
                self.reason = f"{which} is {run.state.name}"
                self._requested.set()
                return True
        return False

    def _loop(self) -> None:
        while not self._stopped.wait(self.every):
            try:
                if self.check():
                    _log.warning(f"Cancel requested: {self.reason}; no more jobs are created")
                    return
                self._failures = 0
            except Exception as e:  # the API is away: look again next time
                self._failures += 1
                if self._failures == 1:
                    _log.warning(f"Could not read this flow run's state from Prefect ({e!r}): trying again")


def _lineage(client: Any, flow_run_id: UUID) -> list[UUID]:
    """The flow run and the flow runs it is a subflow of, nearest first."""
    ids = [flow_run_id]
    run = client.read_flow_run(flow_run_id)
    for _ in range(MAX_ANCESTORS):
        if run.parent_task_run_id is None:
            break
        parent_task = client.read_task_run(run.parent_task_run_id)
        if parent_task.flow_run_id is None:
            break
        run = client.read_flow_run(parent_task.flow_run_id)
        ids.append(run.id)
    return ids

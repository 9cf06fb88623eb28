"""Campaign runs in chunks: no flow run's graph holds more job task runs than Prefect's UI can draw.

Prefect's UI refuses to draw the graph of a flow run of more than 10,000 nodes. The first
``settings.task_runs_per_run`` jobs' task runs belong to the flow run itself (a run of that size or less
looks as it always did); each further block of as many jobs gets a subflow run of its own (named after the
run, ``…-jobs-5001-10000``), a node of the run's graph and a row of its Subflow Runs tab, that lists them.
The run keeps the failures' log lines and the artifacts, which cover all its jobs. Jobs count in the order
the run first reported them (the order it started them).

A chunk's subflow run is made (a placeholder task run in the parent, as Prefect makes one for a subflow, and
the subflow run under it) before the first state of its first job is sent: the server files task runs under
a flow run that exists. It ends with the run: Failed when one of its jobs failed (the graph shows where the
failures are), Cancelled when some were left unfinished, else Completed; its message counts them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect.client.schemas.actions import FlowRunCreate, TaskRunCreate
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun, TaskRunPolicy
from prefect.states import Cancelled, Completed, Failed, Running, State, to_state_create

#: Tag of the placeholder task runs and subflow runs that hold a chunk of a campaign's jobs.
CHUNK_TAG = "openeo-chunk"


@dataclass
class Chunk:
    """One block of jobs in a subflow run of their own."""

    number: int
    first: int
    last: int
    placeholder_id: uuid.UUID = field(default_factory=uuid.uuid4)
    flow_run_id: uuid.UUID | None = None


class ChunkRuns:
    """Which flow run holds each job's task run, and the subflow runs of the chunks.

    :param flow_run_id: the run the user started (None outside a flow run: no chunks).
    :param size: job task runs per flow run.
    """

    def __init__(self, flow_run_id: uuid.UUID | None, size: int):
        self.flow_run_id, self.size = flow_run_id, max(1, size)
        self._order: dict[Any, int] = {}
        self._chunks: dict[int, Chunk] = {}
        self._parent: FlowRun | None = None

    def place(self, index: Any) -> int:
        """The chunk of a job (0: the run itself), fixed at its first report."""
        order = self._order.setdefault(index, len(self._order))
        return order // self.size if self.flow_run_id is not None else 0

    def flow_run_of(self, index: Any) -> uuid.UUID | None:
        """The flow run a job's task run belongs to (``ensure`` made it)."""
        number = self.place(index)
        return self.flow_run_id if number == 0 else self._chunks[number].flow_run_id

    def ensure(self, client: Any, index: Any) -> None:
        """Make the subflow run of a job's chunk, if it is not made yet (a failed request raises: tried again)."""
        number = self.place(index)
        chunk = self._chunks.get(number)
        if number == 0 or (chunk is not None and chunk.flow_run_id is not None):
            return
        if chunk is None:
            first = number * self.size
            chunk = self._chunks[number] = Chunk(number, first + 1, first + self.size)
        if self._parent is None:
            self._parent = client.read_flow_run(self.flow_run_id)
        parent, name = self._parent, f"jobs {chunk.first}-{chunk.last}"
        placeholder = TaskRunCreate(
            id=chunk.placeholder_id,
            name=name,
            flow_run_id=parent.id,
            task_key="openeo-job-chunk",
            dynamic_key=f"chunk-{number}",
            empirical_policy=TaskRunPolicy(),
            tags=[CHUNK_TAG],
            task_inputs={},
            state=to_state_create(Running()),
        )
        _ok(client.request("POST", "/task_runs/", json=placeholder.model_dump(mode="json", exclude_unset=True)))
        run = FlowRunCreate(
            flow_id=parent.flow_id,
            flow_version=parent.flow_version,
            name=f"{parent.name}-jobs-{chunk.first}-{chunk.last}",
            parameters={},
            context={},
            tags=sorted({*parent.tags, CHUNK_TAG}),
            parent_task_run_id=chunk.placeholder_id,
            state=to_state_create(Running()),
            idempotency_key=f"{parent.id}-{CHUNK_TAG}-{number}",  # an answer lost: the same run, not another
        )
        created = _ok(client.request("POST", "/flow_runs/", json=run.model_dump(mode="json", exclude_unset=True)))
        chunk.flow_run_id = uuid.UUID(created.json()["id"])

    def finish(self, client: Any, task_runs: Mapping[Any, TaskRun]) -> None:
        """End every chunk's subflow run and placeholder in the state its jobs' task runs say."""
        by_chunk: dict[int, Counter] = {number: Counter() for number in self._chunks}
        for index, task_run in task_runs.items():
            number = self.place(index)
            if number in by_chunk:
                kind = task_run.state_type if task_run.state is not None else None
                by_chunk[number][kind] += 1
        for number, chunk in sorted(self._chunks.items()):
            if chunk.flow_run_id is None:
                continue
            held = sum(by_chunk[number].values())
            if 0 < held < self.size:  # the last chunk: named after the jobs it holds
                label = f"jobs {chunk.first}-{chunk.first + held - 1}"
                client.update_flow_run(chunk.flow_run_id, name=f"{self._parent.name}-{label.replace(' ', '-')}")
                path = {"id": chunk.placeholder_id}
                _ok(client.request("PATCH", "/task_runs/{id}", path_params=path, json={"name": label}))
            state = chunk_state(by_chunk[number])
            client.set_flow_run_state(chunk.flow_run_id, state, force=True)
            client.set_task_run_state(chunk.placeholder_id, state.model_copy(), force=True)


def _ok(response: Any) -> Any:
    response.raise_for_status()
    return response


def chunk_state(counts: Mapping[StateType | None, int]) -> State:
    """The final state of a chunk from how many of its jobs' task runs are in which state type."""
    failed, cancelled = counts.get(StateType.FAILED, 0), counts.get(StateType.CANCELLED, 0)
    done = counts.get(StateType.COMPLETED, 0)
    total = sum(counts.values())
    unfinished = total - failed - cancelled - done
    kinds = ((done, "completed"), (failed, "failed"), (cancelled, "canceled"), (unfinished, "unfinished"))
    message = f"{total:,} job{'s' if total != 1 else ''}: " + ", ".join(f"{n:,} {what}" for n, what in kinds if n)
    if failed:
        return Failed(message=message)
    if unfinished:
        return Cancelled(message=message)
    return Completed(message=message)

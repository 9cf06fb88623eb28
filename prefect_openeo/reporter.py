"""The reporter: one background thread per flow run sends what the run shows in Prefect (per-job task-run
states with a log line for each failure, events, artifacts), so that the engine's loop never waits on the
Prefect API.

Task-run states travel as Prefect's own task engine sends them: client-orchestrated ``prefect.task-run.*``
events (one websocket, no request per state), which the server's task-run recorder turns into task runs and
states, in bulk, keeping each state's own timestamp (when the run saw the job's status). The reporter sends
them over an events client of its own, made once (not Prefect's global events worker, which copies the
context and looks up related resources for every event), so that an event not sent stays owed here and is
tried again. Logs and artifacts go through the REST API.

Updates are coalesced while they wait: the latest state per row (a terminal state is kept, never replaced by
a later one), the latest data per artifact. Events are kept in order, bounded: past ``max_events`` waiting,
events of non-terminal transitions are dropped first. A slow or unreachable API slows the reporting, never
the jobs: a failed request is tried again later (backing off), with whatever newer updates came meanwhile.
``close`` sends what is left, waiting a bounded time, and says what it could not send.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate, LogCreate
from prefect.client.schemas.objects import TaskRun, TaskRunPolicy
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.states import Cancelled, Completed, Failed, Pending, Running, State
from prefect.utilities.text import truncated_to

from prefect_openeo.chunk_runs import ChunkRuns
from prefect_openeo.settings import settings
from prefect_openeo.states import TERMINAL

_log = logging.getLogger("prefect_openeo")

#: Waits after a failed request: the first, and the longest (seconds).
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
#: Statuses that emit an ``openeo.job.<status>`` event: a job's creation (it costs from then on) and its end,
#: what automations act on. Its waiting and running are its task run's states (``prefect.task-run.*``
#: events too): one event per transition more would double what a campaign writes to Prefect's database.
JOB_EVENTS = frozenset({"created", *TERMINAL})
#: Statuses whose task run gets a log line saying why, and how it says they ended.
ENDED = {"error": "ended in error", "start_failed": "could not be started", "canceled": "was canceled"}


def prefect_state(status: str, message: str | None = None, timestamp: datetime.datetime | None = None) -> State:
    """The Prefect state that shows a row's status in the UI. Final states carry the names Prefect's UI
    filters by (Completed, Failed, Cancelled; a skipped row: Skipped); the openEO status is in the message
    where the row has none (a job that could not be started: "start_failed: <reason>")."""
    extra: dict[str, Any] = {"timestamp": timestamp} if timestamp is not None else {}
    if status in ("not_started", "created", "queued_for_start", "queued"):
        name = "".join(part.capitalize() for part in status.split("_"))
        return Pending(name=name, message=message, **extra)
    if status == "running":
        return Running(message=message, **extra)
    if status == "finished":
        return Completed(message=message or "finished", **extra)
    if status == "skipped":
        return Completed(name="Skipped", message=message, **extra)
    if status == "canceled":
        return Cancelled(message=message or "canceled", **extra)
    if status == "error":
        return Failed(message=message or "error", **extra)
    if status == "start_failed":
        return Failed(message=f"start_failed: {message}" if message else "start_failed", **extra)
    raise ValueError(f"Unknown status {status!r}")


@dataclass(frozen=True)
class RowUpdate:
    """A row's new status, as the engine saw it."""

    index: Any
    status: str
    backend: str | None
    job_id: str | None
    message: str | None
    at: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def coalesce(updates: list[RowUpdate]) -> list[RowUpdate]:
    """A row's waiting updates: its first ``running`` one (Prefect takes a task run's start time and run
    count from its Running state: without it a job that ran while the API was away or the reporter behind
    shows 0 s), its terminal ones, in order, and the latest."""
    first_running = next((u for u in updates[:-1] if u.status == "running"), None)
    return [u for u in updates[:-1] if u.terminal or u is first_running] + updates[-1:]


@dataclass
class _Artifact:
    key: str
    type: str
    description: str
    #: The data, or a function that makes it (called in the reporter's thread: e.g. drawing pictures).
    data: Any
    once: bool = False
    #: Also on the flow run this one is a subflow of (e.g. tile-and-run's): the run a user lands on shows it.
    on_parent: bool = False


@dataclass
class Unreported:
    """What ``close`` could not send in time."""

    rows: list = field(default_factory=list)
    events: int = 0
    dropped_events: int = 0
    artifacts: list[str] = field(default_factory=list)
    error: str | None = None

    def __bool__(self) -> bool:
        return bool(self.rows or self.events or self.dropped_events or self.artifacts)

    def __str__(self) -> str:
        parts = []
        if self.rows:
            shown = ", ".join(str(i) for i in self.rows[:10]) + (", ..." if len(self.rows) > 10 else "")
            parts.append(f"the task-run states of {len(self.rows)} row(s) ({shown})")
        if self.events or self.dropped_events:
            parts.append(f"{self.events + self.dropped_events} event(s)")
        if self.artifacts:
            parts.append(f"artifact(s) {', '.join(self.artifacts)}")
        why = f" (last error: {self.error})" if self.error else ""
        return "; ".join(parts) + why


#: Longest state message an event carries (as Prefect's task engine).
MAX_MESSAGE = 100_000
#: Task-run fields the server fills itself (as Prefect's task engine leaves them out).
TASK_RUN_NOT_SENT = {
    "id",
    "created",
    "updated",
    "flow_run_id",
    "state_id",
    "state_type",
    "state_name",
    "state",
    "estimated_start_time_delta",
    "estimated_run_time",
}


class _EventsSender:
    """An events client of the reporter's own (the API of the caller's settings), on an event loop of its
    thread: ``send`` returns once the events are written to the websocket, or raises (they stay owed). A lost
    connection is opened again, the events it had not confirmed sent again (Prefect's client)."""

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._client = get_events_client(reconnection_attempts=3)
        self._loop.run_until_complete(self._client.__aenter__())

    def send(self, events: list[Event]) -> None:
        self._loop.run_until_complete(self._send(events))

    async def _send(self, events: list[Event]) -> None:
        for event in events:
            await self._client.emit(event)

    def __exit__(self, *exc: Any) -> None:
        try:
            self._loop.run_until_complete(self._client.__aexit__(None, None, None))
        finally:
            self._loop.close()


class Reporter:
    """Sends row states, events and artifacts of one flow run to the Prefect API from its own thread.

    :param flow_run_id: the flow run the task runs, logs, events and artifacts belong to.
    :param task: the task whose runs mirror jobs (its key, version and tags).
    :param client_factory: makes the (sync) Prefect client, in the reporter's thread.
    :param name: how a row's task run is named, from its first update.
    :param tags: extra tags of a row's task run, from its first update.
    :param max_events: events waiting, at most (then non-terminal ones are dropped, and counted).
    :param linger: seconds to let updates gather before sending them.
    :param task_runs_per_run: job task runs in the flow run at most; more go into subflow runs (``chunk_runs``).
    """

    def __init__(
        self,
        flow_run_id: uuid.UUID | None,
        task: Any,
        client_factory: Callable[[], Any],
        *,
        name: Callable[[RowUpdate], str] = lambda u: f"row {u.index}",
        tags: Callable[[RowUpdate], list[str]] = lambda u: [],
        max_events: int | None = None,
        linger: float | None = None,
        task_runs_per_run: int | None = None,
    ):
        self.flow_run_id = flow_run_id
        per_run = settings.task_runs_per_run if task_runs_per_run is None else task_runs_per_run
        self._chunks = ChunkRuns(flow_run_id, per_run)
        #: The events thread's REST client (made when a chunk's subflow run is first needed).
        self._chunk_client: Any = None
        self._task = task
        self._client_factory = client_factory
        self._name, self._tags = name, tags
        #: Events waiting to be sent, at most (then non-terminal ones are dropped); how long updates gather.
        self._max_events = settings.reporter_max_events if max_events is None else max_events
        self._linger = settings.reporter_linger if linger is None else linger
        self._lock = threading.Condition()
        self._rows: dict[Any, list[RowUpdate]] = {}
        self._events: collections.deque[RowUpdate] = collections.deque()
        self._artifacts: dict[str, _Artifact] = {}
        #: Log lines of failures not sent yet (their request failed).
        self._logs: list[LogCreate] = []
        self._closing = False
        #: ``close`` stopped waiting: the thread ends after the request it may be stuck in.
        self._abandoned = False
        #: Task-run ids, chosen here (so events can name them before they exist); the task runs as sent.
        self._ids: dict[Any, uuid.UUID] = {}
        self._task_runs: dict[Any, TaskRun] = {}
        self._artifact_ids: dict[str, uuid.UUID] = {}
        #: Per thread: the batch it is sending.
        self._in_flight: dict[str, dict] = {"events": {}, "rest": {}}
        self._events_done = False
        self.dropped_events = 0
        self.failures = 0
        self.last_error: str | None = None
        self.sent = collections.Counter()
        context = contextvars.copy_context()  # the settings (API URL) of the caller
        #: Started with the first update (a run that fails before its first sweep leaves no thread behind):
        #: one hands states and events to Prefect's events client, one sends logs and artifacts over REST, so
        #: that a slow or hung request never holds the states up.
        self._threads = {
            lane: threading.Thread(
                target=context.copy().run, args=(self._run, lane), name=f"prefect-openeo-reporter-{lane}", daemon=True
            )
            for lane in ("events", "rest")
        }

    # -- the engine's side: hand over, never wait ---------------------------------------------------
    def row(self, update: RowUpdate) -> None:
        """A row's new status: its task run's state (and an ``openeo.job.*`` event, for ``JOB_EVENTS``)."""
        with self._lock:
            self._start()
            self._ids.setdefault(update.index, uuid.uuid4())
            self._chunks.place(update.index)
            self._rows[update.index] = coalesce([*self._rows.get(update.index, []), update])
            if update.status in JOB_EVENTS and (len(self._events) < self._max_events or self._drop_an_event(update)):
                self._events.append(update)
            self._lock.notify_all()

    def task_run_id(self, index: Any) -> uuid.UUID | None:
        """The id of a row's task run (known from its first update on, before it is created)."""
        with self._lock:
            return self._ids.get(index)

    def artifact(
        self, key: str, type: str, data: Any, description: str = "", *, once: bool = False, on_parent: bool = False
    ) -> None:
        """Create the artifact ``key`` (``progress``, ``table``: JSON-able records, ``markdown``), or update it
        in place (one card per key): only the latest data waiting is sent. ``data`` may be a function that
        makes it. ``once``: created once, never updated (e.g. the summary). ``on_parent``: also created on the
        flow run this one is a subflow of, if any."""
        with self._lock:
            self._start()
            self._artifacts[key] = _Artifact(key, type, description, data, once, on_parent)
            self._lock.notify_all()

    def _start(self) -> None:
        if self._threads["events"].ident is None and not self._closing:
            for thread in self._threads.values():
                thread.start()

    def close(self, timeout: float) -> Unreported:
        """Send what is waiting, for at most ``timeout`` seconds; what could not be sent."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads.values():
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._abandoned = any(thread.is_alive() for thread in self._threads.values())
            self._lock.notify_all()
            events, rest = self._in_flight["events"], self._in_flight["rest"]
            return Unreported(
                rows=sorted({*self._rows, *events.get("rows", {})}, key=lambda i: (str(type(i)), i)),
                events=len(self._events) + len(events.get("events", [])),
                dropped_events=self.dropped_events,
                artifacts=sorted({*self._artifacts, *rest.get("artifacts", {})}),
                error=self.last_error,
            )

    def _drop_an_event(self, incoming: RowUpdate) -> bool:
        """The queue is full: drop its oldest non-terminal event; whether ``incoming`` may join (a non-terminal
        one is dropped when only terminal events wait)."""
        for i, waiting in enumerate(self._events):
            if not waiting.terminal:
                del self._events[i]
                self.dropped_events += 1
                return True
        if incoming.terminal:  # only terminal events wait: keep them all
            return True
        self.dropped_events += 1
        return False

    # -- the reporter's threads -----------------------------------------------------------------------
    def _waiting(self, lane: str) -> bool:
        if lane == "events":
            return bool(self._rows or self._events)
        return bool(self._logs or self._artifacts)

    def _take(self, lane: str) -> dict:
        if lane == "events":
            batch = {"rows": self._rows, "events": list(self._events)}
            self._rows, self._events = {}, collections.deque()
        else:
            batch = {"logs": self._logs, "artifacts": self._artifacts}
            self._logs, self._artifacts = [], {}
        self._in_flight[lane] = batch
        return batch

    def _ready(self, lane: str) -> bool:
        """Whether ``lane`` has work, or may end: closing, and (for logs and artifacts) no more states to come."""
        ends = self._closing and (lane == "events" or self._events_done)
        return self._waiting(lane) or ends

    def _run(self, lane: str) -> None:
        client = None
        backoff = 0.0
        try:
            while not self._abandoned:
                if backoff:
                    time.sleep(backoff)  # after a failure, even while closing: never hammer an API that is down
                with self._lock:
                    self._lock.wait_for(lambda: self._ready(lane))
                    if not self._closing:  # let a burst come in whole (a sweep's created and queued: one write)
                        self._lock.wait_for(lambda: self._closing, self._linger)
                    if not self._waiting(lane):
                        if self._ready(lane):
                            break  # closing, and nothing left
                        continue
                    batch = self._take(lane)
                try:
                    if lane == "events":
                        if client is None:
                            client = _EventsSender()
                        self._send_states(client, batch)
                    else:
                        if client is None:
                            client = self._open_client()
                        self._send_rest(client, batch)
                    backoff = 0.0
                except Exception as e:  # the API is slow or down: keep what is left, try again later
                    self.failures += 1
                    self.last_error = repr(e)[:300]
                    if self.failures == 1:
                        _log.warning(f"Could not report to the Prefect API ({e!r}); trying again, the run goes on")
                    backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, 2 * backoff))
                finally:
                    with self._lock:
                        if not self._abandoned:  # else ``close`` has said what was left
                            self._put_back(self._in_flight[lane])
                            self._in_flight[lane] = {}
        finally:
            if lane == "events":
                if not self._abandoned:
                    self._finish_chunks()
                with self._lock:
                    self._events_done = True
                    self._lock.notify_all()
            if client is not None:
                client.__exit__(None, None, None)

    def _put_back(self, batch: dict) -> None:
        """Return what a batch did not send, merged with what came meanwhile (the newer wins)."""
        self._logs[:0] = batch.get("logs", [])
        for index, updates in batch.get("rows", {}).items():
            if updates:
                self._rows[index] = coalesce([*updates, *self._rows.get(index, [])])
        self._events.extendleft(reversed(batch.get("events", [])))
        for key, artifact in batch.get("artifacts", {}).items():
            self._artifacts.setdefault(key, artifact)

    def _send_states(self, sender: _EventsSender, batch: dict) -> None:
        """Send a batch's states and events, removing from it what was sent; the failures' log lines go to the
        REST thread."""
        events, rows = batch["events"], batch["rows"]
        for index in list(rows):
            while rows[index]:
                update = rows[index][0]
                if self._chunks.place(index):
                    self._chunks.ensure(self._rest_for_chunks(), index)
                task_run, state_events = self._state_events(update)
                sender.send(state_events)
                self._task_runs[index] = task_run  # sent: the next state follows this one
                rows[index].pop(0)
                self.sent["states"] += 1
                if update.status in ENDED and update.message:
                    with self._lock:
                        self._logs.append(self._log_line(update))
                        self._lock.notify_all()
            del rows[index]
        while events:  # after the states: an event names its row's task run
            sender.send([self._job_event(events[0])])
            events.pop(0)
            self.sent["events"] += 1

    def _open_client(self) -> Any:
        """A REST client of the caller's API, entered (the caller exits it)."""
        client = self._client_factory()
        client.__enter__()
        return client

    def _rest_for_chunks(self) -> Any:
        if self._chunk_client is None:
            self._chunk_client = self._open_client()
        return self._chunk_client

    def _finish_chunks(self) -> None:
        """End the chunks' subflow runs in the state of their jobs (once, as the events thread ends)."""
        if self._chunk_client is None:
            return
        try:
            self._chunks.finish(self._chunk_client, self._task_runs)
        except Exception as e:
            self.failures += 1
            self.last_error = repr(e)[:300]
            _log.warning(f"Could not end the subflow runs that hold this run's jobs: {e!r}")
        finally:
            self._chunk_client.__exit__(None, None, None)
            self._chunk_client = None

    def _send_rest(self, client: Any, batch: dict) -> None:
        """Send a batch's log lines and artifacts, removing from it what was sent."""
        logs, artifacts = batch["logs"], batch["artifacts"]
        if logs:
            client.create_logs(logs)
            self.sent["logs"] += len(logs)
            logs.clear()
        for key in list(artifacts):
            self._send_artifact(client, artifacts[key])
            del artifacts[key]
            self.sent["artifacts"] += 1

    def _state_events(self, update: RowUpdate) -> tuple[TaskRun, list[Event]]:
        """The row's task run moves to the state of ``update``: a ``prefect.task-run.<state>`` event as Prefect's
        task engine emits it, with the task run's times and run count kept here as that engine keeps them.

        A job seen ended (finished, error) that was never seen running ran between two looks: its task run
        gets a Running state at the last look before (so it shows the time it may have run, not 0 s)."""
        state = prefect_state(update.status, update.message, update.at)
        task_run = self._task_runs.get(update.index)
        if task_run is None:
            task_run = TaskRun(
                id=self._ids[update.index],
                name=self._name(update),
                flow_run_id=self._chunks.flow_run_of(update.index),
                task_key=self._task.task_key,
                dynamic_key=f"row-{update.index}",
                task_version=self._task.version,
                empirical_policy=TaskRunPolicy(),
                tags=sorted({*self._task.tags, *self._tags(update)}),
                task_inputs={},
                expected_start_time=state.timestamp,
            )
        else:
            task_run = task_run.model_copy()  # changed here, kept once its events are sent
            task_run.name = self._name(update)  # the job's id, once known
        previous = task_run.state
        events = []
        if update.status in ("finished", "error") and not task_run.run_count and previous is not None:
            events.append(
                self._move(task_run, Running(timestamp=previous.timestamp, message="running (between two looks)"))
            )
        events.append(self._move(task_run, state))
        return task_run, events

    def _move(self, task_run: TaskRun, state: State) -> Event:
        """``task_run`` moves to ``state`` (its times and run count): the event that says so."""
        previous = task_run.state
        if previous is not None and state.timestamp <= previous.timestamp:  # the server keeps the latest only
            state.timestamp = previous.timestamp + datetime.timedelta(microseconds=1)
        state.state_details.task_run_id = task_run.id
        state.state_details.flow_run_id = task_run.flow_run_id
        if previous is not None and previous.is_running():
            task_run.total_run_time += state.timestamp - previous.timestamp
        if state.is_running() and not (previous is not None and previous.is_running()):
            task_run.run_count += 1
            task_run.start_time = task_run.start_time or state.timestamp
        if state.is_final():
            task_run.end_time = state.timestamp
        task_run.state, task_run.state_id = state, state.id
        task_run.state_type, task_run.state_name = state.type, state.name
        return self._task_run_event(task_run, previous, state)

    def _task_run_event(self, task_run: TaskRun, previous: State | None, state: State) -> Event:
        """The event Prefect's task engine emits for a state change (``emit_task_run_state_change_event``), with
        the flow run named explicitly: the server's task-run recorder makes the task run from it."""

        def described(s: State) -> dict:
            details = s.state_details.model_dump(
                mode="json", exclude_none=True, exclude_unset=True, exclude={"flow_run_id", "task_run_id"}
            )
            return {"type": s.type.value, "name": s.name, "message": truncated_to(MAX_MESSAGE, s.message)} | {
                "state_details": details
            }

        related = [
            {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
            for tag in sorted(task_run.tags)
        ]
        if task_run.flow_run_id is not None:
            related.append(
                {"prefect.resource.id": f"prefect.flow-run.{task_run.flow_run_id}", "prefect.resource.role": "flow-run"}
            )
        return Event(
            id=state.id,
            occurred=state.timestamp,
            event=f"prefect.task-run.{state.name}",
            payload={
                "intended": {"from": previous.type.value if previous else None, "to": state.type.value},
                "initial_state": described(previous) if previous else None,
                "validated_state": described(state) | {"data": None},
                "task_run": task_run.model_dump(mode="json", exclude_none=True, exclude=TASK_RUN_NOT_SENT),
            },
            resource={
                "prefect.resource.id": f"prefect.task-run.{task_run.id}",
                "prefect.resource.name": task_run.name,
                "prefect.run-count": str(task_run.run_count),
                "prefect.state-message": truncated_to(MAX_MESSAGE, state.message),
                "prefect.state-name": state.name or "",
                "prefect.state-timestamp": state.timestamp.isoformat(),
                "prefect.state-type": state.type.value,
                "prefect.orchestration": "client",
            },
            related=related,
        )

    def _log_line(self, update: RowUpdate) -> LogCreate:
        job = f" (job {update.job_id})" if update.job_id else ""
        return LogCreate(
            name="prefect_openeo",
            level=logging.WARNING if update.status == "canceled" else logging.ERROR,
            message=f"Row {update.index} {ENDED[update.status]} on backend {update.backend}{job}: {update.message}",
            timestamp=update.at,
            flow_run_id=self.flow_run_id,
            task_run_id=self._ids[update.index],
        )

    def _job_event(self, update: RowUpdate) -> Event:
        """``openeo.job.<status>`` about ``openeo.job.<backend>.<job id>``, related to the flow run and the
        row's task run (for Automations)."""
        backend = update.backend or "none"
        job_id = update.job_id or f"row-{update.index}"
        related = [
            {"prefect.resource.id": f"prefect.task-run.{self._ids[update.index]}", "prefect.resource.role": "task-run"}
        ]
        if self.flow_run_id is not None:
            related.append(
                {"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}", "prefect.resource.role": "flow-run"}
            )
        return Event(
            occurred=update.at,
            event=f"openeo.job.{update.status}",
            resource={
                "prefect.resource.id": f"openeo.job.{backend}.{job_id}",
                "prefect.resource.name": f"row {update.index} @ {backend}",
                "openeo.row": str(update.index),
                "openeo.backend": backend,
                "openeo.job_id": job_id,
                "openeo.status": update.status,
            },
            related=related,
            payload={"message": update.message},
        )

    def _send_artifact(self, client: Any, artifact: _Artifact) -> None:
        data = artifact.data() if callable(artifact.data) else artifact.data
        if artifact.type == "table":
            data = json.dumps(data)
        artifact.data = data  # made once, even if sending fails
        artifact_id = self._artifact_ids.get(artifact.key)
        if artifact_id is None or artifact.once:
            created = client.create_artifact(
                ArtifactCreate(
                    key=artifact.key,
                    type=artifact.type,
                    description=artifact.description,
                    data=data,
                    flow_run_id=self.flow_run_id,
                )
            )
            self._artifact_ids[artifact.key] = created.id
        else:
            client.update_artifact(artifact_id, ArtifactUpdate(data=data, description=artifact.description))
        parent = self._parent_flow_run_id(client) if artifact.on_parent else None
        if parent is not None:
            client.create_artifact(
                ArtifactCreate(
                    key=artifact.key,
                    type=artifact.type,
                    description=f"{artifact.description} (of subflow run {self.flow_run_id})",
                    data=data,
                    flow_run_id=parent,
                )
            )
            artifact.on_parent = False  # sent: not again if a later batch fails

    def _parent_flow_run_id(self, client: Any) -> uuid.UUID | None:
        """The flow run that this reporter's flow run is a subflow of (None: none, or no flow run)."""
        if self.flow_run_id is None:
            return None
        parent_task = client.read_flow_run(self.flow_run_id).parent_task_run_id
        return client.read_task_run(parent_task).flow_run_id if parent_task is not None else None

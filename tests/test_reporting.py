"""Reporting to Prefect never holds the jobs up: one background reporter per run hands task-run states, log
lines, events and artifacts to the API, coalesced and bounded, and flushes them at the end of the run.

The API is a real one (the session's Prefect server); a slow API is that server behind a real HTTP proxy
that delays every request, an unreachable one a real socket that accepts connections and never answers.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import re
import socket
import threading
import time
from pathlib import Path

import openeo
import pandas as pd
import pytest
import requests
from conftest import job_events, ndvi_job, settled_task_runs, tiles_df

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.settings import settings

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("prefect_api")]


class SlowApi:
    """A real HTTP proxy in front of the Prefect API that waits ``delay`` seconds before each request, and
    counts them by method and path (ids replaced by ``{id}``)."""

    def __init__(self, target: str, delay: float):
        self.target, self.delay = target.rstrip("/"), delay
        self.counts: collections.Counter = collections.Counter()
        self.created: set[str] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                time.sleep(proxy.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                proxy.counts[(self.command, re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", path))] += 1
                if (self.command, path) == ("POST", "/api/task_runs/"):
                    proxy.created.add(json.loads(body)["dynamic_key"])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = requests.request(
                    self.command, proxy.target + self.path.removeprefix("/api"), data=body, headers=headers
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def writes(self, kind: str) -> int:
        """Requests that created a task run (``create``) or set its state (``state``)."""
        key = ("POST", "/api/task_runs/") if kind == "create" else ("POST", "/api/task_runs/{id}/set_state")
        return self.counts[key]

    def close(self) -> None:
        self.server.shutdown()


@contextlib.contextmanager
def unanswering_api():
    """A TCP server that accepts connections and never answers; yields its API URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    finally:
        stop.set()
        for connection in held:
            connection.close()
        listener.close()


def reporter_client_for(monkeypatch, url: str, timeout: float = 60.0) -> None:
    """The reporter's Prefect client talks to ``url``; the flow run itself keeps the real API."""
    from prefect.client.orchestration import SyncPrefectClient

    from prefect_openeo import observe

    monkeypatch.setattr(
        observe, "get_client", lambda sync_client=True: SyncPrefectClient(url, httpx_settings={"timeout": timeout})
    )


def run_in_flow(sim, tmp_path: Path, rows: int, **kwargs):
    """``run_jobs`` of the drop-in manager inside a user's flow; the flow run's final state."""
    from prefect import flow

    @flow(name="user-flow")
    def user_flow() -> dict:
        manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "results", **kwargs)
        manager.add_backend("sim", connection=openeo.connect(sim.url), parallel_jobs=4)
        return dict(manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(rows), start_job=ndvi_job))

    return user_flow(return_state=True)


def test_task_run_states_need_no_request_each_and_keep_the_jobs_times(openeo_simulator, tmp_path, monkeypatch):
    """Behind a REST API that answers each request 0.4 s late, the task-run states do not wait on it: they
    travel as Prefect's task engine sends them (``prefect.task-run.*`` events, recorded by the server), so no
    request creates a task run or sets a state; at the end every per-job task run is in its row's final state,
    with the times the run saw (a finished job ran: start time, run count, run time); only the failures' log
    lines go through the slow API."""
    from prefect.settings import PREFECT_API_URL

    from prefect_openeo.observe import prefect_state

    openeo_simulator.config.failure_rate = 0.4
    proxy = SlowApi(PREFECT_API_URL.value(), delay=0.4)
    try:
        reporter_client_for(monkeypatch, proxy.url)
        state = run_in_flow(openeo_simulator, tmp_path, rows=12)
    finally:
        proxy.close()
    assert state.is_completed(), state
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert set(df["status"]) <= {"finished", "error"} and (df["status"] == "error").any()
    runs = {run.name.split(" ")[1]: run for run in settled_task_runs(state.state_details.flow_run_id, 12)}
    assert len(runs) == 12
    for index, row in df.iterrows():
        run = runs[str(index)]
        assert run.state.is_final() and run.state.name == prefect_state(row["status"]).name
        assert f"backend:{row['backend_name']}" in run.tags
        if row["status"] == "finished":  # it ran: its Running state is kept (coalesced away, it showed 0 s)
            assert run.run_count == 1 and run.start_time is not None, run
            assert run.total_run_time.total_seconds() > 0
            assert run.end_time - run.start_time == run.total_run_time
    assert proxy.writes("create") == proxy.writes("state") == 0, proxy.counts
    assert proxy.counts[("POST", "/api/logs/")] >= 1  # the failures' log lines


def test_an_unreachable_api_never_holds_the_jobs_up_and_the_run_says_what_it_could_not_report(
    openeo_simulator, tmp_path, monkeypatch
):
    """The reporter's API accepts connections and never answers (a request would wait 600 s): the jobs run
    at their pace all the same, the end of the run waits for the reporter a bounded time, and the flow run's
    log says what could not be reported."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    monkeypatch.setattr(settings, "flush_timeout", 3.0)
    started = time.monotonic()
    with unanswering_api() as url:
        reporter_client_for(monkeypatch, url, timeout=600)
        state = run_in_flow(openeo_simulator, tmp_path, rows=8)
    took = time.monotonic() - started
    assert state.is_completed(), state
    assert state.result()["job finished"] == 8
    assert set(pd.read_csv(tmp_path / "jobs.csv")["status"]) == {"finished"}
    assert took < 200, "a single report waited on would have taken 600 s"
    logs = []
    with get_client(sync_client=True) as client:
        for _ in range(100):  # logs arrive asynchronously
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
            if any("Could not report to Prefect" in log.message for log in logs):
                break
            time.sleep(0.2)
    (warning,) = [log.message for log in logs if "Could not report to Prefect" in log.message]
    assert "artifact(s)" in warning and "job database has every row" in warning
    # The task-run states do not need that API: they went with the run's events.
    runs = settled_task_runs(state.state_details.flow_run_id, 8)
    assert len(runs) == 8 and all(run.state.is_completed() for run in runs)


def test_events_waiting_are_bounded_terminal_ones_kept(tmp_path):
    """With a REST API that never answers, at most ``max_events`` events wait: non-terminal ones are dropped
    first; the task-run states are handed to Prefect's events client all the same."""
    from prefect.client.orchestration import SyncPrefectClient

    from prefect_openeo.observe import openeo_batch_job
    from prefect_openeo.reporter import Reporter, RowUpdate

    with unanswering_api() as url:
        reporter = Reporter(
            None,
            openeo_batch_job,
            lambda: SyncPrefectClient(url, httpx_settings={"timeout": 600}),
            max_events=10,
            linger=30,  # all updates are handed over before anything is sent
        )
        for index in range(20):
            for status in ("created", "queued", "running", "error" if index % 2 else "finished"):
                reporter.row(RowUpdate(index, status, "sim", f"j-{index}", None))
        left = reporter.close(timeout=30.0)  # returns once the states are sent: no log line or artifact waits
    assert left.rows == []  # every row's states were sent, without the REST API
    # events of creations and ends only: the 20 creations dropped, the 20 terminal ones kept past the bound
    assert left.events == 0 and left.dropped_events == 20
    assert reporter.sent["states"] == 20 * 2 and reporter.sent["events"] == 20
    assert reporter.failures == 0, reporter.last_error  # each sent at the first try
    assert "20 event(s)" in str(left)


def test_a_failed_jobs_reason_is_in_its_task_run_log_event_and_summary(openeo_simulator, tmp_path):
    """The backend's reason: the row's message, the task run's Failed state message and a log line of that
    task run, the ``openeo.job.error`` event's payload, the summary artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterTaskRunId,
    )

    openeo_simulator.config.failure_rate = 1.0
    state = run_in_flow(openeo_simulator, tmp_path, rows=2)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["error", "error"]
    runs = {run.name.split(" ")[1]: run for run in settled_task_runs(flow_run_id, 2)}
    with get_client(sync_client=True) as client:
        events = job_events(client, flow_run_id, {"name": ["openeo.job.error"]}, lambda ev: len(ev) >= 2)
        (summary,) = [
            a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            if a.key.endswith("-summary")
        ]
        for index, row in df.iterrows():
            reason = row["message"]
            assert "simulated error" in reason
            run = runs[str(index)]
            assert run.state.is_failed() and run.state.message == reason
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])))
            assert [log.message for log in logs] == [
                f"Row {index} ended in error on backend sim (job {row['id']}): {reason}"
            ]
            (event,) = [e for e in events if e["resource"]["openeo.job_id"] == row["id"]]
            assert event["payload"]["message"] == reason
            assert {"prefect.resource.id": f"prefect.task-run.{run.id}", "prefect.resource.role": "task-run"} in [
                {k: r[k] for k in ("prefect.resource.id", "prefect.resource.role")} for r in event["related"]
            ]
            assert f"| {index} | sim | {row['id']} | error | {reason} |" in summary.data
    assert "**2 of 2 rows ended in error**" in summary.data


def test_the_status_table_is_one_card_refreshed_at_most_every_interval(tmp_path):
    """Sweeps after sweeps with rows changing: the job database is read for the table once per interval
    (here: once), the progress follows each sweep, and the run's end refreshes the same card."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    from prefect_openeo import create_job_db
    from prefect_openeo.observe import PrefectObserver

    db = create_job_db(tmp_path / "jobs.csv", df=tiles_df(20))
    reads = collections.Counter()
    get_by_status = db.get_by_status

    def counting(*args, **kwargs):
        reads["get_by_status"] += 1
        return get_by_status(*args, **kwargs)

    db.get_by_status = counting

    @flow(name="table-flow")
    def table_flow():
        observer = PrefectObserver(table_interval=3600)
        for index in range(20):
            rows = db.get_by_indices([index]).copy()
            rows.at[index, "status"], rows.at[index, "backend_name"] = "finished", "sim"
            db.persist(rows)
            observer.sweep_done(db, {})
        assert reads["get_by_status"] == 1  # 20 sweeps, the table made at the first
        observer.run_done(db, {"job finished": 20}, {})
        assert reads["get_by_status"] == 2  # and at the run's end
        return get_run_context().flow_run.id

    flow_run_id = table_flow()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_kind = collections.Counter(a.type for a in artifacts)
    assert by_kind == {"progress": 1, "table": 1, "markdown": 2}
    (table,) = [a for a in artifacts if a.type == "table"]
    assert json.loads(table.data) == [{"backend": "sim", "finished": 20, "costs": 0.0}]
    (progress,) = [a for a in artifacts if a.type == "progress"]
    assert progress.data == 100.0


def test_summary_links_open_in_a_browser(tmp_path):
    from prefect_openeo.observe import result_link, summary_markdown

    assert (
        result_link("j-1", "https://bucket.s3.example.org/run/job_j-1")
        == "[j-1](https://bucket.s3.example.org/run/job_j-1)"
    )
    assert result_link("j-1", "s3://bucket/run/job_j-1") == "`j-1`: `s3://bucket/run/job_j-1`"
    local = tmp_path / "results" / "job_j-1"
    assert result_link("j-1", local) == f"`j-1`: `{local.resolve()}`"

    long_reason = "ExecutorLost: " + "x" * 400 + " | with a pipe"
    df = pd.DataFrame(
        {
            "status": ["finished", "error", "start_failed"],
            "backend_name": ["s3", "s3", None],
            "id": ["j-1", "j-2", None],
            "message": [None, long_reason, "start_job raised ValueError('no band B99')"],
        }
    )
    text = summary_markdown(df, {}, {}, job_dir=lambda job_id: f"s3://bucket/run/job_{job_id}", root="s3://bucket/run")
    assert "**2 of 3 rows failed (1 error, 1 start_failed)**" in text
    assert "`s3://bucket/run/job_j-1`" in text and "file://" not in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert row.startswith("| 1 | s3 | j-2 | error | ExecutorLost: xxx") and row.endswith("… |")
    assert len(row) < 350 and "start_job raised ValueError('no band B99')" in text  # a reason as long as a row's


def test_a_campaign_larger_than_a_run_holds_puts_further_jobs_in_subflow_runs(openeo_simulator, tmp_path, monkeypatch):
    """Prefect draws no graph of more than 10,000 nodes: past ``task_runs_per_run`` jobs (lowered to 4 here),
    each further block of jobs has a subflow run of its own, a node of the run's graph; every job keeps its
    task run, final and matching its row; a block with a failed job ends Failed, the others Completed."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterTags,
    )

    from prefect_openeo.observe import prefect_state

    monkeypatch.setattr(settings, "task_runs_per_run", 4)

    def start_job(row, connection, **kwargs):
        if row.name == 9:
            raise ValueError("no such collection")
        return ndvi_job(row, connection, **kwargs)

    @flow(name="campaign-flow")
    def campaign() -> dict:
        manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "results")
        manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=3)
        return dict(manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(10), start_job=start_job))

    state = campaign(return_state=True)
    assert state.is_completed(), state
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert df["status"].tolist() == ["finished"] * 9 + ["start_failed"]
    main = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(main)
        chunks = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[main]))
        )
        chunks = sorted(chunks, key=lambda run: run.name)
        assert [run.name for run in chunks] == [f"{parent.name}-jobs-5-8", f"{parent.name}-jobs-9-10"]
        placeholders = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[main]), tags=TaskRunFilterTags(all_=["openeo-chunk"])
            )
        )
        assert sorted(run.name for run in placeholders) == ["jobs 5-8", "jobs 9-10"]
        assert {run.parent_task_run_id for run in chunks} == {run.id for run in placeholders}
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": main}).json()
    kinds = collections.Counter(node["kind"] for _, node in graph["nodes"])
    assert kinds["flow-run"] == 2, kinds
    rows = {}
    for run_id, held in ((main, 4), (chunks[0].id, 4), (chunks[1].id, 2)):
        runs = settled_task_runs(run_id, held)
        assert len(runs) == held and all(run.state.is_final() for run in runs), runs
        rows.update({int(run.name.split(" ")[1]): run for run in runs})
    assert sorted(rows) == list(range(10))
    for index, row in df.iterrows():
        assert rows[index].state.name == prefect_state(row["status"]).name
    deadline = time.monotonic() + 30  # the chunks end with the run (force-set as the reporter closes)
    with get_client(sync_client=True) as client:
        while True:
            ended = [client.read_flow_run(run.id).state for run in chunks]
            if all(s.is_final() for s in ended) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert [s.type.value for s in ended] == ["COMPLETED", "FAILED"], ended
    assert [s.message for s in ended] == ["4 jobs: 4 completed", "2 jobs: 1 completed, 1 failed"]

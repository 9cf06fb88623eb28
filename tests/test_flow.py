"""The manager loop as a Prefect flow, on a real Prefect API, against the simulator."""

from __future__ import annotations

import collections
import json

import openeo
import pandas as pd
import pytest
from conftest import job_events, max_overlap, ndvi_job, settled_task_runs, tiles_df

from prefect_openeo import MultiBackendJobManager, create_job_db

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("prefect_api")]


def flow_run_records(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return task_runs, artifacts


def test_flow_runs_jobs_with_task_runs_states_and_artifacts(openeo_simulator_factory, tmp_path, monkeypatch):
    from prefect_openeo.flows import run_openeo_jobs

    monkeypatch.setenv("SIM_B_PASSWORD", "password")  # secrets are named in parameters, never given

    sim_a = openeo_simulator_factory("a", failure_rate=0.3, seed=7)
    sim_b = openeo_simulator_factory("b", failure_rate=0.3, seed=7)
    state = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"a": sim_a.url, "b": {"url": sim_b.url, "username": "user", "password": {"env": "SIM_B_PASSWORD"}}},
        start_job=ndvi_job,
        parallel_jobs={"a": 3, "b": 2},
        poll_sleep=0.2,
        root_dir=str(tmp_path / "results"),
        df=tiles_df(10),
        return_state=True,
    )
    assert state.is_completed(), state
    stats = state.result()
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert set(df["status"]) <= {"finished", "error"} and len(df) == 10
    assert stats["job finished"] == (df["status"] == "finished").sum()
    assert stats["job failed"] == (df["status"] == "error").sum() > 0
    # The flow run says what happened; the stats stay its result.
    assert state.message == f"{stats['job failed']} of 10 rows ended in error"

    settled_task_runs(state.state_details.flow_run_id, 10)
    task_runs, artifacts = flow_run_records(state.state_details.flow_run_id)
    # One task run per job whose state follows the backend job, tagged to be found among the others.
    mirrors = {t.name: t for t in task_runs if "openeo-job" in t.tags}
    assert len(mirrors) == 10
    for index, row in df.iterrows():
        run = mirrors[f"row {index} @ {row['backend_name']} ({row['id']})"]
        assert f"backend:{row['backend_name']}" in run.tags
        assert run.state.name == {"finished": "Completed", "error": "Failed"}[row["status"]]  # the UI's filters
        assert run.state.is_completed() if row["status"] == "finished" else run.state.is_failed()
        if row["status"] == "error":  # the backend's reason, as in the row
            assert run.state.message == row["message"] and "simulated error" in row["message"]
    # Bookkeeping stays small: one task run per backend sweep that asked the backend something (creating,
    # starting and sweeping together); none per download or for error logs (read by the sweep).
    kinds = collections.Counter(t.name.split(" ")[0] for t in task_runs if "openeo-job" not in t.tags)
    assert set(kinds) == {"sweep"}, kinds
    assert kinds["sweep"] <= 2 * stats["run_jobs loop"]
    assert stats["job download"] == (df["status"] == "finished").sum()
    assert all(t.state.is_final() for t in task_runs)

    # One card per artifact kind: progress, the status table (updated in place), the summary, the pictures.
    by_type = collections.defaultdict(list)
    for artifact in artifacts:
        by_type[artifact.type].append(artifact)
    assert sorted(a.key.rsplit("-", 1)[1] for a in artifacts) == ["pictures", "progress", "status", "summary"]
    assert by_type["progress"][0].data == 100.0
    finished, failed = (df["status"] == "finished").sum(), (df["status"] == "error").sum()
    assert (
        failed
        and by_type["progress"][0].description
        == f"Rows ended: {finished} finished, {failed} failed, 0 to go, of 10 rows"
    )
    (table,) = by_type["table"]
    by_backend = {r["backend"]: r for r in json.loads(table.data)}
    for name, group in df.groupby("backend_name"):
        assert by_backend[name]["costs"] == pytest.approx(group["costs"].sum())
        assert by_backend[name]["cpu"].endswith(" cpu-seconds")
        assert sum(by_backend[name].get(s, 0) for s in ("finished", "error")) == len(group)
    (summary,) = [a for a in by_type["markdown"] if a.key.endswith("-summary")]
    assert "# openEO job run" in summary.data and state.message in summary.data
    (pictures,) = [a for a in by_type["markdown"] if a.key.endswith("-pictures")]
    assert "![Jobs per backend over time](data:image/png;base64," in pictures.data
    assert (tmp_path / "results" / "openeo-jobs-timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Results as plain paths (a browser opens no file:// link from a web page), reasons of failed rows.
    assert "file://" not in summary.data
    for job_id in df.loc[df["status"] == "finished", "id"]:
        assert f"`{tmp_path / 'results' / f'job_{job_id}'}`" in summary.data
    assert "## Why rows failed" in summary.data
    for index, row in df[df["status"] == "error"].iterrows():
        assert f"| {index} | {row['backend_name']} | {row['id']} | error | {row['message']} |" in summary.data


def test_dropin_manager_inside_a_user_flow_runs_steps_as_tasks(openeo_simulator, tmp_path):
    from prefect import flow

    @flow
    def my_flow() -> dict:
        manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path)
        manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
        return dict(manager.run_jobs(job_db=tmp_path / "jobs.parquet", df=tiles_df(3), start_job=ndvi_job))

    state = my_flow(return_state=True)
    assert state.is_completed()
    assert state.result()["job finished"] == 3
    settled_task_runs(state.state_details.flow_run_id, 3)
    task_runs, _ = flow_run_records(state.state_details.flow_run_id)
    names = {t.name.split(" ")[0] for t in task_runs}
    assert names == {"sweep", "row"}


def test_flow_fails_when_the_run_itself_fails_and_keeps_the_job_db(openeo_simulator, tmp_path):
    from prefect_openeo.flows import run_openeo_jobs

    df = tiles_df(2)
    df["backend_name"] = ["sim", "elsewhere"]
    path = tmp_path / "jobs.csv"
    create_job_db(path, df)
    before = path.read_bytes()
    state = run_openeo_jobs(
        job_db=str(path),
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.1,
        root_dir=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(ValueError, match="elsewhere"):
        state.result()
    assert path.read_bytes() == before
    assert openeo_simulator.created_count() == 0


def test_flow_takes_start_job_as_import_path(openeo_simulator, tmp_path):
    from prefect_openeo.demo import demo_tiles
    from prefect_openeo.flows import run_openeo_jobs

    stats = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.parquet"),
        backends={"sim": openeo_simulator.url},
        start_job="prefect_openeo.demo:create_ndvi_job",
        poll_sleep=0.1,
        root_dir=str(tmp_path),
        download_results=False,
        df=demo_tiles(3),
    )
    assert stats["job finished"] == 3
    titles = sorted(job["title"].split(" [poj-")[0] for job in openeo_simulator.jobs())
    assert titles == ["NDVI t000 2024", "NDVI t001 2024", "NDVI t002 2024"]


def test_bad_start_job_import_path_fails_clearly(openeo_simulator, tmp_path):
    from prefect_openeo.flows import run_openeo_jobs

    state = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"sim": openeo_simulator.url},
        start_job="no_such_module:make_job",
        df=tiles_df(1),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(ValueError, match="Cannot import start_job 'no_such_module:make_job'"):
        state.result()


def test_example_flow_tiles_an_area_and_runs_it(openeo_simulator, tmp_path):
    """flows/tile_and_run.py with plain-data parameters, as a deployment would call it; twice (resume)."""
    import importlib.util
    from pathlib import Path

    import geopandas as gpd
    from shapely.geometry import box

    spec = importlib.util.spec_from_file_location(
        "tile_and_run", Path(__file__).parent.parent / "flows" / "tile_and_run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    area = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[box(5.10, 51.20, 5.13, 51.215)], crs="EPSG:4326").to_file(area, driver="GeoJSON")
    params = dict(
        area=str(area),
        job_db=str(tmp_path / "jobs.parquet"),
        backends={"sim": openeo_simulator.url},
        tile_size=1500,
        poll_sleep=0.1,
        root_dir=str(tmp_path / "results"),
    )
    stats = module.tile_and_run(**params)
    df = gpd.read_parquet(tmp_path / "jobs.parquet")
    assert len(df) >= 4 and set(df["status"]) == {"finished"}
    assert stats["job finished"] == len(df) == openeo_simulator.created_count()
    again = module.tile_and_run(**params)
    assert again.get("start_job call", 0) == 0 and openeo_simulator.created_count() == len(df)


def test_blocks_events_and_block_backends(openeo_simulator, tmp_path):
    """An OpenEOBackend block (basic auth, secret stored) as the flow's backend; an event per transition."""
    from prefect.client.orchestration import get_client

    from prefect_openeo import OpenEOBackend
    from prefect_openeo.flows import run_openeo_jobs

    openeo_simulator.config.require_auth = True
    OpenEOBackend(url=openeo_simulator.url, auth="basic", username="user", password="password", parallel_jobs=3).save(
        "sim-test", overwrite=True
    )
    loaded = OpenEOBackend.load("sim-test")
    assert loaded.password.get_secret_value() == "password" and "password=SecretStr('**********')" in repr(loaded)

    state = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"sim": "block:sim-test"},
        start_job=ndvi_job,
        poll_sleep=0.1,
        root_dir=str(tmp_path),
        df=tiles_df(3),
        return_state=True,
    )
    assert state.is_completed(), state
    assert {job["user"] for job in openeo_simulator.jobs()} == {"user"}
    flow_run_id = str(state.state_details.flow_run_id)
    job_ids = set(pd.read_csv(tmp_path / "jobs.csv")["id"])

    with get_client(sync_client=True) as client:
        events = job_events(
            client,
            flow_run_id,
            {"prefix": ["openeo.job."]},
            lambda ev: sum(e["event"] == "openeo.job.finished" for e in ev) >= 3,
        )
    finished = {e["resource"]["openeo.job_id"] for e in events if e["event"] == "openeo.job.finished"}
    assert finished == job_ids
    for event in events:
        resource = event["resource"]
        assert resource["prefect.resource.id"] == f"openeo.job.sim.{resource['openeo.job_id']}"
        assert resource["openeo.backend"] == "sim" and resource["openeo.status"] == event["event"].split(".")[-1]
    # a job's creation and its end, what automations act on; its waiting and running are task-run states
    assert {e["event"] for e in events} == {"openeo.job.created", "openeo.job.finished"}


def test_prefect_block_register_finds_the_blocks():
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_openeo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "openEO Backend" in out.stdout
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("openeo-backend")
    assert block_type.name == "openEO Backend"


def test_two_flow_runs_share_a_backends_global_concurrency_limit(openeo_simulator, tmp_path):
    """Each flow run may keep 2 jobs active on the backend; together they must stay within the limit (2)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from prefect_openeo.limits import limit_name

    # Long enough that one run alone outlasts the other's start on a loaded machine (4 waves of 3 s and more).
    openeo_simulator.config.run_duration = 3.0
    worker = Path(__file__).parent / "flow_worker.py"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    dbs = []
    for n in range(2):
        path = tmp_path / f"jobs{n}.csv"
        create_job_db(path, tiles_df(8))
        dbs.append(path)
    go = tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(db), openeo_simulator.url, str(tmp_path / "results"), str(go)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for db in dbs
    ]
    # Both start their flow runs at the same moment, however long Prefect takes to import on a loaded machine.
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.*.ready"))) < 2 and time.monotonic() < deadline:
        assert all(run.poll() is None for run in runs), "a worker ended before it was ready"
        time.sleep(0.05)
    go.touch()
    logs = []
    for run in runs:
        _, err = run.communicate(timeout=240)
        logs.append(err.decode(errors="replace")[-2000:])
        assert run.returncode == 0, logs[-1]
    for db in dbs:
        assert set(pd.read_csv(db)["status"]) == {"finished"}
    jobs = openeo_simulator.jobs()
    assert len(jobs) == 16
    assert max_overlap(jobs) <= 2, "two flow runs together exceeded the backend's global concurrency limit"
    by_id = {j["id"]: j for j in jobs}
    spans = []
    for db in dbs:
        mine = [by_id[i] for i in pd.read_csv(db)["id"]]
        spans.append((min(j["created_at"] for j in mine), max(j["ended_at"] for j in mine)))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], (
        f"the two runs must have run at the same time: {spans}\n" + "\n---\n".join(logs)
    )
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name("sim"))
    assert limit.limit == 2 and limit.active_slots == 0  # every slot was given back


def test_flow_takes_a_process_based_job_creator_spec(openeo_simulator, tmp_path):
    """start_job as plain data: a ProcessBasedJobCreator spec, the UDP served over real HTTP."""
    import json as _json

    from conftest import static_server

    from prefect_openeo.flows import load_callable, run_openeo_jobs

    udp = {
        "id": "tile_ndvi",
        "parameters": [
            {"name": "west", "description": "west", "schema": {"type": "number"}},
            {"name": "year", "description": "year", "schema": {"type": "integer"}},
            {"name": "scale", "description": "scale", "schema": {"type": "number"}},
        ],
        "process_graph": {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}},
    }
    with static_server(_json.dumps(udp).encode(), "application/json") as root:
        spec = {"process_id": "tile_ndvi", "namespace": f"{root}udp.json", "parameter_defaults": {"scale": 0.5}}
        stats = run_openeo_jobs(
            job_db=str(tmp_path / "jobs.csv"),
            backends={"sim": openeo_simulator.url},
            start_job=spec,
            poll_sleep=0.1,
            root_dir=str(tmp_path),
            download_results=False,
            df=tiles_df(2),
        )
    assert stats["job finished"] == 2
    for job in openeo_simulator.jobs():
        (node,) = job["process"]["process_graph"].values()
        assert node["process_id"] == "tile_ndvi" and node["arguments"]["scale"] == 0.5
    with pytest.raises(ValueError, match="needs process_id and/or namespace"):
        load_callable({"parameter_defaults": {}})


def test_the_flow_runs_state_says_how_many_rows_failed_and_too_many_fail_it(openeo_simulator, tmp_path):
    """Completed with "4 of 4 rows ended in error" and the stats as its result; with fail_when_failed_rows (a
    count or a fraction) reached, Failed with that message, raising TooManyFailedRows (which has the stats)."""
    from prefect_openeo.flows import run_openeo_jobs
    from prefect_openeo.outcome import TooManyFailedRows

    openeo_simulator.config.failure_rate = 1.0
    params = dict(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.1,
        root_dir=str(tmp_path),
    )
    state = run_openeo_jobs(df=tiles_df(4), return_state=True, **params)
    assert state.is_completed() and state.message == "4 of 4 rows ended in error"
    assert state.result()["job failed"] == 4

    # The same job database again (nothing left to run): a count, then a fraction, reached.
    state = run_openeo_jobs(fail_when_failed_rows=4, return_state=True, **params)
    assert state.is_failed()
    assert state.message == "4 of 4 rows ended in error, reaching fail_when_failed_rows=4"
    with pytest.raises(TooManyFailedRows, match="4 of 4 rows ended in error") as info:
        state.result()
    assert isinstance(info.value.stats, dict) and info.value.stats.get("start_job call", 0) == 0  # this run's
    with pytest.raises(TooManyFailedRows, match=r"reaching fail_when_failed_rows=0\.5"):
        run_openeo_jobs(fail_when_failed_rows=0.5, **params)
    assert run_openeo_jobs(fail_when_failed_rows=5, return_state=True, **params).is_completed()

    # A threshold that cannot be meant fails the flow run before any job is created.
    state = run_openeo_jobs(
        **{**params, "job_db": str(tmp_path / "new.csv")}, df=tiles_df(2), fail_when_failed_rows=0, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(ValueError, match="must be at least 1"):
        state.result()
    assert openeo_simulator.created_count() == 4


def _load_example_flow():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "tile_and_run", Path(__file__).parent.parent / "flows" / "tile_and_run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example_area(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    area = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[box(5.10, 51.20, 5.13, 51.215)], crs="EPSG:4326").to_file(area, driver="GeoJSON")
    return area


def _example_params(tmp_path, sim) -> dict:
    """tile_and_run's parameters for a small area on the simulator ``sim``."""
    return dict(
        area=str(_example_area(tmp_path)),
        job_db=str(tmp_path / "jobs.parquet"),
        backends={"sim": sim.url},
        tile_size=1500,
        poll_sleep=0.1,
        root_dir=str(tmp_path / "results"),
    )


def test_the_run_a_user_lands_on_says_what_its_subflow_came_to(openeo_simulator, tmp_path):
    """tile-and-run ends as its run-openeo-jobs subflow: the message with the counts (Failed past
    fail_when_failed_rows), the subflow's summary artifact on it too, whole reasons and the tiles' bounds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    module = _load_example_flow()
    openeo_simulator.config.failure_rate = 1.0
    params = _example_params(tmp_path, openeo_simulator)
    state = module.tile_and_run(return_state=True, **params)
    rows = pd.read_parquet(tmp_path / "jobs.parquet")
    n = len(rows)
    assert n >= 4 and set(rows["status"]) == {"error"}
    assert state.is_completed() and state.message == f"{n} of {n} rows ended in error", state
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    (summary,) = [a for a in artifacts if a.key.endswith("-summary")]
    assert summary.key == "run-openeo-jobs-summary"
    assert f"{n} of {n} rows ended in error" in summary.data
    reason = rows["message"].iloc[0]
    assert len(reason) > 60 and reason in summary.data  # whole, not cut
    import geopandas as gpd

    west, south, east, north = gpd.read_parquet(tmp_path / "jobs.parquet").geometry.iloc[0].bounds
    assert f"| {west:.4f}, {south:.4f}, {east:.4f}, {north:.4f} |" in summary.data  # find the tile on the map

    again = module.tile_and_run(return_state=True, fail_when_failed_rows=0.5, **params)
    assert again.is_failed() and again.message == f"{n} of {n} rows ended in error, reaching fail_when_failed_rows=0.5"


def _run_in_thread_with_tag(tag: str, **kwargs):
    """``run_openeo_jobs(**kwargs)`` in a thread, in-process (no runner watches it), tagged ``tag``; the thread and
    a dict that gets its final state."""
    import threading

    from prefect import tags

    from prefect_openeo.flows import run_openeo_jobs

    ended = {}

    def run():
        with tags(tag):
            ended["state"] = run_openeo_jobs(return_state=True, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ended


def _cancel_tagged(tag: str) -> float:
    """Set the flow run tagged ``tag`` Cancelling, as `prefect flow-run cancel` does; when."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    return time.time()


def test_a_flow_run_cancelled_by_itself_cancels_its_backend_jobs_when_asked(openeo_simulator, tmp_path, monkeypatch):
    """cancel_backend_jobs=True: the run that stops itself on a cancel cancels its active backend jobs and
    records their rows canceled, and its message counts them."""
    import time
    import uuid

    from prefect_openeo.settings import settings

    monkeypatch.setattr(settings, "cancel_check_seconds", 0.5)
    openeo_simulator.config.run_duration = 600
    job_db = tmp_path / "jobs.csv"
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    thread, ended = _run_in_thread_with_tag(
        tag,
        job_db=job_db,  # a Path, as in-process callers pass it
        df=tiles_df(4),
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.2,
        parallel_jobs=2,
        download_results=False,
        cancel_backend_jobs=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        job_db.exists() and (pd.read_csv(job_db)["status"] == "running").sum() == 2
    ):
        time.sleep(0.2)
    _cancel_tagged(tag)
    thread.join(60)
    assert not thread.is_alive(), "the flow run did not stop by itself"
    state = ended["state"]
    assert state.is_cancelled() and state.message.endswith("no more jobs created, 2 active backend job(s) canceled")
    df = pd.read_csv(job_db)
    assert sorted(df["status"]) == ["canceled", "canceled", "not_started", "not_started"]
    assert sorted(j["status"] for j in openeo_simulator.jobs()) == ["canceled", "canceled"]


def test_a_flow_run_obeys_a_cancel_by_itself(openeo_simulator, tmp_path, monkeypatch):
    """No runner watches an in-process flow run (as when the runner's cancellation observer died with the
    API): the run reads its own state, stops creating jobs within a few seconds of `Cancelling`, ends
    Cancelled saying so, and a later run finishes the rest, creating no job twice."""
    import time
    import uuid

    from prefect_openeo.flows import run_openeo_jobs
    from prefect_openeo.settings import settings

    monkeypatch.setattr(settings, "cancel_check_seconds", 0.5)
    openeo_simulator.config.queue_duration, openeo_simulator.config.run_duration = 0.2, 1.5
    job_db = tmp_path / "jobs.csv"
    tag = f"cancel-{uuid.uuid4().hex[:8]}"
    params = dict(
        job_db=str(job_db),
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.2,
        parallel_jobs=2,
        download_results=False,
    )
    thread, ended = _run_in_thread_with_tag(tag, df=tiles_df(30), **params)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and openeo_simulator.created_count() < 4:
        time.sleep(0.1)
    assert openeo_simulator.created_count() >= 4
    cancelled_at = _cancel_tagged(tag)
    thread.join(60)
    assert not thread.is_alive(), "the flow run did not stop by itself"
    state = ended["state"]
    assert state.is_cancelled(), state
    assert state.message.startswith("Cancelled: this flow run is Cancelling; no more jobs created"), state.message
    created = [pd.Timestamp(j["created"]).timestamp() for j in openeo_simulator.jobs()]
    assert max(created) < cancelled_at + 5  # the watch's period, a sweep, a loaded machine
    assert len(created) < 30
    df = pd.read_csv(job_db)
    assert len(df) == 30 and (df["status"] == "not_started").sum() == 30 - len(created)

    assert run_openeo_jobs(return_state=True, **params).is_completed()
    df = pd.read_csv(job_db)
    assert set(df["status"]) == {"finished"} and openeo_simulator.created_count() == 30 == df["id"].nunique()


def test_a_resumed_tile_and_run_refuses_other_tiling_parameters(openeo_simulator, tmp_path):
    """The job database records what its tiles were made from: a rerun with another tile size or year is
    refused saying so (it would silently run the old tiles), nothing is created; the same parameters resume."""
    module = _load_example_flow()
    params = _example_params(tmp_path, openeo_simulator)
    assert module.tile_and_run(return_state=True, **params).is_completed()
    created = openeo_simulator.created_count()
    for change, says in (({"tile_size": 1000}, "at tile_size 1000 makes"), ({"year": 2023}, "not 2023")):
        state = module.tile_and_run(return_state=True, **{**params, **change})
        assert state.is_failed()
        with pytest.raises(ValueError, match=f"was made from other parameters: .*{says}"):
            state.result()
    assert openeo_simulator.created_count() == created
    assert module.tile_and_run(return_state=True, **params).is_completed()

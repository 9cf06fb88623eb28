"""End to end on a real `prefect server`: blocks registered, a deployment served, triggered with
run_deployment, checked through the API (state, artifacts, events); on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import job_events

from prefect_openeo import create_job_db
from prefect_openeo.demo import demo_tiles
from prefect_openeo.testing import local_prefect_server

pytestmark = pytest.mark.timeout(600)

SERVE = """
import sys
from prefect_openeo.flows import run_openeo_jobs
run_openeo_jobs.serve(name="e2e", limit=2)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def prefect_server(request, tmp_path):
    """`prefect server start` in a subprocess, on SQLite or on this machine's PostgreSQL (a database of its own)."""
    extra, database = {}, None
    if request.param == "postgresql":
        database = f"prefect_e2e_{os.getpid()}_{int(time.time())}"
        engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
        except Exception as e:
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {e}")
        extra["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    try:
        with local_prefect_server(str(tmp_path / "prefect-home"), extra_env=extra) as (api_url, env):
            yield api_url, env
    finally:
        if database:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            engine.dispose()


def wait_for_deployment(client, name: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.read_deployment_by_name(name)
            return
        except Exception:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            time.sleep(0.5)
    raise AssertionError(f"deployment {name} did not appear")


def test_served_deployment_with_blocks_artifacts_and_events(prefect_server, openeo_simulator, tmp_path):
    api_url, env = prefect_server
    register = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_openeo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert register.returncode == 0, register.stdout + register.stderr

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_openeo.blocks import OpenEOBackend

    openeo_simulator.config.require_auth = True
    job_db = tmp_path / "jobs.parquet"
    create_job_db(job_db, demo_tiles(4))
    server = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stderr=subprocess.PIPE)
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            OpenEOBackend(url=openeo_simulator.url, auth="basic", username="user", password="password").save("sim")
            with get_client(sync_client=True) as client:
                wait_for_deployment(client, "run-openeo-jobs/e2e", server)
            flow_run = run_deployment(
                "run-openeo-jobs/e2e",
                parameters={
                    "job_db": str(job_db),
                    "backends": {"sim": "block:sim"},
                    "start_job": "prefect_openeo.demo:create_ndvi_job",
                    "parallel_jobs": 2,
                    "poll_sleep": 0.2,
                    "root_dir": str(tmp_path / "results"),
                },
                timeout=300,
            )
            assert flow_run.state.is_completed(), flow_run.state
            df = pd.read_parquet(job_db)
            assert set(df["status"]) == {"finished"}
            assert {j["user"] for j in openeo_simulator.jobs()} == {"user"}

            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            with get_client(sync_client=True) as client:
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
                )
                kinds = {a.type for a in artifacts}
                assert {"progress", "table", "markdown"} <= kinds, kinds
                events = job_events(client, flow_run.id, {"name": ["openeo.job.finished"]}, lambda ev: len(ev) >= 4)
                assert {e["resource"]["openeo.job_id"] for e in events} == set(df["id"])
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("prefect_server", ["sqlite"], indirect=True)
def test_cancelling_the_flow_run_cancels_backend_jobs(prefect_server, openeo_simulator, tmp_path):
    """Cancelled in Prefect with cancel_backend_jobs=True: active backend jobs are canceled, rows say so, the
    job database stays whole."""
    api_url, env = prefect_server
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    openeo_simulator.config.run_duration = 120
    job_db = tmp_path / "jobs.csv"
    create_job_db(job_db, demo_tiles(5))
    server = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stderr=subprocess.PIPE)
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            with get_client(sync_client=True) as client:
                wait_for_deployment(client, "run-openeo-jobs/e2e", server)
                flow_run = run_deployment(
                    "run-openeo-jobs/e2e",
                    parameters={
                        "job_db": str(job_db),
                        "backends": {"sim": openeo_simulator.url},
                        "start_job": "prefect_openeo.demo:create_ndvi_job",
                        "parallel_jobs": 3,
                        "poll_sleep": 0.2,
                        "cancel_backend_jobs": True,
                        "download_results": False,
                    },
                    timeout=0,
                )
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    statuses = set(pd.read_csv(job_db)["status"])
                    if "running" in statuses:
                        break
                    time.sleep(0.2)
                assert "running" in statuses
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    state = client.read_flow_run(flow_run.id).state
                    df = pd.read_csv(job_db)
                    if state.is_cancelled() and (df["status"] == "canceled").sum() == 3:
                        break
                    time.sleep(0.5)
        assert state.is_cancelled(), state
        assert len(df) == 5
        assert list(df["status"]).count("canceled") == 3 and list(df["status"]).count("not_started") == 2
        assert df.loc[df["status"] == "canceled", "message"].eq("canceled with its flow run").all()
        assert sorted(j["status"] for j in openeo_simulator.jobs()) == ["canceled"] * 3
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("prefect_server", ["sqlite"], indirect=True)
def test_cancelling_a_flow_run_on_a_shared_job_database_cancels_only_its_own_jobs(
    prefect_server, openeo_simulator, pg_database
):
    """A PostgreSQL job database and a backend shared with another live worker: canceling a flow run
    (cancel_backend_jobs=True) cancels the jobs that run was tracking; the other worker's jobs run on."""
    import openeo
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from prefect_openeo.demo import create_ndvi_job
    from prefect_openeo.jobdb.sql import SqlJobDatabase

    api_url, env = prefect_server
    sim = openeo_simulator
    sim.config.run_duration = 300
    create_job_db(pg_database, demo_tiles(4))
    # The other worker (this process, alive, its claims leased): two rows claimed and their jobs started.
    other = SqlJobDatabase(pg_database, worker_id="other")
    other.prepare_run({"sim": 4})
    rows = other.claim_new({"sim": 2}, ["sim"])
    connection = openeo.connect(sim.url)
    for index in rows.index:
        job = create_ndvi_job(rows.loc[index], connection)
        job.start()
        rows.loc[index, ["id", "backend_name", "status"]] = [job.job_id, "sim", "queued"]
    other.persist(rows[["id", "backend_name", "status"]])
    theirs = sorted(rows["id"])

    def wait_for(condition, what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    def statuses(ids=None) -> list[str]:
        return sorted(j["status"] for j in sim.jobs() if ids is None or j["id"] in ids)

    server = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stderr=subprocess.PIPE)
    try:
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            wait_for_deployment(client, "run-openeo-jobs/e2e", server)
            flow_run = run_deployment(
                "run-openeo-jobs/e2e",
                parameters={
                    "job_db": pg_database,
                    "backends": {"sim": sim.url},
                    "start_job": "prefect_openeo.demo:create_ndvi_job",
                    "parallel_jobs": 4,
                    "poll_sleep": 0.2,
                    "cancel_backend_jobs": True,
                    "download_results": False,
                },
                timeout=0,
            )
            wait_for(lambda: statuses() == ["running"] * 4, "the flow run's jobs never ran")
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            wait_for(
                lambda: (
                    client.read_flow_run(flow_run.id).state.is_cancelled()
                    and statuses() == ["canceled", "canceled", "running", "running"]
                ),
                "the flow run's jobs were not canceled with it",
            )
        assert statuses(theirs) == ["running", "running"]
        df = SqlJobDatabase(pg_database).read()
        assert len(df) == 4
        assert sorted(df.loc[df["status"] != "canceled", "id"]) == theirs
        canceled = df[df["status"] == "canceled"]
        assert len(canceled) == 2 and canceled["message"].eq("canceled with its flow run").all()
    finally:
        server.terminate()
        server.wait(30)

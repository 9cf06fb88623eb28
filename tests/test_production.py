"""The README's Production section with the real `prefect` CLI: `deployments/production.yaml` deployed to a real
`prefect server`, two process workers in their own process groups (as if on two machines, the S3 keys in their
environment only), a PostgreSQL job database, results in a real S3 server (moto, its own process), and the
simulator.

- Flow runs started in empty folders leave them empty, and a run from another folder resumes a cancelled one:
  it creates no job twice, and a third run creates and downloads nothing.
- ``workers=3`` fans out into three worker flow runs that share the job database and the bucket: every row once,
  each backend's budget held, every result in the bucket; a worker that fails makes its coordinator fail.
- What cannot be shared is refused before any worker flow run exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import POSTGRES_URL, max_overlap, new_database

from prefect_openeo import create_job_db
from prefect_openeo.demo import demo_tiles
from prefect_openeo.jobdb.sql import SqlJobDatabase
from prefect_openeo.testing import local_prefect_server

pytestmark = pytest.mark.timeout(1200)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `prefect` and `prefect-openeo` commands
DEPLOYMENT = "run-openeo-jobs/production"
POOL = "openeo-production"
README_DB_URL = "postgresql+psycopg://openeo@postgres.example.org:5432/openeo"
#: The S3 keys, in the workers' environment only: no flow run's parameters or job variables may hold them.
S3_KEY, S3_SECRET = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3-secret-{uuid.uuid4().hex}"


# -- the README --------------------------------------------------------------------------------------
def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Production")
    section = text[start : text.find("\n## ", start + 1)]
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", section, flags=re.S | re.M)
    return [line.strip() for _, body in blocks for line in body.splitlines() if line.strip()]


def readme_command(command: str, **replace: str) -> list[str]:
    """``command`` as argv (the venv's executables), after checking that the README's Production section says
    exactly it; then ``replace`` (the README's example values by the test's)."""
    assert command in readme_commands(), f"the README's Production section does not say {command!r}"
    for old, new in replace.items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] in ("prefect", "prefect-openeo"), argv
    return [str(BIN / argv[0]), *argv[1:]]


# -- fixtures ----------------------------------------------------------------------------------------
class Production:
    """A Prefect server with the production deployment and two process workers on its pool."""

    def __init__(self, api_url: str, env: dict[str, str], logs: list[Path]):
        self.api_url, self.env, self.logs = api_url, env, logs

    def ok(self, argv: list[str], timeout: float = 300) -> str:
        done = subprocess.run(
            argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{argv[1:]} exited {done.returncode}:\n{output[-4000:]}"
        return output

    def run(self, *extra: str, command: str = f"prefect deployment run {DEPLOYMENT}") -> str:
        """``prefect deployment run ...`` as the README says it, plus ``extra``; the new flow run's id."""
        output = self.ok([*readme_command(command), *extra])
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert match, output[-2000:]
        return match.group(1)

    @contextlib.contextmanager
    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def worker_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

    def wait_final(self, run_id: str, seconds: float = 600):
        deadline = time.monotonic() + seconds
        with self.client() as client:
            while time.monotonic() < deadline:
                flow_run = client.read_flow_run(run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    return flow_run
                time.sleep(1)
        raise AssertionError(f"flow run {run_id} not final after {seconds} s:\n{self.worker_logs()}")

    def workers_of(self, coordinator) -> list:
        """The flow runs tagged with ``coordinator``'s name, by name."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        with self.client() as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"coordinator:{coordinator.name}"]))
            )
        return sorted(runs, key=lambda r: r.name)


@pytest.fixture(scope="module")
def production(tmp_path_factory, s3_server, postgres_engine) -> Iterator[Production]:
    """The README's steps up to `prefect worker start`, with two workers (each in its own folder and process
    group, as if on its own machine). The Prefect server keeps its records in PostgreSQL, as a production one
    does: on SQLite, a coordinator, its workers and their task runs together make it answer 'database is locked'."""
    home = tmp_path_factory.mktemp("production")
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(new_database("prefect"))
        server_env = {
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": POSTGRES_URL.rsplit("/", 1)[0].replace("+psycopg", "+asyncpg")
            + f"/{database}",
        }
        api_url, env = stack.enter_context(local_prefect_server(str(home / "prefect-home"), extra_env=server_env))
        yield from _production(home, api_url, env)


def _production(home: Path, api_url: str, env: dict[str, str]) -> Iterator[Production]:
    """Deploy, start the two workers, yield; then check that no flow run holds the S3 keys, and stop them."""
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    # The S3 keys are the workers' only: the CLI commands that deploy and start runs do not have them.
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    prod = Production(api_url, env, [])
    prod.ok(readme_command("prefect block register -m prefect_openeo"))
    prod.ok(readme_command(f"prefect work-pool create {POOL} --type process"))
    prod.ok(readme_command("prefect deploy --prefect-file deployments/production.yaml --all"))
    workers = []
    try:
        for name in ("machine-a", "machine-b"):
            folder = home / name
            folder.mkdir()
            prod.logs.append(home / f"{name}.log")
            with prod.logs[-1].open("w") as log:
                workers.append(
                    subprocess.Popen(
                        readme_command(f"prefect worker start --pool {POOL}"),
                        cwd=folder,
                        env={**env, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own process group: stopped with its flow-run processes
                    )
                )
        yield prod
        with prod.client() as client:
            for flow_run in client.read_flow_runs(limit=200):
                stored = json.dumps([flow_run.parameters, flow_run.job_variables])
                assert S3_KEY not in stored and S3_SECRET not in stored, flow_run.name
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)


def save_blocks(prod: Production, **sims) -> None:
    from prefect_openeo import OpenEOBackend

    with prod.client():
        for name, sim in sims.items():
            OpenEOBackend(url=sim.url, auth="basic", username="user", password="password", parallel_jobs=2).save(
                name, overwrite=True
            )


# -- checks ------------------------------------------------------------------------------------------
def assert_results_in_bucket(s3_server, bucket: str, prefix: str, job_ids) -> dict[str, tuple]:
    """Every asset of every job is in the bucket with the size and checksum its backend said, and the STAC
    collection beside them lists every job; returns the objects of the jobs' folders as key -> (ETag,
    LastModified)."""
    s3 = s3_server.client()
    for job_id in job_ids:
        folder = f"{prefix}/job_{job_id}"
        metadata = json.loads(s3.get_object(Bucket=bucket, Key=f"{folder}/job-results.json")["Body"].read())
        assert metadata["assets"]
        s3.head_object(Bucket=bucket, Key=f"{folder}/job_{job_id}.json")
        for name, asset in metadata["assets"].items():
            data = s3.get_object(Bucket=bucket, Key=f"{folder}/{name}")["Body"].read()
            assert len(data) == asset["file:size"]
            assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]
    collection = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/collection.json")["Body"].read())
    items = [link["href"] for link in collection["links"] if link["rel"] == "item"]
    assert sorted(items) == sorted(f"./job_{job_id}/stac-item.json" for job_id in job_ids), items
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/job_")
    assert not listed.get("IsTruncated")
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed.get("Contents", [])}


def assert_empty(folder: Path) -> None:
    left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    assert folder.is_dir() and not left, f"the flow run left {left} in {folder}"


def logged_working_directory(prod: Production, run_id: str) -> Path:
    """The working directory the flow run logged (``Working directory: ...``); its logs arrive asynchronously."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    for _ in range(60):
        with prod.client() as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        found = [m.group(1) for log in logs for m in [re.match(r"Working directory: (.+)$", log.message)] if m]
        if found:
            return Path(found[0])
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} logged no working directory")


def wait_for_a_running_row(url: str, prod: Production, run_id: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    with prod.client() as client:
        while time.monotonic() < deadline:
            if SqlJobDatabase(url).count_by_status(["running"]):
                return
            state = client.read_flow_run(run_id).state
            assert state is None or not state.is_final(), (state, prod.worker_logs())
            time.sleep(0.5)
    raise AssertionError(f"no row is running after {seconds} s:\n{prod.worker_logs()}")


# -- the tests ---------------------------------------------------------------------------------------
def test_deployed_as_the_yaml_says(production):
    """A module-path entrypoint and no pull step: nothing ties a run to the folder `prefect deploy` ran in."""
    with production.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert deployment.entrypoint == "prefect_openeo.flows.run_openeo_jobs"
    assert not deployment.pull_steps and deployment.path is None
    assert deployment.work_pool_name == POOL and deployment.enforce_parameter_schema
    assert deployment.parameters["workers"] == 1
    workers = deployment.parameter_openapi_schema["properties"]["workers"]
    assert workers["type"] == "integer" and workers["minimum"] == 1 and workers["default"] == 1
    assert "coordinator" in workers["description"]


def test_runs_in_empty_folders_leave_nothing_and_resume_one_another(
    production, openeo_simulator_factory, pg_database, s3_server, tmp_path
):
    sim = openeo_simulator_factory("cdse", require_auth=True, run_duration=120)  # jobs run while we cancel
    save_blocks(production, cdse=sim)
    url = pg_database
    production.ok(
        readme_command(
            f"prefect-openeo init flows/mol.geojson {README_DB_URL} --tile-size 10000 -c year=2024",
            **{README_DB_URL: url},
        )
    )
    rows = len(SqlJobDatabase(url).read())
    assert 2 <= rows <= 12
    bucket = s3_server.new_bucket()
    root = f"s3://{bucket}/results"
    overrides = ["--param", f"job_db={url}", "--param", f"root_dir={root}", "--param", "poll_sleep=0.2"]
    folders = [tmp_path / f"empty-{n}" for n in (1, 2, 3)]
    for folder in folders:
        folder.mkdir()

    # The first run, in an empty folder, is cancelled while its jobs run (as if its machine went away).
    first = production.run(*overrides, "--job-variable", f"working_dir={folders[0]}")
    wait_for_a_running_row(url, production, first)
    from prefect.states import Cancelling

    with production.client() as client:
        client.set_flow_run_state(first, Cancelling(), force=True)
    assert production.wait_final(first).state.is_cancelled()
    assert logged_working_directory(production, first) == folders[0].resolve()
    assert_empty(folders[0])
    statuses = SqlJobDatabase(url).read()["status"]
    assert "finished" not in set(statuses) and 0 < sim.created_count() < rows
    sim.config.run_duration = 0.3
    for job in sim.jobs():  # done waiting: the long jobs end now
        if job["status"] in ("queued", "running"):
            sim.set_status(job["id"], "finished")

    # The second, in another empty folder, on whichever worker: tracks the running jobs, creates the rest.
    second = production.run(*overrides, "--job-variable", f"working_dir={folders[1]}")
    flow_run = production.wait_final(second)
    assert flow_run.state.is_completed(), (flow_run.state, production.worker_logs())
    assert logged_working_directory(production, second) == folders[1].resolve()
    assert_empty(folders[1])
    df = SqlJobDatabase(url).read()
    assert set(df["status"]) == {"finished"} and set(df["results"]) == {"done"}
    assert len(df) == rows == sim.created_count() == len(set(df["id"]))
    objects = assert_results_in_bucket(s3_server, bucket, "results", df["id"])
    requests = sim.request_counts()

    # The third, in a third empty folder: nothing left to do, so no job is created and nothing downloaded.
    third = production.run(*overrides, "--job-variable", f"working_dir={folders[2]}")
    flow_run = production.wait_final(third)
    assert flow_run.state.is_completed(), (flow_run.state, production.worker_logs())
    assert logged_working_directory(production, third) == folders[2].resolve()
    assert_empty(folders[2])
    assert sim.created_count() == rows
    after = sim.request_counts()
    for route in ("POST /jobs", "POST /jobs/{job_id}/results", "GET /jobs/{job_id}/results/{asset}"):
        assert after.get(route, 0) == requests.get(route, 0), route
    assert assert_results_in_bucket(s3_server, bucket, "results", df["id"]) == objects
    assert {job["user"] for job in sim.jobs()} == {"user"}  # authenticated through the block


def test_fan_out_shares_one_job_database_and_bucket(
    production, openeo_simulator_factory, pg_database, s3_server, tmp_path
):
    # Five rounds of 3 s jobs on two backends of 2 slots: long enough for every worker flow run to start.
    east = openeo_simulator_factory("east", require_auth=True, run_duration=3.0)
    west = openeo_simulator_factory("west", require_auth=True, run_duration=3.0)
    save_blocks(production, east=east, west=west)
    url, rows = pg_database, 20
    create_job_db(url, demo_tiles(rows))
    bucket = s3_server.new_bucket()
    root = f"s3://{bucket}/results"
    overrides = [
        "--param", f"job_db={url}",
        "--param", f"root_dir={root}",
        "--param", "poll_sleep=0.2",
        "--param", json.dumps({"east": "block:east", "west": "block:west"}).join(["backends=", ""]),
        "--param", f"start_job={REPO / 'tests' / 'production_job.py'}:start_job",
    ]  # fmt: skip
    coordinator_id = production.run(*overrides, command=f"prefect deployment run {DEPLOYMENT} --param workers=3")
    coordinator = production.wait_final(coordinator_id, seconds=900)
    assert coordinator.state.is_completed(), (coordinator.state, production.worker_logs())
    assert "3 worker flow run(s): 3 Completed" in coordinator.state.message
    assert f"rows: finished {rows}" in coordinator.state.message

    # Three flow runs of the same deployment on the same pool, named and tagged after their coordinator.
    workers = production.workers_of(coordinator)
    assert [w.name for w in workers] == [f"{coordinator.name}-worker-{i}" for i in (1, 2, 3)]
    for worker in workers:
        assert worker.state.is_completed(), (worker.name, worker.state)
        assert worker.deployment_id == coordinator.deployment_id and worker.work_pool_name == POOL
        assert worker.parameters == {**coordinator.parameters, "workers": 1}
        assert "openeo-fan-out" in worker.tags and worker.parent_task_run_id is not None

    # Every row once (the simulators' records), each backend's budget held by the three together.
    jobs = east.jobs() + west.jobs()
    df = SqlJobDatabase(url).read()
    assert len(jobs) == rows == len(df) and set(df["status"]) == {"finished"}
    assert sorted(j["id"] for j in jobs) == sorted(df["id"])
    assert len({j["title"].split(" by ")[0] for j in jobs}) == rows
    assert SqlJobDatabase(url).budgets() == {"east": 2, "west": 2}
    assert max_overlap(east.jobs()) <= 2 and max_overlap(west.jobs()) <= 2
    creators = {j["title"].split(" by ")[1].split(" [")[0] for j in jobs}
    assert creators <= {w.name for w in workers} and len(creators) >= 2, creators
    assert_results_in_bucket(s3_server, bucket, "results", df["id"])


def test_a_failed_worker_fails_its_coordinator(production, openeo_simulator_factory, pg_database, s3_server):
    sim = openeo_simulator_factory("nowhere", require_auth=True)
    url = pg_database
    create_job_db(url, demo_tiles(2))
    # The workers read the password from an environment variable that no worker has: each fails at the start.
    backends = {"nowhere": {"url": sim.url, "username": "user", "password": {"env": "NOT_SET_ON_ANY_WORKER"}}}
    coordinator_id = production.run(
        "--param", f"job_db={url}",
        "--param", f"root_dir=s3://{s3_server.new_bucket()}/results",
        "--param", f"backends={json.dumps(backends)}",
        command=f"prefect deployment run {DEPLOYMENT} --param workers=3",
    )  # fmt: skip
    coordinator = production.wait_final(coordinator_id)
    assert coordinator.state.is_failed(), coordinator.state
    message = coordinator.state.message
    assert "3 worker flow run(s): 3 Failed" in message and "rows: not_started 2" in message
    for worker in production.workers_of(coordinator):
        assert worker.state.is_failed()
        assert f"- {worker.name}: Failed:" in message
    assert "NOT_SET_ON_ANY_WORKER" in message
    assert sim.created_count() == 0


def test_cancelling_the_coordinator_cancels_its_workers(production, openeo_simulator_factory, pg_database, s3_server):
    sim = openeo_simulator_factory("slow", run_duration=300)
    url = pg_database
    create_job_db(url, demo_tiles(4))
    coordinator_id = production.run(
        "--param", f"job_db={url}",
        "--param", f"root_dir=s3://{s3_server.new_bucket()}/results",
        "--param", json.dumps({"slow": sim.url}).join(["backends=", ""]),
        "--param", "poll_sleep=0.2",
        command=f"prefect deployment run {DEPLOYMENT} --param workers=3",
    )  # fmt: skip
    from prefect.states import Cancelling

    deadline = time.monotonic() + 300
    with production.client() as client:
        coordinator = client.read_flow_run(coordinator_id)
        while not (SqlJobDatabase(url).count_by_status(["running"]) and len(production.workers_of(coordinator)) == 3):
            assert time.monotonic() < deadline, production.worker_logs()
            time.sleep(0.5)
        client.set_flow_run_state(coordinator_id, Cancelling(), force=True)
    assert production.wait_final(coordinator_id).state.is_cancelled()
    for worker in production.workers_of(coordinator):
        assert production.wait_final(str(worker.id)).state.is_cancelled(), worker.name
    assert 0 < sim.created_count() <= 4  # their backend jobs go on: a later run tracks them


def test_fan_out_refuses_what_cannot_be_shared_before_starting_a_worker(
    production, openeo_simulator_factory, pg_database, s3_server, tmp_path
):
    sim = openeo_simulator_factory("refused")
    parquet = tmp_path / "jobs.parquet"
    create_job_db(parquet, demo_tiles(2))
    create_job_db(pg_database, demo_tiles(2))
    common = ["--param", json.dumps({"refused": sim.url}).join(["backends=", ""])]
    cases = [
        ([f"job_db={parquet}", f"root_dir=s3://{s3_server.new_bucket()}/results"], "cannot share the job database"),
        ([f"job_db={pg_database}", f"root_dir={tmp_path / 'results'}"], "cannot share the results folder"),
    ]
    for params, says in cases:
        run_id = production.run(
            *common, *[a for p in params for a in ("--param", p)],
            command=f"prefect deployment run {DEPLOYMENT} --param workers=3",
        )  # fmt: skip
        coordinator = production.wait_final(run_id)
        assert coordinator.state.is_failed(), coordinator.state
        assert says in coordinator.state.message and "workers=3" in coordinator.state.message
        assert production.workers_of(coordinator) == []
    assert sim.created_count() == 0 and not (tmp_path / "results").exists()

    # workers < 1 is refused by the deployment's parameter schema: no flow run is created.
    refused = subprocess.run(
        [*readme_command(f"prefect deployment run {DEPLOYMENT} --param workers=3"), "--param", "workers=0"],
        cwd=REPO, env=production.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "workers" in refused.stdout + refused.stderr, refused


def test_fan_out_checks(tmp_path):
    """The refusals, one by one: every job database and result store that cannot be shared, a flow run that
    is not a deployment run, and a deployment or pool whose concurrency limit can never run them all."""
    from prefect_openeo.fanout import FanOutError, check_pool_room, check_shareable

    s3 = "s3://bucket/results"
    for job_db, says in [
        (str(tmp_path / "jobs.csv"), "a file on this machine's disk"),
        (str(tmp_path / "jobs.parquet"), "a file on this machine's disk"),
        ("s3://bucket/jobs.parquet", "a file in object storage"),
        (str(tmp_path / "jobs.db"), "an SQLite file"),
        ("sqlite:///jobs.db", "an SQLite file"),
    ]:
        with pytest.raises(FanOutError, match=f"workers=2 .*{says}.*PostgreSQL"):
            check_shareable(job_db, s3, True, 2)
    with pytest.raises(FanOutError, match="give job_db as a database URL"):
        check_shareable(tmp_path / "jobs.parquet", s3, True, 2)
    for root in (str(tmp_path), f"file://{tmp_path}", "results"):
        with pytest.raises(FanOutError, match="cannot share the results folder .* object storage"):
            check_shareable(POSTGRES_URL, root, True, 2)
    check_shareable(POSTGRES_URL, s3, True, 2)
    check_shareable(POSTGRES_URL, str(tmp_path), False, 2)  # nothing downloaded: nothing to share

    limited = SimpleNamespace(name="production", global_concurrency_limit=SimpleNamespace(limit=3))
    pool = SimpleNamespace(name=POOL, concurrency_limit=None)
    check_pool_room(2, limited, pool)
    with pytest.raises(FanOutError, match="deployment 'production' runs at most 3 .* are 4"):
        check_pool_room(3, limited, pool)
    free = SimpleNamespace(name="production", global_concurrency_limit=None)
    with pytest.raises(FanOutError, match=f"work pool '{POOL}' runs at most 2 .* are 3"):
        check_pool_room(2, free, SimpleNamespace(name=POOL, concurrency_limit=2))
    check_pool_room(5, free, pool)


def test_storage_credentials_in_root_dir_are_refused(production, pg_database):
    """The S3 keys belong to the worker's environment: a root_dir URL with one in it is refused before a flow
    run is created, saying where they go instead."""
    from prefect_openeo.flows import PlainSecretError, run_openeo_jobs

    with production.client() as client:
        before = len(client.read_flow_runs(limit=200))
        with pytest.raises(PlainSecretError, match="root_dir is a URL with a secret in it.*AWS_ACCESS_KEY_ID"):
            run_openeo_jobs(
                job_db=pg_database,
                backends={"local": "http://127.0.0.1:9"},
                start_job="prefect_openeo.demo:create_ndvi_job",
                root_dir="s3://AKIAEXAMPLE:example-secret@bucket/results",
            )
        assert len(client.read_flow_runs(limit=200)) == before


def test_the_coordinator_ends_as_its_workers_did():
    from prefect.states import Cancelled, Completed, Crashed, Failed

    from prefect_openeo.fanout import outcome

    def runs(*states):
        return [SimpleNamespace(name=f"c-worker-{i}", state=state) for i, state in enumerate(states, 1)]

    state = outcome(runs(Completed(), Completed()), {"finished": 5})
    assert state.is_completed() and state.message == "2 worker flow run(s): 2 Completed; rows: finished 5"
    state = outcome(runs(Completed(), Crashed(message="killed\nby the OOM killer"), Cancelled()))
    assert state.is_failed() and state.message.startswith("3 worker flow run(s): 1 Cancelled, 1 Completed, 1 Crashed")
    assert state.message.endswith("\n- c-worker-2: Crashed: killed")
    state = outcome(runs(Failed(message="boom"), Completed()))
    assert state.is_failed() and "- c-worker-1: Failed: boom" in state.message
    assert outcome(runs(Completed(), Cancelled())).is_cancelled()


def test_fan_out_outside_a_deployment_run_is_refused(production, pg_database, s3_server):
    from prefect_openeo.fanout import FanOutError
    from prefect_openeo.flows import run_openeo_jobs

    create_job_db(pg_database, demo_tiles(1))
    with production.client(), pytest.raises(FanOutError, match="not a deployment run.*prefect deployment run"):
        run_openeo_jobs(
            job_db=pg_database,
            backends={"local": "http://127.0.0.1:9"},
            start_job="prefect_openeo.demo:create_ndvi_job",
            root_dir=f"s3://{s3_server.new_bucket()}/results",
            workers=2,
        )
    assert pd.Series(SqlJobDatabase(pg_database).read()["status"]).tolist() == ["not_started"]
    from prefect.logging.handlers import APILogHandler

    with production.client():
        APILogHandler().flush()  # this process's logs of that run, while the server is up

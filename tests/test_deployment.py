"""The README's deployment steps, exactly as written, with the real `prefect` CLI against a real `prefect server`,
a real process worker and the simulator; and no secret in any parameter of the runs that the README's examples
and the deployments make."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import openeo
import pandas as pd
import pytest

from prefect_openeo import create_job_db
from prefect_openeo.demo import create_ndvi_job, demo_tiles
from prefect_openeo.testing import local_prefect_server

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))  # the venv's `prefect` command
SIM_URL_IN_README = "http://127.0.0.1:8000"
TILE_AND_RUN = "tile-and-run-openeo-jobs/tile-and-run"
RESUME = "run-openeo-jobs/resume-every-hour"


# -- the README ---------------------------------------------------------------------------------------
def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def fenced_blocks(section: str, language: str) -> list[str]:
    """The code blocks of ``language`` in ``section``, dedented (they may sit in a list item)."""
    blocks = []
    for indent, body in re.findall(rf"^( *)```{language}\n(.*?)^\1```", section, flags=re.S | re.M):
        blocks.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return blocks


def readme_commands() -> list[str]:
    section = readme_section("Deploy, schedule, and watch it in the Prefect UI")
    return [line.strip() for block in fenced_blocks(section, "bash") for line in block.splitlines() if line.strip()]


def readme_simulator_block_snippet() -> str:
    """The README's Python that saves the `cdse` block for the simulator (the way users save it)."""
    section = readme_section("Deploy, schedule, and watch it in the Prefect UI")
    (snippet,) = [b for b in fenced_blocks(section, "python") if SIM_URL_IN_README in b and "OpenEOBackend" in b]
    return snippet


def readme_command(command: str) -> list[str]:
    """``command`` as argv, after checking that the README's deployment section says exactly it."""
    assert command in readme_commands(), f"the README's deployment section does not say {command!r}"
    argv = shlex.split(command)
    assert argv[0] == "prefect"
    return [PREFECT, *argv[1:]]


# -- running the CLI ----------------------------------------------------------------------------------
def run(argv: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def ok(argv: list[str], env: dict[str, str], timeout: float = 240) -> str:
    done = run(argv, env, timeout)
    assert done.returncode == 0, f"{argv[1:]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def flow_run_id(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, f"no flow run id in: {output[-2000:]}"
    return match.group(1)


def wait_final(client, run_id: str, worker_log: Path, seconds: float = 420):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        time.sleep(1)
    raise AssertionError(
        f"flow run {run_id} not final after {seconds} s; worker log:\n{worker_log.read_text()[-4000:]}"
    )


def wait_for_a_running_row(job_db: Path, client, run_id: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if job_db.exists() and "running" in set(pd.read_parquet(job_db, columns=["status"])["status"]):
            return
        state = client.read_flow_run(run_id).state
        assert state is None or not state.is_final(), state
        time.sleep(0.5)
    raise AssertionError(f"no row of {job_db} is running after {seconds} s")


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`prefect worker start --pool openeo-process` as the README says it, in its own process group (stopped
    with its flow-run processes), its output in ``log_path``."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            readme_command("prefect worker start --pool openeo-process"),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM to the worker's process group (the worker and its flow-run processes), SIGKILL if it lingers."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)


# -- checks ---------------------------------------------------------------------------------------------
def assert_results_present(job_db: Path, root_dir: Path) -> pd.DataFrame:
    """Every row finished, and every asset of its job is on disk with the size and checksum its backend said."""
    df = pd.read_parquet(job_db)
    assert set(df["status"]) == {"finished"}, df[["status", "message"]] if "message" in df else df["status"]
    for job_id in df["id"]:
        job_dir = root_dir / f"job_{job_id}"
        assets = json.loads((job_dir / "job-results.json").read_text())["assets"]
        assert assets and (job_dir / f"job_{job_id}.json").exists()
        for name, asset in assets.items():
            data = (job_dir / name).read_bytes()
            assert len(data) == asset["file:size"]
            assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]
    return df


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def assert_no_secret_in_parameters(client, secrets: set[str]) -> list:
    """No parameter value of any flow run on the server holds one of ``secrets``; returns the runs."""
    flow_runs = client.read_flow_runs(limit=200)
    assert flow_runs
    for flow_run in flow_runs:
        leaked = [s for s in strings_in(flow_run.parameters) if any(secret in s for secret in secrets)]
        assert not leaked, f"flow run {flow_run.name} stores a secret in its parameters: {flow_run.parameters}"
    return flow_runs


def schema_has(schema: dict, name: str, json_type: str | None = None) -> dict:
    field = schema["properties"][name]
    assert field.get("description"), f"{name} has no description for the UI's Custom run form"
    if json_type:
        types = {field.get("type")} | {v.get("type") for v in field.get("anyOf", [])}
        assert json_type in types, f"{name}: {field}"
    return field


# -- the test -----------------------------------------------------------------------------------------------
def test_readme_deployment_steps_with_the_real_cli_server_and_worker(openeo_simulator_factory, tmp_path):
    sim = openeo_simulator_factory("cdse", require_auth=True)  # credentials must come from the block
    # No scheduler: an hourly run of the shipped defaults must not start in the repository during the test.
    server_env = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    with local_prefect_server(str(tmp_path / "prefect-home"), extra_env=server_env) as (api_url, env):
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}

        ok(readme_command("prefect block register -m prefect_openeo"), env)
        snippet = readme_simulator_block_snippet().replace(SIM_URL_IN_README, sim.url.rstrip("/"))
        ok([sys.executable, "-c", snippet], env)
        ok(readme_command("prefect work-pool create openeo-process --type process"), env)
        deploy = readme_command("prefect deploy --prefect-file deployments/prefect.yaml --all")
        ok(deploy, env)

        worker_log = tmp_path / "worker.log"
        worker = start_worker(env, worker_log)
        try:
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings
            from prefect.states import Cancelling

            # What the README lets users change per run: job_db, root_dir, poll_sleep.
            job_db, root_dir = tmp_path / "jobs.parquet", tmp_path / "results"
            overrides = ["--param", f"job_db={job_db}", "--param", f"root_dir={root_dir}", "--param", "poll_sleep=0.2"]

            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                sim.config.run_duration = 120  # the hourly run comes while tile-and-run works, however slowly
                first = flow_run_id(ok(readme_command(f"prefect deployment run {TILE_AND_RUN}") + overrides, env))
                wait_for_a_running_row(job_db, client, first)
                # The hourly run, coming while tile-and-run works on the job database, leaves it alone.
                overlap = flow_run_id(ok(readme_command(f"prefect deployment run {RESUME}") + overrides, env))
                flow_run = wait_final(client, overlap, worker_log)
                assert flow_run.state.is_cancelled(), (flow_run.state, worker_log.read_text()[-4000:])
                assert "Another run is working on the job database" in flow_run.state.message
                assert client.read_flow_run(first).state.is_running()

                # tile-and-run is cancelled while its jobs run on the backend (as if it had died) ...
                client.set_flow_run_state(first, Cancelling(), force=True)
                flow_run = wait_final(client, first, worker_log)
                assert flow_run.state.is_cancelled(), (flow_run.state, worker_log.read_text()[-4000:])
                from prefect_openeo.tiling import read_area, tile_area

                expected_tiles = len(tile_area(read_area(REPO / "flows" / "mol.geojson"), tile_size=10_000))
                assert 2 <= expected_tiles <= 12  # a handful
                statuses = pd.read_parquet(job_db, columns=["status"])["status"]
                assert len(statuses) == expected_tiles and "finished" not in set(statuses)
                assert 0 < sim.created_count() < expected_tiles
                sim.config.run_duration = 0.3
                for job in sim.jobs():  # done waiting: the long jobs end now
                    if job["status"] in ("queued", "running"):
                        sim.set_status(job["id"], "finished")

                # ... and the hourly deployment resumes its job database: the running jobs are tracked, not
                # created again, the others created, and every result downloaded.
                second = flow_run_id(ok(readme_command(f"prefect deployment run {RESUME}") + overrides, env))
                flow_run = wait_final(client, second, worker_log)
                assert flow_run.state.is_completed(), (flow_run.state, worker_log.read_text()[-4000:])
                df = assert_results_present(job_db, root_dir)
                assert len(df) == expected_tiles == sim.created_count() == len(set(df["id"]))
                assert {job["user"] for job in sim.jobs()} == {"user"}  # authenticated through the block

                # tile-and-run on a job database whose jobs all fail: the run the user lands on (the one
                # `prefect deployment run` prints) says so in its state and shows the summary.
                sim.config.failure_rate = 1.0
                failing_db = tmp_path / "failing.parquet"
                failing = ["--param", f"job_db={failing_db}", "--param", f"root_dir={tmp_path / 'f'}"]
                failing += ["--param", "poll_sleep=0.2"]
                parent = flow_run_id(ok(readme_command(f"prefect deployment run {TILE_AND_RUN}") + failing, env))
                flow_run = wait_final(client, parent, worker_log)
                n = expected_tiles
                assert flow_run.state.is_completed(), (flow_run.state, worker_log.read_text()[-4000:])
                assert flow_run.state.message == f"{n} of {n} rows ended in error", flow_run.state
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
                )
                (summary,) = [a for a in artifacts if a.key == "run-openeo-jobs-summary"]
                assert f"**{n} of {n} rows ended in error**" in summary.data and "## Why rows failed" in summary.data
                sim.config.failure_rate = 0.0

                # A plain password in a parameter is refused: no flow run holds it.
                runs_before = len(client.read_flow_runs(limit=200))
                plain = {"cdse": {"url": sim.url, "username": "user", "password": "password"}}
                refused = run(
                    [*readme_command(f"prefect deployment run {RESUME}"), "--param", f"backends={json.dumps(plain)}"],
                    env,
                )
                assert refused.returncode != 0 and "password" in refused.stdout + refused.stderr, refused
                runs = assert_no_secret_in_parameters(client, {"password", sim.access_token("user")})
                assert len(runs) == runs_before

                tile_and_run = client.read_deployment_by_name(TILE_AND_RUN)
                resume = client.read_deployment_by_name(RESUME)
                check_deployments(tile_and_run, resume)
                # The runs used the shipped YAML's parameters, but for the README's per-run overrides.
                by_id = {str(r.id): r for r in runs}
                assert by_id[first].parameters == {
                    **tile_and_run.parameters,
                    "job_db": str(job_db),
                    "root_dir": str(root_dir),
                    "poll_sleep": 0.2,
                }
                assert by_id[second].parameters["backends"] == {"cdse": "block:cdse"}
        finally:
            stop_worker(worker)


def check_deployments(tile_and_run, resume) -> None:
    """The shipped YAML as deployed: shared job parameters, the schedule, the working directory, and typed,
    described parameters for the UI's Custom run form."""
    shared = ("job_db", "backends", "start_job", "root_dir", "poll_sleep")
    assert {k: tile_and_run.parameters[k] for k in shared} == {k: resume.parameters[k] for k in shared}
    assert resume.parameters["backends"] == {"cdse": "block:cdse"}
    assert tile_and_run.parameters["area"] == "flows/mol.geojson"
    assert [s.schedule.interval.total_seconds() for s in resume.schedules] == [3600]
    assert resume.global_concurrency_limit.limit == 1
    for deployment in (tile_and_run, resume):
        assert deployment.work_pool_name == "openeo-process"
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ], deployment.pull_steps
        assert deployment.enforce_parameter_schema

    schema = resume.parameter_openapi_schema
    schema_has(schema, "job_db", "string")
    backends = schema_has(schema, "backends", "object")
    assert {"type": "string"} in backends["additionalProperties"]["anyOf"]
    spec = schema["definitions"]["BackendSpec"]
    assert spec["additionalProperties"] is False and spec["properties"]["url"]["description"]
    password_refs = {ref["$ref"].rsplit("/", 1)[1] for ref in spec["properties"]["password"]["anyOf"] if "$ref" in ref}
    assert password_refs == {"FromSecretBlock", "FromEnv"}  # never a plain string
    assert schema["definitions"]["FromSecretBlock"]["properties"]["secret"]["description"]
    schema_has(schema, "start_job", "string")
    assert schema_has(schema, "poll_sleep", "number")["minimum"] == 0
    parallel = schema_has(schema, "parallel_jobs", "integer")
    assert {"type": "null"} in parallel["anyOf"] and parallel["default"] is None
    schema_has(schema, "root_dir", "string")
    schema_has(schema, "download_results", "boolean")
    assert "df" not in schema["properties"]  # in-process only

    schema = tile_and_run.parameter_openapi_schema
    schema_has(schema, "area", "string")
    assert schema_has(schema, "tile_size", "number")["exclusiveMinimum"] == 0
    schema_has(schema, "year", "integer")
    schema_has(schema, "backends", "object")
    schema_has(schema, "parallel_jobs", "integer")
    assert set(schema["required"]) == {"area", "job_db", "backends"}


def test_readme_flow_examples_store_no_secret_and_refuse_plain_ones(
    prefect_api, openeo_simulator, tmp_path, monkeypatch
):
    """The README's run_openeo_jobs examples (a Connection; secrets named as a Secret block or an environment
    variable) store no secret; a plain password, client secret, token or database password is refused before
    any run exists, with a message that says what to use instead."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from prefect_openeo.flows import PlainSecretError, run_openeo_jobs

    password = "s3cret-Pa55"
    openeo_simulator.config.require_auth = True
    openeo_simulator.config.users = {"user": password}
    url = openeo_simulator.url
    token = openeo_simulator.access_token("user")
    Secret(value=password).save("sim-login", overwrite=True)
    monkeypatch.setenv("SIM_LOGIN", password)
    job_db = tmp_path / "jobs.parquet"
    create_job_db(job_db, demo_tiles(2))

    states = [
        run_openeo_jobs(
            job_db=str(job_db),
            backends={"cdse": openeo.connect(url).authenticate_basic("user", password)},
            start_job=create_ndvi_job,
            parallel_jobs=4,
            poll_sleep=0.1,
            root_dir=str(tmp_path / "results"),
            return_state=True,
        )
    ]
    for n, ref in enumerate([{"secret": "sim-login"}, {"env": "SIM_LOGIN"}]):
        create_job_db(tmp_path / f"named-{n}.parquet", demo_tiles(1))
        states.append(
            run_openeo_jobs(
                job_db=str(tmp_path / f"named-{n}.parquet"),
                backends={"mine": {"url": url, "username": "user", "password": ref}},
                start_job="prefect_openeo.demo:create_ndvi_job",
                poll_sleep=0.1,
                root_dir=str(tmp_path / "results"),  # the run's pictures go there too
                return_state=True,
            )
        )
    assert [s.result()["job finished"] for s in states] == [2, 1, 1]
    assert {job["user"] for job in openeo_simulator.jobs()} == {"user"}

    # Named secrets that cannot be read: the run fails saying which.
    failed = []
    for ref, says in [({"secret": "no-such-secret"}, "'no-such-secret'"), ({"env": "NO_SUCH_VAR"}, "'NO_SUCH_VAR'")]:
        state = run_openeo_jobs(
            job_db=str(job_db),
            backends={"mine": {"url": url, "username": "user", "password": ref}},
            start_job=create_ndvi_job,
            root_dir=str(tmp_path),
            return_state=True,
        )
        assert state.is_failed() and says in state.message, state.message
        failed.append(state)
    state = run_openeo_jobs(
        job_db=str(tmp_path / "missing.parquet"),
        backends={"mine": url},
        start_job=create_ndvi_job,
        root_dir=str(tmp_path),
        return_state=True,
    )
    assert state.is_failed() and "does not exist" in state.message and "tile-and-run" in state.message

    with get_client(sync_client=True) as client:
        runs_before = len(client.read_flow_runs(limit=200))
        plain = {
            "password": {"url": url, "username": "user", "password": password},
            "client_secret": {"url": url, "auth": "oidc_client_credentials", "client_id": "c", "client_secret": "x"},
            "token": {"url": url, "auth": "bearer", "token": token},
        }
        for key, spec in plain.items():
            with pytest.raises(PlainSecretError, match=rf"is a plain {key}: .*'block:NAME'.*'secret'.*'env'"):
                run_openeo_jobs(job_db=str(job_db), backends={"mine": spec}, start_job=create_ndvi_job)
        with pytest.raises(PlainSecretError, match="PGPASSWORD"):
            run_openeo_jobs(
                job_db=f"postgresql+psycopg://user:{password}@127.0.0.1:5432/test",
                backends={"mine": url},
                start_job=create_ndvi_job,
            )
        assert len(client.read_flow_runs(limit=200)) == runs_before  # refused before a run was created

        ids = {str(s.state_details.flow_run_id) for s in [*states, *failed, state]}
        for flow_run in client.read_flow_runs(limit=200):
            if str(flow_run.id) in ids:
                ids.discard(str(flow_run.id))
                leaked = [s for s in strings_in(flow_run.parameters) if password in s or token in s]
                assert not leaked, flow_run.parameters
        assert not ids
        first = client.read_flow_run(states[0].state_details.flow_run_id).parameters
    assert first["backends"] == {"cdse": f"<Connection to {url}>"}
    assert first["start_job"] == "<callable prefect_openeo.demo:create_ndvi_job>"


def test_parallel_jobs_of_block_backends(prefect_api, openeo_simulator, tmp_path):
    """Left out, a block backend gets its block's parallel_jobs; an explicit number wins over it."""
    from conftest import max_overlap

    from prefect_openeo import OpenEOBackend
    from prefect_openeo.flows import budgets, run_openeo_jobs

    OpenEOBackend(url=openeo_simulator.url, parallel_jobs=1).save("one-at-a-time", overwrite=True)
    peaks = []
    for n, parallel_jobs in enumerate([None, 3]):
        openeo_simulator.reset()
        openeo_simulator.config.run_duration = 1.5
        create_job_db(tmp_path / f"jobs-{n}.parquet", demo_tiles(3))
        stats = run_openeo_jobs(
            job_db=str(tmp_path / f"jobs-{n}.parquet"),
            backends={f"blk-{n}": "block:one-at-a-time"},  # a global concurrency limit of its own per run
            start_job=create_ndvi_job,
            parallel_jobs=parallel_jobs,
            poll_sleep=0.1,
            root_dir=str(tmp_path),
            download_results=False,
        )
        assert stats["job finished"] == 3
        peaks.append(max_overlap(openeo_simulator.jobs()))
    assert peaks == [1, 3]

    assert budgets({"a": 5}, ["a", "b"], {"b": 1}) == {"a": 5, "b": 1}
    with pytest.raises(ValueError, match=r"names backends that are not given: \['c'\]"):
        budgets({"c": 1}, ["a"], {})
    with pytest.raises(ValueError, match="backend 'a' must be a whole number >= 0"):
        budgets(-1, ["a"], {})


def test_the_example_flow_takes_live_objects_in_process_and_refuses_plain_secrets(
    prefect_api, openeo_simulator, tmp_path
):
    """flows/tile_and_run.py validates its typed parameters, yet takes a live Connection in-process (stored as
    a description); a plain password is refused by it, and by run_openeo_jobs.with_options, too."""
    import importlib.util

    from prefect.client.orchestration import get_client

    from prefect_openeo.flows import OpenEOFlow, PlainSecretError, run_openeo_jobs

    spec = importlib.util.spec_from_file_location("tile_and_run_example", REPO / "flows" / "tile_and_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.tile_and_run.should_validate_parameters
    state = module.tile_and_run(
        area=str(REPO / "flows" / "mol.geojson"),
        job_db=str(tmp_path / "jobs.parquet"),
        backends={"sim": openeo.connect(openeo_simulator.url)},
        tile_size="10000",  # validated: made a number
        poll_sleep=0.1,
        root_dir=str(tmp_path / "results"),
        return_state=True,
    )
    assert state.is_completed(), state
    assert state.result()["job finished"] == len(pd.read_parquet(tmp_path / "jobs.parquet")) >= 2
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert parameters["backends"] == {"sim": f"<Connection to {openeo_simulator.url}>"}

    plain = {"sim": {"url": openeo_simulator.url, "username": "user", "password": "password"}}
    with pytest.raises(PlainSecretError, match="is a plain password"):
        module.tile_and_run(area="flows/mol.geojson", job_db=str(tmp_path / "other.parquet"), backends=plain)
    renamed = run_openeo_jobs.with_options(name="renamed")
    assert isinstance(renamed, OpenEOFlow)
    with pytest.raises(PlainSecretError, match="is a plain password"):
        renamed(job_db=str(tmp_path / "jobs.parquet"), backends=plain, start_job=create_ndvi_job)


def test_a_cancel_after_a_prefect_server_outage_stops_the_run(openeo_simulator_factory, tmp_path):
    """The deployed run on a real worker; the Prefect server stopped for 35 s mid-run (the runner's cancellation
    observer may die with it) and started again; then `prefect flow-run cancel`: no backend job is created
    more than a few seconds after the cancel, the run ends Cancelled, the job database is whole, and the next
    run finishes the rest creating no job twice."""
    import contextlib

    from prefect_openeo.testing import free_port

    sim = openeo_simulator_factory("cdse", require_auth=True, queue_duration=0.3, run_duration=4.0)
    server_env = {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    home, port = str(tmp_path / "prefect-home"), free_port()
    job_db, root_dir = tmp_path / "jobs.parquet", tmp_path / "results"
    create_job_db(job_db, demo_tiles(60))
    overrides = ["--param", f"job_db={job_db}", "--param", f"root_dir={root_dir}", "--param", "poll_sleep=0.5"]
    server = contextlib.ExitStack()
    api_url, env = server.enter_context(local_prefect_server(home, extra_env=server_env, port=port))
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    ok(readme_command("prefect block register -m prefect_openeo"), env)
    snippet = readme_simulator_block_snippet().replace(SIM_URL_IN_README, sim.url.rstrip("/"))
    ok([sys.executable, "-c", snippet], env)
    ok(readme_command("prefect work-pool create openeo-process --type process"), env)
    ok(readme_command("prefect deploy --prefect-file deployments/prefect.yaml --all"), env)
    worker_log = tmp_path / "worker.log"
    worker = start_worker(env, worker_log)
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        first = flow_run_id(ok(readme_command(f"prefect deployment run {RESUME}") + overrides, env))
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            wait_for_a_running_row(job_db, client, first)
        created_before = sim.created_count()
        server.close()  # the outage
        time.sleep(35)
        assert worker.poll() is None, worker_log.read_text()[-3000:]
        created_in_outage = sim.created_count()
        with local_prefect_server(home, extra_env=server_env, port=port):
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                assert not client.read_flow_run(first).state.is_final()
                ok([PREFECT, "flow-run", "cancel", first], env)
                cancelled_at = time.time()
                flow_run = wait_final(client, first, worker_log, seconds=180)
                assert flow_run.state.is_cancelled(), (flow_run.state, worker_log.read_text()[-4000:])
                created = [pd.Timestamp(j["created"]).timestamp() for j in sim.jobs()]
                late = [t - cancelled_at for t in created if t > cancelled_at + 15]
                assert not late, f"{len(late)} job(s) created {max(late):.0f} s after the cancel"
                assert created_before < created_in_outage and len(created) < 60  # it went on, then stopped
                df = pd.read_parquet(job_db)
                assert len(df) == 60 and df["id"].dropna().nunique() == len(created) == df["id"].notna().sum()
                assert set(df["status"]) <= {"not_started", "queued", "running", "finished", "queued_for_start"}
                assert "not_started" in set(df["status"])

                sim.config.run_duration = 0.3  # the rest quickly
                again = flow_run_id(ok(readme_command(f"prefect deployment run {RESUME}") + overrides, env))
                flow_run = wait_final(client, again, worker_log)
                assert flow_run.state.is_completed(), (flow_run.state, worker_log.read_text()[-4000:])
                df = assert_results_present(job_db, root_dir)
                assert len(df) == 60 == sim.created_count() == df["id"].nunique()
    finally:
        server.close()
        stop_worker(worker)

"""``prefect-openeo run`` and ``demo`` as users run them: the installed command in a subprocess, Ctrl-C as a
terminal sends it (SIGINT to the whole process group), real simulators and real Prefect servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import static_server
from typer.testing import CliRunner

from prefect_openeo.cli import EXIT_FAILED_ROWS, app
from prefect_openeo.demo import demo_tiles
from prefect_openeo.jobdb import create_job_db, get_job_db
from prefect_openeo.prefect_server import free_port
from prefect_openeo.testing import local_prefect_server

# A thread of the command that dies (e.g. the progress bars') fails the test.
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]
EXE = str(Path(sys.executable).with_name("prefect-openeo"))
START_JOB = "prefect_openeo.demo:create_ndvi_job"
FLOW_RUN_URL = re.compile(r"http://127\.0\.0\.1:\d+/runs/flow-run/([0-9a-f-]{36})")
runner = CliRunner()


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home (and database) for this module's commands: its migrations run once."""
    return tmp_path_factory.mktemp("prefect-home")


def command_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no Prefect API configured, Prefect's usual log level."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    for name in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):
        if name not in extra:
            env.pop(name, None)
    return env


def servers_of(home: Path) -> list[psutil.Process]:
    """Prefect servers (uvicorn) still running with this Prefect home."""
    found = []
    for process in psutil.process_iter():
        try:
            if (
                "uvicorn" in " ".join(process.cmdline())
                and process.environ().get("PREFECT_HOME") == str(home)
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
        except psutil.Error:
            pass
    return found


def no_server_left(home: Path, wait: float = 20) -> bool:
    deadline = time.monotonic() + wait
    while servers_of(home):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def statuses(db: Path) -> pd.Series:
    return get_job_db(db).read()["status"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- Ctrl-C -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefect", "local"])
def test_ctrl_c_in_a_terminal_stops_cleanly_and_a_rerun_resumes(mode, tmp_path, openeo_simulator, prefect_home):
    n = 6
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(n))
    openeo_simulator.config.run_duration = 600
    cmd = [EXE, "run", str(db), "-b", f"sim={openeo_simulator.url}", "--start-job", START_JOB]
    cmd += ["--poll-sleep", "0.2", "--parallel-jobs", "3", "--root-dir", str(tmp_path / "results")]
    cmd += ["--local"] if mode == "local" else []
    env = command_env(prefect_home)
    # As a terminal runs it: the command leads a process group of its own, which Ctrl-C signals whole.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while (statuses(db) == "running").sum() < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the jobs did not start running"
        time.sleep(0.2)

    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.monotonic()
    out, err = proc.communicate(timeout=180)
    took = time.monotonic() - interrupted

    assert proc.returncode == 130, out + err
    assert took < 60, f"Ctrl-C took {took:.1f} s"
    assert "Interrupted: the job database is consistent" in out
    assert "Traceback" not in err and "Connection refused" not in err and len(err) < 2000, err
    assert no_server_left(prefect_home), "the temporary Prefect server outlived the command"
    df = get_job_db(db).read()
    assert len(df) == n
    assert set(df["status"]) <= {"not_started", "created", "queued_for_start", "queued", "running"}
    tracked = set(df["id"].dropna())
    assert tracked == {job["id"] for job in openeo_simulator.jobs()}, "every backend job is in the job database"

    openeo_simulator.config.run_duration = 0.3
    for job in openeo_simulator.jobs():  # the interrupted run's jobs end now
        openeo_simulator.set_status(job["id"], "finished")
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert set(statuses(db)) == {"finished"}
    assert openeo_simulator.created_count() == n  # the interrupted run's jobs were tracked, not created again
    assert no_server_left(prefect_home)


# -- checks before anything starts ----------------------------------------------------------------------------


@pytest.fixture
def small_db(tmp_path) -> Path:
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(2))
    return db


@pytest.mark.parametrize(
    "args, message",
    [
        (["-b", "sim="], "backend 'sim' has an empty URL"),
        (["-b", "sim=ftp://example.org/openeo"], "is not an http:// or https:// URL"),
        (["-b", "sim=openeo.example.org"], "did you mean https://openeo.example.org?"),
        (["-b", "sim=https://a.example.org", "-b", "sim=https://b.example.org"], "backend name 'sim' is given twice"),
        (["-b", "sim=block:"], "needs the name of an OpenEOBackend block"),
        (["-b", "sim=https://a.example.org", "--auth", "foo"], "'foo' is not one of"),
        (["-b", "=https://a.example.org"], "--backend must look like NAME=URL"),
    ],
)
def test_bad_backend_specs_are_refused_before_anything_starts(small_db, args, message):
    before = small_db.read_bytes()
    result = invoke("run", small_db, *args, "--start-job", START_JOB, "--local")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert small_db.read_bytes() == before


def test_basic_auth_needs_its_credentials(small_db, monkeypatch):
    monkeypatch.delenv("OPENEO_PASSWORD", raising=False)
    monkeypatch.setenv("OPENEO_USERNAME", "user")
    result = invoke("run", small_db, "-b", "sim=https://a.example.org", "--auth", "basic", "--start-job", START_JOB)
    assert result.exit_code == 2 and "--auth basic needs OPENEO_PASSWORD" in result.output


def test_rows_pinned_to_a_backend_not_given_are_refused(small_db):
    df = get_job_db(small_db).read()
    df.loc[df.index[0], "backend_name"] = "elsewhere"
    get_job_db(small_db).persist(df)
    result = invoke("run", small_db, "-b", "sim=https://a.example.org", "--start-job", START_JOB, "--local")
    assert result.exit_code == 2 and "name backend(s) elsewhere" in result.output


def test_a_backend_that_is_not_openeo_stops_the_run_before_anything_starts(small_db, openeo_simulator):
    before = small_db.read_bytes()
    with static_server(b"<html>a web page</html>", "text/html") as url:
        result = invoke(
            "run",
            small_db,
            "-b",
            f"sim={openeo_simulator.url}",
            "-b",
            f"web={url}",
            "--start-job",
            START_JOB,
            "--local",
        )
    assert result.exit_code == 2, result.output
    assert f"backend 'web' at {url} is not an openEO API" in result.output
    assert small_db.read_bytes() == before and openeo_simulator.created_count() == 0


def test_a_backend_that_rejects_the_credentials_stops_the_run(small_db, openeo_simulator, monkeypatch):
    monkeypatch.setenv("OPENEO_USERNAME", "user")
    monkeypatch.setenv("OPENEO_PASSWORD", "wrong")
    result = invoke(
        "run", small_db, "-b", f"sim={openeo_simulator.url}", "--auth", "basic", "--start-job", START_JOB, "--local"
    )
    assert result.exit_code == 2, result.output
    assert "backend 'sim'" in result.output and "rejects the credentials" in result.output
    assert openeo_simulator.created_count() == 0

    monkeypatch.setenv("OPENEO_PASSWORD", "password")  # the simulator's user
    args = ["-b", f"sim={openeo_simulator.url}", "--auth", "basic", "--start-job", START_JOB, "--poll-sleep", "0.1"]
    ok = invoke("run", small_db, *args, "--root-dir", small_db.parent / "results", "--local")
    assert ok.exit_code == 0, ok.output
    assert {job["user"] for job in openeo_simulator.jobs()} == {"user"}


def test_a_backend_down_at_the_start_does_not_hold_up_the_others(tmp_path, openeo_simulator):
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(4))
    down = f"http://127.0.0.1:{free_port()}/"
    started = time.monotonic()
    result = invoke(
        "run", db, "-b", f"down={down}", "-b", f"sim={openeo_simulator.url}", "--start-job", START_JOB,
        "--poll-sleep", "0.2", "--root-dir", tmp_path / "results", "--local",
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "Backend 'down'" in result.output and "cannot be reached now" in result.output
    assert set(statuses(db)) == {"finished"} and set(get_job_db(db).read()["backend_name"]) == {"sim"}
    assert took < 30, f"the run waited {took:.0f} s for the backend that is down"


def test_a_run_with_no_backend_reachable_ends_at_once_and_says_so(tmp_path):
    """Every backend unreachable at the start: nothing could be done, so the command says so and exits 2 (the
    probe's wait at most), leaving the job database as it was; --wait-for-backends asks to wait instead."""
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(2))
    before = db.read_bytes()
    down = f"http://127.0.0.1:{free_port()}/"
    started = time.monotonic()
    result = invoke("run", db, "-b", f"down={down}", "--start-job", START_JOB, "--local")
    took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "No backend can be reached, nothing was started" in text and "backend 'down' at" in text
    assert "--wait-for-backends" in text and "other backends" not in text
    assert took < 45 and db.read_bytes() == before


def test_a_run_that_stops_with_rows_unfinished_says_so(tmp_path, openeo_simulator, monkeypatch):
    from prefect_openeo.engine import JobEngine

    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(3))

    def broken(self):
        raise RuntimeError("the job database went away")

    monkeypatch.setattr(JobEngine, "iteration", broken)
    result = invoke("run", db, "-b", f"sim={openeo_simulator.url}", "--start-job", START_JOB, "--local")
    assert result.exit_code == 1, result.output
    assert "the job database went away" in result.output
    assert "stopped with 3 row(s) unfinished" in result.output


# -- output ---------------------------------------------------------------------------------------------------


def test_the_demo_shows_progress_and_a_table_and_where_to_see_the_run(tmp_path, prefect_home):
    env = command_env(prefect_home)
    quiet = subprocess.run(
        [EXE, "demo", "--tiles", "4", "--failure-rate", "0", "--output", str(tmp_path / "quiet")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    text = quiet.stdout + quiet.stderr
    assert "Task run" not in text and "Flow run" not in text, text
    assert "{'" not in text, "no raw Python dict"
    assert "all jobs" in quiet.stdout and "4 rows by backend and status" in quiet.stdout
    assert f"Results: {tmp_path / 'quiet' / 'results'} (4 jobs downloaded)" in quiet.stdout
    assert "prefect server start" in quiet.stdout
    flow_run_id = FLOW_RUN_URL.search(quiet.stdout).group(1)
    assert no_server_left(prefect_home)

    # The same run, in the UI's server: finished, with Prefect's per-task lines in its logs.
    with local_prefect_server(str(prefect_home)) as (api_url, _):
        import httpx

        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
        assert run["state"]["type"] == "COMPLETED"
        logs = httpx.post(
            f"{api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, timeout=30
        ).json()
        assert any("Finished in state Completed" in log["message"] for log in logs if log["task_run_id"])

    verbose = subprocess.run(
        [EXE, "demo", "--tiles", "2", "--failure-rate", "0", "--output", str(tmp_path / "verbose"), "-v"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert "Task run 'sweep sim-a' - Finished in state Completed()" in verbose.stdout + verbose.stderr


@pytest.mark.usefixtures("prefect_api")
def test_run_on_a_configured_server_links_to_the_flow_run(tmp_path, openeo_simulator):
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(2))
    result = invoke(
        "run", db, "-b", f"sim={openeo_simulator.url}", "--start-job", START_JOB, "--poll-sleep", "0.1",
        "--root-dir", tmp_path / "results",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    live = re.search(r"Watch this run in the Prefect UI: (\S+)", result.output)
    assert live and FLOW_RUN_URL.fullmatch(live.group(1)), result.output
    assert f"See this run in the Prefect UI: {live.group(1)}" in result.output
    assert set(statuses(db)) == {"finished"}


@pytest.mark.usefixtures("prefect_api")
def test_failed_rows_are_retried_in_the_flow_run_as_with_local(tmp_path, openeo_simulator):
    openeo_simulator.config.failure_rate = 1.0
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(2))
    result = invoke(
        "run", db, "-b", f"sim={openeo_simulator.url}", "--start-job", START_JOB, "--poll-sleep", "0.1",
        "--retry-failed", "1", "--retry-backoff", "0.1", "--root-dir", tmp_path / "results",
    )  # fmt: skip
    assert result.exit_code == EXIT_FAILED_ROWS, result.output  # every row ended in error, after its retry
    df = get_job_db(db).read()
    assert list(df["status"]) == ["error", "error"] and list(df["retry_count"]) == [1, 1]
    assert openeo_simulator.created_count() == 4


def test_a_configured_api_that_does_not_answer_is_a_clear_error(tmp_path, prefect_home):
    api_url = f"http://127.0.0.1:{free_port()}/api"
    result = subprocess.run(
        [EXE, "demo", "--tiles", "1", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=command_env(prefect_home, PREFECT_API_URL=api_url), timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the Prefect API at {api_url} (PREFECT_API_URL) does not answer" in result.stdout
    assert "Traceback" not in result.stderr


# -- the temporary server ------------------------------------------------------------------------------------------


def test_the_temporary_server_is_out_of_the_terminals_reach_and_ends_with_its_parent(prefect_home):
    parent = subprocess.Popen(
        [sys.executable, "-c", "from prefect_openeo.prefect_server import TemporaryPrefectServer as T\n"
         "s = T().start(); s.wait_ready(); print(s.process.pid, s.api_url, flush=True)\nimport time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=command_env(prefect_home), start_new_session=True,
    )  # fmt: skip
    try:
        pid, api_url = parent.stdout.readline().split()
        server = psutil.Process(int(pid))
        assert os.getpgid(server.pid) != os.getpgid(parent.pid), "Ctrl-C in the terminal would reach the server"
        assert server.is_running()
        os.killpg(parent.pid, signal.SIGKILL)  # the command dies without a chance to clean up
        server.wait(30)
    finally:
        parent.kill()
        parent.wait()
    assert no_server_left(prefect_home)

"""What a person sees: a failed job's reason on its task-run page in the Prefect UI (a real ``prefect server``
with its UI, opened in headless Chromium), and the same reason in the job database, in
``prefect-openeo status --json`` and in the ``openeo.job.error`` event read through the API.

Chromium comes from Debian (``apt-get install -y chromium chromium-driver``; ``.ci/run`` installs it).
Without it the test fails, unless ``PREFECT_OPENEO_ALLOW_NO_BROWSER`` is set (then it is skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import job_events, settled_task_runs

pytestmark = pytest.mark.timeout(600)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

#: The flow run, in its own process with the UI server's environment: rows whose jobs fail (``flow_run``).
FLOW_RUN = """
import json, sys
from conftest import ndvi_job, tiles_df
from prefect_openeo.flows import run_openeo_jobs

job_db, url, root, rows = sys.argv[1:5]
state = run_openeo_jobs(job_db=job_db, backends={"sim": url}, start_job=ndvi_job, poll_sleep=0.1, root_dir=root,
                        df=tiles_df(int(rows)), return_state=True)
print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "state": state.name,
                  "message": state.message}))
"""


def flow_run(env: dict[str, str], sim, tmp_path: Path, rows: int) -> dict:
    """``FLOW_RUN`` over ``rows`` rows (job database ``tmp_path/jobs.csv``) in a process of its own with
    ``env``: its flow run's id, state name and message."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", FLOW_RUN, str(tmp_path / "jobs.csv"), sim.url, str(tmp_path / "results"), str(rows)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def chromium_driver(profile: Path):
    """Headless Chromium through chromedriver (Debian's packages), with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        message = f"Missing {', '.join(missing)}: apt-get install -y chromium chromium-driver"
        if os.environ.get("PREFECT_OPENEO_ALLOW_NO_BROWSER"):
            pytest.skip(message)
        pytest.fail(message + " (or set PREFECT_OPENEO_ALLOW_NO_BROWSER=1 to skip this test)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def page_text_with(driver, url: str, text: str, timeout: float = 120) -> str:
    """Open ``url`` and wait until the page shows ``text`` (the UI loads its data after the page); the text."""
    driver.get(url)
    return text_shown(driver, text, timeout)


def test_a_failed_jobs_reason_shows_on_its_task_run_page_and_everywhere_else(openeo_simulator, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from typer.testing import CliRunner

    from prefect_openeo.cli import app
    from prefect_openeo.testing import local_prefect_server

    driver = chromium_driver(tmp_path / "chromium-profile")
    openeo_simulator.config.failure_rate = 1.0
    job_db = tmp_path / "jobs.csv"
    try:
        with local_prefect_server(str(tmp_path / "prefect-home"), ui=True) as (api_url, env):
            run = flow_run(env, openeo_simulator, tmp_path, rows=2)
            assert run["state"] == "Completed" and run["message"] == "2 of 2 rows ended in error"

            df = pd.read_csv(job_db)
            assert list(df["status"]) == ["error", "error"]
            reason, job_id = df.at[0, "message"], df.at[0, "id"]
            assert "simulated error" in reason  # the backend's own words, from its error logs

            per_job = settled_task_runs(run["flow_run_id"], 2, api_url=api_url)
            with SyncPrefectClient(api_url) as client:
                events = job_events(
                    client, run["flow_run_id"], {"name": ["openeo.job.error"]}, lambda found: len(found) >= 2
                )
            (task_run,) = [r for r in per_job if r.name == f"row 0 @ sim ({job_id})"]
            assert task_run.state.is_failed() and task_run.state.message == reason
            (event,) = [e for e in events if e["resource"]["openeo.job_id"] == job_id]
            assert event["payload"]["message"] == reason

            page = api_url.removesuffix("/api") + f"/runs/task-run/{task_run.id}"
            shown = page_text_with(driver, page, reason)
            if reason not in shown:
                driver.save_screenshot(str(tmp_path / "task-run-page.png"))
            assert reason in shown, f"{page} does not show {reason!r}; it shows: {shown[-2000:]!r}"
    finally:
        driver.quit()

    status = CliRunner().invoke(app, ["status", str(job_db), "--json"])
    assert status.exit_code == 0, status.output
    problems = {str(p["row"]): p for p in json.loads(status.output)["problems"]}
    assert problems["0"]["message"] == reason and problems["0"]["status"] == "error"


def text_shown(driver, text: str, timeout: float = 120) -> str:
    """Wait (without loading the page again) until the page shows ``text``; the page's text."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        try:
            shown = driver.find_element(By.TAG_NAME, "body").text
        except Exception:  # the page is being rebuilt
            shown = ""
        if text in shown:
            break
        time.sleep(0.5)
    return shown


def click(driver, text: str, timeout: float = 120) -> None:
    """Click the innermost element showing exactly ``text`` (a link, a tab), waiting for the UI to show it."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = driver.find_elements(By.XPATH, f"//body//*[normalize-space(.)={json.dumps(text)}]")
            if found:
                found[-1].click()  # the innermost (document order puts ancestors first)
                return
        except Exception:  # the page is being rebuilt
            pass
        if time.monotonic() > deadline:
            shown = driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"nothing shows {text!r} on {driver.current_url}: {shown[-2000:]!r}")
        time.sleep(1)


def test_a_campaign_in_chunks_shows_every_failure_on_the_run_and_its_jobs_in_subflow_runs(openeo_simulator, tmp_path):
    """A run of more jobs than one flow run holds (``PREFECT_OPENEO_TASK_RUNS_PER_RUN`` lowered to 2 for 5
    rows): the run's page shows every failure's reason and its job; its Subflow Runs tab (one click) lists the
    chunks; a chunk's Task Runs tab lists its jobs' task runs, the failed one Failed."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from prefect_openeo.testing import local_prefect_server

    driver = chromium_driver(tmp_path / "chromium-profile")
    openeo_simulator.config.failure_rate = 1.0
    job_db = tmp_path / "jobs.csv"
    try:
        with local_prefect_server(str(tmp_path / "prefect-home"), ui=True) as (api_url, env):
            run = flow_run({**env, "PREFECT_OPENEO_TASK_RUNS_PER_RUN": "2"}, openeo_simulator, tmp_path, rows=5)
            df = pd.read_csv(job_db)
            assert list(df["status"]) == ["error"] * 5
            with SyncPrefectClient(api_url) as client:
                chunks = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run["flow_run_id"]])
                    )
                )
            last = max(chunks, key=lambda c: c.name)
            assert len(chunks) == 2 and last.name.endswith("-jobs-5-5"), [c.name for c in chunks]
            (job,) = settled_task_runs(last.id, 1, api_url=api_url)
            index = int(job.name.split(" ")[1])
            reason = df.at[index, "message"]
            assert "simulated error" in reason and job.state.message == reason

            base = api_url.removesuffix("/api")
            main_page = f"{base}/runs/flow-run/{run['flow_run_id']}"
            # the run's page opens on its logs: every failure with its reason and its job's task run
            shown = page_text_with(driver, main_page, reason)
            assert reason in shown and job.name in shown, shown[-2000:]
            # one click: the run's Subflow Runs tab lists the chunks, the one holding the failed job Failed
            click(driver, "Subflow Runs")
            shown = text_shown(driver, last.name)
            assert all(chunk.name in shown for chunk in chunks), f"{driver.current_url}: {shown[-2000:]!r}"
            # two: the chunk; three: its Task Runs tab, which lists the failed job
            click(driver, last.name)
            text_shown(driver, "Task Runs")
            click(driver, "Task Runs")
            shown = text_shown(driver, job.name)
            if job.name not in shown:
                driver.save_screenshot(str(tmp_path / "chunk-task-runs.png"))
            assert job.name in shown and "Failed" in shown, f"{driver.current_url}: {shown[-2000:]!r}"
    finally:
        driver.quit()

"""Screenshots of the Prefect UI for the docs: a flow run of `run_openeo_jobs` with its per-job task runs,
and the job-status table artifact. Needs Debian's `chromium` and `chromium-driver`, and `selenium`:

    apt-get install -y chromium chromium-driver && pip install selenium
    python docs/ui_screenshots.py            # writes docs/images/*.png
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    from prefect_openeo.testing import local_prefect_server

    home = tempfile.mkdtemp(prefix="prefect-ui-")
    with local_prefect_server(home, ui=True) as (api_url, _):
        base = api_url.removesuffix("/api")
        os.environ.update(PREFECT_HOME=home, PREFECT_API_URL=api_url)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        from prefect_openeo.demo import create_ndvi_job, demo_tiles
        from prefect_openeo.flows import run_openeo_jobs
        from prefect_openeo.jobdb import create_job_db
        from prefect_openeo.simulator import SimulatorConfig, simulated_backends

        workdir = Path(tempfile.mkdtemp(prefix="ui-run-"))
        create_job_db(workdir / "jobs.parquet", demo_tiles(12))
        config = SimulatorConfig(queue_duration=0.5, run_duration=1.5, jitter=0.3, failure_rate=0.2, seed=5)
        with simulated_backends(2, config) as (a, b):
            state = run_openeo_jobs(
                job_db=str(workdir / "jobs.parquet"),
                backends={"sim-a": a.url, "sim-b": b.url},
                start_job=create_ndvi_job,
                parallel_jobs=3,
                poll_sleep=0.5,
                root_dir=str(workdir / "results"),
                return_state=True,
            )
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        table = max((a for a in artifacts if a.type == "table"), key=lambda a: a.created)
        pictures = next(a for a in artifacts if a.type == "markdown" and a.key.endswith("-pictures"))

        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1500,1000",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            (HERE / "images").mkdir(exist_ok=True)
            for name, path in (
                ("flow-run", f"/runs/flow-run/{flow_run_id}?tab=Task+Runs"),
                ("job-status-artifact", f"/artifacts/artifact/{table.id}"),
                ("pictures-artifact", f"/artifacts/artifact/{pictures.id}"),
            ):
                driver.get(base + path)
                time.sleep(6)
                driver.save_screenshot(str(HERE / "images" / f"{name}.png"))
                print(f"docs/images/{name}.png")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()

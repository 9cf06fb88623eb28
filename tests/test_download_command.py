"""`prefect-openeo download`: results fetched on request, their state recorded in the job database."""

from __future__ import annotations

import subprocess
import sys

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, tiles_df
from typer.testing import CliRunner

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.cli import app

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


@pytest.fixture
def finished_db(openeo_simulator, tmp_path):
    """Four finished rows whose results were never downloaded here (e.g. a run with downloads off)."""
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "unused", download_results=False)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=4)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)
    return tmp_path / "jobs.csv"


def test_download_missing_then_again(openeo_simulator, finished_db, tmp_path):
    root = tmp_path / "results"
    args = ["download", str(finished_db), "-b", f"sim={openeo_simulator.url}", "--root-dir", str(root), "--missing"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(finished_db)
    assert list(df["results"]) == ["done"] * 4
    assert all((root / f"job_{job_id}" / "job-results.json").exists() for job_id in df["id"])
    assets = openeo_simulator.request_counts()["GET /jobs/{job_id}/results/{asset}"]
    assert assets == 4

    again = runner.invoke(app, args)  # --missing: nothing left to fetch
    assert again.exit_code == 0 and openeo_simulator.request_counts()["GET /jobs/{job_id}/results/{asset}"] == 4
    everything = runner.invoke(app, args[:-1])  # without --missing: every finished row again
    assert everything.exit_code == 0 and openeo_simulator.request_counts()["GET /jobs/{job_id}/results/{asset}"] == 8


def test_download_records_results_gone_from_the_backend(openeo_simulator, finished_db, tmp_path):
    df = pd.read_csv(finished_db)
    openeo_simulator.delete_job(df.loc[2, "id"])
    result = subprocess.run(
        [sys.executable, "-m", "prefect_openeo.cli", "download", str(finished_db), "-b", f"sim={openeo_simulator.url}",
         "--root-dir", str(tmp_path / "results"), "--missing"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    out = pd.read_csv(finished_db)
    assert list(out["results"]) == ["done", "done", "gone", "done"]
    assert "gone from the backend (404)" in out.loc[2, "message"]


def test_download_bad_input(openeo_simulator, finished_db, tmp_path):
    missing_db = runner.invoke(app, ["download", str(tmp_path / "nope.csv"), "-b", f"sim={openeo_simulator.url}"])
    assert missing_db.exit_code == 2 and "does not exist" in missing_db.output
    bad_backend = runner.invoke(app, ["download", str(finished_db), "-b", "sim=ftp://example"])
    assert bad_backend.exit_code == 2 and "is not an http:// or https:// URL" in bad_backend.output
    not_a_db = tmp_path / "plain.csv"
    pd.DataFrame({"a": [1]}).to_csv(not_a_db, index=False)
    plain = runner.invoke(app, ["download", str(not_a_db), "-b", f"sim={openeo_simulator.url}"])
    assert plain.exit_code == 2 and "no 'status' column" in plain.output
    assert openeo_simulator.request_counts().get("GET /jobs/{job_id}/results", 0) == 0

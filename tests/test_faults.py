"""Backends that misbehave (``prefect_openeo.simulator.faults``): no single answer stops a run, no request
waits unbounded, and a lost answer to ``POST /jobs`` creates no second job."""

from __future__ import annotations

import time

import openeo
import pandas as pd
import pytest
from conftest import manager_for, ndvi_job, tiles_df

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.engine import BackendsGaveOut
from prefect_openeo.settings import settings
from prefect_openeo.simulator import Fault


def jobs_per_row(sim) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in sim.jobs():
        counts[job["title"]] = counts.get(job["title"], 0) + 1
    return counts


def test_a_status_openeo_does_not_define_is_waited_out(openeo_simulator_factory, tmp_path):
    sim = openeo_simulator_factory("sim", queue_duration=0.2, run_duration=1.0)
    sim.faults.add(Fault("status", method="GET", path="/jobs", job_status="paused", duration=2.0))
    manager = manager_for(sim, root_dir=tmp_path, download_results=False)

    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=ndvi_job)

    assert list(pd.read_csv(tmp_path / "jobs.csv")["status"]) == ["finished"] * 3
    assert stats["unknown status"] > 0 and sim.faults.hits()["status"] > 0
    assert sim.created_count() == 3


def test_an_html_page_instead_of_a_job_document_stops_nothing(openeo_simulator_factory, tmp_path):
    """A portal's maintenance page (200, text/html) for the job listing and for one job's document: the run
    goes on, the row says why it waits, and finishes once the backend answers JSON again."""
    sim = openeo_simulator_factory("sim", queue_duration=0.2, run_duration=0.5)
    manager = manager_for(sim, root_dir=tmp_path, download_results=False)
    df = tiles_df(3)
    sim.faults.add(Fault("html", method="GET", path=r"/jobs(/[^/]+)?$", after=0.5, duration=2.5))

    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=df, start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    assert list(result["status"]) == ["finished"] * 3
    assert sim.faults.hits()["html"] > 0 and stats["job tracking error"] > 0
    assert sim.created_count() == 3


def test_a_lost_answer_to_post_jobs_creates_no_second_job(openeo_simulator_factory, tmp_path):
    """The backend creates the job, then answers 500 (or the answer is lost): the row's token finds the job in
    the listing, which is adopted; nothing is created twice."""
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.3)
    sim.faults.add(Fault("lose_reply", method="POST", path="/jobs$", times=2))
    manager = manager_for(sim, root_dir=tmp_path, download_results=False)

    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    assert list(result["status"]) == ["finished"] * 4
    assert sim.faults.hits()["lose_reply"] == 2
    assert sim.created_count() == 4, jobs_per_row(sim)  # openeo 0.53 (retrying POST /jobs): 6
    assert stats["job adopted"] == 2 and stats["creation uncertain"] == 2
    assert result["id"].is_unique


def test_a_backend_that_never_creates_leaves_the_row_start_failed_after_bounded_tries(
    openeo_simulator_factory, tmp_path
):
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.3)
    sim.faults.add(Fault("error", method="POST", path="/jobs$", http_status=500))
    manager = manager_for(sim, root_dir=tmp_path, download_results=False, poll_sleep=0.05)

    began = time.monotonic()
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    assert list(result["status"]) == ["start_failed"] * 2
    assert result["message"].str.contains("lost the answer of every creation").all()
    assert result["create_token"].notna().all()  # `prefect-openeo retry` looks for the job first
    assert sim.created_count() == 0
    assert sim.faults.hits()["error"] == 2 * settings.uncertain_creations  # each tried once per sweep, no retries
    assert time.monotonic() - began < 60


def test_a_backend_that_stops_answering_is_given_up_while_the_other_finishes(
    openeo_simulator_factory, tmp_path, monkeypatch
):
    """From some moment one backend never answers: every request is bounded (read timeout), the run notices
    the backend as unreachable, the other backend's rows finish, and with ``give_up_after`` the run ends by
    itself saying what is left."""
    monkeypatch.setattr(settings, "read_timeout", 1.0)
    monkeypatch.setattr(settings, "max_retries", 1)
    monkeypatch.setattr(settings, "stuck_after", 2.0)
    good = openeo_simulator_factory("good", queue_duration=0.1, run_duration=0.5)
    hung = openeo_simulator_factory("hung", queue_duration=0.1, run_duration=30.0)
    hung.faults.add(Fault("hang", method="GET", path="/jobs", after=1.0))
    manager = manager_for(good, hung, parallel_jobs=2, root_dir=tmp_path, download_results=False, give_up_after=5.0)

    began = time.monotonic()
    with pytest.raises(BackendsGaveOut, match="hung"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(6), start_job=ndvi_job)
    elapsed = time.monotonic() - began

    result = pd.read_csv(tmp_path / "jobs.csv")
    on_good = result[result["backend_name"] == "good"]
    assert len(on_good) >= 4 and (on_good["status"] == "finished").all()
    assert (result.loc[result["backend_name"] == "hung", "status"] != "finished").all()
    assert elapsed < 90, elapsed


def test_access_tokens_that_expire_are_renewed_by_signing_in_again(openeo_simulator_factory, tmp_path):
    """Tokens that last 1.5 s (CDSE's last 600 s, Terrascope's 300 s): a backend given as a callable that
    connects and signs in is asked again whenever the backend refuses the token; nothing stalls."""
    sim = openeo_simulator_factory("sim", queue_duration=0.2, run_duration=1.0, require_auth=True)
    sim.faults.add(Fault("expire_tokens", seconds=1.5))
    manager = MultiBackendJobManager(poll_sleep=0.2, root_dir=tmp_path)
    manager.add_backend(
        "sim", connection=lambda: openeo.connect(sim.url).authenticate_basic("user", "password"), parallel_jobs=2
    )

    began = time.monotonic()
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(6), start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    assert list(result["status"]) == ["finished"] * 6 and list(result["results"]) == ["done"] * 6
    assert sim.faults.hits()["expire_tokens"] >= 2  # refused, then signed in again
    assert manager.backends["sim"].stats_signed_in >= 2
    assert sim.created_count() == 6 and stats["job download"] == 6
    assert time.monotonic() - began < 60


def test_a_connection_that_cannot_sign_in_again_ends_the_run_saying_why(openeo_simulator_factory, tmp_path):
    sim = openeo_simulator_factory("sim", queue_duration=0.2, run_duration=1.0, require_auth=True)
    sim.faults.add(Fault("expire_tokens", seconds=1.0))
    manager = MultiBackendJobManager(poll_sleep=0.2, root_dir=tmp_path, download_results=False)
    fixed = openeo.connect(sim.url).authenticate_basic("user", "password")
    manager.add_backend("sim", connection=fixed, parallel_jobs=2)

    began = time.monotonic()
    with pytest.raises(BackendsGaveOut, match="cannot sign in again: give add_backend a callable"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)
    assert time.monotonic() - began < 60
    result = pd.read_csv(tmp_path / "jobs.csv")
    assert (result["status"] != "start_failed").all()  # the rows wait for a run that can sign in
    assert sim.created_count() <= 4


def test_results_without_assets_are_not_done(openeo_simulator_factory, tmp_path):
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.3, assets_per_job=0)
    manager = manager_for(sim, root_dir=tmp_path / "results")
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)

    row = pd.read_csv(tmp_path / "jobs.csv").loc[0]
    assert row["status"] == "finished" and row["results"] == "failed"
    assert "lists no assets" in row["message"]
    assert not (tmp_path / "results" / f"job_{row['id']}" / "job-results.json").exists()


def test_a_start_that_keeps_failing_is_start_failed_in_bounded_time_and_the_rest_goes_on(
    openeo_simulator_factory, tmp_path
):
    """Every start of two rows' jobs answers 500 (openeo 0.53 retries it 50 times, ~81 minutes, holding up the
    backend): each sweep tries them once (with a few quick retries), the backend's other rows go on, and
    after ``settings.start_attempts`` sweeps the rows are start_failed with their job ids recorded."""
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.3)
    manager = manager_for(sim, parallel_jobs=2, root_dir=tmp_path, download_results=False)
    sim.faults.add(Fault("error", method="POST", path=r"/jobs/[^/]+/results$", times=2 * 4 * settings.start_attempts))

    began = time.monotonic()
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)

    result = pd.read_csv(tmp_path / "jobs.csv")
    failed = result[result["status"] == "start_failed"]
    assert len(failed) == 2 and failed["id"].notna().all()  # the first two rows' starts never went through
    assert failed["message"].str.contains("start failed").all()
    assert (result.loc[result["status"] != "start_failed", "status"] == "finished").all()
    assert sim.created_count() == 4  # no job created twice
    assert time.monotonic() - began < 60


def test_an_edit_of_the_csv_during_a_run_is_kept(openeo_simulator_factory, tmp_path):
    """Someone adds a row and sets another ``skipped`` in the CSV while a run works it: the run reads the file
    again (it is the truth: the run's own writes are in it), runs the new row, leaves the skipped one alone,
    and keeps the file's mode."""
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.8)
    path = tmp_path / "jobs.csv"
    from prefect_openeo.jobdb import create_job_db

    create_job_db(path, tiles_df(6))
    path.chmod(0o644)
    manager = manager_for(sim, parallel_jobs=1, root_dir=tmp_path, download_results=False, poll_sleep=0.2)
    manager.start_job_thread(start_job=ndvi_job, job_db=path)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sim.created_count() < 1:
            time.sleep(0.05)
        edited = pd.read_csv(path)
        edited.loc[5, "status"] = "skipped"
        new_row = pd.DataFrame({"west": [9.9], "year": [2030], "status": ["not_started"]}, index=[6])
        pd.concat([edited, new_row]).to_csv(path, index=False)  # a user's row: their columns only
        while time.monotonic() < deadline + 60 and not manager.join_job_thread(0.2):
            pass
    finally:
        manager.stop_job_thread(timeout_seconds=10)

    result = pd.read_csv(path)
    print(result[["status", "id", "west"]])
    assert len(result) == 7
    assert result.at[5, "status"] == "skipped" and pd.isna(result.at[5, "id"])
    assert result.at[6, "status"] == "finished" and result.at[6, "west"] == 9.9
    assert (result.loc[:4, "status"] == "finished").all()
    assert sim.created_count() == 6
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.usefixtures("prefect_api")
def test_a_flow_run_whose_downloads_failed_says_so_in_its_final_state(openeo_simulator_factory, tmp_path):
    from prefect_openeo.flows import run_openeo_jobs

    good = openeo_simulator_factory("good", queue_duration=0.1, run_duration=0.3)
    empty = openeo_simulator_factory("empty", queue_duration=0.1, run_duration=0.3, assets_per_job=0)
    df = tiles_df(4).assign(backend_name=["good", "empty", "empty", "good"])
    state = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"good": good.url, "empty": empty.url},
        start_job=ndvi_job,
        poll_sleep=0.2,
        root_dir=str(tmp_path / "results"),
        df=df,
        return_state=True,
    )
    rows = pd.read_csv(tmp_path / "jobs.csv")
    assert list(rows["status"]) == ["finished"] * 4
    assert list(rows["results"]) == ["done", "failed", "failed", "done"]
    assert state.is_completed() and state.message == "all 4 rows finished, 2 results not downloaded", state

"""Say why: a failed job's reason in its row, and a start_job that fails the same way for every row stops
the run with one clear error."""

from __future__ import annotations

import logging
import re

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, tiles_df

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.engine import StartJobFailing

pytestmark = pytest.mark.timeout(120)


def manager_for(sim, **kwargs) -> MultiBackendJobManager:
    kwargs.setdefault("poll_sleep", 0.1)
    parallel_jobs = kwargs.pop("parallel_jobs", 3)
    manager = MultiBackendJobManager(**kwargs)
    manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=parallel_jobs)
    return manager


def test_a_failed_jobs_row_says_why_and_the_full_logs_are_saved(openeo_simulator, tmp_path):
    openeo_simulator.config.failure_rate = 1.0
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root")
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["error", "error"] and stats["job failed"] == 2
    for job_id, message in zip(df["id"], df["message"], strict=True):
        # the backend's last error log entry, with its code
        assert message.split(":")[0] in ("ExecutorLost", "UpstreamError", "ProcessGraphError")
        assert "simulated error" in message
        logs = pd.read_json(tmp_path / "root" / f"job_{job_id}" / f"job_{job_id}_errors.json")
        assert (logs["level"] == "error").all() and logs["message"].str.contains("simulated error").all()
    assert stats["job logs"] == 2  # one request per failed job, made by the sweep that saw it fail


def test_start_job_failing_the_same_way_stops_with_one_clear_error(openeo_simulator, tmp_path, caplog):
    def missing_band(row, connection, **kwargs):
        raise ValueError(f"Invalid band name 'B99' for row {row.name}: the collection has B01..B12")

    manager = manager_for(openeo_simulator, root_dir=tmp_path, parallel_jobs=3)
    with caplog.at_level(logging.WARNING, logger="prefect_openeo"), pytest.raises(StartJobFailing) as info:
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(30), start_job=missing_band)
    message = str(info.value)
    tried = int(re.search(r"failed the same way for (\d+) rows in a row", message).group(1))
    assert 5 <= tried <= 7  # at least 5, and no more than the sweep that reached 5 tried (3 per sweep)
    assert "Invalid band name 'B99'" in message
    assert "Traceback (most recent call last)" in message and "missing_band" in message
    assert caplog.text.count("Traceback (most recent call last)") == 1  # logged in full once, not per row
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert set(df["status"]) == {"not_started"}  # nothing to reset by hand: fix start_job and rerun
    assert openeo_simulator.created_count() == 0
    calls = (df["start_time"].notna()).sum()
    assert calls == 0

    fixed = manager_for(openeo_simulator, root_dir=tmp_path, parallel_jobs=3)
    stats = fixed.run_jobs(job_db=tmp_path / "jobs.csv", start_job=ndvi_job)
    assert stats["job finished"] == 30 and openeo_simulator.created_count() == 30


def test_different_failures_do_not_stop_the_run(openeo_simulator, tmp_path):
    def flaky(row, connection, **kwargs):
        if row.name % 2:
            raise RuntimeError(f"odd row {row.name}" + "x" * row.name)  # different messages: not systematic
        return ndvi_job(row, connection)

    stats = manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(
        job_db=tmp_path / "jobs.csv", df=tiles_df(12), start_job=flaky
    )
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert (df["status"] == "start_failed").sum() == 6 and stats["job finished"] == 6


def _closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_backend_down_at_the_start_does_not_stop_the_others(openeo_simulator, tmp_path, caplog):
    """The down backend waits in its lane (its connection attempts take their time there) while the other works."""
    down = _closed_port()
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "root")
    manager.add_backend("down", connection=lambda: openeo.connect(down, retry=False), parallel_jobs=2)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
    with caplog.at_level(logging.WARNING, logger="prefect_openeo"):
        stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 4 and set(df["backend_name"]) == {"sim"}
    assert stats["job finished"] == 4
    assert "Backend 'down'" in caplog.text and "the other backends go on" in caplog.text


def test_giving_up_on_a_backend_ends_the_run_with_a_clear_error(openeo_simulator, tmp_path):
    from prefect_openeo.engine import BackendsGaveOut

    down = _closed_port()
    df = tiles_df(3)
    df["backend_name"] = [None, "down", None]  # row 1 is pinned to the backend that is down
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "root", give_up_after=1.0)
    manager.add_backend("down", connection=lambda: openeo.connect(down, retry=False), parallel_jobs=2)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=2)
    with pytest.raises(BackendsGaveOut, match="Gave up on backend\\(s\\) down: .* 1 row\\(s\\) are left"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=df, start_job=ndvi_job)
    out = pd.read_csv(tmp_path / "jobs.csv")
    assert list(out["status"]) == ["finished", "not_started", "finished"]
    assert openeo_simulator.created_count() == 2

"""The drop-in MultiBackendJobManager outside any flow run, over real HTTP against the simulator."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time

import openeo
import pandas as pd
import pytest
from conftest import manager_for, max_overlap, ndvi_job, static_server, tiles_df

from prefect_openeo import CsvJobDatabase, JobDatabaseError, MultiBackendJobManager, ParquetJobDatabase, create_job_db

pytestmark = pytest.mark.timeout(120)


def test_runs_all_rows_to_finished_with_results_and_stats(openeo_simulator, tmp_path):
    # Long enough to be seen running on a loaded machine: a job that ends between two sweeps has no
    # running_start_time (as upstream).
    openeo_simulator.config.run_duration = 1.0
    root = tmp_path / "root"
    manager = manager_for(openeo_simulator, root_dir=root)
    job_db = create_job_db(tmp_path / "jobs.csv", tiles_df(5))

    stats = manager.run_jobs(job_db=job_db, start_job=ndvi_job)

    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 5
    assert df["id"].is_unique and df["id"].str.startswith("j-").all()
    assert set(df["backend_name"]) == {"sim"}
    assert df["cpu"].str.endswith(" cpu-seconds").all()
    assert df["memory"].str.endswith(" mb-seconds").all()
    assert df["duration"].str.endswith(" seconds").all()
    assert (df["costs"] == 1.0).all()
    assert pd.to_datetime(df["running_start_time"]).notna().all()
    for key in ("start_job call", "job finished", "job started running", "job start", "job_queued_for_start"):
        assert stats[key] == 5, key
    assert stats["run_jobs loop"] > 0 and stats["sleep"] > 0 and stats["job_db persist"] > 0
    assert stats["job download"] == 5 and stats["files downloaded"] == 5
    # Exactly openeo's layout: job_{id}/ holds job-results.json, job_{id}.json and the assets, nothing else
    # (the STAC catalogue is the flow's and the CLI's, or stac_catalog=True); nothing else under root_dir.
    for job_id in df["id"]:
        job_dir = root / f"job_{job_id}"
        results_doc = json.loads((job_dir / "job-results.json").read_text())
        (asset_name, asset), *_ = results_doc["assets"].items()
        assert sorted(p.name for p in job_dir.iterdir()) == sorted(
            ["job-results.json", f"job_{job_id}.json", asset_name]
        )
        data = (job_dir / asset_name).read_bytes()
        assert len(data) == asset["file:size"]
        assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]
        assert json.loads((job_dir / f"job_{job_id}.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in root.iterdir()) == sorted(f"job_{job_id}" for job_id in df["id"])
    assert openeo_simulator.created_count() == 5


def test_parallel_jobs_per_backend_and_registration_order(openeo_simulator_factory, tmp_path):
    sim_a = openeo_simulator_factory("a", run_duration=0.5)
    sim_b = openeo_simulator_factory("b", run_duration=0.5)
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path, download_results=False)
    manager.add_backend("a", connection=openeo.connect(sim_a.url), parallel_jobs=3)
    manager.add_backend("b", connection=openeo.connect(sim_b.url), parallel_jobs=1)

    manager.run_jobs(job_db=tmp_path / "jobs.parquet", df=tiles_df(10), start_job=ndvi_job)

    df = pd.read_parquet(tmp_path / "jobs.parquet")
    assert list(df["status"]) == ["finished"] * 10
    # First fill in row order and registration order: three on "a", then one on "b".
    assert list(df["backend_name"][:4]) == ["a", "a", "a", "b"]
    assert max_overlap(sim_a.jobs()) == 3
    assert max_overlap(sim_b.jobs()) == 1
    assert sim_a.created_count() + sim_b.created_count() == 10
    assert (df["backend_name"] == "a").sum() > (df["backend_name"] == "b").sum()


def test_status_tracking_uses_the_job_listing(openeo_simulator, tmp_path):
    manager = manager_for(openeo_simulator, parallel_jobs=4, root_dir=tmp_path)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(8), start_job=ndvi_job)

    counts = openeo_simulator.request_counts()
    assert counts["GET /jobs"] >= 2
    # One GET /jobs/{id} per job, when it ended (for usage); never one per job per poll.
    assert counts["GET /jobs/{job_id}"] == 8
    assert counts["POST /jobs"] == 8 and counts["POST /jobs/{job_id}/results"] == 8


def test_sweeps_back_off_until_a_backend_shows_how_long_its_jobs_take():
    from prefect_openeo.backends import Backend
    from prefect_openeo.settings import settings

    BACKOFF_FRACTION, DUE_FRACTION, MAX_SWEEP_GAP = (
        settings.backoff_fraction,
        settings.due_fraction,
        settings.max_sweep_gap,
    )

    backend = Backend("b", connection=lambda: None)
    created = 995.0
    job = [("j-1", created, "running")]
    backend.sweep_due(job, 1000.0)  # this process saw it running from 1000 on
    backend.note_sweep(1100.0)  # the job had been running for 100 s at the last sweep
    assert not backend.sweep_due(job, 1100.0 + 0.9 * BACKOFF_FRACTION * 100)
    assert backend.sweep_due(job, 1100.0 + BACKOFF_FRACTION * 100)
    assert backend.sweep_due([("j-2", None, "running")], 1100.5)  # nothing known of the job: sweep

    backend.note_created("j-0", 800.0)  # this run created a job at 800 s ...
    backend.note_end("j-0", 1000.0)  # ... and saw it end 200 s later
    backend.note_end("j-9", 1000.0)  # a job an earlier run created: teaches nothing
    backend.note_sweep(1150.0)
    assert not backend.sweep_due(job, created + DUE_FRACTION * 200 - 1)
    assert backend.sweep_due(job, created + DUE_FRACTION * 200)
    # a waiting job: no job of this backend was seen to start running yet, so it backs off too
    waiting = [("j-3", 1990.0, "queued")]
    backend.sweep_due(waiting, 1990.0)
    backend.note_sweep(2000.0)
    assert not backend.sweep_due(waiting, 2000.0 + 0.9 * BACKOFF_FRACTION * 10)
    assert backend.sweep_due(waiting, 2000.0 + BACKOFF_FRACTION * 10)
    backend.note_sweep(10_000.0)  # never longer than MAX_SWEEP_GAP between sweeps, whatever the ages
    assert backend.sweep_due(waiting, 10_000.0 + MAX_SWEEP_GAP)


def test_a_duration_from_whole_second_timestamps_aims_at_the_latest_end_they_allow():
    """openeo-geopyspark-driver's timestamps have whole seconds: 4.5 s from XX:00.6 reads as 5 s (end at
    XX:05.1), from XX:00.3 as 4 s (end at XX:04.8). The look aims where the job has surely ended (a look
    too early costs a whole poll_sleep), no later than this run's own clock allows."""
    from datetime import datetime, timezone

    from prefect_openeo.backends import _duration_estimate

    def stamp(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    base = 1_800_000_000.0
    for phase in (0.05, 0.3, 0.6, 0.95):
        created, ended = base + phase, base + phase + 4.5
        details = {"created": stamp(created), "updated": stamp(ended)}
        estimate = _duration_estimate(details, created + 0.01, now=ended + 0.8)
        assert 4.5 - 0.01 <= estimate < 5.5, (phase, estimate)  # never early, at most a second late
        # seen ended sooner than the timestamps' bound: this run's clock is the tighter bound
        assert _duration_estimate(details, created + 0.01, now=ended + 0.05) <= 4.55
    # exact timestamps are taken as they are; none at all: from this run's creation to the sweep
    exact = {"created": "2026-01-01T00:00:00.250Z", "updated": "2026-01-01T00:00:04.750Z"}
    assert _duration_estimate(exact, 0.0, now=100.0) == pytest.approx(4.5)
    assert _duration_estimate(None, 10.0, now=16.0) == 6.0
    # clocks far apart (this run's 30 s behind the backend's): the backend's difference stands
    details = {"created": stamp(base), "updated": stamp(base + 5)}
    assert _duration_estimate(details, base + 30, now=base + 40) == 5.0


def test_a_run_whose_last_work_is_a_download_ends_then_not_a_poll_later(openeo_simulator, tmp_path):
    openeo_simulator.config.queue_duration, openeo_simulator.config.run_duration = 0.0, 0.2
    manager = manager_for(openeo_simulator, poll_sleep=6.0, root_dir=tmp_path / "root")
    job_db = create_job_db(tmp_path / "jobs.csv", tiles_df(1))
    began = time.monotonic()
    manager.run_jobs(job_db=job_db, start_job=ndvi_job)
    took = time.monotonic() - began
    assert job_db.read()["status"].tolist() == ["finished"]
    assert list((tmp_path / "root").rglob("*.tif")), "the result was downloaded"
    # sweeps at 0 s (create, start) and 6 s (finished: download); it used to sleep 6 s more after that
    assert took < 10.5, f"{took:.1f} s"


def test_a_resumed_run_backs_off_from_when_it_first_saw_a_job_not_from_old_records():
    from prefect_openeo.backends import Backend

    backend = Backend("b", connection=lambda: None)
    job = [("j-1", 0.0, "running")]  # created two hours before this run starts
    assert backend.sweep_due(job, 7200.0)  # the first sweep of the run
    backend.note_sweep(7200.0)
    # 15% of its age would be 18 minutes; this run has watched the job for 0 s, so the next poll sweeps
    assert backend.sweep_due(job, 7200.5)
    backend.note_sweep(7200.5)
    assert backend.sweep_due(job, 7201.0)


def test_a_first_wave_of_jobs_is_swept_less_often_the_longer_it_runs(openeo_simulator, tmp_path):
    openeo_simulator.config.queue_duration, openeo_simulator.config.run_duration = 0.2, 6.0
    manager = manager_for(openeo_simulator, parallel_jobs=2, root_dir=tmp_path, poll_sleep=0.1)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)

    assert stats["job finished"] == 2
    listings = openeo_simulator.request_counts()["GET /jobs"]
    # Sweeping every poll would list about 60 times during the 6 s run; backing off from 0.1 s to 15% of
    # the time running, about 25 times (fewer on a slow machine, whose loops come less often).
    assert 3 <= listings <= 40, listings
    assert stats["sweep skipped"] >= 10


def test_backend_without_listing_is_polled_per_job(openeo_simulator, tmp_path, monkeypatch):
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    monkeypatch.setattr(type(manager.backends["sim"]), "advertises_listing", lambda self: False)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)

    counts = openeo_simulator.request_counts()
    assert counts.get("GET /jobs", 0) == 0
    assert counts["GET /jobs/{job_id}"] >= 4
    assert stats["job describe"] == counts["GET /jobs/{job_id}"]
    assert stats["job finished"] == 2


def test_start_job_none_raising_or_not_a_job(openeo_simulator, tmp_path):
    def start_job(row, connection, **kwargs):
        if row.name == 1:
            return None
        if row.name == 2:
            raise RuntimeError("no data for this tile")
        if row.name == 3:
            return {"id": "not-a-job"}
        return ndvi_job(row, connection)

    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(5), start_job=start_job)

    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished", "skipped", "start_failed", "start_failed", "finished"]
    assert "no data for this tile" in df.loc[2, "message"]
    assert "expected an openeo BatchJob" in df.loc[3, "message"]
    assert stats["start_job skipped"] == 1 and stats["start_job error"] == 2
    assert openeo_simulator.created_count() == 2


def test_failed_jobs_get_error_logs_and_the_run_ends(openeo_simulator, tmp_path):
    openeo_simulator.config.failure_rate = 1.0
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root")
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=ndvi_job)

    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["error"] * 3
    assert stats["job failed"] == 3 and stats.get("job finished", 0) == 0
    for job_id in df["id"]:
        path = manager.get_error_log_path(job_id)
        assert path == tmp_path / "root" / f"job_{job_id}" / f"job_{job_id}_errors.json"
        logs = json.loads(path.read_text())
        assert logs and all(entry["level"] == "error" for entry in logs)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_cancel_running_job_after(openeo_simulator, tmp_path):
    openeo_simulator.config.run_duration = 30
    manager = manager_for(openeo_simulator, root_dir=tmp_path, cancel_running_job_after=1)
    started = time.monotonic()
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)

    assert time.monotonic() - started < 15
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["canceled", "canceled"]
    assert stats["job cancel"] == 2 and stats["job canceled"] == 2
    assert {job["status"] for job in openeo_simulator.jobs()} == {"canceled"}
    assert openeo_simulator.request_counts()["DELETE /jobs/{job_id}/results"] == 2


def test_download_results_false_writes_nothing(openeo_simulator, tmp_path):
    root = tmp_path / "root"
    manager = manager_for(openeo_simulator, root_dir=root, download_results=False)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=ndvi_job)
    assert stats["job finished"] == 3
    assert not root.exists() or list(root.iterdir()) == []
    assert openeo_simulator.request_counts().get("GET /jobs/{job_id}/results", 0) == 0


def test_empty_job_database(openeo_simulator, tmp_path):
    manager = manager_for(openeo_simulator, root_dir=tmp_path)
    job_db = create_job_db(tmp_path / "jobs.csv", pd.DataFrame({"year": pd.Series([], dtype=int)}))
    stats = manager.run_jobs(job_db=job_db, start_job=ndvi_job)
    assert stats.get("start_job call", 0) == 0 and stats.get("run_jobs loop", 0) == 0
    assert openeo_simulator.created_count() == 0


def test_rerun_resumes_without_duplicates(openeo_simulator, tmp_path):
    """Stop mid-run, rerun on the same job database: running jobs are tracked, not created again."""
    openeo_simulator.config.run_duration = 1.0
    db_path = tmp_path / "jobs.csv"
    manager = manager_for(openeo_simulator, parallel_jobs=3, root_dir=tmp_path / "root")
    manager.start_job_thread(start_job=ndvi_job, job_db=create_job_db(db_path, tiles_df(6)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        statuses = set(pd.read_csv(db_path)["status"])
        if statuses & {"queued", "running"}:
            break
        time.sleep(0.05)
    manager.stop_job_thread(timeout_seconds=10)
    first = pd.read_csv(db_path)
    assert set(first["status"]) & {"queued", "running", "queued_for_start", "created"}
    assert (first["status"] == "not_started").any()

    stats = manager_for(openeo_simulator, parallel_jobs=3, root_dir=tmp_path / "root").run_jobs(
        job_db=db_path, start_job=ndvi_job
    )
    final = pd.read_csv(db_path)
    assert list(final["status"]) == ["finished"] * 6
    assert openeo_simulator.created_count() == 6
    assert stats["start_job call"] == (first["status"] == "not_started").sum()
    # Jobs of the first run kept their ids.
    tracked = first["id"].notna()
    assert list(final.loc[tracked, "id"]) == list(first.loc[tracked, "id"])
    assert all((tmp_path / "root" / f"job_{job_id}" / "job-results.json").exists() for job_id in final["id"])


def test_a_resumed_run_keeps_the_pace_of_a_fresh_one(openeo_simulator, tmp_path):
    """Jobs an earlier run created a minute ago teach no durations (the pause between the runs is not a
    job's): the new jobs' ends are seen as soon as in a fresh run, not after a minute-long wait."""
    openeo_simulator.config.queue_duration, openeo_simulator.config.run_duration = 0.2, 1.0
    db_path = tmp_path / "jobs.csv"
    create_job_db(db_path, tiles_df(12))
    df = pd.read_csv(db_path, dtype={"id": object, "backend_name": object, "start_time": object})
    connection = openeo.connect(openeo_simulator.url)
    earlier = pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=60)
    for i in range(4):  # the earlier run's jobs: created a minute ago, ending now
        job = connection.create_job({"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}})
        job.start()
        df.loc[i, ["id", "backend_name", "status"]] = [job.job_id, "sim", "queued"]
        df.loc[i, "start_time"] = earlier.strftime("%Y-%m-%dT%H:%M:%SZ")
    df.to_csv(db_path, index=False)

    started = time.monotonic()
    stats = manager_for(openeo_simulator, parallel_jobs=4, root_dir=tmp_path / "root").run_jobs(
        job_db=db_path, start_job=ndvi_job
    )
    seconds = time.monotonic() - started
    assert list(pd.read_csv(db_path)["status"]) == ["finished"] * 12 and stats["start_job call"] == 8
    # Three waves of 1.2 s jobs; a run that learnt "jobs take a minute" from the earlier run's jobs waits
    # at least 0.8 x 60 s before it looks at the second wave.
    assert seconds < 30, seconds


def test_rerun_downloads_exactly_the_rows_whose_results_are_recorded_pending(openeo_simulator, tmp_path):
    """What a rerun downloads comes from the job database, never from which files happen to be on disk."""
    db_path = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path / "root", download_results=False).run_jobs(
        job_db=db_path, df=tiles_df(4), start_job=ndvi_job
    )
    df = pd.read_csv(db_path)
    assert "results" not in df.columns  # nothing was owed: no download state recorded
    df["results"] = ["pending", "done", None, "failed"]  # failed: given another go by the next run
    df.to_csv(db_path, index=False)
    requests_before = openeo_simulator.request_counts().get("GET /jobs/{job_id}/results", 0)

    stats = manager_for(openeo_simulator, root_dir=tmp_path / "root").run_jobs(job_db=db_path, start_job=ndvi_job)

    out = pd.read_csv(db_path)
    assert stats["job download"] == 2 and stats.get("start_job call", 0) == 0
    assert list(out["results"].fillna("")) == ["done", "done", "", "done"]
    present = [(tmp_path / "root" / f"job_{job_id}" / "job-results.json").exists() for job_id in out["id"]]
    assert present == [True, False, False, True]
    assert openeo_simulator.request_counts()["GET /jobs/{job_id}/results"] - requests_before == 2


def test_start_and_stop_job_thread(openeo_simulator, tmp_path):
    db_path = tmp_path / "jobs.csv"
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root")
    manager.start_job_thread(start_job=ndvi_job, job_db=CsvJobDatabase(db_path).initialize_from_df(tiles_df(3)))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and set(pd.read_csv(db_path)["status"]) != {"finished"}:
        time.sleep(0.1)
    manager.stop_job_thread()
    assert not manager._thread.is_alive()
    assert set(pd.read_csv(db_path)["status"]) == {"finished"}
    assert manager.stats["job finished"] == 3


def test_stop_job_thread_stops_an_unfinished_run_quickly(openeo_simulator, tmp_path):
    openeo_simulator.config.run_duration = 60
    manager = manager_for(openeo_simulator, root_dir=tmp_path, poll_sleep=5)
    manager.start_job_thread(start_job=ndvi_job, job_db=create_job_db(tmp_path / "jobs.csv", tiles_df(2)))
    time.sleep(0.5)
    started = time.monotonic()
    manager.stop_job_thread()
    assert time.monotonic() - started < 3
    assert not manager._thread.is_alive()
    assert set(pd.read_csv(tmp_path / "jobs.csv")["status"]) <= {"queued", "running", "created", "queued_for_start"}


def test_subclass_hooks(openeo_simulator, tmp_path):
    seen = []

    class MyManager(MultiBackendJobManager):
        def on_job_done(self, job, row):
            super().on_job_done(job, row)
            seen.append(("done", job.job_id, row["status"], self.get_job_dir(job.job_id).exists()))

        def on_job_error(self, job, row):
            seen.append(("error", job.job_id, row["status"], None))

    openeo_simulator.config.failure_rate = 0.5
    manager = MyManager(poll_sleep=0.1, root_dir=tmp_path / "root")
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url), parallel_jobs=4)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(8), start_job=ndvi_job)

    df = pd.read_csv(tmp_path / "jobs.csv")
    expected = sorted(
        ("done" if s == "finished" else "error", i, s, True if s == "finished" else None)
        for i, s in zip(df["id"], df["status"], strict=True)
    )
    assert sorted(seen) == expected
    assert {"done", "error"} == {kind for kind, *_ in seen}


def test_failing_hook_is_retried_then_recorded(openeo_simulator, tmp_path):
    calls = []

    class Flaky(MultiBackendJobManager):
        def on_job_done(self, job, row):
            calls.append(self.stats["run_jobs loop"])
            raise OSError("disk full")

    manager = Flaky(poll_sleep=0.05, root_dir=tmp_path)
    manager.add_backend("sim", connection=openeo.connect(openeo_simulator.url))
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert df.loc[0, "status"] == "finished"
    assert len(calls) == 3 and stats["on_job_done error"] == 3
    first_gap, second_gap = calls[1] - calls[0], calls[2] - calls[1]
    assert 1 <= first_gap < second_gap, calls  # retried on later sweeps, backing off
    assert "disk full" in df.loc[0, "message"]


def test_pinned_rows_and_unknown_backend(openeo_simulator_factory, tmp_path):
    sim_a, sim_b = openeo_simulator_factory("a"), openeo_simulator_factory("b")
    df = tiles_df(4)
    df["backend_name"] = [None, "b", "b", None]
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path, download_results=False)
    manager.add_backend("a", connection=openeo.connect(sim_a.url), parallel_jobs=4)
    manager.add_backend("b", connection=openeo.connect(sim_b.url), parallel_jobs=4)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=df, start_job=ndvi_job)
    out = pd.read_csv(tmp_path / "jobs.csv")
    assert list(out["backend_name"]) == ["a", "b", "b", "a"]
    assert sim_b.created_count() == 2

    bad = tiles_df(2)
    bad["backend_name"] = [None, "nowhere"]
    before = None
    path = tmp_path / "bad.csv"
    create_job_db(path, bad)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"row 1 .*'nowhere', which is not registered"):
        manager.run_jobs(job_db=path, start_job=ndvi_job)
    assert path.read_bytes() == before


def test_vanished_job_is_marked_and_the_run_goes_on(openeo_simulator, tmp_path):
    openeo_simulator.config.run_duration = 2.0
    db_path = tmp_path / "jobs.csv"
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    deleted = []

    def start_job(row, connection, **kwargs):
        job = ndvi_job(row, connection)
        if row.name == 0:
            threading.Timer(0.5, lambda: (openeo_simulator.delete_job(job.job_id), deleted.append(job.job_id))).start()
        return job

    manager.run_jobs(job_db=db_path, df=tiles_df(2), start_job=start_job)
    df = pd.read_csv(db_path)
    assert deleted
    assert list(df["status"]) == ["error", "finished"]
    assert "not found" in df.loc[0, "message"]


def test_429_and_transient_outage_are_survived(openeo_simulator, tmp_path):
    openeo_simulator.config.rate_429 = 0.2
    openeo_simulator.config.retry_after = 0
    manager = manager_for(openeo_simulator, parallel_jobs=3, root_dir=tmp_path)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(6), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 6
    assert openeo_simulator.created_count() == 6


def test_process_based_job_creator(openeo_simulator, tmp_path):
    """openeo's ProcessBasedJobCreator as start_job, with the UDP served over real HTTP."""
    from openeo.extra.job_management.process_based import ProcessBasedJobCreator

    udp = {
        "id": "ndvi_tile",
        "parameters": [
            {"name": "west", "description": "west", "schema": {"type": "number"}},
            {"name": "year", "description": "year", "schema": {"type": "integer"}},
            {
                "name": "bands",
                "description": "bands",
                "schema": {"type": "array"},
                "default": ["B04"],
                "optional": True,
            },
        ],
        "process_graph": {
            "n": {"process_id": "constant", "arguments": {"x": {"from_parameter": "west"}}, "result": True}
        },
    }
    with static_server(json.dumps(udp).encode(), "application/json") as root:
        namespace = f"{root}ndvi_tile.json"
        creator = ProcessBasedJobCreator(process_id="ndvi_tile", namespace=namespace)
        manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=creator)

    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 3
    for job_id, west, year in zip(df["id"], df["west"], df["year"], strict=True):
        (node,) = openeo_simulator.job(job_id)["process"]["process_graph"].values()
        assert node["namespace"] == namespace
        assert node["arguments"]["west"] == pytest.approx(west)
        assert node["arguments"]["year"] == year


def test_logs_histogram_each_loop(openeo_simulator, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    assert any("Job status histogram: {'finished': 2}. Run stats:" in record.getMessage() for record in caplog.records)


def test_outside_a_flow_prefect_is_not_imported(openeo_simulator, tmp_path):
    """Notebooks and existing suites: no Prefect import, no API, instant start."""
    import subprocess

    script = f"""
import sys, openeo, pandas as pd
from prefect_openeo import MultiBackendJobManager
m = MultiBackendJobManager(poll_sleep=0.05, root_dir={str(tmp_path)!r}, download_results=False)
m.add_backend("sim", connection=openeo.connect({openeo_simulator.url!r}))
def start_job(row, connection, **kw):
    return connection.create_job({{"n": {{"process_id": "constant", "arguments": {{"x": 1}}, "result": True}}}})
stats = m.run_jobs(job_db={str(tmp_path / "jobs.csv")!r}, df=pd.DataFrame({{"x": [1, 2]}}), start_job=start_job)
assert stats["job finished"] == 2, dict(stats)
print("prefect imported:", "prefect" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "prefect imported: False" in out.stdout


@pytest.mark.parametrize("db_class", [CsvJobDatabase, ParquetJobDatabase])
def test_openeo_job_database_objects_work_and_persist_atomically(openeo_simulator, tmp_path, db_class):
    path = tmp_path / ("jobs.csv" if db_class is CsvJobDatabase else "jobs.parquet")
    job_db = db_class(path).initialize_from_df(tiles_df(2))
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    manager.run_jobs(job_db=job_db, start_job=ndvi_job)
    assert isinstance(job_db, db_class)
    assert set(job_db.read()["status"]) == {"finished"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_malformed_job_database_is_a_clear_error_and_left_untouched(openeo_simulator, tmp_path):
    manager = manager_for(openeo_simulator, root_dir=tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(JobDatabaseError, match="empty.csv"):
        manager.run_jobs(job_db=empty, start_job=ndvi_job)
    assert empty.read_text() == ""

    weird = tmp_path / "weird.csv"
    weird.write_text("year,status\n2020,not_started\n2021,halfway\n")
    with pytest.raises(JobDatabaseError, match=r"weird.csv.*unknown values \['halfway'\] at row 1"):
        manager.run_jobs(job_db=weird, start_job=ndvi_job)
    assert weird.read_text() == "year,status\n2020,not_started\n2021,halfway\n"
    assert openeo_simulator.created_count() == 0


def test_a_slot_freed_in_a_sweep_gets_its_next_job_in_that_sweep(openeo_simulator_factory, tmp_path):
    """Track, then fill: the sweep that sees a job end creates the next row's job on its slot at once, instead
    of one poll later (openeo's manager also fills after tracking)."""
    sim = openeo_simulator_factory("sim", queue_duration=0.1, run_duration=0.3)
    manager = manager_for(sim, parallel_jobs=1, root_dir=tmp_path, poll_sleep=1.5, download_results=False)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=ndvi_job)

    assert list(pd.read_csv(tmp_path / "jobs.csv")["status"]) == ["finished"] * 3
    assert stats["slot refilled"] == 2  # rows 1 and 2, each in the sweep that saw its predecessor end
    jobs = sorted(sim.jobs(), key=lambda job: job["created_at"])
    assert len(jobs) == 3 and max_overlap(jobs) == 1
    # Each next job was created right after its predecessor's end was seen: less than a poll later.
    gaps = [b["created_at"] - a["ended_at"] for a, b in zip(jobs, jobs[1:], strict=False)]
    assert all(0 <= gap < 1.5 + 1.5 for gap in gaps), gaps
    # Without the refill a job ends, is seen, and its successor is created a sweep later: 5 sweeps at least.
    assert stats["run_jobs loop"] <= 4, stats["run_jobs loop"]

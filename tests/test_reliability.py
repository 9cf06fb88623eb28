"""Nothing lost, nothing duplicated: crash recovery, verified downloads, backend refusals, row retries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, tiles_df

from prefect_openeo import MultiBackendJobManager, create_job_db
from prefect_openeo.backends import creation_token, find_token
from prefect_openeo.downloads import DownloadVerificationError, download_asset, download_job_results

pytestmark = pytest.mark.timeout(120)


def manager_for(sim, **kwargs) -> MultiBackendJobManager:
    kwargs.setdefault("poll_sleep", 0.1)
    parallel_jobs = kwargs.pop("parallel_jobs", 2)
    manager = MultiBackendJobManager(**kwargs)
    manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=parallel_jobs)
    return manager


def test_created_jobs_carry_the_rows_creation_token(openeo_simulator, tmp_path):
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(3), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert df["create_token"].str.fullmatch(r"poj-[0-9a-f]{12}").all() and df["create_token"].is_unique
    for job_id, token, index in zip(df["id"], df["create_token"], df.index, strict=True):
        title = openeo_simulator.job(job_id)["title"]
        assert title == f"tile {index} [{token}]"
        assert find_token(title) == token


def test_rerun_adopts_a_job_created_before_a_crash(openeo_simulator, tmp_path):
    """The crash fell between POST /jobs and writing the id: the rerun finds the job by its token."""
    connection = openeo.connect(openeo_simulator.url)
    from prefect_openeo.backends import make_resilient

    make_resilient(connection)
    df = tiles_df(2)
    with creation_token("poj-0123456789ab"):
        orphan = ndvi_job(df.loc[0], connection)
    df["create_token"] = ["poj-0123456789ab", "poj-ffffffffffff"]
    path = tmp_path / "jobs.csv"
    create_job_db(path, df)
    assert openeo_simulator.created_count() == 1

    stats = manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(job_db=path, start_job=ndvi_job)

    out = pd.read_csv(path)
    assert list(out["status"]) == ["finished", "finished"]
    assert out.loc[0, "id"] == orphan.job_id
    assert stats["job adopted"] == 1 and stats["start_job call"] == 1
    assert openeo_simulator.created_count() == 2  # the orphan plus row 1's job: no duplicate


def test_rerun_starts_a_job_stranded_in_queued_for_start(openeo_simulator, tmp_path):
    """The crash fell between recording 'queued_for_start' and sending the start."""
    job = ndvi_job(tiles_df(1).loc[0], openeo.connect(openeo_simulator.url))
    df = tiles_df(1)
    df["id"], df["backend_name"], df["status"] = job.job_id, openeo_simulator.name, "queued_for_start"
    path = tmp_path / "jobs.csv"
    create_job_db(path, df)
    stats = manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(job_db=path, start_job=ndvi_job)
    assert pd.read_csv(path).loc[0, "status"] == "finished"
    assert stats["job start"] == 1 and stats.get("start_job call", 0) == 0
    assert openeo_simulator.created_count() == 1


def test_concurrent_job_limit_lowers_the_backends_slots(openeo_simulator, tmp_path):
    openeo_simulator.config.job_limit = 2
    openeo_simulator.config.run_duration = 0.5
    manager = manager_for(openeo_simulator, root_dir=tmp_path, parallel_jobs=5, download_results=False)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(6), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 6
    assert stats["job start retry"] >= 1
    assert openeo_simulator.created_count() == 6
    # Once refused, the manager kept at most the backend's limit active instead of hammering it.
    assert stats["job start retry"] <= 3


def test_failed_rows_are_retried_up_to_the_limit(openeo_simulator, tmp_path):
    openeo_simulator.config.failure_rate = 1.0
    manager = manager_for(openeo_simulator, root_dir=tmp_path, retry_failed_jobs=2, retry_backoff=0.1)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["error", "error"]
    assert list(df["retry_count"]) == [2, 2]
    assert openeo_simulator.created_count() == 6
    assert stats["job retry scheduled"] == 4 and stats["job failed"] == 6
    # The row says why its last attempt failed: the backend's reason, from its error logs.
    assert all(m.startswith(("ExecutorLost:", "UpstreamError:", "ProcessGraphError:")) for m in df["message"])


def test_retry_recovers_a_flaky_start_job(openeo_simulator, tmp_path):
    attempts = []

    def flaky(row, connection, **kwargs):
        attempts.append(row.name)
        if attempts.count(row.name) == 1:
            raise ConnectionError("backend hiccup")
        return ndvi_job(row, connection)

    manager = manager_for(openeo_simulator, root_dir=tmp_path, retry_failed_jobs=1, retry_backoff=0)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=flaky)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished", "finished"]
    assert list(df["retry_count"]) == [1, 1]


def test_download_is_verified_and_resumed(openeo_simulator, tmp_path):
    openeo_simulator.config.asset_size = 300_000
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    job = openeo.connect(openeo_simulator.url).job(pd.read_csv(tmp_path / "jobs.csv").loc[0, "id"])
    (name, asset), *_ = job.get_results().get_metadata()["assets"].items()

    full = tmp_path / "full"
    full.mkdir()
    download_asset(job, asset["href"], full / name, asset)
    data = (full / name).read_bytes()
    assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]

    # An interrupted download left the first 1000 bytes: the rest is fetched with a Range request.
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    (part_dir / f".{name}.part").write_bytes(data[:1000])
    assert download_asset(job, asset["href"], part_dir / name, asset) == len(data)
    assert (part_dir / name).read_bytes() == data
    assert not (part_dir / f".{name}.part").exists()

    # A corrupt partial file fails verification, and is removed so the next attempt starts clean.
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / f".{name}.part").write_bytes(b"x" * 1000)
    with pytest.raises(DownloadVerificationError, match="does not match file:checksum"):
        download_asset(job, asset["href"], bad_dir / name, asset)
    assert list(bad_dir.iterdir()) == []
    download_asset(job, asset["href"], bad_dir / name, asset)
    assert (bad_dir / name).read_bytes() == data


def test_wrong_size_is_rejected_and_nothing_left(openeo_simulator, tmp_path):
    manager = manager_for(openeo_simulator, root_dir=tmp_path, download_results=False)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    job = openeo.connect(openeo_simulator.url).job(pd.read_csv(tmp_path / "jobs.csv").loc[0, "id"])
    (name, asset), *_ = job.get_results().get_metadata()["assets"].items()
    lying = {**asset, "file:size": asset["file:size"] + 1}
    with pytest.raises(DownloadVerificationError, match="file:size"):
        download_asset(job, asset["href"], tmp_path / name, lying)
    assert not (tmp_path / name).exists() and not (tmp_path / f".{name}.part").exists()


def test_failed_download_is_retried_and_reported(openeo_simulator, tmp_path):
    """The results folder is unusable (a file stands where it should be): the row says so, nothing is lost."""
    root = tmp_path / "root"
    root.write_text("not a folder")
    manager = manager_for(openeo_simulator, root_dir=root)
    stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert df.loc[0, "status"] == "finished"
    assert stats["on_job_done error"] == 3
    assert "on_job_done failed after 3 attempt(s)" in df.loc[0, "message"]
    assert root.read_text() == "not a folder"


def test_download_job_results_layout_and_metadata(openeo_simulator, tmp_path):
    openeo_simulator.config.assets_per_job = 3
    manager = manager_for(openeo_simulator, root_dir=tmp_path / "root")
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    job_id = pd.read_csv(tmp_path / "jobs.csv").loc[0, "id"]
    job_dir = tmp_path / "root" / f"job_{job_id}"
    doc = json.loads((job_dir / "job-results.json").read_text())
    assert sorted(p.name for p in job_dir.iterdir()) == sorted(
        [*doc["assets"], "job-results.json", f"job_{job_id}.json"]
    )
    # Leftovers of a killed run are cleaned up by the next download.
    (job_dir / ".job-results.json.abc.tmp").write_text("half")
    report = download_job_results(openeo.connect(openeo_simulator.url).job(job_id), job_dir)
    assert report.assets == 3
    assert not (job_dir / ".job-results.json.abc.tmp").exists()


def test_persist_is_atomic_when_the_disk_fills_up(tmp_path):
    """A write that fails half-way (file size limit, like a full disk) leaves the previous version intact."""
    path = tmp_path / "jobs.csv"
    create_job_db(path, tiles_df(2000))
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        from prefect_openeo import get_job_db
        db = get_job_db({str(path)!r})
        df = db.get_by_status(["not_started"]).copy()
        df["status"] = "skipped"
        try:
            db.persist(df)
        except OSError as e:
            print("failed:", e.errno)
            sys.exit(3)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "failed: 27" in out.stdout  # EFBIG
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.csv"]


def test_persist_refuses_to_write_fewer_rows(tmp_path):
    from prefect_openeo import JobDatabaseError, get_job_db

    path = tmp_path / "jobs.csv"
    create_job_db(path, tiles_df(5))
    db = get_job_db(path)
    assert len(db.get_by_status(["not_started"])) == 5
    db._df = db._df.iloc[:2]  # a bug elsewhere that lost rows in memory
    with pytest.raises(JobDatabaseError, match="Refusing to write 2 rows .* which held 5"):
        db.persist(db._df)
    assert len(pd.read_csv(path)) == 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork/kill")
def test_killed_runs_lose_nothing_and_duplicate_nothing(tmp_path):
    """A few rounds of the chaos benchmark: SIGKILL at random moments, rerun until done."""
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "chaos.py")
    out = subprocess.run(
        [sys.executable, bench, "--rounds", "3", "--jobs", "12", "--seed", "3", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 3 and summary["kills"] >= 3
    assert summary["duplicates"] == 0 and summary["lost_rows"] == 0 and summary["missing_results"] == 0


@pytest.mark.timeout(240)
def test_a_60_second_outage_of_one_backend_does_not_stall_the_other(openeo_simulator_factory, tmp_path):
    """Backend a answers 503 (Retry-After: 1) for 60 s: b goes on meanwhile, a is used again once back.

    60 retries of one request: more than upstream's budget of 50, which would have stopped the run.
    """
    sim_a = openeo_simulator_factory("a", run_duration=0.3)
    sim_b = openeo_simulator_factory("b", run_duration=8.0)
    db_path = tmp_path / "jobs.csv"
    manager = MultiBackendJobManager(poll_sleep=0.2, root_dir=tmp_path / "root")
    manager.add_backend("a", connection=openeo.connect(sim_a.url), parallel_jobs=2)
    manager.add_backend("b", connection=openeo.connect(sim_b.url), parallel_jobs=1)
    create_job_db(db_path, tiles_df(16))  # more than b alone does during the outage
    start = sim_a.elapsed()
    sim_a.config.outages = [(start + 1.5, start + 61.5)]
    t0 = time.monotonic()
    manager.start_job_thread(start_job=ndvi_job, job_db=db_path)
    time.sleep(1.5 + 55)  # near the end of the outage
    during = pd.read_csv(db_path)
    finished_on_b = int(((during["backend_name"] == "b") & (during["status"] == "finished")).sum())
    # b went on: 8 s jobs one at a time, 6 at best in 56 s (4 leaves room for a loaded machine)
    assert finished_on_b >= 4, during[["status", "backend_name"]]
    a_before = sim_a.created_count()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and set(pd.read_csv(db_path)["status"]) != {"finished"}:
        time.sleep(0.5)
    manager.stop_job_thread(timeout_seconds=10)
    final = pd.read_csv(db_path)
    assert list(final["status"]) == ["finished"] * 16
    assert sim_a.created_count() + sim_b.created_count() == 16  # no duplicates
    assert sim_a.created_count() > a_before  # a took new rows once it was back
    # It kept trying through the outage (every answer a 503 with Retry-After: 1, waited out, not given up).
    assert sim_a.total_requests() >= 50
    assert time.monotonic() - t0 < 150


def test_a_429_storm_is_waited_out(openeo_simulator, tmp_path):
    openeo_simulator.config.rate_429 = 1.0
    openeo_simulator.config.retry_after = 1
    threading.Timer(4.0, lambda: setattr(openeo_simulator.config, "rate_429", 0.0)).start()
    manager = manager_for(openeo_simulator, root_dir=tmp_path, parallel_jobs=3)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(4), start_job=ndvi_job)
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 4
    assert openeo_simulator.created_count() == 4
    assert sum(openeo_simulator.request_counts().values()) > 4 * 5


@pytest.mark.parametrize("suffix", ["csv", "parquet", "db"])
def test_persist_clears_cells_and_keeps_other_rows(tmp_path, suffix):
    """openeo's merge skips empty values (a cleared job id would stay) and a fresh object would write only the
    given rows; both would lose or corrupt state on retries and resets."""
    from prefect_openeo import get_job_db

    path = tmp_path / f"jobs.{suffix}"
    df = tiles_df(4)
    df["status"], df["id"], df["backend_name"] = "error", [f"j-{i}" for i in range(4)], "sim"
    create_job_db(path, df)
    fresh = get_job_db(path)  # has not read its file yet
    row = fresh.get_by_indices([1]).copy() if suffix == "db" else pd.DataFrame(index=[1])
    row["status"], row["id"] = "not_started", None
    fresh.persist(row[["status", "id"]])
    out = get_job_db(path).read()
    assert len(out) == 4
    assert list(out["status"]) == ["error", "not_started", "error", "error"]
    assert pd.isna(out.loc[1, "id"]) and out.loc[2, "id"] == "j-2"
    assert out.loc[3, "west"] == pytest.approx(5.3)

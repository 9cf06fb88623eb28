"""Which rows go where: fair shares between workers, and the last rows on the backends that end them first."""

from __future__ import annotations

import logging

import pandas as pd
from conftest import manager_for, ndvi_job, tiles_df

from prefect_openeo.placement import speed_caps, worker_room


def test_a_worker_fills_its_fair_share_and_a_share_left_idle_for_a_sweep():
    # 2 workers, budget 4: a share of 2; holding 1, it may take 1 of the 3 free slots.
    room, left = worker_room({"b": 3}, {"b": 4}, {"b": 1}, workers=2, spare={})
    assert room == {"b": 1} and left == {"b": 2}
    # The 2 it left are still free at its next claim: nobody took them, they are its.
    room, left = worker_room({"b": 2}, {"b": 4}, {"b": 2}, workers=2, spare=left)
    assert room == {"b": 2} and left == {"b": 0}
    # Alone, a worker has the whole budget.
    assert worker_room({"b": 4}, {"b": 4}, {}, workers=1, spare={})[0] == {"b": 4}


def test_the_last_rows_wait_for_the_fast_backend():
    expected, slots = {"fast": 10.0, "slow": 30.0}, {"fast": 2, "slow": 2}
    # In 30 s the fast backend ends about 2 * 30 / 10 = 6 rows: of 7 waiting, the slow one starts 1.
    caps = speed_caps(expected, slots, {"": 7})
    assert caps["slow"][0] == 1 and "fast" not in caps
    assert "about 30 s" in caps["slow"][1] and "fast: 10 s" in caps["slow"][1]
    # Of 5 waiting, none: each ends sooner by waiting for the fast backend.
    assert speed_caps(expected, slots, {"": 5})["slow"][0] == 0
    # Earlier, with 8 or more waiting, the slow backend fills both its slots: no cap.
    assert speed_caps(expected, slots, {"": 8}) == speed_caps(expected, slots, {"": 100}) == {}
    # A row pinned to the slow backend still goes there.
    assert speed_caps(expected, slots, {"": 5, "slow": 1})["slow"][0] == 1
    # Same speed: nobody waits for anybody.
    assert speed_caps({"a": 10.0, "b": 10.0}, {"a": 2, "b": 2}, {"": 3}) == {}
    # Jobs seen ended within a clock tick (a duration of 0 s): the fastest backend, not a division by zero.
    assert speed_caps({"instant": 0.0, "slow": 30.0}, slots | {"instant": 2}, {"": 5})["slow"][0] == 0


def test_a_run_sends_its_last_rows_to_the_faster_backend(openeo_simulator_factory, tmp_path, caplog):
    """Two backends, one three times slower: once this run has seen how long their jobs take, the last rows
    wait for the fast one (upstream fills backends in registration order, the slow one first here)."""
    slow = openeo_simulator_factory("slow", queue_duration=0.3, run_duration=2.4)
    fast = openeo_simulator_factory("fast", queue_duration=0.1, run_duration=0.8)
    manager = manager_for(slow, fast, parallel_jobs=2, root_dir=tmp_path, download_results=False, poll_sleep=0.1)

    with caplog.at_level(logging.INFO, logger="prefect_openeo"):
        stats = manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(24), start_job=ndvi_job)

    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 24
    assert stats["sweeps waiting for faster backends"] > 0
    assert any("backend 'slow' starts" in r.getMessage() for r in caplog.records)
    # The slow backend's last job is created before the fast one's: the tail runs where it ends first.
    last = df.groupby("backend_name")["start_time"].max()
    assert last["slow"] < last["fast"]
    assert (df["backend_name"] == "fast").sum() > (df["backend_name"] == "slow").sum()

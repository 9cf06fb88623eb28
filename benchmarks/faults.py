"""Backends that misbehave: openeo's MultiBackendJobManager and prefect-openeo's, side by side.

Each scenario runs both managers, one after the other, against fresh simulated backends in this process
(``prefect_openeo.simulator`` with its fault-injecting layer, ``Fault``); each manager runs in a child process
of its own, killed if it has not ended after ``--cap`` seconds. Both get the same backends: a connection
factory (``add_backend(name, connection=callable)``, which both accept) that connects with a 10 s default
timeout and, where the backend wants it, signs in with basic auth. prefect-openeo also gets
``give_up_after=30`` (a campaign's setting: end the run when only an unreachable backend's rows are left).

Per scenario and manager: rows finished (of all rows), backend jobs created more than once for a row,
finished rows whose results are on disk and match the results document (size and checksum), the wall time,
and how the run ended (by itself, raised, or killed at the cap).

    python benchmarks/faults.py [--only NAME,...] [--cap 240]
    python benchmarks/faults.py --soak [--soak-jobs 300 --soak-minutes 10]

``--soak``: prefect-openeo only, ≥ 300 jobs over ≥ 10 minutes on two backends, tokens expiring every 60 s,
one backend hanging for 60 s and one answering HTML for 30 s. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from openeo.extra.job_management import create_job_db

from prefect_openeo.simulator import BackendSimulator, Fault, SimulatorConfig

MANAGERS = ("openeo", "prefect-openeo")

RUNNER = r"""
import json, sys, time
import openeo
spec = json.loads(sys.argv[1])
if spec["manager"] == "openeo":
    from openeo.extra.job_management import MultiBackendJobManager
    kwargs = {}
else:
    from prefect_openeo import MultiBackendJobManager
    kwargs = {"give_up_after": spec["give_up_after"]}

def start_job(row, connection, **_):
    process = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}
    return connection.create_job(process, title=f"row {row['name']}", validate=False)

def factory(url, auth):
    def connect():
        connection = openeo.connect(url, default_timeout=10)
        return connection.authenticate_basic("user", "password") if auth else connection
    return connect

manager = MultiBackendJobManager(poll_sleep=spec["poll"], root_dir=spec["root"], **kwargs)
for b in spec["backends"]:
    manager.add_backend(b["name"], connection=factory(b["url"], b["auth"]), parallel_jobs=b["slots"])
began = time.monotonic()
try:
    manager.run_jobs(job_db=spec["db"], start_job=start_job)
    ended = "by itself"
except Exception as e:
    ended = f"raised {type(e).__name__}: {str(e)[:120]}"
print(json.dumps({"seconds": time.monotonic() - began, "ended": ended}), flush=True)
"""


@dataclass
class Scenario:
    """What the backends do; ``during`` (if any) runs in a thread while the manager runs."""

    name: str
    what: str
    configs: list[dict] = field(default_factory=lambda: [{}])
    faults: list[list[Fault]] = field(default_factory=lambda: [[]])
    rows: int = 12
    slots: int = 3
    during: Callable[[Path, list[BackendSimulator], threading.Event], None] | None = None
    kill_after: float | None = None  # SIGKILL the run after this many seconds, then resume it
    pause: float = 40.0


def _edit_during_run(db: Path, sims: list[BackendSimulator], stop: threading.Event) -> None:
    """Once a job exists: add a row and set the last not_started row skipped, as a person would (pandas)."""
    while not stop.is_set() and sum(s.created_count() for s in sims) < 1:
        time.sleep(0.05)
    df = pd.read_csv(db)
    last = df.index[df["status"] == "not_started"][-1]
    df.loc[last, "status"] = "skipped"
    added = df.iloc[[0]].copy()
    added.loc[:, ["name", "status"]] = ["added", "not_started"]
    for column in ("id", "backend_name", "start_time", "running_start_time"):
        if column in added.columns:
            added[column] = None
    pd.concat([df, added], ignore_index=True).to_csv(db, index=False)


SCENARIOS = [
    Scenario("baseline", "behaves"),
    Scenario(
        "tokens",
        "basic-auth tokens refused (403 TokenInvalid) 20 s after they were issued",
        configs=[{"require_auth": True, "run_duration": 4.0}],
        faults=[[Fault("expire_tokens", seconds=20)]],
        rows=18,
    ),
    Scenario(
        "hang",
        "one of two backends stops answering GET /jobs and GET /jobs/{id} after 6 s",
        configs=[{}, {"run_duration": 8.0}],
        faults=[[], [Fault("hang", method="GET", path="/jobs", after=6.0)]],
    ),
    Scenario(
        "paused",
        "every status is 'paused' (openEO does not define it) for 8 s",
        faults=[[Fault("status", method="GET", path="/jobs", job_status="paused", after=1.0, duration=8.0)]],
    ),
    Scenario(
        "html",
        "200 with an HTML page for GET /jobs and GET /jobs/{id} for 8 s",
        faults=[[Fault("html", method="GET", path=r"/jobs(/[^/]+)?$", after=1.0, duration=8.0)]],
    ),
    Scenario(
        "start-500",
        "500 on the first 60 POST /jobs/{id}/results",
        faults=[[Fault("error", method="POST", path=r"/jobs/[^/]+/results$", times=60)]],
    ),
    Scenario(
        "lost-reply",
        "POST /jobs creates the job, then answers 500 (3 times)",
        faults=[[Fault("lose_reply", method="POST", path="/jobs$", times=3)]],
    ),
    Scenario(
        "storm",
        "503 on every request for 10 s",
        faults=[[Fault("error", http_status=503, code="ServiceUnavailable", after=3.0, duration=10.0)]],
    ),
    Scenario("no-assets", "results documents without assets", configs=[{"assets_per_job": 0}]),
    Scenario("csv-edit", "someone adds a row and sets another skipped during the run", during=_edit_during_run),
    Scenario(
        "resume",
        "the run is killed after 8 s and resumed 40 s later (5 s jobs); wall = the resumed run",
        configs=[{"run_duration": 5.0}],
        kill_after=8.0,
    ),
]


def _jobs_db(path: Path, rows: int) -> None:
    """A fresh CSV job database (openeo's own ``create_job_db``: its columns, read by both managers)."""
    create_job_db(path, pd.DataFrame({"name": [f"r{i}" for i in range(rows)], "year": 2024}))


def _spec(manager: str, db: Path, root: Path, sims: list[BackendSimulator], scenario: Scenario) -> str:
    backends = [{"name": s.name, "url": s.url, "auth": s.config.require_auth, "slots": scenario.slots} for s in sims]
    spec = {"manager": manager, "db": str(db), "root": str(root), "backends": backends}
    return json.dumps({**spec, "poll": 1.0, "give_up_after": 30.0})


def _run(spec: str, cap: float, kill_after: float | None = None) -> tuple[dict, bool]:
    """Run one manager in a child process; returns its report and whether it was killed at the cap."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    began = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=kill_after if kill_after is not None else cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"seconds": time.monotonic() - began, "ended": f"killed at {kill_after or cap:.0f} s"}, True
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"seconds": time.monotonic() - began, "ended": f"exited {proc.returncode}"}, False
    return json.loads(lines[-1]), False


def _verified(root: Path, df: pd.DataFrame) -> int:
    """Finished rows whose every asset is on disk with the size and checksum of the results document."""
    count = 0
    for job_id in df.loc[df["status"] == "finished", "id"].dropna():
        folder = root / f"job_{job_id}"
        try:
            assets = json.loads((folder / "job-results.json").read_text()).get("assets") or {}
        except (OSError, ValueError):
            continue
        ok = bool(assets)
        for name, asset in assets.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != asset.get("file:size"):
                ok = False
                break
            checksum = asset.get("file:checksum")
            if checksum and checksum != "1220" + hashlib.sha256(path.read_bytes()).hexdigest():
                ok = False
                break
        count += ok
    return count


def _duplicates(sims: list[BackendSimulator]) -> int:
    """Backend jobs beyond the first for one row (titles ``row rN``, prefect-openeo appends its token)."""
    titles = collections.Counter((j.get("title") or "").split(" [")[0] for s in sims for j in s.jobs())
    return sum(n - 1 for n in titles.values() if n > 1)


def run_scenario(scenario: Scenario, manager: str, cap: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sims = []
        try:
            for i, config in enumerate(scenario.configs):
                base = {"queue_duration": 0.5, "run_duration": 2.0, "capacity": 100, **config}
                sim = BackendSimulator(SimulatorConfig(**base), name=f"b{i}").start()
                sims.append(sim)
            db, root = tmp_path / "jobs.csv", tmp_path / "results"
            _jobs_db(db, scenario.rows)
            for sim, faults in zip(sims, scenario.faults, strict=True):
                for fault in faults:
                    fault.added = time.monotonic()
                    fault.hits = 0
                    sim.faults.add(fault)
            stop = threading.Event()
            helper = None
            if scenario.during is not None:
                helper = threading.Thread(target=scenario.during, args=(db, sims, stop), daemon=True)
                helper.start()
            spec = _spec(manager, db, root, sims, scenario)
            if scenario.kill_after is not None:
                _run(spec, cap, kill_after=scenario.kill_after)
                time.sleep(scenario.pause)
            report, _ = _run(spec, cap)
            stop.set()
            df = pd.read_csv(db)
            return {
                "scenario": scenario.name,
                "manager": manager,
                "rows": len(df),
                "finished": int((df["status"] == "finished").sum()),
                "statuses": df["status"].value_counts().to_dict(),
                "duplicates": _duplicates(sims),
                "verified": _verified(root, df),
                "seconds": round(report["seconds"], 1),
                "ended": report["ended"],
                "skipped kept": bool((df["status"] == "skipped").any()) if scenario.during else None,
            }
        finally:
            for sim in sims:
                sim.stop()


def soak(jobs: int, minutes: float, cap: float) -> dict:
    """prefect-openeo alone: ``jobs`` jobs over about ``minutes`` on two backends of 5 slots, tokens expiring
    every 60 s, backend b0 hanging for 60 s and b1 answering HTML for 30 s along the way."""
    waves = jobs / 10
    run = max(1.0, minutes * 60 / waves - 0.5)
    scenario = Scenario(
        "soak",
        f"{jobs} jobs, tokens expire every 60 s, b0 hangs 60 s, b1 answers HTML 30 s",
        configs=[{"require_auth": True, "run_duration": run}] * 2,
        faults=[
            [Fault("expire_tokens", seconds=60), Fault("hang", method="GET", path="/jobs", after=120, duration=60)],
            [Fault("expire_tokens", seconds=60), Fault("html", method="GET", path="/jobs", after=240, duration=30)],
        ],
        rows=jobs,
        slots=5,
    )
    return run_scenario(scenario, "prefect-openeo", cap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="Comma-separated scenario names (default: all).")
    parser.add_argument("--cap", type=float, default=240.0, help="Kill a run that has not ended after this (s).")
    parser.add_argument("--soak", action="store_true", help="Run the soak instead of the scenarios.")
    parser.add_argument("--soak-jobs", type=int, default=300)
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    args = parser.parse_args()
    if args.soak:
        result = soak(args.soak_jobs, args.soak_minutes, cap=args.soak_minutes * 60 * 3)
        print(json.dumps(result))
        return
    wanted = {n for n in args.only.split(",") if n}
    results = []
    print("| backend does | manager | finished | duplicates | results verified | wall s | ended |")
    print("|---|---|---:|---:|---:|---:|---|")
    for scenario in SCENARIOS:
        if wanted and scenario.name not in wanted:
            continue
        for manager in MANAGERS:
            r = run_scenario(scenario, manager, args.cap)
            results.append(r)
            extra = "" if r["skipped kept"] is None else f"; skipped row kept: {r['skipped kept']}"
            print(
                f"| {scenario.what} | {manager} | {r['finished']}/{r['rows']} | {r['duplicates']} | "
                f"{r['verified']} | {r['seconds']} | {r['ended']}{extra} |",
                flush=True,
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

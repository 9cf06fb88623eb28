"""Chaos benchmark: kill managers with SIGKILL at random moments, rerun, then check with the simulator's
records as the truth that no backend job was created twice, no row was lost, every result is on disk and
verified, and no backend ever had more jobs queued or running than ``parallel_jobs``.

Modes:
  * ``--db csv`` / ``--db sqlite``: one process at a time, killed at random and rerun at once
    (``--kills`` per round), then a final run until done;
  * ``--db postgres``: ``--workers`` processes share one PostgreSQL job database; every 0.5-6 s a random one
    is killed and replaced at once (``--kills`` per round), then the survivors finish.

A final run must end without waiting out a lease (leases are 300 s: the final phase is reported, and a
round whose final phase takes longer than ``--lease-bound`` seconds fails).

    python benchmarks/chaos.py --rounds 50 [--jobs 24] [--manager prefect-openeo|openeo|both] [--db csv]
    python benchmarks/chaos.py --db sqlite --rounds 10 --kills 3
    python benchmarks/chaos.py --db postgres --workers 4 --rounds 6 --kills 6 --jobs 60

The last line printed is a JSON summary (for the test suite).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pandas as pd  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

WORKER = str(Path(__file__).parent / "chaos_worker.py")
POSTGRES_URL = os.environ.get("PREFECT_OPENEO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PARALLEL_JOBS = 3


def peak_active(jobs: list[dict]) -> int:
    """Most jobs queued or running at once on one backend (from its start request to its end)."""
    events = []
    for job in jobs:
        if job["started_at"] is None:
            continue
        end = job["ended_at"] if job["ended_at"] is not None else job["canceled_at"]
        events += [(job["started_at"], 1), (end if end is not None else float("inf"), -1)]
    current = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        current += delta
        peak = max(peak, current)
    return peak


def read_db(args, workdir: Path, table: str) -> pd.DataFrame:
    from prefect_openeo import get_job_db
    from prefect_openeo.jobdb.sql import SqlJobDatabase

    if args.db == "csv":
        return get_job_db(workdir / "jobs.csv").read()
    url = POSTGRES_URL if args.db == "postgres" else str(workdir / "jobs.db")
    return SqlJobDatabase(url, table).read()


def check_round(df: pd.DataFrame, workdir: Path, round_id: str, jobs: int, sim_jobs: list[list[dict]]) -> dict:
    """Duplicates (backend jobs per row beyond one), lost rows, rows without verified results, peak load."""
    mine = [[j for j in backend if (j["title"] or "").startswith(round_id + "-")] for backend in sim_jobs]
    per_row = collections.Counter(j["title"].split(" [")[0] for backend in mine for j in backend)
    duplicates = sum(n - 1 for n in per_row.values() if n > 1)
    lost = jobs - int((df["status"] == "finished").sum())
    missing = 0
    for job_id in df["id"].dropna():
        job_dir = workdir / "results" / f"job_{job_id}"
        try:
            doc = json.loads((job_dir / "job-results.json").read_text())
            if not (job_dir / f"job_{job_id}.json").exists():
                raise FileNotFoundError("metadata")
            for name, asset in doc["assets"].items():
                data = (job_dir / name).read_bytes()
                if (
                    len(data) != asset["file:size"]
                    or "1220" + hashlib.sha256(data).hexdigest() != asset["file:checksum"]
                ):
                    raise ValueError(f"{name} does not verify")
        except (OSError, ValueError, KeyError):
            missing += 1
    missing += lost  # a row that never finished has no results either
    recorded = int((df.get("results", pd.Series(dtype=object)) == "done").sum()) if "results" in df else None
    return {
        "duplicates": duplicates,
        "lost_rows": lost,
        "missing_results": missing,
        "results_recorded_done": recorded,
        "peak_active": max((peak_active(backend) for backend in mine), default=0),
    }


def worker_cmd(args, manager: str, workdir: Path, table: str, urls: list[str]) -> list[str]:
    if args.db == "csv":
        db = str(workdir / "jobs.csv")
    elif args.db == "sqlite":
        db = str(workdir / "jobs.db")
    else:
        db = POSTGRES_URL
    return [sys.executable, WORKER, manager, db, str(workdir / "results"), *urls, "--table", table,
            "--parallel-jobs", str(PARALLEL_JOBS)]  # fmt: skip


def create_db(args, workdir: Path, table: str, round_id: str) -> None:
    from prefect_openeo import create_job_db
    from prefect_openeo.jobdb.sql import SqlJobDatabase

    df = pd.DataFrame({"round": [round_id] * args.jobs})
    if args.db == "csv":
        create_job_db(workdir / "jobs.csv", df)
    else:
        SqlJobDatabase(POSTGRES_URL if args.db == "postgres" else workdir / "jobs.db", table).initialize_from_df(df)


def one_at_a_time(args, cmd: list[str], rng: random.Random) -> tuple[int, object, float, str]:
    """Start, kill at a random moment, start again at once; then a final run until done."""
    kills = 0
    for _ in range(args.kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, args.max_delay))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
    started = time.monotonic()
    try:
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        exit_code, stderr = final.returncode, final.stderr
    except subprocess.TimeoutExpired as e:  # the rerun never finished (a known upstream gap)
        exit_code, stderr = "timeout", (e.stderr or b"").decode(errors="replace")
    return kills, exit_code, time.monotonic() - started, stderr


def fleet(args, cmd: list[str], rng: random.Random) -> tuple[int, object, float, str]:
    """``--workers`` at once; a random one killed every 0.5-6 s and replaced at once; then the rest finish."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(args.workers)]
    kills = 0
    while kills < args.kills and any(p.poll() is None for p in procs):
        time.sleep(rng.uniform(0.5, 6.0))
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            break
        victim = rng.choice(alive)
        victim.kill()
        victim.wait()
        kills += 1
        procs.remove(victim)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    started = time.monotonic()
    exit_code: object = 0
    stderr = ""
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
            if proc.returncode != 0:
                exit_code, stderr = proc.returncode, err.decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = "timeout"
    return kills, exit_code, time.monotonic() - started, stderr


def run_round(args, sims: SimulatorProcess, manager: str, round_no: int, rng: random.Random, base: Path) -> dict:
    round_id = f"{manager}-{args.db}-{round_no}-{uuid.uuid4().hex[:6]}"
    workdir = base / round_id
    workdir.mkdir(parents=True)
    table = f"chaos_{uuid.uuid4().hex[:10]}"
    create_db(args, workdir, table, round_id)
    cmd = worker_cmd(args, manager, workdir, table, sims.urls)
    run = fleet if args.db == "postgres" else one_at_a_time
    kills, exit_code, final_seconds, stderr = run(args, cmd, rng)
    outcome = {"round": round_no, "kills": kills, "final_exit": exit_code, "final_seconds": round(final_seconds, 1)}
    if exit_code != 0:
        outcome["error"] = stderr[-2000:]
    try:
        df = read_db(args, workdir, table)
    except Exception as e:  # e.g. a CSV truncated by a kill during a non-atomic write (openeo's manager)
        outcome["unreadable_job_db"] = f"{e!r}"[:300]
        df = pd.DataFrame({"status": pd.Series(dtype=object), "id": pd.Series(dtype=object)})
    outcome.update(check_round(df, workdir, round_id, args.jobs, sims.jobs()))
    outcome["waited_out_a_lease"] = final_seconds > args.lease_bound
    if args.db == "postgres":
        _drop(table)
    return outcome


def _drop(table: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}_meta"'))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per round")
    parser.add_argument("--max-delay", type=float, default=2.5, help="latest kill, seconds after a start")
    parser.add_argument("--manager", choices=["prefect-openeo", "openeo", "both"], default="prefect-openeo")
    parser.add_argument("--db", choices=["csv", "sqlite", "postgres"], default="csv")
    parser.add_argument("--workers", type=int, default=4, help="workers at once (--db postgres)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--lease-bound", type=float, default=120, help="a final phase longer than this fails")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.db != "csv" and args.manager != "prefect-openeo":
        parser.error("openeo's manager has no SQL job database: use --db csv for --manager openeo/both")
    managers = ["openeo", "prefect-openeo"] if args.manager == "both" else [args.manager]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    totals = {}
    with SimulatorProcess(2, queue_duration=0.3, run_duration=1.0, jitter=0.3, capacity=3, asset_size=200_000) as sims:
        for manager in managers:
            rng = random.Random(args.seed)
            total: collections.Counter = collections.Counter()
            peak = 0
            for round_no in range(args.rounds):
                outcome = run_round(args, sims, manager, round_no, rng, base)
                print(json.dumps({"manager": manager, "db": args.db, **outcome}), flush=True)
                total.update({k: outcome[k] for k in ("kills", "duplicates", "lost_rows", "missing_results")})
                total["failed_final_runs"] += outcome["final_exit"] != 0
                total["unreadable_job_dbs"] += "unreadable_job_db" in outcome
                total["waited_out_a_lease"] += outcome["waited_out_a_lease"]
                total["slowest_final_seconds"] = max(total["slowest_final_seconds"], outcome["final_seconds"])
                peak = max(peak, outcome["peak_active"])
            totals[manager] = {"db": args.db, "rounds": args.rounds, "jobs_per_round": args.jobs, **total,
                               "peak_active_per_backend": peak, "parallel_jobs": PARALLEL_JOBS}  # fmt: skip
    workers = f", {args.workers} workers at once" if args.db == "postgres" else ""
    print(f"# {args.db}: {args.rounds} rounds x {args.jobs} jobs, {args.kills} SIGKILLs per round{workers}")
    for manager, total in totals.items():
        print(f"# {manager}: " + ", ".join(f"{k}={v}" for k, v in total.items()))
    summary = totals[managers[-1]]
    print(json.dumps(summary))
    ok = summary["duplicates"] == summary["lost_rows"] == summary["missing_results"] == 0
    ok = ok and summary["peak_active_per_backend"] <= PARALLEL_JOBS and not summary["waited_out_a_lease"]
    return 0 if ok and not summary["failed_final_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())

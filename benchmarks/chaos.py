"""Chaos benchmark: kill the manager with SIGKILL at random moments, rerun until done, then check that
no backend job was created twice, no row was lost, and every result is on disk and verified.

    python benchmarks/chaos.py --rounds 50 [--jobs 12] [--manager prefect-openeo|openeo|both]

The last line printed is a JSON summary (for the test suite).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pandas as pd  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

WORKER = str(Path(__file__).parent / "chaos_worker.py")


def check_round(workdir: Path, round_id: str, jobs: int, backend_jobs: list[dict]) -> dict:
    """Duplicates (backend jobs per row beyond one), lost rows, and rows without verified results."""
    per_row = collections.Counter(j["title"].split(" [")[0] for j in backend_jobs if j["title"].startswith(round_id))
    duplicates = sum(n - 1 for n in per_row.values() if n > 1)
    df = pd.read_csv(workdir / "jobs.csv")
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
    return {"duplicates": duplicates, "lost_rows": lost, "missing_results": missing}


def run_round(args, sims: SimulatorProcess, manager: str, round_no: int, rng: random.Random, base: Path) -> dict:
    round_id = f"{manager}-{round_no}"
    workdir = base / round_id
    workdir.mkdir(parents=True)
    from prefect_openeo import create_job_db

    create_job_db(workdir / "jobs.csv", pd.DataFrame({"round": [round_id] * args.jobs}))
    cmd = [sys.executable, WORKER, manager, str(workdir / "jobs.csv"), str(workdir / "results"), *sims.urls]
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
    outcome = {
        "round": round_no,
        "kills": kills,
        "final_exit": exit_code,
        "final_seconds": round(time.monotonic() - started, 1),
    }
    if exit_code != 0:
        outcome["error"] = stderr[-2000:]
    backend_jobs = [job for jobs in sims.jobs() for job in jobs]
    outcome.update(check_round(workdir, round_id, args.jobs, backend_jobs))
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per round before the final run")
    parser.add_argument("--max-delay", type=float, default=2.5, help="latest kill, seconds after a start")
    parser.add_argument("--manager", choices=["prefect-openeo", "openeo", "both"], default="prefect-openeo")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    managers = ["openeo", "prefect-openeo"] if args.manager == "both" else [args.manager]
    base = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    totals = {}
    with SimulatorProcess(2, queue_duration=0.3, run_duration=1.0, jitter=0.3, capacity=3, asset_size=200_000) as sims:
        for manager in managers:
            rng = random.Random(args.seed)
            total = collections.Counter()
            for round_no in range(args.rounds):
                outcome = run_round(args, sims, manager, round_no, rng, base)
                print(json.dumps({"manager": manager, **outcome}), flush=True)
                total.update({k: outcome[k] for k in ("kills", "duplicates", "lost_rows", "missing_results")})
                total["failed_final_runs"] += outcome["final_exit"] != 0
            totals[manager] = {"rounds": args.rounds, "jobs_per_round": args.jobs, **total}
    print(f"# {args.rounds} rounds x {args.jobs} jobs, {args.kills} SIGKILLs per round, then a rerun until done")
    for manager, total in totals.items():
        print(f"# {manager}: " + ", ".join(f"{k}={v}" for k, v in total.items()))
    summary = totals[managers[-1]]
    print(json.dumps(summary))
    ok = summary["duplicates"] == summary["lost_rows"] == summary["missing_results"] == 0
    return 0 if ok and not summary["failed_final_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Resume a big job database: openeo's MultiBackendJobManager and prefect-openeo's, side by side.

The database holds N rows: all but 20 finished in an earlier run (their results downloaded elsewhere,
their backend jobs gone), 20 queued on the backend, ending after about 4 s. Each manager resumes it (a
fresh copy, with 20 fresh jobs) in its own process; the figures are the wall time of ``run_jobs`` (from its
start to the end of the 20 jobs, results downloaded) and the backend requests it sent.

    python benchmarks/resume.py [--rows 10000,100000] [--formats csv,parquet]

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import openeo  # noqa: E402
import pandas as pd  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

ACTIVE = 20
PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}
MANAGERS = ("openeo", "prefect-openeo")

RUNNER = """
import json, sys, time, resource
import openeo
name, path, url, root = sys.argv[1:5]
if name == "openeo":
    from openeo.extra.job_management import MultiBackendJobManager, get_job_db
else:
    from prefect_openeo import MultiBackendJobManager, get_job_db
def start_job(row, connection, **kwargs):
    raise RuntimeError("no row should need a new job")
manager = MultiBackendJobManager(poll_sleep=1, root_dir=root)
manager.add_backend("b0", connection=openeo.connect(url), parallel_jobs=ACTIVE)
started = time.perf_counter()
stats = manager.run_jobs(job_db=get_job_db(path), start_job=start_job)
seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "finished": stats.get("job finished", 0), "rss_mb": rss}))
""".replace("ACTIVE", str(ACTIVE))


def build_db(path: Path, rows: int, url: str) -> None:
    """``rows`` rows: the first ``rows - ACTIVE`` finished long ago, then ACTIVE freshly queued jobs."""
    connection = openeo.connect(url)
    jobs = []
    for i in range(ACTIVE):
        job = connection.create_job(PG, title=f"active {i}", validate=False)
        job.start()
        jobs.append(job.job_id)
    done = rows - ACTIVE
    df = pd.DataFrame(
        {
            "year": 2021,
            "status": ["finished"] * done + ["queued"] * ACTIVE,
            "id": [f"j-gone-{i:08d}" for i in range(done)] + jobs,
            "backend_name": "b0",
            "start_time": "2026-01-01T00:00:00Z",
            "running_start_time": ["2026-01-01T00:01:00Z"] * done + [None] * ACTIVE,
            "cpu": ["12.5 cpu-seconds"] * done + [None] * ACTIVE,
            "memory": ["4096 mb-seconds"] * done + [None] * ACTIVE,
            "duration": ["60 seconds"] * done + [None] * ACTIVE,
            "costs": [1.0] * done + [None] * ACTIVE,
        }
    )
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)


def measure(manager: str, rows: int, fmt: str, sims: SimulatorProcess, base: Path) -> dict:
    sims.reset()
    path = base / f"{manager}-{rows}.{fmt}"
    build_db(path, rows, sims.urls[0])
    before = sims.counts()[0]
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, manager, str(path), sims.urls[0], str(base / f"root-{manager}-{rows}-{fmt}")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{manager} failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = sims.counts()[0]
    requests = sum(after.values()) - sum(before.values())
    return {"manager": manager, "rows": rows, "format": fmt, "requests": requests, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--formats", default="csv,parquet")
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    base = Path(tempfile.mkdtemp(prefix="resume-"))
    results = []
    with SimulatorProcess(1, queue_duration=0.5, run_duration=3.5, capacity=ACTIVE) as sims:
        for rows in sizes:
            for fmt in formats:
                for manager in MANAGERS:
                    started = time.monotonic()
                    result = measure(manager, rows, fmt, sims, base)
                    result["total_seconds"] = round(time.monotonic() - started, 1)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    print()
    print(f"Resume: N rows, all finished earlier but {ACTIVE} queued jobs that end after ~4 s; poll_sleep 1 s")
    print()
    print("| rows | job db | openeo (s) | prefect-openeo (s) | ratio | requests openeo | requests prefect-openeo |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in sizes:
        for fmt in formats:
            by = {r["manager"]: r for r in results if r["rows"] == rows and r["format"] == fmt}
            o, p = by["openeo"], by["prefect-openeo"]
            print(
                f"| {rows:,} | {fmt} | {o['seconds']:.1f} | {p['seconds']:.1f} | {p['seconds'] / o['seconds']:.2f} "
                f"| {o['requests']} | {p['requests']} |"
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

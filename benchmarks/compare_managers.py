"""openeo's MultiBackendJobManager and prefect-openeo's, side by side, on the same simulated backends.

Prints, for each manager in one run:
  * backend requests per job, by route; duplicate jobs created;
  * makespan over the ideal makespan, ceil(jobs / total slots) x (queue + run duration) (with ``--slower``,
    the best static split of the jobs between backends of different speed);
  * slot utilization: busy slot-seconds (a job's creation to its end, on the backend's clock) over the
    available ones (slots x makespan), and the mean time from a job's end to the next job created in
    its slot (the k-th end of a backend pairs with its (slots + k)-th creation);
  * CPU time of the manager process (the simulators run in a child process);
  * one loop's time at 1k/10k/100k rows (20 active jobs) per job database, split into HTTP and
    bookkeeping (everything else), and the peak RSS of that process.

Timings on shared machines are noisy: compare the ratios. Usage:
    python benchmarks/compare_managers.py [--jobs 120] [--slots 30] [--run 5] [--rows 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import openeo  # noqa: E402
import pandas as pd  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

MANAGERS = ("openeo", "prefect-openeo")
PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def manager_class(name: str):
    if name == "openeo":
        from openeo.extra.job_management import MultiBackendJobManager
    else:
        from prefect_openeo import MultiBackendJobManager
    return MultiBackendJobManager


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


def run_workload(name: str, urls: list[str], jobs: int, slots: int, poll: float, workdir: Path) -> dict:
    manager = manager_class(name)(poll_sleep=poll, root_dir=workdir / name)
    for i, url in enumerate(urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=slots)
    df = pd.DataFrame({"tile": range(jobs)})
    cpu, wall = time.process_time(), time.perf_counter()
    manager.run_jobs(df=df, start_job=start_job, job_db=workdir / f"{name}.csv")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = pd.read_csv(workdir / f"{name}.csv")
    downloaded = sum(1 for job_id in result["id"] if (workdir / name / f"job_{job_id}" / "job-results.json").exists())
    return {"wall": wall, "cpu": cpu, "statuses": result["status"].value_counts().to_dict(), "downloaded": downloaded}


def best_static_split(jobs: int, slots: int, durations: list[float]) -> float:
    """The makespan of the best split of ``jobs`` decided up front, each backend running its share in waves
    of ``slots``: jobs go one by one where they end soonest (optimal for jobs of equal size)."""
    counts = [0] * len(durations)
    for _ in range(jobs):
        best = min(range(len(durations)), key=lambda i: math.ceil((counts[i] + 1) / slots) * durations[i])
        counts[best] += 1
    return max(math.ceil(n / slots) * d for n, d in zip(counts, durations, strict=True))


def slot_figures(jobs_per_backend: list[list[dict]], slots: int, wall: float) -> tuple[float, float]:
    """Slot utilization (busy slot-seconds over available ones) and the mean refill delay (s)."""
    busy, gaps = 0.0, []
    for jobs in jobs_per_backend:
        created = sorted(j["created_at"] for j in jobs)
        ends = sorted(j["ended_at"] for j in jobs if j["ended_at"] is not None)
        busy += sum(j["ended_at"] - j["created_at"] for j in jobs if j["ended_at"] is not None)
        gaps += [max(0.0, c - e) for e, c in zip(ends, created[slots:], strict=False)]
    available = slots * len(jobs_per_backend) * wall
    return busy / available if available else 0.0, statistics.mean(gaps) if gaps else 0.0


def workload_section(args) -> None:
    print(
        f"## Workload: {args.jobs} jobs, {args.backends} backends x {args.slots} slots, "
        f"queue {args.queue} s + run {args.run} s{f' (+-{args.jitter:.0%})' if args.jitter else ''}, "
        f"poll_sleep {args.poll} s"
        f"{', job listings with usage' if args.listing_usage else ''}\n"
    )
    factors = [args.slower] + [1.0] * (args.backends - 1)
    ideal = best_static_split(args.jobs, args.slots, [(args.queue + args.run) * f for f in factors])
    if args.slower != 1:
        print(
            f"The first backend (registered first) is {args.slower:g} times slower (queue and run); "
            "ideal: the best static split.\n"
        )
    rows = {}
    config = {"queue_duration": args.queue, "run_duration": args.run, "capacity": args.slots, "jitter": args.jitter}
    with SimulatorProcess(args.backends, listing_usage=args.listing_usage, **config) as sims:
        if args.slower != 1:
            slow = {"queue_duration": args.queue * args.slower, "run_duration": args.run * args.slower}
            sims.set_one(0, **slow)
        for name in MANAGERS:
            sims.reset()
            with tempfile.TemporaryDirectory() as tmp:
                outcome = run_workload(name, sims.urls, args.jobs, args.slots, args.poll, Path(tmp))
            counts = collections.Counter()
            for c in sims.counts():
                counts.update(c)
            outcome["utilization"], outcome["refill"] = slot_figures(sims.jobs(), args.slots, outcome["wall"])
            rows[name] = (outcome, counts, sum(sims.created()))
    routes = sorted(set().union(*(c for _, c, _ in rows.values())), key=lambda r: -rows["openeo"][1].get(r, 0))
    print(f"| requests per job | {' | '.join(MANAGERS)} |")
    print("|---|" + "---:|" * len(MANAGERS))
    for route in routes:
        print(f"| `{route}` | " + " | ".join(f"{rows[m][1].get(route, 0) / args.jobs:.2f}" for m in MANAGERS) + " |")
    totals = {m: sum(rows[m][1].values()) / args.jobs for m in MANAGERS}
    print("| **total** | " + " | ".join(f"**{totals[m]:.2f}**" for m in MANAGERS) + " |")
    print(f"| jobs created (of {args.jobs}) | " + " | ".join(str(rows[m][2]) for m in MANAGERS) + " |")
    print("| results downloaded | " + " | ".join(str(rows[m][0]["downloaded"]) for m in MANAGERS) + " |")
    print(
        f"| makespan / ideal ({ideal:.0f} s) | "
        + " | ".join(f"{rows[m][0]['wall'] / ideal:.2f}" for m in MANAGERS)
        + " |"
    )
    print("| slot utilization | " + " | ".join(f"{rows[m][0]['utilization']:.2f}" for m in MANAGERS) + " |")
    print(
        "| job end to next job in its slot (s) | " + " | ".join(f"{rows[m][0]['refill']:.2f}" for m in MANAGERS) + " |"
    )
    print("| CPU time (s) | " + " | ".join(f"{rows[m][0]['cpu']:.2f}" for m in MANAGERS) + " |")
    print(
        f"\nRequests per job, prefect-openeo / openeo: {totals['prefect-openeo'] / totals['openeo']:.3f} "
        f"(1/{totals['openeo'] / totals['prefect-openeo']:.1f}); "
        f"CPU ratio {rows['prefect-openeo'][0]['cpu'] / max(1e-9, rows['openeo'][0]['cpu']):.2f}\n"
    )


def _prepare_db(fmt: str, n_rows: int, directory: str, job_ids: list[str]) -> None:
    """In its own process (so its memory does not count): an n-row job database, 20 rows running."""
    path = Path(directory) / f"jobs.{fmt}"
    status = ["finished"] * n_rows
    ids = [f"done-{i}" for i in range(n_rows)]
    for i, job_id in enumerate(job_ids):
        status[i], ids[i] = "running", job_id
    df = pd.DataFrame(
        {
            "tile": range(n_rows),
            "status": status,
            "id": ids,
            "backend_name": "b0",
            "start_time": "2026-01-01T00:00:00Z",
            "running_start_time": None,
            "cpu": None,
            "memory": None,
            "duration": None,
            "costs": None,
        }
    )
    df.loc[: len(job_ids) - 1, "running_start_time"] = "2026-01-01T00:00:00Z"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        SqlJobDatabase(path).initialize_from_df(df)


def _loop_measure(name: str, fmt: str, directory: str, urls: list[str], queue) -> None:
    """In a fresh process: one manager loop on a prepared job database with 20 running jobs."""
    import resource

    import requests

    http = {"t": 0.0}
    send = requests.Session.send

    def timed_send(self, *a, **kw):
        t = time.perf_counter()
        try:
            return send(self, *a, **kw)
        finally:
            http["t"] += time.perf_counter() - t

    requests.Session.send = timed_send
    path = Path(directory) / f"jobs.{fmt}"
    manager = manager_class(name)(poll_sleep=0, root_dir=directory)
    manager.add_backend("b0", connection=openeo.connect(urls[0]), parallel_jobs=20)
    if name == "openeo":
        from openeo.extra.job_management import get_job_db
        from openeo.extra.job_management._thread_worker import _JobManagerWorkerThreadPool

        job_db = get_job_db(path)
        manager._worker_pool = _JobManagerWorkerThreadPool()
        loop = lambda: manager._job_update_loop(job_db=job_db, start_job=start_job)  # noqa: E731
    else:
        from prefect_openeo.jobdb import get_job_db

        job_db = get_job_db(path)
        engine = manager._engine(job_db, start_job)
        loop = engine.iteration
    loop()  # warm-up: loads the database, connects, learns the backend's listing
    samples, changed = [], []
    for i in range(10):
        if i % 2:  # every other loop, one row's status changes (the backend says running, the row queued)
            row = job_db.get_by_indices([0]).copy()
            row["status"] = "queued"
            job_db.persist(row)
        http["t"] = 0.0
        t = time.perf_counter()
        loop()
        total = time.perf_counter() - t
        (changed if i % 2 else samples).append((total, total - http["t"]))
    if name == "openeo":
        manager._worker_pool.shutdown()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        (
            statistics.median(s[0] for s in samples),
            statistics.median(s[1] for s in samples),
            statistics.median(s[1] for s in changed),
            peak_mb,
        )
    )


def loop_section(args) -> None:
    sizes = [int(s) for s in args.rows.split(",") if s]
    print("## One loop at scale: 20 running jobs, the rest finished (medians of 5)\n")
    print("Bookkeeping is the loop's time less its HTTP time; 'with a change' is a loop in which one row's")
    print("status changes (so the job database must be written).\n")
    print("| rows | job db | manager | loop (ms) | bookkeeping (ms) | bookkeeping with a change (ms) | peak RSS (MB) |")
    print("|---:|---|---|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    with SimulatorProcess(1, queue_duration=0.0, run_duration=3600, capacity=100) as sims:
        con = openeo.connect(sims.urls[0])
        job_ids = []
        for _ in range(20):
            job = con.create_job(PG, validate=False)
            job.start()
            job_ids.append(job.job_id)
        for n in sizes:
            ratios: dict = {}
            for fmt in ("csv", "parquet", "sqlite"):
                ratios = {} if fmt != "sqlite" else {"openeo": ratios["openeo"]}  # sqlite: vs openeo's parquet
                for name in MANAGERS if fmt != "sqlite" else ["prefect-openeo"]:
                    directory = tempfile.mkdtemp(prefix="bench-loop-")
                    prep = ctx.Process(target=_prepare_db, args=(fmt, n, directory, job_ids))
                    prep.start()
                    prep.join()
                    queue = ctx.Queue()
                    proc = ctx.Process(target=_loop_measure, args=(name, fmt, directory, sims.urls, queue))
                    proc.start()
                    loop_s, book_s, change_s, peak = queue.get(timeout=600)
                    proc.join()
                    ratios[name] = (loop_s, book_s, change_s)
                    print(
                        f"| {n:,} | {fmt} | {name} | {loop_s * 1000:.1f} | {book_s * 1000:.1f} "
                        f"| {change_s * 1000:.1f} | {peak:.0f} |"
                    )
                ours, theirs = ratios["prefect-openeo"], ratios["openeo"]
                label = "ratio" if fmt != "sqlite" else "ratio to openeo+parquet"
                print(
                    f"| | | {label} | " + " | ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs, strict=True)) + " | |"
                )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--slots", type=int, default=30)
    parser.add_argument("--queue", type=float, default=1.0)
    parser.add_argument("--run", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--jitter", type=float, default=0.0, help="relative jitter of durations (0.25: +-25%%)")
    parser.add_argument("--slower", type=float, default=1.0, help="the first backend's queue and run, times this")
    parser.add_argument("--rows", default="1000,10000,100000", help="job database sizes for the loop section")
    parser.add_argument("--skip-workload", action="store_true")
    parser.add_argument(
        "--listing-usage", action="store_true", help="simulated job listings carry usage (the API allows it)"
    )
    args = parser.parse_args()
    if not args.skip_workload:
        workload_section(args)
    if args.rows:
        loop_section(args)


if __name__ == "__main__":
    main()

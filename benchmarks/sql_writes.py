"""Row updates per second on one shared PostgreSQL job database, by write path of ``SqlJobDatabase``.

``--workers`` processes (each with its own ``SqlJobDatabase(url, table, worker_id=...)`` and connection pool)
write to one table of ``--rows`` rows (status ``running``, unowned). Each worker owns a disjoint slice of the
rows and, for ``--seconds``, rewrites them in batches of B rows (B = 1 and B = 20: the sizes a sweep writes),
cycling through its slice, with one of the two write paths:

* ``persist``: openeo's ``JobDatabaseInterface.persist(df)`` with the B rows as a dataframe (every column, a
  new ``message``): one transaction that takes the table-wide advisory lock, reads the B rows, then upserts
  each one. Writers of one table are serialized by that lock, whatever rows they write;
* ``apply``: the engine's path, ``apply(patches)`` with one ``Patch(index, {"message": ...}, expect="running")``
  per row: one transaction of one conditional UPDATE per row (only while the row has the expected status and
  no other live worker holds it), no table lock.

Every case (path x B) gets a fresh table (dropped afterwards), ANALYZEd before the workers start: the
steady state once autovacuum has gathered statistics. ``--no-analyze`` writes to the table as
``initialize_from_df`` leaves it; then the planner has no statistics and may serve ``apply``'s UPDATE (whose
WHERE names ``idx`` and ``status``) from any of the indexes that begin with ``status``, scanning every row of
that status for each row written (``persist`` updates by primary key only). The workers start together
(after a warm-up batch that is not counted) and each counts the rows it wrote (for ``apply``: the patches
that landed; every one must, since nobody else touches the rows). At the end each table is read back to
check that every row holds its worker's last message.

How to read it: ``rows/s`` is the sum over the workers of their rows written per second of wall time;
``batch ms p50/p95`` is the latency of one write call (one transaction) as a worker sees it; ``client CPU
ms/row`` is the workers' own CPU time (SQLAlchemy, pandas, the driver) per row written. ``apply/persist``
is the ratio of the two paths' rows/s at the same B: how much more write throughput the engine's row-level
path gets than openeo's table-locked one on the same database. When rows/s x client CPU ms/row comes
near the machine's free cores, the workers are CPU-bound (on a small machine with the database on it too),
and the ratio shows the paths' CPU cost more than their locking. Run with ``--workers 1`` to see the paths'
cost without contention (the lock then costs a statement, not a wait). The numbers depend on the machine
and on the database's fsync cost (each transaction is one commit): compare ratios, not absolute values. On
a busy machine, use ``--repeat 3`` or more: the cases then alternate their order and the table shows each
case's median run with the range of all runs in brackets.

    python benchmarks/sql_writes.py [--url URL] [--workers 4] [--seconds 10] [--rows 2000] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid

import pandas as pd
import sqlalchemy as sa

from prefect_openeo.jobdb.sql import SqlJobDatabase
from prefect_openeo.transitions import Patch

DEFAULT_URL = os.environ.get("PREFECT_OPENEO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BATCHES = (1, 20)
PATHS = ("persist", "apply")


def job_frame(rows: int) -> pd.DataFrame:
    """Active rows with a few parameter columns, as a sweep finds them."""
    return pd.DataFrame(
        {
            "tile": [f"tile-{i:05d}" for i in range(rows)],
            "year": [2020 + i % 5 for i in range(rows)],
            "status": "running",
            "id": [f"j-{i}" for i in range(rows)],
            "backend_name": "b0",
            "message": "",
        }
    )


def worker(url: str, table: str, i: int, indices: list[int], path: str, batch: int, seconds: float, barrier, out):
    """One worker: warm up, wait for the others, then write batches until its time is up; report counts."""
    try:
        db = SqlJobDatabase(url, table, worker_id=f"w{i}")
        mine = db.get_by_indices(indices)  # persist writes whole rows, as openeo's manager does
        n = 0

        def write(rows: list[int], tag: str) -> int:
            if path == "persist":
                df = mine.loc[rows].copy()
                df["message"] = tag
                db.persist(df)
                return len(rows)
            return len(db.apply([Patch(r, {"message": tag}, expect="running") for r in rows]))

        cursor = 0

        def next_rows() -> list[int]:
            nonlocal cursor
            rows = [indices[(cursor + k) % len(indices)] for k in range(batch)]
            cursor = (cursor + batch) % len(indices)
            return rows

        write(next_rows(), "warm-up")
        barrier.wait(timeout=120)
        written, calls, refused, latencies = 0, 0, 0, []
        last: dict[int, str] = {}
        start, cpu = time.perf_counter(), time.process_time()
        deadline = start + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            rows = next_rows()
            tag = f"w{i} update {n}"
            landed = write(rows, tag)
            latencies.append(time.perf_counter() - t0)
            written += landed
            refused += len(rows) - landed
            calls += 1
            n += 1
            last.update(dict.fromkeys(rows, tag))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        db.engine.dispose()
        out.put({"worker": i, "rows": written, "calls": calls, "refused": refused, "elapsed": elapsed, "cpu": cpu,
                 "latencies": latencies, "last": last})  # fmt: skip
    except BaseException as e:  # report it: the parent would otherwise wait for a result forever
        barrier.abort()
        out.put({"worker": i, "error": f"{type(e).__name__}: {e}"})
        raise


def run_case(args, path: str, batch: int) -> dict:
    """One path at one batch size on a fresh table, with all workers at once."""
    table = f"bench_writes_{uuid.uuid4().hex[:10]}"
    db = SqlJobDatabase(args.url, table)
    db.initialize_from_df(job_frame(args.rows))
    if not args.no_analyze:  # the planner's statistics, as autovacuum would soon gather them
        with db.engine.begin() as conn:
            conn.execute(sa.text(f'ANALYZE "{table}"'))
    ctx = mp.get_context("spawn")  # no connection pools inherited through fork
    barrier, out = ctx.Barrier(args.workers), ctx.Queue()
    slices = [list(range(args.rows))[i :: args.workers] for i in range(args.workers)]
    procs = [
        ctx.Process(target=worker, args=(args.url, table, i, slices[i], path, batch, args.seconds, barrier, out))
        for i in range(args.workers)
    ]
    try:
        for proc in procs:
            proc.start()
        results = [out.get(timeout=args.seconds + 300) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"{path} B={batch}: worker failed: {errors[0]}")
        stored = db.read()["message"]
        expected = {index: tag for r in results for index, tag in r["last"].items()}
        wrong = sum(stored.get(index) != tag for index, tag in expected.items())
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        db.drop()
        db.engine.dispose()
    latencies = sorted(x for r in results for x in r["latencies"])
    return {
        "path": path,
        "batch": batch,
        "workers": args.workers,
        "rows": sum(r["rows"] for r in results),
        "calls": sum(r["calls"] for r in results),
        "refused": sum(r["refused"] for r in results),
        "wrong_after": wrong,
        "rows_per_s": sum(r["rows"] / r["elapsed"] for r in results),
        "per_worker_rows_per_s": [round(r["rows"] / r["elapsed"], 1) for r in results],
        "client_cpu_ms_per_row": 1000 * sum(r["cpu"] for r in results) / max(1, sum(r["rows"] for r in results)),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def median_case(runs: list[dict]) -> dict:
    """The run with the median rows/s (the lower middle one of an even number), with the range of all runs."""
    ordered = sorted(runs, key=lambda r: r["rows_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "min_rows_per_s": ordered[0]["rows_per_s"],
            "max_rows_per_s": ordered[-1]["rows_per_s"], "runs": len(runs)}  # fmt: skip


def rate(case: dict) -> str:
    if case["runs"] == 1:
        return f"{case['rows_per_s']:.0f}"
    return f"{case['rows_per_s']:.0f} ({case['min_rows_per_s']:.0f}-{case['max_rows_per_s']:.0f})"


def table(cases: list[dict]) -> str:
    by = {(c["path"], c["batch"]): c for c in cases}
    lines = [
        "| B | persist rows/s | apply rows/s | apply/persist | persist batch ms p50/p95 | apply batch ms p50/p95 "
        "| client CPU ms/row persist / apply |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in sorted({c["batch"] for c in cases}):
        p, a = by[("persist", batch)], by[("apply", batch)]
        ratio = a["rows_per_s"] / p["rows_per_s"] if p["rows_per_s"] else float("inf")
        lines.append(
            f"| {batch} | {rate(p)} | {rate(a)} | {ratio:.1f}x "
            f"| {p['p50_ms']:.1f} / {p['p95_ms']:.1f} | {a['p50_ms']:.1f} / {a['p95_ms']:.1f} "
            f"| {p['client_cpu_ms_per_row']:.2f} / {a['client_cpu_ms_per_row']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="SQLAlchemy URL of a PostgreSQL database")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="writing time per case")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of every case (the median is shown)")
    parser.add_argument("--no-analyze", action="store_true", help="write to tables without planner statistics")
    parser.add_argument("--json", action="store_true", help="also print the cases as one JSON line")
    args = parser.parse_args()
    if args.rows < args.workers * max(BATCHES):
        parser.error(f"--rows must be at least {args.workers * max(BATCHES)} (workers x largest batch)")
    probe = SqlJobDatabase(args.url, "unused")
    if probe.engine.dialect.name != "postgresql":
        parser.error("--url must be a PostgreSQL database (the advisory lock is what is measured)")
    probe.engine.dispose()
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeat):
        for batch in BATCHES:
            for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:  # alternated: a drift in load hits both
                case = run_case(args, path, batch)
                runs.setdefault((path, batch), []).append(case)
                print(
                    f"# {path:7s} B={batch:2d}: {case['rows']} rows in {case['calls']} calls, "
                    f"{case['rows_per_s']:.0f} rows/s (per worker {case['per_worker_rows_per_s']}), "
                    f"refused {case['refused']}, wrong after {case['wrong_after']}",
                    file=sys.stderr,
                    flush=True,
                )
    cases = [median_case(r) for r in runs.values()]
    stats = "no planner statistics" if args.no_analyze else "ANALYZEd"
    print(
        f"{args.workers} workers, {args.seconds:g} s per case x {args.repeat}, {args.rows} rows ({stats}), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print(table(cases))
    if args.json:
        print(json.dumps(cases))
    ok = all(c["refused"] == 0 and c["wrong_after"] == 0 for r in runs.values() for c in r)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

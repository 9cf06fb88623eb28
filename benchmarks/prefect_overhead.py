"""Prefect's overhead: the same workload with the drop-in manager outside Prefect and as a flow run on a
real ``prefect server`` (SQLite), on the same simulated backends.

Prints wall time of both, task runs per job by kind, and whether the API kept up (flow Completed, every
task run in a final state, per-job task-run states matching the job database).

    python benchmarks/prefect_overhead.py [--jobs 1000] [--slots 50] [--run 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pandas as pd  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=50)
    parser.add_argument("--run", type=float, default=2.0)
    parser.add_argument("--poll", type=float, default=1.0)
    args = parser.parse_args()
    from prefect_openeo.testing import local_prefect_server

    home = tempfile.mkdtemp(prefix="prefect-home-")
    with local_prefect_server(home) as (api_url, _):
        os.environ.update(PREFECT_HOME=home, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        measure(args)


def measure(args) -> None:
    import openeo

    from prefect_openeo import MultiBackendJobManager
    from prefect_openeo.flows import run_openeo_jobs

    df = pd.DataFrame({"tile": range(args.jobs)})
    with SimulatorProcess(2, queue_duration=0.5, run_duration=args.run, capacity=args.slots) as sims:
        with tempfile.TemporaryDirectory() as tmp:
            manager = MultiBackendJobManager(poll_sleep=args.poll, root_dir=f"{tmp}/local")
            for i, url in enumerate(sims.urls):
                manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=args.slots)
            t = time.perf_counter()
            manager.run_jobs(df=df, start_job=start_job, job_db=f"{tmp}/local.parquet")
            local_s = time.perf_counter() - t
            sims.reset()

            t = time.perf_counter()
            state = run_openeo_jobs(
                job_db=f"{tmp}/flow.parquet",
                backends={f"b{i}": url for i, url in enumerate(sims.urls)},
                start_job=start_job,
                parallel_jobs=args.slots,
                poll_sleep=args.poll,
                root_dir=f"{tmp}/flow",
                df=df,
                return_state=True,
            )
            flow_s = time.perf_counter() - t
            rows = pd.read_parquet(f"{tmp}/flow.parquet")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs, offset = [], 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200, offset=offset
            )
            task_runs += page
            offset += len(page)
            if len(page) < 200:
                break
    kinds = collections.Counter(t.name.split(" ")[0] for t in task_runs)
    final = sum(1 for t in task_runs if t.state and t.state.is_final())
    mirrors = {t.name.split(" ")[1]: t.state.name for t in task_runs if t.name.startswith("row ")}
    matching = sum(1 for i, s in rows["status"].items() if mirrors.get(str(i)) == {"finished": "Finished"}.get(s))
    print(f"## Prefect overhead: {args.jobs} jobs, 2 backends x {args.slots} slots, run {args.run} s\n")
    print("| | wall time (s) |")
    print("|---|---:|")
    print(f"| drop-in manager, no Prefect | {local_s:.1f} |")
    print(f"| `run_openeo_jobs` flow on `prefect server` (SQLite) | {flow_s:.1f} |")
    print(f"| ratio | {flow_s / local_s:.2f} |\n")
    print(f"Flow run state: {state.name}; rows finished: {(rows['status'] == 'finished').sum()} of {len(rows)}")
    print(f"Task runs: {len(task_runs)} ({len(task_runs) / args.jobs:.2f} per job), {final} in a final state")
    print("By kind: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    print(f"Per-job task runs whose state matches the row: {matching} of {args.jobs}")


if __name__ == "__main__":
    main()

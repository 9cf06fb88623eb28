"""Campaigns of thousands of jobs: in-process, and as the ``run_openeo_jobs`` flow on a ``prefect server`` on
PostgreSQL; openeo 0.53's manager in-process beside them for reference.

The simulated backends (a child process): 2 backends x 100 slots, jobs of 1 s queue + 2 s run (+-30%), 2%
failing; ``poll_sleep`` 1 s; the job database a PostgreSQL database of its own per run (openeo's manager:
Parquet, it has no SQL database). Ideal: ceil(jobs / 200) x 3 s. Each run is a process of its own, so its
CPU time and peak RSS are its own. Printed per run: wall and wall / ideal, CPU per job, peak RSS, the Prefect
server's CPU, the time from the last job's end (on the backend) to the flow run's final state, the per-job
task runs final and matching their rows (and in how many flow runs: ``task_runs_per_run``), the Prefect
database's growth.

    python benchmarks/campaign.py [--jobs 2000,10000] [--openeo 2000,10000] [--kinds in-process,flow]

Timings on a shared 2-core machine are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from simproc import SimulatorProcess  # noqa: E402

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}
SLOTS, POLL = 100, 1.0
SIMULATOR = {"queue_duration": 1.0, "run_duration": 2.0, "jitter": 0.3, "failure_rate": 0.02, "capacity": SLOTS}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


def admin():
    import sqlalchemy as sa

    return sa.create_engine(f"{POSTGRES}/test", isolation_level="AUTOCOMMIT")


def new_database(prefix: str) -> str:
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin().connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return name


def drop_database(name: str) -> None:
    import sqlalchemy as sa

    with admin().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def database_size(name: str) -> int:
    import sqlalchemy as sa

    with admin().connect() as conn:
        return int(conn.execute(sa.text(f"SELECT pg_database_size('{name}')")).scalar())


def one_run(kind: str, jobs: int, urls: list[str], workdir: str, job_db: str, api_url: str | None, queue) -> None:
    """A run of ``kind`` in this (child) process; puts its figures on ``queue``."""
    import openeo
    import pandas as pd

    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    df = pd.DataFrame({"tile": range(jobs)})
    flow_run_id = None
    if kind == "flow":
        from prefect_openeo.flows import run_openeo_jobs

        cpu, wall = time.process_time(), time.perf_counter()
        state = run_openeo_jobs(
            job_db=job_db,
            backends={f"b{i}": url for i, url in enumerate(urls)},
            start_job=start_job,
            parallel_jobs=SLOTS,
            poll_sleep=POLL,
            root_dir=f"{workdir}/results",
            df=df,
            return_state=True,
        )
        flow_run_id = state.state_details.flow_run_id
    else:
        if kind == "openeo":
            from openeo.extra.job_management import MultiBackendJobManager, create_job_db
        else:
            from prefect_openeo import MultiBackendJobManager, create_job_db
        manager = MultiBackendJobManager(poll_sleep=POLL, root_dir=f"{workdir}/results")
        for i, url in enumerate(urls):
            manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=SLOTS)
        db = create_job_db(job_db, df)
        cpu, wall = time.process_time(), time.perf_counter()
        manager.run_jobs(job_db=db, start_job=start_job)
    wall, cpu, ended = time.perf_counter() - wall, time.process_time() - cpu, time.time()
    from prefect_openeo import get_job_db

    rows = pd.read_parquet(job_db) if kind == "openeo" else get_job_db(job_db).read()
    queue.put(
        {
            "wall": wall,
            "cpu": cpu,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ended": ended,
            "statuses": rows["status"].value_counts().to_dict(),
            "rows": {str(i): s for i, s in rows["status"].items()},
            "flow_run_id": str(flow_run_id) if flow_run_id else None,
        }
    )


def task_run_figures(api_url: str, flow_run_id: str, rows: dict[str, str]) -> dict:
    """Per-job task runs final and matching their rows (across the run and its chunks), and the flow runs."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    from prefect_openeo.observe import prefect_state

    main = uuid.UUID(flow_run_id)
    began = time.monotonic()
    with SyncPrefectClient(api_url) as client:
        run = client.read_flow_run(main)
        family = [main]
        frontier = [main]
        while frontier:  # the run's subflows (tile-and-run's child, and the chunks of jobs under it)
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [c.id for c in children]
            family += frontier
        while True:
            jobs, offset = {}, 0
            while True:
                page = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=family)),
                    task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["openeo-job"])),
                    limit=200,
                    offset=offset,
                )
                jobs.update({t.name.split(" ")[1]: t for t in page})
                offset += len(page)
                if len(page) < 200:
                    break
            final = sum(1 for t in jobs.values() if t.state and t.state.is_final())
            if final >= len(rows) or time.monotonic() - began > 300:
                break
            time.sleep(2)
        graph_nodes = len(client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": main}).json()["nodes"])
    matching = sum(1 for i, s in rows.items() if i in jobs and jobs[i].state.name == prefect_state(s).name)
    return {
        "final": final,
        "matching": matching,
        "flow_runs": len(family),
        "graph_nodes": graph_nodes,
        "run_end": run.end_time.timestamp() if run.end_time else float("nan"),
        "state": f"{run.state.name}: {run.state.message}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="2000,10000")
    parser.add_argument("--openeo", default="2000,10000", help="sizes to run openeo's manager at ('' for none)")
    parser.add_argument("--kinds", default="in-process,flow", help="of ours: in-process, flow (comma-separated)")
    args = parser.parse_args()
    import psutil

    from prefect_openeo.prefect_server import TemporaryPrefectServer

    ctx = mp.get_context("spawn")
    prefect_db = new_database("prefect_campaign")
    server = TemporaryPrefectServer(
        {
            **os.environ,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
        }
    ).start()
    api_url = server.wait_ready()
    server_process = psutil.Process(server.process.pid)

    def server_cpu() -> float:
        processes = [server_process, *server_process.children(recursive=True)]
        return sum(p.cpu_times().user + p.cpu_times().system for p in processes if p.is_running())

    print(f"## {SLOTS} slots x 2 backends, 1 s + 2 s (+-30%), 2% failing, poll_sleep {POLL:g} s\n")
    print(
        "| jobs | run | wall (s) | / ideal | CPU ms per job | peak RSS (MB) | server CPU (s) "
        "| last job -> final (s) | task runs final / matching | flow runs | graph nodes | Prefect DB growth (MB) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    openeo_sizes = {int(v) for v in args.openeo.split(",") if v}
    try:
        with SimulatorProcess(2, **SIMULATOR) as sims:
            for jobs in (int(v) for v in args.jobs.split(",")):
                ideal = math.ceil(jobs / (2 * SLOTS)) * (SIMULATOR["queue_duration"] + SIMULATOR["run_duration"])
                kinds = args.kinds.split(",") + (["openeo"] if jobs in openeo_sizes else [])
                for kind in kinds:
                    sims.reset()
                    with tempfile.TemporaryDirectory() as workdir:
                        database = None if kind == "openeo" else new_database("campaign_jobs")
                        job_db = f"{workdir}/jobs.parquet" if database is None else f"{POSTGRES}/{database}"
                        size, cpu = database_size(prefect_db), server_cpu()
                        queue = ctx.Queue()
                        child = ctx.Process(
                            target=one_run,
                            args=(kind, jobs, sims.urls, workdir, job_db, api_url if kind == "flow" else None, queue),
                        )
                        child.start()
                        out = queue.get()
                        child.join()
                        ends = [j["ended_wall"] for backend in sims.jobs() for j in backend if j["ended_wall"]]
                        last_end = max(ends) if ends else float("nan")
                        if kind == "flow":
                            figures = task_run_figures(api_url, out["flow_run_id"], out["rows"])
                            lag = f"{figures['run_end'] - last_end:.1f}"
                            tasks = f"{figures['final']:,} / {figures['matching']:,} of {jobs:,}"
                            runs, nodes = str(figures["flow_runs"]), str(figures["graph_nodes"])
                            grown = f"{(database_size(prefect_db) - size) / 2**20:.0f}"
                            spent = f"{server_cpu() - cpu:.0f}"
                            state = figures["state"]
                        else:
                            lag = f"{out['ended'] - last_end:.1f}"
                            tasks = runs = nodes = grown = spent = "-"
                            state = None
                        if database:
                            drop_database(database)
                    print(
                        f"| {jobs:,} | {kind} | {out['wall']:.1f} | {out['wall'] / ideal:.2f} "
                        f"| {out['cpu'] / jobs * 1000:.1f} | {out['rss']:.0f} | {spent} | {lag} | {tasks} "
                        f"| {runs} | {nodes} | {grown} |",
                        flush=True,
                    )
                    if state:
                        print(f"<!-- {kind} {jobs}: {state} ; statuses {out['statuses']} -->", flush=True)
    finally:
        server.stop()
        drop_database(prefect_db)


if __name__ == "__main__":
    main()

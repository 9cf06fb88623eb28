"""Prefect's overhead: the same workload in-process (no Prefect) and inside a flow run on a real
``prefect server`` (SQLite), on the same simulated backends (a child process, so the manager's CPU time is
measured alone). The server is started once, before anything is timed.

(a) ``run_jobs`` of the drop-in manager, in-process and inside a user's ``@flow``: makespan from the first
    ``POST /jobs`` to ``run_jobs`` returning (its final reporting to Prefect included; the flow run's own end
    shown beside it), sweeps and their median period, the lag from a job's end (on the backend) to its
    results request, and the manager process's CPU time (the whole flow call). Targets: flow makespan
    <= 1.08x and CPU <= 2x in-process.
(b) Many jobs: the drop-in in-process, its ``run_jobs`` inside a user's flow, and the ``run_openeo_jobs``
    flow (its defaults: each job also takes a slot of a global concurrency limit), wall time of the calls.
    Target: ``run_jobs`` in a flow <= 1.15x in-process; every per-job task run in its final state, matching
    its row.
Each part starts with a tiny run of both kinds, so that first imports are not measured.

    python benchmarks/prefect_overhead.py [--part a|b|ab] [--jobs 120] [--many 1000] [--repeat 3]

Timings on a shared 2-core machine are noisy: compare the ratios, and give (b) several rounds.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
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


class Probe:
    """Times of the sweeps and of the results requests of one run (benchmark instrumentation only)."""

    def __init__(self):
        self.sweeps: list[float] = []
        self.results: dict[str, float] = {}
        #: When ``run_jobs`` returned (its final reporting done).
        self.ended = float("nan")

    def install(self, manager) -> None:
        from prefect_openeo.engine import JobEngine

        original = JobEngine.iteration
        probe = self

        def iteration(engine) -> None:
            probe.sweeps.append(time.monotonic())
            original(engine)

        JobEngine.iteration = iteration
        self._restore = lambda: setattr(JobEngine, "iteration", original)
        job_done = manager._job_done

        def timed_job_done(job, row, details):
            probe.results.setdefault(job.job_id, time.monotonic())
            return job_done(job, row, details)

        manager._job_done = timed_job_done  # read by the manager's run settings

    def uninstall(self) -> None:
        self.ended = time.monotonic()
        self._restore()


def drop_in(urls: list[str], slots: int, poll: float, root: Path):
    import openeo

    from prefect_openeo import MultiBackendJobManager

    manager = MultiBackendJobManager(poll_sleep=poll, root_dir=root)
    for i, url in enumerate(urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=slots)
    return manager


def warm_up(sims: SimulatorProcess, workdir: Path) -> None:
    """A tiny run of each kind first, so that what is measured is not the first import of anything."""
    from prefect import flow

    df = pd.DataFrame({"tile": range(2)})
    drop_in(sims.urls, 2, 0.1, workdir / "warm-local").run_jobs(df=df, start_job=start_job, job_db=workdir / "w1.csv")

    @flow(name="warm-up")
    def warm() -> None:
        manager = drop_in(sims.urls, 2, 0.1, workdir / "warm-flow")
        manager.run_jobs(df=df, start_job=start_job, job_db=workdir / "w2.csv")

    warm()


def measure_run(run, sims: SimulatorProcess) -> dict:
    """Run ``run()`` (which returns the probe used); the figures of that run from both sides."""
    cpu, wall = time.process_time(), time.perf_counter()
    probe = run()
    end, wall, cpu = time.monotonic(), time.perf_counter() - wall, time.process_time() - cpu
    jobs = [job for jobs in sims.jobs() for job in jobs]
    first_post = min(job["created_at"] for job in jobs)
    lags = [probe.results[j["id"]] - j["ended_at"] for j in jobs if j["id"] in probe.results and j["ended_at"]]
    periods = [b - a for a, b in zip(probe.sweeps, probe.sweeps[1:], strict=False)]
    return {
        "makespan": probe.ended - first_post,
        "returned": end - first_post,
        "wall": wall,
        "cpu": cpu,
        "sweeps": len(probe.sweeps),
        "period": statistics.median(periods) if periods else float("nan"),
        "lag": statistics.median(lags) if lags else float("nan"),
        "lag_max": max(lags) if lags else float("nan"),
        "statuses": collections.Counter(job["status"] for job in jobs),
    }


def part_a(args, workdir: Path) -> dict:
    from prefect import flow

    config = {"queue_duration": args.queue, "run_duration": args.run, "capacity": args.slots}
    df = pd.DataFrame({"tile": range(args.jobs)})
    results = {}
    with SimulatorProcess(2, **config) as sims:

        def in_process() -> Probe:
            manager = drop_in(sims.urls, args.slots, args.poll, workdir / "a-local")
            probe = Probe()
            probe.install(manager)
            try:
                manager.run_jobs(df=df, start_job=start_job, job_db=workdir / "a-local.csv")
            finally:
                probe.uninstall()
            return probe

        @flow(name="user-flow")
        def user_flow() -> Probe:
            manager = drop_in(sims.urls, args.slots, args.poll, workdir / "a-flow")
            probe = Probe()
            probe.install(manager)
            try:
                manager.run_jobs(df=df, start_job=start_job, job_db=workdir / "a-flow.csv")
            finally:
                probe.uninstall()
            return probe

        warm_up(sims, workdir)
        sims.reset()
        results["in-process"] = measure_run(in_process, sims)
        sims.reset()
        results["in a flow run"] = measure_run(user_flow, sims)
    base, flow_ = results["in-process"], results["in a flow run"]
    print(
        f"## (a) {args.jobs} jobs, 2 backends x {args.slots} slots, queue {args.queue:g} s + run {args.run:g} s, "
        f"poll_sleep {args.poll:g} s, CSV job database\n"
    )
    print("| | in-process | in a flow run | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| makespan: first POST /jobs to run_jobs returning (s) | {base['makespan']:.1f} | "
        f"{flow_['makespan']:.1f} | {flow_['makespan'] / base['makespan']:.3f} |"
    )
    print(f"| ... to the flow run's end (s) | | {flow_['returned']:.1f} | {flow_['returned'] / base['makespan']:.3f} |")
    print(f"| sweeps | {base['sweeps']} | {flow_['sweeps']} | |")
    print(f"| median sweep period (s) | {base['period']:.2f} | {flow_['period']:.2f} | |")
    print(
        f"| job end to results request, median / max (s) | {base['lag']:.2f} / {base['lag_max']:.2f} | "
        f"{flow_['lag']:.2f} / {flow_['lag_max']:.2f} | |"
    )
    print(f"| manager CPU (s) | {base['cpu']:.1f} | {flow_['cpu']:.1f} | {flow_['cpu'] / base['cpu']:.2f} |")
    makespan_ok = flow_["makespan"] <= 1.08 * base["makespan"]
    cpu_ok = flow_["cpu"] <= 2 * base["cpu"]
    print(
        f"\nTargets: makespan <= 1.08x: {'met' if makespan_ok else 'NOT met'}; CPU <= 2x: "
        f"{'met' if cpu_ok else 'NOT met'}\n"
    )
    return results


def flow_task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs, offset = [], 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200, offset=offset
            )
            task_runs += page
            offset += len(page)
            if len(page) < 200:
                return task_runs


def per_job_figures(flow_run_id, rows: pd.DataFrame) -> tuple[collections.Counter, int, int]:
    """Task runs by kind, per-job task runs in a final state, and those matching their row's status. The
    server's task-run recorder writes them from the run's events, possibly after the run ended: waits until
    every row's is final (up to 120 s) and prints how long that took."""
    from prefect_openeo.observe import prefect_state

    began = time.perf_counter()
    while True:
        task_runs = flow_task_runs(flow_run_id)
        jobs = {t.name.split(" ")[1]: t for t in task_runs if "openeo-job" in (t.tags or [])}
        final = sum(1 for t in jobs.values() if t.state and t.state.is_final())
        if final >= len(rows) or time.perf_counter() - began > 120:
            break
        time.sleep(0.5)
    print(f"(per-job task runs of {flow_run_id}: {final} final, {time.perf_counter() - began:.1f} s after the call)")
    matching = sum(
        1
        for index, row in rows.iterrows()
        if str(index) in jobs and jobs[str(index)].state.name == prefect_state(row["status"]).name
    )
    kinds = collections.Counter(
        "per-job" if "openeo-job" in (t.tags or []) else t.name.split(" ")[0] for t in task_runs
    )
    return kinds, final, matching


def part_b(args, workdir: Path) -> dict:
    from prefect import flow
    from prefect.context import get_run_context

    from prefect_openeo.flows import run_openeo_jobs

    df = pd.DataFrame({"tile": range(args.many)})
    config = {"queue_duration": args.many_queue, "run_duration": args.many_run, "capacity": args.many_slots}
    #: Per kind, one entry per round: wall and CPU time, the flow run's id and final state, its job database.
    runs: dict[str, list[dict]] = collections.defaultdict(list)

    def timed(name: str, db: str, run) -> None:
        """Time ``run(db)``: its job database is ``<db>.parquet`` and its results go to ``<db>/``."""
        cpu, t = time.process_time(), time.perf_counter()
        flow_run_id, state = run(db)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        runs[name].append({"wall": wall, "cpu": cpu, "id": flow_run_id, "state": state, "db": db})

    @flow(name="user-flow")
    def user_flow(name: str) -> tuple:
        drop_in(sims.urls, args.many_slots, args.many_poll, workdir / name).run_jobs(
            df=df, start_job=start_job, job_db=workdir / f"{name}.parquet"
        )
        return get_run_context().flow_run.id, None

    def in_process(name: str) -> tuple:
        manager = drop_in(sims.urls, args.many_slots, args.many_poll, workdir / name)
        manager.run_jobs(df=df, start_job=start_job, job_db=workdir / f"{name}.parquet")
        return None, None

    def package_flow(name: str, limits: bool) -> tuple:
        state = run_openeo_jobs(
            job_db=str(workdir / f"{name}.parquet"),
            backends={f"b{i}": url for i, url in enumerate(sims.urls)},
            start_job=start_job,
            parallel_jobs=args.many_slots,
            poll_sleep=args.many_poll,
            root_dir=str(workdir / name),
            df=df,
            global_concurrency=limits,
            return_state=True,
        )
        return state.state_details.flow_run_id, state

    kinds = [
        ("drop-in manager, no Prefect", "b-local", in_process),
        ("drop-in `run_jobs` in a user's flow", "b-user", user_flow),
        ("`run_openeo_jobs`", "b-flow-nolimits", lambda name: package_flow(name, limits=False)),
        ("`run_openeo_jobs(global_concurrency=True)`", "b-flow", lambda name: package_flow(name, limits=True)),
    ]
    with SimulatorProcess(2, **config) as sims:
        warm_up(sims, workdir)
        for round_ in range(args.repeat):
            # Each round in another order, so that no kind always runs first (or after the slowest).
            for name, db, run in kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]:
                sims.reset()
                timed(name, db + f"-{round_}", run)
    print(
        f"## (b) {args.many} jobs, 2 backends x {args.many_slots} slots, queue {args.many_queue:g} s + run "
        f"{args.many_run:g} s, poll_sleep {args.many_poll:g} s, Parquet job database, `prefect server` (SQLite)"
        f"{f'; {args.repeat} rounds in rotated order, medians (range)' if args.repeat > 1 else ''}\n"
    )
    base = runs["drop-in manager, no Prefect"]
    print("| | wall time (s) | ratio | CPU (s) | per-job task runs final / matching their row | other task runs |")
    print("|---|---:|---:|---:|---:|---|")
    checks = {}
    for name, rounds in runs.items():
        ratios = [r["wall"] / b["wall"] for r, b in zip(rounds, base, strict=True)]
        ratio = f"{statistics.median(ratios):.3f}"
        if len(ratios) > 1:
            ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        figures = " | "
        if rounds[0]["id"] is not None:
            counted = []
            for r in rounds:
                rows = pd.read_parquet(workdir / f"{r['db']}.parquet")
                task_kinds, final, matching = per_job_figures(r["id"], rows)
                counted.append((final, matching, len(rows), task_kinds))
            checks[name] = (ratios, counted)
            final, matching, total = (min(c[i] for c in counted) for i in range(3))
            other = ", ".join(f"{k} {v}" for k, v in counted[-1][3].items() if k != "per-job") or "none"
            figures = f"{final} / {matching} of {total} | {other}"
        wall = statistics.median(r["wall"] for r in rounds)
        cpu = statistics.median(r["cpu"] for r in rounds)
        print(f"| {name} | {wall:.1f} | {ratio} | {cpu:.1f} | {figures} |")
    for r in runs["`run_openeo_jobs`"]:
        print(f"\n`run_openeo_jobs` flow run: {r['state'].name} ({r['state'].message})")
    ratios, counted = checks["drop-in `run_jobs` in a user's flow"]
    ok = statistics.median(ratios) <= 1.15 and all(c[0] == c[1] == c[2] for c in counted)
    print(
        f"Target (run_jobs in a flow): wall time <= 1.15x (median) and every per-job task run final and matching: "
        f"{'met' if ok else 'NOT met'}\n"
    )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="ab", help="a, b or ab")
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--slots", type=int, default=30)
    parser.add_argument("--queue", type=float, default=1.0)
    parser.add_argument("--run", type=float, default=19.0)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--many", type=int, default=1000)
    parser.add_argument("--many-slots", type=int, default=50)
    parser.add_argument("--many-queue", type=float, default=1.0)
    parser.add_argument("--many-run", type=float, default=4.0)
    parser.add_argument("--many-poll", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (b), each in another order")
    args = parser.parse_args()
    from prefect_openeo.testing import local_prefect_server

    home = tempfile.mkdtemp(prefix="prefect-home-")
    with local_prefect_server(home) as (api_url, _):
        os.environ.update(PREFECT_HOME=home, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        with tempfile.TemporaryDirectory() as tmp:
            if "a" in args.part:
                part_a(args, Path(tmp))
            if "b" in args.part:
                part_b(args, Path(tmp))


if __name__ == "__main__":
    main()

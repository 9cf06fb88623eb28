"""The ``prefect-openeo`` command."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prefect_openeo.states import TERMINAL

app = typer.Typer(help="Run thousands of openEO batch jobs with Prefect.", no_args_is_help=True)
console = Console()


def _progress_watcher(path: Path, total: int, stop: threading.Event) -> threading.Thread:
    """Show a progress bar fed by the job database file (written atomically, so always whole)."""

    def watch() -> None:
        from prefect_openeo.jobdb import get_job_db

        with Progress(
            TextColumn("[bold]openEO jobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task("", total=total)
            while True:
                try:
                    counts = get_job_db(path).count_by_status()
                except Exception:
                    counts = {}
                done = sum(v for k, v in counts.items() if k in TERMINAL)
                progress.update(bar, completed=done, description=_histogram(counts))
                if stop.wait(0.5):
                    counts = get_job_db(path).count_by_status()
                    done = sum(v for k, v in counts.items() if k in TERMINAL)
                    progress.update(bar, completed=done, description=_histogram(counts))
                    break

    thread = threading.Thread(target=watch, name="progress", daemon=True)
    thread.start()
    return thread


def _histogram(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


@app.command()
def demo(
    tiles: int = typer.Option(20, min=1, max=500, help="Number of tiles (jobs)."),
    output: Path = typer.Option(Path("demo-output"), help="Folder for the job database and results."),
    local: bool = typer.Option(False, "--local", help="Run the drop-in manager outside Prefect (no flow run)."),
    failure_rate: float = typer.Option(0.1, min=0.0, max=1.0, help="Fraction of simulated jobs that fail."),
) -> None:
    """Run ~20 NDVI jobs on two simulated openEO backends: no account, no network."""
    from prefect_openeo.demo import create_ndvi_job, demo_tiles
    from prefect_openeo.jobdb import create_job_db
    from prefect_openeo.simulator import SimulatorConfig, simulated_backends

    output.mkdir(parents=True, exist_ok=True)
    db_path = output / "jobs.parquet"
    if db_path.exists():
        console.print(f"Resuming the job database at [bold]{db_path}[/] (delete the folder to start over)")
    else:
        create_job_db(db_path, demo_tiles(tiles))
    config = SimulatorConfig(queue_duration=1.0, run_duration=3.0, jitter=0.3, capacity=3, failure_rate=failure_rate)
    started = time.monotonic()
    with simulated_backends(2, config) as (sim_a, sim_b):
        console.print(f"Simulated backends: sim-a at {sim_a.url}, sim-b at {sim_b.url}")
        stop = threading.Event()
        watcher = _progress_watcher(db_path, tiles, stop)
        backends = {"sim-a": sim_a.url, "sim-b": sim_b.url}
        try:
            if local:
                stats = _run_local(db_path, backends, create_ndvi_job, output)
            else:
                os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
                from prefect_openeo.flows import run_openeo_jobs

                stats = run_openeo_jobs(
                    job_db=str(db_path),
                    backends=backends,
                    start_job=create_ndvi_job,
                    parallel_jobs=3,
                    poll_sleep=1,
                    root_dir=str(output / "results"),
                )
        finally:
            stop.set()
            watcher.join(5)
        requests = sim_a.total_requests() + sim_b.total_requests()
    _print_summary(db_path, output, stats, requests, time.monotonic() - started)


def _run_local(db_path: Path, backends: dict, start_job, output: Path) -> dict:
    import openeo

    from prefect_openeo import MultiBackendJobManager

    manager = MultiBackendJobManager(poll_sleep=1, root_dir=output / "results")
    for name, url in backends.items():
        manager.add_backend(name, connection=openeo.connect(url), parallel_jobs=3)
    return manager.run_jobs(job_db=db_path, start_job=start_job)


def _print_summary(db_path: Path, output: Path, stats: dict, requests: int, seconds: float) -> None:
    from prefect_openeo.jobdb import get_job_db

    df = get_job_db(db_path).read()
    table = Table(title="openEO jobs by status and backend")
    statuses = sorted(df["status"].unique())
    table.add_column("backend")
    for status in statuses:
        table.add_column(status, justify="right")
    for backend, group in df.groupby(df["backend_name"].fillna("(none)")):
        counts = group["status"].value_counts()
        table.add_row(str(backend), *(str(int(counts.get(s, 0))) for s in statuses))
    console.print(table)
    results = output / "results"
    n_results = len(list(results.glob("job_*/job-results.json"))) if results.exists() else 0
    console.print(f"Job database: [bold]{db_path}[/]")
    console.print(f"Results: [bold]{results}[/] ({n_results} jobs downloaded)")
    console.print(
        f"{len(df)} rows in {seconds:.1f} s, {requests} backend requests "
        f"({requests / max(1, len(df)):.1f} per job); stats: {dict(stats)}"
    )


@app.command()
def simulate(
    port: int = typer.Option(8000, help="Port on 127.0.0.1 (0 picks a free one)."),
    queue_duration: float = typer.Option(1.0, help="Seconds a started job stays queued."),
    run_duration: float = typer.Option(2.0, help="Seconds a job runs."),
    jitter: float = typer.Option(0.0, help="Relative jitter on durations (0.2 = +-20%)."),
    capacity: int = typer.Option(10, help="Jobs running at once per user."),
    job_limit: int = typer.Option(None, help="Max queued+running jobs per user (ConcurrentJobLimit above)."),
    failure_rate: float = typer.Option(0.0, help="Fraction of jobs that end in error."),
    rate_429: float = typer.Option(0.0, "--rate-429", help="Fraction of requests answered 429."),
    seed: int = typer.Option(42, help="Seed for failures, jitter and 429s."),
) -> None:
    """Serve a simulated openEO backend on 127.0.0.1 until Ctrl-C."""
    from prefect_openeo.simulator import SimulatorConfig, serve

    config = SimulatorConfig(
        queue_duration=queue_duration,
        run_duration=run_duration,
        jitter=jitter,
        capacity=capacity,
        job_limit=job_limit,
        failure_rate=failure_rate,
        rate_429=rate_429,
        seed=seed,
    )
    serve(port, config)


if __name__ == "__main__":  # pragma: no cover
    app()

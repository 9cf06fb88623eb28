"""The ``prefect-openeo`` command.

Exit codes: 0 done (every row ended finished or skipped), 3 done but some rows ended in error,
start_failed or canceled, 2 bad input (missing file, wrong format, unknown backend, bad option),
1 the run itself failed, 130 interrupted (Ctrl-C; the job database is consistent, rerun to resume).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prefect_openeo.states import ALL as ALL_STATUSES
from prefect_openeo.states import TERMINAL

app = typer.Typer(help="Run thousands of openEO batch jobs with Prefect.", no_args_is_help=True)
console = Console(soft_wrap=True)


def _progress_watcher(
    path: str | Path, total: int, stop: threading.Event, backends: list[str] | None = None
) -> threading.Thread:
    """Progress bars (all rows, and per backend) fed by the job database (written atomically, always whole)."""

    def counts_of():
        from prefect_openeo.jobdb import get_job_db

        try:
            df = get_job_db(path).get_by_status(statuses=list(ALL_STATUSES))
        except Exception:
            return None
        return df

    def watch() -> None:
        with Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bars = {None: progress.add_task("", total=total, label="all jobs")}
            for name in backends or []:
                bars[name] = progress.add_task("", total=None, label=name)
            while True:
                df = counts_of()
                if df is not None:
                    for name, bar in bars.items():
                        part = df if name is None else df[df["backend_name"] == name]
                        counts = part["status"].value_counts().to_dict()
                        done = sum(v for k, v in counts.items() if k in TERMINAL)
                        progress.update(
                            bar,
                            completed=done,
                            description=_histogram(counts),
                            total=total if name is None else max(1, len(part)),
                        )
                if stop.wait(0.5):
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


EXIT_FAILED_ROWS, EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 3, 2, 1, 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _open_db(job_db: str, *, must_exist: bool = True):
    from prefect_openeo.jobdb import JobDatabaseError, get_job_db

    try:
        db = get_job_db(job_db)
    except JobDatabaseError as e:
        raise _fail(str(e)) from e
    if must_exist and not db.exists():
        raise _fail(f"job database {job_db!r} does not exist (create one with `prefect-openeo init`)")
    return db


def _read(db) -> Any:
    from prefect_openeo.jobdb import JobDatabaseError

    try:
        return db.read()
    except JobDatabaseError as e:
        raise _fail(str(e)) from e


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise _fail(f"{what} must look like NAME=VALUE, got {value!r}")
        out[key] = rest
    return out


#: Columns the job manager and the job databases fill themselves: ``init -c`` must not set them.
BOOKKEEPING_COLUMNS = (
    "status", "id", "backend_name", "start_time", "running_start_time", "costs", "cpu", "memory", "duration",
    "message", "create_token", "planned_backend", "results", "retry_count", "retry_after", "owner", "lease_until",
)  # fmt: skip


@app.command()
def init(
    area: Path = typer.Argument(..., help="Area of interest: GeoJSON, shapefile, GeoPackage or GeoParquet."),
    job_db: str = typer.Argument(..., help="Job database to create: .csv, .parquet/.geoparquet, .db, or a URL."),
    tile_size: float = typer.Option(
        ...,
        help="Tile edge length in the unit of --crs's axes (metres for EPSG:3857 and UTM zones, degrees for "
        "EPSG:4326). Refused when, converted to metres (a degree is about 111 km), it is under 1 m or over "
        "10,000 km: the wrong unit (e.g. 10000 with EPSG:4326, 0.1 with EPSG:3857); warned under 10 m or "
        "over 1,000 km.",
    ),
    crs: str = typer.Option(
        "EPSG:3857",
        help="CRS of the tile grid, as an EPSG code. Warns when the area lies outside its area of use "
        "(swapped longitude/latitude, the wrong UTM zone).",
    ),
    max_tiles: int = typer.Option(
        10_000,
        min=1,
        help="Refuse to make more tiles than this (estimated from the area's bounds before any tile is built).",
    ),
    column: list[str] = typer.Option(
        [],
        "--column",
        "-c",
        help="Extra column for every row: NAME=VALUE (VALUE as JSON if it parses). Bookkeeping columns "
        "(status, id, backend_name, ...) and the tile columns (tile, west, south, east, north, geometry) are refused.",
    ),
) -> None:
    """Create a job database from an area of interest split into tiles (one row, one job, per tile).

    Each row has the tile's name (tile), its bounds in EPSG:4326 (west, south, east, north), its geometry
    (EPSG:4326) and the --column values. GeoJSON is longitude/latitude (RFC 7946); other files without a
    CRS are taken to be too, with a warning."""
    from prefect_openeo.jobdb import create_job_db, get_job_db
    from prefect_openeo.tiling import TILE_COLUMNS, TooManyTiles

    extra = _pairs(column, "--column")
    reserved = sorted(set(extra) & {*BOOKKEEPING_COLUMNS, *TILE_COLUMNS})
    if reserved:
        raise _fail(
            f"--column cannot set {', '.join(reserved)}: init and the job manager fill "
            f"{'this column' if len(reserved) == 1 else 'these columns'} themselves; choose another name "
            f"(reserved: {', '.join((*BOOKKEEPING_COLUMNS, *TILE_COLUMNS))})"
        )
    try:
        target = get_job_db(job_db)
    except ValueError as e:
        raise _fail(str(e)) from e
    if target.exists():
        raise _fail(f"{job_db!r} exists already: refusing to overwrite it")
    try:
        tiles = _tile(area, tile_size, crs, max_tiles)
    except TooManyTiles as e:
        fix = "raise --max-tiles"
        if e.suggestion:
            size, count = e.suggestion
            fix = f"use a larger --tile-size (e.g. {size:g} makes up to {count:,} tiles) or {fix}"
        raise _fail(f"{str(area)!r}: {e.estimate}, more than --max-tiles {max_tiles:,}: {fix}") from e
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    except Exception as e:
        raise _fail(f"cannot split {str(area)!r} into tiles: {e}") from e
    for key, value in extra.items():
        tiles[key] = _parse_value(value)
    create_job_db(job_db, tiles)
    console.print(f"Created [bold]{job_db}[/] with {len(tiles)} rows ({tile_size:g} x {tile_size:g} tiles in {crs})")


def _tile(area: Path, tile_size: float, crs: str, max_tiles: int) -> Any:
    """``area``'s tiles; its ``TilingWarning``s printed as they are (before any error)."""
    import warnings

    from rich.markup import escape

    from prefect_openeo.tiling import TilingWarning, read_area, tile_area

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TilingWarning)
        try:
            return tile_area(read_area(area), tile_size=tile_size, crs=crs, max_tiles=max_tiles)
        finally:
            for warning in caught:
                if issubclass(warning.category, TilingWarning):
                    console.print(f"[bold yellow]warning:[/] {escape(str(warning.message))}")
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _parse_value(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


@app.command()
def run(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    backend: list[str] = typer.Option(
        ..., "--backend", "-b", help="NAME=URL of an openEO backend, or NAME=block:BLOCK for an OpenEOBackend block."
    ),
    start_job: str = typer.Option(None, help="Job callback as module:function."),
    process_id: str = typer.Option(None, help="Or: a parameterized process, filled from the row's columns."),
    namespace: str = typer.Option(None, help="Namespace (e.g. URL) of --process-id."),
    parallel_jobs: int = typer.Option(2, min=1, help="Jobs active at once per backend."),
    poll_sleep: float = typer.Option(60, min=0, help="Seconds between sweeps."),
    root_dir: Path = typer.Option(Path("."), help="Folder for results (job_{id}/)."),
    download: bool = typer.Option(True, help="Download results of finished jobs."),
    cancel_after: int = typer.Option(None, help="Cancel jobs running longer than this (seconds)."),
    retry_failed: int = typer.Option(0, min=0, help="Retries per row that ends in error or start_failed."),
    auth: str = typer.Option("none", help="Authentication: none, basic (OPENEO_USERNAME/OPENEO_PASSWORD), oidc."),
    local: bool = typer.Option(False, "--local", help="Run without Prefect (no flow run)."),
) -> None:
    """Run the job database's jobs until every row ended, with a live progress bar per backend."""
    import openeo

    from prefect_openeo import MultiBackendJobManager
    from prefect_openeo.flows import BLOCK_PREFIX, load_block, load_callable

    backends = _pairs(backend, "--backend")
    db = _open_db(job_db)
    _read(db)
    if bool(start_job) == bool(process_id):
        raise _fail("give either --start-job module:function or --process-id (with --namespace)")
    if process_id:
        from openeo.extra.job_management.process_based import ProcessBasedJobCreator

        callback = ProcessBasedJobCreator(process_id=process_id, namespace=namespace)
    else:
        try:
            callback = load_callable(start_job)
        except ValueError as e:
            raise _fail(str(e)) from e

    def connector(url: str):
        if url.startswith(BLOCK_PREFIX):  # an OpenEOBackend block saved on the Prefect server
            return load_block(url).get_connection

        def make():
            connection = openeo.connect(url)
            if auth == "basic":
                connection.authenticate_basic(os.environ.get("OPENEO_USERNAME"), os.environ.get("OPENEO_PASSWORD"))
            elif auth == "oidc":
                connection.authenticate_oidc()
            return connection

        return make

    total = len(_read(db))
    stop = threading.Event()
    watcher = _progress_watcher(job_db, total, stop, backends=list(backends))
    try:
        if local:
            manager = MultiBackendJobManager(
                poll_sleep=poll_sleep,
                root_dir=root_dir,
                download_results=download,
                cancel_running_job_after=cancel_after,
                retry_failed_jobs=retry_failed,
            )
            for name, url in backends.items():
                manager.add_backend(name, connection=connector(url), parallel_jobs=parallel_jobs)
            manager.start_job_thread(start_job=callback, job_db=db)
            try:
                while manager._thread.is_alive():
                    manager._thread.join(0.2)
            except KeyboardInterrupt:
                manager.stop_job_thread(timeout_seconds=2 * poll_sleep + 30)
                raise
            stats = dict(manager.stats)
        else:
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from prefect_openeo.flows import run_openeo_jobs

            state = run_openeo_jobs(
                job_db=db,
                backends={name: connector(url) for name, url in backends.items()},
                start_job=callback,
                parallel_jobs=parallel_jobs,
                poll_sleep=poll_sleep,
                root_dir=str(root_dir),
                download_results=download,
                cancel_running_job_after=cancel_after,
                return_state=True,
            )
            if not state.is_completed():
                stop.set()
                watcher.join(5)
                try:
                    state.result()
                except Exception as e:
                    raise _fail(f"the run failed: {e}", EXIT_RUN_FAILED) from e
                raise _fail(f"the run ended {state.name}", EXIT_RUN_FAILED)
            stats = state.result()
    except KeyboardInterrupt:
        stop.set()
        watcher.join(5)
        console.print("Interrupted: the job database is consistent; run the same command again to resume.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        stop.set()
        watcher.join(5)
    _print_status(_read(db))
    console.print(f"Run stats: {stats}")
    failed = _read(db)["status"].isin(["error", "start_failed", "canceled"]).sum()
    if failed:
        raise typer.Exit(EXIT_FAILED_ROWS)


def _print_status(df) -> dict:
    from prefect_openeo.report import summary

    info = summary(df)
    statuses = [s for s in info["by_status"]]
    table = Table(title=f"{info['rows']} rows by backend and status")
    table.add_column("backend")
    for status in statuses:
        table.add_column(status, justify="right")
    for name, counts in info["by_backend"].items():
        table.add_row(name, *(str(counts.get(s, 0)) for s in statuses))
    console.print(table)
    usage = ", ".join(f"{k} {v:g} {info['usage_units'].get(k, '')}".strip() for k, v in info["usage"].items())
    console.print(f"Costs: {info['costs']:g}" + (f"; usage: {usage}" if usage else ""))
    if info["running_seconds"]:
        longest = max(info["running_seconds"].items(), key=lambda kv: kv[1])
        console.print(f"Running: {len(info['running_seconds'])} jobs, longest row {longest[0]} for {longest[1]} s")
    for problem in info["problems"][:20]:
        console.print(f"[red]row {problem['row']}[/] ({problem['status']}): {problem['message']}")
    if len(info["problems"]) > 20:
        console.print(f"... and {len(info['problems']) - 20} more rows with messages (see --json)")
    return info


@app.command()
def status(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Counts by status and backend, running times, costs and usage, rows with errors."""
    from prefect_openeo.report import summary

    df = _read(_open_db(job_db))
    if as_json:
        print(json.dumps(summary(df), indent=2, default=str))
    else:
        _print_status(df)


RETRYABLE = ("error", "start_failed", "canceled")


@app.command()
def retry(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    status_: list[str] = typer.Option([], "--status", "-s", help="Reset rows with this status (repeat)."),
    backend: list[str] = typer.Option([], "--backend", "-b", help="Only rows of this backend (repeat)."),
    row: list[str] = typer.Option([], "--row", "-r", help="Only these rows (index, repeat)."),
) -> None:
    """Reset error/start_failed/canceled rows so that the next run takes them again."""
    bad = sorted(set(status_) - set(RETRYABLE))
    if bad:
        raise _fail(f"--status must be among {', '.join(RETRYABLE)}; got {', '.join(bad)}")
    db = _open_db(job_db)
    df = _read(db)
    chosen = df["status"].isin(status_ or RETRYABLE)
    if backend:
        known = set(df["backend_name"].dropna())
        unknown = sorted(set(backend) - known)
        if unknown:
            raise _fail(f"no rows on backend(s) {', '.join(unknown)} (backends: {', '.join(sorted(known))})")
        chosen &= df["backend_name"].isin(backend)
    if row:
        wanted = {str(r) for r in row}
        missing = sorted(wanted - {str(i) for i in df.index})
        if missing:
            raise _fail(f"no row(s) {', '.join(missing)} in {job_db}")
        not_retryable = [str(i) for i in df.index if str(i) in wanted and df.at[i, "status"] not in RETRYABLE]
        if not_retryable:
            raise _fail(f"row(s) {', '.join(not_retryable)} did not end in {', '.join(RETRYABLE)}")
        chosen &= df.index.map(lambda i: str(i) in wanted)
    rows = df[chosen].copy()
    if rows.empty:
        console.print("No rows to reset.")
        return
    for column in ("id", "start_time", "running_start_time", "create_token", "message", "retry_after"):
        if column in rows.columns:
            rows[column] = None
    if "retry_count" in rows.columns:
        rows["retry_count"] = None
    rows["status"] = "not_started"
    db.persist(rows)
    console.print(f"Reset {len(rows)} row(s) to not_started: {', '.join(map(str, rows.index[:20]))}")


@app.command()
def plot(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    map_png: Path = typer.Option(None, "--map", help="Where to write the map (default: <db>-map.png)."),
    timeline_png: Path = typer.Option(
        None, "--timeline", help="Where to write the timeline (default: <db>-timeline.png)."
    ),
) -> None:
    """A PNG map of the tiles coloured by status, and a timeline of jobs per backend."""
    from prefect_openeo.report import plot_map, plot_timeline

    df = _read(_open_db(job_db))
    stem = Path(job_db.split("://")[-1]).with_suffix("")
    map_png = map_png or Path(f"{stem}-map.png")
    timeline_png = timeline_png or Path(f"{stem}-timeline.png")
    try:
        plot_map(df, map_png)
    except ValueError as e:
        raise _fail(str(e)) from e
    plot_timeline(df, timeline_png)
    console.print(f"Map: [bold]{map_png}[/]; timeline: [bold]{timeline_png}[/]")


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


@app.command()
def catalog(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    root_dir: str = typer.Option(
        ".", "--root-dir", help="Where the results are (job_{id}/): a folder, or a URL such as s3://bucket/prefix."
    ),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rewrite every item, not only the missing ones."),
) -> None:
    """Write or refresh the STAC collection of the downloaded results: ROOT/collection.json, an item per row."""
    from prefect_openeo.catalog import CatalogError, update_catalog
    from prefect_openeo.jobdb import JobDatabaseError
    from prefect_openeo.storage import LocalStore, ResultStore, StorageError

    db = _open_db(job_db)
    try:
        store = ResultStore.from_root(root_dir)
    except (StorageError, TypeError) as e:
        raise _fail(str(e)) from e
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise _fail(f"results folder {root_dir!r} does not exist (give the run's --root-dir)")
    try:
        report = update_catalog(store, db, rebuild=rebuild)
    except (CatalogError, JobDatabaseError, StorageError) as e:
        raise _fail(str(e)) from e
    except Exception as e:
        raise _fail(f"could not write the STAC collection under {root_dir!r}: {e!r}", EXIT_RUN_FAILED) from e
    for index, job_id, why in report.left_out[:20]:
        console.print(f"[yellow]warning:[/] row {index} (job {job_id}) is recorded with results but left out: {why}")
    console.print(f"STAC collection: [bold]{report.location}[/] ({report.items} item(s), {report.written} written now)")


if __name__ == "__main__":  # pragma: no cover
    app()

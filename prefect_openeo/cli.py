"""The ``prefect-openeo`` command.

Exit codes: 0 done (every row ended finished or skipped), 1 the run failed or stopped with rows unfinished
(rerun to resume), 2 bad input (missing file, wrong format, bad option, a backend that is not openEO or
rejects the credentials), 3 done but some rows ended in error, start_failed or canceled, 130 interrupted
(Ctrl-C; the job database is consistent, rerun to resume).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from prefect_openeo.backend_checks import Auth, BackendSpecError, Probe, parse_backends, wait_for
from prefect_openeo.outcome import FAILED_STATUSES, NOT_DOWNLOADED
from prefect_openeo.schema import BOOKKEEPING
from prefect_openeo.settings import settings
from prefect_openeo.states import TERMINAL
from prefect_openeo.terminal import progress_bars, terminal_logging

app = typer.Typer(help="Run thousands of openEO batch jobs with Prefect.", no_args_is_help=True)
console = Console(soft_wrap=True)


EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_FAILED_ROWS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 every row finished (or was skipped); 1 the run failed or stopped with rows unfinished "
    "(rerun to resume); 2 bad input (files, options, backends that are not openEO or reject the credentials); "
    "3 done, but some rows ended error, start_failed or canceled; 130 interrupted by Ctrl-C (the job "
    "database is consistent: rerun to resume)."
)
VERBOSE_HELP = "Show Prefect's lines (one per task run) and INFO logs in the terminal too."


#: Jobs at once per simulated backend in the demo: 20 jobs in two waves.
DEMO_SLOTS = 5


@app.command(epilog=EXIT_CODES)
def demo(
    tiles: int = typer.Option(20, min=1, max=500, help="Number of tiles (jobs)."),
    output: Path = typer.Option(Path("demo-output"), help="Folder for the job database and results."),
    local: bool = typer.Option(False, "--local", help="Run the drop-in manager outside Prefect (no flow run)."),
    failure_rate: float = typer.Option(0.1, min=0.0, max=1.0, help="Fraction of simulated jobs that fail."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Run ~20 NDVI jobs on two simulated openEO backends: no account, no network."""
    api = state = code = None
    settled = True  # no thread of a run that may still talk to Prefect
    try:
        if not local:  # the Prefect server starts while the simulators and the job database get ready
            api = _prefect_api()
        from prefect_openeo.demo import create_ndvi_job, demo_tiles
        from prefect_openeo.jobdb import create_job_db
        from prefect_openeo.simulator import SimulatorConfig, simulated_backends

        output.mkdir(parents=True, exist_ok=True)
        db_path = output / "jobs.parquet"
        if db_path.exists():
            console.print(f"Resuming the job database at [bold]{db_path}[/] (delete the folder to start over)")
        else:
            create_job_db(db_path, demo_tiles(tiles))
        total = len(_read(_open_db(str(db_path))))
        config = SimulatorConfig(
            queue_duration=1.0, run_duration=2.0, jitter=0.3, capacity=DEMO_SLOTS, failure_rate=failure_rate
        )
        with simulated_backends(2, config) as (sim_a, sim_b), terminal_logging(console, verbose):
            console.print(f"Simulated backends: sim-a at {sim_a.url}, sim-b at {sim_b.url}")
            backends = {"sim-a": sim_a.url, "sim-b": sim_b.url}
            if not local:
                import prefect_openeo.flows  # noqa: F401  (Prefect loads while its server starts)
            _api_ready(api)
            started = time.monotonic()
            with progress_bars(console, db_path, total, list(backends)):
                if local:
                    manager = _local_manager(
                        backends,
                        parallel_jobs=DEMO_SLOTS,
                        poll_sleep=0.5,
                        root_dir=output / "results",
                    )
                    _run_local(manager, create_ndvi_job, db_path)
                else:
                    settled = False
                    state = _run_flow(
                        api,
                        job_db=str(db_path),
                        backends=backends,
                        start_job=create_ndvi_job,
                        parallel_jobs=DEMO_SLOTS,
                        poll_sleep=0.5,
                        root_dir=str(output / "results"),
                    )
                    settled = state.is_completed()
            seconds = time.monotonic() - started
            requests = sim_a.total_requests() + sim_b.total_requests()
        df = _read(_open_db(str(db_path)))
        _print_status(df)
        _print_demo_summary(df, db_path, output, requests, seconds)
        code = _outcome(df, None if local else state)
        if api is not None:
            _print_ui_hint(api, state.state_details.flow_run_id)
    except KeyboardInterrupt:
        console.print(f"Interrupted. The simulated backends (and their jobs) ended too: delete {output} to start over.")
        code = EXIT_INTERRUPTED
    finally:
        code = _close(api, settled, code)
    raise typer.Exit(code)


def _print_demo_summary(df: Any, db_path: Path, output: Path, requests: int, seconds: float) -> None:
    results = output / "results"
    n_results = len(list(results.glob("job_*/job-results.json"))) if results.exists() else 0
    console.print(
        f"{len(df)} jobs in {seconds:.1f} s, {requests} backend requests ({requests / max(1, len(df)):.1f} per job)"
    )
    console.print(f"Job database: [bold]{db_path}[/] (see it with `prefect-openeo status {db_path}`)")
    console.print(f"Results: [bold]{results}[/] ({n_results} jobs downloaded)")


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
    """The whole job database, checked to be one (exit 2 with what is wrong, e.g. a table without 'status')."""
    from prefect_openeo.jobdb import JobDatabaseError
    from prefect_openeo.jobdb.checks import check_job_frame, normalize_job_frame

    try:
        df = db.read()
        check_job_frame(df, source=str(getattr(db, "path", db)))
        return normalize_job_frame(df)
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
    from prefect_openeo.tiling import TILE_COLUMNS, TooManyTiles, tiling_note

    extra = _pairs(column, "--column")
    reserved = sorted(set(extra) & {*BOOKKEEPING, *TILE_COLUMNS})
    if reserved:
        raise _fail(
            f"--column cannot set {', '.join(reserved)}: init and the job manager fill "
            f"{'this column' if len(reserved) == 1 else 'these columns'} themselves; choose another name "
            f"(reserved: {', '.join((*BOOKKEEPING, *TILE_COLUMNS))})"
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
    console.print(
        f"Created [bold]{job_db}[/] with {len(tiles)} rows ({tile_size:g} x {tile_size:g} tiles in {crs})"
        + tiling_note(tiles)
    )


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


@app.command(epilog=EXIT_CODES)
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
    root_dir: str = typer.Option(
        ".", help="Where results go (job_{id}/): a folder, or an object-store URL such as s3://bucket/prefix."
    ),
    download: bool = typer.Option(True, help="Download results of finished jobs."),
    cancel_after: int = typer.Option(None, help="Cancel jobs running longer than this (seconds)."),
    retry_failed: int = typer.Option(0, min=0, help="Retries per row that ends in error or start_failed."),
    retry_backoff: float = typer.Option(60, min=0, help="Seconds before a row's first retry, doubling after."),
    auth: Auth = typer.Option(
        Auth.none, help="Authentication with URL backends: basic (OPENEO_USERNAME/OPENEO_PASSWORD) or oidc."
    ),
    local: bool = typer.Option(False, "--local", help="Run without Prefect (no flow run)."),
    wait_for_backends: bool = typer.Option(
        False, "--wait-for-backends", help="When no backend can be reached at the start, wait for them."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Run the job database's jobs until every row ended, with a live progress bar per backend.

    Every backend is checked first (in parallel): one that is not an openEO API or rejects the credentials
    stops the command before anything starts; one that is down now only gets a warning, and its jobs wait
    while the other backends work. Without PREFECT_API_URL, a temporary local Prefect server runs the flow
    (stopped at the end); Ctrl-C ends the flow run and stops it cleanly.
    """
    try:
        specs = parse_backends(backend, auth)
    except BackendSpecError as e:
        raise _fail(str(e)) from e
    db = _open_db(job_db)
    rows = _read(db)
    _check_pinned(rows, [spec.name for spec in specs])
    total = len(rows)
    callback = _job_callback(start_job, process_id, namespace)
    api = state = code = None
    settled = True  # no thread of a run that may still talk to Prefect
    try:
        needs_api = not local or any(spec.block for spec in specs)
        api = _prefect_api() if needs_api else None
        probes = [Probe(spec).start() for spec in specs if not spec.block]  # while the server starts
        if not local:
            import prefect_openeo.flows  # noqa: F401  (Prefect loads while its server starts)
        with terminal_logging(console, verbose):
            _api_ready(api)
            with api.use() if api is not None else contextlib.nullcontext():
                probes += [Probe(spec).start() for spec in specs if spec.block]
                _check_backends(probes, wait_for_backends)
                if local and api is not None:  # the blocks are loaded: no need for Prefect any longer
                    api.close(settled=True)
                    api = None
                # The same options either way: the drop-in manager in this process, or the flow run.
                connections = {spec.name: spec.connection for spec in specs}
                options = {
                    "parallel_jobs": parallel_jobs,
                    "poll_sleep": poll_sleep,
                    "root_dir": root_dir,
                    "download_results": download,
                    "cancel_running_job_after": cancel_after,
                    "retry_failed_jobs": retry_failed,
                    "retry_backoff": retry_backoff,
                }
                with progress_bars(console, job_db, total, list(connections)):
                    if local:
                        _run_local(_local_manager(connections, **options), callback, db)
                    else:
                        settled = False
                        state = _run_flow(api, job_db=db, backends=connections, start_job=callback, **options)
                        settled = state.is_completed()
        df = _read(db)
        _print_status(df)
        code = _outcome(df, state)
        if state is not None:
            _print_ui_hint(api, state.state_details.flow_run_id)
    except KeyboardInterrupt:
        console.print("Interrupted: the job database is consistent; run the same command again to resume.")
        code = EXIT_INTERRUPTED
    finally:
        code = _close(api, settled, code)
    raise typer.Exit(code)


def _check_backends(probes: list[Probe], wait_for_backends: bool = False) -> None:
    """A backend that is not openEO or rejects the credentials stops everything here (exit 2); one that cannot
    be reached now does not (its jobs wait while the others go on), unless none can be reached: then nothing
    could be done, and the command ends (exit 2) unless ``wait_for_backends``."""
    problems, silent = wait_for(probes)
    if problems:
        raise _fail("\n".join(problems))
    down = [probe.down for probe in probes if probe.down]
    if down and len(down) == len(probes) and not wait_for_backends:
        raise _fail(
            "No backend can be reached, nothing was started:\n"
            + "\n".join(down)
            + "\nRun the same command again once one is back, or add --wait-for-backends to wait for them."
        )
    for message in silent:
        waits = "while the other backends go on" if len(down) < len(probes) else "until it is back"
        console.print(f"[yellow]warning:[/] {message}: its jobs wait {waits}")


def _check_pinned(df: Any, names: list[str]) -> None:
    """Unfinished rows that name a backend must name one of ``--backend`` (they would wait forever)."""
    from prefect_openeo.placement import unregistered

    unknown = unregistered(df[~df["status"].isin(TERMINAL)], names)["backend_name"]
    if not unknown.empty:
        raise _fail(
            f"{len(unknown)} unfinished row(s) name backend(s) {', '.join(sorted(set(unknown)))} (e.g. row "
            f"{unknown.index[0]}), not given with --backend (given: {', '.join(names)})"
        )


def _job_callback(start_job: str | None, process_id: str | None, namespace: str | None) -> Any:
    from prefect_openeo.flows import load_callable

    if bool(start_job) == bool(process_id):
        raise _fail("give either --start-job module:function or --process-id (with --namespace)")
    if process_id:
        from openeo.extra.job_management.process_based import ProcessBasedJobCreator

        return ProcessBasedJobCreator(process_id=process_id, namespace=namespace)
    try:
        return load_callable(start_job)
    except ValueError as e:
        raise _fail(str(e)) from e


def _prefect_api() -> Any:
    """The Prefect API of this command; a temporary server starts now (in its own session)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect_openeo.prefect_server import PrefectApi

    return PrefectApi().start()


def _api_ready(api: Any) -> None:
    """Wait until the Prefect API answers (exit 1 when it does not)."""
    if api is None:
        return
    from prefect_openeo.prefect_server import PrefectApiError

    try:
        if api.temporary:
            with console.status("Starting a temporary Prefect server (set PREFECT_API_URL to use yours)"):
                api.wait_ready()
        else:
            api.wait_ready()
    except PrefectApiError as e:
        raise _fail(str(e), EXIT_RUN_FAILED) from e


def _local_manager(connections: dict[str, Any], *, parallel_jobs: int, **options: Any) -> Any:
    import openeo

    from prefect_openeo import MultiBackendJobManager

    manager = MultiBackendJobManager(stac_catalog=True, **options)
    for name, connection in connections.items():
        if isinstance(connection, str):
            url = connection
            connection = lambda url=url: openeo.connect(url)  # noqa: E731
        manager.add_backend(name, connection=connection, parallel_jobs=parallel_jobs)
    return manager


def _run_local(manager: Any, callback: Any, job_db: Any) -> None:
    """The drop-in manager in its thread, until it ends; Ctrl-C lets it end its sweep first."""
    manager.start_job_thread(start_job=callback, job_db=job_db)
    try:
        while not manager.join_job_thread(0.2):
            pass
    except KeyboardInterrupt:
        manager.stop_job_thread(timeout_seconds=settings.local_stop_wait)
        raise


def _run_flow(api: Any, **parameters: Any) -> Any:
    """The ``run_openeo_jobs`` flow, on the command's Prefect API; its final state. On a configured server,
    the flow run's page in the UI is given as soon as it runs."""
    from prefect_openeo.flows import run_openeo_jobs
    from prefect_openeo.prefect_server import flow_run_url

    def running(flow: Any, flow_run: Any, state: Any) -> None:
        if not api.temporary:
            console.print(f"Watch this run in the Prefect UI: {flow_run_url(flow_run.id)}")

    with api.use():
        return run_openeo_jobs.with_options(on_running=[running])(**parameters, return_state=True)


def _outcome(df: Any, state: Any = None) -> int:
    """The exit code of a run that ended, with a line that says why when it is not 0."""
    unfinished = int((~df["status"].isin(TERMINAL)).sum())
    if state is not None and not state.is_completed():
        error = state.result(raise_on_failure=False)
        reason = error if isinstance(error, BaseException) else state.message or state.name
        console.print(f"[bold red]error:[/] the run failed: {reason}")
        return EXIT_RUN_FAILED
    if unfinished:
        console.print(
            f"[bold red]error:[/] the run stopped with {unfinished} row(s) unfinished: "
            "run the same command again to resume"
        )
        return EXIT_RUN_FAILED
    failed = int(df["status"].isin(FAILED_STATUSES).sum())
    if failed:
        console.print(f"{failed} row(s) ended error, start_failed or canceled: see `prefect-openeo status`")
    missing = 0
    if "results" in df.columns:
        missing = int((df["status"].eq("finished") & df["results"].isin(NOT_DOWNLOADED)).sum())
    if missing:
        console.print(
            f"{missing} finished row(s) whose results were not downloaded: see `prefect-openeo status`, "
            "then `prefect-openeo download --missing`"
        )
    return EXIT_FAILED_ROWS if failed or missing else EXIT_OK


def _close(api: Any, settled: bool, code: int | None = None) -> int | None:
    """Close the command's Prefect API (see ``PrefectApi.close``); a second Ctrl-C meanwhile still exits 130."""
    try:
        if api is not None:
            api.close(settled=settled)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def _print_ui_hint(api: Any, flow_run_id: Any) -> None:
    """Where to see the flow run in the Prefect UI (a temporary server's runs are in Prefect's database)."""
    from prefect_openeo.prefect_server import flow_run_url

    if api is None or flow_run_id is None:
        return
    if api.temporary:
        console.print(
            "See this run in the Prefect UI: start a server with `prefect server start`, then open "
            f"{flow_run_url(flow_run_id)}"
        )
    else:
        console.print(f"See this run in the Prefect UI: {flow_run_url(flow_run_id)}")


def _print_status(df) -> dict:
    from prefect_openeo.report import readable_number, summary

    info = summary(df)
    statuses = [s for s in info["by_status"]]
    table = Table(title=f"{info['rows']} rows by backend and status")
    table.add_column("backend")
    for status in statuses:
        table.add_column(status, justify="right")
    for name, counts in info["by_backend"].items():
        table.add_row(name, *(str(counts.get(s, 0)) for s in statuses))
    console.print(table)
    usage = ", ".join(
        f"{k} {readable_number(v)} {info['usage_units'].get(k, '')}".strip() for k, v in info["usage"].items()
    )
    console.print(f"Costs: {readable_number(info['costs'])}" + (f"; usage: {usage}" if usage else ""))
    if info["results"]:
        console.print("Results of finished rows: " + ", ".join(f"{n} {state}" for state, n in info["results"].items()))
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
    """Counts by status and backend, result downloads, costs and usage, jobs running now, rows with errors."""
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
    from prefect_openeo import transitions
    from prefect_openeo.jobdb import open_store

    store = open_store(db)
    landed = store.apply([transitions.reset(row, index) for index, row in rows.iterrows()], rows)
    console.print(f"Reset {len(landed)} row(s) to not_started: {', '.join(map(str, landed[:20]))}")
    skipped = [str(i) for i in rows.index if i not in set(landed)]
    if skipped:  # a worker holds them now, or their status moved on since they were read
        console.print(
            f"[yellow]warning:[/] not reset (changed meanwhile, or held by a live worker): {', '.join(skipped[:20])}"
        )


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


@app.command()
def download(
    job_db: str = typer.Argument(..., help="Job database (path or SQLAlchemy URL)."),
    backend: list[str] = typer.Option(
        ..., "--backend", "-b", help="NAME=URL of the backend the rows ran on, or NAME=block:BLOCK."
    ),
    root_dir: str = typer.Option(
        ".", help="Where results go (job_{id}/): a folder, or an object-store URL such as s3://bucket/prefix."
    ),
    missing: bool = typer.Option(
        False, "--missing", help="Only rows whose results are not recorded done (pending, failed, gone, unknown)."
    ),
    per_second: float = typer.Option(2.0, min=0.01, help="Downloads started per second, at most (4 at once)."),
    auth: Auth = typer.Option(
        Auth.none, help="Authentication with URL backends: basic (OPENEO_USERNAME/OPENEO_PASSWORD) or oidc."
    ),
) -> None:
    """Download the results of finished rows on request, recording each row's results state (done, failed,
    gone) in the job database, as a run does. Exit 3 when some could not be downloaded."""
    from prefect_openeo.storage import StorageError

    try:
        specs = parse_backends(backend, auth)
    except BackendSpecError as e:
        raise _fail(str(e)) from e
    db = _open_db(job_db)
    _read(db)
    api = _prefect_api() if any(spec.block for spec in specs) else None
    code = EXIT_OK
    try:
        _api_ready(api)
        with api.use() if api is not None else contextlib.nullcontext():
            _check_backends([Probe(spec).start() for spec in specs])
            try:
                manager = _local_manager(
                    {spec.name: spec.connection for spec in specs}, parallel_jobs=1, root_dir=root_dir
                )
                with console.status("Downloading results"):
                    outcomes = manager.fetch_results(db, missing=missing, per_second=per_second)
            except StorageError as e:
                raise _fail(str(e)) from e
        table = Table(title="Result downloads")
        for column in ("done", "failed", "gone", "skipped"):
            table.add_column(column, justify="right")
        table.add_row(*(str(outcomes.get(c, 0)) for c in ("done", "failed", "gone", "skipped")))
        console.print(table)
        if outcomes.get("skipped"):
            console.print(f"{outcomes['skipped']} row(s) ran on backends not given with --backend: left as they were")
        if outcomes.get("failed") or outcomes.get("gone"):
            console.print("Rows whose results could not be downloaded say why: see `prefect-openeo status`")
            code = EXIT_FAILED_ROWS
    except KeyboardInterrupt:
        console.print("Interrupted: the results downloaded so far are recorded; run again with --missing.")
        code = EXIT_INTERRUPTED
    finally:
        code = _close(api, True, code)
    raise typer.Exit(code)


if __name__ == "__main__":  # pragma: no cover
    app()

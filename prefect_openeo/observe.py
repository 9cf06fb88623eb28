"""What a flow run shows in the Prefect UI, fed from the engine's sweeps.

- One task run per job (``row 17 @ cdse (j-...)``, tagged ``openeo-job`` and ``backend:cdse``) whose state
  follows the backend job; a failed job's state message and a log line of its task run say why.
- An ``openeo.job.<status>`` event per transition, for Automations.
- One artifact card per kind: progress, a table of rows by backend and status with costs and usage
  (refreshed at most every ``settings.table_interval`` seconds, never reading the job database every sweep), a final
  summary (what the run came to, why rows failed, where the results are) and pictures.

The engine's loop only hands updates over: one background ``Reporter`` per run sends them
(``prefect_openeo.reporter``), and ``run_done`` waits for it a bounded time.
"""

from __future__ import annotations

import base64
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from openeo.extra.job_management import JobDatabaseInterface
from prefect import task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

from prefect_openeo.engine import Observer
from prefect_openeo.outcome import FAILED_STATUSES, RunOutcome
from prefect_openeo.reasons import MAX_REASON, shorten
from prefect_openeo.report import readable_number, usage_number
from prefect_openeo.reporter import Reporter, RowUpdate, Unreported, prefect_state
from prefect_openeo.settings import settings
from prefect_openeo.states import ALL, TERMINAL
from prefect_openeo.tasks import JOB_TAG, backend_tag

_log = logging.getLogger("prefect_openeo")

__all__ = ["PrefectObserver", "openeo_batch_job", "prefect_state", "status_table", "summary_markdown"]

#: The status table is refreshed at most every ``settings.table_interval`` seconds, and at most once per
#: ``TABLE_READ_SHARE`` times as long as reading the rows for it took (a big SQL job database is read rarely).
TABLE_READ_SHARE = 20
#: How many rows the final summary lists, at most: finished (with links), failed (with reasons).
SUMMARY_LINK_LIMIT = 200
SUMMARY_FAILED_LIMIT = 50
#: Longest reason shown in the summary's tables.
SUMMARY_REASON = 160


@task(name="openEO batch job", tags=[JOB_TAG])
def openeo_batch_job() -> None:
    """Never called: the task whose runs mirror openEO batch jobs in the UI."""


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, numbers and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "openeo"


def job_run_name(update: RowUpdate) -> str:
    """``row 17 @ cdse (j-...)``."""
    return f"row {update.index} @ {update.backend or '?'}" + (f" ({update.job_id})" if update.job_id else "")


def job_run_tags(update: RowUpdate) -> list[str]:
    return [backend_tag(update.backend)] if update.backend else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class PrefectObserver(Observer):
    """Feeds the UI of the current flow run from the engine's sweeps, through a background reporter.

    :param job_dir: where a finished job's results are (``manager.get_job_dir``), for the summary's links;
        None when results are not downloaded.
    :param root: the results' root (a local folder also gets the pictures).
    :param catalog: where the STAC collection of the results is (``prefect_openeo.catalog``), if kept.
    """

    def __init__(
        self,
        job_dir: Callable[[str], Path | str] | None = None,
        root: Path | str | None = None,
        catalog: Path | str | None = None,
        *,
        reporter: Reporter | None = None,
        flush_timeout: float | None = None,
        table_interval: float | None = None,
    ):
        context = FlowRunContext.get()
        flow_run_id = context.flow_run.id if context and context.flow_run else None
        self.job_dir, self.root, self.catalog = job_dir, root, catalog
        self.flush_timeout = settings.flush_timeout if flush_timeout is None else flush_timeout
        self.table_interval = settings.table_interval if table_interval is None else table_interval
        self.reporter = reporter or Reporter(
            flow_run_id,
            openeo_batch_job,
            lambda: get_client(sync_client=True),
            name=job_run_name,
            tags=job_run_tags,
        )
        name = context.flow.name if context else "jobs"
        self._key = artifact_key(name if "openeo" in name else f"openeo-{name}")
        self._histogram: dict | None = None
        self._table_histogram: dict | None = None
        self._next_table = 0.0
        self.unreported: Unreported | None = None

    def row_status(self, index: Any, row: pd.Series, status: str) -> None:
        message = _text(row.get("message")) if status in TERMINAL else None
        self.reporter.row(RowUpdate(index, status, _text(row.get("backend_name")), _text(row.get("id")), message))

    def sweep_done(self, job_db: JobDatabaseInterface, stats: dict) -> None:
        histogram = job_db.count_by_status()
        if histogram != self._histogram:
            self._histogram = histogram
            self._progress(histogram)
        if histogram != self._table_histogram and time.monotonic() >= self._next_table:
            started = time.monotonic()
            rows = all_rows(job_db)
            read = time.monotonic() - started
            self._next_table = time.monotonic() + max(self.table_interval, TABLE_READ_SHARE * read)
            self._table_histogram = histogram
            self._table(rows)

    def _progress(self, histogram: dict) -> None:
        total = sum(histogram.values())
        done = sum(v for k, v in histogram.items() if k in TERMINAL)
        failed = sum(v for k, v in histogram.items() if k in FAILED_STATUSES)
        progress = round(100.0 * done / total, 1) if total else 100.0
        finished = histogram.get("finished", 0)
        skipped = done - finished - failed
        counts = f"{finished} finished, {failed} failed" + (f", {skipped} skipped" if skipped else "")
        counts += f", {total - done} to go, of {total} rows"
        self.reporter.artifact(f"{self._key}-progress", "progress", progress, f"Rows ended: {counts}")

    def _table(self, rows: pd.DataFrame) -> None:
        self.reporter.artifact(
            f"{self._key}-status",
            "table",
            lambda: status_table(rows),  # made in the reporter's thread
            "openEO job rows by backend and status, with costs and usage so far",
        )

    def run_done(self, job_db: JobDatabaseInterface, stats: dict, problems: dict) -> None:
        try:
            rows = all_rows(job_db)
            self._progress(rows["status"].value_counts().to_dict())
            self._table(rows)
            self.reporter.artifact(
                f"{self._key}-summary",
                "markdown",
                summary_markdown(
                    rows, dict(stats), problems, job_dir=self.job_dir, root=self.root, catalog=self.catalog
                ),
                "Summary of the openEO job run: what it came to, why rows failed, where the results are",
                once=True,
                on_parent=True,
            )
            self.reporter.artifact(
                f"{self._key}-pictures",
                "markdown",
                lambda: _pictures(rows, self.root),
                "Tiles by status, and jobs per backend over time",
                once=True,
            )
        except Exception as e:
            _log.warning(f"Could not prepare the run's artifacts: {e!r}")
        started = time.monotonic()
        self.unreported = self.reporter.close(self.flush_timeout)
        if self.unreported:
            _run_logger().warning(
                f"Could not report to Prefect within {time.monotonic() - started:.0f} s: {self.unreported}. "
                "The job database has every row's status and message."
            )


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _log


def all_rows(job_db: JobDatabaseInterface) -> pd.DataFrame:
    return job_db.get_by_status(statuses=list(ALL))


def status_table(df: pd.DataFrame) -> list[dict]:
    """Rows by backend and status, with costs so far, as a list of records."""
    if df.empty:
        return []
    backend = df["backend_name"].fillna("(none)") if "backend_name" in df.columns else "(none)"
    frame = pd.DataFrame({"backend": backend, "status": df["status"]})
    counts = frame.groupby(["backend", "status"]).size().unstack(fill_value=0)
    records = []
    for name, row in counts.iterrows():
        record: dict[str, Any] = {"backend": name}
        record.update({s: int(row.get(s, 0)) for s in ALL if row.get(s, 0)})
        mine = df[backend == name]
        if "costs" in df.columns:
            record["costs"] = round(float(pd.to_numeric(mine["costs"], errors="coerce").sum()), 3)
        for column in ("cpu", "memory", "duration"):  # usage so far, e.g. "1234.5 cpu-seconds"
            if column in df.columns and mine[column].notna().any():
                values = mine[column].dropna()
                unit = next((str(v).split(" ", 1)[1] for v in values if " " in str(v)), "")
                total = sum(n for n in (usage_number(v) for v in values) if n is not None)
                record[column] = f"{readable_number(total)} {unit}".strip()
        records.append(record)
    return records


def tile_bounds(row: pd.Series) -> str:
    """A row's tile as ``west, south, east, north`` (its ``geometry``, else those columns), to find it on the
    map and in the job database; "" without either."""
    geometry = row.get("geometry")
    if geometry is not None and hasattr(geometry, "bounds") and not getattr(geometry, "is_empty", True):
        bounds = geometry.bounds
    elif all(k in row.index for k in ("west", "south", "east", "north")):
        bounds = tuple(row[k] for k in ("west", "south", "east", "north"))
    else:
        return ""
    try:
        return ", ".join(f"{float(v):.4f}" for v in bounds)
    except (TypeError, ValueError):
        return ""


def _cell(value: Any, limit: int = SUMMARY_REASON) -> str:
    """A markdown table cell: one line, shortened, pipes escaped."""
    return shorten("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value), limit).replace(
        "|", "\\|"
    )


def result_link(name: str, location: Path | str) -> str:
    """Where results are, in markdown a browser can follow: a link for a web URL; the path or URL as text
    otherwise (a browser opens neither ``file://`` from a web page nor ``s3://``)."""
    if isinstance(location, str) and urlsplit(location).scheme in ("http", "https"):
        return f"[{name}]({location})"
    if isinstance(location, Path):
        location = str(location.resolve())
    return f"`{name}`: `{location}`"


def summary_markdown(
    df: pd.DataFrame,
    stats: dict,
    problems: dict,
    *,
    job_dir: Callable[[str], Path | str] | None = None,
    root: Path | str | None = None,
    catalog: Path | str | None = None,
) -> str:
    """A markdown summary: what the run came to, counts by status and backend, why rows failed (the backend's
    reasons), rows needing attention, where the results are (and their STAC collection), the run stats."""
    histogram = df["status"].value_counts().to_dict() if not df.empty else {}
    finished = df[df["status"] == "finished"] if "results" in df.columns and not df.empty else df.iloc[0:0]
    results = finished["results"].fillna("").value_counts().to_dict() if not finished.empty else {}
    lines = ["# openEO job run", "", f"**{RunOutcome(histogram, results).message}**", ""]
    lines += ["| status | rows |", "|---|---:|"]
    lines += [f"| {status} | {count} |" for status, count in sorted(histogram.items())]
    table = status_table(df)
    if table:
        columns = list(dict.fromkeys(k for record in table for k in record))
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, 0)) for c in columns) + " |" for r in table]
    failed = df[df["status"].isin(FAILED_STATUSES)] if not df.empty else df
    if not failed.empty:
        messages = failed["message"] if "message" in failed.columns else pd.Series(None, index=failed.index)
        reasons = messages.map(lambda m: _cell(m, MAX_REASON) or "(no reason recorded)")  # whole, as recorded
        lines += ["", "## Why rows failed", "", "| reason | rows |", "|---|---:|"]
        counted = reasons.value_counts()
        lines += [f"| {reason} | {count} |" for reason, count in counted.head(10).items()]
        if len(counted) > 10:
            lines.append(f"| ... {len(counted) - 10} more reasons | {int(counted.iloc[10:].sum())} |")
        shown = failed.head(SUMMARY_FAILED_LIMIT)
        tiles = {index: tile_bounds(row) for index, row in shown.iterrows()}
        tile_column = ["tile (W, S, E, N)"] if any(tiles.values()) else []  # to find the tile on the map
        header = ["row", *tile_column, "backend", "job", "status", "reason"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for index, row in shown.iterrows():
            cells = [
                index,
                *([tiles[index]] if tile_column else []),
                row.get("backend_name"),
                row.get("id"),
                row["status"],
            ]
            lines.append("| " + " | ".join(_cell(c, 60) for c in cells) + f" | {reasons[index]} |")
        if len(failed) > SUMMARY_FAILED_LIMIT:
            lines.append(
                f"\n... and {len(failed) - SUMMARY_FAILED_LIMIT} more: the job database's `message` column has "
                "every reason (`prefect-openeo status --json`)"
            )
    others = {i: m for i, m in problems.items() if i not in failed.index}
    if others:
        lines += ["", "## Rows needing attention", ""]
        lines += [f"- row {i}: {_cell(message, 300)}" for i, message in list(others.items())[:SUMMARY_LINK_LIMIT]]
    finished = df[df["status"] == "finished"] if not df.empty else df
    if job_dir is not None and not finished.empty:
        lines += ["", "## Results", ""]
        if catalog is not None:
            lines += [f"STAC collection: {result_link('collection.json', catalog)}", ""]
        for index, row in finished.head(SUMMARY_LINK_LIMIT).iterrows():
            lines.append(f"- row {index}: {result_link(row['id'], job_dir(row['id']))}")
        if len(finished) > SUMMARY_LINK_LIMIT:
            where = str(root.resolve()) if isinstance(root, Path) else root
            lines.append(f"- ... and {len(finished) - SUMMARY_LINK_LIMIT} more under `{where}`")
    lines += [
        "",
        f"Each job's task run is tagged `{JOB_TAG}` (and `backend:NAME`): filter the Task Runs tab by it.",
        "",
        "## Run stats",
        "",
        "```",
        *(f"{k}: {v}" for k, v in sorted(stats.items())),
        "```",
    ]
    return "\n".join(lines)


def _pictures(df: pd.DataFrame, root: Path | str | None) -> str:
    if isinstance(root, Path):
        return pictures_markdown(df, root)
    with tempfile.TemporaryDirectory(prefix="prefect-openeo-pictures-") as scratch:  # only embedded
        return pictures_markdown(df, scratch)


def pictures_markdown(df: pd.DataFrame, folder: Path | str) -> str:
    """The map of tiles by status (when rows have geometry) and the timeline, saved as PNG in ``folder``
    and embedded in markdown (data URIs), so the pictures show in the artifact without a file server."""
    from prefect_openeo.report import plot_map, plot_timeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    if hasattr(df, "geometry") and "geometry" in df.columns:
        pictures.append(("Tiles by status", plot_map(df, folder / "openeo-jobs-map.png")))
    pictures.append(("Jobs per backend over time", plot_timeline(df, folder / "openeo-jobs-timeline.png")))
    lines = []
    for title, path in pictures:
        data = base64.b64encode(path.read_bytes()).decode()
        lines += [f"## {title}", "", f"![{title}](data:image/png;base64,{data})", "", f"`{path.resolve()}`", ""]
    return "\n".join(lines)

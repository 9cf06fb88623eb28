"""What a flow run shows in the Prefect UI: one task run per job that follows the backend job's state,
a progress artifact, a table of rows by status and backend refreshed while the run goes, and a final
markdown summary with links to the downloaded results.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from openeo.extra.job_management import JobDatabaseInterface
from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.states import Cancelled, Completed, Failed, Pending, Running, State

from prefect_openeo.catalog import catalog_url
from prefect_openeo.engine import Observer
from prefect_openeo.report import usage_number
from prefect_openeo.states import ALL, TERMINAL

if TYPE_CHECKING:
    from prefect_openeo.manager import MultiBackendJobManager

_log = logging.getLogger("prefect_openeo")

#: How many finished rows the final summary links to, at most.
SUMMARY_LINK_LIMIT = 200


@task(name="openEO batch job")
def openeo_batch_job() -> None:
    """Never called: the task whose runs mirror openEO batch jobs in the UI."""


def prefect_state(status: str, message: str | None = None) -> State:
    """The Prefect state that shows a row's status in the UI."""
    if status in ("not_started", "created", "queued_for_start", "queued"):
        name = "".join(part.capitalize() for part in status.split("_"))
        return Pending(name=name)
    if status == "running":
        return Running()
    if status == "finished":
        return Completed(name="Finished")
    if status == "skipped":
        return Completed(name="Skipped")
    if status == "canceled":
        return Cancelled(name="Canceled")
    if status in ("error", "start_failed"):
        return Failed(name="Error" if status == "error" else "StartFailed", message=message)
    raise ValueError(f"Unknown status {status!r}")


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, numbers and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "openeo"


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
                record[column] = f"{total:g} {unit}".strip()
        records.append(record)
    return records


def all_rows(job_db: JobDatabaseInterface) -> pd.DataFrame:
    return job_db.get_by_status(statuses=list(ALL))


class PrefectObserver(Observer):
    """Feeds the UI of the current flow run from the engine's sweeps.

    The API calls go through one reporter thread, in order, never on the sweep's critical path: a Prefect
    server on SQLite answers some of them ``503`` (database locked), which its client retries after seconds.
    ``run_done`` waits for the reporter before the run's summary.
    """

    def __init__(self, manager: MultiBackendJobManager):
        context = FlowRunContext.get()
        self.manager = manager
        self.flow_run_id = context.flow_run.id if context and context.flow_run else None
        self._client = get_client(sync_client=True)
        self._client.__enter__()
        self._task_runs: dict[Any, Any] = {}
        self._progress_id = None
        self._last_histogram: dict | None = None
        self._key = artifact_key(f"openeo-jobs-{context.flow.name if context else 'run'}")
        self._reporter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefect-openeo-reporter")

    def _later(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the reporter thread, in the caller's context (settings, flow run)."""
        self._reporter.submit(contextvars.copy_context().run, fn, *args)

    def row_status(self, index: Any, row: pd.Series, status: str) -> None:
        self._later(self._row_status, index, row.copy(), status)

    def _row_status(self, index: Any, row: pd.Series, status: str) -> None:
        message = row.get("message") if hasattr(row, "get") else None
        state = prefect_state(status, message if isinstance(message, str) else None)
        self._emit(index, row, status)
        try:
            task_run_id = self._task_runs.get(index)
            if task_run_id is None:
                backend = row.get("backend_name") or "?"
                job_id = row.get("id")
                name = f"row {index} @ {backend}" + (f" ({job_id})" if isinstance(job_id, str) else "")
                task_run = self._client.create_task_run(
                    task=openeo_batch_job,
                    flow_run_id=self.flow_run_id,
                    dynamic_key=f"row-{index}",
                    name=name,
                    state=state,
                )
                self._task_runs[index] = task_run.id
            else:
                self._client.set_task_run_state(task_run_id, state, force=True)
        except Exception as e:  # the UI is a view: never let it break the run
            _log.warning(f"Could not update the Prefect state of row {index}: {e!r}")

    def _emit(self, index: Any, row: pd.Series, status: str) -> None:
        """An event per job transition, for Automations: ``openeo.job.<status>`` about
        ``openeo.job.<backend>.<job id>``."""
        backend = str(row.get("backend_name") or "none")
        job_id = row.get("id")
        job_id = job_id if isinstance(job_id, str) and job_id else f"row-{index}"
        related = []
        if self.flow_run_id is not None:
            related.append(
                {"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}", "prefect.resource.role": "flow-run"}
            )
        try:
            emit_event(
                event=f"openeo.job.{status}",
                resource={
                    "prefect.resource.id": f"openeo.job.{backend}.{job_id}",
                    "prefect.resource.name": f"row {index} @ {backend}",
                    "openeo.row": str(index),
                    "openeo.backend": backend,
                    "openeo.job_id": job_id,
                    "openeo.status": status,
                },
                related=related,
                payload={"message": row.get("message") if isinstance(row.get("message"), str) else None},
            )
        except Exception as e:
            _log.warning(f"Could not emit the event of row {index}: {e!r}")

    def sweep_done(self, job_db: JobDatabaseInterface, stats: dict) -> None:
        histogram = job_db.count_by_status()
        if histogram == self._last_histogram:
            return
        self._last_histogram = histogram
        total = sum(histogram.values())
        done = sum(v for k, v in histogram.items() if k in TERMINAL)
        progress = 100.0 * done / total if total else 100.0
        try:
            table = status_table(all_rows(job_db))
        except Exception as e:
            _log.warning(f"Could not update artifacts: {e!r}")
            return
        self._later(self._artifacts, progress, table)

    def _artifacts(self, progress: float, table: list[dict]) -> None:
        try:
            if self._progress_id is None:
                self._progress_id = create_progress_artifact(
                    progress=progress, key=f"{self._key}-progress", description="Rows ended / all rows"
                )
            else:
                update_progress_artifact(self._progress_id, progress)
            create_table_artifact(
                table=table,
                key=f"{self._key}-status",
                description="openEO job rows by backend and status (refreshed each sweep)",
            )
        except Exception as e:
            _log.warning(f"Could not update artifacts: {e!r}")

    def run_done(self, job_db: JobDatabaseInterface, stats: dict, problems: dict) -> None:
        try:
            self.sweep_done(job_db, stats)
        finally:
            self._reporter.shutdown(wait=True)  # the UI's last updates before the summary
        try:
            rows = all_rows(job_db)
            create_markdown_artifact(
                markdown=summary_markdown(self.manager, rows, stats, problems),
                key=f"{self._key}-summary",
                description="Summary of the openEO job run",
            )
        except Exception as e:
            _log.warning(f"Could not write the run summary: {e!r}")
        try:
            root = self.manager._root_dir
            with tempfile.TemporaryDirectory(prefix="prefect-openeo-pictures-") as scratch:
                create_markdown_artifact(  # object storage: drawn in a temporary folder, only embedded
                    markdown=pictures_markdown(rows, root if isinstance(root, Path) else scratch),
                    key=f"{self._key}-pictures",
                    description="Tiles by status, and jobs per backend over time",
                )
        except Exception as e:
            _log.warning(f"Could not draw the run's pictures: {e!r}")
        finally:
            self._client.__exit__(None, None, None)


def pictures_markdown(df: pd.DataFrame, folder) -> str:
    """The map of tiles by status (when rows have geometry) and the timeline, saved as PNG in ``folder``
    and embedded in markdown (data URIs), so the pictures show in the artifact without a file server."""
    import base64
    from pathlib import Path

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


def summary_markdown(manager: MultiBackendJobManager, df: pd.DataFrame, stats: dict, problems: dict) -> str:
    """A markdown summary: counts by status and backend, rows lacking results, links to results."""
    lines = ["# openEO job run", ""]
    histogram = df["status"].value_counts().to_dict() if not df.empty else {}
    lines.append("| status | rows |")
    lines.append("|---|---|")
    lines += [f"| {status} | {count} |" for status, count in sorted(histogram.items())]
    table = status_table(df)
    if table:
        columns = list(dict.fromkeys(k for record in table for k in record))
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r.get(c, 0)) for c in columns) + " |" for r in table]
    if problems:
        lines += ["", "## Rows needing attention", ""]
        lines += [f"- row {index}: {message}" for index, message in list(problems.items())[:SUMMARY_LINK_LIMIT]]
    finished = df[df["status"] == "finished"] if not df.empty else df
    if manager._download_results and not finished.empty:
        lines += ["", "## Results", "", f"STAC collection: [collection.json]({catalog_url(manager.result_store)})", ""]
        for index, row in finished.head(SUMMARY_LINK_LIMIT).iterrows():
            job_dir = manager.get_job_dir(row["id"])  # a Path, or a URL on object storage
            link = job_dir.resolve().as_uri() if isinstance(job_dir, Path) else job_dir
            lines.append(f"- row {index}: [{row['id']}]({link})")
        if len(finished) > SUMMARY_LINK_LIMIT:
            lines.append(f"- ... and {len(finished) - SUMMARY_LINK_LIMIT} more under `{manager._root_dir}`")
    lines += ["", "## Run stats", "", "```", *(f"{k}: {v}" for k, v in sorted(stats.items())), "```"]
    return "\n".join(lines)

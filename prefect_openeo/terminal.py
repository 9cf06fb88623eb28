"""What the terminal shows while ``run`` and ``demo`` work: live progress bars fed by the job database, and
log records printed above them.

Quiet by default: warnings and errors of prefect-openeo and openeo (errors only of other libraries), one
line each. Prefect's own
lines (a line per task run) go to the flow run's logs only; ``verbose`` shows them, with INFO records and
tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prefect_openeo.states import ALL as ALL_STATUSES
from prefect_openeo.states import TERMINAL


def is_prefect_record(name: str) -> bool:
    return name == "prefect" or name.startswith("prefect.")


class TerminalLog(logging.Handler):
    """Log records printed through ``console`` (above live progress bars), one line each unless verbose."""

    def __init__(self, console: Console, verbose: bool = False):
        super().__init__(logging.DEBUG if verbose else logging.WARNING)
        self.console = console
        self.verbose = verbose
        self.setFormatter(logging.Formatter("%(message)s"))

    def shows(self, record: logging.LogRecord) -> bool:
        """Quiet: warnings of prefect-openeo and openeo, errors of others; Prefect's lines are in the flow
        run's logs (its API handler), urllib3's retry notices are noise."""
        if is_prefect_record(record.name):
            return False
        if record.name.split(".")[0] in ("prefect_openeo", "openeo"):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self.verbose and not self.shows(record):
                return
            self.console.print(self.render(record), highlight=False, soft_wrap=True)
        except Exception:  # pragma: no cover - as logging.Handler.handleError
            self.handleError(record)

    def render(self, record: logging.LogRecord) -> str:
        """``warning: message``; verbose: as Prefect's console shows it, ``time | LEVEL | who - message``."""
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            if self.verbose:
                message += "\n" + self.formatter.formatException(record.exc_info)
            else:
                message += f": {record.exc_info[1]!r}"
        style = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}.get(record.levelname, "cyan")
        if not self.verbose:
            return f"[{style}]{record.levelname.lower()}:[/] {escape(message)}"
        if getattr(record, "task_run_name", None):
            who = f"Task run {record.task_run_name!r}"
        elif getattr(record, "flow_run_name", None):
            who = f"Flow run {record.flow_run_name!r}"
        else:
            who = record.name
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        return f"{when} | [{style}]{record.levelname:<7}[/] | {escape(who)} - {escape(message)}"


@contextlib.contextmanager
def terminal_logging(console: Console, verbose: bool = False) -> Iterator[TerminalLog]:
    """Route log records to ``console`` while the block runs, instead of Prefect's console handler."""
    handler = TerminalLog(console, verbose)
    root = logging.getLogger()
    removed = [h for h in root.handlers if type(h).__name__ == "PrefectConsoleHandler"]
    for h in removed:
        root.removeHandler(h)
    ours = logging.getLogger("prefect_openeo")
    level = ours.level
    if verbose:
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)
        for h in removed:
            root.addHandler(h)


def histogram(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


@contextlib.contextmanager
def progress_bars(
    console: Console, path: str | Path, total: int, backends: list[str] | None = None, interval: float = 0.5
) -> Iterator[None]:
    """Progress bars (all rows, and one per backend) fed by the job database while the block runs (its
    writes are atomic: it is read whole, never half-written); they show the final counts at the end."""
    stop = threading.Event()

    def counts_of() -> dict[str | None, dict[str, int]] | None:
        """Rows by status, for all rows (key None) and per backend; None while the database cannot be read."""
        from prefect_openeo.jobdb import get_job_db

        try:
            df = get_job_db(path).get_by_status(statuses=list(ALL_STATUSES))
            counts: dict[str | None, dict[str, int]] = {None: df["status"].value_counts().to_dict()}
            if "backend_name" in df.columns:  # (not yet in a new table: no row was placed)
                for name, group in df.groupby("backend_name"):
                    counts[name] = group["status"].value_counts().to_dict()
            return counts
        except Exception:
            return None

    def watch(progress: Progress) -> None:
        bars = {None: progress.add_task("", total=total, label="all jobs")}
        for name in backends or []:
            bars[name] = progress.add_task("", total=None, label=name)
        while True:
            final = stop.is_set()
            counts = counts_of()
            if counts is not None:
                for name, bar in bars.items():
                    mine = counts.get(name, {})
                    done = sum(v for k, v in mine.items() if k in TERMINAL)
                    size = total if name is None else sum(mine.values())
                    progress.update(bar, completed=done, description=histogram(mine), total=size)
            if final:
                break
            stop.wait(interval)

    progress = Progress(
        TextColumn("[bold]{task.fields[label]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        thread = threading.Thread(target=watch, args=(progress,), name="prefect-openeo-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)

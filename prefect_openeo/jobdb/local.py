"""The engine's row bookkeeping on a job database that one run works alone: any openeo
``JobDatabaseInterface`` (CSV, Parquet, or your own class).

It offers the same calls as the SQL job database's claims (``SqlJobDatabase``), without owners or leases:
the intent to create a job (token and planned backend) and the download state of its results are still
recorded in the rows, before the action they describe, so a rerun knows exactly what was under way.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import pandas as pd
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo.frames import column, set_cell
from prefect_openeo.jobdb.files import JobDatabaseError
from prefect_openeo.placement import assign_rows, free_slots, new_token
from prefect_openeo.states import ACTIVE, PENDING

TOKEN_COLUMN = "create_token"
PLANNED_COLUMN = "planned_backend"
RESULTS_COLUMN = "results"


def filled(values: pd.Series) -> pd.Series:
    """Which cells hold something (vectorized ``not blank``)."""
    return values.notna() & values.ne("")


def _none(df: pd.DataFrame) -> pd.Series:
    return pd.Series(False, index=df.index)


def unresolved_mask(df: pd.DataFrame) -> pd.Series:
    """``not_started`` rows with a recorded creation token."""
    if TOKEN_COLUMN not in df.columns:
        return _none(df)
    return df["status"].isin(PENDING) & filled(df[TOKEN_COLUMN])


def owed_results_mask(df: pd.DataFrame, state: str = "pending") -> pd.Series:
    """Finished rows whose results are in ``state``."""
    if RESULTS_COLUMN not in df.columns:
        return _none(df)
    return (df[RESULTS_COLUMN] == state) & (df["status"] == "finished")


class JobDatabaseBusy(JobDatabaseError):
    """Another run works on this job database (a CSV/Parquet file is worked by one run at a time)."""


def _lock(path: Path) -> IO | None:
    """Hold ``<file>.lock`` beside a local job database file exclusively (the operating system lets go of it
    when the process ends, however it ends); raise ``JobDatabaseBusy`` when another process holds it. None
    where there are no such locks (not POSIX). ``_unlock`` removes the file again."""
    try:
        import fcntl
    except ImportError:
        return None
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = lock.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JobDatabaseBusy(
                f"Another run is working on the job database {str(path)!r} ({holder}; lock file {lock.name})"
            ) from None
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the holder removed the file as we opened it: lock the new one instead
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def _unlock(handle: IO) -> None:
    """Remove the lock file, then let go of it (in this order, so no one locks a file that is going away)."""
    try:
        os.unlink(handle.name)
    except FileNotFoundError:
        pass
    handle.close()


class LocalRows:
    """Row claims on a job database worked by this run alone (a local file is locked for the run)."""

    shared = False

    def __init__(self, job_db: JobDatabaseInterface):
        self.job_db = job_db
        self.budgets: dict[str, int] = {}
        self._lock: IO | None = None

    def _table(self) -> pd.DataFrame | None:
        """The whole table where the job database keeps it in memory (openeo's file job databases do), to
        select from without copying it; None for other job databases."""
        df = getattr(self.job_db, "df", None)
        return df if isinstance(df, pd.DataFrame) and "status" in df.columns else None

    def _select(
        self, mask: Callable[[pd.DataFrame], pd.Series] | None, statuses: list[str], limit: int | None = None
    ) -> pd.DataFrame:
        """Rows (copied) with one of ``statuses`` where ``mask`` (if any) holds."""
        df = self._table()
        if df is None:
            df = self.job_db.get_by_status(statuses=statuses)
        where = df["status"].isin(statuses) if mask is None else mask(df)
        if mask is not None and where.any():
            where &= df["status"].isin(statuses)
        return df.loc[df.index[where.to_numpy()][:limit]].copy()

    def _count(self, mask: Callable[[pd.DataFrame], pd.Series], statuses: list[str]) -> int:
        df = self._table()
        if df is None:
            df = self.job_db.get_by_status(statuses=statuses)
        where = mask(df)
        return int((where & df["status"].isin(statuses)).sum()) if where.any() else 0

    def prepare_run(self, budgets: Mapping[str, int]) -> dict[str, int]:
        """Take the run's lock on a local file; give failed downloads another go; the budgets are this run's."""
        path = getattr(self.job_db, "path", None)
        if isinstance(path, Path) and self._lock is None:  # two runs on one file would create the same rows' jobs
            self._lock = _lock(path)
        self.budgets = dict(budgets)
        failed = self._select(lambda df: owed_results_mask(df, "failed"), ["finished"])
        if not failed.empty:
            failed[RESULTS_COLUMN] = "pending"
            self.job_db.persist(failed[[RESULTS_COLUMN]])
        return dict(budgets)

    # One run at a time, whose backends the rows were checked against: ``backends`` changes nothing.
    def claim_active(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        return self._select(None, list(ACTIVE))

    def claim_unresolved(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        return self._select(unresolved_mask, list(PENDING))

    def claim_new(self, caps: Mapping[str, int], order: list[str], max_rows: int = 200) -> pd.DataFrame:
        """Pick ``not_started`` rows for backends with free slots (their budget, at most ``caps``); record a
        token and the planned backend on each (persisted before any job is created) and return them."""
        budgets = {name: min(self.budgets.get(name, 0), caps.get(name, 0)) for name in order}
        active = self.claim_active()
        unresolved = self.claim_unresolved()
        free = free_slots(
            budgets,
            active["backend_name"].value_counts().to_dict() if not active.empty else {},
            column(unresolved, PLANNED_COLUMN).value_counts().to_dict(),
        )
        total = sum(max(0, f) for f in free.values())
        if total <= 0:
            return unresolved.iloc[0:0]
        candidates = self._select(lambda df: ~unresolved_mask(df), list(PENDING), limit=max(max_rows, 4 * total))
        plan = assign_rows(candidates, free, order)
        chosen = [(index, name) for name in order for index in plan.get(name, [])]
        if not chosen:
            return candidates.iloc[0:0]
        planned = candidates.loc[[i for i, _ in chosen]].copy()
        for index, name in chosen:
            set_cell(planned, index, TOKEN_COLUMN, new_token())
            set_cell(planned, index, PLANNED_COLUMN, name)
        self.job_db.persist(planned)
        return planned

    def unclaim(self, indices: Iterable[Any]) -> None:
        rows = self.job_db.get_by_indices(list(indices)).copy()
        for index in rows.index:
            set_cell(rows, index, TOKEN_COLUMN, None)
            set_cell(rows, index, PLANNED_COLUMN, None)
        if not rows.empty:
            self.job_db.persist(rows)

    def claim_downloads(self, limit: int, exclude: Iterable[Any] = (), backends: Iterable[str] = ()) -> pd.DataFrame:
        excluded, names = list(exclude), list(backends)

        def owed(df: pd.DataFrame) -> pd.Series:
            mask = owed_results_mask(df)
            if not mask.any():
                return mask
            mask &= ~df.index.isin(excluded)
            return mask & df["backend_name"].isin(names) if names else mask

        return self._select(owed, ["finished"], limit=max(0, limit))

    def work_left(self, statuses: list[str], backends: Iterable[str]) -> int:
        """Rows with one of ``statuses`` (every backend's: one run at a time, checked against its backends)."""
        return sum(self.job_db.count_by_status(statuses=statuses).values())

    def pending_downloads(self, backends: Iterable[str] = ()) -> int:
        names = list(backends)

        def owed(df: pd.DataFrame) -> pd.Series:
            mask = owed_results_mask(df)
            return mask & df["backend_name"].isin(names) if names and mask.any() else mask

        return self._count(owed, ["finished"])

    def release(self, keep: Iterable[Any] = ()) -> None:
        """Let go of the run's lock on the file."""
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

"""The job store of a job database that one run works alone: any openeo ``JobDatabaseInterface`` (CSV,
Parquet, STAC API, or your own class), adapted to the ``JobStore`` protocol.

Its claims select rows without owners or leases (one run at a time: a local file is locked for the run);
the intent to create a job (token and planned backend) and the download state of its results are still
recorded in the rows, before the action they describe, so a rerun knows exactly what was under way.
A patch is applied to the row as the job database holds it; where the job database does not return a row
the run holds (some do not read their rows back by index), to the row as the run holds it; a row neither
has is a ``JobDatabaseError``: the job database lost it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo import transitions
from prefect_openeo.frames import column, stack
from prefect_openeo.jobdb.errors import JobDatabaseBusy, JobDatabaseError
from prefect_openeo.placement import assign_rows, free_slots, new_token, unregistered
from prefect_openeo.schema import PLANNED, RESULTS, TOKEN
from prefect_openeo.states import ACTIVE, PENDING
from prefect_openeo.transitions import Patch


def filled(values: pd.Series) -> pd.Series:
    """Which cells hold something (vectorized ``not blank``)."""
    return values.notna() & values.ne("")


def _none(df: pd.DataFrame) -> pd.Series:
    return pd.Series(False, index=df.index)


def unresolved_mask(df: pd.DataFrame) -> pd.Series:
    """``not_started`` rows with a recorded creation token."""
    if TOKEN not in df.columns:
        return _none(df)
    return df["status"].isin(PENDING) & filled(df[TOKEN])


def owed_results_mask(df: pd.DataFrame, state: str = "pending") -> pd.Series:
    """Finished rows whose results are in ``state``."""
    if RESULTS not in df.columns:
        return _none(df)
    return (df[RESULTS] == state) & (df["status"] == "finished")


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


class InterfaceStore:
    """The ``JobStore`` of a job database worked by this run alone (a local file is locked for the run)."""

    shared = False
    across_machines = False

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
        self.apply([transitions.download_again(row, index) for index, row in failed.iterrows()], failed)
        return dict(budgets)

    # One run at a time, whose backends the rows were checked against: ``backends`` changes nothing.
    def claim_active(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        """Active rows; first, each sweep, an edit of the file by someone else is read in (``reload_if_changed``
        of prefect-openeo's file job databases), so a row added or set ``skipped`` meanwhile counts."""
        reload = getattr(self.job_db, "reload_if_changed", None)
        if reload is not None:
            reload()
        return self._select(None, list(ACTIVE))

    def claim_unresolved(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        return self._select(unresolved_mask, list(PENDING))

    def claim_new(
        self,
        caps: Mapping[str, int],
        order: list[str],
        max_rows: int = 200,
        new_at_most: Mapping[str, int] | None = None,
    ) -> pd.DataFrame:
        """Pick ``not_started`` rows for backends with free slots (their budget, at most ``caps``; at most
        ``new_at_most`` new rows per backend); record a token and the planned backend on each (persisted
        before any job is created) and return them."""
        budgets = {name: min(self.budgets.get(name, 0), caps.get(name, 0)) for name in order}
        active = self.claim_active()
        unresolved = self.claim_unresolved()
        free = free_slots(
            budgets,
            active["backend_name"].value_counts().to_dict() if not active.empty else {},
            column(unresolved, PLANNED).value_counts().to_dict(),
        )
        free = {name: min(f, (new_at_most or {}).get(name, f)) for name, f in free.items()}
        total = sum(max(0, f) for f in free.values())
        if total <= 0:
            return unresolved.iloc[0:0]
        candidates = self._select(lambda df: ~unresolved_mask(df), list(PENDING), limit=max(max_rows, 4 * total))
        plan = assign_rows(candidates, free, order)
        chosen = [(index, name) for name in order for index in plan.get(name, [])]
        if not chosen:
            return candidates.iloc[0:0]
        planned = candidates.loc[[i for i, _ in chosen]].copy()
        patches = [transitions.planned(planned.loc[index], index, name, new_token()) for index, name in chosen]
        for patch in patches:
            transitions.apply_to(planned, patch)
        self.apply(patches, planned)
        return planned

    def unclaim(self, indices: Iterable[Any], held: pd.DataFrame | None = None) -> None:
        rows = self._rows(list(indices), held)
        self.apply([transitions.unplanned(row, index) for index, row in rows.iterrows()], held)

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

    def waiting_rows(self) -> dict[str, int]:
        df = self._table()
        if df is None:
            df = self.job_db.get_by_status(statuses=["not_started"])
        mask = df["status"] == "not_started"
        if TOKEN in df.columns:
            mask &= column(df, TOKEN).isna()
        names = column(df, "backend_name")[mask].fillna("").astype(str)
        return {str(k): int(n) for k, n in names.value_counts().items()}

    def count_results(self) -> dict[str, int]:
        df = self._table()
        if df is None:
            df = self.job_db.get_by_status(statuses=["finished"])
        finished = df[df["status"] == "finished"]
        if RESULTS not in finished.columns:
            return {"": len(finished)} if len(finished) else {}
        return {str(k): int(n) for k, n in finished[RESULTS].fillna("").value_counts().items()}

    def unknown_backends(self, statuses: list[str], known: list[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` naming a backend not in ``known`` (one run at a time: nobody tends them)."""
        return unregistered(self._select(None, statuses), known)

    def held_by_run(self, run: str, statuses: Iterable[str]) -> pd.DataFrame:
        """Rows with one of ``statuses``: one run at a time works this job database, so every such row is the
        last run's."""
        return self._select(None, list(statuses))

    def _rows(self, indices: list, held: pd.DataFrame | None) -> pd.DataFrame:
        """The rows at ``indices`` as the job database holds them, else as the run holds them (``held``)."""
        return self._stored_rows(indices, held)[0]

    def _stored_rows(self, indices: list, held: pd.DataFrame | None) -> tuple[pd.DataFrame, set]:
        """``_rows``, and which of them the job database returned (the others are the run's own copies)."""
        if not indices:
            return pd.DataFrame(), set()
        df = self._table()
        stored = df.loc[df.index.intersection(indices)] if df is not None else self.job_db.get_by_indices(indices)
        missing = [i for i in indices if i not in stored.index]
        returned = set(stored.index)
        if missing:
            if held is None or any(i not in held.index for i in missing):
                lost = [i for i in missing if held is None or i not in held.index]
                raise JobDatabaseError(
                    f"Job database {self.job_db!r} does not return row(s) {lost[:10]} that this run works on: "
                    "it lost them or hides them (get_by_indices); nothing was written"
                )
            stored = stack(stored, held.loc[missing])
        return stored.loc[[i for i in indices if i in stored.index]], returned

    def apply(self, patches: Sequence[Patch], held: pd.DataFrame | None = None) -> list:
        """Write the patched rows, once: each patch's cells on the row as stored (or as held, see above), where
        the stored row still has the status the patch expects (someone may have set it ``skipped`` meanwhile,
        in the file); returns the rows written."""
        merged = transitions.merge(patches)
        changed = [index for index, patch in merged.items() if patch]
        if not changed:
            return []
        rows, returned = self._stored_rows(changed, held)
        landed = [
            index
            for index in changed
            if index not in returned or merged[index].expect in (None, rows.at[index, "status"])
        ]
        if not landed:
            return []
        rows = rows.loc[landed].copy()
        for index in landed:
            transitions.apply_to(rows, merged[index])
        self.job_db.persist(rows)
        return landed

    def release(self, keep: Iterable[Any] = ()) -> None:
        """Let go of the run's lock on the file."""
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

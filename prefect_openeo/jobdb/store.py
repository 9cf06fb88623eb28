"""The job store: what the engine needs of a job database, declared.

A job store is the single record of every row's progress. The engine reads the rows to work on through
``claim_*`` (on a shared store they are taken for this worker, with a lease; on a store one run works alone
they are simply selected) and changes rows only through ``apply``, with ``transitions.Patch`` objects.
``SqlJobDatabase`` is a job store itself; any other openeo ``JobDatabaseInterface`` (CSV, Parquet, STAC API,
your own class) is wrapped in ``InterfaceStore`` (``prefect_openeo.jobdb.open_store``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import pandas as pd
from openeo.extra.job_management import JobDatabaseInterface

from prefect_openeo.jobdb.local import InterfaceStore
from prefect_openeo.transitions import Patch


@runtime_checkable
class JobStore(Protocol):
    """The engine's view of a job database."""

    #: Whether several workers may work the store at once (rows are claimed with leases).
    shared: bool
    #: Whether workers on other machines can reach it too (a database server, not a file on one disk).
    across_machines: bool

    @property
    def job_db(self) -> JobDatabaseInterface:
        """The job database itself (counts, reads for reports)."""
        ...

    def prepare_run(self, budgets: Mapping[str, int]) -> dict[str, int]:
        """Start of a run: take what the run needs (a file's lock), give failed downloads another go; returns
        the budget per backend that applies."""
        ...

    def claim_active(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        """Active rows (on ``backends``, or on none) for this run to track."""
        ...

    def claim_unresolved(self, backends: Iterable[str] | None = None) -> pd.DataFrame:
        """``not_started`` rows with a recorded creation token (planned on ``backends``, or on none)."""
        ...

    def claim_new(
        self,
        caps: Mapping[str, int],
        order: list[str],
        max_rows: int = 200,
        new_at_most: Mapping[str, int] | None = None,
    ) -> pd.DataFrame:
        """``not_started`` rows for the free slots of each backend (at most ``caps`` active; at most
        ``new_at_most`` new ones), with their token and ``planned_backend`` recorded before they are
        returned."""
        ...

    def unclaim(self, indices: Iterable[Any], held: pd.DataFrame | None = None) -> None:
        """Planned rows whose creation did not begin: their token and planned backend cleared."""
        ...

    def claim_downloads(self, limit: int, exclude: Iterable[Any] = (), backends: Iterable[str] = ()) -> pd.DataFrame:
        """Up to ``limit`` finished rows whose results are owed (``results = pending``)."""
        ...

    def pending_downloads(self, backends: Iterable[str] = ()) -> int: ...

    def waiting_rows(self) -> dict[str, int]:
        """``not_started`` rows not claimed yet, by the backend they are pinned to (``""``: none)."""
        ...

    def count_results(self) -> dict[str, int]:
        """Finished rows by the state of their result download (``results``; blank: ``""``)."""
        ...

    def work_left(self, statuses: list[str], backends: Iterable[str]) -> int:
        """Rows with one of ``statuses`` that a worker with ``backends`` may work on."""
        ...

    def unknown_backends(self, statuses: list[str], known: list[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` naming a backend not in ``known`` that nobody else tends."""
        ...

    def held_by_run(self, run: str, statuses: Iterable[str]) -> pd.DataFrame:
        """Rows with one of ``statuses`` that the run named ``run`` holds or last held."""
        ...

    def apply(self, patches: Sequence[Patch], held: pd.DataFrame | None = None) -> list:
        """Apply patches (a row's several ones in order); returns the indices whose patch landed. ``held``: the
        rows as this run holds them (patched), for stores that cannot read a row back."""
        ...

    def release(self, keep: Iterable[Any] = ()) -> None:
        """End of a run: give up every claim but those of ``keep``."""
        ...


def for_worker(job_db: JobDatabaseInterface, worker_id: str) -> JobDatabaseInterface:
    """The job database opened for a named worker's runs (e.g. a flow run's id), recorded in the ``owner`` of
    the rows it holds, where the job database records owners (``SqlJobDatabase``); else as it is."""
    from prefect_openeo.jobdb.sql import SqlJobDatabase

    return (
        SqlJobDatabase(job_db.url, job_db.table_name, worker_id=worker_id)
        if isinstance(job_db, SqlJobDatabase)
        else job_db
    )


def open_store(job_db: JobDatabaseInterface) -> JobStore:
    """The job store of a job database: itself where it is one (``SqlJobDatabase``), else its adapter."""
    return job_db if isinstance(job_db, JobStore) else InterfaceStore(job_db)

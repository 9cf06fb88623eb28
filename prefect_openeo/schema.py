"""Every column of a job database: openeo's, prefect-openeo's own and the workers', with their dtypes.

The rules:

- openeo's ``MultiBackendJobManager`` columns (``UPSTREAM``) are in every job frame, with openeo's dtypes and
  defaults (``COLUMN_REQUIREMENTS.normalize_df``); ``status`` starts as ``not_started``.
- prefect-openeo's bookkeeping (``OURS``) is added to a row when a transition first writes it; a job
  database made by openeo's manager is therefore one of ours as it is.
- ``WORKER`` columns say who holds a row of a shared (SQL) job database; they never show in a dataframe.
- A usage field a backend reports (``usage.cpu``, ``usage.memory``, ...) becomes a column of the same name,
  except where that name is a bookkeeping column (``usage_column_allowed``): a backend never overwrites them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

STATUS = "status"
ID = "id"
BACKEND = "backend_name"
START_TIME = "start_time"
RUNNING_START_TIME = "running_start_time"
COSTS = "costs"
#: Usage columns as openeo writes them ("1234.5 cpu-seconds"); a backend may report more.
USAGE = ("cpu", "memory", "duration")

#: Why a row needs attention (a failure's reason, a retry's history); cleared when the row succeeds.
MESSAGE = "message"
#: The creation token: recorded before a job is created, and ending the job's title.
TOKEN = "create_token"
#: The backend a recorded creation is planned on (it holds that backend's slot until reconciled).
PLANNED = "planned_backend"
#: A finished job's result download: pending, done, failed or gone.
RESULTS = "results"
RETRY_COUNT = "retry_count"
RETRY_AFTER = "retry_after"

OWNER = "owner"
LEASE_UNTIL = "lease_until"


@dataclass(frozen=True)
class Column:
    dtype: str
    default: Any = None


#: openeo's columns, as its ``MultiBackendJobManager._column_requirements`` declares them.
UPSTREAM: Mapping[str, Column] = {
    ID: Column("str"),
    BACKEND: Column("str"),
    STATUS: Column("str", "not_started"),
    START_TIME: Column("str"),
    RUNNING_START_TIME: Column("str"),
    COSTS: Column("float64"),
}
#: prefect-openeo's own bookkeeping columns.
OURS: Mapping[str, Column] = {
    MESSAGE: Column("str"),
    TOKEN: Column("str"),
    PLANNED: Column("str"),
    RESULTS: Column("str"),
    RETRY_COUNT: Column("Int64"),
    RETRY_AFTER: Column("str"),
}
WORKER: Mapping[str, Column] = {OWNER: Column("str"), LEASE_UNTIL: Column("float64")}

#: Columns the manager and the job databases fill themselves: a user's own columns must be named otherwise.
BOOKKEEPING: tuple[str, ...] = (*UPSTREAM, *USAGE, *OURS, *WORKER)
#: Results states.
RESULTS_STATES = ("pending", "done", "failed", "gone")


def usage_column_allowed(key: str) -> bool:
    """Whether a usage field reported by a backend may be written to the column of its name."""
    return key in USAGE or key not in BOOKKEEPING


class ColumnRequirements:
    """openeo's column requirements (``MultiBackendJobManager._column_requirements``), declared here."""

    def __init__(self, requirements: Mapping[str, Column]):
        self._requirements = dict(requirements)

    def __contains__(self, column: str) -> bool:
        return column in self._requirements

    def normalize_df(self, df: pd.DataFrame) -> pd.DataFrame:
        """A new frame with every required column (missing ones at their default)."""
        return df.assign(**{c: r.default for c, r in self._requirements.items() if c not in df.columns})

    def dtype_mapping(self) -> dict[str, str]:
        """Column to dtype, e.g. for ``pandas.read_csv(dtype=...)``."""
        return {c: r.dtype for c, r in self._requirements.items()}


COLUMN_REQUIREMENTS = ColumnRequirements(UPSTREAM)

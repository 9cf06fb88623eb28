"""Checks of a job database's table, done once where a run opens it (``read``/``persist`` take any table, as
openeo's do): ``check_job_frame`` says what the manager cannot run, ``normalize_job_frame`` adds the optional
bookkeeping columns."""

from __future__ import annotations

import pandas as pd
from openeo.util import rfc3339

from prefect_openeo.jobdb.errors import JobDatabaseError
from prefect_openeo.schema import STATUS, UPSTREAM
from prefect_openeo.states import ALL

__all__ = ["OPTIONAL_COLUMNS", "check_job_frame", "normalize_job_frame", "not_numbers"]

#: Bookkeeping columns a job database may lack: ``normalize_job_frame`` adds them (empty) for a run.
OPTIONAL_COLUMNS = tuple(c for c in UPSTREAM if c != STATUS)


def _where(df: pd.DataFrame, mask: pd.Series) -> str:
    rows = [str(i) for i in df.index[mask.to_numpy()][:5]]
    more = int(mask.sum()) - len(rows)
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(rows)}" + (f" and {more} more" if more > 0 else "")


def check_job_frame(df: pd.DataFrame, *, source: str) -> None:
    """Raise a ``JobDatabaseError`` naming the file, rows and column for a frame the manager cannot run.

    Called once where a run opens a job database (``read``/``persist`` take any table, as openeo's do).
    """
    where = f"Job database {source!r}"
    if df.columns.duplicated().any():
        raise JobDatabaseError(f"{where}: duplicate column names {sorted(set(df.columns[df.columns.duplicated()]))}")
    if "status" not in df.columns:
        raise JobDatabaseError(
            f"{where} has no 'status' column (columns: {', '.join(map(str, df.columns[:8]))}); "
            "is it a job database? Create one from a table of rows with create_job_db(path, df)."
        )
    if not df.index.is_unique:
        dups = sorted({str(i) for i in df.index[df.index.duplicated()]})[:5]
        raise JobDatabaseError(f"{where}: duplicate index values {dups}")
    status = df["status"]
    blank = status.isna()
    if blank.any():
        raise JobDatabaseError(f"{where}: column 'status' is empty at {_where(df, blank)}")
    text = status.astype(str)
    unknown_mask = ~text.isin(ALL)
    if unknown_mask.any():
        unknown = sorted(set(text[unknown_mask]))[:5]
        raise JobDatabaseError(
            f"{where}: column 'status' has unknown values {unknown} at {_where(df, unknown_mask)} "
            f"(allowed: {', '.join(ALL)})"
        )
    for column in ("id", "backend_name"):
        if column in df.columns:
            values = df[column]
            bad = values.notna() & ~values.map(lambda v: isinstance(v, str))
            if bad.any():
                raise JobDatabaseError(
                    f"{where}: column {column!r} must hold text, found {_plain(values[bad].iloc[0])!r} "
                    f"at {_where(df, bad)}"
                )
    if "running_start_time" in df.columns:  # used to cancel jobs running too long
        values = df["running_start_time"]
        bad = (status == "running") & values.notna() & (values.astype(str) != "") & ~values.map(_is_timestamp)
        if bad.any():
            raise JobDatabaseError(
                f"{where}: column 'running_start_time' must hold RFC 3339 times, found {values[bad].iloc[0]!r} "
                f"at {_where(df, bad)}"
            )
    if "costs" in df.columns:
        problem = not_numbers(df, "costs")
        if problem:
            raise JobDatabaseError(f"{where}: {problem}")
    active = status.isin(["created", "queued_for_start", "queued", "running"])
    if "backend_name" not in df.columns and active.any():
        raise JobDatabaseError(f"{where}: active rows without a 'backend_name' column at {_where(df, active)}")


def not_numbers(df: pd.DataFrame, column: str) -> str | None:
    """What is wrong with ``df[column]`` if some value in it is not a number, else None."""
    values = df[column]
    bad = values.notna() & pd.to_numeric(values, errors="coerce").isna()
    if not bad.any():
        return None
    return f"column {column!r} must hold numbers, found {values[bad].iloc[0]!r} at {_where(df, bad)}"


def _plain(value):
    """numpy scalars as plain Python values, for messages."""
    return value.item() if hasattr(value, "item") else value


def _is_timestamp(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        rfc3339.parse_datetime(value)
        return True
    except Exception:
        return False


def normalize_job_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing optional bookkeeping columns (empty) in place, as ``initialize_from_df`` would have."""
    missing = [c for c in OPTIONAL_COLUMNS if c not in df.columns]
    for column in missing:
        df[column] = pd.Series([None] * len(df), index=df.index, dtype=object)
    return df

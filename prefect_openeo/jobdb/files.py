"""CSV and Parquet job databases that never lose what they held: drop-ins for openeo's.

``AtomicCsvJobDatabase``/``AtomicParquetJobDatabase`` subclass openeo's ``CsvJobDatabase``/
``ParquetJobDatabase``: same file formats, same ``read`` (any table, WKT geometries decoded, GeoParquet
kept), same ``persist``/``initialize_from_df``/``get_by_status``/``count_by_status``. ``read`` and
``persist`` do not judge the table's shape: the manager checks it once, with ``check_job_frame``, when it
opens a job database to run it. Deliberate differences from openeo's classes:

- Atomic writes: ``persist`` writes a temporary file beside the job database, fsyncs and renames it over
  the file, so a crash or a full disk leaves the previous version intact (openeo rewrites in place).
- Never fewer rows: ``persist`` raises ``JobDatabaseError`` instead of writing fewer rows than the file
  held when this object last read or wrote it.
- Clear errors: a file that cannot be read (empty, binary noise, truncated Parquet, unclosed quote, a
  folder) raises ``JobDatabaseError`` (a ``ValueError``) naming the file, chained to pandas' or pyarrow's
  error; a typed column that does not parse names the column, value and row. A missing file still raises
  ``FileNotFoundError``.
- Merge, not replace: ``persist`` on an object that has not read its file yet merges the given rows into
  what the file holds (openeo's would write the given rows alone and lose the others). Rows with index
  values the database does not have are added (openeo's merge drops them).
- Cleared cells are cleared: an empty value (None/NaN) in a persisted row empties that cell (openeo's
  merge skips empty values, so a cleared job id would stay).
- The class names differ, so ``repr`` reads ``AtomicCsvJobDatabase('jobs.csv')``.

``get_job_db``/``create_job_db`` return these classes, SQL job databases for ``.db``/``.sqlite`` paths and
SQLAlchemy URLs, and for object-storage URLs (``s3://bucket/prefix/jobs.parquet``) the same classes with the file
in object storage (``remote.py``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd
from openeo.extra.job_management import (
    CsvJobDatabase,
    JobDatabaseInterface,
    ParquetJobDatabase,
)
from openeo.extra.job_management._manager import MultiBackendJobManager as _UpstreamManager
from openeo.util import rfc3339

from prefect_openeo.states import ALL


class JobDatabaseError(ValueError):
    """A job database that cannot be used as it is; the message names the file and what is wrong."""


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename over ``path``; ``path`` is intact if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class _AtomicMixin:
    """Shared by the CSV and Parquet flavours: atomic persist, row-count guard, clear read errors."""

    path: Path
    _df: pd.DataFrame | None
    _rows_read: int = 0
    _swept: bool = False

    def _write(self, df: pd.DataFrame, tmp: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_file(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self) -> pd.DataFrame:
        """The whole table, as openeo's class reads it; ``JobDatabaseError`` naming the file if unreadable."""
        try:
            df = self._read_file()
        except (FileNotFoundError, JobDatabaseError):
            raise
        except Exception as e:
            raise JobDatabaseError(f"Job database {str(self.path)!r} cannot be read: {e}") from e
        self._rows_read = max(self._rows_read, len(df))
        return df

    def _merge_into_df(self, df: pd.DataFrame) -> None:
        """Merge rows into the loaded frame, empty values included (openeo's merge skips them, so a
        cleared cell would keep its old value), adding new columns and new rows."""
        if self._df is None:
            self._df = df.copy()
            return
        new_rows = df.index.difference(self._df.index)
        if len(new_rows):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._df = pd.concat([self._df, df.loc[new_rows]])
        known = df.index.intersection(self._df.index).difference(new_rows)
        if not len(known):
            return
        for column in df.columns:
            values = df.loc[known, column]
            if column not in self._df.columns:
                self._df[column] = pd.Series([None] * len(self._df), index=self._df.index, dtype=object)
            target = self._df[column]
            if (
                target.dtype != values.dtype
                and not (pd.api.types.is_numeric_dtype(target.dtype) and pd.api.types.is_numeric_dtype(values.dtype))
                and column != getattr(self._df, "_geometry_column_name", None)
            ):
                self._df[column] = target.astype(object)
            self._df.loc[known, column] = values

    def persist(self, df: pd.DataFrame) -> None:
        if not self._swept:  # temp files of a writer that was killed mid-write
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            self._swept = True
        if self._df is None and self.exists():
            # Persisting rows into a database object that has not read its file yet: merge them into what
            # the file holds (openeo's classes would write the given rows alone, losing the others).
            self._df = self.read()
        self._merge_into_df(df)  # type: ignore[attr-defined]
        full = self.df  # type: ignore[attr-defined]
        if len(full) < self._rows_read:
            raise JobDatabaseError(
                f"Refusing to write {len(full)} rows to {str(self.path)!r}, which held {self._rows_read}"
            )
        atomic_write(self.path, lambda tmp: self._write(full, tmp))
        self._rows_read = len(full)


class AtomicCsvJobDatabase(_AtomicMixin, CsvJobDatabase):
    """openeo's ``CsvJobDatabase``, persisted atomically (see the module docstring for the differences)."""

    def _read_file(self) -> pd.DataFrame:
        return self._parse(self.path)

    def _parse(self, path: Path) -> pd.DataFrame:
        """openeo's reading of the CSV file at ``path``; errors name this job database."""
        try:
            return CsvJobDatabase(path).read()
        except ValueError as e:
            problem = _unparsable_number(path)
            if problem:
                raise JobDatabaseError(f"Job database {str(self.path)!r}: {problem}") from e
            raise

    def _write(self, df: pd.DataFrame, tmp: Path) -> None:
        df.to_csv(tmp, index=False)


class AtomicParquetJobDatabase(_AtomicMixin, ParquetJobDatabase):
    """openeo's ``ParquetJobDatabase``, persisted atomically (see the module docstring for the differences)."""

    def _read_file(self) -> pd.DataFrame:
        return self._parse(self.path)

    def _parse(self, path: Path) -> pd.DataFrame:
        """openeo's reading of the Parquet/GeoParquet file at ``path``."""
        return ParquetJobDatabase(path).read()

    def _write(self, df: pd.DataFrame, tmp: Path) -> None:
        df.to_parquet(tmp, index=False)


#: Bookkeeping columns a job database may lack: ``normalize_job_frame`` adds them (empty) for a run.
OPTIONAL_COLUMNS = ("id", "backend_name", "start_time", "running_start_time", "costs")


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
        problem = _not_numbers(df, "costs")
        if problem:
            raise JobDatabaseError(f"{where}: {problem}")
    active = status.isin(["created", "queued_for_start", "queued", "running"])
    if "backend_name" not in df.columns and active.any():
        raise JobDatabaseError(f"{where}: active rows without a 'backend_name' column at {_where(df, active)}")


def _not_numbers(df: pd.DataFrame, column: str) -> str | None:
    """What is wrong with ``df[column]`` if some value in it is not a number, else None."""
    values = df[column]
    bad = values.notna() & pd.to_numeric(values, errors="coerce").isna()
    if not bad.any():
        return None
    return f"column {column!r} must hold numbers, found {values[bad].iloc[0]!r} at {_where(df, bad)}"


def _unparsable_number(path: Path) -> str | None:
    """Why openeo's CSV read failed, if a column it reads as numbers holds text (read as text to say where)."""
    numeric = [
        column
        for column, dtype in _UpstreamManager._column_requirements.dtype_mapping().items()
        if pd.api.types.is_numeric_dtype(pd.api.types.pandas_dtype(dtype))
    ]
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception:
        return None
    return next((problem for c in numeric if c in df.columns and (problem := _not_numbers(df, c))), None)


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


_UPGRADES = {CsvJobDatabase: AtomicCsvJobDatabase, ParquetJobDatabase: AtomicParquetJobDatabase}


SQL_SUFFIXES = (".db", ".sqlite", ".sqlite3")

#: What ``get_job_db`` accepts, for its error messages.
ACCEPTED = (
    "a local .csv, .parquet, .geoparquet or .db/.sqlite path; file:///path/jobs.csv; a .csv/.parquet/.geoparquet "
    "file in object storage (s3://bucket/prefix/jobs.parquet, gs://, az://, memory://); or an SQLAlchemy URL "
    "(sqlite:///jobs.db, postgresql+psycopg://user@host/db)"
)


def get_job_db(path: str | Path, *, storage_options: Any = None) -> JobDatabaseInterface:
    """Like openeo's ``get_job_db``, returning the atomic flavours (``.csv``, ``.parquet``, ``.geoparquet``).

    URLs are routed by scheme: an SQLAlchemy URL (``dialect[+driver]://``) is a SQL job database; an
    object-storage URL (``s3://``, ``gs://``, ``az://``, ``memory://``) of a CSV/Parquet file is the file in object
    storage (``prefect_openeo.jobdb.remote``), with ``storage_options`` (fsspec options or a prefect-aws
    ``AwsCredentials``/``MinIOCredentials`` block); ``file://`` is a local path. Any other URL is a
    ``JobDatabaseError`` that names it and what is accepted.
    """
    if isinstance(path, str) and "://" in path:
        return _from_url(path, storage_options)
    text = str(path)
    from prefect_openeo.storage import _MANGLED_URL, SCHEMES

    mangled = _MANGLED_URL.match(text)
    if mangled and mangled.group(1).lower() in (*SCHEMES, "file"):
        scheme = mangled.group(1)
        raise JobDatabaseError(
            f"Job database {text!r} looks like a URL whose '//' was lost (pathlib.Path collapses it): "
            f"pass it as a string, e.g. {scheme}://{text[len(scheme) + 2 :]}"
        )
    if storage_options is not None:
        raise JobDatabaseError(f"storage_options given for the local job database {text!r}: they are for URLs")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SQL_SUFFIXES:
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase(path)
    if suffix == ".csv":
        return AtomicCsvJobDatabase(path)
    if suffix in (".parquet", ".geoparquet"):
        return AtomicParquetJobDatabase(path)
    raise JobDatabaseError(
        f"Could not guess job database type from {str(path)!r} (use .csv, .parquet, .geoparquet, .db/.sqlite, "
        "or an SQLAlchemy URL such as postgresql+psycopg://..., or a .csv/.parquet/.geoparquet file in object "
        "storage such as s3://bucket/prefix/jobs.parquet)"
    )


def _from_url(url: str, storage_options: Any) -> JobDatabaseInterface:
    """The job database at a URL, by its scheme (see ``get_job_db``)."""
    from prefect_openeo.storage import SCHEMES

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise JobDatabaseError(f"Job database {url!r}: a file:// URL names a local path (file:///path/jobs.csv)")
        return get_job_db(Path(url2pathname(parts.path)), storage_options=storage_options)
    if scheme in SCHEMES:
        from prefect_openeo.jobdb.remote import open_remote_job_db

        return open_remote_job_db(url, storage_options)
    if _is_sqlalchemy_url(url):
        if storage_options is not None:
            raise JobDatabaseError(f"storage_options given for the SQL job database {url!r}: they are for files")
        from prefect_openeo.jobdb.sql import SqlJobDatabase

        return SqlJobDatabase(url)
    raise JobDatabaseError(
        f"Job database {url!r}: {scheme!r} is neither an SQLAlchemy dialect nor an object store. Use {ACCEPTED}"
    )


def _is_sqlalchemy_url(url: str) -> bool:
    """Whether ``url``'s scheme names an SQLAlchemy dialect (``dialect[+driver]``), installed or built in."""
    import sqlalchemy as sa

    try:
        sa.engine.make_url(url).get_dialect()
    except sa.exc.ArgumentError:  # not a URL, or no such dialect (NoSuchModuleError)
        return False
    except Exception:  # a dialect that exists but fails to load: SqlJobDatabase says why
        return True
    return True


def create_job_db(
    path: str | Path, df: pd.DataFrame, *, on_exists: str = "error", storage_options: Any = None
) -> JobDatabaseInterface:
    """Like openeo's ``create_job_db``, returning the atomic flavours (``storage_options``: see ``get_job_db``)."""
    job_db = get_job_db(path, storage_options=storage_options)
    job_db.initialize_from_df(df=df, on_exists=on_exists)
    return job_db


def resolve_job_db(job_db: str | Path | JobDatabaseInterface) -> JobDatabaseInterface:
    """Turn what ``run_jobs(job_db=...)`` accepts into a job database.

    openeo's own ``CsvJobDatabase``/``ParquetJobDatabase`` objects are upgraded in place to their atomic
    subclasses (same object, same state, same file format), so users' objects keep working unchanged.
    """
    if isinstance(job_db, (str, Path)):
        return get_job_db(job_db)
    if not isinstance(job_db, JobDatabaseInterface):
        raise ValueError(f"Unsupported job_db {job_db!r}")
    upgrade = _UPGRADES.get(type(job_db))
    if upgrade is not None:
        job_db.__class__ = upgrade
        if getattr(job_db, "_df", None) is not None:
            job_db._rows_read = len(job_db._df)
    return job_db

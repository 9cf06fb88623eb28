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

``open_file`` gives the one for a local ``.csv``/``.parquet``/``.geoparquet`` path. ``get_job_db``/``create_job_db``
(``prefect_openeo.jobdb``) return these classes, SQL job databases for ``.db``/``.sqlite`` paths and SQLAlchemy
URLs, and for object-storage URLs (``s3://bucket/prefix/jobs.parquet``) the same classes with the file in object
storage (``remote.py``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd
from openeo.extra.job_management import CsvJobDatabase, ParquetJobDatabase

from prefect_openeo.jobdb.checks import normalize_job_frame, not_numbers
from prefect_openeo.jobdb.errors import JobDatabaseError
from prefect_openeo.paths import Changed, atomic_write
from prefect_openeo.schema import BOOKKEEPING, COLUMN_REQUIREMENTS, STATUS, TOKEN

__all__ = ["FILE_SUFFIXES", "AtomicCsvJobDatabase", "AtomicParquetJobDatabase", "open_file"]

_log = logging.getLogger("prefect_openeo")

#: Suffixes of the CSV/Parquet job database files (``open_file``).
FILE_SUFFIXES = (".csv", ".parquet", ".geoparquet")


class _AtomicMixin:
    """Shared by the CSV and Parquet flavours: atomic persist, row-count guard, clear read errors."""

    path: Path
    _df: pd.DataFrame | None
    _rows_read: int = 0
    _swept: bool = False
    #: The file as this object last read or wrote it (mtime, size, inode): another writer changes it.
    _stamp: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        """The class name without ``Atomic``: the drop-in classes print as openeo's (``CsvJobDatabase('jobs.csv')``,
        so logs and code read the same), others as themselves (``RemoteCsvJobDatabase('s3://...')``)."""
        return f"{type(self).__name__.removeprefix('Atomic')}({str(self.path)!r})"

    def _disk_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Whether the file was changed by someone else (a user adding rows or setting one ``skipped`` during a
        run) since this object last read or wrote it; if so the edit is merged in, so that nothing written next
        overwrites it: rows added are joined, the user's own columns are taken over, and so is the status of
        rows the run does not hold (``not_started`` without a creation token). The run's bookkeeping of the
        rows it works on stays as the run knows it (an editor's copy may predate the run's last write)."""
        if self._df is None or self._stamp is None:
            return False
        stamp = self._disk_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        theirs = normalize_job_frame(self.read())
        mine = self._df
        common = theirs.index.intersection(mine.index)
        added = theirs.index.difference(mine.index)
        merged = mine.copy()
        for column in [c for c in theirs.columns if c not in BOOKKEEPING]:
            if column not in merged.columns:
                merged[column] = pd.Series([None] * len(merged), index=merged.index, dtype=object)
            if not theirs.loc[common, column].equals(merged.loc[common, column]):
                merged[column] = merged[column].astype(object)
                merged.loc[common, column] = theirs.loc[common, column].astype(object)
        untouched = mine.loc[common, STATUS].eq("not_started")
        if TOKEN in mine.columns:
            untouched &= mine.loc[common, TOKEN].isna() | mine.loc[common, TOKEN].eq("")
        free = common[untouched.to_numpy()]
        merged.loc[free, STATUS] = theirs.loc[free, STATUS]
        if len(added):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                merged = pd.concat([merged, theirs.loc[added]])
        _log.warning(
            f"Job database {str(self.path)!r} was changed by someone else during the run: merged their edit "
            f"({len(added)} row(s) added; their columns and the status of rows not yet planned taken over)"
        )
        self._df = merged
        self._stamp = stamp
        return True

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
        self._stamp = self._disk_stamp()
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
                and column != getattr(self._df, "active_geometry_name", None)
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
        if self._stamp is None:  # loaded before it was ours (openeo's class upgraded in place): as it is now
            self._stamp = self._disk_stamp()
        for attempt in range(3):  # someone else may write the file while this write is prepared
            if attempt or self._df is not None:
                self.reload_if_changed()
            self._merge_into_df(df)  # type: ignore[attr-defined]
            full = self.df  # type: ignore[attr-defined]
            if len(full) < self._rows_read:
                raise JobDatabaseError(
                    f"Refusing to write {len(full)} rows to {str(self.path)!r}, which held {self._rows_read}"
                )
            stamp = self._stamp
            try:
                atomic_write(
                    self.path,
                    lambda tmp, full=full: self._write(full, tmp),
                    lambda stamp=stamp: self._disk_stamp() == stamp,
                )
                break
            except Changed:
                continue
        else:
            raise JobDatabaseError(f"Job database {str(self.path)!r} keeps being written by someone else")
        self._rows_read = len(full)
        self._stamp = self._disk_stamp()


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


def _unparsable_number(path: Path) -> str | None:
    """Why openeo's CSV read failed, if a column it reads as numbers holds text (read as text to say where)."""
    numeric = [
        column
        for column, dtype in COLUMN_REQUIREMENTS.dtype_mapping().items()
        if pd.api.types.is_numeric_dtype(pd.api.types.pandas_dtype(dtype))
    ]
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception:
        return None
    return next((problem for c in numeric if c in df.columns and (problem := not_numbers(df, c))), None)


def open_file(path: str | Path) -> AtomicCsvJobDatabase | AtomicParquetJobDatabase:
    """The job database in a local ``.csv``, ``.parquet`` or ``.geoparquet`` file (by its suffix; the file need
    not exist yet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return AtomicCsvJobDatabase(path)
    if suffix in FILE_SUFFIXES:
        return AtomicParquetJobDatabase(path)
    raise JobDatabaseError(
        f"Could not guess the file format of the job database {str(path)!r} (use .csv, .parquet or .geoparquet)"
    )

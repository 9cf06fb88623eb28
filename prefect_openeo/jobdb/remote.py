"""CSV and Parquet job databases on object storage (``s3://bucket/prefix/jobs.parquet``, ``gs://``, ``az://``,
``memory://``), through fsspec.

``RemoteCsvJobDatabase``/``RemoteParquetJobDatabase`` are the local atomic classes (``files.py``) with the file
replaced by an object: same formats and reading, same merging, the same guard against writing fewer rows than
were read, and errors that name the URL. ``path`` is the URL. Each ``persist`` uploads the whole file in one
request, so a reader sees the previous version or the new one, never a part of it.

A concurrent writer is detected, never silently overwritten:

- S3 (s3fs): every write is conditional on the version this object read or last wrote: ``PutObject`` with
  ``If-Match: <ETag>``, or ``If-None-Match: *`` to create the object. If another process wrote in between, the
  store refuses the write, the object keeps the other process's version, and ``persist`` raises
  ``JobDatabaseConflict`` (``JobDatabaseCreated``, also a ``FileExistsError``, for a lost creation race). The
  store must honour these headers (AWS S3 does since 2024, as do MinIO and moto); one that ignores them cannot
  protect the object this way.
- Other stores (``gs://``, ``az://``, ``memory://``): no conditional write is used. ``persist`` reads the object
  back and compares it with the version it read (one GET more per persist) before uploading; a write by
  another process between that check and the upload would be lost, which a ``ConcurrentWriteWarning`` says
  when the job database is opened. Run one writer at a time there.

Requests on S3: ``exists`` is one HEAD, reading one GET (the body and its ETag in one answer), ``persist`` one
PUT (and one GET first on an object that has not read the file yet). Credentials are found as for results
(``prefect_openeo.storage``): the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``,
...), ``storage_options`` (fsspec options such as ``{"key", "secret", "endpoint_url"}``), or a prefect-aws
``AwsCredentials``/``MinIOCredentials`` block given as ``storage_options``.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from openeo.extra.job_management import FullDataFrameJobDatabase

from prefect_openeo.jobdb.errors import JobDatabaseConflict, JobDatabaseCreated, JobDatabaseError
from prefect_openeo.jobdb.files import AtomicCsvJobDatabase, AtomicParquetJobDatabase
from prefect_openeo.paths import S3_SCHEMES, SCHEMES
from prefect_openeo.storage import storage_options_for, storage_problem

__all__ = [
    "ConcurrentWriteWarning",
    "RemoteCsvJobDatabase",
    "RemoteParquetJobDatabase",
    "open_remote_job_db",
]


class ConcurrentWriteWarning(UserWarning):
    """The store offers no conditional write: a concurrent writer is detected only up to a short window."""


class _Changed(Exception):
    """The object is not at the version the write expected."""


# -- one object, read whole and replaced whole ------------------------------------------------------
class _S3Object:
    """An S3 object through s3fs's botocore client: conditional PUTs on the ETag."""

    conditional = True

    def __init__(self, fs: Any, url: str):
        self.fs = fs
        self.bucket, _, self.key = fs._strip_protocol(url).partition("/")

    def get(self) -> tuple[bytes, str]:
        """The object's bytes and ETag, from one GET (so they belong together)."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await answer["Body"].read(), answer["ETag"]
            finally:
                answer["Body"].close()

        return sync(self.fs.loop, get)

    def exists(self) -> bool:
        try:
            self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return False
        return True

    def put(self, data: bytes, expected: str | None, content_type: str) -> str:
        """Replace the object if its ETag is ``expected`` (create it if None); its new ETag, or ``_Changed``."""
        condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
        try:
            answer = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, ContentType=content_type, **condition
            )
        except Exception as e:
            if not _refused(e, expected):
                raise
            # s3fs retries a PUT whose answer was lost: then the refusal is of our own write, landed.
            landed = self._etag_if_holds(data)
            if landed is None:
                raise _Changed() from e
            return landed
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")
        return answer["ETag"]

    def _etag_if_holds(self, data: bytes) -> str | None:
        """The object's ETag if it holds exactly ``data`` (a single PUT's ETag is its MD5), else None."""
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
        except FileNotFoundError:
            return None
        return etag if etag.strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest() else None


def _refused(error: Exception, expected: str | None) -> bool:
    """Whether S3 refused a conditional PUT: a failed precondition, a conflicting conditional write in
    flight, or (with ``If-Match``) the object deleted meanwhile."""
    cause = error.__cause__ if error.__cause__ is not None else error
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    if code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return True
    return expected is not None and code == "NoSuchKey"


class _FsspecObject:
    """An object of any fsspec filesystem: compare (by content) before write, then one upload."""

    conditional = False

    def __init__(self, fs: Any, url: str):
        self.fs = fs
        self.path = fs._strip_protocol(url)

    def get(self) -> tuple[bytes, str]:
        data = self.fs.cat_file(self.path)
        return data, _digest(data)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def put(self, data: bytes, expected: str | None, content_type: str) -> str:
        try:
            found: str | None = _digest(self.fs.cat_file(self.path))
        except FileNotFoundError:
            found = None
        new = _digest(data)
        if found != expected and found != new:
            raise _Changed()
        self.fs.pipe_file(self.path, data)
        return new


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the job databases --------------------------------------------------------------------------------
class _RemoteMixin:
    """Shared by the CSV and Parquet flavours: the file is an object, written whole and conditionally.

    The format class after it in the MRO gives ``_parse(path)`` and ``_write(df, path)``."""

    content_type = "application/octet-stream"
    path: str
    _df: pd.DataFrame | None
    _rows_read: int

    def __init__(self, url: str, *, storage_options: Any = None):
        FullDataFrameJobDatabase.__init__(self)  # type: ignore[arg-type]  # not openeo's Path(url)
        self.url = self.path = url
        self.fs, self._object = _open(url, storage_options)
        #: The version (S3 ETag, else a digest) of the object that ``_df`` was read from or last written as;
        #: None: the object did not exist.
        self._version: str | None = None
        self._lock = threading.RLock()
        if not self._object.conditional:
            warnings.warn(
                f"Job database {url!r}: this store is used without conditional writes, so another process "
                "writing it at the very moment this one does would be overwritten (other changes are detected "
                "and refused). Run one writer at a time on it, or keep the job database on S3 or in SQL.",
                ConcurrentWriteWarning,
                stacklevel=4,
            )

    def reload_if_changed(self) -> bool:
        """Object storage: a change by another writer is refused when writing (``JobDatabaseConflict``)."""
        return False

    def exists(self) -> bool:
        try:
            return self._object.exists()
        except Exception as e:
            raise _explain(self.url, "read", e) from e

    @property
    def df(self) -> pd.DataFrame:
        with self._lock:
            if self._df is None:
                self._df, self._version = self._fetch()
            return self._df

    def read(self) -> pd.DataFrame:
        """The whole table, as openeo's class reads it; ``JobDatabaseError`` naming the URL if unreadable."""
        return self._fetch()[0]

    def _fetch(self) -> tuple[pd.DataFrame, str]:
        try:
            data, version = self._object.get()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Job database {self.url!r} does not exist ({e})") from e
        except Exception as e:
            raise _explain(self.url, "read", e) from e
        with tempfile.TemporaryDirectory(prefix="prefect-openeo-") as tmp:
            local = Path(tmp) / self._file_name
            local.write_bytes(data)
            try:
                df = self._parse(local)
            except JobDatabaseError:
                raise
            except Exception as e:
                raise JobDatabaseError(f"Job database {self.url!r} cannot be read: {e}") from e
        self._rows_read = max(self._rows_read, len(df))
        return df, version

    @property
    def _file_name(self) -> str:
        return _file_name(self.url)

    def _serialize(self, df: pd.DataFrame) -> bytes:
        with tempfile.TemporaryDirectory(prefix="prefect-openeo-") as tmp:
            local = Path(tmp) / self._file_name
            self._write(df, local)
            return local.read_bytes()

    def persist(self, df: pd.DataFrame) -> None:
        with self._lock:
            if self._df is None:
                # Not read yet: merge the rows into what the object holds (if anything), as local files do.
                try:
                    self._df, self._version = self._fetch()
                except FileNotFoundError:
                    self._version = None
            self._merge_into_df(df)  # type: ignore[attr-defined]
            full = self._df
            if len(full) < self._rows_read:
                raise JobDatabaseError(
                    f"Refusing to write {len(full)} rows to {self.url!r}, which held {self._rows_read}"
                )
            data = self._serialize(full)
            try:
                self._version = self._object.put(data, self._version, self.content_type)
            except _Changed as e:
                if self._version is None:  # lost a creation race: use what the winner wrote from now on
                    self._df, self._rows_read = None, 0
                    raise JobDatabaseCreated(
                        f"Job database {self.url!r} was created by another process meanwhile: nothing was "
                        "written. Open it again to work with what it holds."
                    ) from e
                raise JobDatabaseConflict(
                    f"Job database {self.url!r} was changed by another process since this one read it: nothing "
                    "was written, and it keeps the other process's version. Only one run at a time may write a "
                    "CSV/Parquet job database: stop the other run (or use a SQL job database, e.g. PostgreSQL, "
                    "for several workers), then run again to resume from what the job database holds."
                ) from e
            except Exception as e:
                raise _explain(self.url, "written", e) from e
            self._rows_read = len(full)

    def initialize_from_df(self, df: pd.DataFrame, *, on_exists: str = "error"):
        """As openeo's; a creation race lost to another process counts as "already exists"."""
        try:
            return super().initialize_from_df(df, on_exists=on_exists)  # type: ignore[misc]
        except JobDatabaseCreated:
            if on_exists == "skip":
                return self
            raise


class RemoteCsvJobDatabase(_RemoteMixin, AtomicCsvJobDatabase):
    """A CSV job database in object storage (see the module docstring)."""

    content_type = "text/csv"


class RemoteParquetJobDatabase(_RemoteMixin, AtomicParquetJobDatabase):
    """A Parquet/GeoParquet job database in object storage (see the module docstring)."""

    content_type = "application/vnd.apache.parquet"


def open_remote_job_db(url: str, storage_options: Any = None) -> RemoteCsvJobDatabase | RemoteParquetJobDatabase:
    """The job database at an object-storage URL, by the file's suffix (``.csv``, ``.parquet``, ``.geoparquet``)."""
    suffix = Path(_file_name(url)).suffix.lower()
    if suffix == ".csv":
        return RemoteCsvJobDatabase(url, storage_options=storage_options)
    if suffix in (".parquet", ".geoparquet"):
        return RemoteParquetJobDatabase(url, storage_options=storage_options)
    raise JobDatabaseError(
        f"Could not guess job database type from {url!r}: on object storage a job database is a "
        ".csv, .parquet or .geoparquet file (e.g. s3://bucket/prefix/jobs.parquet)"
    )


def _file_name(url: str) -> str:
    """The last part of a URL's path (of its netloc for ``memory://jobs.csv``)."""
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}".rstrip("/").rsplit("/", 1)[-1]


def _open(url: str, storage_options: Any) -> tuple[Any, _S3Object | _FsspecObject]:
    """The fsspec filesystem for ``url`` (credentials as for results) and the object's access."""
    import fsspec

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise JobDatabaseError(f"Job database {url!r}: {scheme}:// is not an object store ({', '.join(SCHEMES)})")
    if scheme != "memory" and (not parts.netloc or not parts.path.strip("/")):
        raise JobDatabaseError(
            f"Job database {url!r} names no bucket and file: use {scheme}://BUCKET/PATH/jobs.parquet"
        )
    package, install = SCHEMES[scheme]
    try:
        fs_class = fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise JobDatabaseError(f"Job database {url!r} needs the package {package!r}: {install}") from e
    options = dict(storage_options_for(storage_options))
    options.setdefault("use_listings_cache", False)  # other processes write too: never answer from a cache
    try:
        fs = fs_class(**options)
    except Exception as e:
        raise JobDatabaseError(f"Job database {url!r}: storage_options {sorted(options)} were refused: {e}") from e
    return fs, (_S3Object if scheme in S3_SCHEMES else _FsspecObject)(fs, url)


def _explain(url: str, action: str, error: Exception) -> JobDatabaseError:
    """A clear message for an object that could not be read or written."""
    hint = storage_problem(error) or f"{type(error).__name__}: {error}"
    return JobDatabaseError(f"Job database {url!r} cannot be {action}: {hint}")

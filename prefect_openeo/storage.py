"""Where results live: a local folder or an object store (an fsspec URL), with verified, atomic publish.

``ResultStore.from_root(root, storage_options=None)`` gives a store for ``root``:

- a local folder (a path, or a ``file://`` URL): results go to ``root/job_{id}/`` as before. An asset is
  written to ``.{name}.part`` beside its final name, and renamed into place once the caller verified it; an
  interrupted ``.part`` file is kept and resumed (``AssetUpload.offset``).
- ``s3://bucket/prefix`` (s3fs): an asset is streamed into a multipart upload, completed only once the caller
  verified it and aborted otherwise; an asset smaller than one part is sent as a single PUT after
  verification. Nothing is visible under the final key before it is complete and verified. A multipart upload
  left by a crashed attempt is aborted by ``cleanup(job_id)`` on the next attempt for that job (the checksum
  covers the whole asset and the parts of an unfinished upload cannot be read back to hash, so the download
  restarts rather than resumes).
- ``gs://``, ``az://``/``abfs://`` (gcsfs, adlfs) and ``memory://``: an asset is spooled to a local temporary
  file, and uploaded in one call once verified (each of these stores makes an object visible only when its
  upload completes).

Small files (job metadata, error logs) are written with one PUT, which object stores make visible atomically;
on disk through a temporary file, fsync and rename. Credentials come from the environment (e.g.
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``), from ``storage_options`` (passed to the
fsspec filesystem), or from a prefect-aws block: ``from_root(S3Bucket(...))``, or
``storage_options=AwsCredentials(...)`` / ``MinIOCredentials(...)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from prefect_openeo.paths import S3_SCHEMES, SCHEMES, atomic_write, lost_slashes
from prefect_openeo.settings import settings

__all__ = [
    "AssetUpload",
    "LocalStore",
    "ObjectStore",
    "ResultStore",
    "S3Store",
    "StorageError",
    "aws_storage_options",
    "storage_options_for",
    "storage_problem",
]

#: Name of a job's folder under the root.
JOB_FOLDER = "job_{job_id}"
_MAX_PARTS = 10_000
_CHUNK = 1 << 20


class StorageError(ValueError):
    """A result store that cannot be used as given; the message names the location and what to do."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"Unusable file name {name!r} for a result store: a plain file name is needed")
    return name


# -- uploads ---------------------------------------------------------------------------------------
class AssetUpload(ABC):
    """One asset on its way into the store: written, verified by the caller, then committed or discarded.

    Use it as a context manager: leaving it with an exception (an interrupted download) keeps what can be
    resumed (a local ``.part`` file) and drops the rest; leaving it without ``commit`` discards it.
    """

    #: Bytes kept from an interrupted earlier attempt: resume the download from here (0: start afresh).
    offset: int = 0
    _done = False

    def kept(self) -> Iterator[bytes]:
        """The ``offset`` bytes kept from an earlier attempt (to hash them before resuming)."""
        return iter(())

    def restart(self) -> None:
        """Drop the kept bytes: the data will be written from its start."""
        self.offset = 0

    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Publish the verified asset under its final name."""

    @abstractmethod
    def discard(self) -> None:
        """Drop everything written (failed verification): nothing is left behind."""

    def interrupted(self) -> None:
        """The data stopped coming: keep what a later attempt can resume, drop the rest."""
        self.discard()

    def __enter__(self) -> AssetUpload:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self._done = True
            if exc_type is None:
                self.discard()
                return
            with contextlib.suppress(Exception):  # keep the original error; the next attempt's cleanup() acts
                self.interrupted()


class _LocalUpload(AssetUpload):
    """Into ``.{name}.part`` beside ``target``; fsync and rename on commit; the ``.part`` is kept to resume."""

    def __init__(self, target: Path):
        self.target = target
        self.part = target.with_name(f".{target.name}.part")
        self.offset = self.part.stat().st_size if self.part.exists() else 0
        self._file = None

    def kept(self) -> Iterator[bytes]:
        with open(self.part, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.part, "ab" if self.offset else "wb")
        self._file.write(chunk)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def commit(self) -> None:
        if self._file is None and not self.offset:
            self.write(b"")  # an empty asset
        self._close()
        os.replace(self.part, self.target)
        self._done = True

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.part.unlink(missing_ok=True)
        self._done = True

    def interrupted(self) -> None:
        self._close()
        self._done = True


class _S3Upload(AssetUpload):
    """A multipart upload, created once the data outgrows one part; completed on commit, aborted otherwise.

    An asset smaller than one part is sent as one PUT on commit (1 request instead of 3).
    """

    def __init__(self, fs: Any, bucket: str, key: str, size_hint: int | None = None):
        self.fs, self.bucket, self.key = fs, bucket, key
        # settings.part_size per part (5 MiB at least), at most 10,000 parts: grown for larger assets.
        self.part_size = max(settings.part_size, -(-(size_hint or 0) // _MAX_PARTS))
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    def restart(self) -> None:
        self._buffer.clear()
        self._parts = []  # the upload is reused: parts are sent again from number 1
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        while len(self._buffer) >= self.part_size:
            self._send_part(bytes(self._buffer[: self.part_size]))
            del self._buffer[: self.part_size]

    def _send_part(self, data: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self._parts) + 1
        out = self.fs.call_s3(
            "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=data
        )
        self._parts.append({"PartNumber": number, "ETag": out["ETag"]})

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buffer))
            else:
                if self._buffer or not self._parts:
                    self._send_part(bytes(self._buffer))
                self.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._upload_id = None
        except BaseException:
            with contextlib.suppress(Exception):  # raise the original error; cleanup() aborts what is left
                self.discard()
            raise
        self._buffer = bytearray()
        self._done = True
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")

    def discard(self) -> None:
        self._buffer = bytearray()
        self._done = True
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)


class _SpooledUpload(AssetUpload):
    """Into a local temporary file, uploaded in one call on commit (the store shows it once complete)."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self._file = tempfile.NamedTemporaryFile(prefix="prefect-openeo-", suffix=".part", delete=False)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.offset = 0

    def commit(self) -> None:
        self._file.close()
        try:
            self.fs.put_file(self._file.name, self.path)
        finally:
            self.discard()

    def discard(self) -> None:
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)
        self._done = True


# -- stores ----------------------------------------------------------------------------------------
class ResultStore(ABC):
    """Where the results of jobs live: ``job_{id}/`` under a local folder or an object-store prefix."""

    #: Whether other machines see the results (object storage: yes; a local folder: no).
    shareable: bool = False
    #: Whether results are on this machine's file system (``job_location`` gives a ``Path``).
    is_local: bool = False

    def __init__(self, job_folder: str = JOB_FOLDER):
        self._job_folder = job_folder

    @classmethod
    def from_root(
        cls, root: Any, storage_options: Mapping[str, Any] | Any | None = None, *, job_folder: str = JOB_FOLDER
    ) -> ResultStore:
        """The store for ``root``: a path, a URL (``file://``, ``s3://bucket/prefix``, ``gs://``, ``az://``,
        ``memory://``), a ``ResultStore`` (returned as is), or a prefect-aws ``S3Bucket`` block.

        ``storage_options`` go to the fsspec filesystem (e.g. ``{"key": ..., "secret": ...,
        "endpoint_url": ...}`` for s3fs), or are a prefect-aws ``AwsCredentials``/``MinIOCredentials`` block.
        ``job_folder`` names a job's folder under the root (``""``: the root is the one job's folder).
        """
        return _from_root(root, storage_options, job_folder)

    # where
    @property
    @abstractmethod
    def location(self) -> Path | str:
        """The root: a ``Path`` for a local folder, else its URL."""

    def job_location(self, job_id: str) -> Path | str:
        """A job's folder: a ``Path`` for a local store, else its URL (for links and catalogues)."""
        return self._join(self.location, self._folder(job_id))

    @abstractmethod
    def url(self, job_id: str, name: str | None = None) -> str:
        """URL of a job's folder, or of a file in it (``file://`` for a local store)."""

    def _folder(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not job_id or "/" in job_id or job_id in (".", ".."):
            raise ValueError(f"Unusable job id {job_id!r} for a result store")
        return self._job_folder.format(job_id=job_id)

    @staticmethod
    @abstractmethod
    def _join(base: Any, *names: str) -> Any: ...

    # reading
    @abstractmethod
    def exists(self, job_id: str, name: str) -> bool:
        """Whether a job's file exists under its final name."""

    @abstractmethod
    def read_bytes(self, job_id: str, name: str) -> bytes: ...

    @abstractmethod
    def files(self, job_id: str) -> list[str]:
        """Names of a job's published files (leftovers of unfinished writes are not listed)."""

    # writing
    @abstractmethod
    def write_bytes(self, job_id: str, name: str, data: bytes) -> None:
        """Write a small file atomically: all of it or nothing (one PUT on object stores)."""

    @abstractmethod
    def publish(self, job_id: str, name: str, *, size_hint: int | None = None) -> AssetUpload:
        """Start publishing an asset: write it, verify it, then ``commit()`` (see ``AssetUpload``)."""

    @abstractmethod
    def cleanup(self, job_id: str) -> int:
        """Remove what interrupted attempts left for a job that cannot be resumed; returns how many."""

    @abstractmethod
    def check(self) -> None:
        """Fail with a clear ``StorageError`` now if results could not be written (before any job exists)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.location)!r})"


class LocalStore(ResultStore):
    """A folder on this machine (openeo's layout: ``root/job_{id}/``)."""

    is_local = True

    def __init__(self, root: str | Path, job_folder: str = JOB_FOLDER):
        super().__init__(job_folder)
        self.root = Path(root)

    @property
    def location(self) -> Path:
        return self.root

    @staticmethod
    def _join(base: Path, *names: str) -> Path:
        return base.joinpath(*[n for n in names if n])

    def _path(self, job_id: str, name: str) -> Path:
        return self._join(self.root, self._folder(job_id), _check_name(name))

    def url(self, job_id: str, name: str | None = None) -> str:
        path = self._path(job_id, name) if name else self.job_location(job_id)
        return path.resolve().as_uri()

    def exists(self, job_id: str, name: str) -> bool:
        return self._path(job_id, name).is_file()

    def read_bytes(self, job_id: str, name: str) -> bytes:
        return self._path(job_id, name).read_bytes()

    def files(self, job_id: str) -> list[str]:
        folder = self.job_location(job_id)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def write_bytes(self, job_id: str, name: str, data: bytes) -> None:
        atomic_write(self._path(job_id, name), lambda tmp: tmp.write_bytes(data))

    def publish(self, job_id: str, name: str, *, size_hint: int | None = None) -> AssetUpload:
        return _LocalUpload(self._path(job_id, name))

    def cleanup(self, job_id: str) -> int:
        """Remove temporary files of metadata writes killed half-way (``.part`` files are kept: resumable)."""
        folder = self.job_location(job_id)
        stale = list(folder.glob(".*.tmp")) if folder.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def check(self) -> None:
        root = self.root.absolute()
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise StorageError(f"Results folder {str(self.root)!r}: {str(existing)!r} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"Results folder {str(self.root)!r}: {str(existing)!r} is not writable")


class ObjectStore(ResultStore):
    """An fsspec filesystem under a URL (``gs://``, ``az://``, ``memory://``; ``S3Store`` for ``s3://``)."""

    shareable = True

    def __init__(self, url: str, fs: Any, job_folder: str = JOB_FOLDER):
        super().__init__(job_folder)
        self.root_url = url.rstrip("/")
        self.fs = fs
        self.protocol = urlsplit(url).scheme
        self.root_path = fs._strip_protocol(self.root_url).rstrip("/")

    @property
    def location(self) -> str:
        return self.root_url

    @staticmethod
    def _join(base: str, *names: str) -> str:
        return "/".join([base.rstrip("/"), *[n for n in names if n]])

    def _path(self, job_id: str, name: str | None = None) -> str:
        return self._join(self.root_path, self._folder(job_id), *([_check_name(name)] if name else []))

    def url(self, job_id: str, name: str | None = None) -> str:
        return self._join(self.root_url, self._folder(job_id), *([_check_name(name)] if name else []))

    def exists(self, job_id: str, name: str) -> bool:
        return bool(self.fs.isfile(self._path(job_id, name)))

    def read_bytes(self, job_id: str, name: str) -> bytes:
        return self.fs.cat_file(self._path(job_id, name))

    def files(self, job_id: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(job_id), detail=True)
        except FileNotFoundError:
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
        return sorted(n for n in names if not n.startswith("."))

    def write_bytes(self, job_id: str, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(job_id, name), bytes(data))

    def publish(self, job_id: str, name: str, *, size_hint: int | None = None) -> AssetUpload:
        return _SpooledUpload(self.fs, self._path(job_id, name))

    def cleanup(self, job_id: str) -> int:
        """Nothing to clean: an upload becomes visible only when complete (leftovers stay local, temporary)."""
        return 0

    def check(self) -> None:
        probe = self._join(self.root_path, f".prefect-openeo-check-{uuid.uuid4().hex[:12]}")
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:
            raise _explain(self.root_url, e) from e


class S3Store(ObjectStore):
    """``s3://bucket/prefix`` through s3fs: assets as multipart uploads completed only once verified."""

    def __init__(self, url: str, fs: Any, job_folder: str = JOB_FOLDER):
        super().__init__(url, fs, job_folder)
        self.bucket, _, self.prefix = self.root_path.partition("/")

    def _key(self, job_id: str, name: str | None = None) -> str:
        return self._path(job_id, name).partition("/")[2]

    def write_bytes(self, job_id: str, name: str, data: bytes) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(job_id, name), Body=bytes(data))
        self.fs.invalidate_cache(self._path(job_id, name))

    def exists(self, job_id: str, name: str) -> bool:
        try:
            self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(job_id, name))
        except FileNotFoundError:
            return False
        return True

    def publish(self, job_id: str, name: str, *, size_hint: int | None = None) -> AssetUpload:
        return _S3Upload(self.fs, self.bucket, self._key(job_id, name), size_hint)

    def pending_uploads(self, job_id: str) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the unfinished multipart uploads under a job's folder."""
        prefix = self._key(job_id) + "/"
        found, markers = [], {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix, **markers)
            found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def cleanup(self, job_id: str) -> int:
        """Abort the multipart uploads an interrupted attempt left for the job (one listing request)."""
        pending = self.pending_uploads(job_id)
        for key, upload_id in pending:
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
        return len(pending)

    def check(self) -> None:
        key = self._join(self.prefix, f".prefect-openeo-check-{uuid.uuid4().hex[:12]}").lstrip("/")
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"ok")
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)
        except Exception as e:
            raise _explain(self.root_url, e) from e


# -- resolving a root ------------------------------------------------------------------------------
def _from_root(root: Any, storage_options: Any, job_folder: str) -> ResultStore:
    if isinstance(root, ResultStore):
        if storage_options is not None:
            raise StorageError(f"storage_options are for a URL root, not for the ResultStore {root!r}")
        return root
    options = dict(storage_options_for(storage_options))
    if _is_block(root, "S3Bucket"):
        folder = (root.bucket_folder or "").strip("/")
        options = {**aws_storage_options(root.credentials), **options}
        root = f"s3://{root.bucket_name}/{folder}".rstrip("/")
    if not isinstance(root, (str, Path)):
        raise TypeError(f"root_dir must be a path, a URL or a ResultStore, got {type(root).__name__}: {root!r}")
    text = str(root)
    if "://" not in text:
        meant = lost_slashes(text)
        if meant:
            raise StorageError(
                f"Results location {text!r} looks like a URL whose '//' was lost (pathlib.Path collapses it): "
                f"pass it as a string, e.g. {meant}"
            )
        if options:
            raise StorageError(f"storage_options {sorted(options)} given for the local folder {text!r}: pass a URL")
        return LocalStore(root, job_folder)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"Results location {text!r}: a file:// URL names a local path (file:///path)")
        if options:
            raise StorageError(f"storage_options {sorted(options)} given for the local folder {text!r}: pass a URL")
        return LocalStore(url2pathname(parts.path), job_folder)
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise StorageError(
            f"Results location {text!r}: unknown scheme {scheme!r}. Use a local folder, file://, or one of {known}"
        )
    if scheme != "memory" and not parts.netloc:
        raise StorageError(f"Results location {text!r} names no bucket: use {scheme}://BUCKET/PREFIX")
    package, install = SCHEMES[scheme]
    try:
        import fsspec

        fs_class = fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise StorageError(f"Results location {text!r} needs the package {package!r}: {install}") from e
    options.setdefault("use_listings_cache", False)  # other workers write too: never answer from a cache
    try:
        fs = fs_class(**options)
    except Exception as e:
        raise StorageError(f"Results location {text!r}: storage_options {sorted(options)} were refused: {e}") from e
    return (S3Store if scheme in S3_SCHEMES else ObjectStore)(text, fs, job_folder)


def storage_options_for(storage_options: Any) -> Mapping[str, Any]:
    """fsspec options from ``storage_options`` as users give them: None, a mapping of fsspec options (as is),
    or a prefect-aws ``AwsCredentials``/``MinIOCredentials`` block (``aws_storage_options``)."""
    if storage_options is None:
        return {}
    if isinstance(storage_options, Mapping):
        return storage_options
    if _is_block(storage_options, "AwsCredentials") or _is_block(storage_options, "MinIOCredentials"):
        return aws_storage_options(storage_options)
    raise TypeError(
        "storage_options must be a dict of fsspec options or a prefect-aws AwsCredentials/MinIOCredentials block, "
        f"got {type(storage_options).__name__}"
    )


def _is_block(value: Any, name: str) -> bool:
    """Whether ``value`` is a prefect-aws block of that class (without importing prefect-aws otherwise)."""
    module = sys.modules.get("prefect_aws")
    return module is not None and isinstance(value, getattr(module, name))


def aws_storage_options(credentials: Any) -> dict[str, Any]:
    """s3fs options from a prefect-aws ``AwsCredentials`` or ``MinIOCredentials`` block (``pip install
    'prefect-openeo[aws]'``): keys, session token or profile, region, endpoint and client settings.
    With ``assume_role_arn``, the block's session assumes the role and its temporary keys are used."""
    options: dict[str, Any] = {}
    if _is_block(credentials, "MinIOCredentials"):
        options.update(key=credentials.minio_root_user, secret=credentials.minio_root_password.get_secret_value())
    elif _is_block(credentials, "AwsCredentials"):
        if credentials.assume_role_arn:
            frozen = credentials.get_boto3_session().get_credentials().get_frozen_credentials()
            options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
        else:
            secret = credentials.aws_secret_access_key
            options.update(
                key=credentials.aws_access_key_id,
                secret=secret.get_secret_value() if secret is not None else None,
                token=credentials.aws_session_token,
                profile=credentials.profile_name,
            )
    else:
        raise TypeError(f"Expected a prefect-aws AwsCredentials or MinIOCredentials block, got {credentials!r}")
    client = {k: v for k, v in credentials.aws_client_parameters.model_dump().items() if v is not None}
    if client.pop("verify_cert_path", None) is not None:
        client["verify"] = str(credentials.aws_client_parameters.verify_cert_path)
    elif isinstance(client.get("verify"), Path):
        client["verify"] = str(client["verify"])
    config = client.pop("config", None)
    if credentials.region_name:
        client["region_name"] = credentials.region_name
    options["client_kwargs"] = client
    if config:
        options["config_kwargs"] = config
    return {k: v for k, v in options.items() if v is not None}


def storage_problem(error: Exception) -> str | None:
    """What an object store's refusal means for a user and what to do, when that is known (shared with the job
    databases); None otherwise."""
    text = f"{type(error).__name__}: {error}"
    if type(error).__name__ == "NoCredentialsError":
        return (
            "no credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), pass "
            "storage_options={'key': ..., 'secret': ...}, or a prefect-aws AwsCredentials/S3Bucket block"
        )
    if isinstance(error, TypeError):
        return f"its storage_options were refused ({text})"
    if isinstance(error, FileNotFoundError):
        return f"the bucket does not exist ({text})"
    if isinstance(error, PermissionError):
        return f"access denied: check the credentials and their permissions ({text})"
    return None


def _explain(url: str, error: Exception) -> StorageError:
    """A clear message for a store that refused a write."""
    hint = storage_problem(error) or f"cannot write there ({type(error).__name__}: {error})"
    return StorageError(f"Results location {url!r}: {hint}")

"""Verified result downloads, published through a result store (``prefect_openeo.storage``).

Each asset is streamed into the store's upload (on disk a hidden ``.part`` file in the job folder; on S3 a
multipart upload), checked against the size (``file:size`` and ``Content-Length``) and checksum
(``file:checksum``, a sha2-256 multihash) the backend gives, and only then published under its final name.
A failed download leaves nothing behind but, on disk, a ``.part`` file to resume with ``Range``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from openeo import BatchJob

from prefect_openeo.storage import AssetUpload, LocalStore, ResultStore

CHUNK_SIZE = 1 << 20
RESULTS_METADATA_FILENAME = "job-results.json"
_SHA256_MULTIHASH_PREFIX = "1220"


class DownloadVerificationError(RuntimeError):
    """A downloaded asset does not match the size or checksum the backend announced."""


@dataclass
class DownloadReport:
    job_id: str
    #: The files written: paths for a local store, URLs for object storage.
    files: list[Path | str] = field(default_factory=list)
    assets: int = 0
    bytes: int = 0


class NoAssets(ValueError):
    """A finished job whose results document lists no assets (nothing was downloaded)."""


def _asset_filename(key: str) -> str:
    name = Path(key).name
    if not name or name in (".", ".."):
        raise ValueError(f"Unusable asset name {key!r}")
    return name


def download_asset(job: BatchJob, href: str, target: Path, asset: dict) -> int:
    """Stream one asset into ``target`` via ``.{name}.part``; verify; rename. Returns the size.

    A ``.part`` file left by an interrupted download is resumed with a ``Range`` request when the server
    answers ``206``; otherwise the download restarts. A file that fails verification is removed.
    """
    target = Path(target)
    with LocalStore(target.parent, job_folder="").publish(job.job_id, target.name) as upload:
        return fetch_asset(job, href, asset, upload)


def fetch_asset(job: BatchJob, href: str, asset: dict, upload: AssetUpload) -> int:
    """Stream one asset into ``upload`` (resuming from ``upload.offset``), verify it, and commit it.

    Raises ``DownloadVerificationError`` (after discarding the upload) when size or checksum do not match.
    Returns the asset's size.
    """
    expected_size = asset.get("file:size")
    checksum = asset.get("file:checksum")
    digest = hashlib.sha256() if isinstance(checksum, str) and checksum.startswith(_SHA256_MULTIHASH_PREFIX) else None
    offset = upload.offset
    if expected_size is not None and offset >= int(expected_size):
        offset = 0  # nothing sensible to resume
    headers = {"Range": f"bytes={offset}-"} if offset else None
    with job.connection.get(href, stream=True, headers=headers, expected_status=[200, 206]) as resp:
        resumed = offset > 0 and resp.status_code == 206
        if resumed and digest is not None:
            for chunk in upload.kept():
                digest.update(chunk)
        if not resumed:
            upload.restart()
        size = offset if resumed else 0
        content_length = resp.headers.get("Content-Length")
        for chunk in resp.iter_content(chunk_size=CHUNK_SIZE):
            upload.write(chunk)
            size += len(chunk)
            if digest is not None:
                digest.update(chunk)
    try:
        sent = size - (offset if resumed else 0)
        if content_length is not None and "Content-Encoding" not in resp.headers and int(content_length) != sent:
            raise DownloadVerificationError(f"{href}: got {sent} bytes, Content-Length said {content_length}")
        if expected_size is not None and int(expected_size) != size:
            raise DownloadVerificationError(f"{href}: got {size} bytes, file:size said {expected_size}")
        if digest is not None and digest.hexdigest() != checksum[len(_SHA256_MULTIHASH_PREFIX) :].lower():
            raise DownloadVerificationError(f"{href}: sha256 {digest.hexdigest()} does not match file:checksum")
    except DownloadVerificationError:
        upload.discard()
        raise
    upload.commit()
    return size


def _store_for(job_dir: Path | str | ResultStore) -> ResultStore:
    """A store writing exactly into ``job_dir`` (a path or URL), or the given store (its ``job_{id}`` folders)."""
    if isinstance(job_dir, ResultStore):
        return job_dir
    return ResultStore.from_root(job_dir, job_folder="")


def download_job_results(
    job: BatchJob, job_dir: Path | str | ResultStore, *, job_metadata: dict | None = None
) -> DownloadReport:
    """Download a finished job's assets, its results document and its metadata.

    ``job_dir`` is the job's folder (a path, or a URL such as ``s3://bucket/prefix/job_x`` with credentials
    from the environment), or a ``ResultStore`` (then into ``store.job_location(job.job_id)``).
    Layout as openeo's manager: ``job-results.json``, ``job_{id}.json`` and the assets; the two metadata files
    are written last, each atomically. ``job_metadata`` (the ``GET /jobs/{id}`` document) is fetched when not
    given. What an interrupted earlier attempt left and cannot resume is removed first.
    """
    store = _store_for(job_dir)
    job_id = job.job_id
    store.cleanup(job_id)
    results = job.get_results()
    metadata = results.get_metadata()
    report = DownloadReport(job_id=job_id)
    assets = metadata.get("assets") or {}
    if not assets:  # nothing to download is not a download done: the row's results stay owed, and say why
        raise NoAssets(f"the backend's results document of job {job_id} lists no assets")
    for key, asset in assets.items():
        if not isinstance(asset, dict) or "href" not in asset:
            raise ValueError(f"Job {job_id}: asset {key!r} has no href")
        name = _asset_filename(key)
        size_hint = asset.get("file:size")
        with store.publish(job_id, name, size_hint=int(size_hint) if size_hint is not None else None) as upload:
            report.bytes += fetch_asset(job, asset["href"], asset, upload)
        report.files.append(_location(store, job_id, name))
        report.assets += 1
    store.write_bytes(job_id, RESULTS_METADATA_FILENAME, json.dumps(metadata).encode())
    report.files.append(_location(store, job_id, RESULTS_METADATA_FILENAME))
    if job_metadata is None:
        job_metadata = job.describe()
    metadata_name = f"job_{job_id}.json"
    store.write_bytes(job_id, metadata_name, json.dumps(job_metadata, ensure_ascii=False).encode())
    report.files.append(_location(store, job_id, metadata_name))
    return report


def _location(store: ResultStore, job_id: str, name: str) -> Path | str:
    folder = store.job_location(job_id)
    return folder / name if isinstance(folder, Path) else f"{folder}/{name}"


def results_present(job_dir: Path | str | ResultStore, job_id: str) -> bool:
    """Whether a previous run left complete results for the job (metadata is written last)."""
    store = _store_for(job_dir)
    return store.exists(job_id, RESULTS_METADATA_FILENAME) and store.exists(job_id, f"job_{job_id}.json")

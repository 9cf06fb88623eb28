"""Verified, atomic result downloads.

Each asset is streamed into a hidden temporary file in the job folder, checked against the size
(``file:size`` and ``Content-Length``) and checksum (``file:checksum``, a sha2-256 multihash) the backend
gives, and only then renamed into place. A failed download leaves no partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from openeo import BatchJob

from prefect_openeo.jobdb.files import atomic_write

CHUNK_SIZE = 1 << 20
RESULTS_METADATA_FILENAME = "job-results.json"
_SHA256_MULTIHASH_PREFIX = "1220"


class DownloadVerificationError(RuntimeError):
    """A downloaded asset does not match the size or checksum the backend announced."""


@dataclass
class DownloadReport:
    job_id: str
    files: list[Path] = field(default_factory=list)
    assets: int = 0
    bytes: int = 0


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
    expected_size = asset.get("file:size")
    checksum = asset.get("file:checksum")
    digest = hashlib.sha256() if isinstance(checksum, str) and checksum.startswith(_SHA256_MULTIHASH_PREFIX) else None
    tmp = target.with_name(f".{target.name}.part")
    offset = tmp.stat().st_size if tmp.exists() else 0
    if expected_size is not None and offset >= int(expected_size):
        offset = 0  # nothing sensible to resume
    headers = {"Range": f"bytes={offset}-"} if offset else None
    with job.connection.get(href, stream=True, headers=headers, expected_status=[200, 206]) as resp:
        resumed = offset > 0 and resp.status_code == 206
        if resumed and digest is not None:
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
                    digest.update(chunk)
        size = offset if resumed else 0
        content_length = resp.headers.get("Content-Length")
        with open(tmp, "ab" if resumed else "wb") as f:
            for chunk in resp.iter_content(chunk_size=CHUNK_SIZE):
                f.write(chunk)
                size += len(chunk)
                if digest is not None:
                    digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
    try:
        sent = size - (offset if resumed else 0)
        if content_length is not None and "Content-Encoding" not in resp.headers and int(content_length) != sent:
            raise DownloadVerificationError(f"{href}: got {sent} bytes, Content-Length said {content_length}")
        if expected_size is not None and int(expected_size) != size:
            raise DownloadVerificationError(f"{href}: got {size} bytes, file:size said {expected_size}")
        if digest is not None and digest.hexdigest() != checksum[len(_SHA256_MULTIHASH_PREFIX) :].lower():
            raise DownloadVerificationError(f"{href}: sha256 {digest.hexdigest()} does not match file:checksum")
    except DownloadVerificationError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return size


def download_job_results(job: BatchJob, job_dir: Path, *, job_metadata: dict | None = None) -> DownloadReport:
    """Download a finished job's assets, its results document and its metadata into ``job_dir``.

    Layout as openeo's manager: ``job-results.json``, ``job_{id}.json`` and the assets.
    ``job_metadata`` (the ``GET /jobs/{id}`` document) is fetched when not given.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in job_dir.glob(".*.tmp"):  # left by a run killed while writing metadata
        stale.unlink(missing_ok=True)
    results = job.get_results()
    metadata = results.get_metadata()
    report = DownloadReport(job_id=job.job_id)
    assets = metadata.get("assets") or {}
    for key, asset in assets.items():
        if not isinstance(asset, dict) or "href" not in asset:
            raise ValueError(f"Job {job.job_id}: asset {key!r} has no href")
        target = job_dir / _asset_filename(key)
        report.bytes += download_asset(job, asset["href"], target, asset)
        report.files.append(target)
        report.assets += 1
    results_path = job_dir / RESULTS_METADATA_FILENAME
    atomic_write(results_path, lambda tmp: tmp.write_text(json.dumps(metadata)))
    report.files.append(results_path)
    if job_metadata is None:
        job_metadata = job.describe()
    metadata_path = job_dir / f"job_{job.job_id}.json"
    atomic_write(metadata_path, lambda tmp: tmp.write_text(json.dumps(job_metadata, ensure_ascii=False)))
    report.files.append(metadata_path)
    return report


def results_present(job_dir: Path, job_id: str) -> bool:
    """Whether a previous run left complete results for the job (metadata is written last)."""
    return (job_dir / RESULTS_METADATA_FILENAME).exists() and (job_dir / f"job_{job_id}.json").exists()

"""Deterministic pseudo-random result assets."""

from __future__ import annotations

import functools
import hashlib

__all__ = ["asset_bytes", "asset_checksum", "parse_range"]

_CACHE_MAX_SIZE = 1 << 20


def _generate(job_id: str, name: str, size: int) -> bytes:
    return hashlib.shake_256(f"{job_id}/{name}".encode()).digest(size) if size > 0 else b""


@functools.lru_cache(maxsize=64)
def _cached(job_id: str, name: str, size: int) -> bytes:
    return _generate(job_id, name, size)


def asset_bytes(job_id: str, name: str, size: int) -> bytes:
    """The content of an asset: ``size`` bytes derived from job id and asset name."""
    return _cached(job_id, name, size) if size <= _CACHE_MAX_SIZE else _generate(job_id, name, size)


@functools.lru_cache(maxsize=4096)
def asset_checksum(job_id: str, name: str, size: int) -> str:
    """STAC ``file:checksum`` of an asset: sha2-256 multihash (``1220`` + hex digest)."""
    return "1220" + hashlib.sha256(asset_bytes(job_id, name, size)).hexdigest()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """Parse a single ``Range: bytes=...`` header against a resource of ``size`` bytes.

    Returns ``(start, end)`` (inclusive) for a satisfiable range, ``None`` when the header is absent or
    not a single byte range (serve everything), ``False`` when unsatisfiable (416).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return False
            return (max(0, size - suffix), size - 1) if size > 0 else False
        start = int(first)
        end = int(last) if last != "" else size - 1
    except ValueError:
        return None
    if start >= size:
        return False
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)

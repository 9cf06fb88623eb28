"""Configuration of the openEO backend simulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SimulatorConfig", "format_retry_after"]


def _default_users() -> dict[str, str]:
    return {"user": "password"}


@dataclass
class SimulatorConfig:
    """Behaviour knobs of a simulated backend.

    The simulator reads its config live on every request, so attributes may be changed while it runs
    (e.g. ``sim.config.rate_429 = 1.0``). Durations, outcome and assets of a job are drawn when it is started.
    """

    queue_duration: float = 1.0
    """Seconds a started job stays queued at least (before it may run)."""
    run_duration: float = 2.0
    """Seconds a job runs."""
    jitter: float = 0.0
    """Relative jitter (0.2 = +-20%) on both durations, seeded per job."""
    capacity: int = 10
    """Jobs running at once per user; eligible jobs beyond that wait FIFO (by start order)."""
    job_limit: int | None = None
    """Max jobs queued+running per user; starting one more answers 400 ConcurrentJobLimit."""
    failure_rate: float = 0.0
    """Fraction of jobs that end in "error" (seeded, reproducible per job sequence number)."""
    rate_429: float = 0.0
    """Fraction of requests answered 429 TooManyRequests (seeded; not ``/`` nor ``/.well-known/openeo``)."""
    retry_after: float = 1.0
    """Retry-After value (seconds) sent with 429 and 503 responses; sent as an int when whole."""
    outages: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) windows in seconds since server start/reset during which every request answers 503."""
    assets_per_job: int = 1
    asset_size: int = 1024
    """Bytes per asset."""
    cpu_per_second: float = 1.5
    """Usage: cpu-seconds per second of run."""
    memory_mb: float = 1024.0
    """Usage: memory (MB) held while running; reported as mb-seconds."""
    cost_per_job: float = 1.0
    listing_usage: bool = False
    """Whether ``GET /jobs`` entries of ended jobs carry ``usage`` (the API allows it; openeo-driver does not)."""
    page_limit_default: int | None = None
    """Page size of ``GET /jobs`` without ``limit``; None: all jobs in one page (like openeo-driver)."""
    seed: int = 42
    users: dict[str, str] = field(default_factory=_default_users)
    """Basic-auth users: name -> password."""
    require_auth: bool = False
    """If True, ``/jobs*`` routes need a bearer token (401 AuthenticationRequired otherwise)."""
    clock: Callable[[], float] = time.monotonic
    """Clock driving the job lifecycle and outage windows (injectable for tests)."""


def format_retry_after(seconds: float) -> str:
    """Render a Retry-After header value: an int when whole, else a short decimal."""
    value = max(0.0, float(seconds))
    return str(int(value)) if value.is_integer() else f"{value:g}"

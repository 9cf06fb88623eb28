"""The tunables of prefect-openeo, each overridable by a ``PREFECT_OPENEO_<NAME>`` environment variable.

``settings`` is read from the environment once, at import; code reads its fields when it uses them, so a
test or a long-lived process may also change a field in place (``settings.lane_wait = 2.0``). A value that
does not parse is an error at import that names the variable.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What a run may tune; the defaults suit real backends (CDSE, Terrascope) and campaigns of weeks."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_OPENEO_", validate_assignment=True, extra="ignore")

    # -- the engine ------------------------------------------------------------------------------------
    lane_wait: float = Field(10.0, gt=0, description="Longest a sweep waits for a backend's lane (seconds).")
    check_wait: float = Field(10.0, gt=0, description="Longest a run's start waits for its backend checks (s).")
    download_workers: int = Field(4, ge=1, description="Result downloads running at once.")
    download_attempts: int = Field(3, ge=1, description="How often a failing result download is tried in a run.")
    identical_failures_stop: int = Field(
        5, ge=0, description="Identical start_job failures in a row that stop creating jobs (0: never stop)."
    )

    # -- backends --------------------------------------------------------------------------------------
    max_retries: int = Field(50, ge=0, description="Retries of one request (openeo's manager: 50).")
    token_refresh_max_age: float = Field(60.0, gt=0, description="Refresh an OIDC token older than this (s).")
    limit_backoff_seconds: float = Field(
        300.0, gt=0, description="How long a backend's ConcurrentJobLimit lowers its slots (seconds)."
    )
    max_reconcile_pages: int = Field(100, ge=1, description="Pages of a job listing searched for lost creations.")
    max_sweep_gap: float = Field(60.0, gt=0, description="Longest time between two sweeps of a backend (seconds).")
    due_fraction: float = Field(
        1.0, gt=0, le=1, description="A job is looked at from this share of the median duration seen."
    )
    backoff_fraction: float = Field(
        0.15, gt=0, le=1, description="Before any duration is known: look again after this share of a job's age."
    )
    stuck_after: float = Field(
        60.0, gt=0, description="A backend's sweep unanswered this long counts as an outage (seconds)."
    )
    connect_timeout: float = Field(30.0, gt=0, description="Longest wait to connect to a backend (seconds).")
    read_timeout: float = Field(
        120.0, gt=0, description="Longest wait for a backend's answer, or for more of a download (seconds)."
    )
    start_attempts: int = Field(
        5, ge=1, description="Sweeps that try a row's start when it fails for now (5xx): then start_failed."
    )
    start_request_retries: int = Field(
        3, ge=0, description="Retries of one start request (POST /jobs/{id}/results) within a sweep."
    )
    uncertain_creations: int = Field(
        3, ge=1, description="Creations of a row whose answer was lost (a run): then the row is start_failed."
    )
    probe_wait: float = Field(30.0, gt=0, description="Longest the CLI waits for a backend to answer (seconds).")

    # -- Prefect ---------------------------------------------------------------------------------------
    concurrency_lease_seconds: float = Field(
        900.0, gt=0, description="Lease of a global concurrency slot held for an active job (seconds)."
    )
    table_interval: float = Field(10.0, gt=0, description="Least time between two status-table artifacts (s).")
    cancel_check_seconds: float = Field(
        5.0, gt=0, description="How often a flow run reads its own state to obey a cancel (seconds)."
    )
    flush_timeout: float = Field(60.0, ge=0, description="Longest a run's end waits for Prefect (seconds).")
    reporter_max_events: int = Field(10_000, ge=1, description="Updates queued for Prefect before coalescing.")
    reporter_linger: float = Field(0.3, ge=0, description="Time the reporter gathers updates into one batch (s).")
    task_runs_per_run: int = Field(
        5_000,
        ge=1,
        description="Job task runs in one flow run at most; further jobs go into subflow runs of as many each "
        "(Prefect's UI draws no graph of more than 10,000 nodes).",
    )
    local_stop_wait: float = Field(30.0, gt=0, description="Ctrl-C with --local: longest wait for the loop (s).")

    # -- storage ---------------------------------------------------------------------------------------
    part_size: int = Field(16 << 20, ge=5 << 20, description="Part size of multipart uploads (bytes).")


settings = Settings()

"""Backend access: connections, slots, and batched status sweeps.

All openEO HTTP of a run goes through the connections registered with ``add_backend`` (made resilient the
way openeo's manager does), in the calling process, so ``requests_mock``/``httpretty`` fakes see it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from openeo import Connection
from openeo.rest import OpenEoApiError
from openeo.rest.auth.auth import OidcBearerAuth
from requests.adapters import HTTPAdapter
from urllib3.util import Retry
from urllib3.util.retry import RequestHistory

from prefect_openeo.placement import TOKEN_PREFIX

_log = logging.getLogger(__name__)

#: Same retry budget as openeo's ``MultiBackendJobManager`` (its module constant ``MAX_RETRIES``).
MAX_RETRIES = 50
#: Refresh OIDC access tokens at most this often per connection (seconds), as upstream.
TOKEN_REFRESH_MAX_AGE = 60.0
#: How long a backend that answered ``ConcurrentJobLimit`` keeps its lowered slot budget (seconds).
LIMIT_BACKOFF_SECONDS = 300.0
#: Pages of ``GET /jobs`` read at most when looking for jobs a crashed run created.
MAX_RECONCILE_PAGES = 100
#: Longest a backend's active jobs go without a status sweep while none of them is due (seconds).
MAX_SWEEP_GAP = 60.0
#: A job is due (may have ended) from this fraction of the shortest job duration seen on its backend.
DUE_FRACTION = 0.8
#: Before any job of a backend was seen to make a transition (start running, end), its jobs are swept again
#: once this fraction of the time they have spent in their status has passed since the last sweep: a job
#: running for 10 minutes is looked at again 1.5 minutes later, never later than ``MAX_SWEEP_GAP``.
BACKOFF_FRACTION = 0.15


class BackendError(RuntimeError):
    """A backend that cannot be used as configured (not an openEO API, credentials rejected, ...)."""


class BackendUnavailable(BackendError):
    """A backend that cannot be reached now (down, timing out, 5xx): its lane waits and tries again."""


def is_transient(error: BaseException) -> bool:
    """Whether an error says the backend is unreachable for now rather than unusable as configured."""
    if isinstance(error, BackendUnavailable):
        return True
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(error, requests.exceptions.RetryError):
        return True
    status = getattr(error, "http_status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


_local = threading.local()


@contextlib.contextmanager
def creation_token(token: str | None):
    """While active, ``POST /jobs`` requests of this thread carry ``token`` at the end of the job title."""
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield
    finally:
        _local.token = previous


def tag_title(title: str | None, token: str) -> str:
    return f"{title} [{token}]" if title else f"[{token}]"


def find_token(title: str | None) -> str | None:
    """The creation token in a job title, if any."""
    if not title:
        return None
    match = _TOKEN_RE.search(title)
    return match.group(1) if match else None


_TOKEN_RE = re.compile(r"\[(" + TOKEN_PREFIX + r"[0-9a-f]{12})\]\s*$")


class ManagerAdapter(HTTPAdapter):
    """upstream's retrying adapter, which also tags job creations with the current creation token."""

    def send(self, request: requests.PreparedRequest, *args, **kwargs) -> requests.Response:
        token = getattr(_local, "token", None)
        if token and request.method == "POST" and urllib.parse.urlsplit(request.url).path.rstrip("/").endswith("/jobs"):
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                body = None
            if isinstance(body, dict):
                body["title"] = tag_title(body.get("title"), token)
                request.prepare_body(data=None, files=None, json=body)
        return super().send(request, *args, **kwargs)


class PatientRetry(Retry):
    """upstream's retry budget (``MAX_RETRIES`` with backoff), where the waits a backend asks for with
    ``Retry-After`` on 429/503 do not use up attempts, as long as they add up to less than
    ``retry_after_budget`` seconds for one request (each counted as at least a second).

    A backend in a maintenance window that answers ``503 Retry-After: 5`` for ten minutes is waited for; one
    that keeps failing without saying when to come back exhausts the budget and the error surfaces, as
    with openeo's manager.
    """

    def __init__(self, *args: Any, retry_after_budget: float = 3600.0, retry_after_spent: float = 0.0, **kw: Any):
        super().__init__(*args, **kw)
        self.retry_after_budget = retry_after_budget
        self.retry_after_spent = retry_after_spent

    def new(self, **kw: Any) -> PatientRetry:
        kw.setdefault("retry_after_budget", self.retry_after_budget)
        kw.setdefault("retry_after_spent", self.retry_after_spent)
        return super().new(**kw)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        wait = self.get_retry_after(response) if response is not None and response.status in (429, 503) else None
        if wait is not None and method and self._is_method_retryable(method):
            spent = self.retry_after_spent + max(1.0, wait)
            if spent <= self.retry_after_budget:
                history = self.history + (RequestHistory(method, url, None, response.status, None),)
                return self.new(history=history[-20:], retry_after_spent=spent)
        return super().increment(method, url, response, error, _pool, _stacktrace)


def make_resilient(connection: Connection) -> Connection:
    """Retry 429/500/502/503/504 and network errors with backoff, honouring ``Retry-After``.

    The same budget as upstream's manager (``MAX_RETRIES`` attempts, backoff factor 0.1), for the same
    methods plus ``DELETE`` (cancel is idempotent); waits a backend asks for do not count (``PatientRetry``).
    """
    retries = PatientRetry(
        total=MAX_RETRIES,
        read=MAX_RETRIES,
        other=MAX_RETRIES,
        status=MAX_RETRIES,
        backoff_factor=0.1,
        status_forcelist=[429, 500, 502, 503, 504],
        allowed_methods=["HEAD", "GET", "OPTIONS", "POST", "DELETE"],
    )
    adapter = ManagerAdapter(max_retries=retries)
    connection.session.mount("https://", adapter)
    connection.session.mount("http://", adapter)
    return connection


@dataclass
class JobReport:
    """What a sweep learned about one job."""

    status: str
    #: The full ``GET /jobs/{id}`` document when it was fetched (carries usage and costs).
    details: dict | None = None
    costs: Any = None
    #: For a job in ``error``: its error-level log entries (the backend's reason), or None if unavailable.
    error_logs: list[dict] | None = None
    #: Why the error logs could not be read, if they could not.
    logs_error: str | None = None


@dataclass
class SweepResult:
    """Statuses of a backend's jobs, plus what could not be learned and why."""

    reports: dict[str, JobReport] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)
    listing_requests: int = 0
    describe_requests: int = 0
    log_requests: int = 0


class Backend:
    """One registered backend: a connection getter, its slot budget, and what it supports."""

    def __init__(self, name: str, connection: Connection | Callable[[], Connection], parallel_jobs: int = 2):
        if isinstance(connection, Connection):
            fixed = connection
            connection = lambda: fixed  # noqa: E731
        if not callable(connection):
            raise TypeError(
                f"Backend {name!r}: connection must be an openeo Connection or a callable, got {connection!r}"
            )
        if not isinstance(parallel_jobs, int) or parallel_jobs < 0:
            raise ValueError(f"Backend {name!r}: parallel_jobs must be a non-negative int, got {parallel_jobs!r}")
        self.name = name
        self.get_connection = connection
        self.parallel_jobs = parallel_jobs
        self._connection: Connection | None = None
        #: None: unknown yet; False: listing failed where per-job requests worked, so it is not used.
        self.listing_works: bool | None = None
        self._last_token_refresh: dict[int, float] = {}
        #: While the backend answers ``ConcurrentJobLimit``: its lowered slot budget, and until when.
        self._limited_slots: int | None = None
        self._limited_until = 0.0
        self._checked = False
        self._connecting = threading.Lock()
        #: Seconds from creation to first seen running, and to the end, of the last jobs seen here; the last
        #: sweep's time.
        self._to_running: collections.deque[float] = collections.deque(maxlen=20)
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._last_sweep = 0.0
        #: Active job id -> (its status, when this process first saw it so): how long it went unchanged here.
        self._unchanged: dict[str, tuple[str, float]] = {}

    def connection(self) -> Connection:
        """The backend's connection, created once and made resilient.

        Raises ``BackendUnavailable`` when the backend cannot be reached now, ``BackendError`` when it cannot
        be used at all (not openEO, credentials rejected, a broken connection getter).
        """
        with self._connecting:  # one connection, even when the start check and the lane ask at once
            return self._connect()

    def _connect(self) -> Connection:
        if self._connection is None:
            try:
                connection = self.get_connection()
            except Exception as e:
                if is_transient(e):
                    raise BackendUnavailable(f"Backend {self.name!r}: cannot be reached now: {e}") from e
                raise BackendError(f"Backend {self.name!r}: cannot connect (is it an openEO API?): {e}") from e
            if not isinstance(connection, Connection):
                raise BackendError(f"Backend {self.name!r}: the connection getter returned {connection!r}")
            self._connection = make_resilient(connection)
        return self._connection

    def check(self) -> None:
        """Fail clearly when the backend is not a usable openEO API (``BackendError``); raise
        ``BackendUnavailable`` when it cannot be reached now."""
        connection = self.connection()
        try:
            api_version = connection.capabilities().api_version()
        except Exception as e:
            if is_transient(e):
                raise BackendUnavailable(f"Backend {self.name!r} at {connection.root_url}: unreachable: {e}") from e
            raise BackendError(f"Backend {self.name!r} at {connection.root_url}: not a usable openEO API: {e}") from e
        if not api_version:
            raise BackendError(f"Backend {self.name!r} at {connection.root_url}: no api_version in its capabilities")
        self._checked = True

    def ensure_ready(self) -> None:
        """``check`` once: after a successful check, nothing (an outage then shows in the requests)."""
        if not self._checked:
            self.check()

    def error_logs(self, job_id: str) -> list[dict]:
        """A job's error-level log entries (``GET /jobs/{id}/logs?level=error``), as plain dicts."""
        return [dict(entry) for entry in self.connection().job(job_id).logs(level="error")]

    def limit(self) -> int | None:
        """While the backend refuses more jobs (``ConcurrentJobLimit``): how many it takes; else None."""
        if self._limited_slots is not None and time.time() < self._limited_until:
            return self._limited_slots
        self._limited_slots = None
        return None

    def slots(self) -> int:
        """Jobs this backend may have active now: ``parallel_jobs``, lowered while it refuses more."""
        limit = self.limit()
        return self.parallel_jobs if limit is None else min(self.parallel_jobs, limit)

    def note_running(self, seconds: float) -> None:
        """A job of this backend was first seen running ``seconds`` after it was created."""
        self._to_running.append(max(0.0, seconds))

    def note_end(self, seconds: float) -> None:
        """A job of this backend ended ``seconds`` after it was created."""
        self._durations.append(max(0.0, seconds))

    def sweep_due(self, jobs: Iterable[tuple[str, float | None, str]], now: float) -> bool:
        """Whether any of ``jobs`` (job id, creation time in epoch seconds or None, status) may have changed
        by ``now``.

        A waiting job may start running, a running one may end: each is due from ``DUE_FRACTION`` of the
        shortest such time seen on this backend. Until one was seen, a job is due once ``BACKOFF_FRACTION`` of
        the time since this process first saw it in its status has passed since the last sweep (never from
        recorded times: a resumed run knows nothing newer of its jobs than that they were running). Either way
        the jobs are swept at least every ``MAX_SWEEP_GAP`` seconds.
        """
        jobs = list(jobs)
        unchanged = {}
        for job_id, _, status in jobs:
            seen_here = self._unchanged.get(job_id)
            unchanged[job_id] = seen_here if seen_here and seen_here[0] == status else (status, now)
        self._unchanged = unchanged  # jobs no longer active are forgotten
        last = self._last_sweep
        if now - last >= MAX_SWEEP_GAP:
            return True
        for job_id, created, status in jobs:
            seen = self._durations if status == "running" else self._to_running
            if created is None:
                return True
            if seen:
                if now - created >= DUE_FRACTION * min(seen):
                    return True
            elif now - last >= BACKOFF_FRACTION * (last - unchanged[job_id][1]):
                return True
        return False

    def note_sweep(self, now: float) -> None:
        self._last_sweep = now

    def refuse_more(self, active: int, seconds: float = LIMIT_BACKOFF_SECONDS) -> None:
        """The backend said ``ConcurrentJobLimit`` with ``active`` jobs: use no more than that for a while."""
        self._limited_slots = max(1, active)
        self._limited_until = time.time() + seconds
        _log.info(f"Backend {self.name!r} refuses more jobs: at most {self._limited_slots} for {seconds:.0f} s")

    def refresh_token(self, connection: Connection | None = None) -> None:
        """Proactively refresh an OIDC access token, at most once per minute per connection."""
        connection = connection or self.connection()
        if not isinstance(connection.auth, OidcBearerAuth):
            return
        now = time.time()
        if self._last_token_refresh.get(id(connection), 0) + TOKEN_REFRESH_MAX_AGE < now:
            if connection.try_access_token_refresh():
                self._last_token_refresh[id(connection)] = now
            else:
                _log.warning(f"Failed to proactively refresh bearer token for backend {self.name!r}")

    def advertises_listing(self) -> bool:
        try:
            capabilities = self.connection().capabilities()
            return bool(capabilities.supports_endpoint("/jobs", method="GET"))
        except Exception:  # capabilities without an endpoints list: assume no listing
            return False

    def list_jobs(
        self, wanted: Iterable[str], page_size: int, *, key: Callable[[dict], Any] = lambda e: e["id"], max_pages=None
    ) -> tuple[dict[Any, dict], int]:
        """Entries of ``GET /jobs`` (newest first with ``limit``), following ``rel=next`` until every wanted
        key (by default the job id) was seen, the listing ends, or ``max_pages`` were read.

        Returns the listed entries by key and the number of requests made.
        """
        wanted = set(wanted)
        connection = self.connection()
        found: dict[Any, dict] = {}
        url: str | None = "/jobs"
        params: dict | None = {"limit": page_size}
        requests_made = 0
        seen_urls: set[str] = set()
        while url and not wanted.issubset(found) and (max_pages is None or requests_made < max_pages):
            resp = connection.get(url, params=params, expected_status=200)
            requests_made += 1
            doc = resp.json()
            entries = doc.get("jobs")
            if not isinstance(entries, list):
                raise ValueError(f"Backend {self.name!r}: GET /jobs did not return a 'jobs' list")
            for entry in entries:
                if isinstance(entry, dict) and "id" in entry and "status" in entry:
                    found[key(entry)] = entry
            url = next(
                (
                    link.get("href")
                    for link in doc.get("links", [])
                    if isinstance(link, dict) and link.get("rel") == "next"
                ),
                None,
            )
            if url in seen_urls:  # a backend that links to itself must not loop forever
                break
            if url:
                seen_urls.add(url)
            params = None
        return found, requests_made

    def describe(self, job_id: str) -> dict:
        return self.connection().job(job_id).describe()

    def find_created(self, tokens: Iterable[str]) -> dict[str, dict]:
        """Jobs on the backend whose title carries one of ``tokens`` (created by a run that crashed)."""
        tokens = set(tokens)
        if not tokens or not self.advertises_listing():
            return {}
        found, _ = self.list_jobs(
            tokens, page_size=100, key=lambda e: find_token(e.get("title")), max_pages=MAX_RECONCILE_PAGES
        )
        return {token: entry for token, entry in found.items() if token in tokens}


def sweep_statuses(backend: Backend, job_ids: Iterable[str], *, details_for_terminal: bool = True) -> SweepResult:
    """Learn the status of ``job_ids`` with as few requests as possible, and why jobs failed.

    Uses the backend's job listing (one request per page) when it has one, and per-job ``GET /jobs/{id}``
    for the jobs the listing lacks, for backends without listing, and once per job that ended (for usage);
    for a job that ended in error, its error logs (the backend's reason). Transport errors that exhausted the
    connection's retry budget propagate, as upstream.
    """
    job_ids = list(dict.fromkeys(job_ids))
    result = SweepResult()
    if not job_ids:
        return result
    listed: dict[str, dict] = {}
    listing_failed = False
    if backend.listing_works is not False and backend.advertises_listing():
        try:
            listed, result.listing_requests = backend.list_jobs(job_ids, page_size=max(100, len(job_ids) + 20))
        except Exception as e:  # any failing listing: per-job requests decide whether the backend is reachable
            _log.info(f"Job listing of backend {backend.name!r} failed ({e!r}): falling back to per-job requests")
            listing_failed = True
            result.listing_requests += 1
    elif backend.listing_works is None:
        backend.listing_works = False

    from prefect_openeo.states import TERMINAL

    per_job_ok = 0
    for job_id in job_ids:
        entry = listed.get(job_id)
        if entry is not None and not (details_for_terminal and entry["status"] in TERMINAL):
            result.reports[job_id] = JobReport(status=entry["status"], costs=entry.get("costs"))
            continue
        if entry is not None and entry.get("usage") and entry["status"] != "error":
            # The listing carries what the job's own document would: no request for it.
            result.reports[job_id] = JobReport(status=entry["status"], details=entry, costs=entry.get("costs"))
            continue
        try:
            details = backend.describe(job_id)
            result.describe_requests += 1
            per_job_ok += 1
        except OpenEoApiError as e:
            result.describe_requests += 1
            result.errors[job_id] = e
            continue
        report = JobReport(status=details["status"], details=details, costs=details.get("costs"))
        if report.status == "error":
            try:
                report.error_logs = backend.error_logs(job_id)
                result.log_requests += 1
            except Exception as e:  # the reason is a nicety: the status is what matters
                report.logs_error = f"{e!r}"
                _log.warning(f"Could not read the error logs of job {job_id!r} on backend {backend.name!r}: {e!r}")
        result.reports[job_id] = report
    if listing_failed and per_job_ok:
        # The listing is broken where per-job requests work: stop paying for it.
        backend.listing_works = False
    elif listed:
        backend.listing_works = True
    return result

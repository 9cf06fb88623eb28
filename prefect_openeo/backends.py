"""Backend access: connections, slots, and batched status sweeps.

All openEO HTTP of a run goes through the connections registered with ``add_backend`` (made resilient the
way openeo's manager does), in the calling process, so ``requests_mock``/``httpretty`` fakes see it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from openeo import Connection
from openeo.rest.auth.auth import OidcBearerAuth
from openeo.util import rfc3339
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import Retry
from urllib3.util.retry import RequestHistory

from prefect_openeo.placement import TOKEN_PREFIX
from prefect_openeo.settings import settings

_log = logging.getLogger(__name__)


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


def _authorization(connection: Connection) -> str | None:
    bearer = getattr(connection.auth, "bearer", None)
    return f"Bearer {bearer}" if bearer else None


def is_start(request: requests.PreparedRequest) -> bool:
    """Whether a request starts a batch job (``POST /jobs/{id}/results``)."""
    return request.method == "POST" and urllib.parse.urlsplit(request.url).path.rstrip("/").endswith("/results")


def is_create(request: requests.PreparedRequest) -> bool:
    """Whether a request creates a batch job (``POST /jobs``)."""
    return request.method == "POST" and urllib.parse.urlsplit(request.url).path.rstrip("/").endswith("/jobs")


def bounded_timeout(timeout: Any) -> tuple[float, float]:
    """A request's (connect, read) timeout, at most ``settings.connect_timeout`` and ``settings.read_timeout``:
    no request waits unbounded for a backend (the read timeout bounds each wait for data, not a download)."""
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    return (
        min(connect or settings.connect_timeout, settings.connect_timeout),
        min(read or settings.read_timeout, settings.read_timeout),
    )


def uncertain(error: BaseException) -> bool:
    """Whether a failed job creation may have created the job all the same: the request reached the backend
    but its answer was lost (a 5xx, a timeout or a connection dropped while waiting for the answer)."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return False  # never reached the backend
    if isinstance(
        error, (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError, requests.exceptions.SSLError)
    ):
        return True
    if isinstance(error, requests.exceptions.ConnectionError):
        return "RemoteDisconnected" in str(error) or "Connection aborted" in str(error)
    status = getattr(error, "http_status_code", None)
    return isinstance(status, int) and status >= 500


#: Error codes of an access token the backend no longer accepts (the client must sign in again).
AUTH_CODES = ("TokenInvalid", "TokenExpired", "AuthenticationRequired", "AuthenticationSchemeInvalid")


def refused_token(response: requests.Response) -> bool:
    """Whether a backend refused the request's access token (401/403 with an openEO authentication code)."""
    if response.status_code not in (401, 403) or "Authorization" not in response.request.headers:
        return False
    try:
        return response.json().get("code") in AUTH_CODES
    except (ValueError, AttributeError):
        return False


class ManagerAdapter(HTTPAdapter):
    """upstream's retrying adapter, which also bounds every request's timeout and tags job creations with the
    current creation token. A creation is retried only where the backend did nothing (it refused with 429,
    or 503 with ``Retry-After``, or could not be reached): after a lost answer the job may exist, and the
    engine looks for it by its token before creating it again."""

    #: Signs in again and returns the new ``Authorization`` header (None: cannot); set by ``make_resilient``.
    reauthenticate: Callable[[], str | None] | None = None

    def send(self, request: requests.PreparedRequest, *args, **kwargs) -> requests.Response:
        response = self._bounded_send(request, *args, **kwargs)
        if self.reauthenticate is not None and refused_token(response):
            header = self.reauthenticate()
            if header is not None:  # the same request once more, signed in again
                request.headers["Authorization"] = header
                response = self._bounded_send(request, *args, **kwargs)
        return response

    def _bounded_send(self, request: requests.PreparedRequest, *args, **kwargs) -> requests.Response:
        kwargs["timeout"] = bounded_timeout(kwargs.get("timeout"))
        _local.creating, _local.starting = is_create(request), is_start(request)
        try:
            return self._send(request, *args, **kwargs)
        finally:
            _local.creating = _local.starting = False

    def _send(self, request: requests.PreparedRequest, *args, **kwargs) -> requests.Response:
        token = getattr(_local, "token", None)
        if token and is_create(request):
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                body = None
            if isinstance(body, dict):
                body["title"] = tag_title(body.get("title"), token)
                request.prepare_body(data=None, files=None, json=body)
        return super().send(request, *args, **kwargs)


class PatientRetry(Retry):
    """upstream's retry budget (``settings.max_retries`` with backoff), where the waits a backend asks for with
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

    def _is_method_retryable(self, method: str) -> bool:
        return not getattr(_local, "creating", False) and super()._is_method_retryable(method)

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if getattr(_local, "creating", False):  # refused, nothing done: safe to send again
            return status_code == 429 or (status_code == 503 and has_retry_after)
        return super().is_retry(method, status_code, has_retry_after)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        wait = self.get_retry_after(response) if response is not None and response.status in (429, 503) else None
        if wait is not None and method and self.is_retry(method, response.status, has_retry_after=True):
            spent = self.retry_after_spent + max(1.0, wait)
            if spent <= self.retry_after_budget:
                history = self.history + (RequestHistory(method, url, None, response.status, None),)
                return self.new(history=history[-20:], retry_after_spent=spent)
        if (
            getattr(_local, "creating", False)
            and error is not None
            and not isinstance(error, (NewConnectionError, ConnectTimeoutError))
        ):  # the request may have reached the backend (a TLS or protocol error on the answer): never sent again
            return Retry.increment(self.new(total=0), method, url, response, error, _pool, _stacktrace)
        if getattr(_local, "starting", False) and len(self.history) >= settings.start_request_retries:
            # A start that keeps failing is tried again next sweep (the lane's other work goes on meanwhile)
            return Retry.increment(self.new(total=0), method, url, response, error, _pool, _stacktrace)
        return super().increment(method, url, response, error, _pool, _stacktrace)


def make_resilient(connection: Connection, reauthenticate: Callable[[], str | None] | None = None) -> Connection:
    """Retry 429/500/502/503/504 and network errors with backoff, honouring ``Retry-After``.

    The same budget as upstream's manager (``settings.max_retries`` attempts, backoff factor 0.1), for the same
    methods plus ``DELETE`` (cancel is idempotent); waits a backend asks for do not count (``PatientRetry``).
    """
    retries = PatientRetry(
        total=settings.max_retries,
        read=settings.max_retries,
        other=settings.max_retries,
        status=settings.max_retries,
        backoff_factor=0.1,
        status_forcelist=[429, 500, 502, 503, 504],
        allowed_methods=["HEAD", "GET", "OPTIONS", "POST", "DELETE"],
    )
    adapter = ManagerAdapter(max_retries=retries)
    adapter.reauthenticate = reauthenticate
    connection.session.mount("https://", adapter)
    connection.session.mount("http://", adapter)
    return connection


def _duration_estimate(details: dict | None, created: float, now: float) -> float:
    """How long a job that ended took, in seconds: the sweep times aim at its end.

    From the backend's own ``created`` and ``updated`` (its end) where its document has them; else from
    when this run's creation returned (``created``, epoch seconds) to ``now``, the sweep that saw it ended
    (which adds the time until that sweep). Timestamps of whole seconds (as openeo-geopyspark-driver's)
    put the duration within a second either side of their difference: then the latest end those bounds
    and this run's own clock allow (``updated`` + 1 s, no later than ``now``), since a look that comes too
    early costs a whole ``poll_sleep`` and one that comes late only its lateness. Where the clocks disagree
    so much that this leaves the bounds, the difference stands.
    """
    took = _backend_duration(details)
    if took is None:
        return max(0.0, now - created)
    stamps = (str(details["created"]), str(details["updated"]))  # _backend_duration found both
    if any(re.search(r"\d\d:\d\d:\d\d\.\d", stamp) for stamp in stamps):
        return took
    ended_by = rfc3339.parse_datetime(stamps[1], with_timezone=True).timestamp() + 1.0
    latest = min(took + 1.0, ended_by - created, now - created)
    return latest if latest > took - 1.0 else took


def _backend_duration(details: dict | None) -> float | None:
    """Seconds from a job's ``created`` to its ``updated`` (for an ended job: its end), as its backend says."""
    if not isinstance(details, dict) or not details.get("created") or not details.get("updated"):
        return None
    try:
        created = rfc3339.parse_datetime(str(details["created"]), with_timezone=True)
        updated = rfc3339.parse_datetime(str(details["updated"]), with_timezone=True)
    except (ValueError, TypeError):
        return None
    took = (updated - created).total_seconds()
    return took if took >= 0 else None


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
        #: Whether a new connection can be had (a callable that connects and signs in), e.g. after a token expired.
        self.renewable = not isinstance(connection, Connection)
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
        self._signing_in = threading.RLock()
        self._signed_in_at = 0.0
        #: How often this run signed in again.
        self.stats_signed_in = 0
        #: Why the backend refuses this run and signing in again did not help (None: it does not).
        self.signed_out: str | None = None
        #: While the backend answers ``ConcurrentJobLimit``: its lowered slot budget, and until when.
        self._limited_slots: int | None = None
        self._limited_until = 0.0
        self._said: set[str] = set()
        self._checked = False
        self._connecting = threading.Lock()
        #: Seconds from creation to first seen running, and to the end, of the last jobs this run created
        #: here (a job created by an earlier run counts the pause between the runs); the last sweep's time.
        self._created_here: dict[str, float] = {}
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
            self._connection = make_resilient(connection, self.reauthenticate)
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
        return None

    def first_time(self, key: str) -> bool:
        """Whether ``key`` (e.g. a kind of odd answer) is seen for the first time on this backend: said once."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def note_created(self, job_id: str, at: float) -> None:
        """This run created job ``job_id`` here at ``at`` (epoch seconds): its durations teach the sweeps."""
        self._created_here[job_id] = at

    def note_running(self, job_id: str, now: float) -> None:
        """A job was first seen running: how long it waited counts if this run created it."""
        if job_id in self._created_here:
            self._to_running.append(max(0.0, now - self._created_here[job_id]))

    def note_end(self, job_id: str, now: float, details: dict | None = None) -> None:
        """A job was seen ended: how long it took counts if this run created it (``_duration_estimate``)."""
        created = self._created_here.pop(job_id, None)
        if created is None:
            return
        self._durations.append(_duration_estimate(details, created, now))

    def expected_duration(self) -> float | None:
        """The mean time from creation to end of the jobs this run created here (None: fewer than 3 ended)."""
        return sum(self._durations) / len(self._durations) if len(self._durations) >= 3 else None

    def sweep_due(self, jobs: Iterable[tuple[str, float | None, str]], now: float, min_gap: float = 0.0) -> bool:
        """Whether any of ``jobs`` (job id, creation time in epoch seconds or None, status) may have changed
        by ``now`` (``next_look``); also notes since when this process has seen each job in its status."""
        jobs = list(jobs)
        unchanged = {}
        for job_id, _, status in jobs:
            seen_here = self._unchanged.get(job_id)
            unchanged[job_id] = seen_here if seen_here and seen_here[0] == status else (status, now)
        self._unchanged = unchanged  # jobs no longer active are forgotten
        due = self.next_look(jobs, min_gap)
        return due is not None and now >= due - 1e-3

    def next_look(self, jobs: Iterable[tuple[str, float | None, str]], min_gap: float = 0.0) -> float | None:
        """When (epoch seconds) the next sweep of ``jobs`` may learn something; None without jobs.

        A waiting job may start running, a running one may end: each is due from ``settings.due_fraction``
        of the median such time seen on this backend (jobs this run created; an ended job's duration as
        ``_duration_estimate`` has it, so that the look comes when it ends, not a poll late). Until one was
        seen, a job is
        due once ``settings.backoff_fraction`` of the time since this process first saw it in its status
        has passed since the last sweep (never from recorded times: a resumed run knows nothing newer of its
        jobs than that they were running). Never sooner than ``min_gap`` (the user's ``poll_sleep``) after the
        backend's last sweep, never later than ``settings.max_sweep_gap``.
        """
        jobs = list(jobs)
        if not jobs:
            return None
        last = self._last_sweep
        times = []
        for job_id, recorded, status in jobs:
            seen = self._durations if status == "running" else self._to_running
            created = self._created_here.get(job_id, recorded)  # when this run's creation returned
            if created is None:
                times.append(-math.inf)
            elif seen:
                times.append(created + settings.due_fraction * statistics.median(seen))
            elif job_id in self._unchanged:
                times.append(last + settings.backoff_fraction * max(0.0, last - self._unchanged[job_id][1]))
            else:
                times.append(-math.inf)
        return max(last + min_gap, min(last + settings.max_sweep_gap, min(times)))

    def note_sweep(self, now: float) -> None:
        self._last_sweep = now

    def refuse_more(self, active: int, seconds: float | None = None) -> None:
        """The backend said ``ConcurrentJobLimit`` with ``active`` jobs: use no more than that for a while."""
        seconds = settings.limit_backoff_seconds if seconds is None else seconds
        self._limited_slots = max(1, active)
        self._limited_until = time.time() + seconds
        _log.info(f"Backend {self.name!r} refuses more jobs: at most {self._limited_slots} for {seconds:.0f} s")

    def reauthenticate(self) -> str | None:
        """The backend refused the access token: sign in again and return the new ``Authorization`` header.

        A backend given as a callable (a connection factory, an ``OpenEOBackend`` block's ``get_connection``) is
        asked for a new connection, whose credentials the run's connection takes over; an OIDC connection is
        refreshed with its refresh token. Several threads refused at once sign in once. None where it cannot
        be done (a plain ``Connection`` with a basic-auth token) or failed: said once, the request's error
        stands (the backend's rows wait, the run says why)."""
        with self._signing_in:
            connection = self._connection
            if connection is None:
                return None
            now = time.monotonic()
            if now - self._signed_in_at < 2.0:  # another thread just did: use its token
                return _authorization(connection)
            try:
                if self.renewable:
                    auth = self.get_connection().auth
                    if auth is None:
                        raise BackendError(
                            f"Backend {self.name!r}: the connection callable gave an unauthenticated connection"
                        )
                    connection.auth = auth
                elif not (isinstance(connection.auth, OidcBearerAuth) and connection.try_access_token_refresh()):
                    self.signed_out = (
                        f"Backend {self.name!r} no longer accepts the access token, and was given as a connection "
                        "object that cannot sign in again: give add_backend a callable that connects and "
                        "authenticates (e.g. lambda: openeo.connect(url).authenticate_oidc())"
                    )
                    return None
            except Exception as e:
                self.signed_out = f"Backend {self.name!r} refuses the access token; signing in again failed: {e!r}"
                return None
            self.signed_out = None
            self._signed_in_at = time.monotonic()
            self.stats_signed_in += 1
            _log.info(f"Backend {self.name!r}: signed in again (the access token was refused)")
            return _authorization(connection)

    def refresh_token(self, connection: Connection | None = None) -> None:
        """Proactively refresh an OIDC access token, at most once per minute per connection."""
        connection = connection or self.connection()
        if not isinstance(connection.auth, OidcBearerAuth):
            return
        now = time.time()
        if self._last_token_refresh.get(id(connection), 0) + settings.token_refresh_max_age < now:
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
            tokens, page_size=100, key=lambda e: find_token(e.get("title")), max_pages=settings.max_reconcile_pages
        )
        return {token: entry for token, entry in found.items() if token in tokens}


def sweep_statuses(backend: Backend, job_ids: Iterable[str]) -> SweepResult:
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
        if entry is not None and entry["status"] not in TERMINAL:
            result.reports[job_id] = JobReport(status=entry["status"], costs=entry.get("costs"))
            continue
        if entry is not None and entry.get("usage") and entry["status"] != "error":
            # The listing carries what the job's own document would: no request for it.
            result.reports[job_id] = JobReport(status=entry["status"], details=entry, costs=entry.get("costs"))
            continue
        try:
            details = backend.describe(job_id)
            result.describe_requests += 1
            if not isinstance(details, dict) or not isinstance(details.get("status"), str):
                raise ValueError(f"the backend's document of job {job_id} has no status: {str(details)[:120]!r}")
            per_job_ok += 1
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError):
            raise  # the backend cannot be reached (or its retry budget is spent, as upstream): the sweep fails
        except Exception as e:  # an API error, an HTML page, a document without status: this job's problem
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

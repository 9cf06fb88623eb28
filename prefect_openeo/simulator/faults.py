"""A fault-injecting layer for the simulator: the misbehaviour of real openEO backends, on demand.

``BackendSimulator.faults`` holds ``Fault`` rules, read live on every request (add or clear them while a run
goes on). The first rule that matches a request (method, path, job) and is in force decides what happens:

- ``html``: 200 with an HTML page instead of JSON (a proxy's or a portal's maintenance page);
- ``status``: the backend's answer with the job's ``status`` replaced (e.g. ``"paused"``, which openEO does
  not define), in ``GET /jobs/{id}`` and in the entries of ``GET /jobs``;
- ``drop_field``: the backend's answer with a field (``field``) removed from the job document and entries;
- ``hang``: no answer for ``seconds`` (None: as long as the rule is in force), then the backend's answer;
- ``lose_reply``: the backend does the request (a job is created, started, ...) but the client gets an
  error (``http_status``, default 500) instead of its reply;
- ``error``: an openEO error (``http_status``, ``code``) without doing anything (5xx storms, 429s);
- ``expire_tokens``: basic-auth access tokens last ``seconds``; a request with an older one is
  ``403 TokenInvalid`` (the client must sign in again).

A rule is in force from ``after`` seconds after it was added, for ``duration`` seconds (None: until removed),
for at most ``times`` matching requests (None: all). ``hits`` counts what each rule did.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Fault", "Faults", "FaultInjector"]

ACTIONS = ("html", "status", "drop_field", "hang", "lose_reply", "error", "expire_tokens")
_JOB_PATH = re.compile(r"^/jobs/([^/]+)")
_HTML = b"<!DOCTYPE html><html><head><title>Maintenance</title></head><body>Back soon.</body></html>"


@dataclass
class Fault:
    """One misbehaviour (see the module's docstring)."""

    action: str
    method: str = "*"
    #: A regular expression the request's path must match from its start, e.g. ``/jobs$`` or ``/jobs/[^/]+$``.
    path: str = ".*"
    #: Only requests about these jobs (the ``{id}`` of ``/jobs/{id}...``; for ``GET /jobs``, its entries).
    job_ids: set[str] | None = None
    after: float = 0.0
    duration: float | None = None
    times: int | None = None
    seconds: float | None = None
    http_status: int = 500
    code: str = "Internal"
    job_status: str = "paused"
    field_name: str = "status"
    added: float = field(default_factory=time.monotonic)
    hits: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown fault action {self.action!r} (one of {', '.join(ACTIONS)})")
        self._path = re.compile(self.path)

    def in_force(self, now: float) -> bool:
        start = self.added + self.after
        ended = self.duration is not None and now >= start + self.duration
        return start <= now and not ended and (self.times is None or self.hits < self.times)

    def matches(self, method: str, path: str, now: float) -> bool:
        if self.method not in ("*", method) or not self._path.match(path) or not self.in_force(now):
            return False
        if self.job_ids is None or self.action in ("status", "drop_field") and path == "/jobs":
            return True
        job = _JOB_PATH.match(path)
        return job is not None and job.group(1) in self.job_ids

    def until(self) -> float | None:
        """When the rule stops being in force (monotonic), if it does by time."""
        return None if self.duration is None else self.added + self.after + self.duration


class Faults:
    """The rules of one simulator; thread-safe."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []
        self._lock = threading.Lock()
        #: Basic-auth tokens handed out while ``expire_tokens`` was in force: suffix -> when.
        self._issued: dict[str, float] = {}

    def add(self, *faults: Fault) -> Fault:
        with self._lock:
            for fault in faults:
                fault.added = time.monotonic()
                self._rules.append(fault)
        return faults[-1]

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def hits(self) -> dict[str, int]:
        """How many requests each action acted on."""
        with self._lock:
            counts: dict[str, int] = {}
            for rule in self._rules:
                counts[rule.action] = counts.get(rule.action, 0) + rule.hits
            return counts

    def pick(self, method: str, path: str) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            for rule in self._rules:
                if rule.action != "expire_tokens" and rule.matches(method, path, now):
                    rule.hits += 1
                    return rule
        return None

    def token_rule(self) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            return next((r for r in self._rules if r.action == "expire_tokens" and r.in_force(now)), None)

    def issue(self) -> str:
        suffix = uuid.uuid4().hex[:8]
        with self._lock:
            self._issued[suffix] = time.monotonic()
        return suffix

    def issued(self, suffix: str) -> float | None:
        with self._lock:
            return self._issued.get(suffix)


class FaultInjector:
    """ASGI middleware in front of the simulator that applies ``Faults``."""

    def __init__(self, app: ASGIApp, faults: Faults):
        self.app = app
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        tokens = self.faults.token_rule()
        if tokens is not None:
            refused = self._check_token(scope, tokens)
            if refused:
                await _send_json(send, 403, {"code": "TokenInvalid", "message": refused})
                return
            if path.rstrip("/").endswith("/credentials/basic"):
                await self._issue_token(scope, receive, send)
                return
        rule = self.faults.pick(method, path)
        if rule is None:
            await self.app(scope, receive, send)
            return
        if rule.action == "html":
            await _send(send, 200, _HTML, b"text/html; charset=utf-8")
        elif rule.action == "error":
            await _send_json(send, rule.http_status, {"code": rule.code, "message": f"Simulated {rule.code}"})
        elif rule.action == "hang":
            end = rule.until()
            wait = rule.seconds if rule.seconds is not None else (3600.0 if end is None else end - time.monotonic())
            await asyncio.sleep(max(0.0, wait))
            await self.app(scope, receive, send)
        elif rule.action == "lose_reply":
            status, body = await _call(self.app, scope, receive)
            await _send_json(send, rule.http_status, {"code": rule.code, "message": f"Lost reply (was {status})"})
        else:  # status, drop_field: the backend's answer, rewritten
            status, body = await _call(self.app, scope, receive)
            await _send(send, status, _rewrite(body, rule), b"application/json")

    def _check_token(self, scope: Scope, rule: Fault) -> str | None:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
        if not header.startswith("Bearer basic//"):
            return None
        _, _, suffix = header.rpartition(".")
        issued = self.faults.issued(suffix)
        lifetime = rule.seconds or 60.0
        if issued is None or time.monotonic() - issued > lifetime:
            rule.hits += 1
            return "Authorization token has expired or is invalid. Please authenticate again."
        # the simulator itself knows the token without its suffix
        headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        headers.append((b"authorization", header.rpartition(".")[0].encode()))
        scope["headers"] = headers
        return None

    async def _issue_token(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, body = await _call(self.app, scope, receive)
        try:
            doc = json.loads(body)
            doc["access_token"] = f"{doc['access_token']}.{self.faults.issue()}"
            body = json.dumps(doc).encode()
        except (ValueError, KeyError, TypeError):
            pass
        await _send(send, status, body, b"application/json")


def _rewrite(body: bytes, rule: Fault) -> bytes:
    try:
        doc = json.loads(body)
    except ValueError:
        return body

    def fix(entry: Any) -> None:
        if not isinstance(entry, dict) or (rule.job_ids is not None and entry.get("id") not in rule.job_ids):
            return
        if rule.action == "status" and "status" in entry:
            entry["status"] = rule.job_status
        elif rule.action == "drop_field":
            entry.pop(rule.field_name, None)

    if isinstance(doc, dict) and isinstance(doc.get("jobs"), list):
        for entry in doc["jobs"]:
            fix(entry)
    else:
        fix(doc)
    return json.dumps(doc).encode()


async def _call(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, bytes]:
    """Run the app for a request and collect its answer."""
    answer: dict[str, Any] = {"status": 500, "body": b""}

    async def collect(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, collect)
    return answer["status"], answer["body"]


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, doc: dict) -> None:
    doc = {"id": str(uuid.uuid4()), **doc}
    await _send(send, status, json.dumps(doc).encode(), b"application/json")

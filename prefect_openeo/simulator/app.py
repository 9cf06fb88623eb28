"""Starlette application exposing a :class:`BackendState` as an openEO API 1.2 backend."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .assets import asset_bytes, asset_checksum, parse_range
from .config import SimulatorConfig, format_retry_after
from .metadata import API_VERSION, BACKEND_VERSION, COLLECTIONS, FILE_FORMATS, PROCESSES, collection_summary
from .state import LOG_LEVELS, BackendState, Job, SimulatorError

__all__ = ["create_app", "access_token", "ANONYMOUS"]

ANONYMOUS = "anonymous"
_NO_429 = frozenset({"/", "/.well-known/openeo"})
_PROCESS_IDS = frozenset(p["id"] for p in PROCESSES)

Handler = Callable[[Request, bytes], Response]


def access_token(seed: int, user: str) -> str:
    """The (deterministic) basic-auth access token of ``user``."""
    return hashlib.sha256(f"prefect-openeo-simulator:{seed}:{user}".encode()).hexdigest()[:32]


def _asset_signature(seed: int, job_id: str, asset: str) -> str:
    return hashlib.sha256(f"asset:{seed}:{job_id}/{asset}".encode()).hexdigest()[:24]


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or str(uuid.uuid4())


def error_response(
    request_id: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An openEO error document with a ``Request-Id`` header."""
    body = {"id": request_id, "code": code, "message": message, "links": []}
    return JSONResponse(body, status_code=status, headers={"Request-Id": request_id, **(headers or {})})


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"before:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, seq = text.partition(":")
        if prefix != "before":
            raise ValueError(text)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise SimulatorError(400, "InvalidPaginationCursor", f"Invalid pagination cursor {cursor!r}.") from e


def _extent(job: Job) -> dict[str, Any]:
    """STAC extent from the job's ``load_collection`` arguments (world / open interval otherwise)."""
    bbox, interval = [-180.0, -90.0, 180.0, 90.0], [None, None]
    for node in job.process_graph.values():
        if not isinstance(node, dict) or node.get("process_id") != "load_collection":
            continue
        args = node.get("arguments", {})
        spatial = args.get("spatial_extent")
        if isinstance(spatial, dict) and all(k in spatial for k in ("west", "south", "east", "north")):
            bbox = [spatial["west"], spatial["south"], spatial["east"], spatial["north"]]
        temporal = args.get("temporal_extent")
        if isinstance(temporal, list) and len(temporal) == 2:
            interval = list(temporal)
    return {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}}


class _Gate:
    """ASGI middleware: counts requests per route, injects outages (503) and 429s, sets Request-Id."""

    def __init__(self, app: ASGIApp, state: BackendState, routes: list[BaseRoute]):
        self.app = app
        self.state = state
        self.routes = routes

    def _template(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE and isinstance(route, Route):
                return route.path
        return scope["path"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        template = self._template(scope)
        rejection: tuple[int, str, str] | None = None
        with self.state.lock:
            self.state.count_request(f"{scope['method']} {template}")
            if self.state.in_outage():
                rejection = (
                    503,
                    "ServiceUnavailable",
                    "The service is temporarily unavailable (simulated outage).",
                )
            elif template not in _NO_429 and self.state.draw_429():
                rejection = (429, "TooManyRequests", "Too many requests (simulated rate limit), retry later.")
            retry_after = format_retry_after(self.state.config.retry_after)
        if rejection is not None:
            response = error_response(request_id, *rejection, headers={"Retry-After": retry_after})
            await response(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"request-id" for k, _ in headers):
                    headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _Api:
    """The openEO endpoints; every handler runs under ``state.lock``."""

    def __init__(self, state: BackendState, name: str):
        self.state = state
        self.name = name

    @property
    def config(self) -> SimulatorConfig:
        """The live config."""
        return self.state.config

    # -- helpers ---------------------------------------------------------------------------------------------
    def user(self, request: Request, required: bool) -> str:
        """The authenticated user; ``anonymous`` when no token is sent and auth is not required."""
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            if required:
                raise SimulatorError(401, "AuthenticationRequired", "Unauthorized: send a bearer token.")
            return ANONYMOUS
        method, _, token = credentials.strip().partition("/")
        token = token[1:] if method == "basic" and token.startswith("/") else ""
        for name in self.config.users:
            if token and token == access_token(self.config.seed, name):
                return name
        raise SimulatorError(403, "TokenInvalid", "Authorization token has expired or is invalid.")

    def jobs_user(self, request: Request) -> str:
        return self.user(request, required=self.config.require_auth)

    @staticmethod
    def base(request: Request) -> str:
        return str(request.base_url)

    def job_doc(self, job: Job, *, full: bool) -> dict[str, Any]:
        """openEO job metadata; listings (``full=False``) carry no process, and usage only with
        ``config.listing_usage``."""
        now = self.state.now()
        doc: dict[str, Any] = {
            "id": job.id,
            "title": job.title,
            "description": job.description,
            "status": job.status,
            "created": self.state.timestamp(job.created_at),
            "updated": self.state.timestamp(job.updated_at),
        }
        if job.status in ("created", "queued"):
            doc["progress"] = 0
        elif job.status == "running" and job.running_at is not None:
            fraction = (now - job.running_at) / job.run_duration if job.run_duration > 0 else 0.0
            doc["progress"] = round(min(99.0, max(0.0, 100.0 * fraction)), 1)
        elif job.status == "finished":
            doc["progress"] = 100
        if job.status in ("finished", "error"):
            doc["costs"] = self.config.cost_per_job
        if full:
            doc["process"] = job.process
            for key in ("plan", "budget"):
                if getattr(job, key) is not None:
                    doc[key] = getattr(job, key)
        if full or self.config.listing_usage:
            if job.status in ("finished", "error"):
                seconds = job.run_seconds
                doc["usage"] = {
                    "cpu": {"value": round(self.config.cpu_per_second * seconds, 3), "unit": "cpu-seconds"},
                    "memory": {"value": round(self.config.memory_mb * seconds, 3), "unit": "mb-seconds"},
                    "duration": {"value": round(seconds, 3), "unit": "seconds"},
                }
        return doc

    # -- general -------------------------------------------------------------------------------------------
    def capabilities(self, request: Request, body: bytes) -> Response:
        endpoints: dict[str, list[str]] = {}
        for path, method, _, listed in self.routes():
            if listed:
                endpoints.setdefault(path, []).append(method)
        return JSONResponse(
            {
                "api_version": API_VERSION,
                "backend_version": BACKEND_VERSION,
                "stac_version": "1.0.0",
                "type": "Catalog",
                "id": f"openeo-simulator-{self.name}",
                "title": f"openEO backend simulator ({self.name})",
                "description": "Simulated openEO backend (prefect-openeo) for tests and demos.",
                "production": False,
                "endpoints": [{"path": p, "methods": m} for p, m in endpoints.items()],
                "billing": {
                    "currency": "credits",
                    "default_plan": "free",
                    "plans": [{"name": "free", "description": "Simulated plan.", "paid": False}],
                },
                "links": [],
            }
        )

    def well_known(self, request: Request, body: bytes) -> Response:
        return JSONResponse({"versions": [{"url": self.base(request), "api_version": API_VERSION, "production": True}]})

    def credentials_basic(self, request: Request, body: bytes) -> Response:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise SimulatorError(401, "AuthenticationRequired", "Unauthorized: use HTTP Basic authentication.")
        try:
            username, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise SimulatorError(403, "CredentialsInvalid", "Credentials are not correct.") from e
        if self.config.users.get(username) != password or username not in self.config.users:
            raise SimulatorError(403, "CredentialsInvalid", "Credentials are not correct.")
        return JSONResponse({"access_token": access_token(self.config.seed, username)})

    def credentials_oidc(self, request: Request, body: bytes) -> Response:
        return JSONResponse({"providers": []})

    def me(self, request: Request, body: bytes) -> Response:
        user = self.user(request, required=True)
        return JSONResponse(
            {
                "user_id": user,
                "name": user,
                "default_plan": "free",
                "info": {"simulator": self.name},
                "links": [],
            }
        )

    def file_formats(self, request: Request, body: bytes) -> Response:
        return JSONResponse(FILE_FORMATS)

    def processes(self, request: Request, body: bytes) -> Response:
        return JSONResponse({"processes": PROCESSES, "links": []})

    def collections(self, request: Request, body: bytes) -> Response:
        return JSONResponse({"collections": [collection_summary(c) for c in COLLECTIONS.values()], "links": []})

    def collection(self, request: Request, body: bytes) -> Response:
        collection_id = request.path_params["collection_id"]
        if collection_id not in COLLECTIONS:
            raise SimulatorError(404, "CollectionNotFound", f"Collection '{collection_id}' does not exist.")
        return JSONResponse(COLLECTIONS[collection_id])

    def validation(self, request: Request, body: bytes) -> Response:
        process = self.parse_json(body)
        graph = process.get("process_graph", process) if isinstance(process, dict) else {}
        errors = [
            {"code": "ProcessUnsupported", "message": f"Process '{node.get('process_id')}' is not supported."}
            for node in graph.values()
            if isinstance(node, dict) and node.get("process_id") not in _PROCESS_IDS
        ]
        return JSONResponse({"errors": errors})

    # -- jobs ---------------------------------------------------------------------------------------------
    @staticmethod
    def parse_json(body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as e:
            raise SimulatorError(400, "BadRequest", f"Request body is not valid JSON: {e}") from e

    def list_jobs(self, request: Request, body: bytes) -> Response:
        user = self.jobs_user(request)
        raw_limit = request.query_params.get("limit")
        limit = self.config.page_limit_default if raw_limit is None else None
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                limit = 0
            if limit < 1:
                raise SimulatorError(400, "ParameterInvalid", f"Invalid limit {raw_limit!r}: expected an integer >= 1.")
        if limit is None:
            jobs = self.state.user_jobs(user)
            return JSONResponse({"jobs": [self.job_doc(j, full=False) for j in jobs], "links": []})
        cursor = request.query_params.get("cursor")
        page, next_seq = self.state.page(user, limit, _decode_cursor(cursor) if cursor else None)
        links = []
        if next_seq is not None:
            href = f"{self.base(request)}jobs?limit={limit}&cursor={_encode_cursor(next_seq)}"
            links.append({"rel": "next", "href": href, "type": "application/json"})
        return JSONResponse({"jobs": [self.job_doc(j, full=False) for j in page], "links": links})

    def create_job(self, request: Request, body: bytes) -> Response:
        user = self.jobs_user(request)
        data = self.parse_json(body)
        if not isinstance(data, dict):
            raise SimulatorError(400, "BadRequest", "Request body must be a JSON object.")
        process = data.get("process")
        if not isinstance(process, dict) or not isinstance(process.get("process_graph"), dict):
            raise SimulatorError(
                400, "ProcessGraphMissing", "No valid process graph specified (process.process_graph)."
            )
        job = self.state.create(user, data)
        location = f"{self.base(request)}jobs/{job.id}"
        return Response(status_code=201, headers={"Location": location, "OpenEO-Identifier": job.id})

    def get_job(self, request: Request, body: bytes) -> Response:
        job = self.state.get(request.path_params["job_id"], self.jobs_user(request))
        return JSONResponse(self.job_doc(job, full=True))

    def delete_job(self, request: Request, body: bytes) -> Response:
        self.state.delete(request.path_params["job_id"], self.jobs_user(request))
        return Response(status_code=204)

    def start_job(self, request: Request, body: bytes) -> Response:
        self.state.start(request.path_params["job_id"], self.jobs_user(request))
        return Response(status_code=202)

    def cancel_job(self, request: Request, body: bytes) -> Response:
        self.state.cancel(request.path_params["job_id"], self.jobs_user(request))
        return Response(status_code=204)

    def _finished(self, job: Job) -> None:
        if job.status != "finished":
            raise SimulatorError(
                400,
                "JobNotFinished",
                f"Batch job '{job.id}' has not finished computing results (status: {job.status}).",
            )

    def results(self, request: Request, body: bytes) -> Response:
        job = self.state.get(request.path_params["job_id"], self.jobs_user(request))
        self._finished(job)
        base = self.base(request)
        assets = {}
        for name, media in job.assets:
            href = f"{base}jobs/{job.id}/results/{name}"
            if self.config.require_auth:
                href += f"?sig={_asset_signature(self.config.seed, job.id, name)}"
            assets[name] = {
                "href": href,
                "type": media,
                "roles": ["data"],
                "title": name,
                "file:size": job.asset_size,
                "file:checksum": asset_checksum(job.id, name, job.asset_size),
            }
        return JSONResponse(
            {
                "type": "Collection",
                "stac_version": "1.0.0",
                "stac_extensions": ["https://stac-extensions.github.io/file/v2.1.0/schema.json"],
                "id": job.id,
                "title": job.title or f"Results of batch job {job.id}",
                "description": job.description or f"Results of batch job {job.id}",
                "license": "proprietary",
                "extent": _extent(job),
                "links": [],
                "assets": assets,
            }
        )

    def asset(self, request: Request, body: bytes) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["asset"]
        sig = request.query_params.get("sig")
        signed = sig is not None and sig == _asset_signature(self.config.seed, job_id, name)
        # like public/signed asset URLs of real backends: only unsigned URLs under require_auth need a token
        public = signed or not self.config.require_auth
        job = self.state.get(job_id, None if public else self.jobs_user(request))
        self._finished(job)
        media = dict(job.assets).get(name)
        if media is None:
            raise SimulatorError(404, "AssetNotFound", f"Batch job '{job.id}' has no result asset '{name}'.")
        size = job.asset_size
        headers = {"Accept-Ranges": "bytes", "Content-Type": media}
        byte_range = parse_range(request.headers.get("range"), size)
        if byte_range is False:
            return error_response(
                _request_id(request), 416, "RangeNotSatisfiable", f"Range not satisfiable for {size} bytes.",
                headers={"Content-Range": f"bytes */{size}"},
            )  # fmt: skip
        status, start, end = 200, 0, size - 1
        if byte_range:
            status, (start, end) = 206, byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(max(0, end - start + 1))
        if request.method == "HEAD":
            return Response(b"", status_code=status, headers=headers)
        return Response(asset_bytes(job.id, name, size)[start : end + 1], status_code=status, headers=headers)

    def logs(self, request: Request, body: bytes) -> Response:
        job = self.state.get(request.path_params["job_id"], self.jobs_user(request))
        level = (request.query_params.get("level") or "debug").lower()
        if level not in LOG_LEVELS:
            raise SimulatorError(400, "ParameterInvalid", f"Invalid log level {level!r}: one of {list(LOG_LEVELS)}.")
        offset = request.query_params.get("offset")
        entries = job.logs
        if offset:
            try:
                entries = [e for e in entries if int(e.id) > int(offset)]
            except ValueError as e:
                raise SimulatorError(400, "ParameterInvalid", f"Invalid log offset {offset!r}.") from e
        docs = []
        for e in entries:
            if LOG_LEVELS[e.level] <= LOG_LEVELS[level]:
                doc = {"id": e.id, "level": e.level, "message": e.message, "time": self.state.timestamp(e.t)}
                if e.code:
                    doc["code"] = e.code
                docs.append(doc)
        return JSONResponse({"logs": docs, "links": []})

    # -- routing -----------------------------------------------------------------------------------------
    def routes(self) -> list[tuple[str, str, Handler, bool]]:
        """(path, method, handler, listed in capabilities)."""
        return [
            ("/", "GET", self.capabilities, True),
            ("/.well-known/openeo", "GET", self.well_known, False),
            ("/credentials/basic", "GET", self.credentials_basic, True),
            ("/credentials/oidc", "GET", self.credentials_oidc, True),
            ("/me", "GET", self.me, True),
            ("/file_formats", "GET", self.file_formats, True),
            ("/processes", "GET", self.processes, True),
            ("/collections", "GET", self.collections, True),
            ("/collections/{collection_id}", "GET", self.collection, True),
            ("/validation", "POST", self.validation, True),
            ("/jobs", "GET", self.list_jobs, True),
            ("/jobs", "POST", self.create_job, True),
            ("/jobs/{job_id}", "GET", self.get_job, True),
            ("/jobs/{job_id}", "DELETE", self.delete_job, True),
            ("/jobs/{job_id}/results", "GET", self.results, True),
            ("/jobs/{job_id}/results", "POST", self.start_job, True),
            ("/jobs/{job_id}/results", "DELETE", self.cancel_job, True),
            ("/jobs/{job_id}/results/{asset}", "GET", self.asset, False),
            ("/jobs/{job_id}/logs", "GET", self.logs, True),
        ]

    def endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            body = await request.body() if request.method in ("POST", "PUT", "PATCH") else b""
            try:
                with self.state.lock:
                    return handler(request, body)
            except SimulatorError as e:
                return error_response(_request_id(request), e.status, e.code, e.message)

        return run


def create_app(state: BackendState, name: str = "sim") -> Starlette:
    """Build the Starlette app serving ``state``."""
    api = _Api(state, name)
    routes: list[BaseRoute] = [
        Route(path, api.endpoint(handler), methods=[method], name=f"{method} {path}")
        for path, method, handler, _ in api.routes()
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(_request_id(request), 404, "NotFound", f"Unknown path {request.url.path!r}.")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        message = f"Method {request.method} not allowed on {request.url.path!r}."
        return error_response(_request_id(request), 405, "MethodNotAllowed", message)

    async def internal(request: Request, exc: Exception) -> Response:
        return error_response(_request_id(request), 500, "Internal", f"Simulator error: {exc!r}")

    return Starlette(
        routes=routes,
        middleware=[Middleware(_Gate, state=state, routes=routes)],
        exception_handlers={404: not_found, 405: not_allowed, Exception: internal},
    )

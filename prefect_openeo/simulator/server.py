"""Run simulated openEO backends on 127.0.0.1 in background threads (uvicorn, one event loop each)."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import socket
import string
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from .app import access_token, create_app
from .config import SimulatorConfig
from .faults import FaultInjector, Faults
from .state import BackendState

__all__ = ["BackendSimulator", "simulated_backends", "serve", "backend_name"]

_START_TIMEOUT = 10.0


def backend_name(index: int) -> str:
    """``sim-a``, ``sim-b``, ... (``sim-27`` beyond ``sim-z``)."""
    return f"sim-{string.ascii_lowercase[index]}" if index < 26 else f"sim-{index + 1}"


class BackendSimulator:
    """A simulated openEO backend served over real HTTP; use as ``with BackendSimulator(cfg) as sim:``."""

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0, name: str = "sim"
    ):
        self.name = name
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.state = BackendState(config if config is not None else SimulatorConfig())
        #: Misbehaviour on demand (``prefect_openeo.simulator.faults``): empty, the backend behaves.
        self.faults = Faults()
        self.app = FaultInjector(create_app(self.state, name), self.faults)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"<BackendSimulator {self.name!r} {where}>"

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def config(self) -> SimulatorConfig:
        """The live config: changes apply to the next request."""
        return self.state.config

    @config.setter
    def config(self, config: SimulatorConfig) -> None:
        with self.state.lock:
            self.state.config = config

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        """Root URL with trailing slash, e.g. ``http://127.0.0.1:8123/``."""
        if self.port is None:
            raise RuntimeError(f"simulator {self.name!r} is not started")
        return f"http://{self.host}:{self.port}/"

    def start(self) -> BackendSimulator:
        """Bind the port and serve in a daemon thread; returns once the server accepts connections."""
        if self.running:
            return self
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on such sockets (Nagle: ~40 ms/request)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
            backlog=1024,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"openeo-simulator-{self.name}", daemon=True
        )
        with self.state.lock:
            self.state.restart_origin()
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"openEO simulator {self.name!r} failed to start on {self.host}")
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        """Shut the server down (idempotent)."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=5)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> BackendSimulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- inspection and test hooks ------------------------------------------------------------------------
    def request_counts(self) -> dict[str, int]:
        """Requests per route template, e.g. ``{"GET /jobs/{job_id}": 12}`` (429/503 answers included)."""
        with self.state.lock:
            return dict(self.state.request_counts)

    def total_requests(self) -> int:
        with self.state.lock:
            return sum(self.state.request_counts.values())

    def reset(self) -> None:
        """Forget all jobs and counters (outage windows count from now again)."""
        with self.state.lock:
            self.state.reset()

    def elapsed(self) -> float:
        """Seconds since start/reset on the config clock (the reference of ``config.outages``)."""
        with self.state.lock:
            return self.state.elapsed()

    def jobs(self) -> list[dict[str, Any]]:
        """Snapshot of all jobs of all users (advanced to now), oldest first."""
        with self.state.lock:
            self.state.advance()
            return [self.state.snapshot(j) for j in self.state.jobs.values()]

    def job(self, job_id: str) -> dict[str, Any]:
        """Snapshot of one job; raises KeyError when unknown."""
        with self.state.lock:
            self.state.advance()
            if job_id not in self.state.jobs:
                raise KeyError(job_id)
            return self.state.snapshot(self.state.jobs[job_id])

    def created_count(self) -> int:
        """Number of ``POST /jobs`` that created a job since start/reset (deletions don't decrement)."""
        with self.state.lock:
            return self.state.created_count

    def set_status(self, job_id: str, status: str) -> None:
        """Force a job's status now (queued/running jobs then progress normally). KeyError when unknown."""
        with self.state.lock:
            if job_id not in self.state.jobs:
                raise KeyError(job_id)
            self.state.force_status(job_id, status)

    def delete_job(self, job_id: str) -> None:
        """Make a job vanish (as if deleted server-side). KeyError when unknown."""
        with self.state.lock:
            if job_id not in self.state.jobs:
                raise KeyError(job_id)
            self.state.delete(job_id)

    def access_token(self, user: str = "user") -> str:
        """The bearer token ``GET /credentials/basic`` hands out to ``user``."""
        return access_token(self.config.seed, user)

    def auth_headers(self, user: str = "user") -> dict[str, str]:
        """``Authorization`` header for direct HTTP requests as ``user``."""
        return {"Authorization": f"Bearer basic//{self.access_token(user)}"}


def _copy_config(config: SimulatorConfig) -> SimulatorConfig:
    return dataclasses.replace(config, outages=list(config.outages), users=dict(config.users))


@contextlib.contextmanager
def simulated_backends(n: int = 2, config: SimulatorConfig | None = None) -> Iterator[list[BackendSimulator]]:
    """Start ``n`` simulators named ``sim-a``, ``sim-b``, ... each with its own copy of ``config``."""
    base = config if config is not None else SimulatorConfig()
    sims: list[BackendSimulator] = []
    try:
        for i in range(n):
            sims.append(BackendSimulator(_copy_config(base), name=backend_name(i)).start())
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def serve(
    port: int,
    config: SimulatorConfig,
    *,
    host: str = "127.0.0.1",
    name: str = "sim",
    on_ready: Callable[[BackendSimulator], None] | None = None,
) -> None:
    """Serve one simulator until Ctrl-C/SIGTERM. ``on_ready`` defaults to printing the URL to stderr."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    sim = BackendSimulator(config, host=host, port=port, name=name).start()
    try:
        if on_ready is None:
            print(f"openEO backend simulator {name!r} listening on {sim.url}", file=sys.stderr, flush=True)
        else:
            on_ready(sim)
        while sim.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

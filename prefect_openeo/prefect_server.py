"""The Prefect API a command's flow run talks to: the configured one, or a temporary local server of our own.

Without ``PREFECT_API_URL``, Prefect's client starts a temporary server itself, as a child in the caller's
process group: a terminal's Ctrl-C (SIGINT to the whole foreground group) kills that server first, and the
interrupted flow run then cannot record its end (its client retries against a dead server for minutes).
``TemporaryPrefectServer`` is the same server (uvicorn with Prefect's app factory, no UI, the same
database), started in a session of its own so that Ctrl-C reaches only the command, which ends its flow run,
flushes Prefect's logs and events, then stops the server. The server also stops when its parent dies (it
watches its stdin, a pipe from the parent). Starting it takes a few seconds: ``start`` returns at once, so
the command can prepare its work meanwhile, and ``wait_ready`` waits for its health check.

Importing this module does not import Prefect.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

#: How long a temporary server may take to answer its health check (migrations of a new database included).
STARTUP_TIMEOUT = 120.0
#: uvicorn's exit code when it could not bind its port (taken meanwhile): start again on another port.
_STARTUP_FAILURE = 3

# The server process: stop as on SIGTERM when stdin closes (the parent closed it, or died), then serve.
_CHILD = """
import os, signal, sys, threading
def _watch_parent():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=_watch_parent, daemon=True).start()
import uvicorn
uvicorn.run("prefect.server.api.server:create_app", factory=True, host=sys.argv[1], port=int(sys.argv[2]),
            log_level="error", lifespan="on")
"""


class PrefectApiError(RuntimeError):
    """The Prefect API cannot be used (a temporary server did not start, a configured one does not answer)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def new_session_kwargs() -> dict[str, Any]:
    """``Popen`` arguments that put the child outside our process group (a terminal's Ctrl-C misses it)."""
    if sys.platform == "win32":  # pragma: no cover
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


#: The per-job task runs arrive as events; the server's task-run recorder writes them in batches of up to
#: 100, at least every second (Prefect's defaults: one at a time, every 5 s). The caller's settings win.
RECORDER_BATCHES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


class TemporaryPrefectServer:
    """Prefect's API server on 127.0.0.1 in a child process of its own session.

    :param env: environment of the server (default: ours); ``PREFECT_API_URL`` is dropped from it.
    :param ephemeral: run as Prefect's own temporary server does (no UI, only the services flow runs need).
    """

    def __init__(self, env: dict[str, str] | None = None, *, ephemeral: bool = True):
        self.env = dict(os.environ if env is None else env)
        self.env.pop("PREFECT_API_URL", None)
        if ephemeral:
            self.env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"})
        self.env["PREFECT__SERVER_FINAL"] = "1"
        for key, value in RECORDER_BATCHES.items():
            self.env.setdefault(key, value)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._stderr: Any = None
        self._ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryPrefectServer:
        """Start the server process and return at once (see ``wait_ready``)."""
        if self.process is None:
            self._spawn()
            atexit.register(self.stop)
        return self

    def _spawn(self) -> None:
        self.port = free_port()
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, "127.0.0.1", str(self.port)],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            **new_session_kwargs(),
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Wait until the server answers; its API URL. ``PrefectApiError`` when it does not start."""
        if self.process is None:
            self.start()
        deadline = time.monotonic() + timeout
        restarts = 0
        while not self._ready:
            code = self.process.poll()
            if code == _STARTUP_FAILURE and restarts < 3:  # the port was taken meanwhile: another one
                restarts += 1
                self._spawn()
                continue
            if code is not None:
                raise PrefectApiError(f"the temporary Prefect server exited with code {code}: {self._errors()}")
            if healthy(self.api_url):
                self._ready = True
                break
            if time.monotonic() > deadline:
                self.stop()
                raise PrefectApiError(f"the temporary Prefect server did not answer within {timeout:.0f} s")
            time.sleep(0.1)
        return self.api_url

    def _errors(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-3000:] or "(no output)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (gracefully: SIGTERM, then kill after ``timeout``). Safe to call again."""
        process, self.process = self.process, None
        self._ready = False
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect sees it (environment, profile, ``.env``, ``prefect.toml``), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def drain_prefect_services(timeout: float = 10.0) -> None:
    """Send what Prefect's background services still hold (flow and task run logs, events) to the API."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=timeout)


class PrefectApi:
    """The Prefect API for one command: ``PREFECT_API_URL`` when configured (used as is), else a
    ``TemporaryPrefectServer`` that this object starts and stops.

    ``start`` (returns at once) then ``wait_ready``; flow runs go inside ``use()``; ``close`` at the end.
    """

    def __init__(self) -> None:
        self.configured: str | None = None
        self.server: TemporaryPrefectServer | None = None
        self.url: str | None = None

    def start(self) -> PrefectApi:
        """Start a temporary server unless an API is configured. The server starts before Prefect's settings
        are read (that takes a second), unless the environment names an API; one that a profile or a
        settings file names stops it again."""
        if not os.environ.get("PREFECT_API_URL"):
            self.server = TemporaryPrefectServer().start()
        self.configured = self.url = configured_api_url()
        if self.configured and self.server is not None:
            self.server.stop()
            self.server = None
        return self

    @property
    def temporary(self) -> bool:
        return self.server is not None

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The API URL once it answers; ``PrefectApiError`` otherwise."""
        if self.server is not None:
            self.url = self.server.wait_ready(timeout)
            return self.url
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # with the configured credentials (Prefect Cloud)
            error = client.api_healthcheck()
        if error is not None:
            raise PrefectApiError(
                f"the Prefect API at {self.configured} (PREFECT_API_URL) does not answer ({type(error).__name__}): "
                "start it (`prefect server start`), or unset PREFECT_API_URL to use a temporary local server"
            )
        return self.url

    @contextlib.contextmanager
    def use(self) -> Iterator[str]:
        """Prefect clients made inside talk to this API."""
        if self.server is None:
            yield self.url
            return
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            yield self.url

    def close(self, *, settled: bool) -> None:
        """Flush Prefect's logs and events, then stop a temporary server.

        :param settled: no thread of a run may still talk to Prefect. A flow run that did not end cleanly
            (Ctrl-C, an error) may leave some: the server then stops when this process exits, after
            Prefect's own flush at exit.
        """
        if self.url is not None:
            drain_prefect_services()
        if self.server is not None and settled:
            self.server.stop()


def ui_base_url() -> str:
    """Where ``prefect server start`` serves the UI with the current settings."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.ui_url or f"http://{settings.server.api.host}:{settings.server.api.port}"


def flow_run_url(flow_run_id: Any, base: str | None = None) -> str:
    """The UI page of a flow run."""
    return f"{(base or ui_base_url()).rstrip('/')}/runs/flow-run/{flow_run_id}"

"""Helpers to try flows against a real local Prefect server (tests, benchmarks, docs screenshots)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from prefect_openeo.prefect_server import RECORDER_BATCHES, free_port, healthy

__all__ = ["free_port", "local_prefect_server"]


@contextlib.contextmanager
def local_prefect_server(
    home: str,
    *,
    extra_env: dict[str, str] | None = None,
    ui: bool = False,
    timeout: float = 180,
    port: int | None = None,
) -> Iterator[tuple[str, dict[str, str]]]:
    """``prefect server start`` on 127.0.0.1 with its home (and SQLite database, unless ``extra_env`` names
    another) in ``home``; yields the API URL and the environment for clients (``PREFECT_API_URL`` set).
    ``port``: a given one (e.g. to start the same server again after stopping it), else a free one."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": home,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **RECORDER_BATCHES,
        **(extra_env or {}),
    }
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_UI_ENABLED"] = "true" if ui else "false"
    env["PREFECT_UI_API_URL"] = api_url
    # Its output goes to a file: a pipe nobody reads fills up (64 KiB) and blocks the server mid-write.
    os.makedirs(home, exist_ok=True)
    log_path = os.path.join(home, "prefect-server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                with open(log_path, "rb") as log:
                    raise RuntimeError(f"prefect server exited: {log.read().decode(errors='replace')[-3000:]}")
            if healthy(api_url):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not become healthy in {timeout:.0f} s")
            time.sleep(0.5)
        yield api_url, {**env, "PREFECT_API_URL": api_url}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

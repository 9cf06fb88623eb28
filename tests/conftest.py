"""Shared fixtures: quiet Prefect in a temp home, the simulator plugin, a Prefect API, the job callback."""

from __future__ import annotations

import os
import tempfile

# Before anything imports Prefect: keep its home (and SQLite database) in a temp dir, and quiet.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-openeo-tests-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import contextlib  # noqa: E402
import http.server  # noqa: E402
import socketserver  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import openeo  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # A plain `pytest_plugins = [...]` would clash ("Plugin already registered under a different name")
    # with the `prefect_openeo_simulator` entry point when the package is installed.
    from prefect_openeo.simulator import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "prefect_openeo_simulator")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (a temporary server on SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


POSTGRES_URL = os.environ.get("PREFECT_OPENEO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_engine():
    """The PostgreSQL of this machine. Missing, it is a failure, not a skip: the shared mode needs it."""
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as e:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {e}")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_table(postgres_engine):
    """A fresh table name in the test PostgreSQL, dropped (with its meta table) afterwards."""
    import uuid

    import sqlalchemy as sa

    table = f"jobs_{uuid.uuid4().hex[:10]}"
    yield table
    with postgres_engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}_meta"'))


@contextlib.contextmanager
def new_database(prefix: str) -> Iterator[str]:
    """A new, empty database in this machine's PostgreSQL, dropped afterwards; its name."""
    import uuid

    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_database(postgres_engine) -> Iterator[str]:
    """A new, empty PostgreSQL database (the job database's default table in it, as users have it); its URL."""
    with new_database("openeo") as name:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"


class S3Server:
    """A moto S3 server running as its own process on 127.0.0.1 (see the ``s3_server`` fixture)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        """A plain boto3 client (independent of s3fs) to inspect what the code under test left."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        import uuid

        name = f"results-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server: ``moto_server`` in a separate process. Credentials, region and endpoint
    are set in the environment (as a user's deployment would), and instance metadata lookups are off."""
    import subprocess
    import sys
    import time

    import requests

    from prefect_openeo.testing import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its request log goes to a file: a pipe nobody reads fills up (64 KiB) and blocks the server mid-request.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto_server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{endpoint}/moto-api/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moto_server did not answer in 120 s")
            time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for name in [k for k in os.environ if k.startswith("AWS_")]:
                mp.delenv(name)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_CONFIG_FILE", os.devnull)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def ndvi_job(row: pd.Series, connection: openeo.Connection, **kwargs) -> openeo.BatchJob:
    """A typical user callback: an NDVI job over the row's bbox and year."""
    year = int(row["year"])
    cube = connection.load_collection(
        "SENTINEL2_L2A",
        spatial_extent={"west": row["west"], "south": 51.0, "east": row["west"] + 0.1, "north": 51.1},
        temporal_extent=[f"{year}-01-01", f"{year + 1}-01-01"],
        bands=["B04", "B08"],
    )
    return cube.ndvi(nir="B08", red="B04").create_job(title=f"tile {row.name}", out_format="GTiff")


def manager_for(*sims, parallel_jobs: int = 2, **kwargs):
    """The drop-in manager with each simulator registered by its name (``poll_sleep`` 0.1 s unless given)."""
    from prefect_openeo import MultiBackendJobManager

    kwargs.setdefault("poll_sleep", 0.1)
    manager = MultiBackendJobManager(**kwargs)
    for sim in sims:
        manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=parallel_jobs)
    return manager


def tiles_df(n: int) -> pd.DataFrame:
    return pd.DataFrame({"west": [5.0 + 0.1 * i for i in range(n)], "year": [2020 + i % 4 for i in range(n)]})


@contextlib.contextmanager
def static_server(body: bytes, content_type: str):
    """A real HTTP server on 127.0.0.1 answering every GET with ``body``; yields its root URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()


def job_events(client, flow_run_id, event_filter: dict, enough) -> list[dict]:
    """Events related to a flow run (they arrive asynchronously: poll until ``enough(events)``, up to 10 s)."""
    import time

    events: list[dict] = []
    for _ in range(50):
        response = client._client.post(
            "/events/filter",
            json={
                "filter": {"event": event_filter, "related": {"id": [f"prefect.flow-run.{flow_run_id}"]}},
                "limit": 50,
            },
        )
        response.raise_for_status()
        events = response.json()["events"]
        if enough(events):
            break
        time.sleep(0.2)
    return events


def max_overlap(jobs: list[dict]) -> int:
    """Most jobs that existed un-ended at once on a backend (from the simulator's own records)."""
    events = []
    for job in jobs:
        events.append((job["created_at"], 1))
        events.append((job["ended_at"] if job["ended_at"] is not None else float("inf"), -1))
    current = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        current += delta
        peak = max(peak, current)
    return peak


def settled_task_runs(flow_run_id, expected: int, timeout: float = 60.0, api_url: str | None = None) -> list:
    """A flow run's per-job task runs once ``expected`` of them are final: Prefect's task-run recorder writes
    them from the run's events, after the flow run may have ended (poll, up to ``timeout`` seconds).
    ``api_url``: that server's API (default: the configured one)."""
    import time

    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterTags

    deadline = time.monotonic() + timeout
    with SyncPrefectClient(api_url) if api_url else get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["openeo-job"])),
            )
            if sum(run.state is not None and run.state.is_final() for run in runs) >= expected:
                return runs
            if time.monotonic() > deadline:
                return runs
            time.sleep(0.2)

"""The openEO backend simulator, driven over HTTP by the official openeo client (and plain requests)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openeo
import pytest
import requests
from openeo.rest import OpenEoApiError

from prefect_openeo.simulator import BackendSimulator, SimulatorConfig, simulated_backends
from prefect_openeo.simulator.pytest_plugin import FAST_TIMINGS

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., BackendSimulator]
SPATIAL = {"west": 5.0, "south": 51.2, "east": 5.1, "north": 51.3}
PROCESS = {"process_graph": {"add1": {"process_id": "add", "arguments": {"x": 1, "y": 2}, "result": True}}}


class FakeClock:
    """A manually advanced clock for exact lifecycle checks."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def connect(sim: BackendSimulator, *, auth: bool = True) -> openeo.Connection:
    """Connect without client-side retries (so 429/503 surface as errors)."""
    con = openeo.connect(sim.url, retry=False)
    return con.authenticate_basic("user", "password") if auth else con


def ndvi_job(con: openeo.Connection, title: str = "ndvi") -> openeo.BatchJob:
    period = ["2024-05-01", "2024-06-01"]
    cube = con.load_collection("SENTINEL2_L2A", spatial_extent=SPATIAL, temporal_extent=period, bands=["B04", "B08"])
    return cube.ndvi(nir="B08", red="B04").create_job(title=title, out_format="GTiff")


def simple_job(con: openeo.Connection, title: str = "job") -> openeo.BatchJob:
    return con.create_job(PROCESS, title=title)


def wait_for(job: openeo.BatchJob, statuses: set[str], timeout: float = 5.0) -> list[str]:
    """Poll until the job reaches one of ``statuses``; returns the distinct statuses seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in statuses:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"job {job.job_id} stuck, statuses seen: {seen}")


def api_error(exc_info: pytest.ExceptionInfo[OpenEoApiError]) -> tuple[int, str]:
    return exc_info.value.http_status_code, exc_info.value.code


# -- connection, auth, metadata --------------------------------------------------------------------


def test_connect_capabilities_and_basic_auth(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    assert sim.url.startswith("http://127.0.0.1:") and sim.url.endswith("/")
    well_known = requests.get(sim.url + ".well-known/openeo").json()
    assert well_known["versions"] == [{"url": sim.url, "api_version": "1.2.0", "production": True}]

    con = connect(sim, auth=False)
    caps = con.capabilities()
    assert caps.api_version() == "1.2.0"
    assert caps.supports_endpoint("/jobs", "POST")
    assert caps.supports_endpoint("/jobs/{job_id}/results", "DELETE")
    assert caps.currency() == "credits"
    raw = requests.get(sim.url).json()
    assert {"path": "/jobs", "methods": ["GET", "POST"]} in raw["endpoints"]
    assert raw["stac_version"] == "1.0.0" and raw["links"] == []

    with pytest.raises(OpenEoApiError) as e:
        con.describe_account()
    assert api_error(e) == (401, "AuthenticationRequired")
    with pytest.raises(OpenEoApiError) as e:
        openeo.connect(sim.url, retry=False).authenticate_basic("user", "wrong")
    assert api_error(e) == (403, "CredentialsInvalid")

    con.authenticate_basic("user", "password")
    assert con.describe_account()["user_id"] == "user"
    assert requests.get(sim.url + "credentials/oidc").json() == {"providers": []}
    bogus = requests.get(sim.url + "me", headers={"Authorization": "Bearer basic//nope"})
    assert bogus.status_code == 403 and bogus.json()["code"] == "TokenInvalid"


def test_collections_processes_and_file_formats(openeo_simulator: BackendSimulator):
    con = connect(openeo_simulator)
    assert "SENTINEL2_L2A" in con.list_collection_ids()
    meta = con.describe_collection("SENTINEL2_L2A")
    assert meta["cube:dimensions"]["bands"]["values"] == ["B02", "B03", "B04", "B08"]
    process_ids = {p["id"] for p in con.list_processes()}
    assert {"load_collection", "save_result", "ndvi", "reduce_dimension"} <= process_ids
    formats = con.list_file_formats()
    assert {"GTiff", "netCDF"} <= set(formats["output"]) and "GeoJSON" in formats["input"]
    with pytest.raises(OpenEoApiError) as e:
        con.describe_collection("NOPE")
    assert api_error(e) == (404, "CollectionNotFound")


def test_create_job_from_datacube(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    job = ndvi_job(con, title="my ndvi")
    assert job.job_id.startswith("j-") and len(job.job_id) > 16
    info = job.describe()
    assert info["status"] == "created" and info["title"] == "my ndvi"
    graph = info["process"]["process_graph"]
    assert sorted(n["process_id"] for n in graph.values()) == ["load_collection", "ndvi", "save_result"]
    assert "usage" not in info and "costs" not in info
    [snapshot] = sim.jobs()
    assert snapshot["id"] == job.job_id and snapshot["user"] == "user" and snapshot["status"] == "created"
    assert snapshot["process_graph"] == graph and snapshot["start_count"] == 0
    assert sim.created_count() == 1

    # Location + OpenEO-Identifier headers; extra fields become job options; ids unique and sortable.
    resp = requests.post(
        sim.url + "jobs", json={"process": PROCESS, "title": "raw", "job_options": {"driver-memory": "2g"}}
    )
    assert resp.status_code == 201
    new_id = resp.headers["OpenEO-Identifier"]
    assert resp.headers["Location"] == f"{sim.url}jobs/{new_id}"
    assert sim.job(new_id)["options"] == {"job_options": {"driver-memory": "2g"}}
    assert sim.job(new_id)["user"] == "anonymous"
    ids = [simple_job(con).job_id for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert sim.created_count() == 7

    bad = requests.post(sim.url + "jobs", json={"title": "no graph"})
    assert bad.status_code == 400 and bad.json()["code"] == "ProcessGraphMissing"
    assert sim.created_count() == 7


# -- lifecycle -------------------------------------------------------------------------------------


def test_lifecycle_created_queued_running_finished(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    assert (sim.config.queue_duration, sim.config.run_duration) == (0.2, 0.3)
    con = connect(sim)
    job = ndvi_job(con)
    assert job.status() == "created"
    job.start()
    seen = wait_for(job, {"finished", "error"})
    assert seen == ["queued", "running", "finished"]

    info = job.describe()
    assert info["progress"] == 100 and info["costs"] == 1.0
    usage = info["usage"]
    assert usage["duration"] == {"value": pytest.approx(0.3, abs=1e-3), "unit": "seconds"}
    assert usage["cpu"] == {"value": pytest.approx(0.45, abs=1e-3), "unit": "cpu-seconds"}
    assert usage["memory"]["unit"] == "mb-seconds" and usage["memory"]["value"] > 0
    snap = sim.job(job.job_id)
    assert snap["running_at"] - snap["started_at"] == pytest.approx(0.2)
    assert snap["ended_at"] - snap["running_at"] == pytest.approx(0.3)
    assert snap["start_count"] == 1

    # restarting a finished job is accepted (202) but is a no-op, as with openeo-driver
    job.start()
    assert job.status() == "finished" and sim.job(job.job_id)["start_count"] == 1


def test_lifecycle_exact_without_polling_and_capacity_fifo(openeo_simulator_factory: Factory):
    clock = FakeClock()
    sim = openeo_simulator_factory(queue_duration=1.0, run_duration=2.0, capacity=1, clock=clock)
    con = connect(sim)
    jobs = [simple_job(con, f"j{i}") for i in range(3)]
    for job in jobs:
        job.start()
    assert [j.status() for j in jobs] == ["queued"] * 3
    clock.advance(1.5)  # all eligible, one slot
    assert [j.status() for j in jobs] == ["running", "queued", "queued"]
    assert jobs[0].describe()["progress"] == pytest.approx(25.0)

    clock.advance(100)  # nobody polled meanwhile: the chain must still be replayed exactly
    assert [j.status() for j in jobs] == ["finished"] * 3
    snaps = {s["id"]: s for s in sim.jobs()}
    t0 = snaps[jobs[0].job_id]["started_at"]
    times = [(snaps[j.job_id]["running_at"] - t0, snaps[j.job_id]["ended_at"] - t0) for j in jobs]
    assert times == [(1.0, 3.0), (3.0, 5.0), (5.0, 7.0)]
    assert [j.describe()["usage"]["duration"]["value"] for j in jobs] == [2.0, 2.0, 2.0]


def test_capacity_one_running_one_queued_real_time(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.capacity = 1
    sim.config.queue_duration = 0.05
    con = connect(sim)
    first, second = simple_job(con, "first"), simple_job(con, "second")
    first.start()
    second.start()
    wait_for(first, {"running"})
    assert second.status() == "queued"
    time.sleep(0.15)
    assert (first.status(), second.status()) == ("running", "queued")
    wait_for(first, {"finished"})
    assert wait_for(second, {"finished"})[-1] == "finished"
    a, b = sim.job(first.job_id), sim.job(second.job_id)
    assert b["running_at"] == pytest.approx(a["ended_at"])  # the freed slot goes to the waiting job at once


def test_capacity_is_per_user(openeo_simulator_factory: Factory):
    clock = FakeClock()
    sim = openeo_simulator_factory(capacity=1, clock=clock, users={"alice": "a", "bob": "b"})
    alice = openeo.connect(sim.url, retry=False).authenticate_basic("alice", "a")
    bob = openeo.connect(sim.url, retry=False).authenticate_basic("bob", "b")
    a_jobs = [simple_job(alice) for _ in range(2)]
    b_job = simple_job(bob)
    for job in [*a_jobs, b_job]:
        job.start()
    clock.advance(0.25)
    assert [j.status() for j in a_jobs] == ["running", "queued"] and b_job.status() == "running"
    assert [j["id"] for j in bob.list_jobs(limit=None)] == [b_job.job_id]  # users only see their own jobs
    with pytest.raises(OpenEoApiError) as e:
        bob.job(a_jobs[0].job_id).describe()
    assert api_error(e) == (404, "JobNotFound")


def test_failure_rate_one_gives_error_with_error_logs(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.failure_rate = 1.0
    con = connect(sim)
    job = ndvi_job(con)
    job.start()
    assert wait_for(job, {"finished", "error"})[-1] == "error"
    errors = job.logs(level="error")
    assert len(errors) >= 1 and all(e["level"] == "error" for e in errors)
    assert "failed" in errors[0]["message"].lower()
    all_logs = job.logs()
    assert {"info", "error"} <= {e["level"] for e in all_logs}
    assert [e["id"] for e in all_logs] == [str(i) for i in range(len(all_logs))]
    info = job.describe()
    assert "usage" in info and info["usage"]["duration"]["value"] == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(OpenEoApiError) as e:
        job.get_results().get_metadata()
    assert api_error(e) == (400, "JobNotFinished")


def test_logs_level_and_offset(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.queue_duration = sim.config.run_duration = 0.0
    con = connect(sim)
    job = simple_job(con)
    job.start()
    logs_url = f"{sim.url}jobs/{job.job_id}/logs"
    raw = requests.get(logs_url, headers=sim.auth_headers()).json()
    levels = [e["level"] for e in raw["logs"]]
    assert "debug" in levels and "info" in levels and raw["links"] == []
    infos = requests.get(logs_url + "?level=info", headers=sim.auth_headers()).json()["logs"]
    assert infos and all(e["level"] in ("info", "warning", "error") for e in infos)
    assert len(infos) == levels.count("info")
    after = requests.get(logs_url + "?offset=1", headers=sim.auth_headers()).json()["logs"]
    assert [e["id"] for e in after] == [e["id"] for e in raw["logs"][2:]]
    for entry in raw["logs"]:
        assert entry["time"].endswith("Z") and entry["message"]


def test_cancel_and_restart(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    job = simple_job(con)
    job.start()
    assert job.status() == "queued"
    job.stop()
    assert job.status() == "canceled"
    time.sleep(0.6)  # longer than queue + run: a canceled job stays canceled
    assert job.status() == "canceled"
    snap = sim.job(job.job_id)
    assert snap["cancel_count"] == 1 and snap["running_at"] is None
    job.start()  # canceled jobs may be restarted
    assert job.status() == "queued" and sim.job(job.job_id)["start_count"] == 2
    wait_for(job, {"running"})
    job.stop()
    assert job.status() == "canceled"
    # cancelling a created job: 204, no-op
    other = simple_job(con)
    other.stop()
    assert other.status() == "created"


def test_concurrent_job_limit(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.job_limit = 2
    con = connect(sim)
    jobs = [simple_job(con, f"j{i}") for i in range(3)]
    jobs[0].start()
    jobs[1].start()
    with pytest.raises(OpenEoApiError) as e:
        jobs[2].start()
    assert api_error(e) == (400, "ConcurrentJobLimit")
    assert "limit" in e.value.message.lower()
    assert jobs[2].status() == "created"
    jobs[0].stop()
    jobs[2].start()
    assert jobs[2].status() == "queued"


# -- listing ---------------------------------------------------------------------------------------


def test_listing_without_and_with_limit(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    created = [simple_job(con, f"job {i}").job_id for i in range(7)]
    con.job(created[-1]).start()

    everything = con.list_jobs(limit=None)
    assert [j["id"] for j in everything] == created  # oldest first, one page
    assert everything.links == []
    for entry in everything:
        assert {"id", "title", "status", "created", "updated"} <= set(entry) and "usage" not in entry
    assert everything[-1]["status"] == "queued"

    first = con.list_jobs(limit=3)
    pages = [[j["id"] for j in first]]
    next_links = [link.href for link in first.links if link.rel == "next"]
    late = simple_job(con, "created while paginating").job_id
    while next_links:
        assert next_links[0].startswith(sim.url + "jobs?") and "limit=3" in next_links[0]
        page = con.get(next_links[0], expected_status=200).json()
        pages.append([j["id"] for j in page["jobs"]])
        next_links = [link["href"] for link in page["links"] if link["rel"] == "next"]
    assert [len(p) for p in pages] == [3, 3, 1]
    flat = [i for p in pages for i in p]
    assert flat == created[::-1]  # newest first, each job exactly once, stable under concurrent creation
    assert late not in flat

    bad = requests.get(sim.url + "jobs?limit=2&cursor=garbage!")
    assert bad.status_code == 400


def test_listing_page_limit_default(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.page_limit_default = 2
    for _ in range(3):
        requests.post(sim.url + "jobs", json={"process": PROCESS})
    page = requests.get(sim.url + "jobs").json()
    assert len(page["jobs"]) == 2 and [link["rel"] for link in page["links"]] == ["next"]


# -- results ---------------------------------------------------------------------------------------


def test_download_results_sizes_and_checksums(openeo_simulator: BackendSimulator, tmp_path: Path):
    sim = openeo_simulator
    sim.config.asset_size = 50_000
    sim.config.assets_per_job = 2
    con = connect(sim)
    job = ndvi_job(con)
    with pytest.raises(OpenEoApiError) as e:
        job.get_results().get_metadata()
    assert api_error(e) == (400, "JobNotFinished")
    job.start()
    wait_for(job, {"finished"})

    results = job.get_results()
    meta = results.get_metadata()
    assert meta["type"] == "Collection" and meta["id"] == job.job_id and meta["license"] == "proprietary"
    assert meta["extent"]["spatial"]["bbox"] == [[5.0, 51.2, 5.1, 51.3]]
    assert len(meta["assets"]) == 2
    paths = results.download_files(tmp_path)
    downloaded = {p.name: p for p in paths if p.name in meta["assets"]}
    assert set(downloaded) == set(meta["assets"])
    for name, asset in meta["assets"].items():
        assert asset["type"] == "image/tiff; application=geotiff" and asset["roles"] == ["data"]
        assert asset["href"] == f"{sim.url}jobs/{job.job_id}/results/{name}"
        data = downloaded[name].read_bytes()
        assert len(data) == asset["file:size"] == 50_000
        assert asset["file:checksum"] == "1220" + hashlib.sha256(data).hexdigest()
    a, b = (downloaded[n].read_bytes() for n in sorted(downloaded))
    assert a != b  # content depends on the asset name


def test_range_and_head_requests(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    sim.config.queue_duration = sim.config.run_duration = 0.0
    con = connect(sim)
    job = simple_job(con)
    job.start()
    [asset] = job.get_results().get_assets()
    full = requests.get(asset.href)
    assert full.status_code == 200 and len(full.content) == 1024
    assert full.headers["Accept-Ranges"] == "bytes" and full.headers["Content-Length"] == "1024"
    assert full.content == requests.get(asset.href).content  # deterministic

    head = requests.head(asset.href)
    assert head.status_code == 200 and head.headers["Content-Length"] == "1024" and head.content == b""

    tail = requests.get(asset.href, headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206 and tail.content == full.content[1000:]
    assert tail.headers["Content-Range"] == "bytes 1000-1023/1024"
    middle = requests.get(asset.href, headers={"Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == full.content[10:20]
    suffix = requests.get(asset.href, headers={"Range": "bytes=-4"})
    assert suffix.content == full.content[-4:]
    beyond = requests.get(asset.href, headers={"Range": "bytes=5000-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == "bytes */1024"
    missing = requests.get(f"{sim.url}jobs/{job.job_id}/results/nope.tif")
    assert missing.status_code == 404 and missing.json()["code"] == "AssetNotFound"


# -- errors, throttling, outages -------------------------------------------------------------------


def test_unknown_job_is_404_job_not_found(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    with pytest.raises(OpenEoApiError) as e:
        con.job("j-0000000000000000").describe()
    assert api_error(e) == (404, "JobNotFound")
    resp = requests.post(sim.url + "jobs/j-unknown/results")
    body = resp.json()
    assert resp.status_code == 404 and body["code"] == "JobNotFound" and body["message"]
    assert resp.headers["Request-Id"] == body["id"] and len(body["id"]) == 36
    assert requests.get(sim.url + "nope").json()["code"] == "NotFound"


def test_429_injection_with_retry_after(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    job = simple_job(con)
    sim.config.rate_429 = 1.0
    sim.config.retry_after = 2
    con2 = connect(sim, auth=False)  # connecting (GET /, /.well-known/openeo) is never throttled
    assert con2.capabilities().api_version() == "1.2.0"
    calls = {
        "GET /jobs": lambda: con.list_jobs(limit=None),
        "POST /jobs": lambda: simple_job(con),
        "GET /jobs/{job_id}": job.describe,
        "POST /jobs/{job_id}/results": job.start,
        "DELETE /jobs/{job_id}/results": job.stop,
        "GET /jobs/{job_id}/results": lambda: job.get_results().get_metadata(),
        "GET /jobs/{job_id}/logs": job.logs,
        "DELETE /jobs/{job_id}": job.delete,
    }
    before = sim.request_counts()
    for call in calls.values():
        with pytest.raises(OpenEoApiError) as e:
            call()
        assert api_error(e) == (429, "TooManyRequests")
    raw = requests.get(sim.url + "jobs")
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "2" and raw.headers["Request-Id"]
    after = sim.request_counts()
    for key in calls:  # throttled requests are counted too
        assert after[key] - before.get(key, 0) >= 1, key
    assert sim.created_count() == 1

    sim.config.retry_after = 0.5
    assert requests.get(sim.url + "jobs").headers["Retry-After"] == "0.5"
    sim.config.rate_429 = 0.3
    codes = [requests.get(sim.url + "jobs").status_code for _ in range(100)]
    assert 10 < codes.count(429) < 60 and codes.count(200) == 100 - codes.count(429)
    sim.config.rate_429 = 0.0
    assert job.status() == "created"


def test_outage_window_then_recovery(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    job = simple_job(con)
    start = sim.elapsed()
    sim.config.outages = [(start, start + 0.4)]
    for path in ["", ".well-known/openeo", "jobs", f"jobs/{job.job_id}"]:
        resp = requests.get(sim.url + path)
        assert resp.status_code == 503 and resp.json()["code"] == "ServiceUnavailable", path
        assert resp.headers["Retry-After"] == "1"
    with pytest.raises(OpenEoApiError) as e:
        job.describe()
    assert api_error(e) == (503, "ServiceUnavailable")
    time.sleep(0.45)
    assert job.status() == "created"


def test_official_client_retry_rides_out_an_outage(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = openeo.connect(sim.url).authenticate_basic("user", "password")  # default retry, honours Retry-After
    job = simple_job(con)
    start = sim.elapsed()
    sim.config.outages = [(start, start + 0.3)]
    t0 = time.monotonic()
    assert job.status() == "created"
    assert time.monotonic() - t0 >= 0.9  # waited Retry-After: 1 before retrying
    assert sim.request_counts()["GET /jobs/{job_id}"] == 2


def test_request_counts_and_reset(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    assert sim.total_requests() == 0 and sim.jobs() == []
    con = connect(sim)
    job = simple_job(con)
    job.start()
    job.status()
    job.status()
    job.logs()
    requests.get(sim.url + "jobs/j-missing")
    counts = sim.request_counts()
    assert counts["POST /jobs"] == 1
    assert counts["POST /jobs/{job_id}/results"] == 1
    assert counts["GET /jobs/{job_id}"] == 3
    assert counts["GET /jobs/{job_id}/logs"] == 1
    assert counts["GET /credentials/basic"] == 1
    assert counts["GET /.well-known/openeo"] == 1 and counts["GET /"] >= 1
    assert sim.total_requests() == sum(counts.values())
    sim.reset()
    assert sim.request_counts() == {} and sim.total_requests() == 0
    assert sim.jobs() == [] and sim.created_count() == 0
    with pytest.raises(OpenEoApiError):
        job.describe()  # the job is gone
    assert con.describe_account()["user_id"] == "user"  # tokens survive a reset


def test_test_hooks_set_status_and_delete_job(openeo_simulator: BackendSimulator):
    sim = openeo_simulator
    con = connect(sim)
    job = simple_job(con)
    sim.set_status(job.job_id, "finished")
    assert job.status() == "finished"
    assert len(job.get_results().get_assets()) == 1
    sim.set_status(job.job_id, "error")
    assert job.status() == "error" and job.logs(level="error")
    sim.set_status(job.job_id, "running")
    assert job.status() == "running"
    wait_for(job, {"finished"})
    sim.delete_job(job.job_id)
    with pytest.raises(OpenEoApiError) as e:
        job.status()
    assert api_error(e) == (404, "JobNotFound")
    with pytest.raises(KeyError):
        sim.set_status(job.job_id, "queued")
    other = simple_job(con)
    other.delete()
    assert sim.jobs() == []


def test_require_auth_and_signed_asset_hrefs(openeo_simulator_factory: Factory):
    sim = openeo_simulator_factory(require_auth=True, queue_duration=0.0, run_duration=0.0)
    anonymous = connect(sim, auth=False)
    with pytest.raises(OpenEoApiError) as e:
        anonymous.list_jobs()
    assert api_error(e) == (401, "AuthenticationRequired")
    assert anonymous.list_collection_ids() == ["SENTINEL2_L2A"]  # metadata stays public
    con = connect(sim)
    job = simple_job(con)
    job.start()
    [asset] = job.get_results().get_assets()
    assert "?sig=" in asset.href
    assert len(requests.get(asset.href).content) == 1024  # signed: no token needed
    unsigned = asset.href.split("?")[0]
    assert requests.get(unsigned).status_code == 401
    assert requests.get(unsigned, headers=sim.auth_headers()).status_code == 200


# -- determinism, multiple backends, plugin, throughput --------------------------------------------


def _failure_pattern(sim: BackendSimulator, n: int = 16) -> list[str]:
    con = connect(sim)
    jobs = [simple_job(con, f"j{i}") for i in range(n)]
    for job in jobs:
        job.start()
    return [job.status() for job in jobs]


def test_failures_are_deterministic_for_a_seed(openeo_simulator_factory: Factory):
    fast = {"queue_duration": 0.0, "run_duration": 0.0, "failure_rate": 0.5, "capacity": 100}
    first = _failure_pattern(openeo_simulator_factory(seed=7, **fast))
    second = _failure_pattern(openeo_simulator_factory(seed=7, **fast))
    other = _failure_pattern(openeo_simulator_factory(seed=8, **fast))
    assert set(first) == {"finished", "error"}
    assert first == second
    assert other != first


def test_jitter_is_seeded_and_bounded(openeo_simulator_factory: Factory):
    def durations(seed: int) -> list[tuple[float, float]]:
        clock = FakeClock()
        sim = openeo_simulator_factory(seed=seed, jitter=0.2, queue_duration=10, run_duration=20, clock=clock)
        con = connect(sim)
        for _ in range(5):
            simple_job(con).start()
        return [(s["queue_duration"], s["run_duration"]) for s in sim.jobs()]

    a, b = durations(1), durations(1)
    assert a == b and len(set(a)) == 5
    assert all(8 <= q <= 12 and 16 <= r <= 24 for q, r in a)


def test_simulated_backends_are_independent():
    with simulated_backends(2, SimulatorConfig(queue_duration=0.0, run_duration=0.0)) as sims:
        assert [s.name for s in sims] == ["sim-a", "sim-b"]
        assert sims[0].url != sims[1].url and all(s.running for s in sims)
        sims[0].config.rate_429 = 1.0
        assert requests.get(sims[0].url + "jobs").status_code == 429
        assert requests.get(sims[1].url + "jobs").status_code == 200
        con = connect(sims[1])
        job = simple_job(con)
        job.start()
        assert job.status() == "finished" and sims[0].jobs() == []
    assert not any(s.running for s in sims)


def test_plugin_fixtures(openeo_simulator: BackendSimulator, openeo_simulator_factory: Factory):
    assert openeo_simulator.running and openeo_simulator.jobs() == []
    assert openeo_simulator.config.queue_duration == FAST_TIMINGS["queue_duration"]
    extra = openeo_simulator_factory(capacity=3)
    assert extra.name == "sim-a" and extra.config.capacity == 3 and extra.config.run_duration == 0.3
    assert requests.get(extra.url).json()["api_version"] == "1.2.0"


def test_context_manager_start_stop_and_throughput():
    t0 = time.monotonic()
    with BackendSimulator(SimulatorConfig(), name="speedy") as sim:
        assert time.monotonic() - t0 < 0.5
        url = sim.url
        posts = [requests.post(url + "jobs", json={"process": PROCESS}) for _ in range(20)]
        ids = [resp.headers["OpenEO-Identifier"] for resp in posts]

        def hammer() -> None:
            with requests.Session() as session:
                for i in range(100):
                    assert session.get(f"{url}jobs/{ids[i % 20]}").status_code == 200

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        t1 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - t1 < 2.0  # 400 requests: hundreds per second at the very least
        assert sim.request_counts()["GET /jobs/{job_id}"] == 400
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=1)

"""Result stores: a local folder, and object storage against a real S3 server (moto, its own process)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import json
import socketserver
import sys
import threading
from pathlib import Path

import openeo
import pandas as pd
import pytest
from conftest import ndvi_job, tiles_df

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.downloads import DownloadVerificationError, download_job_results, fetch_asset, results_present
from prefect_openeo.settings import settings
from prefect_openeo.storage import LocalStore, ObjectStore, ResultStore, S3Store, StorageError


def manager_for(sim, **kwargs) -> MultiBackendJobManager:
    kwargs.setdefault("poll_sleep", 0.1)
    manager = MultiBackendJobManager(**kwargs)
    manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=2)
    return manager


@contextlib.contextmanager
def s3_calls(store: S3Store):
    """Count the S3 API calls the store's client makes (botocore's ``before-call`` event), by operation."""
    counts: collections.Counter = collections.Counter()

    def count(model, **kwargs):
        counts[model.name] += 1

    store.fs.connect()
    store.fs.s3.meta.events.register("before-call.s3", count)
    try:
        yield counts
    finally:
        store.fs.s3.meta.events.unregister("before-call.s3", count)


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def pending_uploads(client, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def finished_job(sim, tmp_path, **config) -> openeo.BatchJob:
    """A finished job on the simulator (run with downloads off), as the official client sees it."""
    for key, value in config.items():
        setattr(sim.config, key, value)
    db = tmp_path / "setup-jobs.csv"
    manager_for(sim, root_dir=tmp_path / "unused", download_results=False).run_jobs(
        job_db=db, df=tiles_df(1), start_job=ndvi_job
    )
    return openeo.connect(sim.url).job(pd.read_csv(db).loc[0, "id"])


# -- the manager, end to end -----------------------------------------------------------------------
def test_manager_run_publishes_results_to_s3_and_leaves_the_working_directory_empty(
    openeo_simulator, s3_server, tmp_path, monkeypatch
):
    openeo_simulator.config.assets_per_job = 2
    openeo_simulator.config.asset_size = 200_000
    bucket = s3_server.new_bucket()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    db = tmp_path / "db" / "jobs.csv"
    db.parent.mkdir()

    manager = manager_for(openeo_simulator, root_dir=f"s3://{bucket}/runs/a", stac_catalog=True)
    assert isinstance(manager.result_store, S3Store) and manager.result_store.shareable
    with s3_calls(manager.result_store) as calls:
        stats = manager.run_jobs(job_db=db, df=tiles_df(3), start_job=ndvi_job)

    df = pd.read_csv(db)
    assert list(df["status"]) == ["finished"] * 3
    assert stats["job download"] == 3 and stats["files downloaded"] == 6
    assert list(cwd.iterdir()) == []  # nothing written locally: no "s3:" folder
    client = s3_server.client()
    expected = []
    for job_id in df["id"]:
        job_dir = manager.get_job_dir(job_id)
        assert job_dir == f"s3://{bucket}/runs/a/job_{job_id}"
        doc = json.loads(client.get_object(Bucket=bucket, Key=f"runs/a/job_{job_id}/job-results.json")["Body"].read())
        assert len(doc["assets"]) == 2
        for name, asset in doc["assets"].items():
            data = client.get_object(Bucket=bucket, Key=f"runs/a/job_{job_id}/{name}")["Body"].read()
            assert len(data) == asset["file:size"] == 200_000
            assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]
        described = json.loads(manager.result_store.read_bytes(job_id, f"job_{job_id}.json"))
        assert described["id"] == job_id and described["status"] == "finished"
        assert results_present(manager.result_store, job_id)
        names = [*doc["assets"], "job-results.json", f"job_{job_id}.json", "stac-item.json"]
        expected += [f"runs/a/job_{job_id}/{n}" for n in names]
    expected.append("runs/a/collection.json")  # the STAC catalogue (prefect_openeo.catalog)
    assert keys(client, bucket) == sorted(expected)  # no probe, no temporary object, nothing twice
    assert pending_uploads(client, bucket) == []
    # Requests to the store: the write check (PUT + DELETE), then per job one listing of unfinished uploads
    # and one PUT per file (assets smaller than a part go up in one PUT, after verification). The STAC item
    # (prefect_openeo.catalog): per job job-results.json read back (s3fs: HEAD + GET), a listing, a PUT; at the
    # end each item read (HEAD + GET) and one PUT of collection.json.
    catalogue = {"PutObject": 3 + 1, "GetObject": 3 + 3, "HeadObject": 3 + 3, "ListObjectsV2": 3}
    downloads = {"PutObject": 1 + 3 * 4, "DeleteObject": 1, "ListMultipartUploads": 3}
    assert calls == collections.Counter(downloads) + collections.Counter(catalogue)


def test_rerun_download_overwrites_the_same_keys(openeo_simulator, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    job = finished_job(openeo_simulator, tmp_path)
    store = ResultStore.from_root(f"s3://{bucket}/p")
    first = download_job_results(job, store)
    listed = keys(s3_server.client(), bucket)
    second = download_job_results(job, store)
    assert first.files == second.files and len(first.files) == 3
    assert keys(s3_server.client(), bucket) == listed == sorted(f.removeprefix(f"s3://{bucket}/") for f in first.files)
    # The job folder as a URL (credentials from the environment) does the same.
    third = download_job_results(job, f"s3://{bucket}/p/job_{job.job_id}")
    assert third.files == first.files and keys(s3_server.client(), bucket) == listed
    assert results_present(f"s3://{bucket}/p/job_{job.job_id}", job.job_id)
    assert not results_present(store, "j-other")


def test_failed_job_error_logs_go_to_the_store(openeo_simulator, s3_server, tmp_path, monkeypatch):
    openeo_simulator.config.failure_rate = 1.0
    bucket = s3_server.new_bucket()
    monkeypatch.chdir(tmp_path)
    manager = manager_for(openeo_simulator, root_dir=f"s3://{bucket}/r")
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(1), start_job=ndvi_job)
    job_id = pd.read_csv(tmp_path / "jobs.csv").loc[0, "id"]
    assert manager.get_error_log_path(job_id) == f"s3://{bucket}/r/job_{job_id}/job_{job_id}_errors.json"
    logs = json.loads(manager.result_store.read_bytes(job_id, f"job_{job_id}_errors.json"))
    assert logs and all(entry["level"] == "error" for entry in logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.csv"]


@pytest.mark.usefixtures("prefect_api")
def test_flow_run_on_a_worker_without_shared_disk(openeo_simulator, s3_server, tmp_path, monkeypatch):
    """The deployable flow with results on S3: the summary says where each job's results are in the bucket,
    and the working directory stays empty (the run's pictures are drawn aside and only embedded)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from prefect_openeo.flows import run_openeo_jobs

    bucket = s3_server.new_bucket()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    state = run_openeo_jobs(
        job_db=str(tmp_path / "jobs.csv"),
        backends={"sim": openeo_simulator.url},
        start_job=ndvi_job,
        poll_sleep=0.1,
        root_dir=f"s3://{bucket}/flow",
        df=tiles_df(2),
        return_state=True,
    )
    assert state.is_completed(), state
    df = pd.read_csv(tmp_path / "jobs.csv")
    assert list(df["status"]) == ["finished"] * 2
    assert list(cwd.iterdir()) == []
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    (summary,) = [a for a in artifacts if a.key and a.key.endswith("-summary")]
    (pictures,) = [a for a in artifacts if a.key and a.key.endswith("-pictures")]
    assert "data:image/png;base64," in pictures.data
    for job_id in df["id"]:
        assert f"`{job_id}`: `s3://{bucket}/flow/job_{job_id}`" in summary.data
        assert f"flow/job_{job_id}/job-results.json" in keys(s3_server.client(), bucket)


def test_fetch_results_on_request_into_s3(openeo_simulator, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    db = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path / "unused", download_results=False).run_jobs(
        job_db=db, df=tiles_df(2), start_job=ndvi_job
    )
    with pytest.raises(StorageError, match="'s3://no-such-bucket-here/x': the bucket does not exist"):
        manager_for(openeo_simulator, root_dir="s3://no-such-bucket-here/x").fetch_results(db)
    assert manager_for(openeo_simulator, root_dir=f"s3://{bucket}/later").fetch_results(db) == {"skipped": 0, "done": 2}
    for job_id in pd.read_csv(db)["id"]:
        assert f"later/job_{job_id}/job_{job_id}.json" in keys(s3_server.client(), bucket)


# -- verified, atomic publish on S3 -----------------------------------------------------------------
def test_failed_verification_leaves_no_object_and_no_pending_upload(openeo_simulator, s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "part_size", 5 << 20)  # S3's smallest part: a 6 MiB asset takes two
    job = finished_job(openeo_simulator, tmp_path, asset_size=6 << 20)
    (name, asset), *_ = job.get_results().get_metadata()["assets"].items()
    bucket = s3_server.new_bucket()
    store = ResultStore.from_root(f"s3://{bucket}/p")
    lying = {**asset, "file:checksum": "1220" + "0" * 64}
    with s3_calls(store) as calls:
        with pytest.raises(DownloadVerificationError, match="does not match file:checksum"):
            with store.publish(job.job_id, name) as upload:
                fetch_asset(job, asset["href"], lying, upload)
    assert calls["CreateMultipartUpload"] == 1 and calls["UploadPart"] == 1  # the first part was uploaded
    assert calls["AbortMultipartUpload"] == 1 and "CompleteMultipartUpload" not in calls
    client = s3_server.client()
    assert keys(client, bucket) == [] and pending_uploads(client, bucket) == []
    assert not store.exists(job.job_id, name)

    # The true checksum: two parts, completed, and the object is the asset.
    with s3_calls(store) as calls:
        with store.publish(job.job_id, name) as upload:
            assert fetch_asset(job, asset["href"], asset, upload) == 6 << 20
    assert calls == {"CreateMultipartUpload": 1, "UploadPart": 2, "CompleteMultipartUpload": 1}
    data = store.read_bytes(job.job_id, name)
    assert "1220" + hashlib.sha256(data).hexdigest() == asset["file:checksum"]
    assert pending_uploads(client, bucket) == []


@contextlib.contextmanager
def truncating_server(body: bytes, send: int):
    """A real HTTP server that announces ``len(body)`` bytes, sends ``send`` of them, and hangs up."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:send])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/asset.tif"
        finally:
            server.shutdown()


def test_interrupted_download_aborts_its_multipart_upload(openeo_simulator, s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "part_size", 5 << 20)
    job = finished_job(openeo_simulator, tmp_path)
    body = bytes(range(256)) * (48 << 10)  # 12 MiB: two parts go up before the connection drops
    bucket = s3_server.new_bucket()
    store = ResultStore.from_root(f"s3://{bucket}/p")
    with truncating_server(body, send=11 << 20) as href:
        with s3_calls(store) as calls, pytest.raises(Exception) as raised:
            with store.publish(job.job_id, "asset.tif") as upload:
                fetch_asset(job, href, {"file:size": len(body)}, upload)
    assert not isinstance(raised.value, DownloadVerificationError)  # the transfer broke off
    assert calls["UploadPart"] == 2 and calls["AbortMultipartUpload"] == 1
    assert keys(s3_server.client(), bucket) == [] and pending_uploads(s3_server.client(), bucket) == []


def test_upload_left_by_a_crash_is_cleaned_on_the_next_attempt(openeo_simulator, s3_server, tmp_path):
    job = finished_job(openeo_simulator, tmp_path)
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    # A worker died mid-upload: its multipart uploads (one with a part) are still open.
    crashed = client.create_multipart_upload(Bucket=bucket, Key=f"p/job_{job.job_id}/openEO_0.tif")["UploadId"]
    client.upload_part(Bucket=bucket, Key=f"p/job_{job.job_id}/openEO_0.tif", UploadId=crashed, PartNumber=1, Body=b"x")
    client.create_multipart_upload(Bucket=bucket, Key=f"p/job_{job.job_id}/gone.tif")
    other = client.create_multipart_upload(Bucket=bucket, Key="p/job_other/a.tif")["UploadId"]

    store = ResultStore.from_root(f"s3://{bucket}/p")
    report = download_job_results(job, store)
    assert report.assets == 1
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("p/job_other/a.tif", other)]  # other jobs untouched
    assert store.files(job.job_id) == sorted(Path(f).name for f in report.files)
    assert keys(client, bucket) == sorted(f.removeprefix(f"s3://{bucket}/") for f in report.files)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "root, message",
    [
        ("foo://bucket/x", "unknown scheme 'foo'"),
        ("http://example.org/results", "unknown scheme 'http'"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("gs:///prefix", "names no bucket"),
        (Path("s3://bucket/prefix"), "looks like a URL whose '//' was lost"),
        ("file://server/share", "file:// URL names a local path"),
    ],
)
def test_bad_locations_are_named_with_what_is_wrong(root, message):
    with pytest.raises(StorageError, match=message) as raised:
        ResultStore.from_root(root)
    assert str(root).rstrip("/").split("/")[0] in str(raised.value)
    with pytest.raises(StorageError, match=message):
        MultiBackendJobManager(root_dir=root)


@pytest.mark.parametrize("scheme, package", [("gs", "gcsfs"), ("az", "adlfs")])
def test_missing_fsspec_implementation_says_what_to_install(scheme, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(StorageError, match=rf"'{scheme}://bucket/x' needs the package '{package}': pip install"):
        ResultStore.from_root(f"{scheme}://bucket/x")


def test_bad_storage_options_are_refused_clearly(s3_server):
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        ResultStore.from_root("s3://bucket/x", storage_options=["key"])
    with pytest.raises(StorageError, match=r"storage_options \['key'\] given for the local folder 'results'"):
        MultiBackendJobManager(root_dir="results", storage_options={"key": "k"})
    unknown = ResultStore.from_root("s3://bucket/x", storage_options={"no_such_option": 1, "skip_instance_cache": True})
    with pytest.raises(StorageError, match=r"'s3://bucket/x': its storage_options were refused .*'no_such_option'"):
        unknown.check()
    nowhere = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    store = ResultStore.from_root("s3://bucket/x", storage_options={**nowhere, "skip_instance_cache": True})
    with pytest.raises(StorageError, match=r"'s3://bucket/x': cannot write there \(EndpointConnectionError"):
        store.check()


def test_missing_credentials_fail_before_any_job_is_created(openeo_simulator, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    manager = manager_for(openeo_simulator, root_dir=f"s3://{bucket}/x", storage_options={"skip_instance_cache": True})
    with pytest.raises(StorageError, match=rf"'s3://{bucket}/x': no credentials found. Set AWS_ACCESS_KEY_ID"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    assert openeo_simulator.created_count() == 0
    assert not (tmp_path / "jobs.csv").exists()


def test_missing_bucket_fails_before_any_job_is_created(openeo_simulator, s3_server, tmp_path):
    manager = manager_for(openeo_simulator, root_dir="s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="'s3://no-such-bucket-here/x': the bucket does not exist"):
        manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    assert openeo_simulator.created_count() == 0


# -- credentials from prefect-aws blocks ------------------------------------------------------------
def test_prefect_aws_blocks_give_bucket_folder_and_credentials(s3_server, monkeypatch):
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket

    bucket = s3_server.new_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)  # only the block knows the keys and the endpoint
    client_parameters = {"endpoint_url": s3_server.endpoint}
    block = S3Bucket(
        bucket_name=bucket,
        bucket_folder="runs/b",
        credentials=AwsCredentials(
            aws_access_key_id="from-block", aws_secret_access_key="secret", aws_client_parameters=client_parameters
        ),
    )
    store = ResultStore.from_root(block)
    assert isinstance(store, S3Store) and store.location == f"s3://{bucket}/runs/b"
    store.check()
    store.write_bytes("j-1", "a.json", b"{}")
    minio = MinIOCredentials(minio_root_user="u", minio_root_password="p", aws_client_parameters=client_parameters)
    other = ResultStore.from_root(f"s3://{bucket}/runs/b", storage_options=minio)
    assert other.read_bytes("j-1", "a.json") == b"{}"
    assert keys(s3_server.client(), bucket) == ["runs/b/job_j-1/a.json"]

    manager = MultiBackendJobManager(root_dir=block)
    assert manager.get_job_dir("j-1") == f"s3://{bucket}/runs/b/job_j-1"


# -- local folders and other stores ----------------------------------------------------------------
def test_local_roots_keep_paths_and_layout(tmp_path):
    for root in (tmp_path / "r", str(tmp_path / "r"), (tmp_path / "r").as_uri()):
        manager = MultiBackendJobManager(root_dir=root)
        assert isinstance(manager.result_store, LocalStore) and not manager.result_store.shareable
        assert manager.get_job_dir("j-1") == tmp_path / "r" / "job_j-1"
        assert manager.get_error_log_path("j-1") == tmp_path / "r" / "job_j-1" / "job_j-1_errors.json"
    store = ResultStore.from_root(tmp_path / "r")
    assert store.url("j-1", "x.tif") == (tmp_path / "r" / "job_j-1" / "x.tif").as_uri()
    store.write_bytes("j-1", "x.json", b"1")
    assert store.exists("j-1", "x.json") and not store.exists("j-1", "y.json")
    with pytest.raises(ValueError, match="Unusable file name '../x'"):
        store.write_bytes("j-1", "../x", b"1")


def test_local_check_names_an_unusable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        ResultStore.from_root(tmp_path / "file" / "results").check()
    ResultStore.from_root(tmp_path / "new" / "results").check()
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_local_upload_is_visible_only_after_commit(tmp_path):
    store = ResultStore.from_root(tmp_path)
    with store.publish("j", "a.tif") as upload:
        upload.write(b"abc")
        assert not store.exists("j", "a.tif") and store.files("j") == []
        upload.commit()
    assert store.read_bytes("j", "a.tif") == b"abc"
    with store.publish("j", "b.tif") as upload:
        upload.write(b"abc")  # left without commit: dropped
    assert store.files("j") == ["a.tif"] and sorted(p.name for p in (tmp_path / "job_j").iterdir()) == ["a.tif"]


def test_download_into_an_fsspec_memory_store(openeo_simulator, tmp_path):
    job = finished_job(openeo_simulator, tmp_path, assets_per_job=2)
    store = ResultStore.from_root("memory://results-test/run")
    assert isinstance(store, ObjectStore) and store.shareable
    store.check()
    report = download_job_results(job, store)
    assert report.assets == 2 and report.files[0].startswith("memory://results-test/run/job_")
    doc = json.loads(store.read_bytes(job.job_id, "job-results.json"))
    for name, asset in doc["assets"].items():
        assert "1220" + hashlib.sha256(store.read_bytes(job.job_id, name)).hexdigest() == asset["file:checksum"]
    lying = {**doc["assets"][name], "file:size": 1}
    with pytest.raises(DownloadVerificationError):
        with store.publish(job.job_id, "lying.tif") as upload:
            fetch_asset(job, lying["href"], lying, upload)
    assert "lying.tif" not in store.files(job.job_id)
    store.fs.rm("/results-test", recursive=True)

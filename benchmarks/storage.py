"""Result downloads into a local folder against a local S3-compatible server (moto, its own process).

The same finished jobs on a simulated backend (in a child process) are downloaded with
``download_job_results`` into each store, ``--workers`` jobs at once (the engine downloads 4 at once).
Prints bytes/s and, for S3, the requests per job that reached the store (counted with botocore's
``before-send`` event: every HTTP request, retries included) by operation.

    python benchmarks/storage.py [--jobs 8] [--assets 2] [--sizes 16384,65536,8388608,33554432] [--workers 4]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import openeo  # noqa: E402
import pandas as pd  # noqa: E402
import requests  # noqa: E402
from simproc import SimulatorProcess  # noqa: E402

from prefect_openeo import MultiBackendJobManager  # noqa: E402
from prefect_openeo.downloads import download_job_results  # noqa: E402
from prefect_openeo.storage import ResultStore, S3Store  # noqa: E402
from prefect_openeo.testing import free_port  # noqa: E402

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


def moto_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(600):
        try:
            if requests.get(f"{endpoint}/moto-api/", timeout=2).ok:
                return proc, endpoint
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def finished_jobs(url: str, n: int, folder: Path) -> list[openeo.BatchJob]:
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=folder / "unused", download_results=False)
    manager.add_backend("sim", connection=openeo.connect(url), parallel_jobs=n)
    db = folder / f"jobs-{uuid.uuid4().hex[:6]}.csv"
    manager.run_jobs(job_db=db, df=pd.DataFrame({"i": range(n)}), start_job=start_job)
    connection = openeo.connect(url)
    return [connection.job(job_id) for job_id in pd.read_csv(db)["id"]]


def download_all(store: ResultStore, jobs: list[openeo.BatchJob], workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reports = list(pool.map(lambda job: download_job_results(job, store), jobs))
    return time.perf_counter() - start, sum(r.bytes for r in reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--assets", type=int, default=2, help="assets per job")
    parser.add_argument("--sizes", default="16384,8388608,33554432", help="asset sizes in bytes, comma-separated")
    parser.add_argument("--workers", type=int, default=4, help="jobs downloaded at once")
    args = parser.parse_args()

    moto, endpoint = moto_server()
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint, AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    rows = []
    try:
        with SimulatorProcess(1, queue_duration=0.1, run_duration=0.1, assets_per_job=args.assets) as sims, \
                tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:  # fmt: skip
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3 = ResultStore.from_root(f"s3://{bucket}/run")
            assert isinstance(s3, S3Store)
            s3.fs.call_s3("create_bucket", Bucket=bucket)
            s3.fs.connect()
            http, ops = collections.Counter(), collections.Counter()
            s3.fs.s3.meta.events.register("before-send.s3", lambda **kw: http.update(["request"]))
            s3.fs.s3.meta.events.register("before-call.s3", lambda model, **kw: ops.update([model.name]))
            for size in [int(s) for s in args.sizes.split(",")]:
                sims.set(asset_size=size)
                jobs = finished_jobs(sims.urls[0], args.jobs, Path(tmp))
                local = ResultStore.from_root(Path(tmp) / f"results-{size}")
                for label, store in (("local disk", local), ("S3 (moto)", s3)):
                    http.clear()
                    ops.clear()
                    seconds, total = download_all(store, jobs, args.workers)
                    rows.append(row(size, label, len(jobs), total, seconds, http if store is s3 else None, ops))
    finally:
        moto.terminate()
        moto.wait(30)

    print(f"\n{args.jobs} jobs x {args.assets} assets, {args.workers} jobs downloaded at once\n")
    header = ("asset", "store", "jobs", "MiB", "s", "MiB/s", "ms/job", "requests/job", "S3 calls per job")
    print(" | ".join(header))
    print("|".join("---" for _ in header))
    for cells in rows:
        print(" | ".join(cells))


def row(size: int, label: str, jobs: int, total: int, seconds: float, http, ops) -> list[str]:
    """One line of the table; ``http`` is None for the local folder (no requests)."""
    asset = f"{size >> 10} KiB" if size < 2**20 else f"{size / 2**20:g} MiB"
    calls = ", ".join(f"{op} {n / jobs:g}" for op, n in sorted(ops.items())) or "-"
    requests_per_job = f"{http['request'] / jobs:g}" if http is not None else "-"
    mib = total / 2**20
    return [asset, label, str(jobs), f"{mib:.1f}", f"{seconds:.2f}", f"{mib / seconds:.1f}",
            f"{1000 * seconds / jobs:.0f}", requests_per_job, calls]  # fmt: skip


if __name__ == "__main__":
    main()

"""A worker process for the shared-database tests: run_jobs on a shared SqlJobDatabase.

    python sql_worker.py URL TABLE WORKER LEASE POLL BACKEND_URL... [--parallel-jobs N] [--root-dir DIR]

Without ``--root-dir`` results are not downloaded.
"""

from __future__ import annotations

import argparse

import openeo

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.jobdb.sql import SqlJobDatabase

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("table")
    parser.add_argument("worker")
    parser.add_argument("lease", type=float)
    parser.add_argument("poll", type=float)
    parser.add_argument("backend_urls", nargs="+")
    parser.add_argument("--parallel-jobs", type=int, default=2)
    parser.add_argument("--root-dir", default=None)
    args = parser.parse_args()

    def start_job(row, connection, **kwargs):
        return connection.create_job(PG, title=f"row{row.name} by {args.worker}", validate=False)

    manager = MultiBackendJobManager(
        poll_sleep=args.poll, root_dir=args.root_dir, download_results=args.root_dir is not None
    )
    for i, backend_url in enumerate(args.backend_urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(backend_url), parallel_jobs=args.parallel_jobs)
    db = SqlJobDatabase(args.url, args.table, worker_id=args.worker, lease_seconds=args.lease)
    manager.run_jobs(job_db=db, start_job=start_job)


if __name__ == "__main__":
    main()

"""A worker process for the shared-database tests: run_jobs on a shared SqlJobDatabase."""

from __future__ import annotations

import sys

import openeo

from prefect_openeo import MultiBackendJobManager
from prefect_openeo.jobdb.sql import SqlJobDatabase

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def main(url: str, table: str, worker: str, lease: str, poll: str, *backend_urls: str) -> None:
    def start_job(row, connection, **kwargs):
        return connection.create_job(PG, title=f"row{row.name} by {worker}", validate=False)

    manager = MultiBackendJobManager(poll_sleep=float(poll), download_results=False)
    for i, backend_url in enumerate(backend_urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(backend_url), parallel_jobs=2)
    db = SqlJobDatabase(url, table, worker_id=worker, lease_seconds=float(lease))
    manager.run_jobs(job_db=db, start_job=start_job)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""A flow run in its own process for the shared-limit tests: run_openeo_jobs on one job database."""

from __future__ import annotations

import sys

from prefect_openeo.flows import run_openeo_jobs

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


if __name__ == "__main__":
    job_db, backend_url = sys.argv[1:3]
    state = run_openeo_jobs(
        job_db=job_db,
        backends={"sim": backend_url},
        start_job=start_job,
        parallel_jobs=2,
        poll_sleep=0.2,
        download_results=False,
        return_state=True,
    )
    sys.exit(0 if state.is_completed() else 1)

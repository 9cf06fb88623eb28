"""A flow run in its own process for the shared-limit tests: run_openeo_jobs on one job database.

    python flow_worker.py JOB_DB BACKEND_URL ROOT_DIR [GO_FILE]

With GO_FILE, the worker writes GO_FILE.<pid>.ready once Prefect is imported and waits for GO_FILE to exist
before it starts the flow run, so that a test can start several at the same moment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefect_openeo.flows import run_openeo_jobs

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"row {row.name}", validate=False)


if __name__ == "__main__":
    job_db, backend_url, root_dir, *go = sys.argv[1:]
    if go:
        Path(f"{go[0]}.{os.getpid()}.ready").touch()
        deadline = time.monotonic() + 120
        while not Path(go[0]).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    state = run_openeo_jobs(
        job_db=job_db,
        backends={"sim": backend_url},
        start_job=start_job,
        parallel_jobs=2,
        poll_sleep=0.2,
        root_dir=root_dir,
        download_results=False,
        global_concurrency=True,
        return_state=True,
    )
    sys.exit(0 if state.is_completed() else 1)

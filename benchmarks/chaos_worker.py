"""One manager process of the chaos benchmark: run_jobs on a job database until done (or killed)."""

from __future__ import annotations

import sys

import openeo

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"{row['round']}-row{row.name}", validate=False)


def main(manager_name: str, db_path: str, root_dir: str, *urls: str) -> None:
    if manager_name == "openeo":
        from openeo.extra.job_management import MultiBackendJobManager
    else:
        from prefect_openeo import MultiBackendJobManager
    manager = MultiBackendJobManager(poll_sleep=0.2, root_dir=root_dir)
    for i, url in enumerate(urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=3)
    manager.run_jobs(job_db=db_path, start_job=start_job)


if __name__ == "__main__":
    main(*sys.argv[1:])

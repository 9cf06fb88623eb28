"""One manager process of the chaos benchmark: run_jobs on a job database until done (or killed)."""

from __future__ import annotations

import argparse

import openeo

PG = {"n": {"process_id": "constant", "arguments": {"x": 1}, "result": True}}


def start_job(row, connection, **kwargs):
    return connection.create_job(PG, title=f"{row['round']}-row{row.name}", validate=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manager", choices=["openeo", "prefect-openeo"])
    parser.add_argument("job_db", help="a .csv path, or an SQLAlchemy URL / .db path (prefect-openeo only)")
    parser.add_argument("root_dir")
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--table", default="openeo_jobs")
    parser.add_argument("--parallel-jobs", type=int, default=3)
    args = parser.parse_args()
    if args.manager == "openeo":
        from openeo.extra.job_management import MultiBackendJobManager

        job_db = args.job_db
    else:
        from prefect_openeo import MultiBackendJobManager

        job_db = args.job_db
        if args.job_db.endswith(".db") or "://" in args.job_db:
            from prefect_openeo.jobdb.sql import SqlJobDatabase

            job_db = SqlJobDatabase(args.job_db, args.table)
    manager = MultiBackendJobManager(poll_sleep=0.2, root_dir=args.root_dir)
    for i, url in enumerate(args.urls):
        manager.add_backend(f"b{i}", connection=openeo.connect(url), parallel_jobs=args.parallel_jobs)
    manager.run_jobs(job_db=job_db, start_job=start_job)


if __name__ == "__main__":
    main()

"""Example flow: tile an area of interest (GeoJSON) into a job database, then run one NDVI job per tile.

Every parameter is plain data, so it deploys without pickled code (see ``deployments/prefect.yaml``);
run again with the same ``job_db`` to resume where the last run stopped.

    python flows/tile_and_run.py aoi.geojson jobs.parquet sim=http://127.0.0.1:8000/
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from prefect_openeo.flows import run_openeo_jobs
from prefect_openeo.jobdb import create_job_db, get_job_db
from prefect_openeo.tiling import read_area, tile_area


@flow(name="tile-and-run-openeo-jobs", log_prints=True)
def tile_and_run(
    area: str,
    job_db: str,
    backends: dict[str, str],
    start_job: str = "prefect_openeo.demo:create_ndvi_job",
    tile_size: float = 10_000,
    crs: str = "EPSG:3857",
    year: int = 2024,
    parallel_jobs: int = 2,
    poll_sleep: float = 60,
    root_dir: str = "results",
) -> dict:
    """Create ``job_db`` from ``area`` (once), then run its jobs on ``backends`` (name -> URL)."""
    logger = get_run_logger()
    if not get_job_db(job_db).exists():
        tiles = tile_area(read_area(area), tile_size=tile_size, crs=crs)
        tiles["year"] = year
        create_job_db(job_db, tiles)
        logger.info(f"Created {job_db} with {len(tiles)} tiles")
    else:
        logger.info(f"Resuming {job_db}")
    return run_openeo_jobs(
        job_db=job_db,
        backends=backends,
        start_job=start_job,
        parallel_jobs=parallel_jobs,
        poll_sleep=poll_sleep,
        root_dir=root_dir,
    )


if __name__ == "__main__":
    area_path, db_path, *pairs = sys.argv[1:]
    tile_and_run(area=str(Path(area_path)), job_db=db_path, backends=dict(p.split("=", 1) for p in pairs))

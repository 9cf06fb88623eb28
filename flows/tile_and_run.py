"""Example flow: tile an area of interest into a job database, then run one NDVI job per tile.

Every parameter is plain data, so it deploys without pickled code (see ``deployments/prefect.yaml``);
run again with the same ``job_db`` to resume where the last run stopped.

    python flows/tile_and_run.py flows/mol.geojson jobs.parquet sim=http://127.0.0.1:8000/
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from prefect import get_run_logger
from pydantic import Field

from prefect_openeo.flows import BackendRef, ParallelJobs, StartJobRef, openeo_flow, run_openeo_jobs
from prefect_openeo.jobdb import create_job_db, get_job_db
from prefect_openeo.tiling import read_area, tile_area


@openeo_flow(name="tile-and-run-openeo-jobs", log_prints=True)
def tile_and_run(
    area: str,
    job_db: str,
    backends: Mapping[str, BackendRef],
    start_job: StartJobRef = "prefect_openeo.demo:create_ndvi_job",
    tile_size: Annotated[float, Field(gt=0)] = 10_000,
    crs: str = "EPSG:3857",
    year: Annotated[int, Field(ge=1950, le=2100)] = 2024,
    parallel_jobs: ParallelJobs = None,
    poll_sleep: Annotated[float, Field(ge=0)] = 60,
    root_dir: str = "results",
) -> dict:
    """Create the job database from the area (once: a later run resumes it), then run one job per tile.

    Args:
        area: The area of interest: a GeoJSON, shapefile, GeoPackage or GeoParquet file (lon/lat unless it says
            otherwise). Relative to the flow run's working directory.
        job_db: The job database to create from the area, or to resume when it exists: a CSV or Parquet path, a
            `.db`/`.sqlite` file, or a database URL without a password.
        backends: Backend name -> `block:NAME` (an OpenEOBackend block), a URL (no authentication), or a spec
            whose secrets are named ({"secret": NAME} or {"env": VAR}), never given.
        start_job: The callback that creates one tile's job: `package.module:function`, or a
            ProcessBasedJobCreator spec. The default makes a yearly NDVI composite of the tile.
        tile_size: Side of a tile, in units of crs (metres for EPSG:3857).
        crs: The grid's coordinate reference system.
        year: The year of the composites, stored in each row's `year` column.
        parallel_jobs: Jobs active at once per backend: one number for all, or backend name -> number. Left
            empty: each OpenEOBackend block's own parallel_jobs (2 for other backends).
        poll_sleep: Seconds between two sweeps of the backends' job listings.
        root_dir: Folder for the results: one job_{id}/ folder per job.
    """
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

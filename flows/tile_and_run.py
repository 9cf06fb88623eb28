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

from prefect_openeo.flows import BackendRef, ParallelJobs, StartJobRef, carry_state, openeo_flow, run_openeo_jobs
from prefect_openeo.jobdb import create_job_db, get_job_db
from prefect_openeo.tiling import read_area, tile_area, tiling_id, tiling_note


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
    fail_when_failed_rows: int | float | None = None,
    cancel_backend_jobs: bool = False,
) -> dict:
    """Create the job database from the area (once: a later run resumes it), then run one job per tile.

    This flow run ends as its run-openeo-jobs subflow ended: its state and message ("3 of 27 rows ended in
    error"), and the subflow's summary artifact is on this run too.

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
        fail_when_failed_rows: End Failed when at least this many rows failed (a whole number), or this fraction
            of all rows (a number in (0, 1]); left empty, the run ends Completed, its message saying how many.
        cancel_backend_jobs: When the flow run is cancelled, cancel its active backend jobs too; by default they
            keep running and a later run tracks them.
    """
    logger = get_run_logger()
    if not get_job_db(job_db).exists():
        shape = read_area(area)
        tiles = tile_area(shape, tile_size=tile_size, crs=crs)
        tiles["year"] = year
        tiles["tiling"] = tiling_id(shape, tile_size=tile_size, crs=crs)
        create_job_db(job_db, tiles)
        logger.info(f"Created {job_db} with {len(tiles)} tiles{tiling_note(tiles)}")
    else:
        check_made_from(job_db, area, tile_size, crs, year)
        logger.info(f"Resuming {job_db}")
    subflow = run_openeo_jobs(
        job_db=job_db,
        backends=backends,
        start_job=start_job,
        parallel_jobs=parallel_jobs,
        poll_sleep=poll_sleep,
        root_dir=root_dir,
        fail_when_failed_rows=fail_when_failed_rows,
        cancel_backend_jobs=cancel_backend_jobs,
        return_state=True,
    )
    return carry_state(subflow)  # this run ends as the subflow did: its message, Failed or Cancelled


def check_made_from(job_db: str, area: str, tile_size: float, crs: str, year: int) -> None:
    """A job database is resumed only with the area, tile size, CRS and year it was made from (its ``tiling``
    and ``year`` columns): other ones would be ignored without a word. Raises ``ValueError`` saying what
    differs; a job database without a ``tiling`` column (made elsewhere) is resumed as it is."""
    rows = get_job_db(job_db).read()
    made = rows["tiling"].dropna().unique().tolist() if "tiling" in rows.columns else []
    differs = []
    if made:
        now = tiling_id(read_area(area), tile_size=tile_size, crs=crs)
        if now not in made:
            differs.append(
                f"its tiles were made as {made[0]!r}, area {area!r} at tile_size {tile_size:g} makes {now!r}"
            )
    if "year" in rows.columns and rows["year"].notna().any() and year not in set(rows["year"].dropna().astype(int)):
        differs.append(f"its rows are for year {sorted(set(rows['year'].dropna().astype(int)))}, not {year}")
    if differs:
        raise ValueError(
            f"The job database {job_db!r} was made from other parameters: {'; '.join(differs)}. Use a new job_db "
            "for the new ones, or set them back to resume it."
        )


if __name__ == "__main__":
    area_path, db_path, *pairs = sys.argv[1:]
    tile_and_run(area=str(Path(area_path)), job_db=db_path, backends=dict(p.split("=", 1) for p in pairs))

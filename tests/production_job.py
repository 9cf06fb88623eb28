"""The ``start_job`` of the fan-out test, given to the deployment as a file path (``path/to/file.py:start_job``):
the demo's NDVI job, its title naming the flow run that created it, so the simulator's records show which worker
flow run created which job."""

from __future__ import annotations

import pandas as pd
from openeo import BatchJob, Connection
from prefect.runtime import flow_run


def start_job(row: pd.Series, connection: Connection, **kwargs) -> BatchJob:
    west, south, east, north = row["geometry"].bounds
    cube = connection.load_collection(
        "SENTINEL2_L2A",
        spatial_extent={"west": west, "south": south, "east": east, "north": north},
        temporal_extent=["2024-01-01", "2025-01-01"],
        bands=["B04", "B08"],
    )
    return cube.ndvi(nir="B08", red="B04").create_job(title=f"NDVI {row['tile']} by {flow_run.name}")

"""The built-in demo: tiles over an area of interest, an NDVI job per tile, two simulated backends."""

from __future__ import annotations

import geopandas as gpd
import pandas as pd
from openeo import BatchJob, Connection
from shapely.geometry import box

#: Area of interest of the demo (west, south, east, north), in EPSG:4326: around Mol, Belgium.
DEMO_AOI = (5.0, 51.1, 5.5, 51.3)


def demo_tiles(n_tiles: int = 20, aoi: tuple[float, float, float, float] = DEMO_AOI) -> gpd.GeoDataFrame:
    """Split ``aoi`` into about ``n_tiles`` equal tiles on a regular grid, one row (job) per tile."""
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be at least 1, got {n_tiles}")
    west, south, east, north = aoi
    cols = max(1, round((n_tiles * (east - west) / (north - south)) ** 0.5))
    rows = -(-n_tiles // cols)
    dx, dy = (east - west) / cols, (north - south) / rows
    tiles = [
        box(west + c * dx, south + r * dy, west + (c + 1) * dx, south + (r + 1) * dy)
        for r in range(rows)
        for c in range(cols)
    ][:n_tiles]
    return gpd.GeoDataFrame(
        {"tile": [f"t{i:03d}" for i in range(len(tiles))], "year": 2024},
        geometry=tiles,
        crs="EPSG:4326",
    )


def create_ndvi_job(row: pd.Series, connection: Connection, **kwargs) -> BatchJob:
    """``start_job`` callback of the demo: a yearly NDVI composite of the row's tile."""
    west, south, east, north = row["geometry"].bounds
    year = int(row["year"])
    cube = connection.load_collection(
        "SENTINEL2_L2A",
        spatial_extent={"west": west, "south": south, "east": east, "north": north},
        temporal_extent=[f"{year}-01-01", f"{year + 1}-01-01"],
        bands=["B04", "B08"],
    )
    ndvi = cube.ndvi(nir="B08", red="B04")
    return ndvi.create_job(title=f"NDVI {row['tile']} {year}", out_format="GTiff")

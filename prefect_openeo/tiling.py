"""From an area of interest to a job database: one row per tile."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
from openeo.extra.job_management import split_area


def read_area(path: str | Path) -> gpd.GeoDataFrame:
    """An area of interest from GeoJSON, a shapefile, GeoPackage or GeoParquet."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Area of interest {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            area = gpd.read_parquet(path)
        else:
            area = gpd.read_file(path)
    except Exception as e:
        raise ValueError(f"Cannot read the area of interest {str(path)!r}: {e}") from e
    if area.empty or area.geometry.isna().all():
        raise ValueError(f"The area of interest {str(path)!r} has no geometry")
    if area.crs is None:
        area = area.set_crs("EPSG:4326")
    return area


def tile_area(area: gpd.GeoDataFrame, *, tile_size: float, crs: str = "EPSG:3857") -> gpd.GeoDataFrame:
    """Tiles of ``tile_size`` (in units of ``crs``) on a regular grid in ``crs`` covering ``area``
    (openeo's ``split_area``), in EPSG:4326, with a ``tile`` name column."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    # split_area takes a bare polygon to be in the grid's CRS.
    shape = area.to_crs(crs).geometry.union_all()
    if not shape.is_valid:
        shape = shape.buffer(0)
    tiles = split_area(shape, projection=crs, tile_size=tile_size).to_crs("EPSG:4326")
    tiles.insert(0, "tile", [f"t{i:05d}" for i in range(len(tiles))])
    return tiles

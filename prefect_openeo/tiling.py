"""From an area of interest to a job database: one row per tile.

Checks run before any tile is built: the grid CRS must be an EPSG code, the tile size must fit its axis
unit, the area must be longitude/latitude that projects into the grid, and the tile count (estimated from
the area's bounds in the grid CRS) must stay under a bound. Likely mistakes that may still be meant
(the area outside the CRS's area of use, unusual tile sizes, a file without a CRS) are ``TilingWarning``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pyproj
import shapely
from openeo.extra.job_management import split_area
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

#: Refuse to build more tiles than this unless told otherwise (``split_area`` holds them all in memory).
MAX_TILES = 10_000
#: A tile edge outside these bounds (in metres, degrees converted at the equator) is in the wrong unit.
MIN_TILE_METRES, MAX_TILE_METRES = 1.0, 10_000_000.0
#: A tile edge outside these bounds is unusual for an openEO batch job: allowed, with a warning.
USUAL_TILE_METRES = (10.0, 1_000_000.0)
#: Columns ``tile_area`` writes: tile name, bounds in EPSG:4326, geometry.
TILE_COLUMNS = ("tile", "west", "south", "east", "north", "geometry")
#: Files whose format fixes the CRS: RFC 7946 GeoJSON is always longitude/latitude (EPSG:4326).
_GEOJSON_SUFFIXES = (".geojson", ".json")


class TilingWarning(UserWarning):
    """The area or the tile grid is probably not what was meant (but may be)."""


class TooManyTiles(ValueError):
    """Tiling would build more than ``max_tiles`` tiles; ``suggestion`` is a round tile size that would not
    and its tile count (``None`` when the area has more polygons than ``max_tiles``: one tile each at least)."""

    def __init__(self, estimate: TileEstimate, max_tiles: int, suggestion: tuple[float, int] | None):
        self.estimate, self.max_tiles, self.suggestion = estimate, max_tiles, suggestion
        larger = f"use a larger tile size ({suggestion[0]:g} makes up to {suggestion[1]:,}) or " if suggestion else ""
        super().__init__(f"{estimate}, more than the limit of {max_tiles:,}: {larger}raise the limit")


@dataclass(frozen=True)
class TileEstimate:
    """How many tiles ``split_area`` builds: a grid anchored at each part's lower-left corner, before
    tiles that miss the area are dropped (so an upper bound of the rows, and what it holds in memory)."""

    crs: str
    unit: str
    tile_size: float
    grids: tuple[tuple[int, int], ...]  # (columns, rows) per polygon of the area

    @property
    def tiles(self) -> int:
        return sum(columns * rows for columns, rows in self.grids)

    def __str__(self) -> str:
        if len(self.grids) == 1:
            grid = f"{self.grids[0][0]:,} columns x {self.grids[0][1]:,} rows"
        else:
            grid = f"grids over {len(self.grids):,} polygons"
        return f"{self.tile_size:g} {self.unit} tiles in {self.crs} make up to {self.tiles:,} tiles ({grid})"


def read_area(path: str | Path) -> gpd.GeoDataFrame:
    """An area of interest from GeoJSON, a shapefile, GeoPackage or GeoParquet.

    GeoJSON is longitude/latitude (EPSG:4326, RFC 7946). Another file without a CRS is taken to be
    EPSG:4326 too, with a ``TilingWarning`` saying so."""
    path = Path(path)
    if not path.exists():
        where = "" if path.is_absolute() else f" (a relative path: looked for in {Path.cwd()})"
        raise FileNotFoundError(f"Area of interest {str(path)!r} does not exist{where}")
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
        if path.suffix.lower() not in _GEOJSON_SUFFIXES:
            warnings.warn(
                f"{str(path)!r} has no CRS information; assuming longitude/latitude (EPSG:4326)",
                TilingWarning,
                stacklevel=2,
            )
        area = area.set_crs("EPSG:4326")
    return area


def grid_crs(crs: str) -> pyproj.CRS:
    """The tile grid's CRS: a geographic or projected CRS with an EPSG code (what ``split_area`` takes)."""
    try:
        parsed = pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as e:
        raise ValueError(f"Unknown CRS {crs!r}: {e}") from e
    epsg = parsed.to_epsg()
    if epsg is None:
        raise ValueError(f"The tile grid CRS must have an EPSG code (like EPSG:3857), got {crs!r}")
    if not (parsed.is_geographic or parsed.is_projected):
        raise ValueError(f"The tile grid CRS must be geographic or projected, got {crs!r} ({parsed.name})")
    return parsed


def _unit(crs: pyproj.CRS) -> tuple[str, float]:
    """The horizontal axes' unit name and its length in metres (a degree at the equator)."""
    axis = crs.axis_info[0]
    factor = axis.unit_conversion_factor  # to radians for angles, to metres for lengths
    if crs.is_geographic:
        return axis.unit_name, factor * crs.ellipsoid.semi_major_metre
    return axis.unit_name, factor


def check_tile_size(crs: pyproj.CRS, tile_size: float) -> None:
    """Refuse a tile size that cannot be in the CRS's axis unit; warn when it is unusual.

    Rule: converted to metres (a degree is about 111 km), a tile edge must be between 1 m and 10,000 km
    (e.g. 10000 in EPSG:4326 is 1.1 million km: metres given to a degree-based CRS; 0.1 in EPSG:3857 is
    10 cm: degrees given to a metre-based CRS). Under 10 m or over 1,000 km is allowed, with a warning."""
    if not math.isfinite(tile_size) or tile_size <= 0:
        raise ValueError(f"The tile size must be a positive number, got {tile_size:g}")
    unit, metres_per_unit = _unit(crs)
    units = _plural(unit)
    metres = tile_size * metres_per_unit
    head = f"A tile size of {tile_size:g} in EPSG:{crs.to_epsg()} ({units}) is {_length(metres)}"
    if not MIN_TILE_METRES <= metres <= MAX_TILE_METRES:
        other = (
            "a metre-based CRS such as EPSG:3857 or the area's UTM zone for a size in metres"
            if crs.is_geographic
            else "a degree-based CRS such as EPSG:4326 for a size in degrees"
        )
        low, high = (_number(m / metres_per_unit) for m in (MIN_TILE_METRES, MAX_TILE_METRES))
        raise ValueError(
            f"{head}: {'under 1 m' if metres < MIN_TILE_METRES else 'over 10,000 km'}, so not meant in {units}. "
            f"Give the size in {units} ({low} to {high}), or use {other}"
        )
    low, high = USUAL_TILE_METRES
    if not low <= metres <= high:
        warnings.warn(
            f"{head}: unusual for an openEO batch job ({_length(low)} to {_length(high)} is usual); "
            f"is it meant in {units}?",
            TilingWarning,
            stacklevel=2,
        )


def _plural(unit: str) -> str:
    return unit[: -len("foot")] + "feet" if unit.endswith("foot") else f"{unit}s"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _length(metres: float) -> str:
    if metres < 1000:
        return f"{metres:.3g} m"
    return f"{metres / 1000:,.0f} km" if metres >= 100_000 else f"{metres / 1000:.3g} km"


def check_area_of_use(area: gpd.GeoDataFrame, crs: pyproj.CRS) -> None:
    """Refuse an area that is not longitude/latitude; warn when it lies (partly) outside ``crs``'s area of use."""
    lonlat = area.to_crs("EPSG:4326")
    west, south, east, north = (float(v) for v in lonlat.total_bounds)
    if not all(map(math.isfinite, (west, south, east, north))):
        raise ValueError(f"The area of interest cannot be converted to longitude/latitude from {area.crs}")
    if west < -180 or east > 180 or south < -90 or north > 90:
        raise ValueError(
            f"The area of interest's coordinates (x {west:g} to {east:g}, y {south:g} to {north:g}) are not "
            "longitude/latitude: are x and y swapped, or are they projected coordinates in a file without a CRS?"
        )
    use = crs.area_of_use
    if use is None:
        return
    where = f"lon {west:.4g} to {east:.4g}, lat {south:.4g} to {north:.4g}"
    use_where = f"lon {use.west:g} to {use.east:g}, lat {use.south:g} to {use.north:g}"
    lon_in, lon_overlap = _lon_within(west, east, use.west, use.east)
    inside = lon_in and use.south <= south and north <= use.north
    overlaps = lon_overlap and south <= use.north and north >= use.south
    if inside:
        return
    name = f"EPSG:{crs.to_epsg()} ({crs.name})"
    if overlaps:
        message = f"The area of interest ({where}) extends beyond the area of use of {name}: {use_where}"
    else:
        message = (
            f"The area of interest ({where}) lies outside the area of use of {name}: {use_where}. "
            "Are longitude and latitude swapped, or is it the wrong CRS?"
        )
    zone = _utm_zone((west + east) / 2, (south + north) / 2)
    if zone and zone != crs.to_epsg():
        message += f" (the area's UTM zone is EPSG:{zone})"
    warnings.warn(message, TilingWarning, stacklevel=2)


def _lon_within(west: float, east: float, use_west: float, use_east: float) -> tuple[bool, bool]:
    """Whether [west, east] lies within, and whether it overlaps, a longitude range that may cross 180."""
    if use_west <= use_east:
        return use_west <= west and east <= use_east, west <= use_east and east >= use_west
    within = west >= use_west or east <= use_east
    return within, east >= use_west or west <= use_east


def _utm_zone(lon: float, lat: float) -> int | None:
    """The EPSG code of the WGS 84 UTM zone of a point (the regular 6-degree zones)."""
    if not -80 <= lat <= 84:
        return None
    zone = min(60, int((lon + 180) // 6) + 1)
    return (32600 if lat >= 0 else 32700) + zone


def _grid_shape(area: gpd.GeoDataFrame, crs: str) -> BaseGeometry:
    shape = area.to_crs(crs).geometry.union_all()
    if not shape.is_valid:
        shape = shape.buffer(0)
    if shape.is_empty or not all(map(math.isfinite, shape.bounds)):
        raise ValueError(f"The area of interest cannot be projected to {crs}: is it inside that CRS's area of use?")
    return shape


def _estimate(shape: BaseGeometry, crs: pyproj.CRS, tile_size: float) -> TileEstimate:
    """The grid ``split_area`` builds over ``shape`` (one per polygon), without building it."""
    grids = []
    for part in getattr(shape, "geoms", [shape]):
        west, south, east, north = part.bounds
        grids.append(
            (math.ceil(round((east - west) / tile_size, 10)), math.ceil(round((north - south) / tile_size, 10)))
        )
    return TileEstimate(f"EPSG:{crs.to_epsg()}", _unit(crs)[0], tile_size, tuple(grids))


def _suggest(shape: BaseGeometry, crs: pyproj.CRS, estimate: TileEstimate, max_tiles: int) -> tuple[float, int] | None:
    """The smallest round tile size (1, 2 or 5 times a power of ten) that makes at most ``max_tiles`` tiles,
    and that count; ``None`` when no size can (every polygon of the area gets a tile of its own)."""
    if len(estimate.grids) > max_tiles:
        return None
    size = estimate.tile_size * math.sqrt(estimate.tiles / max_tiles)
    exponent = math.floor(math.log10(size))
    while True:  # ends: a size beyond the area's extent makes one tile per polygon
        for step in (1, 2, 5):
            candidate = float(f"{step}e{exponent}")
            if candidate >= size and (tiles := _estimate(shape, crs, candidate).tiles) <= max_tiles:
                return candidate, tiles
        exponent += 1


@contextmanager
def _without_bare_polygon_notice() -> Iterator[None]:
    """Hide ``split_area``'s "no CRS information; assuming ..." notice: we hand it a polygon already
    projected to the grid CRS (it takes a CRS only with a bounding box, which would lose the shape)."""
    logger = logging.getLogger("openeo.extra.job_management._job_splitting")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Input geometry has no CRS information")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


#: An edge tile narrower (or lower) than this share of the tile size is merged into its neighbour.
SLIVER_FRACTION = 0.5


def merge_slivers(tiles: gpd.GeoDataFrame, tile_size: float) -> tuple[gpd.GeoDataFrame, int]:
    """``split_area``'s tiles (in the grid CRS) with each sliver at an area's east or north edge (narrower than
    ``SLIVER_FRACTION`` of ``tile_size``) merged into the tile beside it (west, then south), which becomes up
    to 1.5 tiles wide: a sliver is a paid job for a strip of data. A sliver whose neighbour was dropped (it
    does not touch the area) stays. Returns the tiles and how many were merged."""
    boxes = [list(b) for b in tiles.geometry.bounds[["minx", "miny", "maxx", "maxy"]].to_numpy()]
    step = tile_size * 1e-6  # coordinates of one grid line agree to far better than this

    def key(*values: float) -> tuple[int, ...]:
        return tuple(round(v / step) for v in values)

    merged = 0
    for lo, hi, other_lo, other_hi in ((0, 2, 1, 3), (1, 3, 0, 2)):  # narrow in x: merge west; in y: south
        by_far_edge = {key(b[hi], b[other_lo], b[other_hi]): b for b in boxes}
        gone: set[int] = set()  # slivers merged into a neighbour in this pass
        for b in [b for b in boxes if b[hi] - b[lo] < SLIVER_FRACTION * tile_size]:
            neighbour = by_far_edge.get(key(b[lo], b[other_lo], b[other_hi]))
            if neighbour is None or neighbour is b:
                continue
            del by_far_edge[key(neighbour[hi], neighbour[other_lo], neighbour[other_hi])]
            neighbour[hi] = b[hi]
            by_far_edge[key(neighbour[hi], neighbour[other_lo], neighbour[other_hi])] = neighbour
            by_far_edge.pop(key(b[hi], b[other_lo], b[other_hi]), None)
            gone.add(id(b))
        merged += len(gone)
        boxes = [b for b in boxes if id(b) not in gone]
    geometry = [box(*b) for b in boxes]
    return gpd.GeoDataFrame(geometry=geometry, crs=tiles.crs), merged


def tiling_id(area: gpd.GeoDataFrame, *, tile_size: float, crs: str) -> str:
    """What a tiling was made from, as a job database records it (column ``tiling``): the tile size, the grid
    CRS and a digest of the area's shape (not its file name: a moved file is the same area), e.g.
    ``"10000 EPSG:3857 area 3f2a9c01b7d4"``. A resumed tile-and-run compares it with its parameters."""
    import hashlib

    shape = area.to_crs("EPSG:4326").geometry.union_all().normalize()
    digest = hashlib.sha256(shapely.to_wkb(shapely.set_precision(shape, 1e-9))).hexdigest()[:12]
    return f"{tile_size:g} EPSG:{grid_crs(crs).to_epsg()} area {digest}"


def tiling_note(tiles: gpd.GeoDataFrame) -> str:
    """What ``tile_area`` left out of the plain grid, for a person: e.g. ``"; 2 slivers at the edges merged
    into their neighbours, 3 tiles not touching the area left out"`` ("" when nothing)."""
    counts = tiles.attrs.get("tiling") or {}
    parts = []
    if counts.get("merged"):
        parts.append(f"{counts['merged']} sliver(s) at the edges merged into their neighbours")
    if counts.get("dropped"):
        parts.append(f"{counts['dropped']} grid tile(s) not touching the area left out")
    return "; " + ", ".join(parts) if parts else ""


def tile_area(
    area: gpd.GeoDataFrame, *, tile_size: float, crs: str = "EPSG:3857", max_tiles: int | None = MAX_TILES
) -> gpd.GeoDataFrame:
    """Tiles of ``tile_size`` (in units of ``crs``) on a regular grid in ``crs`` covering ``area``
    (openeo's ``split_area``: tiles that do not touch the area are dropped), slivers at its edges merged into
    their neighbours (``merge_slivers``), in EPSG:4326, with a ``tile`` name and the tile's ``west``,
    ``south``, ``east``, ``north`` (EPSG:4326) columns. ``tiles.attrs["tiling"]`` counts the tiles of the grid
    ``dropped`` and ``merged``.

    Raises ``ValueError`` for a CRS or tile size that cannot be right (see ``check_tile_size``), an area
    that is not longitude/latitude, and ``TooManyTiles`` when more than ``max_tiles`` tiles (``None``: no
    limit) would be built; warns (``TilingWarning``) about what is probably wrong."""
    grid = grid_crs(crs)
    epsg = f"EPSG:{grid.to_epsg()}"
    check_tile_size(grid, tile_size)
    check_area_of_use(area, grid)
    shape = _grid_shape(area, epsg)
    estimate = _estimate(shape, grid, tile_size)
    if max_tiles is not None and estimate.tiles > max_tiles:
        raise TooManyTiles(estimate, max_tiles, _suggest(shape, grid, estimate, max_tiles))
    with _without_bare_polygon_notice():
        grid_tiles = split_area(shape, projection=epsg, tile_size=tile_size)
    kept, merged = merge_slivers(grid_tiles, tile_size)
    tiles = kept.to_crs("EPSG:4326")
    tiles.attrs["tiling"] = {"dropped": max(0, estimate.tiles - len(grid_tiles)), "merged": merged}
    bounds = tiles.geometry.bounds
    tiles.insert(0, "tile", [f"t{i:05d}" for i in range(len(tiles))])
    for position, (column, source) in enumerate(
        (("west", "minx"), ("south", "miny"), ("east", "maxx"), ("north", "maxy")), start=1
    ):
        tiles.insert(position, column, bounds[source].to_numpy())
    return tiles

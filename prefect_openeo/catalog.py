"""The STAC Collection of finished rows and their downloaded assets, kept beside the results (pystac).

Layout, in the result store (a local folder or object storage, ``prefect_openeo.storage``)::

    collection.json            the Collection: one ``item`` link per row, the overall extent
    job_{id}/stac-item.json    one Item per finished row whose results are downloaded
    job_{id}/<assets>          the assets, job-results.json, job_{id}.json (``prefect_openeo.downloads``)

Links between the Collection and its Items are relative (the catalogue is self-contained and moves with the
folder). An asset's href is its final location: ``./name`` (relative to the Item) in a local folder, its URL
(``s3://bucket/prefix/job_x/name``) on object storage. An asset keeps what the backend's results document
says of it (media type, roles, ``file:size``/``file:checksum``, ``proj:*``, bands, ...); an Item links the
results document (``via``) and the job's metadata (``describedby``).

Where an Item's geometry and time come from, first found wins:

- geometry: the row's ``geometry`` (shapely, WKT or GeoJSON, in EPSG:4326; ``update_catalog`` reprojects a
  GeoDataFrame in another CRS), else its ``west``/``south``/``east``/``north`` columns, else the spatial
  extent of the results document. The row describes the tile that was asked for, so it wins.
- time: the row's ``start_datetime``/``end_datetime``, ``start_date``/``end_date``, ``temporal_extent``
  (a pair, or its text), ``datetime``/``date`` (an instant) or ``year`` (that calendar year), else the
  temporal extent of the results document, else the job's creation time (job metadata ``created``). An
  interval's end is kept as given (openEO's half-open end).

Consistency: the catalogue is derived from the job database's recorded state (rows ``finished`` with
``results`` = ``done``) and what the store holds, never from memory. Each Item is one atomic write, made
when its row's download ends (``MultiBackendJobManager`` calls ``write_item``). ``update_catalog`` (at the
end of a run, and ``prefect-openeo catalog``) writes the Items that are missing and rewrites
``collection.json`` atomically, so a crash between the two is repaired by the next run or the command.
"""

from __future__ import annotations

import ast
import concurrent.futures
import datetime
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pystac
import shapely
from pystac.extensions.file import FileExtension
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from prefect_openeo.downloads import RESULTS_METADATA_FILENAME
from prefect_openeo.storage import LocalStore, ObjectStore, ResultStore

__all__ = [
    "COLLECTION_FILENAME",
    "COLLECTION_ID",
    "ITEM_FILENAME",
    "CatalogError",
    "CatalogReport",
    "NothingToCatalog",
    "build_collection",
    "build_item",
    "catalog_location",
    "catalog_url",
    "row_footprint",
    "row_interval",
    "update_catalog",
    "write_item",
]

_log = logging.getLogger("prefect_openeo")

#: The Collection's file, at the root of the result store.
COLLECTION_FILENAME = "collection.json"
#: An Item's file, in its job's folder.
ITEM_FILENAME = "stac-item.json"
#: The Collection's id (fixed, so Items written before the Collection name it right).
COLLECTION_ID = "openeo-job-results"
#: Items read or written at once by ``update_catalog``.
WORKERS = 8

_JSON = "application/json"
_WORLD = [-180.0, -90.0, 180.0, 90.0]
#: Extensions whose field prefix is not their name.
_FIELD_PREFIX = {"projection": "proj"}
_EXTENSION_NAME = re.compile(r"stac-extensions\.github\.io/([^/]+)/")
_NOT_THERE = "its results are not in the store"


class CatalogError(ValueError):
    """The catalogue cannot be written as asked; the message says why and what to do."""


class NothingToCatalog(CatalogError):
    """No row of the job database is finished with its results downloaded."""


@dataclass
class CatalogReport:
    """What ``update_catalog`` did."""

    #: Where the Collection is: a ``Path`` for a local folder, else its URL.
    location: Path | str
    #: Items linked from the Collection.
    items: int = 0
    #: Items written now (missing, unreadable, or all of them with ``rebuild``).
    written: int = 0
    #: ``(row index, job id, why)`` of rows recorded done that have no Item: their results are not in the
    #: store, or their Item cannot be made (e.g. an unreadable results document).
    left_out: list[tuple[Any, str, str]] = field(default_factory=list)


# -- where -----------------------------------------------------------------------------------------
def catalog_location(store: ResultStore) -> Path | str:
    """Where the Collection is (or will be): ``root/collection.json``, a ``Path`` or a URL."""
    root = store.location
    return root / COLLECTION_FILENAME if isinstance(root, Path) else f"{root}/{COLLECTION_FILENAME}"


def catalog_url(store: ResultStore) -> str:
    """The Collection's URL (``file://`` for a local folder), for links in reports."""
    location = catalog_location(store)
    return location.resolve().as_uri() if isinstance(location, Path) else location


def _job_folder(store: ResultStore, job_id: str) -> str:
    """A job's folder relative to the root (``job_x``)."""
    root, folder = store.location, store.job_location(job_id)
    if isinstance(root, Path):
        return Path(folder).relative_to(root).as_posix()
    return str(folder)[len(str(root)) :].strip("/")


def _root_store(store: ResultStore) -> ResultStore:
    """The store's root as a one-folder store (``job_folder=""``), to read and write ``collection.json``."""
    if isinstance(store, LocalStore):
        return LocalStore(store.root, job_folder="")
    if isinstance(store, ObjectStore):
        return type(store)(store.root_url, store.fs, job_folder="")
    raise CatalogError(f"No STAC catalogue for the result store {store!r}: a local folder or an fsspec URL is needed")


# -- values of a row -------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar (numpy numbers as Python numbers)."""
    return value.item() if hasattr(value, "item") and pd.api.types.is_scalar(value) else value


def _instant(value: Any) -> datetime.datetime:
    """A UTC datetime from a string, date, datetime or timestamp (naive ones are taken as UTC)."""
    stamp = pd.Timestamp(value)
    if pd.isna(stamp):
        raise ValueError(f"not a time: {value!r}")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def _pair(value: Any) -> tuple[Any, Any] | None:
    """A ``temporal_extent`` cell as (start, end): a list/tuple/array, or its JSON/Python text."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = ast.literal_eval(text)
    if isinstance(value, str):
        return value, value
    values = list(value)
    if len(values) != 2:
        raise ValueError(f"a temporal extent has 2 values, got {values!r}")
    return values[0], values[1]


Interval = tuple[datetime.datetime | None, datetime.datetime | None]


def row_interval(row: Mapping[str, Any]) -> Interval | None:
    """The time range a row asked for, from its temporal columns (see the module doc); None without them."""
    for start_col, end_col in (("start_datetime", "end_datetime"), ("start_date", "end_date")):
        start, end = row.get(start_col), row.get(end_col)
        if not (_missing(start) and _missing(end)):
            return (
                None if _missing(start) else _instant(start),
                None if _missing(end) else _instant(end),
            )
    extent = row.get("temporal_extent")
    if extent is not None and not (pd.api.types.is_scalar(extent) and _missing(extent)):
        start, end = _pair(extent)
        return None if _missing(start) else _instant(start), None if _missing(end) else _instant(end)
    for name in ("datetime", "date"):
        if not _missing(row.get(name)):
            moment = _instant(row[name])
            return moment, moment
    if not _missing(row.get("year")):
        year = int(float(row["year"]))
        return _instant(f"{year}-01-01"), _instant(f"{year + 1}-01-01")
    return None


def _geometry(value: Any) -> BaseGeometry | None:
    if isinstance(value, BaseGeometry):
        return value
    if isinstance(value, Mapping):
        return shape(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return shapely.from_geojson(text) if text.startswith("{") else shapely.from_wkt(text)
        except shapely.errors.ShapelyError as e:
            raise ValueError(f"geometry {text[:40]!r} is neither WKT nor GeoJSON: {e}") from e
    raise ValueError(f"not a geometry: {type(value).__name__}")


def _lonlat(geom: BaseGeometry) -> bool:
    west, south, east, north = geom.bounds
    return -180 <= west <= east <= 180 and -90 <= south <= north <= 90


def row_footprint(row: Mapping[str, Any]) -> BaseGeometry | None:
    """The area a row asked for, in EPSG:4326: its geometry, else its west/south/east/north; None without."""
    value = row.get("geometry")
    if value is not None and not (pd.api.types.is_scalar(value) and _missing(value)):
        geom = _geometry(value)
        if not geom.is_empty:
            if not _lonlat(geom):
                raise ValueError(f"geometry with bounds {geom.bounds} is not longitude/latitude (EPSG:4326)")
            return geom
    sides = [row.get(name) for name in ("west", "south", "east", "north")]
    if not any(_missing(v) for v in sides):
        geom = box(*(float(v) for v in sides))
        if not _lonlat(geom):
            raise ValueError(f"west/south/east/north {tuple(sides)} are not longitude/latitude (EPSG:4326)")
        return geom
    return None


# -- what the backend said -------------------------------------------------------------------------
def _results_footprint(results: Mapping[str, Any]) -> BaseGeometry | None:
    """The footprint of a results document: an Item's geometry/bbox, or a Collection's spatial extent."""
    if results.get("type") == "Feature":
        if results.get("geometry"):
            return shape(results["geometry"])
        bbox = results.get("bbox")
    else:
        bboxes = ((results.get("extent") or {}).get("spatial") or {}).get("bbox") or []
        bbox = bboxes[0] if bboxes else None
    if not bbox or len(bbox) not in (4, 6) or any(v is None for v in bbox):
        return None
    west, south, east, north = (bbox[0], bbox[1], bbox[2], bbox[3]) if len(bbox) == 4 else (*bbox[:2], *bbox[3:5])
    return box(west, south, east, north)


def _results_interval(results: Mapping[str, Any]) -> Interval | None:
    """The time range of a results document: an Item's datetime(s), or a Collection's temporal extent."""
    if results.get("type") == "Feature":
        props = results.get("properties") or {}
        start, end = props.get("start_datetime"), props.get("end_datetime")
        if start is None and end is None:
            start = end = props.get("datetime")
    else:
        intervals = ((results.get("extent") or {}).get("temporal") or {}).get("interval") or []
        start, end = (list(intervals[0]) + [None, None])[:2] if intervals else (None, None)
    if start is None and end is None:
        return None
    return None if start is None else _instant(start), None if end is None else _instant(end)


def _extensions(declared: list[str], assets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The results document's extensions whose fields the assets carry (plus the file extension if used)."""
    prefixes = {key.split(":", 1)[0] for asset in assets.values() for key in asset if ":" in key}
    used = []
    for uri in declared:
        match = _EXTENSION_NAME.search(uri)
        if match and _FIELD_PREFIX.get(match.group(1), match.group(1)) in prefixes:
            used.append(uri)
    if "file" in prefixes and not any("/file/" in uri for uri in used):
        used.append(FileExtension.get_schema_uri())
    return used


# -- items -----------------------------------------------------------------------------------------
def _read_json(store: ResultStore, job_id: str, name: str) -> dict[str, Any]:
    data = json.loads(store.read_bytes(job_id, name))
    if not isinstance(data, dict):
        raise CatalogError(f"Job {job_id}: {name} is not a JSON object")
    return data


def build_item(store: ResultStore, job_id: str, row: Mapping[str, Any] | None = None) -> pystac.Item:
    """The STAC Item of a job whose results the store holds, from its results document, its files and ``row``
    (the job database row: geometry and time; see the module doc).

    Raises ``FileNotFoundError`` when the store lacks the job's results document.
    """
    row = row if row is not None else {}
    results = _read_json(store, job_id, RESULTS_METADATA_FILENAME)
    files = set(store.files(job_id))
    where = f"job {job_id}" + (f" (row {_plain(row.name)})" if getattr(row, "name", None) is not None else "")

    try:
        footprint = row_footprint(row)
    except ValueError as e:
        _log.warning(f"STAC item of {where}: the row's {e}; using the results' extent")
        footprint = None
    footprint = footprint if footprint is not None else _results_footprint(results)

    try:
        interval = row_interval(row)
    except (ValueError, SyntaxError, TypeError) as e:
        _log.warning(f"STAC item of {where}: unreadable temporal column ({e}); using the results' extent")
        interval = None
    interval = interval or _results_interval(results)
    metadata_name = f"job_{job_id}.json"
    if interval is None and metadata_name in files:
        created = _read_json(store, job_id, metadata_name).get("created")
        interval = (_instant(created),) * 2 if created else None
    if interval is None:
        raise CatalogError(f"STAC item of {where}: no time range in the row, the results or the job metadata")
    start, end = interval
    single = start if (start == end or end is None) else end if start is None else None

    properties: dict[str, Any] = {}
    for key in ("title", "description"):
        if isinstance(results.get(key), str):
            properties[key] = results[key]
    if getattr(row, "name", None) is not None:
        properties["openeo:row"] = _plain(row.name)
    if not _missing(row.get("backend_name")):
        properties["openeo:backend"] = str(row["backend_name"])

    assets: dict[str, dict[str, Any]] = {}
    for key, asset in (results.get("assets") or {}).items():
        name = Path(key).name
        if not isinstance(asset, Mapping) or name not in files:
            continue
        fields = {k: v for k, v in asset.items() if k not in ("href", "alternate")}
        fields.setdefault("roles", ["data"])
        href = f"./{name}" if isinstance(store, LocalStore) else store.url(job_id, name)
        assets[key] = {"href": href, **fields}

    item = pystac.Item(
        id=job_id,
        geometry=mapping(footprint) if footprint is not None else None,
        bbox=list(footprint.bounds) if footprint is not None else None,
        datetime=single,
        start_datetime=None if single else start,
        end_datetime=None if single else end,
        properties=properties,
        stac_extensions=_extensions(list(results.get("stac_extensions") or []), assets),
        collection=COLLECTION_ID,
    )
    for key, fields in assets.items():
        item.add_asset(key, pystac.Asset.from_dict(fields))
    up = "../" * len(_job_folder(store, job_id).split("/")) + COLLECTION_FILENAME
    for rel in ("root", "parent", "collection"):
        item.add_link(pystac.Link(rel, up, media_type=_JSON))
    item.add_link(pystac.Link("via", f"./{RESULTS_METADATA_FILENAME}", _JSON, "The backend's batch job results"))
    if metadata_name in files:
        item.add_link(pystac.Link("describedby", f"./{metadata_name}", _JSON, "The batch job's metadata"))
    return item


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy numbers
        return value.item()
    if isinstance(value, (datetime.date, pd.Timestamp)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dump(obj: pystac.STACObject) -> bytes:
    data = obj.to_dict(include_self_link=False, transform_hrefs=False)
    return json.dumps(data, indent=2, default=_json_default).encode()


def write_item(store: ResultStore, job_id: str, row: Mapping[str, Any] | None = None) -> pystac.Item:
    """Build a job's Item (``build_item``) and write it atomically as ``job_{id}/stac-item.json``."""
    item = build_item(store, job_id, row)
    store.write_bytes(job_id, ITEM_FILENAME, _dump(item))
    return item


def _read_item(store: ResultStore, job_id: str) -> pystac.Item | None:
    """A job's Item as written before; None when it is missing or unreadable (then it is written again)."""
    try:
        data = store.read_bytes(job_id, ITEM_FILENAME)
    except FileNotFoundError:
        return None
    try:
        item = pystac.Item.from_dict(json.loads(data), migrate=False)
    except Exception as e:  # not JSON, edited by hand, ...: derive it again
        _log.warning(f"Rewriting the STAC item of job {job_id}: the one in the store is unreadable ({e!r})")
        return None
    return item if item.id == job_id and item.collection_id == COLLECTION_ID else None


# -- the collection --------------------------------------------------------------------------------
def _done_rows(job_db: Any) -> pd.DataFrame:
    """Rows recorded ``finished`` with ``results`` = ``done``, geometry in EPSG:4326."""
    try:
        rows = job_db.get_by_status(statuses=["finished"])
    except (AttributeError, KeyError) as e:  # a CSV/Parquet table without a `status` column
        raise CatalogError(f"{job_db} has no 'status' column ({e!r}): is it a job database?") from e
    if "results" not in rows.columns or "id" not in rows.columns:
        return rows.iloc[0:0]
    rows = rows[(rows["results"] == "done") & ~rows["id"].map(_missing)]
    crs = getattr(rows, "crs", None)
    if crs is not None and not rows.empty and crs.to_epsg() != 4326:
        rows = rows.to_crs("EPSG:4326")
    return rows


def _extent(items: list[pystac.Item]) -> pystac.Extent:
    boxes = [item.bbox for item in items if item.bbox]
    bbox = (
        [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        if boxes
        else _WORLD
    )
    starts, ends = [], []
    for item in items:
        props = item.properties
        starts.append(item.datetime or pystac.utils.str_to_datetime(props["start_datetime"]))
        ends.append(item.datetime or pystac.utils.str_to_datetime(props["end_datetime"]))
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[min(starts), max(ends)]]))


def build_collection(store: ResultStore, items: list[pystac.Item]) -> pystac.Collection:
    """The Collection linking ``items`` (relative links) with their overall extent."""
    if not items:
        raise NothingToCatalog("A STAC collection needs at least one item")
    collection = pystac.Collection(
        id=COLLECTION_ID,
        title=f"openEO batch job results in {store.location}",
        description=(
            f"Results of {len(items)} openEO batch job(s) run with prefect-openeo: one item per finished "
            "job database row whose results are downloaded, with the assets where they were downloaded."
        ),
        extent=_extent(items),
        license="other",
    )
    collection.clear_links()
    collection.add_link(pystac.Link("root", f"./{COLLECTION_FILENAME}", _JSON))
    for item in items:
        href = f"./{_job_folder(store, item.id)}/{ITEM_FILENAME}"
        collection.add_link(pystac.Link("item", href, pystac.MediaType.GEOJSON, item.properties.get("title")))
    return collection


def update_catalog(store: ResultStore, job_db: Any, *, rebuild: bool = False, workers: int = WORKERS) -> CatalogReport:
    """Bring the catalogue up to date with the job database: write the Items of rows recorded done that
    lack one (all of them with ``rebuild``), then rewrite ``collection.json`` atomically.

    ``job_db`` is a ``JobDatabaseInterface``. Raises ``NothingToCatalog`` when no row is finished with its
    results downloaded, and ``CatalogError`` when the store holds none of those rows' results (a wrong root?).
    Rows whose results are missing from the store, or whose Item cannot be made, are left out and listed in
    the report (``left_out``).
    """
    rows = _done_rows(job_db)
    location = catalog_location(store)
    if rows.empty:
        raise NothingToCatalog(
            "No row of the job database is finished with its results downloaded (status finished, results done): "
            "nothing to catalogue yet"
        )
    root = _root_store(store)

    def one(row: pd.Series) -> tuple[pystac.Item | None, bool, str]:
        job_id = str(row["id"])
        item = None if rebuild else _read_item(store, job_id)
        if item is not None:
            return item, False, ""
        try:
            return write_item(store, job_id, row), True, ""
        except FileNotFoundError:
            return None, False, _NOT_THERE
        except ValueError as e:  # CatalogError, an unreadable results document, ...
            return None, False, str(e)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [(index, row["id"], pool.submit(one, row)) for index, row in rows.iterrows()]
        outcomes = [(index, job_id, future.result()) for index, job_id, future in futures]
    report = CatalogReport(location=location)
    items = []
    for index, job_id, (item, written, why) in outcomes:
        if item is None:
            report.left_out.append((_plain(index), str(job_id), why))
        else:
            items.append(item)
            report.written += written
    if not items and all(why == _NOT_THERE for *_, why in report.left_out):
        raise CatalogError(
            f"None of the {len(rows)} row(s) recorded with downloaded results has them under {store.location} "
            f"(no {_job_folder(store, str(rows['id'].iloc[0]))}/{RESULTS_METADATA_FILENAME}): is it the right root?"
        )
    if not items:
        index, job_id, why = next(entry for entry in report.left_out if entry[2] != _NOT_THERE)
        raise CatalogError(f"No STAC item could be made: row {index} (job {job_id}): {why}")
    report.items = len(items)
    # a one-folder store: the "job id" argument names no folder, the file goes to the root
    root.write_bytes(COLLECTION_ID, COLLECTION_FILENAME, _dump(build_collection(store, items)))
    if report.left_out:
        shown = "; ".join(f"row {index} (job {job_id}): {why}" for index, job_id, why in report.left_out[:10])
        _log.warning(f"{len(report.left_out)} row(s) recorded with downloaded results have no STAC item: {shown}")
    return report

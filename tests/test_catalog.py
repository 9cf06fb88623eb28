"""The STAC catalogue of the results: written as jobs finish, read back and validated with pystac (offline),
on a local folder and on a real S3 server, repaired after a crash by ``prefect-openeo catalog``.

Validation is offline: pystac ships the STAC 1.1 core and GeoJSON schemas and its validator starts from them;
no package ships the file extension's schema, so ``FILE_FIELDS_SCHEMA`` below checks the two fields carried
over (``file:size``, ``file:checksum``), and a schema missing locally fails the test instead of being fetched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import geopandas as gpd
import openeo
import pandas as pd
import pystac
import pytest
from conftest import ndvi_job, tiles_df
from pystac.extensions.file import FileExtension
from pystac.validation import JsonSchemaSTACValidator, validate_dict
from referencing import Registry, Resource
from shapely.geometry import Polygon, box, shape
from typer.testing import CliRunner

from prefect_openeo import MultiBackendJobManager
from prefect_openeo import catalog as catalog_module
from prefect_openeo.catalog import (
    COLLECTION_FILENAME,
    COLLECTION_ID,
    ITEM_FILENAME,
    CatalogError,
    NothingToCatalog,
    row_footprint,
    row_interval,
    update_catalog,
)
from prefect_openeo.cli import app
from prefect_openeo.demo import create_ndvi_job, demo_tiles
from prefect_openeo.jobdb import create_job_db, get_job_db
from prefect_openeo.storage import ResultStore

pytestmark = pytest.mark.timeout(180)
runner = CliRunner()

FILE_FIELDS_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": FileExtension.get_schema_uri(),
    "title": "The file extension's fields that prefect-openeo carries over, on an Item's assets",
    "type": "object",
    "required": ["assets"],
    "properties": {"assets": {"type": "object", "additionalProperties": {"$ref": "#/definitions/fields"}}},
    "definitions": {
        "fields": {
            "type": "object",
            "properties": {
                "file:size": {"type": "integer", "minimum": 0},
                "file:checksum": {"type": "string", "pattern": "^[0-9a-f]+$"},
            },
        }
    },
}


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator with local schemas only: its bundled ones and ``FILE_FIELDS_SCHEMA``."""

    def __init__(self) -> None:
        super().__init__()
        self.schema_cache[FileExtension.get_schema_uri()] = FILE_FIELDS_SCHEMA

    @property
    def registry(self) -> Registry:  # no `retrieve`: a reference to a schema not held here is an error
        return Registry().with_resources([(k, Resource.from_contents(v)) for k, v in self.schema_cache.items()])


OFFLINE = OfflineValidator()


def validate_offline(data: dict, href: str) -> None:
    missing = set(data.get("stac_extensions", [])) - set(OFFLINE.schema_cache)
    assert not missing, f"no local schema for {missing}: validation would fetch it"
    validate_dict(data, href=href, validator=OFFLINE)


class S3StacIO(pystac.StacIO):
    """Reads ``s3://`` hrefs with a plain boto3 client (independent of the s3fs the code under test uses)."""

    def __init__(self, client):
        super().__init__()
        self.client = client

    def read_text(self, source, *args, **kwargs) -> str:
        href = str(source)
        assert href.startswith("s3://"), href
        bucket, _, key = href[len("s3://") :].partition("/")
        body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return body.read().decode()
        finally:
            body.close()

    def write_text(self, dest, txt, *args, **kwargs) -> None:
        raise AssertionError("reading only")


def read_catalog(href: str, stac_io: pystac.StacIO | None = None) -> tuple[pystac.Collection, list[pystac.Item]]:
    """The collection and its items as pystac reads them, each validated (offline) as stored."""
    stac_io = stac_io or pystac.StacIO.default()
    validate_offline(stac_io.read_json(href), href)
    collection = pystac.Collection.from_file(href, stac_io=stac_io)
    items = []
    for link in collection.get_item_links():
        item_href = link.get_absolute_href()
        validate_offline(stac_io.read_json(item_href), item_href)
        items.append(pystac.Item.from_file(item_href, stac_io=stac_io))
    return collection, items


def manager_for(sim, **kwargs) -> MultiBackendJobManager:
    kwargs.setdefault("poll_sleep", 0.1)
    kwargs.setdefault("stac_catalog", True)
    manager = MultiBackendJobManager(**kwargs)
    manager.add_backend(sim.name, connection=openeo.connect(sim.url), parallel_jobs=3)
    return manager


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def results_doc(folder: Path | str, job_id: str, read=lambda p: Path(p).read_bytes()) -> dict:
    return json.loads(read(f"{folder}/job_{job_id}/job-results.json"))


def check_item_against_store(item: pystac.Item, results: dict, row: pd.Series, read) -> None:
    """The item carries the backend's asset fields and points at the verified bytes at their final place."""
    assert item.collection_id == COLLECTION_ID
    assert item.properties["openeo:row"] == row.name and item.properties["openeo:backend"] == row["backend_name"]
    assert set(item.assets) == set(results["assets"])
    for key, asset in item.assets.items():
        backend = results["assets"][key]
        assert asset.media_type == backend["type"] and asset.roles == backend["roles"]
        assert asset.extra_fields["file:size"] == backend["file:size"]
        assert FileExtension.ext(asset).checksum == backend["file:checksum"]
        data = read(asset.get_absolute_href())
        assert len(data) == backend["file:size"]
        assert "1220" + hashlib.sha256(data).hexdigest() == backend["file:checksum"]
    links = {link.rel: link.get_absolute_href() for link in item.links}
    assert json.loads(read(links["via"])) == results
    assert json.loads(read(links["describedby"]))["id"] == item.id


# -- a run writes it -------------------------------------------------------------------------------
def test_a_run_writes_a_valid_collection_beside_local_results(openeo_simulator, tmp_path):
    openeo_simulator.config.assets_per_job = 2
    tiles = demo_tiles(3)  # a GeoDataFrame (EPSG:4326) with a `year` column
    db = create_job_db(tmp_path / "jobs.parquet", tiles)
    root = tmp_path / "results"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=db, start_job=create_ndvi_job)

    rows = get_job_db(tmp_path / "jobs.parquet").read()
    assert (rows["results"] == "done").all()
    collection, items = read_catalog(str(root / COLLECTION_FILENAME))
    assert collection.id == COLLECTION_ID and len(items) == 3
    by_id = {item.id: item for item in items}
    assert set(by_id) == set(rows["id"])
    for index, row in rows.iterrows():
        item = by_id[row["id"]]
        assert shape(item.geometry).equals(tiles.geometry[index])  # the row's geometry, lon/lat
        assert item.bbox == pytest.approx(list(tiles.geometry[index].bounds))
        assert item.datetime is None  # the row's `year`, as a range
        assert item.properties["start_datetime"] == "2024-01-01T00:00:00Z"
        assert item.properties["end_datetime"] == "2025-01-01T00:00:00Z"
        check_item_against_store(item, results_doc(root, row["id"]), row, lambda p: Path(p).read_bytes())
        for asset in item.assets.values():  # local assets: relative to the item, beside it
            assert asset.href.startswith("./") and Path(asset.get_absolute_href()).parent == root / f"job_{item.id}"
    assert collection.extent.spatial.bboxes[0] == pytest.approx(list(tiles.total_bounds))
    interval = collection.extent.temporal.intervals[0]
    assert [t.isoformat() for t in interval] == ["2024-01-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00"]

    # self-contained: the folder moved elsewhere is still a whole catalogue
    moved = shutil.copytree(root, tmp_path / "moved")
    _, moved_items = read_catalog(str(moved / COLLECTION_FILENAME))
    assert all(Path(a.get_absolute_href()).is_file() for i in moved_items for a in i.assets.values())
    assert all(str(moved) in a.get_absolute_href() for i in moved_items for a in i.assets.values())


def test_the_drop_in_keeps_exactly_openeos_layout_by_default(openeo_simulator, tmp_path):
    manager = MultiBackendJobManager(poll_sleep=0.1, root_dir=tmp_path / "results")  # the drop-in's default
    manager.add_backend(openeo_simulator.name, connection=openeo.connect(openeo_simulator.url), parallel_jobs=3)
    manager.run_jobs(job_db=tmp_path / "jobs.csv", df=tiles_df(2), start_job=ndvi_job)
    job_ids = pd.read_csv(tmp_path / "jobs.csv")["id"]
    files = {p.relative_to(tmp_path / "results").as_posix() for p in (tmp_path / "results").rglob("*")}
    expected = {f"job_{i}/{name}" for i in job_ids for name in ("job-results.json", f"job_{i}.json", "openEO.tif")}
    assert files == expected | {f"job_{i}" for i in job_ids}


def test_the_validator_used_here_rejects_what_it_should(openeo_simulator, tmp_path):
    """The offline validation is no formality: a broken item fails it."""
    db = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(job_db=db, df=tiles_df(1), start_job=ndvi_job)
    path = next(tmp_path.glob(f"job_*/{ITEM_FILENAME}"))
    good = json.loads(path.read_text())
    validate_offline(good, str(path))
    no_time = json.loads(path.read_text())
    del no_time["properties"]["start_datetime"]
    bad_size = json.loads(path.read_text())
    next(iter(bad_size["assets"].values()))["file:size"] = "1 kB"
    for bad in (no_time, bad_size):
        with pytest.raises(pystac.STACValidationError):
            validate_offline(bad, str(path))


def test_without_geometry_or_time_columns_the_results_document_gives_them(openeo_simulator, tmp_path):
    """Rows with neither geometry nor west/south/east/north: the item's footprint is the results' extent;
    without a temporal column, so is its time range."""
    df = tiles_df(2).drop(columns=["year"]).assign(start_year=[2021, 2022])

    def job(row, connection, **kwargs):
        return ndvi_job(pd.Series({"west": row["west"], "year": row["start_year"]}, name=row.name), connection)

    db = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path / "r").run_jobs(job_db=db, df=df, start_job=job)
    rows = pd.read_csv(db)
    _, items = read_catalog(str(tmp_path / "r" / COLLECTION_FILENAME))
    for item in items:
        row = rows[rows["id"] == item.id].iloc[0]
        assert shape(item.geometry).equals(box(row["west"], 51.0, row["west"] + 0.1, 51.1))
        year = int(row["start_year"])
        assert item.properties["start_datetime"] == f"{year}-01-01T00:00:00Z"
        assert item.properties["end_datetime"] == f"{year + 1}-01-01T00:00:00Z"


def test_object_storage_root_gets_the_collection_with_asset_urls(openeo_simulator, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "jobs.parquet"
    create_job_db(db, demo_tiles(2))
    root = f"s3://{bucket}/runs/a"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=str(db), start_job=create_ndvi_job)

    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    rows = get_job_db(db).read()
    assert f"runs/a/{COLLECTION_FILENAME}" in keys
    assert {f"runs/a/job_{job_id}/{ITEM_FILENAME}" for job_id in rows["id"]} <= keys
    assert {p.name for p in tmp_path.iterdir()} <= {db.name, f"{db.name}.lock"}  # nothing else written locally

    def read(url: str) -> bytes:
        assert url.startswith(f"s3://{bucket}/runs/a/job_"), url
        body = client.get_object(Bucket=bucket, Key=url.split("/", 3)[3])["Body"]
        try:
            return body.read()
        finally:
            body.close()

    collection, items = read_catalog(f"{root}/{COLLECTION_FILENAME}", S3StacIO(client))
    assert len(items) == 2
    for item in items:
        row = rows[rows["id"] == item.id].iloc[0]
        for asset in item.assets.values():  # the object-storage URL, not a path
            assert asset.href == f"{root}/job_{item.id}/{Path(asset.href).name}"
        check_item_against_store(item, json.loads(read(f"{root}/job_{item.id}/job-results.json")), row, read)
    assert collection.extent.spatial.bboxes[0] == pytest.approx(list(demo_tiles(2).total_bounds))


# -- crash consistency -----------------------------------------------------------------------------
def test_an_item_written_but_the_collection_not_the_command_repairs_it(openeo_simulator, tmp_path, monkeypatch):
    root = tmp_path / "results"
    path = tmp_path / "jobs.parquet"
    tiles = demo_tiles(3)
    create_job_db(path, tiles.iloc[:2])
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=str(path), start_job=create_ndvi_job)
    before, _ = read_catalog(str(root / COLLECTION_FILENAME))
    assert len(before.get_item_links()) == 2
    written = {p: p.read_bytes() for p in root.glob(f"job_*/{ITEM_FILENAME}")}

    # a third row; the process dies after its download (item written, row recorded done) but before the
    # collection is rewritten
    df = get_job_db(path).read()
    grown = gpd.GeoDataFrame(pd.concat([df, tiles.iloc[2:]]), crs=df.crs)
    grown.loc[2, "status"] = "not_started"
    grown.to_parquet(path)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the collection was written")

    monkeypatch.setattr(catalog_module, "update_catalog", die)
    with pytest.raises(KeyboardInterrupt):
        manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=str(path), start_job=create_ndvi_job)
    monkeypatch.undo()
    rows = get_job_db(path).read()
    assert (rows["results"] == "done").all() and len(rows) == 3
    new_item = root / f"job_{rows.loc[2, 'id']}" / ITEM_FILENAME
    validate_offline(json.loads(new_item.read_text()), str(new_item))  # every written item is valid
    stale, _ = read_catalog(str(root / COLLECTION_FILENAME))
    assert len(stale.get_item_links()) == 2

    result = invoke("catalog", path, "--root-dir", root)
    assert result.exit_code == 0, result.output
    assert "3 item(s), 0 written now" in result.output
    collection, items = read_catalog(str(root / COLLECTION_FILENAME))
    assert {item.id for item in items} == set(rows["id"])
    assert collection.extent.spatial.bboxes[0] == pytest.approx(list(tiles.total_bounds))
    assert all(p.read_bytes() == data for p, data in written.items())  # items are not rewritten


def test_missing_or_unreadable_items_of_done_rows_are_written_again(openeo_simulator, tmp_path):
    db = tmp_path / "jobs.csv"
    root = tmp_path / "results"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=db, df=tiles_df(3), start_job=ndvi_job)
    first, second, third = sorted(root.glob(f"job_*/{ITEM_FILENAME}"))
    kept = third.read_bytes()
    first.unlink()  # died between the download and the item's write
    second.write_text('{"type": "Feature", "id"')  # not an item (the store's writes are atomic: hand-edited)
    report = update_catalog(ResultStore.from_root(root), get_job_db(db))
    assert (report.items, report.written, report.left_out) == (3, 2, [])
    _, items = read_catalog(str(root / COLLECTION_FILENAME))
    assert len(items) == 3 and third.read_bytes() == kept
    # --rebuild rewrites them all, from the same inputs: the same items
    rebuilt = invoke("catalog", db, "--root-dir", root, "--rebuild")
    assert rebuilt.exit_code == 0 and "3 item(s), 3 written now" in rebuilt.output
    assert third.read_bytes() == kept


def test_rows_are_catalogued_only_once_recorded_done(openeo_simulator, tmp_path):
    """The job database decides: a row whose download is not recorded done is not linked (its next download
    writes its item again); a done row whose results left the store, or whose item cannot be made, is
    reported and left out, and the others are catalogued."""
    db = tmp_path / "jobs.csv"
    root = tmp_path / "results"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=db, df=tiles_df(4), start_job=ndvi_job)
    df = pd.read_csv(db)
    df.loc[0, "results"] = "pending"
    df.to_csv(db, index=False)
    shutil.rmtree(root / f"job_{df.loc[1, 'id']}")
    broken = root / f"job_{df.loc[3, 'id']}"
    (broken / ITEM_FILENAME).unlink()
    (broken / "job-results.json").write_text("<html>not JSON</html>")
    result = invoke("catalog", db, "--root-dir", root)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"row 1 (job {df.loc[1, 'id']}) is recorded with results but left out: its results are not in" in output
    assert f"row 3 (job {df.loc[3, 'id']}) is recorded with results but left out: Expecting value" in output
    collection, items = read_catalog(str(root / COLLECTION_FILENAME))
    assert [item.id for item in items] == [df.loc[2, "id"]]


# -- the command's errors --------------------------------------------------------------------------
def test_catalog_command_errors(openeo_simulator, tmp_path):
    assert invoke("catalog", "--help").exit_code == 0
    missing = invoke("catalog", tmp_path / "nope.csv")
    assert missing.exit_code == 2 and "does not exist" in missing.output

    table = tmp_path / "table.csv"
    pd.DataFrame({"west": [5.0], "year": [2020]}).to_csv(table, index=False)
    not_a_db = invoke("catalog", table, "--root-dir", tmp_path)
    assert not_a_db.exit_code == 2 and "is it a job database?" in not_a_db.output
    db = tmp_path / "jobs.csv"
    create_job_db(db, tiles_df(1))
    not_run = invoke("catalog", db, "--root-dir", tmp_path)
    assert not_run.exit_code == 2 and "nothing to catalogue" in not_run.output

    root = tmp_path / "results"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=db, start_job=ndvi_job)
    (root / COLLECTION_FILENAME).unlink()
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    wrong_root = invoke("catalog", db, "--root-dir", empty)
    assert wrong_root.exit_code == 2 and "is it the right root?" in wrong_root.output
    assert not (empty / COLLECTION_FILENAME).exists()
    no_folder = invoke("catalog", db, "--root-dir", tmp_path / "typo")
    assert no_folder.exit_code == 2 and "does not exist" in no_folder.output
    bad_url = invoke("catalog", db, "--root-dir", "ftp://host/results")
    assert bad_url.exit_code == 2 and "unknown scheme" in bad_url.output
    assert not (root / COLLECTION_FILENAME).exists()
    assert invoke("catalog", db, "--root-dir", root).exit_code == 0


def test_catalog_command_on_an_s3_bucket_without_the_results(openeo_simulator, s3_server, tmp_path):
    db = tmp_path / "jobs.csv"
    manager_for(openeo_simulator, root_dir=tmp_path).run_jobs(job_db=db, df=tiles_df(1), start_job=ndvi_job)
    bucket = s3_server.new_bucket()
    result = invoke("catalog", db, "--root-dir", f"s3://{bucket}/x")
    assert result.exit_code == 2 and "is it the right root?" in result.output
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket)


# -- rows: where geometry and time come from -------------------------------------------------------
def test_row_time_ranges():
    utc = "+00:00"
    cases = {
        "start_date": ({"start_date": "2020-03-01", "end_date": "2020-04-01"}, ("2020-03-01", "2020-04-01")),
        "text extent": ({"temporal_extent": "['2021-01-01', '2021-07-01']"}, ("2021-01-01", "2021-07-01")),
        "list extent": ({"temporal_extent": ["2021-01-01T12:00:00+02:00", None]}, ("2021-01-01T10:00:00", None)),
        "instant": ({"date": "2022-05-05"}, ("2022-05-05", "2022-05-05")),
        "year": ({"year": 2023.0}, ("2023-01-01", "2024-01-01")),
    }
    for name, (row, (start, end)) in cases.items():
        got = row_interval(pd.Series(row))
        expected = tuple(
            None if t is None else pd.Timestamp(t + ("" if "T" in t else "T00:00:00") + utc) for t in (start, end)
        )
        assert got == expected, name
    assert row_interval(pd.Series({"year": float("nan"), "west": 5.0})) is None
    with pytest.raises(ValueError):
        row_interval(pd.Series({"temporal_extent": "['2021-01-01']"}))


def test_row_footprints():
    tile = box(5.0, 51.0, 5.1, 51.1)
    assert row_footprint(pd.Series({"geometry": tile})).equals(tile)
    assert row_footprint(pd.Series({"geometry": tile.wkt})).equals(tile)
    assert row_footprint(pd.Series({"geometry": json.dumps(tile.__geo_interface__)})).equals(tile)
    assert row_footprint(pd.Series({"west": 5.0, "south": 51.0, "east": 5.1, "north": 51.1})).equals(tile)
    assert row_footprint(pd.Series({"west": 5.0})) is None
    with pytest.raises(ValueError, match="neither WKT nor GeoJSON"):
        row_footprint(pd.Series({"geometry": "POLYGON ((5 51, 5.1"}))
    with pytest.raises(ValueError, match="not longitude/latitude"):
        row_footprint(pd.Series({"geometry": box(556597, 6621293, 567729, 6639001)}))  # EPSG:3857 metres


def test_a_projected_geodataframe_is_reprojected_for_the_items(openeo_simulator, tmp_path):
    """A job database in EPSG:3857: the item written at download time cannot use the row's geometry (it gets
    the results' extent, a box); the command, which knows the CRS, writes the row's shape in lon/lat."""
    triangle = Polygon([(5.0, 51.0), (5.1, 51.0), (5.05, 51.1)])
    path = tmp_path / "jobs.parquet"
    create_job_db(path, gpd.GeoDataFrame({"year": [2024]}, geometry=[triangle], crs="EPSG:4326").to_crs("EPSG:3857"))

    def job(row, connection, **kwargs):
        lonlat = gpd.GeoSeries([row["geometry"]], crs="EPSG:3857").to_crs("EPSG:4326").iloc[0]
        return create_ndvi_job(pd.Series({**row, "geometry": lonlat, "tile": "t"}, name=row.name), connection)

    root = tmp_path / "results"
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=str(path), start_job=job)
    _, (item,) = read_catalog(str(root / COLLECTION_FILENAME))
    assert shape(item.geometry).equals_exact(box(*triangle.bounds), 1e-6)
    assert invoke("catalog", path, "--root-dir", root).exit_code == 0
    _, (item,) = read_catalog(str(root / COLLECTION_FILENAME))
    assert shape(item.geometry).equals_exact(box(*triangle.bounds), 1e-6)  # not rewritten without --rebuild
    assert invoke("catalog", path, "--root-dir", root, "--rebuild").exit_code == 0
    _, (item,) = read_catalog(str(root / COLLECTION_FILENAME))
    assert shape(item.geometry).equals_exact(triangle, 1e-6)


def test_nothing_to_catalogue_is_said_by_its_own_error(tmp_path):
    db = create_job_db(tmp_path / "jobs.csv", tiles_df(2))
    with pytest.raises(NothingToCatalog):
        update_catalog(ResultStore.from_root(tmp_path), db)
    assert issubclass(NothingToCatalog, CatalogError)


# -- consumers -------------------------------------------------------------------------------------
def test_odc_stac_finds_the_items_their_time_footprint_and_downloaded_files(openeo_simulator, tmp_path):
    """odc-stac (in the test extra) loads the catalogue. The simulator's assets are random bytes, not GeoTIFFs:
    odc-stac builds the cube lazily from the items, then its first read fails on one of the downloaded files,
    which shows it resolved the hrefs."""
    import odc.stac as odc_stac

    tiles = demo_tiles(4)
    root = tmp_path / "results"
    db = create_job_db(tmp_path / "jobs.parquet", tiles)
    manager_for(openeo_simulator, root_dir=root).run_jobs(job_db=db, start_job=create_ndvi_job)
    _, items = read_catalog(str(root / COLLECTION_FILENAME))
    cube = odc_stac.load(items, crs="EPSG:4326", resolution=0.01, chunks={}, groupby="id")
    assert list(cube.data_vars) == ["openEO.tif"] and cube.sizes["time"] == 4
    assert set(cube.time.dt.year.values) == {2024}
    west, south, east, north = tiles.total_bounds
    assert cube.longitude.min() > west and cube.longitude.max() < east
    assert cube.latitude.min() > south and cube.latitude.max() < north
    with pytest.raises(Exception, match="not recognized as being in a supported file format") as failed:
        cube.load()
    assert str(root / "job_") in str(failed.value)


def test_the_run_summary_links_the_collection(tmp_path):
    from prefect_openeo.catalog import catalog_location
    from prefect_openeo.observe import summary_markdown

    manager = MultiBackendJobManager(root_dir=tmp_path / "results")
    rows = pd.DataFrame({"status": ["finished"], "id": ["j-1"], "backend_name": ["sim"]})
    markdown = summary_markdown(
        rows, {}, {}, job_dir=manager.get_job_dir, catalog=catalog_location(manager.result_store)
    )  # a plain path: a browser opens no file:// link from a web page
    assert f"STAC collection: `collection.json`: `{tmp_path / 'results' / COLLECTION_FILENAME}`" in markdown

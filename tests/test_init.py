"""Starting safely: ``prefect-openeo init`` refuses grids that cannot be meant, and ``--start-job`` finds the
user's code as a user runs it (a module in the current folder, or a ``.py`` file)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
from pyproj import Transformer
from shapely.geometry import box
from typer.testing import CliRunner

from prefect_openeo.cli import app

pytestmark = pytest.mark.timeout(180)
runner = CliRunner()
#: The installed console script, as a user runs it (not ``python -m``).
EXECUTABLE = Path(sys.executable).parent / "prefect-openeo"
#: About 3 x 2 km near Mol, Belgium (west, south, east, north).
MOL = (5.10, 51.20, 5.14, 51.22)
#: Most of Belgium: far too big for metre-sized tiles.
BELGIUM = (2.5, 49.5, 6.4, 51.5)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_area(path: Path, bounds=MOL, crs: str | None = "EPSG:4326") -> Path:
    frame = gpd.GeoDataFrame({"name": ["aoi"]}, geometry=[box(*bounds)], crs=crs)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_file(path)
    return path


@pytest.fixture
def area(tmp_path):
    return write_area(tmp_path / "aoi.geojson")


def grid_estimate(bounds, tile_size: float, crs: str = "EPSG:3857") -> tuple[int, int]:
    """Columns and rows of a grid over a lon/lat box (a box stays a box in EPSG:3857)."""
    to_grid = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    west, south = to_grid.transform(bounds[0], bounds[1])
    east, north = to_grid.transform(bounds[2], bounds[3])
    return math.ceil((east - west) / tile_size), math.ceil((north - south) / tile_size)


def merged(output: str) -> int:
    """How many slivers init says it merged into their neighbours."""
    found = re.search(r"(\d+) sliver\(s\) at the edges merged", " ".join(output.split()))
    return int(found.group(1)) if found else 0


# --- the bound on the number of tiles ---


def test_too_many_tiles_are_refused_with_the_estimate_before_any_is_built(tmp_path):
    aoi = write_area(tmp_path / "belgium.geojson", BELGIUM)
    db = tmp_path / "jobs.parquet"
    columns, rows = grid_estimate(BELGIUM, 10)
    assert columns * rows > 10**9  # building these would exhaust memory: only the estimate can answer in time
    result = invoke("init", aoi, db, "--tile-size", 10)
    assert result.exit_code == 2, result.output
    assert f"up to {columns * rows:,} tiles ({columns:,} columns x {rows:,} rows)" in result.output
    assert "more than --max-tiles 10,000" in result.output
    assert "use a larger --tile-size (e.g. 5000 makes up to" in result.output and "raise --max-tiles" in result.output
    assert not db.exists()


def test_max_tiles_moves_the_bound_both_ways_and_the_suggested_size_fits(area, tmp_path):
    columns, rows = grid_estimate(MOL, 35)
    estimate = columns * rows
    assert 10_000 < estimate < 20_000
    refused = invoke("init", area, tmp_path / "refused.parquet", "--tile-size", 35)
    assert refused.exit_code == 2 and f"up to {estimate:,} tiles" in refused.output
    too_low = invoke("init", area, tmp_path / "low.parquet", "--tile-size", 35, "--max-tiles", estimate - 1)
    assert too_low.exit_code == 2 and f"more than --max-tiles {estimate - 1:,}" in too_low.output
    raised = invoke("init", area, tmp_path / "raised.parquet", "--tile-size", 35, "--max-tiles", estimate)
    assert raised.exit_code == 0, raised.output
    # A box: every grid tile is kept, slivers at its edges merged into their neighbours.
    assert len(gpd.read_parquet(tmp_path / "raised.parquet")) + merged(raised.output) == estimate

    lowered = invoke("init", area, tmp_path / "lowered.parquet", "--tile-size", 100, "--max-tiles", 1000)
    assert lowered.exit_code == 2, lowered.output
    size, count = re.search(r"e\.g\. (\S+) makes up to ([\d,]+) tiles", lowered.output).groups()
    followed = invoke("init", area, tmp_path / "followed.parquet", "--tile-size", size, "--max-tiles", 1000)
    assert followed.exit_code == 0, followed.output
    made = len(gpd.read_parquet(tmp_path / "followed.parquet"))
    assert made + merged(followed.output) == int(count.replace(",", "")) <= 1000
    assert not any((tmp_path / f"{name}.parquet").exists() for name in ("refused", "low", "lowered"))

    bad = invoke("init", area, tmp_path / "bad.parquet", "--tile-size", 1000, "--max-tiles", 0)
    assert bad.exit_code == 2 and "--max-tiles" in bad.output


def test_an_area_of_several_polygons_counts_a_grid_per_polygon(tmp_path):
    boxes = [(5.10 + 0.1 * i, 51.20, 5.11 + 0.1 * i, 51.21) for i in range(3)]  # apart: split one by one
    aoi = tmp_path / "three.geojson"
    gpd.GeoDataFrame(geometry=[box(*b) for b in boxes], crs="EPSG:4326").to_file(aoi)
    estimate = sum(math.prod(grid_estimate(b, 1000)) for b in boxes)
    refused = invoke("init", aoi, tmp_path / "a.parquet", "--tile-size", 1000, "--max-tiles", estimate - 1)
    assert refused.exit_code == 2, refused.output
    assert f"up to {estimate:,} tiles (grids over 3 polygons)" in refused.output and "e.g. 2000" in refused.output
    hopeless = invoke("init", aoi, tmp_path / "a.parquet", "--tile-size", 1000, "--max-tiles", 2)
    assert hopeless.exit_code == 2 and hopeless.output.rstrip().endswith("more than --max-tiles 2: raise --max-tiles")
    made = invoke("init", aoi, tmp_path / "a.parquet", "--tile-size", 1000, "--max-tiles", estimate)
    assert made.exit_code == 0 and len(gpd.read_parquet(tmp_path / "a.parquet")) + merged(made.output) == estimate


# --- tile size against the CRS's unit ---


@pytest.mark.parametrize(
    ("size", "crs", "says"),
    [
        (10000, "EPSG:4326", "is 1,113,195 km: over 10,000 km, so not meant in degrees"),  # metres in degrees
        (100, "EPSG:4326", "over 10,000 km, so not meant in degrees"),
        (0.1, "EPSG:3857", "is 0.1 m: under 1 m, so not meant in metres"),  # degrees in metres
        (0.1, "EPSG:32631", "under 1 m, so not meant in metres"),
        (0.5, "EPSG:2263", "under 1 m, so not meant in US survey feet"),
    ],
)
def test_a_tile_size_in_the_wrong_unit_is_refused(area, tmp_path, size, crs, says):
    db = tmp_path / "jobs.parquet"
    result = invoke("init", area, db, "--tile-size", size, "--crs", crs)
    assert result.exit_code == 2, result.output
    assert says in result.output
    other = "a metre-based CRS" if crs == "EPSG:4326" else "a degree-based CRS such as EPSG:4326"
    assert other in result.output
    assert not db.exists()


def test_unusual_tile_sizes_are_allowed_with_a_warning(tmp_path):
    tiny = write_area(tmp_path / "tiny.geojson", (5.1, 51.2, 5.1003, 51.2002))  # about 20 x 20 m
    small = invoke("init", tiny, tmp_path / "small.parquet", "--tile-size", 5)
    assert small.exit_code == 0, small.output
    assert "warning: A tile size of 5 in EPSG:3857 (metres) is 5 m: unusual" in small.output
    big = invoke(
        "init",
        write_area(tmp_path / "be.geojson", BELGIUM),
        tmp_path / "big.parquet",
        "--tile-size",
        20,
        "--crs",
        "EPSG:4326",
    )
    assert big.exit_code == 0, big.output
    assert "A tile size of 20 in EPSG:4326 (degrees) is 2,226 km: unusual" in big.output
    usual = invoke("init", tiny, tmp_path / "usual.parquet", "--tile-size", 10)
    assert usual.exit_code == 0 and "warning" not in usual.output


def test_bad_grid_crs_and_tile_size(area, tmp_path):
    unknown = invoke("init", area, tmp_path / "a.parquet", "--tile-size", 1000, "--crs", "EPSG:99999")
    assert unknown.exit_code == 2 and "Unknown CRS 'EPSG:99999'" in unknown.output
    no_epsg = invoke("init", area, tmp_path / "a.parquet", "--tile-size", 1000, "--crs", "ESRI:54009")
    assert no_epsg.exit_code == 2 and "must have an EPSG code" in no_epsg.output
    geocentric = invoke("init", area, tmp_path / "a.parquet", "--tile-size", 1000, "--crs", "EPSG:4978")
    assert geocentric.exit_code == 2 and "must be geographic or projected" in geocentric.output
    for size in ("0", "-5"):
        result = invoke("init", area, tmp_path / "a.parquet", f"--tile-size={size}")
        assert result.exit_code == 2 and "must be a positive number" in result.output
    assert not (tmp_path / "a.parquet").exists()


# --- the area against the CRS's area of use ---


def test_an_area_outside_the_crs_area_of_use_warns(area, tmp_path):
    wrong_zone = invoke("init", area, tmp_path / "zone.parquet", "--tile-size", 1000, "--crs", "EPSG:32632")
    assert wrong_zone.exit_code == 0, wrong_zone.output  # a warning: the tiles are still made
    assert "warning: The area of interest (lon 5.1 to 5.14, lat 51.2 to 51.22) lies outside" in wrong_zone.output
    assert "EPSG:32632 (WGS 84 / UTM zone 32N): lon 6 to 12" in wrong_zone.output
    assert "the area's UTM zone is EPSG:32631" in wrong_zone.output
    assert (tmp_path / "zone.parquet").exists()

    swapped = write_area(tmp_path / "swapped.geojson", (51.20, 5.10, 51.22, 5.14))  # lat/lon given as lon/lat
    result = invoke("init", swapped, tmp_path / "swapped.parquet", "--tile-size", 1000, "--crs", "EPSG:32631")
    assert result.exit_code == 0, result.output
    assert "lies outside the area of use of EPSG:32631" in result.output
    assert "Are longitude and latitude swapped" in result.output

    border = write_area(tmp_path / "border.geojson", (5.95, 51.2, 6.05, 51.22))
    partly = invoke("init", border, tmp_path / "border.parquet", "--tile-size", 1000, "--crs", "EPSG:32631")
    assert partly.exit_code == 0 and "extends beyond the area of use of EPSG:32631" in partly.output

    right = invoke("init", area, tmp_path / "right.parquet", "--tile-size", 1000, "--crs", "EPSG:32631")
    assert right.exit_code == 0 and "warning" not in right.output
    world = invoke("init", area, tmp_path / "world.parquet", "--tile-size", 1000)
    assert world.exit_code == 0 and "warning" not in world.output


def test_coordinates_that_cannot_be_longitude_latitude_are_refused(tmp_path):
    tokyo_swapped = write_area(tmp_path / "tokyo.geojson", (35.6, 139.6, 35.8, 139.8))
    result = invoke("init", tokyo_swapped, tmp_path / "jobs.parquet", "--tile-size", 1000)
    assert result.exit_code == 2, result.output
    assert "are not longitude/latitude: are x and y swapped" in result.output
    projected = write_area(tmp_path / "utm.parquet", (640000, 5673000, 643000, 5675000), crs=None)
    no_crs = invoke("init", projected, tmp_path / "jobs.parquet", "--tile-size", 1000)
    assert no_crs.exit_code == 2 and "projected coordinates in a file without a CRS" in no_crs.output
    assert "has no CRS information; assuming longitude/latitude (EPSG:4326)" in no_crs.output
    assert not (tmp_path / "jobs.parquet").exists()


# --- what the CRS notices say ---


def run_installed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(EXECUTABLE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.filterwarnings("ignore:'crs' was not provided:UserWarning")  # writing the file without a CRS
def test_geojson_gets_no_crs_notice_but_a_file_without_a_crs_does(tmp_path):
    """GeoJSON is longitude/latitude by definition (RFC 7946): nothing to say. openeo's split_area used to
    print "no CRS information; assuming ... EPSG:3857" for every area, which was never true."""
    (tmp_path / "rfc7946.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {}, "geometry": box(*MOL).__geo_interface__}],
            }
        )
    )
    write_area(tmp_path / "aoi.geojson")
    for name in ("rfc7946.geojson", "aoi.geojson"):
        done = run_installed("init", name, f"{name}.parquet", "--tile-size", "1000", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Created" in done.stdout
        assert "CRS information" not in done.stdout + done.stderr and "assuming" not in done.stdout + done.stderr

    frame = gpd.GeoDataFrame(geometry=[box(*MOL)])  # a shapefile without .prj: no CRS at all
    frame.to_file(tmp_path / "noprj.shp")
    assert not (tmp_path / "noprj.prj").exists()
    shp = run_installed("init", "noprj.shp", "shp.parquet", "--tile-size", "1000", cwd=tmp_path)
    assert shp.returncode == 0, shp.stdout + shp.stderr
    assert "'noprj.shp' has no CRS information; assuming longitude/latitude (EPSG:4326)" in shp.stdout
    assert "tile grid's CRS" not in shp.stdout + shp.stderr
    assert len(gpd.read_parquet(tmp_path / "shp.parquet")) == len(gpd.read_parquet(tmp_path / "aoi.geojson.parquet"))


# --- the tiles' bounds ---


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:32631"])
def test_every_tile_carries_its_bounds_in_lon_lat(area, tmp_path, crs):
    db = tmp_path / "jobs.parquet"
    result = invoke("init", area, db, "--tile-size", 1000, "--crs", crs, "-c", "year=2024")
    assert result.exit_code == 0, result.output
    df = gpd.read_parquet(db)
    assert list(df.columns[:5]) == ["tile", "west", "south", "east", "north"]
    bounds = df.geometry.bounds
    for column, source in zip(("west", "south", "east", "north"), ("minx", "miny", "maxx", "maxy"), strict=True):
        assert df[column].dtype == float and df[column].tolist() == pytest.approx(bounds[source].tolist(), abs=1e-12)
    assert (df["west"] < df["east"]).all() and (df["south"] < df["north"]).all()
    outer = (df["west"].min(), df["south"].min(), df["east"].max(), df["north"].max())
    tolerance = 1e-9
    assert outer[0] <= MOL[0] + tolerance and outer[1] <= MOL[1] + tolerance  # the tiles cover the area
    assert outer[2] >= MOL[2] - tolerance and outer[3] >= MOL[3] - tolerance
    if crs == "EPSG:3857":  # a lon/lat box is a box in EPSG:3857: the grid starts at its corner, clipped to it
        assert outer == pytest.approx(MOL, abs=tolerance)
    in_grid = gpd.GeoSeries(df.geometry.iloc[:1], crs="EPSG:4326").to_crs(crs).bounds.iloc[0]
    assert (in_grid.maxx - in_grid.minx, in_grid.maxy - in_grid.miny) == pytest.approx((1000, 1000), abs=0.01)

    csv = tmp_path / "jobs.csv"
    assert invoke("init", area, csv, "--tile-size", 1000, "--crs", crs).exit_code == 0
    edges = ["west", "south", "east", "north"]
    assert pd.read_csv(csv)[edges].to_numpy().ravel().tolist() == pytest.approx(df[edges].to_numpy().ravel().tolist())


# --- columns init or the manager own ---

BOOKKEEPING = (
    "status id backend_name start_time running_start_time costs cpu memory duration message create_token "
    "planned_backend results retry_count retry_after owner lease_until geometry tile west south east north"
).split()


def test_bookkeeping_and_tile_columns_cannot_be_set(area, tmp_path):
    db = tmp_path / "jobs.parquet"
    for name in BOOKKEEPING:
        result = invoke("init", area, db, "--tile-size", 1000, "-c", "year=2024", "-c", f"{name}=finished")
        assert result.exit_code == 2, (name, result.output)
        assert f"--column cannot set {name}: init and the job manager fill this column themselves" in result.output
    both = invoke("init", area, db, "--tile-size", 1000, "--column", "status=finished", "-c", "west=1")
    assert both.exit_code == 2 and "--column cannot set status, west" in both.output
    assert not db.exists()
    fine = invoke("init", area, db, "--tile-size", 1000, "-c", "statuses=x", "-c", "owner_name=me")
    assert fine.exit_code == 0, fine.output
    df = gpd.read_parquet(db)
    assert set(df["status"]) == {"not_started"} and set(df["owner_name"]) == {"me"}


# --- --start-job: a module in the current folder, or a file ---

START_JOB = '''
import openeo

YEAR = 2024


def start_job(row, connection, **kwargs):
    """The README's example: the tile's bounds come from the row."""
    cube = connection.load_collection(
        "SENTINEL2_L2A",
        spatial_extent={"west": row["west"], "south": row["south"], "east": row["east"], "north": row["north"]},
        temporal_extent=[f"{row['year']}-01-01", f"{row['year'] + 1}-01-01"],
        bands=["B04", "B08"],
    )
    return cube.ndvi(nir="B08", red="B04").create_job(title=f"tile {row['tile']}", out_format="GTiff")
'''


def extents_by_tile(simulator) -> dict[str, dict]:
    """The spatial extent each simulated job was created with, by its row's tile."""
    out = {}
    for job in simulator.jobs():
        (load,) = (n for n in job["process_graph"].values() if n["process_id"] == "load_collection")
        out[job["title"].split()[1]] = load["arguments"]["spatial_extent"]
    return out


def assert_jobs_used_the_rows_bounds(db: Path, simulator) -> None:
    df = gpd.read_parquet(db) if db.suffix == ".parquet" else pd.read_csv(db)
    assert set(df["status"]) == {"finished"}
    extents = extents_by_tile(simulator)
    assert len(extents) == len(df)
    for _, row in df.iterrows():
        extent = extents[row["tile"]]
        assert [extent[k] for k in ("west", "south", "east", "north")] == pytest.approx(
            [row["west"], row["south"], row["east"], row["north"]]
        )


def test_start_job_module_in_the_current_folder_with_the_installed_command(tmp_path, openeo_simulator):
    """As a user: `cd` to the folder with mymodule.py and run the installed command, no PYTHONPATH."""
    (tmp_path / "mymodule.py").write_text(START_JOB)
    write_area(tmp_path / "aoi.geojson")
    made = run_installed("init", "aoi.geojson", "jobs.parquet", "--tile-size", "1500", "-c", "year=2024", cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    ran = run_installed(
        "run",
        "jobs.parquet",
        "-b",
        f"sim={openeo_simulator.url}",
        "--start-job",
        "mymodule:start_job",
        "--local",
        "--poll-sleep",
        "0.1",
        "--root-dir",
        "results",
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert_jobs_used_the_rows_bounds(tmp_path / "jobs.parquet", openeo_simulator)

    missing = run_installed(
        "run",
        "jobs.parquet",
        "-b",
        f"sim={openeo_simulator.url}",
        "--start-job",
        "mymodul:start_job",
        "--local",
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert (
        f"no module named 'mymodul' (not installed, and no mymodul.py or mymodul/ in the current folder {tmp_path})"
        in missing.stdout
    )


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A user's folder as the current folder, with their code in code/; imports undone afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    code = tmp_path / "code"
    code.mkdir()
    (code / "jobs_neighbour.py").write_text("BANDS = ['B04', 'B08']\n")
    (code / "jobs.py").write_text("from jobs_neighbour import BANDS  # a neighbour of the file\n" + START_JOB)
    (code / "broken.py").write_text("def start_job(row, connection):\n    return (\n")
    (code / "needs.py").write_text("import not_installed_anywhere\n\n\ndef start_job(row, connection):\n    pass\n")
    (tmp_path / "user_jobs.py").write_text(START_JOB)
    (tmp_path / "user_broken.py").write_text("\n\ndef start_job(row connection):\n    pass\n")
    (tmp_path / "user_fails.py").write_text("LIMIT = 1 / 0\n")
    write_area(tmp_path / "aoi.geojson")
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_start_job_from_a_python_file(user_code, openeo_simulator):
    assert invoke("init", "aoi.geojson", "jobs.parquet", "--tile-size", 1500, "-c", "year=2024").exit_code == 0
    result = invoke(
        "run",
        "jobs.parquet",
        "-b",
        f"sim={openeo_simulator.url}",
        "--start-job",
        "code/jobs.py:start_job",
        "--local",
        "--poll-sleep",
        "0.1",
        "--root-dir",
        "results",
    )
    assert result.exit_code == 0, result.output
    assert_jobs_used_the_rows_bounds(user_code / "jobs.parquet", openeo_simulator)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("code/nope.py:start_job", "start_job file 'code/nope.py' does not exist (relative to the current folder"),
        ("no_such_module_xyz:start_job", "no module named 'no_such_module_xyz' (not installed, and no"),
        ("user_jobs.sub:start_job", "no module named 'user_jobs.sub'"),
        ("user_jobs:strat_job", "user_jobs.py has no 'strat_job' (it defines: start_job)"),
        ("code/jobs.py:strat_job", "jobs.py has no 'strat_job' (it defines: start_job)"),
        ("user_jobs:YEAR", "start_job 'user_jobs:YEAR' is not callable: it is int 2024"),
        ("code/broken.py:start_job", "broken.py, line 2: SyntaxError: '(' was never closed"),
        ("user_broken:start_job", "user_broken.py, line 3: SyntaxError: "),
        ("code/needs.py:start_job", "needs.py, line 1: ModuleNotFoundError: No module named 'not_installed_anywhere'"),
        ("user_fails:start_job", "user_fails.py, line 1: ZeroDivisionError: division by zero"),
        ("user_jobs", "start_job must be a callable, 'module:function' or 'path/to/file.py:function'"),
    ],
)
def test_start_job_errors_say_what_is_wrong(user_code, openeo_simulator, spec, message):
    pd.DataFrame({"status": ["not_started"], "year": [2024]}).to_csv("jobs.csv", index=False)
    result = invoke("run", "jobs.csv", "-b", f"sim={openeo_simulator.url}", "--start-job", spec, "--local")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert openeo_simulator.created_count() == 0


# --- slivers ---


def test_slivers_at_the_edges_are_merged_into_their_neighbours(tmp_path):
    """A grid that ends 0.2 tiles past the last full column and row: no 0.2-tile job; the tiles still cover
    the area exactly, none overlap, none is narrower than half a tile, and init says what it merged."""
    to_grid = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    to_lonlat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    west, south = to_grid.transform(5.10, 51.20)
    east, north = west + 3.2 * 1000, south + 2.2 * 1000  # 4 x 3 tiles in the plain grid, 5 of them slivers
    area = write_area(
        tmp_path / "aoi.geojson", bounds=(*to_lonlat.transform(west, south), *to_lonlat.transform(east, north))
    )
    db = tmp_path / "jobs.parquet"
    result = invoke("init", area, db, "--tile-size", 1000)
    assert result.exit_code == 0, result.output
    assert "6 rows" in result.output and "6 sliver(s) at the edges merged into their neighbours" in " ".join(
        result.output.split()
    )
    df = gpd.read_parquet(db)
    in_grid = df.to_crs("EPSG:3857").geometry
    widths, heights = in_grid.bounds.maxx - in_grid.bounds.minx, in_grid.bounds.maxy - in_grid.bounds.miny
    assert widths.min() >= 500 and heights.min() >= 500 and widths.max() <= 1500 and heights.max() <= 1500
    assert in_grid.union_all().area == pytest.approx(3200 * 2200, rel=1e-6)
    assert in_grid.area.sum() == pytest.approx(3200 * 2200, rel=1e-6)  # no overlap


def test_a_missing_relative_area_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "areas/aoi.geojson", tmp_path / "jobs.parquet", "--tile-size", 1000)
    assert result.exit_code == 2
    assert f"looked for in {tmp_path}" in " ".join(result.output.split())

"""The command line, driven as a user would (typer's runner in-process, and a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from shapely.geometry import Polygon
from typer.testing import CliRunner

from prefect_openeo.cli import app
from prefect_openeo.report import STATUS_COLORS

# A thread of the command that dies (e.g. the progress bars') fails the test.
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]
runner = CliRunner()


@pytest.fixture
def area(tmp_path):
    """A small area of interest as GeoJSON (about 3 x 2 km near Mol, Belgium)."""
    path = tmp_path / "aoi.geojson"
    shape = Polygon([(5.10, 51.20), (5.14, 51.20), (5.14, 51.22), (5.10, 51.22)])
    gpd.GeoDataFrame({"name": ["aoi"]}, geometry=[shape], crs="EPSG:4326").to_file(path, driver="GeoJSON")
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_every_command_has_help():
    for command in ("init", "run", "status", "retry", "plot", "demo", "simulate"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_init_tiles_an_area_and_refuses_to_overwrite(area, tmp_path):
    db = tmp_path / "jobs.parquet"
    result = invoke("init", area, db, "--tile-size", "1000", "--column", "year=2024", "-c", "collection=SENTINEL2_L2A")
    assert result.exit_code == 0, result.output
    df = gpd.read_parquet(db)
    assert len(df) >= 6 and df.crs.to_epsg() == 4326
    assert set(df["status"]) == {"not_started"}
    assert (df["year"] == 2024).all() and (df["collection"] == "SENTINEL2_L2A").all()
    assert df.geometry.intersects(gpd.read_file(area).geometry.iloc[0]).all()
    before = db.read_bytes()
    again = invoke("init", area, db, "--tile-size", "500")
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    assert db.read_bytes() == before


def test_init_bad_inputs(area, tmp_path):
    missing = invoke("init", tmp_path / "nope.geojson", tmp_path / "jobs.csv", "--tile-size", "1000")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    garbage = tmp_path / "garbage.geojson"
    garbage.write_text("{not json")
    bad = invoke("init", garbage, tmp_path / "jobs.csv", "--tile-size", "1000")
    assert bad.exit_code == 2 and "Cannot read the area of interest" in bad.output
    wrong_db = invoke("init", area, tmp_path / "jobs.xlsx", "--tile-size", "1000")
    assert wrong_db.exit_code == 2 and "Could not guess job database type" in wrong_db.output
    bad_column = invoke("init", area, tmp_path / "jobs.csv", "--tile-size", "1000", "--column", "year")
    assert bad_column.exit_code == 2 and "NAME=VALUE" in bad_column.output
    assert not (tmp_path / "jobs.csv").exists()


def run_local(db, sim, tmp_path, *extra):
    return invoke(
        "run",
        db,
        "--backend",
        f"sim={sim.url}",
        "--start-job",
        "prefect_openeo.demo:create_ndvi_job",
        "--poll-sleep",
        "0.1",
        "--root-dir",
        tmp_path / "results",
        "--local",
        *extra,
    )


def test_run_exits_3_when_results_were_not_downloaded(area, tmp_path, openeo_simulator):
    db = tmp_path / "jobs.geoparquet"
    assert invoke("init", area, db, "--tile-size", "5000", "-c", "year=2024").exit_code == 0
    openeo_simulator.config.assets_per_job = 0  # results documents without assets: nothing to download
    result = run_local(db, openeo_simulator, tmp_path)
    df = gpd.read_parquet(db)
    assert set(df["status"]) == {"finished"} and set(df["results"]) == {"failed"}
    assert result.exit_code == 3, result.output
    assert f"{len(df)} finished row(s) whose results were not downloaded" in result.output


def test_run_status_retry_plot(area, tmp_path, openeo_simulator):
    db = tmp_path / "jobs.geoparquet"
    assert invoke("init", area, db, "--tile-size", "1000", "-c", "year=2024").exit_code == 0
    n = len(gpd.read_parquet(db))
    openeo_simulator.config.failure_rate = 0.4
    openeo_simulator.config.seed = 3

    result = run_local(db, openeo_simulator, tmp_path)
    df = gpd.read_parquet(db)
    failed = int((df["status"] == "error").sum())
    assert 0 < failed < n, df["status"].value_counts()
    assert result.exit_code == 3, result.output  # done, but some rows failed
    assert "rows by backend and status" in result.output

    status = invoke("status", db, "--json")
    assert status.exit_code == 0
    info = json.loads(status.output)
    assert info["rows"] == n and info["by_status"]["error"] == failed
    assert info["by_backend"]["sim"]["finished"] == n - failed
    assert info["costs"] == pytest.approx(float(df["costs"].sum()))
    assert info["usage"]["cpu"] > 0 and info["usage_units"]["cpu"] == "cpu-seconds"
    assert info["results"] == {"done": n - failed}
    human = invoke("status", db)
    assert human.exit_code == 0 and "Costs:" in human.output
    assert f"Results of finished rows: {n - failed} done" in human.output
    memory = sum(float(str(v).split()[0]) for v in df["memory"].dropna())
    assert memory >= 1000 and f"memory {memory:,.0f} mb-seconds" in " ".join(human.output.split())
    assert "e+0" not in human.output

    png_map, png_timeline = tmp_path / "map.png", tmp_path / "timeline.png"
    plotted = invoke("plot", db, "--map", png_map, "--timeline", png_timeline)
    assert plotted.exit_code == 0, plotted.output
    for path, size in ((png_map, (1000, 800)), (png_timeline, (1000, 600))):
        image = Image.open(path)
        assert image.format == "PNG" and image.size == size
    pixels = np.asarray(Image.open(png_map).convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(STATUS_COLORS[s][i : i + 2], 16) for i in (1, 3, 5)) for s in ("finished", "error")}
    present = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert colours <= present, "the map must show finished (green) and error (red) tiles"

    bad_status = invoke("retry", db, "--status", "finished")
    assert bad_status.exit_code == 2 and "--status must be among" in bad_status.output
    unknown_backend = invoke("retry", db, "--backend", "nowhere")
    assert unknown_backend.exit_code == 2 and "no rows on backend(s) nowhere" in unknown_backend.output
    reset = invoke("retry", db, "--status", "error")
    assert reset.exit_code == 0 and f"Reset {failed} row(s)" in reset.output
    df = gpd.read_parquet(db)
    assert (df["status"] == "not_started").sum() == failed and df.loc[df["status"] == "not_started", "id"].isna().all()

    openeo_simulator.config.failure_rate = 0.0
    again = run_local(db, openeo_simulator, tmp_path)
    assert again.exit_code == 0, again.output
    assert set(gpd.read_parquet(db)["status"]) == {"finished"}


def test_run_bad_inputs(tmp_path, openeo_simulator):
    missing = invoke("run", tmp_path / "none.csv", "--backend", f"sim={openeo_simulator.url}", "--start-job", "m:f")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    db = tmp_path / "jobs.csv"
    pd.DataFrame({"status": ["not_started"], "west": [5.0], "year": [2020]}).to_csv(db, index=False)
    no_callback = invoke("run", db, "--backend", f"sim={openeo_simulator.url}")
    assert no_callback.exit_code == 2 and "--start-job" in no_callback.output
    bad_backend = invoke("run", db, "--backend", "sim", "--start-job", "m:f")
    assert bad_backend.exit_code == 2 and "NAME=URL" in bad_backend.output
    bad_import = invoke("run", db, "--backend", f"sim={openeo_simulator.url}", "--start-job", "nope:f", "--local")
    assert bad_import.exit_code == 2 and "Cannot import start_job" in bad_import.output


def test_plot_without_geometry_is_a_clear_error(tmp_path):
    db = tmp_path / "jobs.csv"
    pd.DataFrame({"status": ["not_started"], "year": [2020]}).to_csv(db, index=False)
    result = invoke("plot", db)
    assert result.exit_code == 2 and "no geometry" in result.output


def test_the_installed_command_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prefect_openeo.cli", "status", str(tmp_path / "missing.csv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "does not exist" in out.stdout


@pytest.mark.usefixtures("prefect_api")
def test_run_with_a_backend_block(tmp_path, openeo_simulator):
    from prefect_openeo import OpenEOBackend

    openeo_simulator.config.require_auth = True
    OpenEOBackend(url=openeo_simulator.url, auth="basic", username="user", password="password").save(
        "cli-sim", overwrite=True
    )
    db = tmp_path / "jobs.csv"
    pd.DataFrame({"status": ["not_started"] * 2, "west": [5.0, 5.1], "year": [2020, 2021]}).to_csv(db, index=False)
    result = invoke(
        "run",
        db,
        "-b",
        "sim=block:cli-sim",
        "--start-job",
        "conftest:ndvi_job",
        "--poll-sleep",
        "0.1",
        "--root-dir",
        tmp_path / "results",
        "--local",
    )
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(db)["status"]) == {"finished"}
    assert {job["user"] for job in openeo_simulator.jobs()} == {"user"}

"""The pictures a person looks at: the map of tiles by status and the timeline of jobs per backend."""

from __future__ import annotations

import math
import random

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from PIL import Image
from shapely.geometry import box

from prefect_openeo.report import (
    STATUS_COLORS,
    WAITING_COLOR,
    map_figure,
    plot_map,
    plot_timeline,
    timeline_figure,
    usage_seconds,
)

T0 = pd.Timestamp("2025-03-04T09:00:00Z")
STATUS_COLORS_BY_HEX = {colour: status for status, colour in STATUS_COLORS.items()}


def rfc3339(moment: pd.Timestamp) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def short_run() -> pd.DataFrame:
    """18 jobs on one backend where sweeps saw only one of them running (the others: queued, then finished)."""
    rows = []
    for i in range(18):
        created = T0 + pd.Timedelta(minutes=2 * i)
        rows.append(
            {
                "id": f"j-{i}",
                "backend_name": "cdse",
                "status": "error" if i == 7 else "finished",
                "start_time": rfc3339(created),
                "running_start_time": rfc3339(created + pd.Timedelta(minutes=3)) if i == 0 else None,
                "cpu": f"{100 + i}.5 cpu-seconds",
                "memory": f"{2000 + i}.0 mb-seconds",
                "duration": f"{300 + 30 * i}.0 seconds",
            }
        )
    return pd.DataFrame(rows)


def long_run(now: pd.Timestamp) -> pd.DataFrame:
    """300 jobs over 2 backends with 10 slots each, for 3 hours: some still active at ``now``, a few unstarted."""
    rng = random.Random(36)
    rows = []
    for backend in ("sim-a", "sim-b"):
        for slot in range(10):
            created = T0 + pd.Timedelta(seconds=slot * 20)
            for _ in range(15):
                running = created + pd.Timedelta(minutes=rng.uniform(1, 4))
                ran = pd.Timedelta(minutes=rng.uniform(7, 10.5))
                row = {"backend_name": backend, "start_time": rfc3339(created), "running_start_time": rfc3339(running)}
                if created > now:
                    row |= {"status": "not_started", "start_time": None, "running_start_time": None}
                elif running > now:
                    row |= {"status": "queued", "running_start_time": None}
                elif running + ran > now:
                    row |= {"status": "running"}
                else:
                    seen = rng.random() > 0.1
                    row |= {
                        "status": "error" if rng.random() < 0.08 else "finished",
                        "running_start_time": rfc3339(running) if seen else None,
                        "duration": f"{ran.total_seconds():.1f} seconds",
                    }
                rows.append(row)
                created = running + ran + pd.Timedelta(seconds=30)
    rows += [{"backend_name": None, "status": "not_started", "start_time": None}] * 4
    return pd.DataFrame(rows)


def legend(fig) -> tuple[list[str], set[str]]:
    """The legend's texts and the colours of its samples."""
    (shown,) = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    colours = set()
    for handle in shown.legend_handles:
        if hasattr(handle, "get_facecolor") and handle.get_fill():
            colours.add(to_hex(handle.get_facecolor()))
        if hasattr(handle, "get_edgecolor"):
            colours.add(to_hex(handle.get_edgecolor()))
        if hasattr(handle, "get_color"):
            colours.add(to_hex(handle.get_color()))
    return [t.get_text() for t in shown.get_texts()], colours


def bars(ax, gid: str) -> list:
    return [p for p in ax.patches if p.get_gid() == gid]


def drawn_colours(ax) -> set[str]:
    """Every colour a bar, marker or line on the timeline is drawn in (white and the grey band separator aside)."""
    colours = set()
    for patch in ax.patches:
        for colour in (patch.get_facecolor(), patch.get_edgecolor() if patch.get_linewidth() else None):
            if colour is not None and colour[3] > 0:  # drawn, not transparent
                colours.add(to_hex(colour))
    for line in ax.lines:
        if line.get_gid() != "band-separator":
            colours.add(to_hex(line.get_color()))
    return colours - {"#ffffff"}


def visible_ticks(axis) -> list[str]:
    """The tick labels shown on an axis (within its limits)."""
    low, high = sorted(axis.get_view_interval())
    return [
        label.get_text()
        for tick, label in zip(axis.get_majorticklocs(), axis.get_ticklabels(), strict=True)
        if low <= tick <= high
    ]


def png_colours(path) -> set[str]:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {"#{:02x}{:02x}{:02x}".format(*p) for p in np.unique(pixels, axis=0)}


def test_usage_seconds_reads_the_duration_cell():
    assert usage_seconds("12.3 seconds") == pytest.approx(12.3)
    assert usage_seconds("1500 ms") == pytest.approx(1.5)
    assert usage_seconds("2 minutes") == pytest.approx(120)
    assert usage_seconds(None) is None


def test_jobs_never_seen_running_are_drawn_for_their_reported_duration():
    df = short_run()
    fig = timeline_figure(df, now=T0 + pd.Timedelta(hours=2))
    ax = fig.axes[0]
    texts, legend_colours = legend(fig)

    # 17 jobs ran for their reported duration, drawn from creation and marked as such: no blips
    unplaced = sorted(bars(ax, "unplaced"), key=lambda p: p.get_y())
    assert len(unplaced) == 17
    expected = [(300 + 30 * i) / 60 for i in range(1, 18)]
    assert sorted(p.get_width() for p in unplaced) == pytest.approx(expected)
    assert all(p.get_hatch() for p in unplaced)
    assert "running start unknown: drawn from creation (for the reported duration)" in texts
    # the one job seen running waited 3 minutes, then ran 5
    (waiting,) = bars(ax, "waiting")
    (running,) = bars(ax, "running")
    assert (waiting.get_x(), waiting.get_width()) == pytest.approx((0, 3))
    assert (running.get_x(), running.get_width()) == pytest.approx((3, 5))

    # every colour on the picture is explained in the legend, with counts by status
    assert drawn_colours(ax) <= legend_colours
    assert WAITING_COLOR in legend_colours
    assert texts[:2] == ["finished (17)", "error (1)"]
    # a run of about an hour reads in minutes, from a stated clock time
    assert ax.get_xlabel() == "minutes since the first job was created (2025-03-04 09:00:00 UTC)"
    # one backend band, each job on its own labelled line
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cdse\n18 jobs"]
    assert [t.get_text() for t in ax.get_yticklabels(minor=True)] == [f"row {i}" for i in range(18)]


def test_hundreds_of_jobs_keep_one_band_per_backend_and_read_in_hours(tmp_path):
    now = T0 + pd.Timedelta(hours=3)
    df = long_run(now)
    fig = timeline_figure(df, now=now)
    ax = fig.axes[0]
    texts, legend_colours = legend(fig)

    assert [t.get_text() for t in ax.get_yticklabels()] == ["sim-a\n150 jobs", "sim-b\n150 jobs"]
    assert ax.get_xlabel().startswith("hours since the first job was created")
    left, right = ax.get_xlim()
    assert left <= 0 and 3 <= right < 3.2
    assert visible_ticks(ax.xaxis) == ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
    assert ax.get_title() == "Jobs per backend over time: 300 jobs (4 rows not started)"

    # one bar per job, each backend's packed into lines above the separator or below it
    (separator,) = [line for line in ax.lines if line.get_gid() == "band-separator"]
    edge = separator.get_ydata()[0]
    jobs = bars(ax, "running") + bars(ax, "unplaced")
    assert len(jobs) == 300 - int((df["status"] == "queued").sum())
    lines_a = {p.get_y() for p in ax.patches if p.get_y() < edge}
    lines_b = {p.get_y() for p in ax.patches if p.get_y() > edge}
    assert 10 <= len(lines_a) < 30 and 10 <= len(lines_b) < 30
    by_line: dict[float, list] = {}
    for patch in jobs + bars(ax, "waiting"):
        by_line.setdefault(patch.get_y(), []).append((patch.get_x(), patch.get_x() + patch.get_width()))
    for spans in by_line.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:], strict=False)), "bars overlap"

    # active jobs run to "now", which the legend names; every colour is in the legend
    assert any(t.startswith("now (12:00:00 UTC)") for t in texts)
    assert any(t.startswith("waiting: created → first seen running (") for t in texts)
    assert drawn_colours(ax) <= legend_colours

    path = plot_timeline(df, tmp_path / "timeline.png", now=now)
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1000, 600)
    assert {STATUS_COLORS["finished"], STATUS_COLORS["running"], WAITING_COLOR} <= png_colours(path)


def test_what_a_row_does_not_record_is_shown_as_unknown():
    now = T0 + pd.Timedelta(minutes=10)
    df = pd.DataFrame(
        {
            "backend_name": ["vito", "vito", "vito", "vito"],
            "status": ["start_failed", "canceled", "running", "queued"],
            "start_time": [rfc3339(T0 + pd.Timedelta(minutes=m)) for m in (0, 1, 2, 3)],
            "running_start_time": [None, rfc3339(T0 + pd.Timedelta(minutes=4)), None, None],
        }
    )
    fig = timeline_figure(df, now=now)
    ax = fig.axes[0]
    texts, legend_colours = legend(fig)

    # no job failed to start or got canceled before it ran "for a second": only the known moment is marked
    marks = sorted(
        (x, STATUS_COLORS_BY_HEX[to_hex(line.get_color())])
        for line in ax.lines
        if line.get_gid() == "moment"
        for x in line.get_xdata()
    )
    assert marks == [(0.0, "start_failed"), (4.0, "canceled")]
    assert "no duration recorded: a mark at the last known time" in texts
    # a running job no sweep saw start running: from creation to now, marked as such
    (unplaced,) = bars(ax, "unplaced")
    assert (unplaced.get_x(), unplaced.get_width()) == pytest.approx((2, 8))
    assert "waiting: created → first seen running (1 still waiting)" in texts
    assert "now (09:10:00 UTC): active jobs" in texts
    assert drawn_colours(ax) <= legend_colours


def test_a_timeline_without_started_jobs_says_so():
    fig = timeline_figure(pd.DataFrame({"status": ["not_started"] * 3, "start_time": [None] * 3}))
    assert [t.get_text() for t in fig.axes[0].texts] == ["no job has started yet"]


def tiles(statuses: list[str]) -> gpd.GeoDataFrame:
    """24 tiles of 0.25° x 0.1° around 60°N, an L-shaped area (the top right corner is left out)."""
    cells = [(col, row) for row in range(5) for col in range(6) if not (row >= 3 and col >= 3)][:24]
    geometry = [box(10 + 0.25 * c, 60 + 0.1 * r, 10 + 0.25 * (c + 1), 60 + 0.1 * (r + 1)) for c, r in cells]
    return gpd.GeoDataFrame({"status": statuses}, geometry=geometry, crs="EPSG:4326")


def test_map_has_coordinates_an_outline_and_a_legend_with_counts(tmp_path):
    statuses = ["finished"] * 12 + ["error"] * 3 + ["running"] * 4 + ["queued"] * 2 + ["not_started"] * 3
    df = tiles(statuses)
    fig = map_figure(df)
    ax = fig.axes[0]
    texts, _ = legend(fig)

    assert texts == [
        "not_started (3)",
        "queued (2)",
        "running (4)",
        "finished (12)",
        "error (3)",
        "area covered (union of the tiles)",
    ]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("longitude", "latitude")
    xticks, yticks = visible_ticks(ax.xaxis), visible_ticks(ax.yaxis)
    assert xticks and all(t.endswith("°E") for t in xticks)
    assert yticks and all(t.endswith("°N") for t in yticks)
    assert "60.2°N" in yticks

    # a tight extent: the tiles and a small margin
    west, south, east, north = df.total_bounds
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < west and x1 > east and y0 < south and y1 > north
    assert (x1 - x0) < 1.1 * (east - west) and (y1 - y0) < 1.1 * (north - south) + 0.1 * (east - west)
    # a degree of longitude at 60°N is half as long as a degree of latitude
    assert ax.get_aspect() == pytest.approx(1 / math.cos(math.radians(60.25)))

    # the outline follows the L-shaped area: 6 corners, closed
    outline = [line for line in ax.lines if line.get_gid() == "area-outline"]
    assert len(outline) == 1
    corners = {(round(x, 6), round(y, 6)) for x, y in outline[0].get_xydata()}
    assert {(10.0, 60.0), (11.5, 60.0), (11.5, 60.3), (10.75, 60.3), (10.75, 60.5), (10.0, 60.5)} <= corners

    # every tile says its row, at its centre: a red one can be found in the job database
    labels = {t.get_text(): t.xy for t in ax.texts}
    assert set(labels) == {str(i) for i in df.index}
    assert labels["12"] == pytest.approx((df.geometry[12].centroid.x, df.geometry[12].centroid.y))

    path = plot_map(df, tmp_path / "map.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (1000, 800)
    assert {STATUS_COLORS[s] for s in set(statuses)} <= png_colours(path)


def test_a_map_of_many_tiles_labels_the_failed_ones():
    cells = [(c, r) for r in range(15) for c in range(10)]
    geometry = [box(10 + 0.1 * c, 60 + 0.1 * r, 10 + 0.1 * (c + 1), 60 + 0.1 * (r + 1)) for c, r in cells]
    statuses = ["finished"] * 150
    for i in (7, 42, 149):
        statuses[i] = "error"
    df = gpd.GeoDataFrame({"status": statuses}, geometry=geometry, crs="EPSG:4326")
    assert sorted(t.get_text() for t in map_figure(df).axes[0].texts) == ["149", "42", "7"]


def test_map_of_projected_tiles_is_drawn_in_lon_lat():
    df = tiles(["finished"] * 24).to_crs("EPSG:3857")
    ax = map_figure(df).axes[0]
    x0, x1 = ax.get_xlim()
    assert 9.9 < x0 < 10 and 11.5 < x1 < 11.6


def campaign(n: int, backends: int = 2) -> pd.DataFrame:
    """``n`` jobs in waves of 100 per backend: created every 3 minutes, waiting 1 minute, running 2; every
    50th in error; the last wave still running at T0 + (waves x 3 - 1) minutes."""
    waves = n // (100 * backends)
    rows = []
    for i in range(n):
        wave = i // (100 * backends)
        created = T0 + pd.Timedelta(minutes=3 * wave)
        last = wave == waves - 1
        rows.append(
            {
                "backend_name": f"b{i % backends}",
                "status": "running" if last else ("error" if i % 50 == 0 else "finished"),
                "start_time": rfc3339(created),
                "running_start_time": rfc3339(created + pd.Timedelta(minutes=1)),
                "duration": None if last else "120 seconds",
            }
        )
    return pd.DataFrame(rows)


def test_a_campaign_timeline_counts_jobs_waiting_and_running_per_backend_by_how_they_ended():
    df = campaign(2_400)  # 12 waves of 200
    now = T0 + pd.Timedelta(minutes=3 * 11 + 2)  # the last wave has run for a minute
    fig = timeline_figure(df, now=now)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["b0\n1200 jobs", "b1\n1200 jobs"]
    texts, colours = legend(fig)
    errors = int((df["status"] == "error").sum())
    assert texts == [
        "waiting: created → first seen running",
        f"running ({(df['status'] == 'running').sum()})",
        f"finished ({(df['status'] == 'finished').sum()})",
        f"error ({errors})",
    ]
    assert {WAITING_COLOR, STATUS_COLORS["finished"], STATUS_COLORS["error"]} <= colours
    # counts, not bars: each backend runs 100 jobs at a time, 2 of them to end in error (every 50th row)
    ax = axes[0]
    assert not ax.patches and ax.collections
    stacked = [c for c in ax.collections if c.get_gid() == "counts"]
    tops = max(path.vertices[:, 1].max() for c in stacked for path in c.get_paths())
    assert tops == pytest.approx(100)
    red = [c for c in stacked if to_hex(c.get_facecolor()[0]) == STATUS_COLORS["error"]]
    assert red and max(path.vertices[:, 1].max() - path.vertices[:, 1].min() for path in red[0].get_paths()) > 0


def test_a_campaign_map_draws_every_tile_and_labels_the_failed_ones():
    side = 80  # 6,400 tiles: above the outlined size
    cells = [(c, r) for r in range(side) for c in range(side)]
    geometry = [box(10 + 0.01 * c, 60 + 0.01 * r, 10 + 0.01 * (c + 1), 60 + 0.01 * (r + 1)) for c, r in cells]
    statuses = ["finished"] * len(cells)
    for i in (3, 777, 6399):
        statuses[i] = "error"
    df = gpd.GeoDataFrame({"status": statuses}, geometry=geometry, crs="EPSG:4326")
    ax = map_figure(df).axes[0]
    tiles = [c for c in ax.collections if c.get_gid() == "tiles"]
    assert sum(len(c.get_paths()) for c in tiles) == len(df)
    assert not [line for line in ax.lines if line.get_gid() == "area-outline"]
    assert sorted(t.get_text() for t in ax.texts) == ["3", "6399", "777"]

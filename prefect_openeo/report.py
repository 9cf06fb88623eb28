"""What a job database says: counts, usage and costs, problems, and pictures (map and timeline)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from prefect_openeo.outcome import FAILED_STATUSES
from prefect_openeo.states import ACTIVE, ALL

if TYPE_CHECKING:
    import geopandas as gpd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colours of statuses in the pictures (the same everywhere, so a legend can be learned once).
STATUS_COLORS = {
    "not_started": "#bdbdbd",
    "queued_for_start": "#9ecae1",
    "created": "#6baed6",
    "queued": "#4292c6",
    "running": "#fd8d3c",
    "finished": "#31a354",
    "error": "#de2d26",
    "canceled": "#756bb1",
    "start_failed": "#a50f15",
    "skipped": "#636363",
}


def usage_number(text: Any) -> float | None:
    """The number in a usage cell such as ``"1234.5 cpu-seconds"``."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    match = re.match(r"\s*([-+0-9.eE]+)", str(text))
    return float(match.group(1)) if match else None


def readable_number(value: float) -> str:
    """A total for people: ``1,618,240`` rather than ``1.61824e+06``; small values as they are (``0.25``)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"


def summary(df: pd.DataFrame) -> dict[str, Any]:
    """Counts by status and backend, finished rows by download state (``results``), running times of the jobs
    running now, usage and costs totals, rows with problems."""
    backend = df["backend_name"].fillna("(none)") if "backend_name" in df.columns else pd.Series("(none)", df.index)
    counts = {str(k): int(v) for k, v in df["status"].value_counts().items()}
    by_backend = {
        str(name): {str(k): int(v) for k, v in group["status"].value_counts().items()}
        for name, group in df.groupby(backend)
    }
    usage: dict[str, float] = {}
    units: dict[str, str] = {}
    for column in ("cpu", "memory", "duration"):
        if column in df.columns:
            values = df[column].dropna()
            usage[column] = round(sum(v for v in (usage_number(x) for x in values) if v is not None), 3)
            unit = next((str(x).split(" ", 1)[1] for x in values if " " in str(x)), "")
            units[column] = unit
    costs = round(float(pd.to_numeric(df.get("costs"), errors="coerce").sum()), 3) if "costs" in df.columns else 0.0
    running = df[df["status"] == "running"] if "running_start_time" in df.columns else df.iloc[0:0]
    now = pd.Timestamp.now(tz="UTC")
    running_for = {
        str(i): round((now - pd.Timestamp(t)).total_seconds())
        for i, t in running["running_start_time"].dropna().items()
    }
    finished = df[df["status"] == "finished"]
    downloads = (
        {str(k): int(v) for k, v in finished["results"].fillna("not recorded").value_counts().items()}
        if "results" in df.columns
        else {}
    )
    problems = []
    if "message" in df.columns:
        for index, row in df[df["message"].notna() & (df["message"] != "")].iterrows():
            problems.append(
                {"row": str(index), "status": row["status"], "id": row.get("id"), "message": row["message"]}
            )
    return {
        "rows": len(df),
        "by_status": counts,
        "by_backend": by_backend,
        "active": int(df["status"].isin(ACTIVE).sum()),
        "usage": usage,
        "usage_units": units,
        "costs": costs,
        "running_seconds": running_for,
        "results": downloads,
        "problems": problems,
    }


# -- pictures -------------------------------------------------------------------------------------------------

#: Up to this many jobs the timeline gives each job its own labelled line; above, each backend's jobs are
#: packed into as few lines as they need (still one bar per job), so the picture stays readable at any size.
LABELLED_JOBS = 40
#: Above this many jobs the timeline draws, per backend, how many jobs were waiting and running at each
#: moment (stacked by the status they ended in) rather than a bar per job: a bar per job costs a minute
#: and a gigabyte at 40,000 jobs, and no one can read 40,000 bars.
BARS_UP_TO = 2_000
#: Moments the counted timeline is sampled at, across the run's span.
COUNT_SAMPLES = 800
#: Time between creating a job and first seeing it running.
WAITING_COLOR = "#c6dbef"
#: The neutral colour of the legend's samples of line styles (the bars themselves take their status' colour).
STYLE_SAMPLE_COLOR = "#525252"
UNPLACED_HATCH = "////"

Span = tuple[pd.Timestamp, pd.Timestamp]


def usage_seconds(text: Any) -> float | None:
    """Seconds in a usage ``duration`` cell such as ``"12.3 seconds"`` (milliseconds, minutes, hours converted)."""
    value = usage_number(text)
    if value is None:
        return None
    unit = str(text).strip().partition(" ")[2].lower() if isinstance(text, str) else ""
    for prefix, factor in (("ms", 0.001), ("milli", 0.001), ("min", 60.0), ("h", 3600.0), ("d", 86400.0)):
        if unit.startswith(prefix):
            return value * factor
    return value


@dataclass
class JobTimes:
    """When one job waited and ran, as far as its row tells.

    A row records when the job was created (``start_time``), when a sweep first saw it running
    (``running_start_time``) and, once it ended, the backend's usage ``duration``; not when it ended.
    """

    row: Any
    backend: str
    status: str
    created: pd.Timestamp
    #: Created until first seen running (or until now, for a job not running yet).
    waiting: Span | None = None
    #: First seen running until now (active) or for the reported duration (ended).
    running: Span | None = None
    #: Ran, but no sweep saw it running: drawn from creation, for its reported duration (or until now).
    unplaced: Span | None = None
    #: The last moment known of an ended job whose duration was not reported.
    moment: pd.Timestamp | None = None

    @property
    def last(self) -> pd.Timestamp:
        ends = [span[1] for span in (self.waiting, self.running, self.unplaced) if span is not None]
        return max([self.created, *ends, *([self.moment] if self.moment is not None else [])])


def _timestamps(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
    return pd.to_datetime(df[column], utc=True, errors="coerce", format="ISO8601")


def _utc(moment: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def job_times(df: pd.DataFrame, now: pd.Timestamp) -> list[JobTimes]:
    """The times of every row with a ``start_time``, nothing guessed beyond what the row says."""
    created, running = _timestamps(df, "start_time"), _timestamps(df, "running_start_time")
    backends = df["backend_name"] if "backend_name" in df.columns else pd.Series(None, index=df.index)
    durations = df["duration"] if "duration" in df.columns else pd.Series(None, index=df.index)
    jobs = []
    for index, status, backend, s, r, duration in zip(
        df.index, df["status"].astype(str), backends, created, running, durations, strict=True
    ):
        if pd.isna(s):
            continue
        job = JobTimes(index, "(no backend)" if pd.isna(backend) else str(backend), status, s)
        ran = usage_seconds(duration)
        active = status in ACTIVE
        if pd.notna(r):
            job.waiting = (s, r) if r > s else None
            if active:
                job.running = (r, max(now, r))
            elif ran is not None:
                job.running = (r, r + pd.Timedelta(seconds=ran))
            else:
                job.moment = r
        elif status == "running":
            job.unplaced = (s, max(now, s))
        elif active:
            job.waiting = (s, max(now, s))
        elif ran is not None:
            job.unplaced = (s, s + pd.Timedelta(seconds=ran))
        else:
            job.moment = s
        jobs.append(job)
    return jobs


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit to show a run lasting ``seconds`` in, and its length in seconds."""
    for name, length, below in (("seconds", 1.0, 120.0), ("minutes", 60.0, 7200.0), ("hours", 3600.0, 172800.0)):
        if seconds < below:
            return name, length
    return "days", 86400.0


def _lanes(jobs: list[JobTimes], gap: pd.Timedelta) -> list[int]:
    """Lines for jobs sorted by creation so that no two bars on a line overlap (first fit)."""
    free_from: list[pd.Timestamp] = []
    lanes = []
    for job in jobs:
        lane = next((i for i, t in enumerate(free_from) if t <= job.created), len(free_from))
        if lane == len(free_from):
            free_from.append(job.last + gap)
        else:
            free_from[lane] = job.last + gap
        lanes.append(lane)
    return lanes


def _status_order(statuses: Any) -> list[str]:
    present = set(statuses)
    return [s for s in ALL if s in present] + sorted(present - set(ALL))


def _new_figure(width: int, height: int, layout: str | None = "constrained") -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout=layout)
    FigureCanvasAgg(fig)  # drawn off-screen, whatever pyplot backend the caller uses
    return fig


@dataclass
class Band:
    """One backend's jobs on the timeline, each on a line (``lines``, counted from the band's top)."""

    backend: str
    jobs: list[JobTimes]
    lines: list[int]
    top: float = 0.0


def _bands(jobs: list[JobTimes], *, labelled: bool, gap: pd.Timedelta) -> list[Band]:
    """A band per backend, stacked with an empty line between them: a line per job when ``labelled``,
    otherwise the jobs packed into as few lines as they need."""
    by_backend: dict[str, list[JobTimes]] = {}
    for job in sorted(jobs, key=lambda j: (j.backend, j.created)):
        by_backend.setdefault(job.backend, []).append(job)
    bands, top = [], 0
    for backend, members in by_backend.items():
        lines = list(range(len(members))) if labelled else _lanes(members, gap)
        bands.append(Band(backend, members, lines, top))
        top += max(lines) + 2
    return bands


def _legend_handles(jobs: list[JobTimes], kinds: set[str], statuses: set[str], now: pd.Timestamp) -> list[Any]:
    """A sample of every colour and style on the timeline: statuses (with counts), then what was unknown."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    counts = pd.Series([job.status for job in jobs]).value_counts()
    handles: list[Any] = [
        Patch(color=STATUS_COLORS.get(s, "#000000"), label=f"{s} ({counts[s]})") for s in _status_order(statuses)
    ]
    waiting = sum(1 for job in jobs if job.status in ACTIVE and job.status != "running")
    if "waiting" in kinds:
        label = "waiting: created → first seen running" + (f" ({waiting} still waiting)" if waiting else "")
        handles.append(Patch(color=WAITING_COLOR, label=label))
    if "unplaced" in kinds:
        label = "running start unknown: drawn from creation (for the reported duration)"
        handles.append(Patch(facecolor="white", edgecolor=STYLE_SAMPLE_COLOR, hatch=UNPLACED_HATCH, label=label))
    if "moment" in kinds:
        label = "no duration recorded: a mark at the last known time"
        handles.append(Line2D([], [], marker="D", linestyle="none", color=STYLE_SAMPLE_COLOR, label=label))
    if any(job.status in ACTIVE for job in jobs):
        label = f"now ({now:%H:%M:%S} UTC): active jobs"
        handles.append(Line2D([], [], color=STYLE_SAMPLE_COLOR, linestyle=":", label=label))
    return handles


def timeline_figure(
    df: pd.DataFrame, *, width: int = 1000, height: int = 600, now: pd.Timestamp | None = None
) -> Figure:
    """Jobs over time in one band per backend: waiting, then running in the colour of the job's status.

    The time axis reads in seconds, minutes, hours or days after the first job's creation, as the run's span
    calls for. ``now`` (default: the current time) is where jobs still active end. Above ``BARS_UP_TO`` jobs:
    :func:`counted_timeline_figure`.
    """
    now = _utc(now) if now is not None else pd.Timestamp.now(tz="UTC")
    if "start_time" in df.columns and df["start_time"].notna().sum() > BARS_UP_TO:
        return counted_timeline_figure(df, width=width, height=height, now=now)
    jobs = job_times(df, now)
    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    if not jobs:
        ax.text(0.5, 0.5, "no job has started yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    origin = min(job.created for job in jobs)
    span = max((max(job.last for job in jobs) - origin).total_seconds(), 1.0)
    unit, length = time_unit(span)

    def x(moment: pd.Timestamp) -> float:
        return (moment - origin).total_seconds() / length

    labelled = len(jobs) <= LABELLED_JOBS
    bands = _bands(jobs, labelled=labelled, gap=pd.Timedelta(seconds=span / 100))
    bars: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # (kind, status) -> [(y, left, width)]
    moments: dict[str, list[tuple[float, float]]] = {}  # status -> [(x, y)]
    for band in bands:
        for job, line in zip(band.jobs, band.lines, strict=True):
            y = band.top + line
            for kind, part in (("waiting", job.waiting), ("running", job.running), ("unplaced", job.unplaced)):
                if part is not None:
                    bars.setdefault((kind, job.status), []).append((y, x(part[0]), x(part[1]) - x(part[0])))
            if job.moment is not None:
                moments.setdefault(job.status, []).append((x(job.moment), y))
    for (kind, status), parts in bars.items():
        ys, lefts, widths = zip(*parts, strict=True)
        colour = STATUS_COLORS.get(status, "#000000")
        if kind == "waiting":
            style = {"color": WAITING_COLOR}
        elif kind == "running":
            style = {"color": colour, "edgecolor": colour, "linewidth": 0.5}
        else:
            style = {"facecolor": "white", "edgecolor": colour, "hatch": UNPLACED_HATCH, "linewidth": 0.8}
        ax.barh(ys, widths, left=lefts, height=0.8, gid=kind, **style)
    for status, points in moments.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "D", color=STATUS_COLORS.get(status, "#000000"), markersize=4, gid="moment")
    for band in bands[1:]:
        ax.axhline(band.top - 1, color="0.6", linewidth=0.8, gid="band-separator")
    if any(job.status in ACTIVE for job in jobs):
        ax.axvline(x(now), color=STYLE_SAMPLE_COLOR, linestyle=":", linewidth=1)

    last = bands[-1]
    ax.set_ylim(last.top + max(last.lines) + 0.5, -0.5)
    ax.set_yticks(
        [band.top + max(band.lines) / 2 for band in bands],
        [f"{band.backend}\n{len(band.jobs)} jobs" for band in bands],
        fontsize=9,
        fontweight="bold",
    )
    ax.tick_params(axis="y", which="both", length=0)
    if labelled:  # rows on the inside, their backend's name outside them
        ax.yaxis.remove_overlapping_locs = False
        ys = [band.top + line for band in bands for line in band.lines]
        ax.set_yticks(ys, [f"row {job.row}" for band in bands for job in band.jobs], minor=True, fontsize=7)
        renderer = fig.canvas.get_renderer()
        widest = max(t.get_window_extent(renderer).width for t in ax.get_yticklabels(minor=True))
        ax.tick_params(axis="y", which="major", pad=widest * 72 / fig.dpi + 8)
    else:
        ax.set_ylabel("one bar per job, packed into lines")
    ax.set_xlim(-span / length / 100, span / length * 1.02)
    ax.set_xlabel(f"{unit} since the first job was created ({origin:%Y-%m-%d %H:%M:%S} UTC)")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    title = f"Jobs per backend over time: {len(jobs)} jobs"
    if len(df) > len(jobs):
        title += f" ({len(df) - len(jobs)} rows not started)"
    ax.set_title(title)
    kinds = {kind for kind, _ in bars} | ({"moment"} if moments else set())
    statuses = {status for kind, status in bars if kind != "waiting"} | set(moments)
    handles = _legend_handles(jobs, kinds, statuses, now)
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def _spans(df: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """Each started row's waiting and running span (nanoseconds since the epoch; NaN where it has none), as
    :func:`job_times` reads them, for all rows at once."""
    import numpy as np

    started = df[_timestamps(df, "start_time").notna()]
    created = _timestamps(started, "start_time").astype("int64").to_numpy().astype(float)
    seen = _timestamps(started, "running_start_time")
    running = np.where(seen.notna(), seen.astype("int64").to_numpy(), np.nan).astype(float)
    durations = started["duration"] if "duration" in started.columns else pd.Series(None, index=started.index)
    ran = durations.map(usage_seconds).astype(float).to_numpy() * 1e9
    status = started["status"].astype(str).to_numpy()
    active = np.isin(status, list(ACTIVE))
    now_ns = float(now.value)
    known_start = ~np.isnan(running)
    # running from when first seen running, else (seen ended, or running now) from creation
    run_from = np.where(known_start, running, np.where(active & (status != "running"), np.nan, created))
    run_to = np.where(active, now_ns, run_from + ran)
    wait_to = np.where(known_start, running, np.where(active & (status != "running"), now_ns, np.nan))
    return pd.DataFrame(
        {
            "backend": started["backend_name"].fillna("(no backend)").astype(str).to_numpy()
            if "backend_name" in started.columns
            else "(no backend)",
            "status": status,
            "created": created,
            "wait_to": np.where(wait_to > created, wait_to, np.nan),
            "run_from": run_from,
            "run_to": run_to,
        },
        index=started.index,
    )


def _covering(starts: Any, ends: Any, moments: Any) -> Any:
    """How many of the spans [start, end) cover each moment."""
    import numpy as np

    keep = ~(np.isnan(starts) | np.isnan(ends))
    starts, ends = np.sort(starts[keep]), np.sort(ends[keep])
    return np.searchsorted(starts, moments, side="right") - np.searchsorted(ends, moments, side="right")


def counted_timeline_figure(
    df: pd.DataFrame, *, width: int = 1000, height: int = 600, now: pd.Timestamp | None = None
) -> Figure:
    """Jobs over time for campaigns: a panel per backend with how many of its jobs were waiting and how
    many running at each moment, the running ones stacked by the status they ended in (or are in), so a
    backend's busy slots, its queue and its failures read at a glance at any number of jobs."""
    import numpy as np

    now = _utc(now) if now is not None else pd.Timestamp.now(tz="UTC")
    spans = _spans(df, now)
    origin = spans["created"].min()
    last = np.nanmax(spans[["created", "wait_to", "run_to"]].to_numpy())
    span = max((last - origin) / 1e9, 1.0)
    unit, length = time_unit(span)
    moments = np.linspace(origin, origin + span * 1e9, COUNT_SAMPLES)
    xs = (moments - origin) / 1e9 / length
    backends = sorted(spans["backend"].unique())
    fig = _new_figure(width, height)
    axes = fig.subplots(len(backends), 1, sharex=True, squeeze=False)[:, 0]
    statuses = _status_order(spans["status"])
    for ax, backend in zip(axes, backends, strict=True):
        mine = spans[spans["backend"] == backend]
        layers = [
            ("waiting", WAITING_COLOR, _covering(mine["created"].to_numpy(), mine["wait_to"].to_numpy(), moments))
        ]
        for status in statuses:
            of = mine[mine["status"] == status]
            if not of.empty:
                counts = _covering(of["run_from"].to_numpy(), of["run_to"].to_numpy(), moments)
                layers.append((status, STATUS_COLORS.get(status, "#000000"), counts))
        layers = [layer for layer in layers if layer[2].any()]
        if layers:
            ax.stackplot(xs, *[c for _, _, c in layers], colors=[c for _, c, _ in layers], step="post", gid="counts")
        ax.set_ylabel(f"{backend}\n{len(mine)} jobs", fontsize=9, fontweight="bold")
        ax.grid(axis="both", color="0.9")
        ax.set_axisbelow(True)
        ax.set_ylim(bottom=0)
        if (mine["status"].isin(list(ACTIVE))).any():
            ax.axvline((now.value - origin) / 1e9 / length, color=STYLE_SAMPLE_COLOR, linestyle=":", linewidth=1)
    axes[-1].set_xlim(0, span / length)
    axes[-1].set_xlabel(
        f"{unit} since the first job was created ({pd.Timestamp(int(origin), tz='UTC'):%Y-%m-%d %H:%M:%S} UTC)"
    )
    title = f"Jobs per backend over time: {len(spans)} jobs waiting, and running by their status"
    if len(df) > len(spans):
        title += f" ({len(df) - len(spans)} rows not started)"
    axes[0].set_title(title)
    from matplotlib.patches import Patch

    counts = spans["status"].value_counts()
    handles = [Patch(color=WAITING_COLOR, label="waiting: created → first seen running")]
    handles += [Patch(color=STATUS_COLORS.get(s, "#000000"), label=f"{s} ({counts[s]})") for s in statuses]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def plot_timeline(
    df: pd.DataFrame, path: str | Path, *, width: int = 1000, height: int = 600, now: pd.Timestamp | None = None
) -> Path:
    """A PNG timeline of jobs per backend (see :func:`timeline_figure`)."""
    return _save(timeline_figure(df, width=width, height=height, now=now), path)


def _degrees(positive: str, negative: str) -> Callable[[float, Any], str]:
    def label(value: float, _position: Any = None) -> str:
        hemisphere = positive if value > 0 else negative if value < 0 else ""
        return f"{round(abs(value), 6):g}°{hemisphere}"

    return label


def _in_degrees(tiles: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, bool]:
    """The tiles in EPSG:4326 when their CRS says how; whether their coordinates are lon/lat degrees."""
    if tiles.crs is not None:
        return (tiles if tiles.crs.to_epsg() == 4326 else tiles.to_crs("EPSG:4326")), True
    west, south, east, north = tiles.total_bounds
    return tiles, -180 <= west <= east <= 180 and -90 <= south <= north <= 90


#: Up to this many tiles the map draws their edges and the outline of the area they cover; above, the
#: tiles' fill alone shows the area (an outline of 40,000 tiles costs seconds and shows nothing more).
OUTLINED_TILES = 5_000


def _tile_collection(geometry: gpd.GeoSeries, colour: str, *, edges: bool) -> Any:
    """The tiles' outer rings as one collection: drawn at once (geopandas makes a path per tile, which
    costs seconds at 40,000 tiles); tiles have no holes worth drawing."""
    import numpy as np
    import shapely
    from matplotlib.collections import PolyCollection

    rings = shapely.get_exterior_ring(shapely.get_parts(geometry.to_numpy()))
    coordinates, owner = shapely.get_coordinates(rings, return_index=True)
    polygons = np.split(coordinates, np.flatnonzero(np.diff(owner)) + 1) if len(coordinates) else []
    style = {"edgecolor": "white", "linewidth": 0.5} if edges else {"edgecolor": "face", "linewidth": 0.0}
    return PolyCollection(polygons, facecolor=colour, gid="tiles", **style)


def _outline(ax: Axes, tiles: gpd.GeoDataFrame) -> Any:
    """Draw the outline of the area the tiles cover; returns a line for the legend."""
    import shapely

    lines = []
    for part in shapely.get_parts(tiles.geometry.union_all().boundary):
        xs, ys = part.xy
        lines += ax.plot(xs, ys, color="black", linewidth=1.2, gid="area-outline")
    return lines[0] if lines else None


#: Room (pixels) around the map for the title, tick labels, axis labels and a legend on the right.
MAP_MARGINS = {"left": 85, "right": 15, "top": 35, "bottom": 50, "legend": 250}


def _fit(width: float, height: float, ratio: float) -> tuple[float, float]:
    """The largest box of display ``ratio`` (width / height) in ``width`` x ``height``."""
    return (height * ratio, height) if width / height > ratio else (width, width / ratio)


def _map_axes(fig: Figure, ratio: float, entries: int) -> tuple[Axes, dict[str, Any]]:
    """An axes of display ``ratio``, as large as fits with its legend (on the right or below, whichever leaves
    the larger map), centred; and where to put the legend."""
    width, height = fig.get_size_inches() * fig.dpi
    m = MAP_MARGINS
    free_w, free_h = width - m["left"] - m["right"], height - m["top"] - m["bottom"]
    below_h = 22 * math.ceil(entries / min(4, entries)) + 5
    right = math.prod(_fit(free_w - m["legend"], free_h, ratio)) >= math.prod(_fit(free_w, free_h - below_h, ratio))
    legend_w, legend_h = (m["legend"], 0) if right else (0, below_h)
    map_w, map_h = _fit(free_w - legend_w, free_h - legend_h, ratio)
    left = (width - m["left"] - map_w - legend_w - m["right"]) / 2 + m["left"]
    bottom = (height - m["top"] - map_h - legend_h - m["bottom"]) / 2 + m["bottom"] + legend_h
    ax = fig.add_axes((left / width, bottom / height, map_w / width, map_h / height))
    if right:
        return ax, {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "ncol": 1}
    return ax, {"loc": "upper center", "bbox_to_anchor": (0.5, -(m["bottom"] - 8) / map_h), "ncol": min(4, entries)}


#: Up to this many tiles each is labelled with its row (its index in the job database); above, the failed ones.
LABELLED_TILES = 100


def _label_tiles(ax: Axes, tiles: pd.DataFrame, statuses: pd.Series) -> None:
    """Each tile's row at its centre, so a red tile can be found in the job database and the failure table:
    every tile up to ``LABELLED_TILES``, else the first ``LABELLED_TILES`` failed ones."""
    labelled = tiles if len(tiles) <= LABELLED_TILES else tiles[statuses.isin(FAILED_STATUSES)].head(LABELLED_TILES)
    for index, point in labelled.geometry.representative_point().items():
        ax.annotate(str(index), (point.x, point.y), ha="center", va="center", fontsize=7, color="#252525")


def map_figure(df: pd.DataFrame, *, width: int = 1000, height: int = 800) -> Figure:
    """The tiles coloured by status on lon/lat axes, the outline of the area they cover (up to
    ``OUTLINED_TILES``), and a legend."""
    import geopandas as gpd
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not isinstance(df, gpd.GeoDataFrame) or df.geometry.isna().all():
        raise ValueError("The job database has no geometry to draw a map of (create it with `prefect-openeo init`)")
    tiles, degrees = _in_degrees(df[df.geometry.notna() & ~df.geometry.is_empty])
    west, south, east, north = tiles.total_bounds
    margin = max(east - west, north - south) * 0.04 or 0.01
    # a degree of longitude is shorter than one of latitude, by the cosine of the latitude
    aspect = 1 / math.cos(math.radians(max(-89.0, min(89.0, (south + north) / 2)))) if degrees else 1.0
    statuses = tiles["status"].astype(str)
    present = _status_order(statuses)

    fig = _new_figure(width, height, layout=None)
    ratio = (east - west + 2 * margin) / ((north - south + 2 * margin) * aspect)
    ax, legend_placement = _map_axes(fig, ratio, len(present) + 1)
    handles: list[Any] = []
    for status in present:
        colour = STATUS_COLORS.get(status, "#000000")
        mine = tiles.geometry[(statuses == status).to_numpy()]
        ax.add_collection(_tile_collection(mine, colour, edges=len(tiles) <= OUTLINED_TILES))
        handles.append(Patch(color=colour, label=f"{status} ({len(mine)})"))
    if len(tiles) <= OUTLINED_TILES and _outline(ax, tiles) is not None:
        handles.append(Line2D([], [], color="black", linewidth=1.2, label="area covered (union of the tiles)"))
    _label_tiles(ax, tiles, statuses)
    ax.set_xlim(west - margin, east + margin)
    ax.set_ylim(south - margin, north + margin)
    ax.set_aspect(aspect)
    position = ax.get_position()  # about a tick per 80 pixels
    ax.xaxis.set_major_locator(MaxNLocator(max(4, int(position.width * width / 80)), steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_locator(MaxNLocator(max(4, int(position.height * height / 80)), steps=[1, 2, 2.5, 5, 10]))
    if degrees:
        ax.xaxis.set_major_formatter(FuncFormatter(_degrees("E", "W")))
        ax.yaxis.set_major_formatter(FuncFormatter(_degrees("N", "S")))
    ax.set_xlabel("longitude" if degrees else "x")
    ax.set_ylabel("latitude" if degrees else "y")
    ax.tick_params(labelsize=8)
    ax.grid(color="0.85", linewidth=0.5)
    ax.set_axisbelow(True)
    title = f"{len(tiles)} tiles by status"
    if len(df) > len(tiles):
        title += f" ({len(df) - len(tiles)} rows without geometry not drawn)"
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=9, frameon=False, **legend_placement)
    return fig


def plot_map(df: pd.DataFrame, path: str | Path, *, width: int = 1000, height: int = 800) -> Path:
    """A PNG map of the tiles by status (see :func:`map_figure`)."""
    return _save(map_figure(df, width=width, height=height), path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path

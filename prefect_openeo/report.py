"""What a job database says: counts, usage and costs, problems, and pictures (map and timeline)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from prefect_openeo.states import ACTIVE, ALL

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


def summary(df: pd.DataFrame) -> dict[str, Any]:
    """Counts by status and backend, running times, usage and costs totals, rows with problems."""
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
        "problems": problems,
    }


def plot_map(df: pd.DataFrame, path: str | Path, *, width: int = 1000, height: int = 800) -> Path:
    """A PNG map of the tiles coloured by status, with a legend."""
    import geopandas as gpd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(df, gpd.GeoDataFrame) or df.geometry.isna().all():
        raise ValueError("The job database has no geometry to draw a map of (create it with `prefect-openeo init`)")
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    present = [s for s in ALL if (df["status"] == s).any()]
    for status in present:
        df[df["status"] == status].plot(ax=ax, color=STATUS_COLORS[status], edgecolor="white", linewidth=0.5)
    ax.legend(
        handles=[Patch(color=STATUS_COLORS[s], label=f"{s} ({int((df['status'] == s).sum())})") for s in present],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        frameon=False,
    )
    ax.set_title(f"{len(df)} tiles by status")
    ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=0.78, top=0.93, bottom=0.02)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(df: pd.DataFrame, path: str | Path, *, width: int = 1000, height: int = 600) -> Path:
    """A PNG timeline: one bar per job from start to running to now/end, grouped by backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = df[df.get("start_time").notna()] if "start_time" in df.columns else df.iloc[0:0]
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    if rows.empty:
        ax.text(0.5, 0.5, "no job has started yet", ha="center", va="center")
        ax.set_axis_off()
    else:
        start = pd.to_datetime(rows["start_time"], utc=True, errors="coerce")
        running = pd.to_datetime(rows.get("running_start_time"), utc=True, errors="coerce")
        origin = start.min()
        end = pd.Timestamp.now(tz="UTC")
        seconds = lambda t: (t - origin).total_seconds()  # noqa: E731
        order = rows.assign(_start=start).sort_values(["backend_name", "_start"])
        labels = []
        for y, (index, row) in enumerate(order.iterrows()):
            s = start[index]
            r = running[index] if pd.notna(running[index]) else None
            colour = STATUS_COLORS.get(row["status"], "#000000")
            ran = usage_number(row.get("duration"))  # usage "123 seconds", known once a job ended
            stop = end if row["status"] in ACTIVE else (r + pd.Timedelta(seconds=ran or 1) if r is not None else s)
            ax.barh(y, max(0.5, seconds(r or stop) - seconds(s)), left=seconds(s), color="#c6dbef", height=0.8)
            if r is not None:
                ax.barh(y, max(0.5, seconds(stop) - seconds(r)), left=seconds(r), color=colour, height=0.8)
            labels.append(f"{row['backend_name']} · {index}")
        if len(labels) <= 40:
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("seconds since the first start")
        present = sorted(set(order["status"]))
        ax.legend(handles=[Patch(color=STATUS_COLORS[s], label=s) for s in present], loc="lower right", fontsize=8)
        ax.set_title("Jobs per backend over time")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

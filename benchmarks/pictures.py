"""The pictures artifact (map of tiles by status and timeline) at campaign sizes: wall, CPU, peak memory.

Synthetic job databases of square tiles in waves of 200 jobs on 2 backends (1 s waiting, 2 s running),
2% in error, each size drawn in a fresh process so its peak RSS is its own. Usage:
    python benchmarks/pictures.py [--rows 10000,20000,40000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time


def campaign(n: int):
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely

    side = int(np.ceil(np.sqrt(n)))
    i = np.arange(n)
    x, y = 5 + (i % side) * 0.01, 50 + (i // side) * 0.01
    created = pd.Timestamp("2026-12-01T00:00:00Z") + pd.to_timedelta(i // 200 * 3, unit="s")
    return gpd.GeoDataFrame(
        {
            "status": np.where(np.random.default_rng(1).random(n) < 0.02, "error", "finished"),
            "backend_name": np.where(i % 2, "b0", "b1"),
            "start_time": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "running_start_time": (created + pd.Timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "duration": "2 seconds",
        },
        geometry=shapely.box(x, y, x + 0.01, y + 0.01),
        crs="EPSG:4326",
    )


def measure(n: int, queue) -> None:
    from prefect_openeo.observe import pictures_markdown

    df = campaign(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        markdown = pictures_markdown(df, folder)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put((wall, cpu, grown, len(markdown) / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,20000,40000")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print("| rows | wall (s) | CPU (s) | peak RSS added (MB) | artifact (KiB) |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(v) for v in args.rows.split(",")):
        queue = ctx.Queue()
        child = ctx.Process(target=measure, args=(n, queue))
        child.start()
        wall, cpu, grown, size = queue.get()
        child.join()
        print(f"| {n:,} | {wall:.2f} | {cpu:.2f} | {grown:.0f} | {size:.0f} |")


if __name__ == "__main__":
    main()

"""Simulated backends in a child process, so the managers' CPU time is measured alone."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict
from typing import Any


def _serve(conn, n: int, config_kwargs: dict) -> None:
    from prefect_openeo.simulator import SimulatorConfig, simulated_backends

    with simulated_backends(n, SimulatorConfig(**config_kwargs)) as sims:
        conn.send([s.url for s in sims])
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                conn.send(None)
                return
            if cmd == "counts":
                conn.send([s.request_counts() for s in sims])
            elif cmd == "created":
                conn.send([s.created_count() for s in sims])
            elif cmd == "jobs":
                conn.send([s.jobs() for s in sims])
            elif cmd == "reset":
                for s in sims:
                    s.reset()
                conn.send(None)
            elif cmd == "set_one":
                index, values = arg
                for key, value in values.items():
                    setattr(sims[index].config, key, value)
                conn.send(None)
            elif cmd == "set":
                for s in sims:
                    for key, value in arg.items():
                        setattr(s.config, key, value)
                conn.send(None)


class SimulatorProcess:
    """``with SimulatorProcess(2, run_duration=5) as sims: sims.urls, sims.counts(), sims.reset()``."""

    def __init__(self, n: int = 2, **config_kwargs: Any):
        self.n, self.config_kwargs = n, config_kwargs

    def __enter__(self) -> SimulatorProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.n, self.config_kwargs), daemon=True)
        self._proc.start()
        self.urls: list[str] = self._conn.recv()
        return self

    def _call(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def counts(self) -> list[dict[str, int]]:
        return self._call("counts")

    def created(self) -> list[int]:
        return self._call("created")

    def jobs(self) -> list[list[dict]]:
        return self._call("jobs")

    def reset(self) -> None:
        self._call("reset")

    def set(self, **config: Any) -> None:
        self._call("set", config)

    def set_one(self, index: int, **config: Any) -> None:
        """Change one backend's config (e.g. a slower one)."""
        self._call("set_one", (index, config))

    def __exit__(self, *exc: Any) -> None:
        try:
            self._call("stop")
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()


__all__ = ["SimulatorProcess", "asdict"]

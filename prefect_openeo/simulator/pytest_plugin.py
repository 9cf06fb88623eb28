"""pytest fixtures for the openEO backend simulator (entry point ``prefect_openeo_simulator``).

``openeo_simulator``: a started simulator with fast timings (queue 0.2 s, run 0.3 s), shared per session
and reset (jobs, counters and config) around every test.
``openeo_simulator_factory``: ``factory(name=None, **config_kwargs) -> BackendSimulator``, started, stopped at
teardown; fast timings unless ``queue_duration``/``run_duration`` are given.

Heavy imports (uvicorn, starlette) happen only when a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import SimulatorConfig
    from .server import BackendSimulator

FAST_TIMINGS: dict[str, float] = {"queue_duration": 0.2, "run_duration": 0.3}


def _fast_config(**overrides: Any) -> SimulatorConfig:
    from .config import SimulatorConfig

    return SimulatorConfig(**{**FAST_TIMINGS, **overrides})


@pytest.fixture(scope="session")
def _openeo_simulator_session() -> Iterator[BackendSimulator]:
    from .server import BackendSimulator

    sim = BackendSimulator(_fast_config(), name="sim")
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def openeo_simulator(_openeo_simulator_session: BackendSimulator) -> Iterator[BackendSimulator]:
    """A started simulator with fast timings and no jobs; its config may be changed freely by the test."""
    sim = _openeo_simulator_session
    sim.config = _fast_config()
    sim.reset()
    if not sim.running:
        sim.start()
    yield sim
    sim.config = _fast_config()
    sim.reset()


@pytest.fixture
def openeo_simulator_factory() -> Iterator[Callable[..., BackendSimulator]]:
    """Start extra simulators: ``factory(name=None, **config_kwargs)``; all stopped at teardown."""
    from .server import BackendSimulator, backend_name

    started: list[BackendSimulator] = []

    def factory(name: str | None = None, **config_kwargs: Any) -> BackendSimulator:
        sim = BackendSimulator(_fast_config(**config_kwargs), name=name or backend_name(len(started)))
        started.append(sim.start())
        return sim

    yield factory
    for sim in started:
        sim.stop()

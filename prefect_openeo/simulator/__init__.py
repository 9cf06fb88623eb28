"""An openEO API 1.2 backend simulator: a real HTTP server on 127.0.0.1 for tests, demos and benchmarks.

>>> from prefect_openeo.simulator import BackendSimulator, SimulatorConfig
>>> with BackendSimulator(SimulatorConfig(queue_duration=0.1, run_duration=0.2)) as sim:
...     connection = openeo.connect(sim.url)
"""

from .config import SimulatorConfig
from .faults import Fault
from .server import BackendSimulator, serve, simulated_backends

__all__ = ["BackendSimulator", "Fault", "SimulatorConfig", "serve", "simulated_backends"]

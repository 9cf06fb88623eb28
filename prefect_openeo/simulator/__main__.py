"""``python -m prefect_openeo.simulator --port 8000``: serve a simulated openEO backend until Ctrl-C."""

from __future__ import annotations

import argparse

from .config import SimulatorConfig
from .server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefect_openeo.simulator", description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: pick a free one)")
    parser.add_argument("--queue-duration", type=float, default=SimulatorConfig.queue_duration)
    parser.add_argument("--run-duration", type=float, default=SimulatorConfig.run_duration)
    parser.add_argument("--jitter", type=float, default=SimulatorConfig.jitter)
    parser.add_argument("--capacity", type=int, default=SimulatorConfig.capacity)
    parser.add_argument("--failure-rate", type=float, default=SimulatorConfig.failure_rate)
    parser.add_argument("--rate-429", type=float, default=SimulatorConfig.rate_429)
    parser.add_argument("--seed", type=int, default=SimulatorConfig.seed)
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        queue_duration=args.queue_duration,
        run_duration=args.run_duration,
        jitter=args.jitter,
        capacity=args.capacity,
        failure_rate=args.failure_rate,
        rate_429=args.rate_429,
        seed=args.seed,
    )
    serve(args.port, config)


if __name__ == "__main__":
    main()

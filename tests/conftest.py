"""Load the simulator fixtures also when the package (and its pytest11 entry point) is not installed."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A plain `pytest_plugins = [...]` would clash ("Plugin already registered under a different name")
    # with the `prefect_openeo_simulator` entry point when the package is installed.
    from prefect_openeo.simulator import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "prefect_openeo_simulator")

"""Run openeo's own job-management tests on prefect-openeo's classes: the drop-in's contract.

openeo's tests are not shipped with prefect-openeo; point this at a checkout of openeo-python-client (a work
tree or a bare git directory) at the version in use::

    python tools/openeo_contract.py ~/src/openeo-python-client [-- PYTEST ARGS]

It copies the checkout's ``tests/`` to a temporary folder and runs ``tests/extra/job_management`` there with
a plugin that puts prefect-openeo's classes where the tests import openeo's: ``MultiBackendJobManager`` (both
its public and its ``_manager`` name), the CSV/Parquet job databases, ``create_job_db`` and ``get_job_db``.
The exit code is pytest's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: The plugin, written beside the copied tests: it runs before any test module imports openeo's classes.
PLUGIN = """
import openeo.extra.job_management as public
import openeo.extra.job_management._job_db as job_db
import openeo.extra.job_management._manager as manager

import prefect_openeo
from prefect_openeo import jobdb

for module in (public, manager):
    module.MultiBackendJobManager = prefect_openeo.MultiBackendJobManager
for module in (public, job_db, manager):
    for name, ours in (
        ("CsvJobDatabase", jobdb.AtomicCsvJobDatabase),
        ("ParquetJobDatabase", jobdb.AtomicParquetJobDatabase),
        ("create_job_db", jobdb.create_job_db),
        ("get_job_db", jobdb.get_job_db),
    ):
        if hasattr(module, name):
            setattr(module, name, ours)
"""

SUITES = ("test_manager.py", "test_stac_job_db.py", "test_job_db.py")


def copy_tests(source: Path, into: Path) -> Path:
    """openeo's ``tests/`` from a work tree or a (bare) git directory, copied to ``into``."""
    if (source / "tests" / "extra" / "job_management").is_dir():
        shutil.copytree(source / "tests", into / "tests")
        return into
    git_dir = source / ".git" if (source / ".git").is_dir() else source
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", "HEAD", "tests"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="openeo-python-client: a work tree or a git directory")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    parser.add_argument(
        "--openeo-classes", action="store_true", help="run on openeo's own classes instead (the baseline)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="openeo-contract-") as tmp:
        root = copy_tests(args.checkout.expanduser(), Path(tmp))
        (root / "prefect_openeo_contract.py").write_text(PLUGIN)
        suites = [f"tests/extra/job_management/{name}" for name in SUITES]
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
        if not args.openeo_classes:
            command += ["-p", "prefect_openeo_contract"]
        command += ["-o", "timeout=120", *suites, *args.pytest_args]
        return subprocess.run(command, cwd=root, env={**_env(), "PYTHONPATH": str(root)}).returncode


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    raise SystemExit(main())

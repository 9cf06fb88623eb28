"""Bearer tokens of OIDC connections are refreshed as upstream does: before starts and downloads, at most
once a minute per connection (openeo's test tooling: DummyBackend and OidcMock over requests_mock)."""

from __future__ import annotations

import datetime
from unittest import mock

import pandas as pd
import pytest
from openeo.rest._testing import DummyBackend
from openeo.rest.auth.testing import OidcMock

from prefect_openeo import MultiBackendJobManager

pytestmark = pytest.mark.timeout(60)


def create_job(row, connection, **kwargs):
    pg = {"n": {"process_id": "add", "arguments": {"x": int(row["x"]), "y": 1}, "result": True}}
    return connection.create_job(pg)


@pytest.mark.parametrize("seconds_per_sleep", [5, 45])
def test_oidc_token_refreshed_at_most_once_a_minute(requests_mock, tmp_path, time_machine, seconds_per_sleep):
    time_machine.move_to(datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc))
    backend = DummyBackend.at_url("https://oeo.test", requests_mock=requests_mock)
    backend.setup_simple_job_status_flow(queued=2, running=3)
    backend.setup_credentials_oidc(issuer="https://oidc.test", id="oi")
    oidc = OidcMock(
        requests_mock,
        oidc_issuer="https://oidc.test",
        expected_grant_type="client_credentials",
        expected_client_id="myclient",
        expected_fields={"client_secret": "s3cr3t", "scope": "openid"},
    )
    connection = backend.connection
    connection.authenticate_oidc_client_credentials(client_id="myclient", client_secret="s3cr3t")
    assert len(oidc.grant_request_history) == 1

    manager = MultiBackendJobManager(poll_sleep=60, root_dir=tmp_path)
    manager.add_backend("oeo", connection=connection, parallel_jobs=4)
    slept = []

    def fake_sleep(seconds):
        slept.append(seconds_per_sleep)
        time_machine.shift(seconds_per_sleep)

    with mock.patch("time.sleep", new=fake_sleep):
        stats = manager.run_jobs(df=pd.DataFrame({"x": [1, 2, 3]}), job_db=tmp_path / "jobs.csv", start_job=create_job)

    assert stats["job finished"] == 3
    refreshes = len(oidc.grant_request_history) - 1
    elapsed = sum(slept)
    assert refreshes >= 1  # before starting the jobs
    assert refreshes <= elapsed // 60 + 1, (refreshes, elapsed)
    if seconds_per_sleep == 45:
        assert refreshes >= 2  # the run lasted long enough to need a fresh token again for the downloads

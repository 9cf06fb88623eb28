"""Prefect blocks for openEO backends and their credentials.

Register them with ``prefect block register -m prefect_openeo``, save one per backend (in the UI or in
code), and give flows block names instead of live connections::

    OpenEOBackend(url="https://openeo.dataspace.copernicus.eu", auth="oidc_client_credentials",
                  client_id="...", client_secret="...").save("cdse")
    run_openeo_jobs(job_db="jobs.parquet", backends={"cdse": "block:cdse"}, start_job="pkg.jobs:start_job")
"""

from __future__ import annotations

from typing import Literal

import openeo
from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class OpenEOBackend(Block):
    """An openEO backend: its URL and how to authenticate (secrets are stored encrypted).

    Example:
        Load a saved block and connect to its backend:
        ```python
        from prefect_openeo import OpenEOBackend

        backend = OpenEOBackend.load("BLOCK_NAME")
        connection = backend.get_connection()
        ```
    """

    _block_type_name = "openEO Backend"
    _block_type_slug = "openeo-backend"
    _logo_url = "https://openeo.org/images/openeo_logo.png"  # type: ignore[assignment]
    _description = "An openEO backend URL with its credentials (basic, OIDC client credentials, or bearer token)."
    _documentation_url = "https://open-eo.github.io/openeo-python-client/auth.html"  # type: ignore[assignment]

    url: str = Field(description="Root URL of the openEO API.")
    auth: Literal["none", "basic", "oidc", "oidc_client_credentials", "bearer"] = Field(
        default="none",
        description="none; basic (username/password); oidc (the client's default flows, e.g. a refresh token "
        "on this machine); oidc_client_credentials (client_id/client_secret); bearer (a ready token).",
    )
    username: str | None = Field(default=None, description="For basic auth.")
    password: SecretStr | None = Field(default=None, description="For basic auth.")
    client_id: str | None = Field(default=None, description="For OIDC client credentials.")
    client_secret: SecretStr | None = Field(default=None, description="For OIDC client credentials.")
    provider_id: str | None = Field(default=None, description="OIDC provider id (default: the backend's first).")
    token: SecretStr | None = Field(default=None, description="For bearer auth, e.g. 'basic//abc' or 'oidc/egi/xyz'.")
    parallel_jobs: int = Field(default=2, ge=0, description="Jobs active at once on this backend.")

    def get_connection(self) -> openeo.Connection:
        """A new authenticated connection to the backend."""
        connection = openeo.connect(self.url)
        if self.auth == "basic":
            if not self.username or self.password is None:
                raise ValueError(f"openEO backend block for {self.url}: basic auth needs username and password")
            connection.authenticate_basic(self.username, self.password.get_secret_value())
        elif self.auth == "oidc":
            connection.authenticate_oidc(provider_id=self.provider_id)
        elif self.auth == "oidc_client_credentials":
            if not self.client_id or self.client_secret is None:
                raise ValueError(f"openEO backend block for {self.url}: client credentials need id and secret")
            connection.authenticate_oidc_client_credentials(
                client_id=self.client_id,
                client_secret=self.client_secret.get_secret_value(),
                provider_id=self.provider_id,
            )
        elif self.auth == "bearer":
            if self.token is None:
                raise ValueError(f"openEO backend block for {self.url}: bearer auth needs a token")
            connection.authenticate_bearer_token(self.token.get_secret_value())
        return connection

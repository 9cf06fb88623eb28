"""What the deployable flows take as plain data, and how it becomes live objects.

A backend is ``"block:NAME"`` (an ``OpenEOBackend`` block), a URL (no authentication), or a ``BackendSpec``
whose secrets are named, never given: ``{"secret": "NAME"}`` (a Prefect ``Secret`` block) or ``{"env": "VAR"}``
(an environment variable of the process that runs the flow). Flow-run parameters are stored in Prefect's
database and shown on the run's Parameters tab, so a plain password, client secret or token is refused, and
live objects (connections, callbacks, job databases) are stored as a short description, never field by field.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import openeo
from openeo import Connection
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

if TYPE_CHECKING:
    from prefect_openeo.blocks import OpenEOBackend

BLOCK_PREFIX = "block:"

#: Fields of a backend spec that hold a secret: they take a ``SecretRef``, never the value itself.
SECRET_FIELDS = ("password", "client_secret", "token")


class PlainSecretError(ValueError):
    """A secret given as a plain value in a flow parameter."""


class FromSecretBlock(BaseModel):
    """A secret read from a Prefect ``Secret`` block when the flow runs."""

    model_config = ConfigDict(extra="forbid", title="From a Prefect Secret block")
    secret: str = Field(description="Name of the Prefect Secret block that holds the value.")


class FromEnv(BaseModel):
    """A secret read from an environment variable of the process that runs the flow (e.g. the worker's)."""

    model_config = ConfigDict(extra="forbid", title="From an environment variable")
    env: str = Field(description="Name of the environment variable that holds the value.")


SecretRef = FromSecretBlock | FromEnv


class BackendSpec(BaseModel):
    """An openEO backend given inline; its secrets are named (Secret block or environment), never given."""

    model_config = ConfigDict(extra="forbid", title="openEO backend")
    url: str = Field(description="Root URL of the openEO API.")
    auth: Literal["none", "basic", "oidc", "oidc_client_credentials", "bearer"] | None = Field(
        default=None,
        description="How to authenticate; by default basic when a username is given, else none. oidc uses the "
        "openeo client's own flows (a refresh token on the machine, or OPENEO_AUTH_* environment variables).",
    )
    username: str | None = Field(default=None, description="For basic auth.")
    password: SecretRef | None = Field(default=None, description="For basic auth: where to read the password.")
    client_id: str | None = Field(default=None, description="For OIDC client credentials.")
    client_secret: SecretRef | None = Field(
        default=None, description="For OIDC client credentials: where to read the client secret."
    )
    provider_id: str | None = Field(default=None, description="OIDC provider id (default: the backend's first).")
    token: SecretRef | None = Field(default=None, description="For bearer auth: where to read the token.")

    @model_validator(mode="after")
    def _default_auth(self) -> BackendSpec:
        if self.auth is None:
            self.auth = "basic" if self.username else "none"
        return self


class JobCreatorSpec(BaseModel):
    """openeo's ``ProcessBasedJobCreator``: one job per row from a parameterized process (a UDP)."""

    model_config = ConfigDict(extra="forbid", title="Process-based job creator")
    process_id: str | None = Field(default=None, description="Id of the process; with namespace, of the UDP.")
    namespace: str | None = Field(default=None, description="Namespace or URL of the process definition.")
    parameter_defaults: dict[str, Any] | None = Field(
        default=None, description="Values of process parameters that no row column gives."
    )
    parameter_column_map: dict[str, str] | None = Field(
        default=None, description="Process parameter name -> job database column, where they differ."
    )

    @model_validator(mode="after")
    def _names_a_process(self) -> JobCreatorSpec:
        if not (self.process_id or self.namespace):
            raise ValueError("A ProcessBasedJobCreator spec needs process_id and/or namespace")
        return self


def _where(name: str) -> str:
    return f"backends[{name!r}]"


def refuse_plain_secrets(parameters: Mapping[str, Any]) -> None:
    """Raise ``PlainSecretError`` when ``backends``, ``job_db`` or ``root_dir`` in ``parameters`` hold a secret in
    plain text."""
    backends = parameters.get("backends")
    if isinstance(backends, Mapping):
        for name, spec in backends.items():
            if not isinstance(spec, Mapping):
                continue
            for key in SECRET_FIELDS:
                value = spec.get(key)
                if value is None or isinstance(value, (Mapping, FromSecretBlock, FromEnv)):
                    continue
                raise PlainSecretError(
                    f"{_where(name)}[{key!r}] is a plain {key}: flow parameters are stored in Prefect's database "
                    f"and shown on the run's Parameters tab. Use an OpenEOBackend block instead "
                    f"(backends={{{name!r}: 'block:NAME'}}, its secrets stored encrypted), or name where to read "
                    f"it: {key!r}: {{'secret': 'NAME'}} (a Prefect Secret block) or {key!r}: {{'env': 'VAR'}} "
                    f"(an environment variable of the process that runs the flow)."
                )
    job_db = parameters.get("job_db")
    if isinstance(job_db, str) and "://" in job_db and urlsplit(job_db).password:
        raise PlainSecretError(
            "job_db is a database URL with a password in it: flow parameters are stored in Prefect's database "
            "and shown on the run's Parameters tab. Leave the password out of the URL and give it to the process "
            "that runs the flow (for PostgreSQL: the PGPASSWORD environment variable or a ~/.pgpass file)."
        )
    root_dir = parameters.get("root_dir")
    if isinstance(root_dir, str) and "://" in root_dir and urlsplit(root_dir).password:
        raise PlainSecretError(
            "root_dir is a URL with a secret in it: flow parameters are stored in Prefect's database and shown on "
            "the run's Parameters tab. Leave it out of the URL and give the credentials to the process that runs "
            "the flow (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its environment, or AWS_PROFILE)."
        )


def read_secret(ref: FromSecretBlock | FromEnv, where: str) -> SecretStr:
    """The value ``ref`` names: a Prefect Secret block's, or an environment variable's."""
    if isinstance(ref, FromEnv):
        value = os.environ.get(ref.env)
        if value is None:
            raise ValueError(f"{where}: the environment variable {ref.env!r} is not set where the flow runs")
        return SecretStr(value)
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(ref.secret)
    except ValueError as e:
        raise ValueError(f"{where}: cannot load the Prefect Secret block {ref.secret!r}: {e}") from e
    value = secret.get()
    if not isinstance(value, str):
        raise ValueError(f"{where}: the Prefect Secret block {ref.secret!r} holds a {type(value).__name__}, not text")
    return SecretStr(value)


def backend_spec(spec: Mapping[str, Any] | BackendSpec, name: str = "?") -> BackendSpec:
    """``spec`` as a ``BackendSpec``; a clear error for plain secrets and unknown or missing fields."""
    if isinstance(spec, BackendSpec):
        return spec
    refuse_plain_secrets({"backends": {name: spec}})
    from pydantic import ValidationError

    try:
        return BackendSpec.model_validate(dict(spec))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{_where(name)} is not a valid backend spec ({problems})") from None


def backend_block(spec: Mapping[str, Any] | BackendSpec, name: str = "?") -> OpenEOBackend:
    """An unsaved ``OpenEOBackend`` block for ``spec``, its named secrets read now."""
    from prefect_openeo.blocks import OpenEOBackend

    spec = backend_spec(spec, name)
    secrets = {
        key: read_secret(getattr(spec, key), f"{_where(name)}[{key!r}]")
        for key in SECRET_FIELDS
        if getattr(spec, key) is not None
    }
    return OpenEOBackend(
        url=spec.url,
        auth=spec.auth,
        username=spec.username,
        client_id=spec.client_id,
        provider_id=spec.provider_id,
        **secrets,
    )


def load_block(spec: str) -> OpenEOBackend:
    """The ``OpenEOBackend`` block named in ``"block:NAME"``."""
    from prefect_openeo.blocks import OpenEOBackend

    name = spec[len(BLOCK_PREFIX) :]
    try:
        return OpenEOBackend.load(name)
    except ValueError as e:
        raise ValueError(
            f"Cannot load the OpenEOBackend block {name!r} ({spec!r}): {e}. Save it first (README: 'Deploy')."
        ) from e


def connect(
    spec: Connection | Callable[[], Connection] | str | Mapping[str, Any] | BackendSpec, name: str = "?"
) -> Connection | Callable[[], Connection]:
    """A backend given as a Connection, a callable, a URL, ``"block:NAME"`` or a ``BackendSpec`` (or its dict),
    as a Connection or a callable that makes one."""
    if isinstance(spec, Connection) or callable(spec):
        return spec
    if isinstance(spec, str) and spec.startswith(BLOCK_PREFIX):
        return load_block(spec).get_connection
    if isinstance(spec, str):
        return lambda: openeo.connect(spec)
    if isinstance(spec, (Mapping, BackendSpec)):
        return backend_block(spec, name).get_connection
    raise ValueError(f"Cannot make a backend connection for {name!r} from {spec!r}")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def describe(value: Any) -> Any:
    """``value`` as JSON-able data to store as a flow-run parameter: plain data as it is, pydantic models as
    their data (secrets masked), live objects as a short description (never their attributes)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Connection):
        return f"<Connection to {_without_userinfo(str(value.root_url))}>"
    if callable(value):
        module = getattr(value, "__module__", None) or type(value).__module__
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<callable {module}:{name}>"
    return f"<{type(value).__name__}>"

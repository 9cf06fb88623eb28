"""Backends given on the command line (``-b NAME=URL``, ``-b NAME=block:BLOCK``): parsed, then checked before
a run starts.

``parse_backends`` needs no network: names given once, http(s) URLs or block names, the credentials that
``--auth basic`` reads. ``Probe`` connects to one backend in a thread (all at once, while a Prefect server
starts): a backend that is not an openEO API or rejects the credentials is a problem that stops the command;
one that cannot be reached now is not (the run waits for it in its lane while the others work). The
connection a probe made is the run's first (no second login, e.g. for OIDC).
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from prefect_openeo.settings import settings

#: A backend given as an ``OpenEOBackend`` block (as ``prefect_openeo.flows.BLOCK_PREFIX``; no Prefect import).
BLOCK_PREFIX = "block:"


class Auth(str, Enum):
    """How to authenticate with backends given by URL."""

    none = "none"
    basic = "basic"
    oidc = "oidc"


class BackendSpecError(ValueError):
    """A ``--backend`` (or ``--auth``) that cannot work, found without the network."""


@dataclass
class BackendSpec:
    """One backend of the command line."""

    name: str
    target: str
    auth: Auth = Auth.none
    _connection: Any = field(default=None, repr=False)
    _block: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def block(self) -> str | None:
        """The block name of a ``block:NAME`` backend."""
        return self.target[len(BLOCK_PREFIX) :] if self.target.startswith(BLOCK_PREFIX) else None

    def load_block(self) -> Any:
        """The ``OpenEOBackend`` block (loaded once, from the Prefect API)."""
        from prefect_openeo.flows import load_block

        if self._block is None:
            self._block = load_block(self.target)
        return self._block

    def open(self, *, retry: bool = True) -> Any:
        """A new connection to the backend (for a URL: ``retry=False`` fails at once when it is down)."""
        import openeo

        if self.block:
            return self.load_block().get_connection()
        return openeo.connect(self.target, retry=None if retry else False)

    def authenticate(self, connection: Any) -> Any:
        """Log in as ``auth`` says (a block's connection is logged in already)."""
        if not self.block and self.auth == Auth.basic:
            connection.authenticate_basic(os.environ["OPENEO_USERNAME"], os.environ["OPENEO_PASSWORD"])
        elif not self.block and self.auth == Auth.oidc:
            connection.authenticate_oidc()
        return connection

    def keep(self, connection: Any) -> None:
        """Hand a checked connection to the run."""
        with self._lock:
            self._connection = connection

    def connection(self) -> Any:
        """The run's connection getter: the checked connection the first time, then new ones. They fail at
        once when the backend is down (the run then tries again each sweep while the others go on); the run
        makes them resilient (retries with backoff) once connected."""
        with self._lock:
            connection, self._connection = self._connection, None
        return connection if connection is not None else self.authenticate(self.open(retry=False))


def parse_backends(values: list[str], auth: Auth) -> list[BackendSpec]:
    """``NAME=URL`` / ``NAME=block:BLOCK`` values as specs; ``BackendSpecError`` for the first that cannot
    work, or when ``auth`` needs credentials that are not in the environment."""
    specs: dict[str, BackendSpec] = {}
    for value in values:
        name, sep, target = (part.strip() for part in value.partition("="))
        if not sep or not name:
            raise BackendSpecError(f"--backend must look like NAME=URL or NAME=block:BLOCK, got {value!r}")
        if name in specs:
            raise BackendSpecError(f"backend name {name!r} is given twice: every --backend needs a name of its own")
        if not target:
            raise BackendSpecError(f"backend {name!r} has an empty URL (--backend {name}=https://...)")
        if target.startswith(BLOCK_PREFIX):
            if not target[len(BLOCK_PREFIX) :].strip():
                raise BackendSpecError(f"backend {name!r}: {BLOCK_PREFIX}NAME needs the name of an OpenEOBackend block")
        else:
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                hint = f" (did you mean https://{target}?)" if "://" not in target else ""
                raise BackendSpecError(f"backend {name!r}: {target!r} is not an http:// or https:// URL{hint}")
        specs[name] = BackendSpec(name, target, auth)
    if auth == Auth.basic and any(not s.block for s in specs.values()):
        missing = [v for v in ("OPENEO_USERNAME", "OPENEO_PASSWORD") if not os.environ.get(v)]
        if missing:
            raise BackendSpecError(f"--auth basic needs {' and '.join(missing)} in the environment")
    return list(specs.values())


@dataclass
class Probe:
    """A check of one backend, run in a thread (in the caller's context: its Prefect API, for blocks)."""

    spec: BackendSpec
    done: threading.Event = field(default_factory=threading.Event)
    #: The backend answered (what remains is logging in, which may ask the user, e.g. OIDC).
    reached: threading.Event = field(default_factory=threading.Event)
    #: Why the backend cannot be used as given (not openEO, credentials rejected, no such block).
    problem: str | None = None
    #: Why the backend cannot be reached now.
    down: str | None = None

    def start(self) -> Probe:
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._check,), name=f"check-{self.spec.name}", daemon=True).start()
        return self

    def _check(self) -> None:
        from openeo.rest import OpenEoApiError

        from prefect_openeo.backends import is_transient

        spec, where = self.spec, f"backend {self.spec.name!r} at {self.spec.target}"
        step = "load"
        try:
            if spec.block:
                spec.load_block()
            step = "connect"
            connection = spec.open(retry=False)
            self.reached.set()
            step = "login"
            spec.authenticate(connection)
            step = "connect"
            if not connection.capabilities().api_version():
                raise ValueError("no api_version in its capabilities")
            spec.keep(connection)
        except Exception as e:
            if step == "load":
                self.problem = f"{where}: cannot load the OpenEOBackend block: {e}"
            elif is_transient(e):
                self.down = f"{where} cannot be reached now ({type(e).__name__})"
            elif isinstance(e, OpenEoApiError) and e.http_status_code in (401, 403):
                refusal = "rejects the credentials" if step == "login" else "refuses access"
                self.problem = f"{where} {refusal}: {e.message}"
            elif step == "login":
                self.problem = f"{where}: logging in failed: {e}"
            else:
                self.problem = f"{where} is not an openEO API: {e}"
        finally:
            self.reached.set()
            self.done.set()

    def wait(self, deadline: float) -> None:
        """Until the check ended, or ``deadline`` passed while the backend did not answer (logging in, which
        may take the user's time, is waited for)."""
        self.done.wait(max(0.0, deadline - time.monotonic()))
        if not self.done.is_set() and self.reached.is_set():
            self.done.wait()
        if not self.done.is_set():
            self.down = (
                f"backend {self.spec.name!r} at {self.spec.target} did not answer within {settings.probe_wait:g} s"
            )


def wait_for(probes: list[Probe], wait: float | None = None) -> tuple[list[str], list[str]]:
    """The problems found (the backend cannot be used as given) and the backends that did not answer within
    ``wait`` seconds (``settings.probe_wait``; those found down are left to the run, which says so itself)."""
    deadline = time.monotonic() + (settings.probe_wait if wait is None else wait)
    problems, silent = [], []
    for probe in probes:
        probe.wait(deadline)
        if probe.problem:
            problems.append(probe.problem)
        elif probe.down and not probe.done.is_set():
            silent.append(probe.down)
    return problems, silent

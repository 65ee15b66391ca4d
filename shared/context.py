"""What every Azure Functions door works with: the app settings, the clients built from them once per worker process,
and one invocation's context over those clients.

The Python worker runs functions in a thread pool and keeps its process between invocations, and an app setting
changes only with a restart of that process. So the settings are read, and the blob service client, the containers'
stores and the secret provider (with its Key Vault client, credential, token and key cache) are built, by the first
invocation that needs them, by one thread; every later invocation of every function shares them (they are safe to
share between threads). What is not, the state store's caches (each run record's ETag chain), is made anew for each
invocation. Nothing here touches the network at import. A refusal (connection settings the host or the blob binding
cannot use) or a failed build is not kept: every invocation fails with its reason, logged once as a critical line,
or tries again. The destinations file is read again on every run: it may change without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import connections
from .blobstore import blob_service_from_settings, container_store
from .config import Config, load_config, parse_config
from .errors import ConfigError
from .secrets import SecretProvider, provider_from_env
from .services import Services
from .state import StateStore
from .storage import ObjectStore

log = logging.getLogger(__name__)
APP_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    exports_container: str
    state_container: str
    destinations_config: str  # "blob:<key>" in the state container, or a file path (relative to the app root)
    run_deadline_seconds: float
    environ: Mapping[str, str]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        try:
            deadline = float(environ.get("RUN_DEADLINE_SECONDS", "1500"))
        except ValueError:
            raise ConfigError("must be a number of seconds", field="RUN_DEADLINE_SECONDS") from None
        return cls(
            exports_container=environ.get("EXPORTS_CONTAINER", "exports"),
            state_container=environ.get("STATE_CONTAINER", "sendgrid-connector-state"),
            destinations_config=environ.get("DESTINATIONS_CONFIG", "destinations.json"),
            run_deadline_seconds=deadline,
            environ=environ,
        )


@dataclass(frozen=True)
class Clients:
    """What a worker process builds once and every invocation shares: clients that are safe between threads."""

    settings: Settings
    exports: ObjectStore
    state_container: ObjectStore
    secrets: SecretProvider

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        refusal = connection_refusal(settings.environ)
        if refusal:
            raise ConfigError(refusal)
        service = blob_service_from_settings("ExportsStorage", settings.environ)
        return cls(settings, container_store(service, settings.exports_container),
                   container_store(service, settings.state_container, create=True), provider_from_env(settings.environ))


@dataclass
class AppContext:
    """One invocation's view of the app: the process's clients, and a state store of its own (its caches are the
    ETag chains of the run records this invocation saves, which another invocation's reads must not move)."""

    settings: Settings
    exports: ObjectStore
    state: StateStore
    secrets: SecretProvider

    @classmethod
    def over(cls, clients: Clients) -> AppContext:
        return cls(clients.settings, clients.exports, StateStore(clients.state_container), clients.secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> AppContext:
        """A context over clients of its own, outside the Functions worker (tests, tools)."""
        return cls.over(Clients.from_settings(settings))

    def config(self) -> Config:
        """Read and validate the destinations file on every run."""
        where = self.settings.destinations_config
        if where.startswith("blob:"):
            data = self.state.store.read_bytes(where[5:])
            if data is None:
                raise ConfigError(f"{where} not found in container {self.settings.state_container}",
                                  field="DESTINATIONS_CONFIG")
            return parse_config(data, where)
        path = Path(where) if Path(where).is_absolute() else APP_ROOT / where
        return load_config(path)

    def services(self, config: Config) -> Services:
        return Services(config=config, secrets=self.secrets, state=self.state, sources=self.exports,
                        environ=self.settings.environ)

    def deadline(self) -> float:
        return time.monotonic() + self.settings.run_deadline_seconds


_refusals_logged: set[str] = set()


def connection_refusal(environ: Mapping[str, str]) -> str | None:
    """The start-up check of the connection every function uses (`ExportsStorage`: blob trigger, its BlobClient,
    the runs queue, the state container): a combination the blob binding or the host cannot use makes every
    invocation fail with this reason, logged once per worker process as a critical line, before anything is read."""
    refusal = connections.problem("ExportsStorage", environ)
    if refusal and refusal not in _refusals_logged:
        _refusals_logged.add(refusal)
        log.critical("the connector refuses to work until its storage settings are fixed: %s", refusal)
    return refusal


_lock = threading.Lock()
_clients: Clients | None = None


def _process_clients(environ: Mapping[str, str]) -> Clients:
    global _clients
    clients = _clients
    if clients is None:
        with _lock:
            if _clients is None:
                _clients = Clients.from_settings(Settings.from_env(environ))
            clients = _clients
    return clients


def invocation_context(environ: Mapping[str, str] | None = None) -> AppContext:
    """A context for one invocation, over this worker process's clients: those are built from `environ` (default
    os.environ) by the first call that succeeds, while other threads wait for it, and shared by every later call. A
    failed build (ConfigError, StateError) is not kept: the next call tries again."""
    return AppContext.over(_process_clients(os.environ if environ is None else environ))


def forget_process_clients() -> None:
    """Drop the process's clients, as a restart of the worker would (what an app-settings change causes in Azure):
    the next invocation_context reads the settings again. For tests."""
    global _clients
    with _lock:
        _clients = None

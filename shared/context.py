"""What every Azure Functions door works with: the app settings and the clients built from them, once per worker
process.

The Python worker runs functions in a thread pool and keeps its process between invocations, and an app setting
changes only with a restart of that process. So the settings are read, and the blob service client, the containers'
stores and the secret provider (with its Key Vault client, credential, token and key cache) are built, on the first
invocation that needs them, by one thread, and every later invocation of every function reuses them. Nothing here
touches the network at import. A refusal (connection settings the host or the blob binding cannot use) is not kept:
every invocation fails with its reason, logged once as a critical line. The destinations file is read again on every
run: it may change without a restart.
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


@dataclass
class AppContext:
    """The clients the doors need, built from settings (no network at construction but the state container's
    creation)."""

    settings: Settings
    exports: ObjectStore
    state: StateStore
    secrets: SecretProvider

    @classmethod
    def from_settings(cls, settings: Settings) -> AppContext:
        refusal = connection_refusal(settings.environ)
        if refusal:
            raise ConfigError(refusal)
        service = blob_service_from_settings("ExportsStorage", settings.environ)
        return cls(settings, container_store(service, settings.exports_container),
                   StateStore(container_store(service, settings.state_container, create=True)),
                   provider_from_env(settings.environ))

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
_context: AppContext | None = None


def process_context(environ: Mapping[str, str] | None = None) -> AppContext:
    """This worker process's one AppContext: built from `environ` (default os.environ) by the first call that
    succeeds, while other threads wait for it; every later call returns it. A failed build (ConfigError, StateError)
    is not kept: the next call tries again."""
    global _context
    context = _context
    if context is None:
        with _lock:
            if _context is None:
                _context = AppContext.from_settings(Settings.from_env(os.environ if environ is None else environ))
            context = _context
    return context


def forget_process_context() -> None:
    """Drop the process's AppContext, as a restart of the worker would (what an app-settings change causes in
    Azure): the next call of process_context reads the settings again. For tests."""
    global _context
    with _lock:
        _context = None

"""What a door hands the engine: the request for one run, the I/O parts, and the rules that decide whether a
destination may run at all (the doors and the engine ask the same functions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import Config, Destination
from .errors import ConfigError
from .secrets import SecretProvider
from .sendgrid import SendGridClient, base_url_for
from .state import StateStore
from .storage import LeaseKeeper, ObjectStore

LEASE_SECONDS = 60  # a run's lease on its destination; its keeper renews it every 15 s


@dataclass(frozen=True)
class RunRequest:
    destination: str
    source: str | None = None  # key in the source store: model.json, a folder holding one, or a plain file
    source_etag: str | None = None
    trigger: str = "cli"
    deadline: float | None = None  # a time.monotonic() value; the run checkpoints and stops as 'interrupted' there
    dry_run: bool = False
    wait: bool = False
    resume: str | None = None  # a run id to resume from its checkpoint
    run_id: str | None = None  # the id for a new run (an HTTP door hands it out before the run starts)
    overtakes: str | None = None  # a resume: the newer run of the latest export this one will undo (app's timer)
    settle: bool = False  # automatic triggers: an export not complete yet waits (status 'waiting') and is retried
    full_resync: bool = False  # send every contact, not only what changed since the last run


@dataclass
class Services:
    """The I/O parts a door hands the engine."""

    config: Config
    secrets: SecretProvider
    state: StateStore
    sources: ObjectStore
    environ: Mapping[str, str] = field(default_factory=dict)
    client_factory: Callable[[Destination], SendGridClient] | None = None
    progress: Callable[[dict[str, Any]], None] | None = None
    poll_interval: float = 2.0
    wait_timeout: float = 900.0
    lease_seconds: int = LEASE_SECONDS  # the destination's lease (a blob lease: 15-60 s), kept by a LeaseKeeper
    keeper: LeaseKeeper | None = None  # set by holding(): the lease the work holds

    def holding(self, keeper: LeaseKeeper) -> Services:
        """These services for work that holds a destination's lease: state writes check first that it is still held
        (LeaseLost), and SendGrid clients made from them check before each request and stop waiting once it is lost.
        keeper.check() is the check for any other step (a removal batch, a checkpoint)."""
        return dataclasses.replace(self, state=self.state.held(keeper), keeper=keeper)

    def client(self, dest: Destination) -> SendGridClient:
        if self.client_factory is not None:
            client = self.client_factory(dest)
        else:
            client = SendGridClient(base_url_for(dest.region, self.environ), self.secrets, dest.api_key_secret)
        if self.keeper is not None:
            client.guard = self.keeper.sleep
        return client


def destination(config: Config, name: str) -> Destination:
    """The named destination, or a ConfigError that says why it cannot run."""
    if name in config.errors:
        raise config.errors[name]
    if name not in config.destinations:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise ConfigError(f"no destination named '{name}'; destinations are: {known}", file=config.origin)
    return config.destinations[name]


def refusal(dest: Destination, disabled: Mapping[str, Any] | None) -> str | None:
    """Why a run of this destination is refused before anything else happens (disabled in the file or by an admin,
    no consent), or None. The engine refuses with it; the HTTP door answers 409 with it instead of queueing."""
    if not dest.enabled:
        return f"destination '{dest.name}' is disabled in the destinations file; enable it to run again"
    if disabled:
        why = f": {disabled['reason']}" if disabled.get("reason") else ""
        return (f"destination '{dest.name}' was disabled by {disabled.get('by', 'an admin')} at {disabled.get('at')}"
                f"{why}; enable it to run again")
    if not dest.consent:
        return (f"destination '{dest.name}' has no data-privacy consent: an admin must set \"consent\": true "
                "(agreeing to the data privacy and compliance terms) to run it")
    return None

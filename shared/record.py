"""The run record: one typed value for a run's report, progress and checkpoint, built here and only here
(`RunRecord.new`, `.queued`, `.purge`) and stored as JSON (`to_json` / `from_json`).

Statuses are a `Status` enum (a str, so stored records and answers stay plain JSON); counts change through the tally
methods of `Counts` and `Requests`; rejection reasons are `contacts.Reason`s carried with each rejection. Keys a
stored record has that this version does not know are kept (`extra`) and written back, so an older worker never
drops what a newer one stored.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Destination


class Status(StrEnum):
    QUEUED = "queued"  # an on-demand run handed to the queue worker
    RUNNING = "running"
    WAITING = "waiting"  # for an export to be complete (tried again with backoff)
    INTERRUPTED = "interrupted"  # stopped at a deadline, by an outage or a lost lease: resumable
    SUBMITTED = "submitted"  # sent; SendGrid's jobs (or a mirror run's removals) not final yet
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    REFUSED = "refused"  # nothing was sent: consent, disabled, over max_profiles, an unknown field, column or list
    DRY_RUN = "dry_run"
    SUPERSEDED = "superseded"  # another run made it pointless (`continued_as`)
    SKIPPED = "skipped"  # another run has this export version

    @property
    def is_open(self) -> bool:
        """Not final yet: the timer resumes, polls or retries it."""
        return self in OPEN

    @property
    def is_success(self) -> bool:
        """What the command line ends with exit code 0."""
        return self in SUCCESS


OPEN = frozenset({Status.QUEUED, Status.RUNNING, Status.WAITING, Status.INTERRUPTED, Status.SUBMITTED})
SUCCESS = frozenset({Status.COMPLETED, Status.COMPLETED_WITH_ERRORS, Status.SUBMITTED, Status.DRY_RUN})


@dataclass
class Counts:
    read: int = 0
    valid: int = 0
    duplicates: int = 0
    sent: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    trimmed: Counter[str] = field(default_factory=Counter)
    field_notes: Counter[str] = field(default_factory=Counter)
    not_applied: int | None = None  # once every job is final: rows SendGrid accepted and did not apply
    rejections_omitted: int = 0  # rejected rows past the rejections CSV's cap
    removal: dict[str, Any] | None = None  # a purge's counts instead (mirror.remove_emails / delete_emails)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_json(self) -> dict[str, Any]:
        if self.removal is not None:
            return dict(self.removal)
        rejected = {str(k): v for k, v in self.rejected.items() if v}
        out: dict[str, Any] = {"read": self.read, "valid": self.valid, "rejected": rejected,
                               "rejected_total": sum(rejected.values()), "duplicates": self.duplicates,
                               "trimmed": dict(self.trimmed), "field_notes": dict(self.field_notes), "sent": self.sent,
                               "rejections_omitted": self.rejections_omitted}
        if self.not_applied is not None:
            out["not_applied"] = self.not_applied
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Counts:
        data = data or {}
        if "requested" in data:  # a purge's
            return cls(removal=dict(data))
        return cls(read=int(data.get("read", 0)), valid=int(data.get("valid", 0)),
                   duplicates=int(data.get("duplicates", 0)), sent=int(data.get("sent", 0)),
                   rejected=Counter(data.get("rejected") or {}), trimmed=Counter(data.get("trimmed") or {}),
                   field_notes=Counter(data.get("field_notes") or {}), not_applied=data.get("not_applied"),
                   rejections_omitted=int(data.get("rejections_omitted", 0)))


@dataclass
class Requests:
    count: int = 0
    bytes: int = 0
    max_bytes: int = 0
    max_contacts: int = 0
    imports: int = 0
    retries: int = 0
    rate_limited: int = 0

    def accepted(self, body_bytes: int, contacts: int, *, is_import: bool = False) -> None:
        """A request (or an import file) SendGrid accepted."""
        self.count += 1
        self.bytes += body_bytes
        self.max_bytes = max(self.max_bytes, body_bytes)
        self.max_contacts = max(self.max_contacts, contacts)
        self.imports += is_import

    def client_stats(self, stats: dict[str, Any]) -> None:
        """What a SendGrid client counted while the run used it."""
        self.retries += int(stats.get("retries", 0))
        self.rate_limited += int(stats.get("rate_limited", 0))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Requests:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in (data or {}).items() if k in names})


@dataclass
class Checkpoint:
    """Where a run goes on from. `contacts_done`: de-duplicated contacts SendGrid has accepted (a replay skips them);
    `phase`: a run past its sending (listsync's mirror phases; a purge's); `removal`: mirror.new_passes() state."""

    contacts_done: int = 0
    refused_by_sendgrid: int = 0
    resumed: int = 0
    stalled: int = 0  # attempts in a row that moved nothing (see engine)
    phase: str | None = None
    removal: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"contacts_done": self.contacts_done, "refused_by_sendgrid": self.refused_by_sendgrid,
                               "resumed": self.resumed}
        if self.stalled:
            out["stalled"] = self.stalled
        if self.phase is not None:
            out["phase"] = self.phase
        if self.removal is not None:
            out["removal"] = self.removal
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Checkpoint:
        data = data or {}
        return cls(contacts_done=int(data.get("contacts_done", 0)),
                   refused_by_sendgrid=int(data.get("refused_by_sendgrid", 0)), resumed=int(data.get("resumed", 0)),
                   stalled=int(data.get("stalled", 0)), phase=data.get("phase"), removal=data.get("removal"))


@dataclass
class Job:
    """One SendGrid job of the run: an upsert request's, or an import file's."""

    id: str
    contacts: int
    status: str = "pending"  # SendGrid's: pending, completed, errored, failed
    kind: str | None = None  # "import" for the bulk path
    results: dict[str, Any] | None = None
    errors: list[str] | None = None  # the first lines of the errors file (errored or failed jobs)
    done: int | None = None  # the checkpoint it moved to: its emails are the run's sent part of that name
    errors_url: str | None = field(default=None, repr=False)  # this process only: a download link, never stored

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "errors_url"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(id=str(data["id"]), contacts=int(data.get("contacts", 0)), status=str(data.get("status", "pending")),
                   kind=data.get("kind"), results=data.get("results"), errors=data.get("errors"), done=data.get("done"))


_LISTS = ("warnings", "file_errors", "incomplete", "rejections", "field_notes", "sources")


@dataclass
class RunRecord:
    """A run of one destination on one export version (or a purge: `kind` "purge")."""

    run_id: str
    destination: str
    status: Status
    trigger: str = "cli"
    display_name: str | None = None
    list_id: str | None = None
    mode: str | None = None
    dry_run: bool = False
    source: str | None = None
    source_etag: str | None = None
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    note: str | None = None
    counts: Counts = field(default_factory=Counts)
    requests: Requests = field(default_factory=Requests)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    jobs: list[Job] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)
    incomplete: list[dict[str, Any]] = field(default_factory=list)  # what was not read completely, and why
    rejections: list[dict[str, Any]] = field(default_factory=list)  # a sample; the CSV holds them all
    field_notes: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    rejections_file: str | None = None
    mirror: dict[str, Any] | None = None
    timings: dict[str, Any] = field(default_factory=lambda: {"seconds": None, "first_request_s": None})
    extra: dict[str, Any] = field(default_factory=dict)  # continued_as, overtakes, waiting, kind, purge, ...

    @property
    def kind(self) -> str | None:
        return self.extra.get("kind")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id, "destination": self.destination, "display_name": self.display_name,
            "list_id": self.list_id, "mode": self.mode, "trigger": self.trigger, "dry_run": self.dry_run,
            "source": self.source, "source_etag": self.source_etag, "sources": self.sources,
            "queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "status": str(self.status), "error": self.error, "warnings": self.warnings,
            "file_errors": self.file_errors, "incomplete": self.incomplete, "counts": self.counts.to_json(),
            "requests": self.requests.to_json(), "jobs": [j.to_json() for j in self.jobs],
            "rejections": self.rejections, "field_notes": self.field_notes, "rejections_file": self.rejections_file,
            "checkpoint": self.checkpoint.to_json(), "timings": self.timings,
        }
        if self.note is not None:
            out["note"] = self.note
        if self.mirror is not None:
            out["mirror"] = self.mirror
        return out | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            run_id=str(data["run_id"]), destination=str(data["destination"]), status=Status(data["status"]),
            trigger=str(data.get("trigger") or "cli"), display_name=data.get("display_name"),
            list_id=data.get("list_id"), mode=data.get("mode"), dry_run=bool(data.get("dry_run")),
            source=data.get("source"), source_etag=data.get("source_etag"), queued_at=data.get("queued_at"),
            started_at=data.get("started_at"), finished_at=data.get("finished_at"), error=data.get("error"),
            note=data.get("note"), counts=Counts.from_json(data.get("counts")),
            requests=Requests.from_json(data.get("requests")), checkpoint=Checkpoint.from_json(data.get("checkpoint")),
            jobs=[Job.from_json(j) for j in data.get("jobs") or []],
            **{name: list(data.get(name) or []) for name in _LISTS},
            rejections_file=data.get("rejections_file"), mirror=data.get("mirror"),
            timings=dict(data.get("timings") or {"seconds": None, "first_request_s": None}),
            extra={k: v for k, v in data.items() if k not in known},
        )

    # -- built here, and only here -------------------------------------------------------------------------------
    @classmethod
    def new(cls, run_id: str, dest: Destination, *, trigger: str, dry_run: bool, source: str | None,
            source_etag: str | None, started_at: str | None) -> RunRecord:
        """A run that starts now."""
        return cls(run_id=run_id, destination=dest.name, status=Status.RUNNING, trigger=trigger,
                   display_name=dest.display_name, list_id=dest.list_id, mode=dest.mode, dry_run=dry_run,
                   source=source, source_etag=source_etag, started_at=started_at)

    @classmethod
    def queued(cls, run_id: str, dest: Destination, *, source: str, source_etag: str | None, dry_run: bool,
               queued_at: str) -> RunRecord:
        """An on-demand run handed to the queue worker (the HTTP door)."""
        record = cls.new(run_id, dest, trigger="http", dry_run=dry_run, source=source, source_etag=source_etag,
                         started_at=None)
        record.status, record.queued_at = Status.QUEUED, queued_at
        return record

    @classmethod
    def purge(cls, run_id: str, dest: Destination, what: str, *, by: str, queued_at: str) -> RunRecord:
        """Taking a destination's contacts back out of SendGrid (purge.py): `what` is "list" or "contacts"."""
        return cls(run_id=run_id, destination=dest.name, status=Status.QUEUED, trigger=by, list_id=dest.list_id,
                   queued_at=queued_at, checkpoint=Checkpoint(phase="staging"), extra={"kind": "purge", "purge": what})

    def resumed(self) -> None:
        """Set up for another attempt: running again; a replay recounts what it reads (all but what was sent)."""
        self.checkpoint.resumed += 1
        self.extra.pop("resumable", None)
        self.status, self.error, self.finished_at = Status.RUNNING, None, None
        if self.checkpoint.phase is None:  # a run past its sending reads nothing again: its counts stand
            ck = self.checkpoint
            self.counts = Counts(sent=ck.contacts_done - ck.refused_by_sendgrid)
            self.warnings, self.file_errors, self.incomplete, self.rejections, self.field_notes = [], [], [], [], []

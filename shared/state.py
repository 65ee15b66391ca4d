"""The product's durable state on any ObjectStore (a local folder on the CLI, a Blob container in Azure).

Layout (keys):
    runs/<destination>/<run_id>.json     run record (report + checkpoint), rewritten as the run progresses
    run-index/<run_id>                   the destination of a run, so a run id alone finds its record
    open/<destination>/<run_id>          present while a run is running / interrupted / submitted
    ledger/<destination>/<digest>.json   one per processed export version (source key + ETag)
    pending-exports/<digest>.json        a blob that looked like an export still being written (the timer looks again)
    latest/<destination>.json            the latest complete export seen {source, etag, seen_at}
    disabled/<destination>.json          present while an admin has disabled the destination {at, by, reason}
    snapshots/<destination>/<list>.gz    sorted emails last synced to that list
    fingerprints/<destination>/<list>.gz sorted `email<TAB>fp` of what was last sent and confirmed (`delta`)
    sent/<destination>/<list>/<run_id>/<n>.gz   emails SendGrid accepted at one checkpoint, until folded (`held`)
    staging/<destination>/<run_id>/<name>.gz    a mirror run's working sets (its export's emails, its leavers)
    accounts/<account>/open-jobs/<run_id>       a run whose SendGrid jobs may not be final yet (`jobs`)
    erasures/<id>.json                   an erasure's report (the person by a salted hash only)
    erasures/open/<hash>.json            an erasure not finished yet: its address, deleted when it completes
    erasure-salt                         the salt of those hashes, made once
    schedules/<destination>.json         up to when a destination's schedule is handled (`schedules`)
    blob-errors/<digest>.json            a blob that can never be exported, and why
    runs/<destination>/<id>.rejections.csv / .removals.csv    every rejected row of a run; who a dry run would remove
    leases/<destination>                 one run per destination at a time

Destination names and run ids are checked against strict patterns on every call: they come from HTTP routes and
become parts of keys.

Runs are saved after every accepted request (the checkpoint moves), so a save writes only what changed: the record
always, the index entry and the open marker only when their content changes (the destination; the open status, or
none). Write order keeps a crash safe: index and a new marker go before the record, a marker delete after it, so a
stored record is always reachable by its run id and an open record always has its marker. A marker without an open
record (a crash in between) is skipped by readers.

Records are written conditionally, as a chain of ETags: a new record only if none exists, every later save only if
the record is still what this instance last read or wrote (If-Match). A process whose lease lapsed, and whose run the
timer has resumed meanwhile, therefore cannot overwrite the resumed run's record: its save raises LeaseLost.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from .errors import StateError
from .record import RunRecord
from .storage import (
    HeldLease,
    Lease,
    LeasedStore,
    LeaseKeeper,
    LeaseLost,
    ObjectStore,
    PreconditionFailed,
    wait_for_lease,
)

DESTINATION_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RUN_ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
LIST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # SendGrid list ids are UUIDs
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{16,64}$")  # our own names inside keys (accounts, staging objects)
# not final yet; the timer looks at these ('waiting': for an export to be complete)
OPEN_STATUSES = frozenset({"queued", "running", "interrupted", "submitted", "waiting"})


class InvalidIdentifier(StateError, ValueError):
    """A destination name, run id or list id that does not match its pattern (never reaches a storage key)."""


def new_run_id(now: float | None = None) -> str:
    """'YYYYMMDDTHHMMSSZ-<8 hex>': sorts by start time. The first 3 hex digits are the milliseconds, so runs started
    in the same second still sort in order; the other 5 are random."""
    t = time.time() if now is None else now
    millis = int(t * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t)) + f"-{millis:03x}{secrets.token_hex(3)[:5]}"


def _check(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidIdentifier(f"invalid {what} {value!r}: must match {pattern.pattern}")
    return value


def check_destination(name: object) -> str:
    return _check(name, DESTINATION_PATTERN, "destination name")


def check_run_id(run_id: object) -> str:
    return _check(run_id, RUN_ID_PATTERN, "run id")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def now_iso() -> str:
    """The time stamps of run records: UTC, to the second, 'Z'."""
    return _iso(time.time())


def parse_iso(stamp: object) -> float | None:
    """A time stamp of a record (now_iso's form, or any ISO 8601 time; without an offset it is UTC) as seconds since
    the epoch, or None when it is missing or not a time."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def export_digest(source_key: str, etag: str) -> str:
    """The ledger name of one export version. ETags are compared without quotes (Event Grid and the SDK differ)."""
    if not source_key or not etag:
        raise ValueError("an export version needs a source key and an ETag")
    version = source_key + "\n" + etag.strip('"')
    return hashlib.sha256(version.encode()).hexdigest()[:32]


class StateStore:
    """Runs, ledger, latest exports, disabled markers, snapshots' keys and leases, on one ObjectStore."""

    def __init__(self, store: ObjectStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        # What this instance last wrote for each open run, so unchanged entries are not rewritten: the index entry's
        # destination and the open marker's status. One process works on a run at a time (the destination lease);
        # one that picks a run up reads it first (load_run, open_runs), which forgets what was cached for it.
        self._indexed: dict[str, str] = {}
        self._marked: dict[str, str] = {}
        # The ETag of each run record as this instance last read or wrote it: the condition of its next save.
        self._etags: dict[str, str] = {}
        self.failed_save: StateError | None = None  # the first save_run of this instance that raised

    def held(self, keeper: LeaseKeeper) -> StateStore:
        """This state store for the holder of a lease: every write first checks that the lease is still held
        (LeaseLost otherwise). It shares this instance's caches, so the ETag chain of a record goes on across both."""
        view = StateStore(LeasedStore(self.store, keeper), clock=self._clock)
        view._indexed, view._marked, view._etags = self._indexed, self._marked, self._etags
        return view

    def __repr__(self) -> str:
        return f"StateStore({self.store.label})"

    # -- JSON helpers ------------------------------------------------------------------------------------------------
    def _read_json(self, key: str) -> dict[str, Any] | None:
        data = self.store.read_bytes(key)
        return None if data is None else self._parse(key, data)

    def _parse(self, key: str, data: bytes) -> dict[str, Any]:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise StateError(f"{key} in {self.store.label} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise StateError(f"{key} in {self.store.label} is not a JSON object")
        return value

    @staticmethod
    def _dumps(value: dict[str, Any]) -> bytes:
        try:
            return orjson.dumps(value, option=orjson.OPT_INDENT_2)
        except orjson.JSONEncodeError as e:
            raise StateError(f"state record cannot be stored as JSON: {e}") from None

    # -- runs --------------------------------------------------------------------------------------------------------
    def rejections_key(self, destination: str, run_id: str) -> str:
        """Every rejected row of a run (up to report.MAX_CSV_ROWS), as CSV."""
        return f"runs/{check_destination(destination)}/{check_run_id(run_id)}.rejections.csv"

    def removals_key(self, destination: str, run_id: str) -> str:
        """Who a dry run of a mirror destination would remove from the list, as CSV."""
        return f"runs/{check_destination(destination)}/{check_run_id(run_id)}.removals.csv"

    def save_run(self, record: RunRecord | dict[str, Any]) -> None:
        """Write the run record, plus its index entry and open marker (present for queued, running, interrupted and
        submitted runs; deleted once the run is final) when they differ from what this instance last wrote. Index
        and a new marker are written before the record, a marker delete comes after it (see the module docstring).
        The record is written only if it is still what this instance last read or wrote (a new one: only if there
        is none); LeaseLost otherwise, and nothing more is written."""
        try:
            self._save_run(record.to_json() if isinstance(record, RunRecord) else record)
        except StateError as exc:
            self.failed_save = self.failed_save or exc
            raise

    def _save_run(self, record: dict[str, Any]) -> None:
        run_id = check_run_id(record.get("run_id"))
        destination = check_destination(record.get("destination"))
        status = record.get("status")
        if not isinstance(status, str) or not status:
            raise StateError(f"run {run_id}: record has no status")
        data = self._dumps(record)  # before any write: an unstorable record leaves nothing behind
        marker = f"open/{destination}/{run_id}"
        if self._indexed.get(run_id) != destination:
            self.store.write_bytes(f"run-index/{run_id}", destination.encode())
            self._indexed[run_id] = destination
        is_open = status in OPEN_STATUSES
        if is_open and self._marked.get(run_id) != status:
            self.store.write_bytes(marker, status.encode())
            self._marked[run_id] = status
        etag = self._etags.get(run_id)
        try:
            self._etags[run_id] = self.store.write_bytes(f"runs/{destination}/{run_id}.json", data, if_match=etag,
                                                         if_none_match=etag is None)
        except PreconditionFailed:
            raise LeaseLost(f"run {run_id}: its record in {self.store.label} was saved by another process since this "
                            f"one {'read or saved it' if etag else 'started it'} (did its lease lapse?); this process "
                            "stops without overwriting it") from None
        if not is_open:
            self.store.delete(marker)
            self._forget(run_id)  # final: saved once or twice, so the cache holds open runs only

    def _forget(self, run_id: str) -> None:
        """Drop what this instance remembers writing for a run: its next save writes index and marker again."""
        self._indexed.pop(run_id, None)
        self._marked.pop(run_id, None)

    def peek_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's record for reading only (another run's, say): unlike load_run, this instance's save cache for
        the run is left alone."""
        raw = self.store.read_bytes(f"run-index/{check_run_id(run_id)}")
        if raw is None:
            return None
        destination = check_destination(raw.decode("utf-8", "replace").strip())
        return self._read_json(f"runs/{destination}/{run_id}.json")

    def _read_record(self, run_id: str, destination: str) -> dict[str, Any] | None:
        """A run record as stored now; its ETag becomes the condition of this instance's next save of it."""
        self._forget(run_id)
        self._etags.pop(run_id, None)
        key = f"runs/{destination}/{run_id}.json"
        found = self.store.read_with_etag(key)
        if found is None:
            return None
        record = self._parse(key, found[0])
        self._etags[run_id] = found[1]
        return record

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        """The run's record, or None. Forgets this instance's cache for the run (another process may have saved it)
        and remembers the record's ETag: this instance's next save of it is conditional on it."""
        check_run_id(run_id)
        self._forget(run_id)
        raw = self.store.read_bytes(f"run-index/{run_id}")
        if raw is None:
            return None
        destination = check_destination(raw.decode("utf-8", "replace").strip())
        return self._read_record(run_id, destination)

    def list_runs(self, destination: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` runs of a destination, newest first."""
        check_destination(destination)
        if limit <= 0:
            return []
        prefix = f"runs/{destination}/"
        keys = [i.key for i in self.store.list(prefix)
                if i.key.endswith(".json") and RUN_ID_PATTERN.fullmatch(i.key[len(prefix) : -len(".json")])]
        runs = []
        for key in reversed(keys[-limit:]):
            record = self._read_json(key)
            if record is not None:
                runs.append(record)
        return runs

    def open_runs(self) -> list[dict[str, Any]]:
        """Records of runs not final yet (to resume or to poll), oldest first. Stale markers (record final) are
        skipped, not deleted: reading never changes state."""
        found: list[tuple[str, str]] = []
        for info in self.store.list("open/"):
            parts = info.key.split("/")
            if len(parts) == 3 and DESTINATION_PATTERN.fullmatch(parts[1]) and RUN_ID_PATTERN.fullmatch(parts[2]):
                found.append((parts[2], parts[1]))
        runs = []
        for run_id, destination in sorted(found):
            record = self._read_record(run_id, destination)  # the caller may resume or poll it
            if record is not None and record.get("status") in OPEN_STATUSES:
                runs.append(record)
        return runs

    # -- processed-export ledger -------------------------------------------------------------------------------------
    def _ledger_key(self, destination: str, source_key: str, etag: str) -> str:
        return f"ledger/{check_destination(destination)}/{export_digest(source_key, etag)}.json"

    def claim_export(self, destination: str, source_key: str, etag: str, run_id: str) -> dict[str, Any] | None:
        """Claim one export version for a run. None when this call claimed it; otherwise the existing entry (whose
        run_id already has it), so a repeated trigger for the same version does nothing."""
        key = self._ledger_key(destination, source_key, etag)
        entry = {"destination": destination, "source": source_key, "etag": etag.strip('"'),
                 "run_id": check_run_id(run_id), "claimed_at": _iso(self._clock())}
        for _ in range(5):  # the entry can vanish between our failed create and the read (release_export)
            try:
                self.store.write_bytes(key, self._dumps(entry), if_none_match=True)
                return None
            except PreconditionFailed:
                existing = self._read_json(key)
                if existing is not None:
                    return existing
        raise StateError(f"claiming {source_key} for {destination}: the ledger entry keeps changing")

    def release_export(self, destination: str, source_key: str, etag: str, *, run_id: str | None = None) -> None:
        """Forget a claim (the run was refused before sending anything), so a fixed configuration can retry. With
        run_id, only that run's claim is released."""
        key = self._ledger_key(destination, source_key, etag)
        if run_id is not None:
            existing = self._read_json(key)
            if existing is None or existing.get("run_id") != check_run_id(run_id):
                return
        self.store.delete(key)

    def export_claim(self, destination: str, source_key: str, etag: str) -> dict[str, Any] | None:
        """The ledger entry of one export version, or None when no run has claimed it."""
        return self._read_json(self._ledger_key(destination, source_key, etag))

    # -- latest export -----------------------------------------------------------------------------------------------
    def set_latest_export(self, destination: str, source_key: str, etag: str) -> None:
        check_destination(destination)
        if not source_key or not etag:
            raise ValueError("the latest export needs a source key and an ETag")
        value = {"source": source_key, "etag": etag.strip('"'), "seen_at": _iso(self._clock())}
        self.store.write_bytes(f"latest/{destination}.json", self._dumps(value))

    def record_blob_error(self, source_key: str, etag: str, message: str) -> str:
        """Keep the report of a blob that can never be processed (the trigger does not retry it); returns its key."""
        key = f"blob-errors/{export_digest(source_key, etag)}.json"
        value = {"source": source_key, "etag": etag.strip('"'), "error": message, "at": _iso(self._clock())}
        self.store.write_bytes(key, self._dumps(value))
        return key

    def note_pending_export(self, source_key: str, etag: str, why: str) -> dict[str, Any]:
        """A blob that looks like an export not complete yet (an empty or cut model.json): the timer looks again.
        Returns the note (its `since` is the first sighting of this key)."""
        key = f"pending-exports/{hashlib.sha256(source_key.encode()).hexdigest()[:32]}.json"
        note = self._read_json(key) or {"source": source_key, "since": _iso(self._clock())}
        note.update(etag=etag.strip('"'), why=why, seen_at=_iso(self._clock()))
        self.store.write_bytes(key, self._dumps(note))
        return note

    def drop_pending_export(self, source_key: str) -> None:
        self.store.delete(f"pending-exports/{hashlib.sha256(source_key.encode()).hexdigest()[:32]}.json")

    def pending_exports(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for info in self.store.list("pending-exports/"):
            note = self._read_json(info.key)
            if note is not None and isinstance(note.get("source"), str):
                found.append((info.key, note))
        return found

    def latest_export(self, destination: str) -> dict[str, Any] | None:
        return self._read_json(f"latest/{check_destination(destination)}.json")

    # -- disabled destinations ---------------------------------------------------------------------------------------
    def disable(self, destination: str, by: str, reason: str) -> None:
        value = {"at": _iso(self._clock()), "by": by, "reason": reason}
        self.store.write_bytes(f"disabled/{check_destination(destination)}.json", self._dumps(value))

    def enable(self, destination: str) -> None:
        self.store.delete(f"disabled/{check_destination(destination)}.json")

    def disabled(self, destination: str) -> dict[str, Any] | None:
        return self._read_json(f"disabled/{check_destination(destination)}.json")

    # -- leases and snapshots ----------------------------------------------------------------------------------------
    def lease(self, destination: str, seconds: int = 60) -> contextlib.AbstractContextManager[Lease]:
        """One run per destination at a time; LeaseUnavailable at once when another run holds it. Work that may
        outlast the lease holds it with a storage.LeaseKeeper."""
        return self.store.lease(f"leases/{check_destination(destination)}", seconds)

    def wait_lease(self, destination: str, timeout: float, seconds: int = 60) -> HeldLease:
        """The destination's lease, waiting up to timeout seconds for the holder (renew it; leave it with
        __exit__). LeaseUnavailable when the wait ends."""
        return wait_for_lease(self.store, f"leases/{check_destination(destination)}", seconds, timeout)

    # -- erasure and schedules (their owners read and write; the names live here) ------------------------------
    SALT_KEY = "erasure-salt"  # the random salt of erasure hashes, made once
    OPEN_ERASURES = "erasures/open/"  # an erasure not finished yet: its address, until it is done (then deleted)

    @staticmethod
    def erasure_report_key(report_id: str) -> str:
        return f"erasures/{check_run_id(report_id)}.json"

    def open_erasure_key(self, person: str) -> str:
        return f"{self.OPEN_ERASURES}{_check(person, _HEX, 'person')}.json"

    @staticmethod
    def schedule_key(destination: str) -> str:
        return f"schedules/{check_destination(destination)}.json"

    def fingerprints_key(self, destination: str, list_id: str) -> str:
        """What was last sent for each contact of the list and confirmed (`delta`)."""
        return f"fingerprints/{check_destination(destination)}/{_check(list_id, LIST_ID_PATTERN, 'list id')}.gz"

    def snapshot_key(self, destination: str, list_id: str) -> str:
        return f"snapshots/{check_destination(destination)}/{_check(list_id, LIST_ID_PATTERN, 'list id')}.gz"

    # -- what runs sent, their working sets, and jobs per account --------------------------------------------------
    def sent_prefix(self, destination: str, list_id: str) -> str:
        return f"sent/{check_destination(destination)}/{_check(list_id, LIST_ID_PATTERN, 'list id')}/"

    def sent_key(self, destination: str, list_id: str, run_id: str, done: int) -> str:
        return f"{self.sent_prefix(destination, list_id)}{check_run_id(run_id)}/{int(done):012d}.gz"

    def staging_key(self, destination: str, run_id: str, name: str) -> str:
        return f"staging/{check_destination(destination)}/{check_run_id(run_id)}/{_check(name, _NAME, 'name')}.gz"

    def drop_staging(self, destination: str, run_id: str) -> None:
        prefix = f"staging/{check_destination(destination)}/{check_run_id(run_id)}/"
        for info in list(self.store.list(prefix)):
            self.store.delete(info.key)

    def mark_open_jobs(self, account: str, run_id: str, destination: str) -> None:
        """Note that a run has SendGrid jobs in an account that may not be final yet."""
        self.store.write_bytes(self._jobs_key(account, run_id), check_destination(destination).encode())

    def unmark_open_jobs(self, account: str, run_id: str) -> None:
        self.store.delete(self._jobs_key(account, run_id))

    def runs_with_open_jobs(self, account: str) -> list[str]:
        prefix = f"accounts/{_check(account, _NAME, 'account')}/open-jobs/"
        return [i.key[len(prefix) :] for i in self.store.list(prefix) if RUN_ID_PATTERN.fullmatch(i.key[len(prefix) :])]

    @staticmethod
    def _jobs_key(account: str, run_id: str) -> str:
        return f"accounts/{_check(account, _NAME, 'account')}/open-jobs/{check_run_id(run_id)}"

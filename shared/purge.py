"""Taking data back out of SendGrid: removing a destination (with a purge) and erasing one person.

Only what this product put there is touched: the emails come from the destination's snapshot, minus those another
destination still holds (same list for a list purge; any destination for a deletion). A purge is a run like any
other: reported, checkpointed after every 100 emails, and resumed by running it again (or by the timer).

A list purge keeps the destination's snapshot: it is the record of what the product put into the account, and a
later purge=contacts deletes from it. Only a completed deletion removes the snapshot. Erasure deletes in SendGrid
first and forgets the address in the snapshots after, so a failed erasure can be run again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets as pysecrets
from collections.abc import Iterator
from typing import Any, Literal

import orjson

from . import mirror, snapshots
from .config import Destination
from .engine import Services, destination, now_iso
from .errors import ConfigError, ConnectorError, DeadlineReached, LeaseUnavailable, RunRefused
from .secrets import redact
from .state import StateStore, new_run_id
from .storage import LeaseKeeper, LeaseLost, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

PurgeWhat = Literal["list", "contacts"]
SALT_KEY = "erasure-salt"
LEASE_WAIT_SECONDS = 60.0
PURGE_OPEN_STATUSES = frozenset({"queued", "running", "interrupted"})  # a purge not final yet
RUNS_LOOKED_AT = 100  # how far back _list_released looks past runs that sent nothing
_ADDED_NOTHING = frozenset({"queued", "refused", "skipped", "dry_run", "superseded"})  # runs that put nobody in a list


def _list_released(state: StateStore, name: str) -> bool:
    """Whether a destination's contacts are out of its list: its newest run that could have added any is a completed
    list purge. Its snapshot is kept for a later purge=contacts, so a list purge of another destination on the same
    list must not count it as still holding them."""
    for record in state.list_runs(name, limit=RUNS_LOOKED_AT):
        if record.get("status") in _ADDED_NOTHING:
            continue
        return record.get("kind") == "purge" and record.get("purge") == "list" and record["status"] == "completed"
    return False


def _others(svc: Services, name: str, list_id: str, what: PurgeWhat) -> Iterator[str]:
    """Snapshot keys of the other destinations whose contacts the purge must leave alone."""
    for other in svc.config.destinations.values():
        if other.name == name or (what == "list" and (other.list_id != list_id
                                                      or _list_released(svc.state, other.name))):
            continue
        yield svc.state.snapshot_key(other.name, other.list_id)


def queued_purge(state: StateStore, dest: Destination, what: PurgeWhat, *, by: str) -> dict[str, Any]:
    """The record of a purge not started yet (the HTTP door queues it; the CLI starts it at once)."""
    record = {"run_id": new_run_id(), "destination": dest.name, "kind": "purge", "purge": what, "trigger": by,
              "list_id": dest.list_id, "queued_at": now_iso(), "started_at": None, "finished_at": None,
              "status": "queued", "error": None, "counts": {}, "checkpoint": {"done": 0}}
    state.save_run(record)
    return record


def open_purge(state: StateStore, name: str) -> dict[str, Any] | None:
    """The destination's purge that has not finished (queued, running or interrupted), if any."""
    return next((r for r in state.open_runs() if r["destination"] == name and r.get("kind") == "purge"), None)


def unfinished_purge(state: StateStore, name: str, what: PurgeWhat) -> dict[str, Any] | None:
    """The destination's unfinished purge when it is the kind asked for (it goes on; no second one is started).
    RunRefused when an unfinished purge of the other kind is in the way: it finishes first."""
    record = open_purge(state, name)
    if record is not None and record.get("purge") != what:
        raise RunRefused(f"a purge={record.get('purge')} of '{name}' is unfinished (run {record['run_id']}, "
                         f"{record['status']}); ask for purge={what} once it has finished")
    return record


def enable_destination(state: StateStore, name: str, *, by: str = "cli") -> dict[str, Any]:
    """Undo the disabling of remove_destination: triggers run the destination again (its next export re-adds what a
    finished purge took out). Refused with RunRefused while a purge of it is unfinished: the purge and the next
    export would work against each other."""
    unfinished = open_purge(state, name)
    if unfinished is not None:
        raise RunRefused(f"destination '{name}' has an unfinished purge (run {unfinished['run_id']}, "
                         f"{unfinished['status']}); let it finish (the timer resumes it, or run the removal again), "
                         "then enable the destination")
    was = state.disabled(name)
    if was is not None:
        state.enable(name)
        log.warning("%s enabled by %s (disabled at %s by %s)", name, by, was.get("at"), was.get("by"))
    return {"destination": name, "disabled": False, "was_disabled": was}


def remove_destination(svc: Services, name: str, purge: PurgeWhat | None = None, *, confirmed: bool = False,
                       by: str = "cli", run_id: str | None = None) -> dict[str, Any]:
    """Disable a destination so no trigger runs it again; with purge, take its contacts back out of SendGrid.

    With run_id (a queue message, the timer), exactly that purge record is worked on, with its own kind: one
    message must never run another purge. A record that is not an open purge of this destination is returned as
    it is, so a redelivered message or a late timer does nothing. Without run_id, the destination's open purge is
    resumed, or a new one is started. An existing disabled marker is kept: its reason is the admin's."""
    dest = destination(svc.config, name)
    if purge not in (None, "list", "contacts"):
        raise ConfigError(f"purge must be 'list' or 'contacts', not {purge!r}", field="purge")
    record: dict[str, Any] | None = None
    what = purge
    if run_id is not None:
        record = svc.state.load_run(run_id)
        if record is None:
            raise RunRefused(f"there is no run {run_id} to purge destination '{name}' with")
        if (record.get("destination") != name or record.get("kind") != "purge"
                or record.get("status") not in PURGE_OPEN_STATUSES):
            return record
        what = record["purge"]
    elif purge is not None:
        record = unfinished_purge(svc.state, name, purge)
    if what == "contacts" and not confirmed:
        raise ConfigError("purge=contacts deletes the contacts from the SendGrid account entirely (they count against "
                          "the contact allowance if they come back); confirm it explicitly (--yes, or confirm=true)",
                          field="purge")
    if svc.state.disabled(name) is None:
        svc.state.disable(name, by=by, reason=f"removed{f' with purge={what}' if what else ''}")
    if what is None:
        return {"destination": name, "disabled": True, "purge": None}
    if record is None:
        record = queued_purge(svc.state, dest, what, by=by)
    try:
        lease = svc.state.wait_lease(name, LEASE_WAIT_SECONDS, svc.lease_seconds)
    except LeaseUnavailable:
        # Whoever holds the destination may be running this very purge: its record is theirs to save.
        log.warning("%s: busy with another run; purge %s left as it is", name, record["run_id"])
        stored = svc.state.load_run(record["run_id"])
        if stored is not None:
            return stored
        record.update(status="queued")
        svc.state.save_run(record)
        return record
    with lease, LeaseKeeper(lease, what=f"the lease on '{name}'") as keeper:
        svc = svc.holding(keeper)  # renewed on its own clock; every write and request checks it first
        # Re-read under the lease: another caller may have finished or moved this purge on while we waited.
        current = svc.state.load_run(record["run_id"]) or record
        if current.get("status") not in PURGE_OPEN_STATUSES:
            return current
        return _run_purge(svc, dest, current)


def _run_purge(svc: Services, dest: Destination, record: dict[str, Any]) -> dict[str, Any]:
    """Work on an open purge record from its checkpoint; the caller holds the destination's lease (svc.holding: a
    blob lease lapses after 60 s unrenewed, and the timer would start the same purge beside this one). The snapshot
    outlives a list purge (a later purge=contacts needs it); a completed deletion removes it."""
    what: PurgeWhat = record["purge"]
    record.update(status="running", error=None, started_at=record.get("started_at") or now_iso())
    svc.state.save_run(record)
    key = svc.state.snapshot_key(dest.name, dest.list_id)
    store = svc.state.store
    client = svc.client(dest)
    lost = False  # the lease (or the record) went to another holder: nothing more is written
    try:
        emails = snapshots.subtract_sorted(snapshots.read_snapshot(store, key),
                                           *(snapshots.read_snapshot(store, k)
                                             for k in _others(svc, dest.name, dest.list_id, what)))

        def checkpoint(done: int, counts: dict[str, Any]) -> None:
            record["checkpoint"]["done"] = done
            record["counts"] = dict(counts)
            svc.state.save_run(record)

        start, carried = record["checkpoint"]["done"], record.get("counts") or None
        if what == "list":
            result = mirror.remove_emails(client, dest.list_id, emails, start=start, on_progress=checkpoint,
                                          counts=carried)
        else:
            result = mirror.delete_emails(client, emails, start=start, on_progress=checkpoint, counts=carried)
        record["counts"] = result
        if what == "contacts":
            snapshots.delete_snapshot(store, key)
        record.update(status="completed", finished_at=now_iso())
    except (DeadlineReached, ConnectorError) as exc:
        record.update(status="interrupted", error=redact(str(exc)) + "; run the removal again to resume")
        lost = isinstance(exc, LeaseLost)
    finally:
        client.close()
        if not lost:
            svc.state.save_run(record)
    return record


def _salt(svc: Services) -> bytes:
    """A random salt kept in the state store, made once: hashes of one person stay comparable across erasures."""
    store = svc.state.store
    salt = store.read_bytes(SALT_KEY)
    if salt:
        return salt
    with contextlib.suppress(PreconditionFailed):
        store.write_bytes(SALT_KEY, pysecrets.token_bytes(32), if_none_match=True)
    return store.read_bytes(SALT_KEY) or b""


def _holds(store: ObjectStore, key: str, address: str) -> bool:
    """Whether a snapshot names the address (read only: it stops at the first email not below it)."""
    return next((e for e in snapshots.read_snapshot(store, key) if e >= address), None) == address


def _forget(svc: Services, dest: Destination, address: str) -> bool:
    """Filter the address out of a destination's snapshot under its lease; False when a run holds it too long."""
    try:
        lease = svc.state.wait_lease(dest.name, LEASE_WAIT_SECONDS, svc.lease_seconds)
    except LeaseUnavailable:
        return False
    try:
        with lease, LeaseKeeper(lease, what=f"the lease on '{dest.name}'") as keeper:
            held = svc.holding(keeper).state  # the rewritten snapshot is committed only while the lease is held
            snapshots.filter_out(held.store, held.snapshot_key(dest.name, dest.list_id), address)
    except LeaseLost:  # a run has the destination now: the snapshot is left as it was, the erasure says so
        return False
    return True


def erase(svc: Services, email: str, *, by: str = "cli") -> dict[str, Any]:
    """Forget one person: delete the contact in each SendGrid account the product wrote it to, then remove the
    address from the snapshots of that account's destinations. The snapshots change only after their account's
    deletion succeeded, so an erasure that failed half-way still finds the person when it is run again. The report
    and the logs name the person by a salted hash only."""
    address = email.strip().lower()
    if "@" not in address or len(address) > 254 or any(c in address for c in "\r\n"):
        raise ConfigError("an erasure needs one email address", field="email")
    person = mirror.erasure_hash(address, _salt(svc))
    report: dict[str, Any] = {"kind": "erasure", "person": person, "by": by, "started_at": now_iso(),
                              "destinations": [], "accounts_deleted": 0, "not_found": 0, "errors": []}
    # Which snapshots hold the person, read under each destination's lease: runs rewrite snapshots under it, so the
    # answer is a settled one, and a destination busy past the wait is reported (erase again) rather than missed.
    accounts: dict[tuple[str, str], list[Destination]] = {}
    for name, dest in sorted(svc.config.destinations.items()):
        try:
            lease = svc.state.wait_lease(name, LEASE_WAIT_SECONDS, svc.lease_seconds)
        except LeaseUnavailable:
            report["errors"].append(f"{name}: busy with a run; erase again to finish")
            continue
        with lease:
            held = _holds(svc.state.store, svc.state.snapshot_key(name, dest.list_id), address)
        if held:
            report["destinations"].append(name)
            accounts.setdefault((dest.api_key_secret, dest.region), []).append(dest)
    for dests in accounts.values():
        client = svc.client(dests[0])
        try:
            result = mirror.delete_emails(client, [address])
        except ConnectorError as exc:
            report["errors"].append(f"{dests[0].name}: {redact(str(exc)).replace(address, person)}; erase again")
            continue
        finally:
            client.close()
        if result.get("invalid"):
            report["errors"].append(f"{dests[0].name}: SendGrid refused to look the person up; nothing was deleted")
            continue
        report["accounts_deleted"] += result.get("deleted", 0)
        report["not_found"] += result.get("not_found", 0)
        for dest in dests:
            if not _forget(svc, dest, address):
                report["errors"].append(f"{dest.name}: busy with a run; the contact is deleted, erase again to "
                                        "remove the person from this destination's snapshot")
    report["status"] = "completed" if not report["errors"] else "incomplete"
    report["finished_at"] = now_iso()
    svc.state.store.write_bytes(f"erasures/{new_run_id()}.json", orjson.dumps(report))
    log.info("erasure of %s: destinations %s, %d contact(s) deleted", person, report["destinations"],
             report["accounts_deleted"])
    return report

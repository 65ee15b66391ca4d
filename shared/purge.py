"""Taking data back out of SendGrid: removing a destination (with a purge) and erasing one person.

Only what this product put there is touched: the emails come from the destination's snapshot, minus those another
destination still holds (same list for a list purge; any destination for a deletion). A purge is a run like any
other: reported, checkpointed after every 100 emails, and resumed by running it again (or by the timer).
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
from .storage import PreconditionFailed

log = logging.getLogger(__name__)

PurgeWhat = Literal["list", "contacts"]
SALT_KEY = "erasure-salt"
LEASE_WAIT_SECONDS = 60.0


def _others(svc: Services, name: str, list_id: str, what: PurgeWhat) -> Iterator[str]:
    """Snapshot keys of the other destinations whose contacts the purge must leave alone."""
    for other in svc.config.destinations.values():
        if other.name == name or (what == "list" and other.list_id != list_id):
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
                       by: str = "cli") -> dict[str, Any]:
    """Disable a destination so no trigger runs it again; with purge, take its contacts back out of SendGrid.
    Running it again resumes an interrupted purge of that destination."""
    dest = destination(svc.config, name)
    if purge not in (None, "list", "contacts"):
        raise ConfigError(f"purge must be 'list' or 'contacts', not {purge!r}", field="purge")
    if purge == "contacts" and not confirmed:
        raise ConfigError("purge=contacts deletes the contacts from the SendGrid account entirely (they count against "
                          "the contact allowance if they come back); confirm it explicitly (--yes, or confirm=true)",
                          field="purge")
    svc.state.disable(name, by=by, reason=f"removed{f' with purge={purge}' if purge else ''}")
    if purge is None:
        return {"destination": name, "disabled": True, "purge": None}
    record = open_purge(svc.state, name)
    if record is None:
        record = queued_purge(svc.state, dest, purge, by=by)
    record.update(status="running", error=None, started_at=record.get("started_at") or now_iso())
    svc.state.save_run(record)
    key = svc.state.snapshot_key(name, dest.list_id)
    store = svc.state.store
    try:
        lease = svc.state.wait_lease(name, LEASE_WAIT_SECONDS)
    except LeaseUnavailable:
        record.update(status="interrupted", error="the destination is busy with a run; run the removal again")
        svc.state.save_run(record)
        return record
    client = svc.client(dest)
    try:
        emails = snapshots.subtract_sorted(snapshots.read_snapshot(store, key),
                                           *(snapshots.read_snapshot(store, k) for k in _others(svc, name,
                                                                                                 dest.list_id, purge)))

        def checkpoint(done: int, counts: dict[str, Any]) -> None:
            record["checkpoint"]["done"] = done
            record["counts"] = dict(counts)
            svc.state.save_run(record)

        start, carried = record["checkpoint"]["done"], record["counts"] or None
        if record["purge"] == "list":
            result = mirror.remove_emails(client, dest.list_id, emails, start=start, on_progress=checkpoint,
                                          counts=carried)
        else:
            result = mirror.delete_emails(client, emails, start=start, on_progress=checkpoint, counts=carried)
        record["counts"] = result
        snapshots.delete_snapshot(store, key)
        record.update(status="completed", finished_at=now_iso())
    except (DeadlineReached, ConnectorError) as exc:
        record.update(status="interrupted", error=redact(str(exc)) + "; run the removal again to resume")
    finally:
        client.close()
        lease.__exit__(None, None, None)
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


def erase(svc: Services, email: str, *, by: str = "cli") -> dict[str, Any]:
    """Forget one person: remove the address from every destination's snapshot and delete the contact in each
    SendGrid account the product wrote it to. The report and the logs name the person by a salted hash only."""
    address = email.strip().lower()
    if "@" not in address or len(address) > 254:
        raise ConfigError("an erasure needs one email address", field="email")
    person = mirror.erasure_hash(address, _salt(svc))
    report: dict[str, Any] = {"kind": "erasure", "person": person, "by": by, "started_at": now_iso(),
                              "destinations": [], "accounts_deleted": 0, "not_found": 0, "errors": []}
    accounts: dict[tuple[str, str], Any] = {}
    for name, dest in sorted(svc.config.destinations.items()):
        key = svc.state.snapshot_key(name, dest.list_id)
        try:
            lease = svc.state.wait_lease(name, LEASE_WAIT_SECONDS)
        except LeaseUnavailable:
            report["errors"].append(f"{name}: busy with a run; erase again to finish")
            continue
        try:
            if snapshots.filter_out(svc.state.store, key, address):
                report["destinations"].append(name)
                accounts.setdefault((dest.api_key_secret, dest.region), dest)
        finally:
            lease.__exit__(None, None, None)
    for dest in accounts.values():
        client = svc.client(dest)
        try:
            result = mirror.delete_emails(client, [address])
            report["accounts_deleted"] += result.get("deleted", 0)
            report["not_found"] += result.get("not_found", 0)
        except ConnectorError as exc:
            report["errors"].append(f"{dest.name}: {redact(str(exc)).replace(address, person)}")
        finally:
            client.close()
    report["status"] = "completed" if not report["errors"] else "incomplete"
    report["finished_at"] = now_iso()
    svc.state.store.write_bytes(f"erasures/{new_run_id()}.json", orjson.dumps(report))
    log.info("erasure of %s: destinations %s, %d contact(s) deleted", person, report["destinations"],
             report["accounts_deleted"])
    return report

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
import functools
import logging
import secrets as pysecrets
import time
from collections.abc import Iterator
from typing import Any, Literal, TypeGuard, get_args

import orjson

from . import jobs, mirror, snapshots
from .config import Destination
from .contacts import single_address
from .errors import ConfigError, ConnectorError, LeaseUnavailable, NotYet, RunRefused
from .held import Held
from .record import RunRecord, Status
from .secrets import redact
from .sendgrid import SendGridClient
from .services import Services, destination
from .state import StateStore, new_run_id, now_iso
from .storage import LeaseKeeper, LeaseLost, PreconditionFailed

log = logging.getLogger(__name__)

PurgeWhat = Literal["list", "contacts"]  # take the contacts off the destination's list, or delete them from SendGrid
PURGE_WHATS: tuple[PurgeWhat, ...] = get_args(PurgeWhat)
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


def _others(svc: Services, name: str, list_id: str, what: PurgeWhat) -> Iterator[Held]:
    """What the other destinations hold that the purge must leave alone."""
    for other in svc.config.destinations.values():
        if other.name == name or (what == "list" and (other.list_id != list_id
                                                      or _list_released(svc.state, other.name))):
            continue
        yield Held(svc.state, other.name, other.list_id)


def is_purge_what(value: object) -> TypeGuard[PurgeWhat]:
    """Whether a value (a query parameter, a stored record's field) names a purge."""
    return value in PURGE_WHATS


def queued_purge(state: StateStore, dest: Destination, what: PurgeWhat, *, by: str) -> dict[str, Any]:
    """The record of a purge not started yet (the HTTP door queues it; the CLI starts it at once)."""
    record = RunRecord.purge(new_run_id(), dest, what, by=by, queued_at=now_iso())
    state.save_run(record)
    return record.to_json()


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
        log.info("%s enabled by %s (disabled at %s by %s)", name, by, was.get("at"), was.get("by"))
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


def _run_purge(svc: Services, dest: Destination, stored: dict[str, Any]) -> dict[str, Any]:
    """Work on an open purge record from its checkpoint; the caller holds the destination's lease (svc.holding: a
    blob lease lapses after 60 s unrenewed, and the timer would start the same purge beside this one).

    First every job the product knows of in the account must be final (a contact whose upsert is pending is
    invisible to search); then what the destination holds and no other destination does is staged, and passes
    remove (or delete) it until a pass finds nobody left: only then is the purge completed. The snapshot outlives a
    list purge (a later purge=contacts needs it); a completed deletion forgets it."""
    record = RunRecord.from_json(stored)
    what: PurgeWhat = record.extra["purge"]
    record.status, record.error, record.started_at = Status.RUNNING, None, record.started_at or now_iso()
    svc.state.save_run(record)
    client = svc.client(dest)
    ck, until = record.checkpoint, time.monotonic() + svc.wait_timeout
    lost = False  # the lease (or the record) went to another holder: nothing more is written
    try:
        if ck.phase != "removing":
            waiting = jobs.settle_account(svc.state, client, jobs.account_of(dest), svc, until=until,
                                          on_wait=svc.keeper.check if svc.keeper else None)
            if waiting:
                raise NotYet(f"SendGrid's jobs of run(s) {', '.join(waiting)} are not final yet; the purge waits "
                             "for them (a contact whose upsert is pending cannot be found)")
            _stage_purge(svc, dest, record)
        _purge_passes(svc, dest, record, client, until)
        held = Held(svc.state, dest.name, dest.list_id)
        if what == "contacts":
            held.drop()
        else:
            held.forget_content()  # out of the list: the next run (once enabled) sends everyone again
        svc.state.drop_staging(dest.name, record.run_id)
        record.status, record.finished_at = Status.COMPLETED, now_iso()
    except ConnectorError as exc:
        record.status = Status.INTERRUPTED
        record.error = redact(str(exc)) + "; the timer goes on (or run the removal again)"
        lost = isinstance(exc, LeaseLost)
    finally:
        client.close()
        if not lost:
            svc.state.save_run(record)
    return record.to_json()


def _purge_passes(svc: Services, dest: Destination, record: RunRecord, client: SendGridClient, until: float) -> None:
    """Passes over the staged set until one acts on nobody; NotYet when SendGrid has not applied them all yet."""
    passes, what = record.checkpoint.removal, record.extra["purge"]
    assert passes is not None
    staged = svc.state.staging_key(dest.name, record.run_id, "targets")

    def checkpoint() -> None:
        record.counts.removal = dict((passes.get("first") or passes.get("counts") or {}), passes=passes["pass"])
        svc.state.save_run(record)
        if svc.progress is not None:
            svc.progress({"phase": "purging", "done": passes["done"], "total": record.extra.get("to_purge", 0),
                          "pass": passes["pass"]})

    act = (functools.partial(mirror.remove_emails, client, dest.list_id) if what == "list"
           else functools.partial(mirror.delete_emails, client))
    if not mirror.until_confirmed(act, "removed" if what == "list" else "deleted",
                                  lambda: snapshots.read_snapshot(svc.state.store, staged), passes,
                                  checkpoint=checkpoint, until=until):
        raise NotYet(f"{passes['last']} contact(s) are not out of SendGrid yet (it applies removals later)")


def _stage_purge(svc: Services, dest: Destination, record: RunRecord) -> None:
    """What the destination holds (snapshot and what runs recorded as sent) minus what the others hold, staged once:
    the passes and a resume work on exactly this set."""
    held = Held(svc.state, dest.name, dest.list_id)
    with contextlib.ExitStack() as stack:
        mine = stack.enter_context(held.emails())
        others = [stack.enter_context(h.emails()) for h in _others(svc, dest.name, dest.list_id,
                                                                   record.extra["purge"])]
        count = snapshots.write_snapshot(svc.state.store, svc.state.staging_key(dest.name, record.run_id, "targets"),
                                         snapshots.subtract_sorted(mine, *others), trusted=True)
    record.checkpoint.phase, record.checkpoint.removal = "removing", mirror.new_passes()
    record.extra["to_purge"] = count
    svc.state.save_run(record)


def _salt(svc: Services) -> bytes:
    """A random salt kept in the state store, made once: hashes of one person stay comparable across erasures."""
    store = svc.state.store
    salt = store.read_bytes(StateStore.SALT_KEY)
    if salt:
        return salt
    with contextlib.suppress(PreconditionFailed):
        store.write_bytes(StateStore.SALT_KEY, pysecrets.token_bytes(32), if_none_match=True)
    return store.read_bytes(StateStore.SALT_KEY) or b""




def _accounts(svc: Services) -> dict[str, list[Destination]]:
    """Every SendGrid account a configured destination writes to (enabled or not), with its destinations."""
    accounts: dict[str, list[Destination]] = {}
    for _, dest in sorted(svc.config.destinations.items()):
        accounts.setdefault(jobs.account_of(dest), []).append(dest)
    return accounts


def _erase_in_account(svc: Services, dest: Destination, address: str, until: float) -> tuple[str, int]:
    """("absent" | "waiting" | "deleting", contacts deleted) in one account. Absent only once every job the product
    knows of there is final and a search finds nobody: a pending upsert would create the contact after a delete."""
    client = svc.client(dest)
    try:
        if jobs.settle_account(svc.state, client, jobs.account_of(dest), svc, until=until):
            return "waiting", 0
        passes = mirror.new_passes()
        done = mirror.until_confirmed(functools.partial(mirror.delete_emails, client), "deleted", lambda: [address],
                                      passes, checkpoint=lambda: None, until=until)
        first = passes.get("first") or {}
        if first.get("invalid"):
            raise NotYet("SendGrid refused to look the person up; nothing was deleted")
        return ("absent" if done else "deleting"), int(first.get("deleted", 0))
    finally:
        client.close()


def erase(svc: Services, email: str, *, by: str = "cli", wait_seconds: float | None = None) -> dict[str, Any]:
    """Forget one person: in every SendGrid account of the configuration, wait until the product's jobs there are
    final, then delete the contact and search again until SendGrid no longer finds it; only then remove the address
    from what each destination holds (snapshot and parts). `completed` only when every account confirmed; otherwise
    `incomplete`, kept open (the address in erasures/open/, deleted when done) for the timer or a second call. The
    report and the logs name the person by a salted hash only."""
    address = single_address(email)  # ConfigError (field 'email') unless exactly one valid address
    person = mirror.erasure_hash(address, _salt(svc))
    until = time.monotonic() + (svc.wait_timeout if wait_seconds is None else wait_seconds)
    report: dict[str, Any] = {"kind": "erasure", "person": person, "by": by, "started_at": now_iso(),
                              "destinations": [], "accounts_deleted": 0, "not_found": 0, "errors": []}
    confirmed = True
    accounts = _accounts(svc)
    for done, dests in enumerate(accounts.values()):
        if svc.progress is not None:
            svc.progress({"phase": "erasing", "accounts_done": done, "accounts": len(accounts)})
        try:
            state, deleted = _erase_in_account(svc, dests[0], address, until)
        except ConnectorError as exc:
            state, deleted = "error", 0
            report["errors"].append(f"{dests[0].name}: {redact(str(exc)).replace(address, person)}; erase again")
        report["accounts_deleted"] += 1 if deleted else 0
        report["not_found"] += 1 if state == "absent" and not deleted else 0
        if state in ("waiting", "deleting"):
            report["errors"].append(f"{dests[0].name}: SendGrid has not finished ({state}); the timer goes on")
        confirmed = confirmed and state == "absent"
    if confirmed:
        _forget_everywhere(svc, address, report)
    report["status"] = "completed" if confirmed and not report["errors"] else "incomplete"
    report["finished_at"] = now_iso()
    _keep_open(svc, person, address, report["status"] != "completed")
    svc.state.store.write_bytes(svc.state.erasure_report_key(new_run_id()), orjson.dumps(report))
    log.info("erasure of %s: %s; destinations %s, %d account(s) deleted it", person, report["status"],
             report["destinations"], report["accounts_deleted"])
    return report


def _forget_everywhere(svc: Services, address: str, report: dict[str, Any]) -> None:
    """The address out of every destination's held set (under each one's lease), once SendGrid confirmed."""
    for name, dest in sorted(svc.config.destinations.items()):
        try:
            lease = svc.state.wait_lease(name, LEASE_WAIT_SECONDS, svc.lease_seconds)
        except LeaseUnavailable:
            report["errors"].append(f"{name}: busy with a run; the contact is deleted, erase again to remove the "
                                    "person from this destination's records")
            continue
        try:
            with lease, LeaseKeeper(lease, what=f"the lease on '{name}'") as keeper:
                held = Held(svc.holding(keeper).state, name, dest.list_id)  # written only while the lease is held
                if held.holds(address):
                    report["destinations"].append(name)
                    held.forget(address)
        except LeaseLost:  # a run has the destination now: its records are left as they were, the erasure says so
            report["errors"].append(f"{name}: a run took the destination over; erase again to finish")


def _keep_open(svc: Services, person: str, address: str, still_open: bool) -> None:
    key = svc.state.open_erasure_key(person)
    if still_open:
        svc.state.store.write_bytes(key, orjson.dumps({"address": address, "since": now_iso()}))
    else:
        svc.state.store.delete(key)


def finish_erasures(svc: Services, wait_seconds: float) -> list[dict[str, Any]]:
    """Go on with every erasure not finished yet (the timer)."""
    done = []
    for info in list(svc.state.store.list(StateStore.OPEN_ERASURES)):
        data = svc.state.store.read_bytes(info.key)
        address = orjson.loads(data).get("address") if data else None
        if isinstance(address, str):
            done.append(erase(svc, address, by="timer", wait_seconds=wait_seconds))
    return done

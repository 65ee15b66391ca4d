"""After a run's contacts are sent: keep what the product holds in step, and in mirror mode take out who left.

Upsert mode: the snapshot becomes the union of what it held and what this run sent (plus what ended runs recorded as
sent and nobody folded yet), so a purge knows everything the product put in the list.

Mirror mode, in phases kept in the run's checkpoint (`phase`), each resumable without reading the export again:
  waiting   the run's own jobs, then every job of the account the product knows about, are final (a contact whose
            upsert is pending is invisible to search: looking it up then would call it gone);
  removing  the leavers (what the list holds from us, minus this export, minus what open runs are still sending)
            are staged, the guard rail decides, and passes over the leavers remove those still on the list until a
            pass finds nobody left on it: SendGrid applies removals later, so only a pass that finds nobody
            confirms them. Until then the leavers stay in the snapshot (the next run would remove them again);
  done      the snapshot is the export (the confirmed leavers subtracted) and the run gets its final status.
The guard rail removes nobody when the export was not read completely (a file error, a missing or empty partition,
too many unreadable rows) or when more than `max_removal_fraction` of the list would go; then the snapshot becomes
the union of what it held and this export, so re-running a good export converges on it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import delta, jobs, mirror, snapshots
from .config import Destination
from .errors import DeadlineReached
from .held import Held
from .record import Checkpoint, Job, RunRecord, Status
from .sendgrid import SendGridClient
from .state import StateStore, now_iso

log = logging.getLogger(__name__)

AFTER_SENDING = ("waiting", "removing")  # phases in which a mirror run goes on without reading its export
CURRENT_FP = "current_fp"  # staged: the export's record lines (delta), sorted


@dataclass
class Sync:
    """What a run's list step needs: the run record (saved through `save`), its destination, client and state."""

    record: RunRecord
    dest: Destination
    state: StateStore
    client: SendGridClient
    settings: jobs.PollSettings
    save: Callable[[], None]
    wait: bool = False
    deadline: float | None = None  # time.monotonic(): stop cleanly (resumable) there
    keep_lease: Callable[[], None] = lambda: None
    progress: Callable[[dict[str, Any]], None] | None = None  # the door's progress line

    def waiting(self) -> None:
        """While SendGrid's jobs are waited for: keep the lease, say how many are done."""
        self.keep_lease()
        if self.progress is not None:
            done = sum(1 for j in self.record.jobs if j.status in jobs.FINAL_JOB)
            self.progress({"phase": "jobs", "pending": len(self.record.jobs) - done, "completed": done})

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def ck(self) -> Checkpoint:
        return self.record.checkpoint

    @property
    def held(self) -> Held:
        return Held(self.state, self.dest.name, self.dest.list_id)

    def staged(self, name: str) -> str:
        return self.state.staging_key(self.dest.name, self.run_id, name)

    def until(self) -> float:
        """Until when waiting on SendGrid may go on: the deadline (in Azure: then the timer goes on); without one,
        settings.wait_timeout with --wait, and not at all without it (the next run or `show` goes on)."""
        if self.deadline is not None:
            return self.deadline
        return time.monotonic() + (self.settings.wait_timeout if self.wait else 0.0)

    @property
    def patient(self) -> bool:
        return self.wait or self.deadline is not None


# --------------------------------------------------------------------------------------------------- entry points


def after_send(sync: Sync) -> None:
    """The run's contacts are all accepted; its export's record lines (`delta`) are staged as `current_fp`."""
    record = sync.record
    record.status = Status.RUNNING
    current = delta.emails(snapshots.read_snapshot(sync.state.store, sync.staged(CURRENT_FP)))
    if sync.dest.mode == "upsert":
        _fold_upsert(sync, current)
        _poll_own(sync)
        return
    count = snapshots.write_snapshot(sync.state.store, sync.staged("current"), current, trusted=True)
    record.mirror = {"current": count}
    sync.ck.phase = "waiting"
    sync.save()
    resume_mirror(sync)


def resume_mirror(sync: Sync) -> None:
    """Go on with a mirror run from its phase (after sending, after a stop, or from the timer)."""
    if sync.ck.phase == "waiting" and not _jobs_settled(sync):
        return
    if sync.ck.phase == "waiting":
        if jobs.outcome(sync.record)[0] is Status.FAILED:  # SendGrid applied nothing: nobody is removed
            _end_unsynced(sync)
            return
        _close_older_submitted(sync)
        if not _stage_leavers(sync):
            return
    if not _remove(sync):
        return
    _finish_mirror(sync)


def finish_submitted(sync: Sync) -> None:
    """A run left `submitted`: bring its jobs (and, in mirror mode, its removals) to their end."""
    if sync.ck.phase in AFTER_SENDING:
        sync.record.status = Status.RUNNING
        resume_mirror(sync)
    else:
        _poll_own(sync)


# ------------------------------------------------------------------------------------------------------- upsert


def _fold_upsert(sync: Sync, current: Iterator[str]) -> None:
    """snapshot := snapshot + this run's export + parts of ended runs. This run's own parts stay until its jobs are
    final (they say which contacts a failed job held); the export holds them anyway."""
    held = sync.held
    held.fold(held.closed_runs(but=sync.run_id), extra=current, written_by=sync.run_id)


def _poll_own(sync: Sync) -> None:
    """The run's own jobs; its final status once they are final, else `submitted` (the timer or `show` goes on)."""
    record = sync.record
    if jobs.poll_jobs(record, sync.client, sync.settings, wait=sync.wait, until=sync.deadline,
                      on_wait=sync.waiting):
        _record_synced(sync)
        _end(sync)
    else:
        record.status = Status.SUBMITTED
        sync.save()


def _end(sync: Sync, status: Status | None = None, error: str | None = None) -> None:
    record = sync.record
    if status is None:
        status, error = jobs.outcome(record)
    record.status, record.finished_at = status, now_iso()
    if error:
        record.error = error
    sync.ck.phase = None
    sync.state.unmark_open_jobs(jobs.account_of(sync.dest), sync.run_id)
    sync.held.delete_parts(sync.run_id)  # folded into the snapshot, and its jobs are final
    sync.state.drop_staging(sync.dest.name, sync.run_id)
    _changes(record)
    sync.save()


def _record_synced(sync: Sync) -> None:
    """The run's jobs are final: the record of what was sent (delta) becomes this export's, but for the contacts
    SendGrid did not confirm, which the next run sends again. Only a run that sent its whole export gets here."""
    info, store = sync.record.extra.get("sync"), sync.state.store
    if not info or store.info(sync.staged(CURRENT_FP)) is None:
        return
    held = sync.held

    def part_emails(job: Job) -> Iterator[str]:
        key = sync.state.sent_key(sync.dest.name, sync.dest.list_id, sync.run_id, job.done) if job.done else None
        return (e for block in (snapshots.read_lines(store, key) if key else [[]]) for e in block)

    with snapshots.EmailSorter() as missing:
        for email in jobs.unconfirmed(sync.record, sync.client, part_emails):
            missing.add(email)
        delta.record_synced(store, held.fingerprints_key, sync.staged(CURRENT_FP), missing.sorted_unique(),
                            dest_fp=info["destination_fp"], full=info["kind"] == "full", written_by=sync.run_id)


def _changes(record: RunRecord) -> None:
    """What the run changed, as its report leads with."""
    changes = record.extra.setdefault("changes", {})
    changes["not_applied"] = record.counts.not_applied or 0
    if record.mirror is not None and "to_remove" in record.mirror:
        changes["removed"] = record.mirror.get("removed", 0)


# ------------------------------------------------------------------------------------------------------- mirror


def _jobs_settled(sync: Sync) -> bool:
    """Phase `waiting`: own jobs final, then every known job of the account. False: stays `submitted`."""
    record = sync.record
    own_final = jobs.poll_jobs(record, sync.client, sync.settings, wait=sync.patient, until=sync.until(),
                               on_wait=sync.waiting)
    account = jobs.account_of(sync.dest)
    if own_final:
        _record_synced(sync)
        sync.state.unmark_open_jobs(account, sync.run_id)
        waiting = jobs.settle_account(sync.state, sync.client, account, sync.settings, until=sync.until(),
                                      on_wait=sync.keep_lease)
    else:
        waiting = [sync.run_id]
    if waiting:
        record.status = Status.SUBMITTED
        record.note = (f"removals wait until SendGrid's jobs are final (runs {', '.join(waiting)}); the next run or "
                       "timer tick goes on")
        sync.save()
        return False
    record.note = None
    return True


def _end_unsynced(sync: Sync) -> None:
    """The run's jobs all failed: what it recorded as sent stays held (folded), and the list is left alone."""
    held = sync.held
    held.fold(held.closed_runs(but=sync.run_id) | {sync.run_id}, written_by=sync.run_id)
    sync.state.drop_staging(sync.dest.name, sync.run_id)
    sync.record.mirror = None
    _end(sync)


def _close_older_submitted(sync: Sync) -> None:
    """Older runs of this destination that finished sending and wait for their removals: this run's diff covers
    theirs (their parts are folded with it), so they are closed instead of removing against an older export."""
    for other in sync.state.open_runs():
        if (other["destination"] == sync.dest.name and other["run_id"] < sync.run_id and other.get("kind") is None
                and other.get("status") == Status.SUBMITTED and other["checkpoint"].get("phase") in AFTER_SENDING):
            older = RunRecord.from_json(other)
            older.status, older.finished_at, older.checkpoint.phase = Status.SUPERSEDED, now_iso(), None
            older.note = f"run {sync.run_id} of a later export removes who left the list"
            older.extra["continued_as"] = sync.run_id
            sync.state.save_run(older)
            sync.state.drop_staging(sync.dest.name, older.run_id)


def _stage_leavers(sync: Sync) -> bool:
    """Stage the leavers and apply the guard rail. False when it refused (the run has ended)."""
    held, store, dest, record = sync.held, sync.state.store, sync.dest, sync.record
    closed = held.closed_runs(but=sync.run_id)  # what the list held before this run (its own parts are its export)
    still_open = held.open_runs(but=sync.run_id)
    parts = held.parts()
    with held.emails(runs=closed) as previous, held.sorted_parts(
            [k for r in still_open for k in parts[r]]) as sending:
        current = snapshots.read_snapshot(store, sync.staged("current"))
        leavers = snapshots.subtract_sorted(previous, current, sending)
        to_remove = snapshots.write_snapshot(store, sync.staged("leavers"), leavers, trusted=True)
    previous_count = _count(held, closed)
    current_count = snapshots.snapshot_size(store, sync.staged("current"))
    plan = mirror.plan_removal(previous_count, current_count, min(to_remove, previous_count),
                               dest.max_removal_fraction)
    incomplete = record.incomplete
    report = record.mirror = record.mirror or {}
    report.update(previous=previous_count, current=current_count, to_remove=to_remove, removed=0, not_found=0,
                  guard_rail="allowed", reason=None)
    if incomplete or not plan.allowed:
        reason = incomplete_reason(incomplete) if incomplete else str(plan.reason)
        report.update(guard_rail="refused", reason=reason, files=[p["file"] for p in incomplete])
        held.fold(closed | {sync.run_id}, extra=snapshots.read_snapshot(store, sync.staged("current")),
                  written_by=sync.run_id)
        sync.state.drop_staging(dest.name, sync.run_id)
        log.info("%s: run %s removed nobody: %s", dest.name, sync.run_id, reason)
        _end(sync, Status.COMPLETED_WITH_ERRORS if incomplete else Status.FAILED, reason)
        return False
    # the leavers stay held until their removal is confirmed; what open runs are sending stays in their parts
    staged = snapshots.union_sorted(snapshots.read_snapshot(store, sync.staged("current")),
                                    snapshots.read_snapshot(store, sync.staged("leavers")))
    held.replace(closed | {sync.run_id}, staged, written_by=sync.run_id)
    sync.ck.phase, sync.ck.removal = "removing", mirror.new_passes()
    sync.save()
    return True


def _count(held: Held, runs: set[str]) -> int:
    with held.emails(runs=runs) as emails:
        return snapshots.count_sorted(emails)


def incomplete_reason(incomplete: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"{p['file']}: {p['why']}" for p in incomplete[:5])
    more = f" (and {len(incomplete) - 5} more)" if len(incomplete) > 5 else ""
    return (f"the export was not read completely, so nobody was removed from the list: {shown}{more}. The contacts "
            "that were read were added; the next complete export removes who left")


def _remove(sync: Sync) -> bool:
    """Removal passes until one finds nobody of the leavers on the list. False: stopped before (resumable)."""
    passes, store = sync.ck.removal, sync.state.store
    report = sync.record.mirror = sync.record.mirror or {}
    assert passes is not None
    if passes.get("confirmed"):
        return True

    def checkpoint() -> None:
        if passes.get("first"):
            first = passes["first"]
            report.update(removed=first["removed"], not_found=first["not_found"], jobs=first["jobs"][-10:])
        report["passes"] = passes["pass"]
        sync.save()
        sync.keep_lease()
        if sync.progress is not None:
            sync.progress({"phase": "removing", "done": passes["done"], "total": report.get("to_remove", 0),
                           "pass": passes["pass"]})
        if sync.deadline is not None and time.monotonic() >= sync.deadline:
            raise DeadlineReached("the run's deadline was reached while removing contacts from the list")

    act = functools.partial(mirror.remove_emails, sync.client, sync.dest.list_id)
    if mirror.until_confirmed(act, "removed", lambda: snapshots.read_snapshot(store, sync.staged("leavers")), passes,
                              checkpoint=checkpoint, until=sync.until()):
        return True
    sync.record.status = Status.SUBMITTED
    sync.record.note = (f"{passes['last']} removal(s) not applied by SendGrid yet; the next run or timer tick checks "
                        "again")
    sync.save()
    return False


def _finish_mirror(sync: Sync) -> None:
    held, store = sync.held, sync.state.store
    meta = snapshots.snapshot_meta(store, held.snapshot_key)
    if meta is not None and meta.get("written_by") == sync.run_id:  # else a later run has rewritten it since
        held.replace(set(), snapshots.diff_sorted(snapshots.read_snapshot(store, held.snapshot_key),
                                                  snapshots.read_snapshot(store, sync.staged("leavers"))),
                     written_by=sync.run_id)
    sync.state.drop_staging(sync.dest.name, sync.run_id)
    sync.ck.removal = None
    sync.record.note = None
    _end(sync)

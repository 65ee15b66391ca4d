"""One run's life, start to end. Every door calls `run` (and the timer `finish_submitted`); it reads as its steps:

  1. the record: a new run, or an unfinished one of the same export version taken up from its checkpoint;
  2. refusals that need no lease (consent, no source);
  3. under the destination's lease, kept by a LeaseKeeper: refusals (disabled), the export claim, then
  4. the attempt: find the export's files, check the list, fields and columns (`_prepare`); a counting pass when
     max_profiles is set, for a dry run or to plan a delta run over a very large record; the stream
     (`stream.Stream`: read, map, pack, send; a delta run sends what its record lacks); the list step
     (`listsync`: fold what was sent; in mirror mode wait for SendGrid's jobs, the guard rail, confirmed removals);
  5. the outcome: every error becomes a status (`_stopped`), and the record is stored (`_store_outcome`).

A run is deterministic for one export version, so resuming replays the export without sending up to the checkpoint
and sends the rest; at most the request in flight at a crash is sent twice (upserts are idempotent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import bulk, contacts, delta, gcpolicy, limits, listsync, mirror, pipeline, report, snapshots, sources
from .config import Destination
from .errors import (
    AuthError,
    ConfigError,
    ConnectorError,
    DeadlineReached,
    ExportIncomplete,
    RateLimited,
    RunRefused,
    SecretError,
    SendGridError,
    StateError,
    TransientError,
)
from .held import Held
from .record import RunRecord, Status
from .redaction import redact
from .sendgrid import SendGridClient
from .services import RunRequest, Services, destination, refusal
from .state import StateStore, new_run_id, now_iso
from .storage import LeaseKeeper, LeaseLost
from .stream import Stream

log = logging.getLogger(__name__)

EXPORT_WAIT_HOURS = 6  # how long an incomplete export is waited for before its run fails
EXPORT_RETRY_FIRST_S, EXPORT_RETRY_MAX_S = 300.0, 3600.0  # the backoff between tries (the timer ticks every 5 min)


def run(req: RunRequest, svc: Services, *, claim: bool = False) -> dict[str, Any]:
    """Run one export (or resume one) and return its report. Raises ConfigError for an unknown or invalid destination
    and LeaseUnavailable when another run holds the destination; everything else ends up in the report.

    With claim, the export version (source, ETag) is claimed in the ledger under the lease: when another run has it
    already, nothing runs and the answer says which run did. A refused run gives its claim back, so the same export
    runs once the configuration is fixed."""
    dest = destination(svc.config, req.destination)
    req = _take_up_unfinished(req, svc, dest)
    record, req, seen = _open_record(req, svc, dest)
    if not dest.consent:  # before waiting on the lease: it cannot run however long it waits
        return _refuse(svc, record, str(refusal(dest, None)))
    if not req.source:
        return _refuse(svc, record, "no source given: name an export (model.json, folder or file)")
    with (svc.state.lease(dest.name, svc.lease_seconds) as lease,
          LeaseKeeper(lease, what=f"the lease on '{dest.name}'") as keeper):
        svc = svc.holding(keeper)  # from here every state write and SendGrid request checks the lease first
        early = _under_lease(req, svc, dest, record, seen, claim)
        if early is not None:
            return early
        return _attempt(Stream(req, svc, dest, record), release_claim=bool(claim or req.resume))


def _take_up_unfinished(req: RunRequest, svc: Services, dest: Destination) -> RunRequest:
    """A new run of an export version that an earlier run left unfinished (crashed, interrupted) goes on from that
    run's checkpoint instead; a queued record of the new run says so and points at it."""
    if req.resume or req.dry_run or not req.source or not req.source_etag:
        return req
    unfinished = _unfinished_run(svc, dest.name, req.source, req.source_etag)
    if not unfinished:
        return req
    log.info("%s: resuming run %s of %s from its checkpoint", dest.name, unfinished, req.source)
    queued = svc.state.load_run(req.run_id) if req.run_id and req.run_id != unfinished else None
    if queued is not None and queued.get("status") == Status.QUEUED:  # it says so: its caller polls it
        _supersede(svc.state, RunRecord.from_json(queued), f"run {unfinished} of the same export was unfinished; it "
                   "went on from its checkpoint", by=unfinished)
    return dataclasses.replace(req, resume=unfinished, run_id=None)


def _open_record(req: RunRequest, svc: Services, dest: Destination
                 ) -> tuple[RunRecord, RunRequest, tuple[str, int] | None]:
    """The run's record (a new one, or the stored one set up for another attempt), the request as the record says
    (a resumed dry run stays dry), and what a resume saw (checked again under the lease)."""
    if not req.resume:
        return RunRecord.new(req.run_id or new_run_id(), dest, trigger=req.trigger, dry_run=req.dry_run,
                             source=req.source, source_etag=req.source_etag, started_at=now_iso()), req, None
    stored = svc.state.load_run(req.resume)
    if stored is None or stored["destination"] != dest.name:
        raise ConfigError(f"no run '{req.resume}' for destination '{dest.name}'")
    record = RunRecord.from_json(stored)
    req = RunRequest(dest.name, record.source, record.source_etag, record.trigger, req.deadline, record.dry_run,
                     req.wait, req.resume, overtakes=req.overtakes, settle=req.settle)
    seen = (str(record.status), record.checkpoint.contacts_done)
    record.resumed()
    return record, req, seen


def _under_lease(req: RunRequest, svc: Services, dest: Destination, record: RunRecord,
                 seen: tuple[str, int] | None, claim: bool) -> dict[str, Any] | None:
    """What is decided once the lease is held: a refusal, a run another process moved on meanwhile, a replaced
    export, the export's claim. An answer ends the run here; None lets it go on."""
    why = refusal(dest, svc.state.disabled(dest.name))  # under the lease: a purge that held it disabled it for good
    if why:
        if req.resume and req.source_etag:  # its claim goes back, so the export runs once it is enabled
            svc.state.release_export(dest.name, str(req.source), req.source_etag, run_id=record.run_id)
        return _refuse(svc, record, why)
    if req.run_id and not req.resume:
        stored = svc.state.load_run(req.run_id)
        if stored is not None and stored.get("status") != Status.QUEUED:  # another delivery ran it meanwhile
            log.info("%s: run %s is %s already; nothing to do", dest.name, req.run_id, stored.get("status"))
            return stored
    if req.resume:
        return _resume_checks(req, svc, dest, record, seen)
    if claim and req.source_etag:
        return _claim(req, svc, dest, record)
    return None


def _resume_checks(req: RunRequest, svc: Services, dest: Destination, record: RunRecord,
                   seen: tuple[str, int] | None) -> dict[str, Any] | None:
    stored = svc.state.load_run(str(req.resume))  # read again under the lease: the holder may have moved it on
    if stored is None or (stored.get("status"), stored["checkpoint"]["contacts_done"]) != seen:
        log.info("%s: run %s moved on while this resume waited; nothing to do", dest.name, req.resume)
        return stored or record.to_json()
    info = svc.sources.info(str(req.source)) if req.source_etag else None
    if info is not None and info.etag != req.source_etag:  # its checkpoint counts rows of the old version
        return _supersede(svc.state, record, "the export was replaced by a new version since this run stopped; the "
                          "new version runs instead")
    if req.overtakes:
        record.extra["overtakes"] = req.overtakes
    if (req.source_etag and not req.dry_run
            and svc.state.export_claim(dest.name, str(req.source), req.source_etag) is None):
        # its process died between saving the run and claiming the export: claim it now, or the timer's
        # latest-export pass would start a second full run of the same version
        svc.state.claim_export(dest.name, str(req.source), req.source_etag, record.run_id)
    return None


def _claim(req: RunRequest, svc: Services, dest: Destination, record: RunRecord) -> dict[str, Any] | None:
    """Claim the export version for this run; the answer of the run that has it already, if one does."""
    source, etag = str(req.source), str(req.source_etag)
    holder = svc.state.export_claim(dest.name, source, etag)
    if holder is None:
        svc.state.save_run(record)  # before the claim: a crash between the two leaves a run the timer resumes
        holder = svc.state.claim_export(dest.name, source, etag, record.run_id)
        if holder is not None:  # claimed in between, by a run that did not hold the lease (a manual run)
            record.status, record.finished_at = Status.SKIPPED, now_iso()
            record.note = f"run {holder.get('run_id')} has this export version already"
            svc.state.save_run(record)
    if holder is not None:
        return {"destination": dest.name, "status": "skipped", "run_id": holder.get("run_id")}
    return None


def _attempt(stream: Stream, *, release_claim: bool) -> dict[str, Any]:
    """The run's work under its lease; whatever stops it becomes its status, and the record is stored."""
    record = stream.record
    started_at = record.checkpoint.contacts_done
    try:
        with gcpolicy.sparse:  # millions of short-lived rows and contacts: see gcpolicy
            _execute(stream)
    except ConnectorError as exc:
        _stopped(record, exc, started_at)
    finally:
        if stream.read:
            stream.rows.fold_into(record)
            if "changes" in record.extra:
                record.extra["changes"]["rejected"] = record.counts.rejected_total
        record.timings["seconds"] = round(time.monotonic() - stream.started, 3)
        failed_save = stream.svc.state.failed_save
        if failed_save is not None and not record.status.is_open:
            # a checkpoint save failed: what SendGrid holds is not known to the store, so nothing is final yet
            record.status, record.error = Status.INTERRUPTED, _stopped_by_storage(failed_save)
            record.extra["resumable"] = True
        if record.status is not Status.RUNNING or stream.req.dry_run:
            record.finished_at = now_iso()
        _store_outcome(stream, release_claim=release_claim)
    return record.to_json()


def _stopped(record: RunRecord, exc: ConnectorError, started_at: int) -> None:
    """The status an error leaves the run in. Waiting on SendGrid or storage, or a deadline: resumable."""
    if isinstance(exc, DeadlineReached):
        _stopped_at_deadline(record, started_at, str(exc))
    elif isinstance(exc, ExportIncomplete):
        _wait_for_export(record, redact(str(exc)))
    elif isinstance(exc, AuthError | SecretError | TransientError | SendGridError):
        # SendGrid unreachable or throttling past our patience: the timer (or the same command) goes on later.
        # A refused key or a block needs a person first; the run stays resumable from its checkpoint.
        waiting = isinstance(exc, TransientError | RateLimited)
        record.status, record.error = (Status.INTERRUPTED if waiting else Status.FAILED), redact(str(exc))
        if isinstance(exc, SendGridError):
            record.extra["resumable"] = True
    elif isinstance(exc, RunRefused):
        record.status, record.error = Status.REFUSED, redact(str(exc))
    elif isinstance(exc, StateError):  # storage unreachable past its retry budget, or the lease lost: the timer goes on
        record.status, record.error = Status.INTERRUPTED, _stopped_by_storage(exc)
        record.extra["resumable"] = True
    else:
        record.status, record.error = Status.FAILED, redact(str(exc))


def _stopped_by_storage(exc: StateError) -> str:
    if isinstance(exc, LeaseLost):
        return (f"{redact(str(exc))}. Whoever holds the destination now goes on; otherwise the timer resumes this run "
                "once its lease is free")
    return (f"the state store failed: {redact(str(exc))}. The run stopped resumable at its last checkpoint; the timer "
            "(or --resume) goes on from there")


def _store_outcome(stream: Stream, *, release_claim: bool) -> None:
    """The run's last writes: its rejections file and its record (and, refused, its export claim back). A run whose
    lease is lost writes nothing (another run may hold the record now); when storage fails, the stored record stays
    at its last checkpoint (`running` or `interrupted`), which the timer resumes once the lease is free."""
    req, svc, dest, record = stream.req, stream.svc, stream.dest, stream.record
    try:
        if record.status is not Status.REFUSED and stream.read:  # a run resumed past its sending keeps its file
            key = svc.state.rejections_key(dest.name, record.run_id)
            svc.state.store.write_stream(key, stream.rows.csv_chunks())
            record.rejections_file = key
        svc.state.save_run(record)
        if release_claim and record.status is Status.REFUSED and req.source_etag:  # it runs once fixed
            svc.state.release_export(dest.name, str(req.source), req.source_etag, run_id=record.run_id)
    except StateError as exc:
        if not record.status.is_open:
            record.status = Status.INTERRUPTED
            record.extra["resumable"] = True
        record.error = (f"{record.error}; " if record.error else "") + (
            f"nothing more was stored ({redact(str(exc))})" if isinstance(exc, LeaseLost) else
            f"the record could not be stored ({redact(str(exc))}): the stored one stays at its last checkpoint and "
            "the timer resumes it")
        log.error("%s: run %s: %s", dest.name, record.run_id, record.error)
    finally:
        stream.rows.close()


def _stopped_at_deadline(record: RunRecord, started_at: int, why: str) -> None:
    """Interrupted (the next run resumes it), unless two attempts in a row moved the checkpoint nowhere: each
    attempt replays the export up to its checkpoint, so a replay that alone outlasts the deadline would never end."""
    ck = record.checkpoint
    ck.stalled = ck.stalled + 1 if ck.contacts_done == started_at else 0
    if ck.stalled >= 2 and ck.phase not in listsync.AFTER_SENDING:
        record.status, record.error = Status.FAILED, (
            f"two attempts in a row reached the deadline ({why}) without SendGrid accepting any more contacts: "
            f"reading this export up to its checkpoint ({ck.contacts_done:,} contacts) takes longer than one "
            "attempt may run. Raise RUN_DEADLINE_SECONDS (the host's functionTimeout allows up to 30 minutes on "
            "Flex Consumption), or export it once from the command line")
        return
    record.status, record.error = Status.INTERRUPTED, f"stopped at the deadline ({why}); the next run resumes it"


def _wait_for_export(record: RunRecord, why: str) -> None:
    """An export seen before it was complete: the run waits (open, status 'waiting') and the timer tries again at
    `retry_at`, backing off from 5 minutes to an hour; after EXPORT_WAIT_HOURS it fails with the reason."""
    wait = record.extra.setdefault("waiting", {"since": time.time(), "attempts": 0})
    wait["attempts"] += 1
    hours = (time.time() - wait["since"]) / 3600
    if hours >= EXPORT_WAIT_HOURS:
        record.status, record.error = Status.FAILED, (
            f"the export stayed incomplete for {hours:.1f} hours, so nothing was sent: {why}. Check the export "
            "(re-run it in the data platform); the next export runs as usual")
        return
    delay = min(EXPORT_RETRY_FIRST_S * 2 ** (wait["attempts"] - 1), EXPORT_RETRY_MAX_S)
    wait["retry_at"] = time.time() + delay
    record.status, record.error = Status.WAITING, (
        f"{why}; trying again in {delay / 60:.0f} minutes (attempt {wait['attempts']}; it gives up after "
        f"{EXPORT_WAIT_HOURS} hours)")


# ----------------------------------------------------------------------------------------------------- the attempt


def _execute(stream: Stream) -> None:
    req, svc, dest, record = stream.req, stream.svc, stream.dest, stream.record
    if record.checkpoint.phase in listsync.AFTER_SENDING:  # sent: its removals go on, nothing is read
        stream.read = False
        with _client(svc, dest, req, record) as client:
            listsync.resume_mirror(_sync(record, dest, svc, client, wait=req.wait, deadline=req.deadline))
        return
    with _client(svc, dest, req, record) as client:
        custom = _prepare(stream, client)
        kind = _sync_kind(stream, custom)
        svc.state.save_run(record)
        if dest.max_profiles is not None or req.dry_run or _planned(stream, kind):
            _first_pass(stream, kind)  # counts, refuses over max_profiles, plans what to send
            if req.dry_run:
                _preview(stream, client)
                record.status = Status.DRY_RUN
                return
            stream.new_reading()
            stream.send_all(client)
        else:  # a full send reads once, a delta run too: the record lines are collected while sending
            if kind.kind == "delta":
                stream.send_only = delta.Unchanged.load(svc.state.store, stream.held.fingerprints_key)
            with snapshots.EmailSorter() as sorter:
                stream.sorter = sorter
                staged: list[dict[str, int]] = []  # what the export changes, found while the last requests are out
                stream.send_all(client, read_all=lambda: staged.append(_stage_and_compare(stream, sorter)))
            _note_changes(stream, staged[0])  # read_all ran: send_all returns only after it, or raises
        listsync.after_send(_sync(record, dest, svc, client, wait=req.wait, deadline=req.deadline))


def _sync_kind(stream: Stream, custom: list[contacts.CustomField]) -> delta.Kind:
    """Full or delta, and why; kept in the record (a resumed run keeps its kind and its plan)."""
    record, dest = stream.record, stream.dest
    if "sync" in record.extra:
        info = record.extra["sync"]
        return delta.Kind(info["kind"], info["why"])
    dest_fp = delta.destination_fingerprint(dest, custom)
    kind = delta.decide(stream.svc.state.store, stream.held.fingerprints_key, dest, dest_fp,
                        full_resync=stream.req.full_resync)
    record.extra["sync"] = kind.to_json() | {"destination_fp": dest_fp}
    return kind


def _planned(stream: Stream, kind: delta.Kind) -> bool:
    """Whether a delta run plans by a counting pass first: when it did so before it was interrupted (its plan is
    staged), or when the record is too large to hold as delta.Unchanged. Otherwise it reads its export once."""
    if kind.kind != "delta":
        return False
    if "changes" in stream.record.extra:
        return True
    return snapshots.snapshot_size(stream.svc.state.store, stream.held.fingerprints_key) > delta.MAX_UNCHANGED_KEYS


def _first_pass(stream: Stream, kind: delta.Kind) -> None:
    """Read the whole export once without sending: counts (max_profiles), the record lines, and for a delta run the
    contacts to send. A resumed run takes the staged plan instead of reading twice more."""
    store, staged = stream.svc.state.store, _staged(stream, listsync.CURRENT_FP)
    if store.info(staged) is None or "changes" not in stream.record.extra:
        with snapshots.EmailSorter() as sorter:
            stream.sorter = sorter
            _count(stream)
            stream.sorter = None
            _stage_current(stream, sorter)
    wanted = _classify(stream, want_filter=kind.kind == "delta")
    stream.send_only = None if wanted is None else delta.Wanted(wanted)


def _preview(stream: Stream, client: SendGridClient) -> None:
    """A dry run's plan: the changes a real run would make now and, in mirror mode, who it would remove (a CSV in the
    state store, `removals_file`) and the guard rail's verdict. Nothing is written to SendGrid."""
    dest, state, record = stream.dest, stream.svc.state, stream.record
    plan: dict[str, Any] = {"changes": dict(record.extra.get("changes", {}))}
    if dest.mode == "mirror":
        held = Held(state, dest.name, dest.list_id)
        current = _staged(stream, listsync.CURRENT_FP)
        key = state.removals_key(dest.name, record.run_id)
        with held.emails() as previous:
            leavers = snapshots.diff_sorted(previous, delta.emails(snapshots.read_snapshot(state.store, current)))
            count = report.write_emails_csv(state.store, key, leavers)
        with held.emails() as previous:
            before = snapshots.count_sorted(previous)
        verdict = mirror.plan_removal(before, snapshots.snapshot_size(state.store, current), min(count, before),
                                      dest.max_removal_fraction)
        refused = record.incomplete or not verdict.allowed
        plan.update(to_remove=count, removals_file=key, guard_rail="refused" if refused else "allowed",
                    reason=listsync.incomplete_reason(record.incomplete) if record.incomplete else verdict.reason)
        plan["changes"]["removed"] = 0 if refused else count
    record.extra["plan"] = plan
    state.drop_staging(dest.name, record.run_id)


def _stage_current(stream: Stream, sorter: snapshots.EmailSorter) -> None:
    snapshots.write_snapshot(stream.svc.state.store, _staged(stream, listsync.CURRENT_FP), sorter.sorted_unique(),
                             trusted=True)


def _classify(stream: Stream, *, want_filter: bool) -> np.ndarray | None:
    """The changes this export brings (new, changed, unchanged), into the record; for a delta run, what to send."""
    changes, wanted = _compare(stream, want_filter=want_filter)
    _note_changes(stream, changes)
    return wanted


def _stage_and_compare(stream: Stream, sorter: snapshots.EmailSorter) -> dict[str, int]:
    """Once the export is read: every contact's record line staged, and the changes against the last record. Runs
    while the last requests are out, so it touches no record field (the senders save the record meanwhile)."""
    _stage_current(stream, sorter)
    return _compare(stream, want_filter=False)[0]


def _compare(stream: Stream, *, want_filter: bool) -> tuple[dict[str, int], np.ndarray | None]:
    """The staged record lines against the last record (delta.classify)."""
    state, held = stream.svc.state, stream.held
    return delta.classify(state.store, held.fingerprints_key, held.snapshot_key, _staged(stream, listsync.CURRENT_FP),
                          want_filter=want_filter)


def _note_changes(stream: Stream, changes: dict[str, int]) -> None:
    stream.record.extra["changes"] = stream.record.extra.get("changes", {}) | changes


def _staged(stream: Stream, name: str) -> str:
    return stream.svc.state.staging_key(stream.dest.name, stream.record.run_id, name)


def _prepare(stream: Stream, client: SendGridClient) -> list[contacts.CustomField]:
    """Before anything is sent: the export's files (an incomplete export waits), its columns, the list, the custom
    fields and the bulk importer; the mapper built from them."""
    req, svc, dest, record = stream.req, stream.svc, stream.dest, stream.record
    found = sources.find(svc.sources, str(req.source), dest.segments)  # SourceError when it holds none of them
    stream.partitions, stream.missing = found.partitions, list(found.missing)
    record.sources = [{"segment": p.segment, "key": p.key} for p in stream.partitions]
    record.warnings += found.notes  # segments not in the export or empty, snapshots a folder cannot tell apart
    infos = {p.key: svc.sources.info(p.key) for p in stream.partitions}
    stream.total_bytes = sum(i.size for i in infos.values() if i is not None) or None
    if req.settle:
        absent = [key for key, found in infos.items() if found is None]
        if absent:
            raise ExportIncomplete(f"{len(absent)} partition(s) it names are not there yet ({', '.join(absent[:3])}"
                                   f"{', ...' if len(absent) > 3 else ''}): the export is incomplete or still being "
                                   "written", file=req.source)
    mapped = {f"mapping {f}": c for f, c in dest.mapping.items()}
    sources.check_columns(svc.sources, stream.partitions, mapped | {f"custom field {n}": c
                                                                    for n, c in dest.custom_fields.items()})
    custom = _fields_and_importer(stream, client)
    stream.mapper = contacts.ContactMapper(dest.mapping, custom, dest.id_column)
    stream.spec = pipeline.MapperSpec.of(dest.mapping, custom, dest.id_column)
    stream.run_warnings = len(record.warnings)
    return custom


def _fields_and_importer(stream: Stream, client: SendGridClient) -> list[contacts.CustomField]:
    """The list must exist; custom field names become ids; the bulk importer is made (or the run warns why not).
    A dry run without a key checks custom fields as text and says so."""
    req, dest, record = stream.req, stream.dest, stream.record
    try:
        if client.get_list(dest.list_id) is None:  # an authenticated read: the key works (a dry run checks it too)
            raise RunRefused(f"list {dest.list_id} does not exist in this SendGrid account: create it or fix list_id")
        defs = client.field_definitions() if dest.custom_fields or dest.bulk_threshold is not None else {}
        custom = _resolve_custom_fields(dest, defs)
        if dest.bulk_threshold is not None:
            try:
                stream.importer = bulk.Importer(dest.mapping, custom, defs.get("reserved_fields", []),
                                                per_file=limits.IMPORT_FILE_CONTACTS)
            except ConfigError as exc:  # e.g. external_id: upserts take it, the import's field ids do not
                record.warnings.append(f"{exc}: every contact of this run goes as JSON requests (bulk_threshold: "
                                       "null says so once and for all)")
        return custom
    except (SecretError, ConfigError) as exc:
        if not req.dry_run:
            raise
        record.warnings.append(f"dry run without SendGrid ({exc}): the key, the list and the custom fields were not "
                               "checked; custom field values are read as text")
        record.extra["unchecked"] = ["api key", "list", "custom fields"]
        return [contacts.CustomField(n, n, "Text", c) for n, c in dest.custom_fields.items()]


def _count(stream: Stream) -> None:
    """The counting pass (max_profiles, dry runs, a delta run's plan): read everything, send nothing. Mapped as
    import lines: no dict and no JSON on the way, and a content digest is taken over the line as it is."""
    stream.encoding = pipeline.CSV  # the sending pass (Stream.work) sets its own
    for _ in stream.kept_chunks():
        pass
    dest, valid = stream.dest, stream.record.counts.valid
    if dest.max_profiles is not None and valid > dest.max_profiles:
        raise RunRefused(f"the export has {valid:,} distinct valid profiles, over max_profiles ({dest.max_profiles:,}) "
                         f"of destination '{dest.name}': nothing was sent. Raise max_profiles (or set it to null for "
                         "no limit) to export it")


@contextlib.contextmanager
def _client(svc: Services, dest: Destination, req: RunRequest, record: RunRecord) -> Iterator[SendGridClient]:
    """A SendGrid client for the attempt: its deadline set; closed at the end, its retries counted in the record."""
    client = svc.client(dest)
    client.deadline = req.deadline
    try:
        yield client
    finally:
        record.requests.client_stats(client.stats)
        client.close()


def _resolve_custom_fields(dest: Destination, defs: Mapping[str, Any]) -> list[contacts.CustomField]:
    if not dest.custom_fields:
        return []
    by_name = {f["name"].lower(): f for f in defs.get("custom_fields", [])}
    unknown = [n for n in dest.custom_fields if n.lower() not in by_name]
    if unknown:
        have = ", ".join(f"{f['name']} ({f['field_type']})" for f in defs.get("custom_fields", [])) or "none"
        raise RunRefused(
            f"destination '{dest.name}': custom field(s) {', '.join(unknown)} do not exist in the SendGrid account "
            f"(custom fields it has: {have}). Create them in SendGrid (Marketing > Custom Fields) or fix custom_fields")
    return [contacts.CustomField(n, by_name[n.lower()]["id"], by_name[n.lower()]["field_type"], col)
            for n, col in dest.custom_fields.items()]


# ----------------------------------------------------------------------------------------- records and other runs


def _refuse(svc: Services, record: RunRecord, message: str) -> dict[str, Any]:
    record.status, record.error, record.finished_at = Status.REFUSED, message, now_iso()
    svc.state.save_run(record)
    return record.to_json()


def _supersede(state: StateStore, record: RunRecord, why: str, by: str | None = None) -> dict[str, Any]:
    """Close a run that another run (or version) makes pointless: status 'superseded', final (nobody starts or
    resumes it), with continued_as naming the run that went on instead, if one did."""
    record.status, record.finished_at, record.note = Status.SUPERSEDED, now_iso(), why
    if by:
        record.extra["continued_as"] = by
    state.save_run(record)
    return record.to_json()


def _unfinished_run(svc: Services, name: str, source: str, etag: str) -> str | None:
    for record in svc.state.open_runs():
        if (record["destination"] == name and record.get("kind") is None and not record.get("dry_run")
                and record["status"] in (Status.RUNNING, Status.INTERRUPTED) and record.get("source") == source
                and record.get("source_etag") == etag):
            return str(record["run_id"])
    return None


def finish_submitted(record: dict[str, Any], svc: Services, *, deadline: float | None = None) -> dict[str, Any]:
    """Bring a run left `submitted` to its end under the destination's lease: poll its jobs and, in mirror mode, go
    on with its removals. LeaseUnavailable when another run holds the destination (the next tick tries again)."""
    dest = destination(svc.config, record["destination"])
    with (svc.state.lease(dest.name, svc.lease_seconds) as lease,
          LeaseKeeper(lease, what=f"the lease on '{dest.name}'") as keeper):
        svc = svc.holding(keeper)
        stored = svc.state.load_run(record["run_id"])  # under the lease: another process may have moved it on
        if stored is None or stored.get("status") != Status.SUBMITTED:
            return stored or record
        current = RunRecord.from_json(stored)
        client = svc.client(dest)
        try:
            listsync.finish_submitted(_sync(current, dest, svc, client, deadline=deadline))
        except ConnectorError as exc:
            log.warning("%s: run %s could not be finished: %s", dest.name, current.run_id, exc)
            if isinstance(exc, LeaseLost):
                return current.to_json()
            removing = current.checkpoint.phase in listsync.AFTER_SENDING  # resumed from its phase
            current.status = Status.INTERRUPTED if removing else Status.SUBMITTED
            current.error = redact(str(exc))
            svc.state.save_run(current)
        finally:
            client.close()
    return current.to_json()


def _sync(record: RunRecord, dest: Destination, svc: Services, client: SendGridClient, *,
          wait: bool = False, deadline: float | None = None) -> listsync.Sync:
    keeper = svc.keeper
    return listsync.Sync(record, dest, svc.state, client, svc, lambda: svc.state.save_run(record), wait=wait,
                         deadline=deadline, keep_lease=keeper.check if keeper is not None else (lambda: None),
                         progress=svc.progress)

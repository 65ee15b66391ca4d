"""One run, start to end: source rows -> contacts -> requests -> SendGrid jobs -> report. Every door calls `run`.

A run is deterministic for one source version, so its checkpoint is a single number: how many de-duplicated contacts
SendGrid has accepted. Resuming replays the source without sending up to that point (rebuilding counts and the
de-duplication state) and sends the rest; at most the request in flight at a crash is sent twice (upserts are
idempotent). Parsing and sending overlap: a sender thread sends one request while the next batch is being built.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import logging
import queue
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import orjson

from . import batching, bulk, contacts, dedup, gcpolicy, jobs, listsync, pipeline, snapshots, sources
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
    SourceError,
    StateError,
    TransientError,
)
from .held import Held
from .secrets import redact
from .sendgrid import InvalidContacts, SendGridClient
from .services import RunRequest, Services, destination, refusal
from .state import OPEN_STATUSES, StateStore, new_run_id, now_iso
from .storage import LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)

REJECTION_SAMPLE = 100
MAX_REJECTION_ROWS = 100_000  # rows in a run's rejections CSV; the rest are counted (counts.rejections_omitted)
EXPORT_WAIT_HOURS = 6  # how long an incomplete export is waited for before its run fails
EXPORT_RETRY_FIRST_S, EXPORT_RETRY_MAX_S = 300.0, 3600.0  # the backoff between tries (the timer ticks every 5 min)
MAX_UNREADABLE_SHARE = 0.01  # a file with more unreadable rows than this share was not read completely


def _neutralise(cell: str) -> str:
    """Cells a spreadsheet would run as a formula get a leading apostrophe."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


class _Rejections:
    """Counts, a sample for the report, and a CSV of the first MAX_REJECTION_ROWS rejected rows (spooled, then
    stored); past that they are counted only (`omitted`), so a hostile export cannot fill the state store."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.sample: list[dict[str, Any]] = []
        self.written = self.omitted = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=4 << 20, mode="w+", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.writer(self._file)
        self._csv.writerow(["file", "line", "reason"])

    def add(self, file: str, line: int | None, rejected: contacts.Rejected) -> None:
        self.by_reason[rejected.reason] += 1
        reason = redact(rejected)
        if len(self.sample) < REJECTION_SAMPLE:
            self.sample.append({"file": file, "line": line, "reason": reason})
        if self.written >= MAX_REJECTION_ROWS:
            self.omitted += 1
            return
        self.written += 1
        self._csv.writerow([_neutralise(file), line or "", _neutralise(reason)])

    def chunks(self) -> Iterator[bytes]:
        self._file.seek(0)
        while block := self._file.read(1 << 20):
            yield block.encode("utf-8")

    def close(self) -> None:
        self._file.close()


def _numbered(chunks: Iterator[tuple[pipeline.MappedChunk, list[int]]],
             index: int) -> Iterator[tuple[pipeline.MappedChunk, list[int], int]]:
    for chunk, keep in chunks:
        yield chunk, keep, index
        index += len(keep)


def _contact_dicts(chunks: Iterable[tuple[pipeline.MappedChunk, list[int], int]]
                   ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(stream index of the first, contacts) per chunk for the bulk path, which writes contacts as CSV rows: the
    chunk's kept contacts decoded in one orjson call (one call per contact cost ~5 us a contact)."""
    for chunk, keep, index in chunks:
        if keep:
            yield index, orjson.loads(b"[" + b",".join([chunk.contact(p) for p in keep]) + b"]")


class _Run:
    def __init__(self, req: RunRequest, svc: Services, dest: Destination, record: dict[str, Any]) -> None:
        self.req, self.svc, self.dest, self.record = req, svc, dest, record
        self.counts = record["counts"]
        self.rejections = _Rejections()
        self.notes: Counter[str] = Counter()
        self.mapper: contacts.ContactMapper | None = None
        self.spec: pipeline.MapperSpec | None = None  # the mapper's recipe, for worker processes
        self.workers = pipeline.worker_count(svc.environ)
        self.trimmed: Counter[str] = Counter()
        self.partitions: list[sources.Partition] = []
        self.importer: bulk.Importer | None = None
        self.run_warnings = 0  # warnings about the run as a whole come first; the reading's follow
        self.sorter: snapshots.EmailSorter | None = None  # every contact of the run, for the list's snapshot
        self.held = Held(svc.state, dest.name, dest.list_id)  # where accepted contacts are recorded as sent
        self.account = jobs.account_of(dest)
        self._jobs_noted = False  # the run is noted under its account as having jobs that may be pending
        self.read = True  # this attempt reads the export (a mirror run resumed past its sending does not)
        self.missing: list[str] = []  # segments of the destination that the export does not hold
        self._last_progress = time.monotonic()
        self._started = time.monotonic()

    # --- reading ------------------------------------------------------------------------------------------------------

    def kept_chunks(self) -> Iterator[tuple[pipeline.MappedChunk, list[int]]]:
        """Mapped chunks in source order, each with the positions of its contacts not seen earlier in the run (the
        run's contacts, de-duplicated); counts, rejections and the snapshot's emails on the way. What was not read
        completely is noted in the record's `incomplete` (mirror mode's guard rail removes nobody then)."""
        deduper = dedup.Deduper()
        rows: dict[str, int] = {}
        for segment in self.missing:
            self._incomplete(str(self.req.source), f"segment {segment} is not in this export")
        unread = 0
        for part in self.partitions:
            tally = {"rows": 0, "unreadable": 0}
            try:
                yield from self._partition_chunks(part, deduper, tally)
            except SourceError as exc:
                msg = redact(str(exc))
                self.record["file_errors"].append(msg)
                self._incomplete(part.key, msg)
                unread += tally["rows"] == 0
            rows[part.key] = tally["rows"]
            if tally["unreadable"] > MAX_UNREADABLE_SHARE * max(tally["rows"], 1):
                self._incomplete(part.key, f"{tally['unreadable']:,} of {tally['rows']:,} rows could not be read")
        if len(rows) > 1 and any(rows.values()):  # a CDM export: an empty partition beside others with rows
            for key, n in rows.items():
                if n == 0 and not any(p["file"] == key for p in self.record["incomplete"]):
                    self._incomplete(key, "0 rows, while other partitions of the export have rows")
        self.counts["valid"] = len(deduper)
        if unread and unread == len(self.partitions):
            raise SourceError(f"no file of the export could be read ({unread} file error(s), see file_errors); nothing "
                              "was sent", file=str(self.req.source))

    def _incomplete(self, file: str, why: str) -> None:
        self.record["incomplete"].append({"file": file, "why": why})

    def _partition_chunks(self, part: sources.Partition, deduper: dedup.Deduper,
                          tally: dict[str, int]) -> Iterator[tuple[pipeline.MappedChunk, list[int]]]:
        assert self.mapper is not None and self.spec is not None
        counts, reject = self.counts, self.rejections.add
        field_notes: list[dict[str, Any]] = self.record["field_notes"]
        for chunk in pipeline.mapped_chunks(self.svc.sources, part, self.mapper, self.spec, (self.mapper.columns[0],),
                                            self.record["warnings"], workers=self.workers):
            counts["read"] += chunk.read
            tally["rows"] += chunk.read
            for line, reason in chunk.rejects:
                reject(part.key, line, reason)
                if reason.reason is contacts.Reason.UNREADABLE_ROW:
                    tally["unreadable"] += 1
            for line, note in chunk.notes:
                self.notes.update(note.fields)
                if len(field_notes) < REJECTION_SAMPLE:
                    field_notes.append({"file": part.key, "line": line, "note": note})
            if chunk.trimmed:
                self.trimmed.update(chunk.trimmed)
            if chunk.emails:
                keep: list[int] = np.flatnonzero(deduper.first_seen(chunk.fps)).tolist()
                counts["duplicates"] += len(chunk.emails) - len(keep)
                if keep:
                    if self.sorter is not None:  # every contact of the run, for the list's snapshot
                        emails = chunk.emails
                        self.sorter.extend(emails if len(keep) == len(emails) else [emails[k] for k in keep])
                    yield chunk, keep
            self.tick()
            self._deadline_check("while reading the export")

    def tick(self) -> None:
        now = time.monotonic()
        if self.svc.keeper is not None:  # the reading stops at once when the lease is lost
            self.svc.keeper.check()
        if self.svc.progress and now - self._last_progress >= 2.0:
            self._last_progress = now
            elapsed = now - self._started
            self.svc.progress({"read": self.counts["read"], "sent": self.counts["sent"],
                               "rate": self.counts["read"] / elapsed if elapsed else 0.0})

    # --- sending ------------------------------------------------------------------------------------------------------

    def work(self) -> Iterator[tuple[str, Any]]:
        """What the sender sends, in order: ("json", ContactBatch) request batches for the first bulk_threshold
        contacts, then ("csv", ImportFile) gzip CSV files of up to 1,000,000 contacts for the rest. Contacts before
        the checkpoint are replayed (counted, de-duplicated) but not sent."""
        skip = self.record["checkpoint"]["contacts_done"]
        limit = self.dest.bulk_threshold if self.importer is not None else None
        packer = batching.Packer(batching.body_overhead([self.dest.list_id]))
        chunks = self.kept_chunks()
        index = 0  # stream index of the chunk's first kept contact
        for chunk, keep in chunks:
            start, index = index, index + len(keep)
            if index <= skip:
                continue
            if start < skip:
                keep, start = keep[skip - start :], skip
            cut = len(keep) if limit is None else min(len(keep), max(0, limit - start))
            for batch in packer.add(chunk.data, chunk.ends, chunk.emails, keep[:cut], start):
                yield "json", batch
            if cut < len(keep):
                if (batch := packer.flush()) is not None:
                    yield "json", batch
                assert self.importer is not None
                rest = itertools.chain([(chunk, keep[cut:], start + cut)], _numbered(chunks, index))
                yield from (("csv", f) for f in self.importer.files(_contact_dicts(rest)))
                return
        if (batch := packer.flush()) is not None:
            yield "json", batch

    def send_all(self, client: SendGridClient) -> None:
        # two batches (~8 MB each) may wait while one is in flight and the next is packed. With room for one, 5M runs
        # waited 9-23 s beyond their CPU time (the sandbox answers slower as its store grows); with two, 0.2 s.
        q: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        stop = threading.Event()

        def sender() -> None:
            try:
                while (item := q.get()) is not None:
                    if stop.is_set():
                        continue
                    kind, payload = item
                    if kind == "json":
                        self.send_batch(client, payload)
                    else:
                        self.send_import(client, payload)
            except BaseException as exc:
                failure.append(exc)
                stop.set()
                while q.get() is not None:  # drain so the producer never blocks
                    pass

        thread = threading.Thread(target=sender, name="sendgrid-sender", daemon=True)
        thread.start()
        try:
            for item in self.work():
                if stop.is_set():
                    break
                q.put(item)
        finally:
            q.put(None)
            thread.join()
            if self.importer is not None:
                self.importer.cleanup()
        if failure:
            raise failure[0]

    def _deadline_check(self, where: str = "before the next request") -> None:
        if self.req.deadline is not None and time.monotonic() >= self.req.deadline:
            raise DeadlineReached(f"the run's deadline was reached {where}")

    def _accepted(self, job: dict[str, Any], last_index: int, body_bytes: int, count: int,
                  record_sent: Callable[[int], None]) -> None:
        """Record an accepted request or import and move the checkpoint past it. What SendGrid accepted is recorded
        as sent (`record_sent(done)`) and the run noted under its account before the checkpoint moves: whatever
        becomes of the run, erasure and purge find those contacts, and removals wait for the job."""
        if self.record["timings"].get("first_request_s") is None:
            self.record["timings"]["first_request_s"] = round(time.monotonic() - self._started, 3)
        record_sent(last_index + 1)
        if not self._jobs_noted:
            self.svc.state.mark_open_jobs(self.account, self.record["run_id"], self.dest.name)
            self._jobs_noted = True
        self.record["jobs"].append(job)
        req = self.record["requests"]
        req["count"] += 1
        req["bytes"] += body_bytes
        req["max_bytes"] = max(req["max_bytes"], body_bytes)
        req["max_contacts"] = max(req["max_contacts"], count)
        ck = self.record["checkpoint"]
        ck["contacts_done"] = last_index + 1
        self.counts["sent"] = ck["contacts_done"] - ck["refused_by_sendgrid"]
        self.svc.state.save_run(self.record)

    def send_import(self, client: SendGridClient, f: bulk.ImportFile) -> None:
        self._deadline_check()
        started = client.start_import([self.dest.list_id], f.field_mappings)
        with open(f.path, "rb") as fh:
            client.upload(started["upload_uri"], started.get("upload_headers", []), fh, f.size)
        self.record["requests"]["imports"] = self.record["requests"].get("imports", 0) + 1
        try:
            self._accepted({"id": str(started["job_id"]), "kind": "import", "contacts": f.count, "status": "pending"},
                           f.last_index, f.size, f.count,
                           lambda done: self.held.record_file(self.record["run_id"], done, f.emails_path))
        finally:
            f.discard()

    def send_batch(self, client: SendGridClient, batch: batching.ContactBatch) -> None:
        self._deadline_check()
        ck = self.record["checkpoint"]
        live, refused_here = batch, 0
        while len(live):
            body = live.body([self.dest.list_id])
            try:
                job_id = client.upsert(body)
            except InvalidContacts as bad:
                refused = bad.positions(live.emails)
                if not refused:
                    raise
                for pos in sorted(refused):
                    email = live.emails[pos][:80]
                    self.rejections.add("SendGrid", None, contacts.Rejected(
                        f"refused by SendGrid: email '{email}' is not valid", contacts.Reason.REFUSED_BY_SENDGRID))
                refused_here += len(refused)
                live = live.without(refused)
                continue
            # counted with the checkpoint that passes the batch: a resume re-sends (and re-counts) an unfinished one
            ck["refused_by_sendgrid"] += refused_here
            self._accepted({"id": job_id, "contacts": len(live), "status": "pending"}, batch.last_index, len(body),
                           len(live), functools.partial(self.held.record, self.record["run_id"], emails=live.emails))
            return
        ck["refused_by_sendgrid"] += refused_here
        ck["contacts_done"] = batch.last_index + 1  # every contact of the batch was refused
        self.svc.state.save_run(self.record)


def _new_record(req: RunRequest, dest: Destination, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "destination": dest.name,
        "display_name": dest.display_name,
        "list_id": dest.list_id,
        "mode": dest.mode,
        "trigger": req.trigger,
        "dry_run": req.dry_run,
        "source": req.source,
        "source_etag": req.source_etag,
        "sources": [],
        "started_at": now_iso(),
        "finished_at": None,
        "status": "running",
        "error": None,
        "warnings": [],
        "file_errors": [],
        "incomplete": [],
        "counts": {"read": 0, "valid": 0, "rejected": {}, "rejected_total": 0, "duplicates": 0, "trimmed": {},
                   "field_notes": {}, "sent": 0},
        "requests": {"count": 0, "bytes": 0, "max_bytes": 0, "max_contacts": 0, "imports": 0, "retries": 0,
                     "rate_limited": 0},
        "jobs": [],
        "rejections": [],
        "field_notes": [],
        "rejections_file": None,
        "checkpoint": {"contacts_done": 0, "refused_by_sendgrid": 0, "resumed": 0},
        "timings": {"seconds": None, "first_request_s": None},
    }


def _refuse(svc: Services, record: dict[str, Any], message: str) -> dict[str, Any]:
    record.update(status="refused", error=message, finished_at=now_iso())
    svc.state.save_run(record)
    return record


def _supersede(state: StateStore, record: dict[str, Any], why: str, by: str | None = None) -> dict[str, Any]:
    """Close a run that another run (or version) makes pointless: status 'superseded', final (nobody starts or
    resumes it), with continued_as naming the run that went on instead, if one did."""
    record.update(status="superseded", finished_at=now_iso(), note=why, **({"continued_as": by} if by else {}))
    state.save_run(record)
    return record


def _unfinished_run(svc: Services, name: str, source: str, etag: str) -> str | None:
    for record in svc.state.open_runs():
        if (record["destination"] == name and record.get("kind") is None and not record.get("dry_run")
                and record["status"] in ("running", "interrupted") and record.get("source") == source
                and record.get("source_etag") == etag):
            return str(record["run_id"])
    return None


def run(req: RunRequest, svc: Services, *, claim: bool = False) -> dict[str, Any]:
    """Run one export (or resume one) and return its report. Raises ConfigError for an unknown or invalid destination
    and LeaseUnavailable when another run holds the destination; everything else ends up in the report.

    With claim, the export version (source, ETag) is claimed in the ledger under the lease: when another run has it
    already, nothing runs and the answer says which run did. A refused run gives its claim back, so the same export
    runs once the configuration is fixed."""
    dest = destination(svc.config, req.destination)
    if not req.resume and not req.dry_run and req.source and req.source_etag:
        unfinished = _unfinished_run(svc, dest.name, req.source, req.source_etag)
        if unfinished:  # a crashed or interrupted run of this very export: go on from its checkpoint
            log.info("%s: resuming run %s of %s from its checkpoint", dest.name, unfinished, req.source)
            queued = svc.state.load_run(req.run_id) if req.run_id and req.run_id != unfinished else None
            if queued is not None and queued.get("status") == "queued":  # it says so: its caller polls it
                _supersede(svc.state, queued, f"run {unfinished} of the same export was unfinished; it went on from "
                           "its checkpoint", by=unfinished)
            req = dataclasses.replace(req, resume=unfinished, run_id=None)
    if req.resume:
        record = svc.state.load_run(req.resume)
        if record is None or record["destination"] != dest.name:
            raise ConfigError(f"no run '{req.resume}' for destination '{dest.name}'")
        req = RunRequest(dest.name, record["source"], record.get("source_etag"), record["trigger"], req.deadline,
                         bool(record.get("dry_run")), req.wait, req.resume, overtakes=req.overtakes,
                         settle=req.settle)  # dry stays dry
        seen = (record.get("status"), record["checkpoint"]["contacts_done"])  # checked again under the lease
        record["checkpoint"]["resumed"] += 1
        record.pop("resumable", None)
        record.update(status="running", error=None, finished_at=None)
        if record["checkpoint"].get("phase") not in listsync.AFTER_SENDING:  # else its counts stand: nothing is read
            fresh = _new_record(req, dest, record["run_id"])  # the replay recounts everything but what was sent
            ck = record["checkpoint"]
            fresh["counts"]["sent"] = ck["contacts_done"] - ck["refused_by_sendgrid"]
            record.update(warnings=[], file_errors=[], rejections=[], field_notes=[], counts=fresh["counts"],
                          incomplete=[])
    else:
        record = _new_record(req, dest, req.run_id or new_run_id())
    if not dest.consent:  # before waiting on the lease: it cannot run however long it waits
        return _refuse(svc, record, str(refusal(dest, None)))
    if not req.source:
        return _refuse(svc, record, "no source given: name an export (model.json, folder or file)")
    with (svc.state.lease(dest.name, svc.lease_seconds) as lease,
          LeaseKeeper(lease, what=f"the lease on '{dest.name}'") as keeper):
        svc = svc.holding(keeper)  # from here every state write and SendGrid request checks the lease first
        why = refusal(dest, svc.state.disabled(dest.name))  # under the lease: a purge that held it disabled it for good
        if why:
            if req.resume and req.source_etag:  # its claim goes back, so the export runs once it is enabled
                svc.state.release_export(dest.name, str(req.source), req.source_etag, run_id=record["run_id"])
            return _refuse(svc, record, why)
        if req.run_id and not req.resume:
            stored = svc.state.load_run(req.run_id)
            if stored is not None and stored.get("status") != "queued":  # another delivery ran it meanwhile
                log.info("%s: run %s is %s already; nothing to do", dest.name, req.run_id, stored.get("status"))
                return stored
        if req.resume:
            stored = svc.state.load_run(req.resume)  # read again under the lease: the holder may have moved it on
            if stored is None or (stored.get("status"), stored["checkpoint"]["contacts_done"]) != seen:
                log.info("%s: run %s moved on while this resume waited; nothing to do", dest.name, req.resume)
                return stored or record
            info = svc.sources.info(str(req.source)) if req.source_etag else None
            if info is not None and info.etag != req.source_etag:  # its checkpoint counts rows of the old version
                return _supersede(svc.state, record, "the export was replaced by a new version since this run "
                                  "stopped; the new version runs instead")
            if req.overtakes:
                record["overtakes"] = req.overtakes
            if (req.source_etag and not req.dry_run
                    and svc.state.export_claim(dest.name, str(req.source), req.source_etag) is None):
                # its process died between saving the run and claiming the export: claim it now, or the timer's
                # latest-export pass would start a second full run of the same version
                svc.state.claim_export(dest.name, str(req.source), req.source_etag, record["run_id"])
        if claim and not req.resume and req.source_etag:
            holder = svc.state.export_claim(dest.name, req.source, req.source_etag)
            if holder is None:
                svc.state.save_run(record)  # before the claim: a crash between the two leaves a run the timer resumes
                holder = svc.state.claim_export(dest.name, req.source, req.source_etag, record["run_id"])
                if holder is not None:  # claimed in between, by a run that did not hold the lease (a manual run)
                    record.update(status="skipped", finished_at=now_iso(),
                                  note=f"run {holder.get('run_id')} has this export version already")
                    svc.state.save_run(record)
            if holder is not None:
                return {"destination": dest.name, "status": "skipped", "run_id": holder.get("run_id")}
        state = _Run(req, svc, dest, record)
        started_at = record["checkpoint"]["contacts_done"]
        try:
            with gcpolicy.sparse:  # millions of short-lived rows and contacts: see gcpolicy
                _execute(state)
        except DeadlineReached as exc:
            _stopped_at_deadline(record, started_at, str(exc))
        except ExportIncomplete as exc:
            _wait_for_export(record, redact(str(exc)))
        except (AuthError, SecretError, TransientError, SendGridError) as exc:
            # SendGrid unreachable or throttling past our patience: the timer (or the same command) goes on later.
            # A refused key or a block needs a person first; the run stays resumable from its checkpoint.
            waiting = isinstance(exc, TransientError | RateLimited)
            record.update(status="interrupted" if waiting else "failed", error=redact(str(exc)),
                          resumable=isinstance(exc, SendGridError))
        except RunRefused as exc:
            record.update(status="refused", error=redact(str(exc)))
        except StateError as exc:  # storage unreachable past its retry budget, or the lease lost: the timer goes on
            record.update(status="interrupted", error=_stopped_by_storage(exc), resumable=True)
        except ConnectorError as exc:
            record.update(status="failed", error=redact(str(exc)))
        finally:
            if state.read:
                _finish_counts(state)
            record["timings"]["seconds"] = round(time.monotonic() - state._started, 3)
            if svc.state.failed_save is not None and record["status"] not in OPEN_STATUSES:
                # a checkpoint save failed: what SendGrid holds is not known to the store, so nothing is final yet
                record.update(status="interrupted", error=_stopped_by_storage(svc.state.failed_save), resumable=True)
            if record["status"] != "running" or req.dry_run:
                record["finished_at"] = now_iso()
            _store_outcome(state, release_claim=bool(claim or req.resume))
    return record


def _stopped_by_storage(exc: StateError) -> str:
    if isinstance(exc, LeaseLost):
        return (f"{redact(str(exc))}. Whoever holds the destination now goes on; otherwise the timer resumes this run "
                "once its lease is free")
    return (f"the state store failed: {redact(str(exc))}. The run stopped resumable at its last checkpoint; the timer "
            "(or --resume) goes on from there")


def _store_outcome(state: _Run, *, release_claim: bool) -> None:
    """The run's last writes: its rejections file and its record (and, refused, its export claim back). A run whose
    lease is lost writes nothing (another run may hold the record now); when storage fails, the stored record stays
    at its last checkpoint (`running` or `interrupted`), which the timer resumes once the lease is free."""
    req, svc, dest, record = state.req, state.svc, state.dest, state.record
    try:
        if record["status"] != "refused" and state.read:  # a run resumed past its sending read nothing: keep its file
            key = f"runs/{dest.name}/{record['run_id']}.rejections.csv"
            svc.state.store.write_stream(key, state.rejections.chunks())
            record["rejections_file"] = key
        svc.state.save_run(record)
        if release_claim and record["status"] == "refused" and req.source_etag:  # it runs once fixed
            svc.state.release_export(dest.name, str(req.source), req.source_etag, run_id=record["run_id"])
    except StateError as exc:
        if record["status"] not in OPEN_STATUSES:
            record.update(status="interrupted", resumable=True)
        record["error"] = (f"{record.get('error') or ''}; " if record.get("error") else "") + (
            f"nothing more was stored ({redact(str(exc))})" if isinstance(exc, LeaseLost) else
            f"the record could not be stored ({redact(str(exc))}): the stored one stays at its last checkpoint and "
            "the timer resumes it")
        log.error("%s: run %s: %s", dest.name, record["run_id"], record["error"])
    finally:
        state.rejections.close()


def _stopped_at_deadline(record: dict[str, Any], started_at: int, why: str) -> None:
    """Interrupted (the next run resumes it), unless two attempts in a row moved the checkpoint nowhere: each
    attempt replays the export up to its checkpoint, so a replay that alone outlasts the deadline would never end."""
    ck = record["checkpoint"]
    stalled = ck["stalled"] = ck.get("stalled", 0) + 1 if ck["contacts_done"] == started_at else 0
    if stalled >= 2 and ck.get("phase") not in listsync.AFTER_SENDING:
        record.update(status="failed", error=(
            f"two attempts in a row reached the deadline ({why}) without SendGrid accepting any more contacts: "
            f"reading this export up to its checkpoint ({ck['contacts_done']:,} contacts) takes longer than one "
            "attempt may run. Raise RUN_DEADLINE_SECONDS (the host's functionTimeout allows up to 30 minutes on "
            "Flex Consumption), or export it once from the command line"))
        return
    record.update(status="interrupted", error=f"stopped at the deadline ({why}); the next run resumes it")


def _wait_for_export(record: dict[str, Any], why: str) -> None:
    """An export seen before it was complete: the run waits (open, status 'waiting') and the timer tries again at
    `retry_at`, backing off from 5 minutes to an hour; after EXPORT_WAIT_HOURS it fails with the reason."""
    wait = record.setdefault("waiting", {"since": time.time(), "attempts": 0})
    wait["attempts"] += 1
    hours = (time.time() - wait["since"]) / 3600
    if hours >= EXPORT_WAIT_HOURS:
        record.update(status="failed", error=f"the export stayed incomplete for {hours:.1f} hours, so nothing was "
                      f"sent: {why}. Check the export (re-run it in the data platform); the next export runs as usual")
        return
    delay = min(EXPORT_RETRY_FIRST_S * 2 ** (wait["attempts"] - 1), EXPORT_RETRY_MAX_S)
    wait["retry_at"] = time.time() + delay
    record.update(status="waiting", error=f"{why}; trying again in {delay / 60:.0f} minutes (attempt "
                  f"{wait['attempts']}; it gives up after {EXPORT_WAIT_HOURS} hours)")


def finish_submitted(record: dict[str, Any], svc: Services, *, deadline: float | None = None) -> dict[str, Any]:
    """Bring a run left `submitted` to its end under the destination's lease: poll its jobs and, in mirror mode, go
    on with its removals. LeaseUnavailable when another run holds the destination (the next tick tries again)."""
    dest = destination(svc.config, record["destination"])
    with (svc.state.lease(dest.name, svc.lease_seconds) as lease,
          LeaseKeeper(lease, what=f"the lease on '{dest.name}'") as keeper):
        svc = svc.holding(keeper)
        current = svc.state.load_run(record["run_id"])  # under the lease: another process may have moved it on
        if current is None or current.get("status") != "submitted":
            return current or record
        client = svc.client(dest)
        try:
            listsync.finish_submitted(_sync(current, dest, svc, client, deadline=deadline))
        except (DeadlineReached, ConnectorError) as exc:
            log.warning("%s: run %s could not be finished: %s", dest.name, current["run_id"], exc)
            if isinstance(exc, LeaseLost):
                return current
            removing = current["checkpoint"].get("phase") in listsync.AFTER_SENDING  # resumed from its phase
            current.update(status="interrupted" if removing else "submitted", error=redact(str(exc)))
            svc.state.save_run(current)
        finally:
            client.close()
    return current


def _sync(record: dict[str, Any], dest: Destination, svc: Services, client: SendGridClient, *,
          wait: bool = False, deadline: float | None = None) -> listsync.Sync:
    keeper = svc.keeper
    return listsync.Sync(record, dest, svc.state, client, svc, lambda: svc.state.save_run(record), wait=wait,
                         deadline=deadline, keep_lease=keeper.check if keeper is not None else (lambda: None))


def _finish_counts(state: _Run) -> None:
    rec, counts = state.record, state.record["counts"]
    rejected = Counter({str(reason): n for reason, n in state.rejections.by_reason.items()})
    # SendGrid's refusals as checkpointed, an earlier attempt's included (a resumed run does not re-send those batches)
    rejected[contacts.Reason.REFUSED_BY_SENDGRID.value] = rec["checkpoint"]["refused_by_sendgrid"]
    counts["rejected"] = {reason: n for reason, n in rejected.items() if n}
    counts["rejected_total"] = sum(counts["rejected"].values())
    counts["rejections_omitted"] = state.rejections.omitted
    counts["field_notes"] = dict(state.notes)
    counts["trimmed"] = dict(state.trimmed)
    rec["rejections"] = state.rejections.sample


def _execute(state: _Run) -> None:
    req, svc, dest, record = state.req, state.svc, state.dest, state.record
    if record["checkpoint"].get("phase") in listsync.AFTER_SENDING:  # sent: its removals go on, nothing is read
        state.read = False
        client = svc.client(dest)
        try:
            listsync.resume_mirror(_sync(record, dest, svc, client, wait=req.wait, deadline=req.deadline))
        finally:
            client.close()
        return
    found = sources.find(svc.sources, req.source, dest.segments)  # SourceError when it holds none of them
    state.partitions = found.partitions
    state.missing = list(found.missing)
    record["sources"] = [{"segment": p.segment, "key": p.key} for p in state.partitions]
    record["warnings"] += found.notes  # segments not in the export or empty, snapshots a folder cannot tell apart
    if req.settle:
        absent = [p.key for p in state.partitions if svc.sources.info(p.key) is None]
        if absent:
            raise ExportIncomplete(f"{len(absent)} partition(s) it names are not there yet ({', '.join(absent[:3])}"
                                   f"{', ...' if len(absent) > 3 else ''}): the export is incomplete or still being "
                                   "written", file=req.source)
    mapped = {f"mapping {f}": c for f, c in dest.mapping.items()}
    sources.check_columns(svc.sources, state.partitions, mapped | {f"custom field {n}": c
                                                                   for n, c in dest.custom_fields.items()})
    client: SendGridClient | None = None
    custom: list[contacts.CustomField] = []
    try:
        client = svc.client(dest)
        client.deadline = req.deadline
        if not req.dry_run and client.get_list(dest.list_id) is None:
            raise RunRefused(f"list {dest.list_id} does not exist in this SendGrid account: create it or fix list_id")
        defs = client.field_definitions() if dest.custom_fields or dest.bulk_threshold is not None else {}
        custom = _resolve_custom_fields(dest, defs)
        if dest.bulk_threshold is not None:
            try:
                state.importer = bulk.Importer(dest.mapping, custom, defs.get("reserved_fields", []))
            except ConfigError as exc:  # e.g. external_id: upserts take it, the import's field ids do not
                record["warnings"].append(f"{exc}: every contact of this run goes as JSON requests "
                                          "(bulk_threshold: null says so once and for all)")
    except (SecretError, ConfigError) as exc:
        if not req.dry_run:
            raise
        record["warnings"].append(f"dry run without SendGrid: {exc}; custom fields are checked as text")
        custom = [contacts.CustomField(n, n, "Text", c) for n, c in dest.custom_fields.items()]
    state.mapper = contacts.ContactMapper(dest.mapping, custom)
    state.spec = pipeline.MapperSpec.of(dest.mapping, custom)
    state.run_warnings = len(record["warnings"])
    svc.state.save_run(record)
    try:
        if dest.max_profiles is not None or req.dry_run:
            for _ in state.kept_chunks():
                pass
            if dest.max_profiles is not None and record["counts"]["valid"] > dest.max_profiles:
                raise RunRefused(
                    f"the export has {record['counts']['valid']:,} distinct valid profiles, over max_profiles "
                    f"({dest.max_profiles:,}) of destination '{dest.name}': nothing was sent. Raise max_profiles "
                    "(or set it to null for no limit) to export it")
            if req.dry_run:
                record["status"] = "dry_run"
                return
            _reset_counts(state)
        assert client is not None
        state.sorter = snapshots.EmailSorter()
        state.send_all(client)
        listsync.after_send(_sync(record, dest, svc, client, wait=req.wait, deadline=req.deadline),
                            state.sorter.sorted_unique())
    finally:
        if state.sorter is not None:
            state.sorter.close()
        if client is not None:
            for k in ("retries", "rate_limited"):
                record["requests"][k] += client.stats[k]
            client.close()


def _reset_counts(state: _Run) -> None:
    """The counting pass's tallies are replaced by the sending pass's."""
    counts = state.record["counts"]
    counts.update(read=0, valid=0, duplicates=0)
    state.rejections.close()
    state.rejections = _Rejections()
    state.notes.clear()
    state.record["field_notes"] = []
    state.record["warnings"] = state.record["warnings"][: state.run_warnings]  # the run's, not the reading's
    state.record["file_errors"] = []
    state.record["incomplete"] = []
    state.trimmed.clear()


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

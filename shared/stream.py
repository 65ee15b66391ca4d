"""A run's stream: read the export, map and de-duplicate its rows, pack them into requests and send them.

Rows are read and mapped chunk by chunk (`pipeline`), de-duplicated by fingerprint (`dedup`: first occurrence wins),
and packed (`batching.Packer`) into requests within SendGrid's limits; past `bulk_threshold` contacts the rest goes
as gzip CSV import files (`bulk`). A sender thread sends while the next batch is packed. The stream is deterministic
for one export version, so the checkpoint is one number (`contacts_done`): a resumed run replays the export, counting
and de-duplicating, and sends from there. What SendGrid accepted is recorded as sent (`held`) and the run noted under
its account (`jobs`) before the checkpoint moves past it.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import orjson

from . import batching, bulk, contacts, dedup, jobs, pipeline, snapshots, sources
from .config import Destination
from .errors import DeadlineReached, SourceError
from .held import Held
from .record import Job, RunRecord
from .redaction import redact
from .report import RowReport
from .sendgrid import InvalidContacts, SendGridClient
from .services import RunRequest, Services

MAX_UNREADABLE_SHARE = 0.01  # a file with more unreadable rows than this share was not read completely
SENDER_QUEUE = 2  # batches (~8 MB each) that may wait while one is in flight and the next is packed

Chunk = tuple[pipeline.MappedChunk, list[int]]  # a mapped chunk and the positions of its contacts not seen before


class Stream:
    """One attempt of a run over its export. `prepare` (engine) sets the mapper, the partitions and the importer;
    `kept_chunks` reads; `send_all` reads and sends."""

    def __init__(self, req: RunRequest, svc: Services, dest: Destination, record: RunRecord) -> None:
        self.req, self.svc, self.dest, self.record = req, svc, dest, record
        self.rows = RowReport()
        self.mapper: contacts.ContactMapper | None = None
        self.spec: pipeline.MapperSpec | None = None  # the mapper's recipe, for worker processes
        self.workers = pipeline.worker_count(svc.environ)
        self.partitions: list[sources.Partition] = []
        self.missing: list[str] = []  # segments of the destination that the export does not hold
        self.importer: bulk.Importer | None = None
        self.run_warnings = 0  # warnings about the run as a whole come first; the reading's follow
        self.sorter: snapshots.EmailSorter | None = None  # every contact of the run, for the list's snapshot
        self.held = Held(svc.state, dest.name, dest.list_id)  # where accepted contacts are recorded as sent
        self.account = jobs.account_of(dest)
        self._jobs_noted = False  # the run is noted under its account as having jobs that may be pending
        self.read = True  # this attempt reads the export (a mirror run resumed past its sending does not)
        self.encoding = pipeline.JSON  # what chunks mapped from now on are encoded as (work() switches it to CSV)
        self._last_progress = self.started = time.monotonic()

    # --- reading ------------------------------------------------------------------------------------------------------

    def new_reading(self) -> None:
        """Forget what an earlier pass over the export counted (the counting pass before the sending pass)."""
        self.rows.close()
        self.rows = RowReport()
        counts = self.record.counts
        counts.read = counts.valid = counts.duplicates = 0
        self.record.warnings = self.record.warnings[: self.run_warnings]  # the run's, not the reading's
        self.record.file_errors, self.record.incomplete = [], []

    def kept_chunks(self) -> Iterator[Chunk]:
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
                self.record.file_errors.append(msg)
                self._incomplete(part.key, msg)
                unread += tally["rows"] == 0
            rows[part.key] = tally["rows"]
            if tally["unreadable"] > MAX_UNREADABLE_SHARE * max(tally["rows"], 1):
                self._incomplete(part.key, f"{tally['unreadable']:,} of {tally['rows']:,} rows could not be read")
        self._empty_partitions(rows)
        self.record.counts.valid = len(deduper)
        if unread and unread == len(self.partitions):
            raise SourceError(f"no file of the export could be read ({unread} file error(s), see file_errors); nothing "
                              "was sent", file=str(self.req.source))

    def _empty_partitions(self, rows: dict[str, int]) -> None:
        """A CDM export: an empty partition beside others with rows was not read completely."""
        if len(rows) > 1 and any(rows.values()):
            for key, n in rows.items():
                if n == 0 and not any(p["file"] == key for p in self.record.incomplete):
                    self._incomplete(key, "0 rows, while other partitions of the export have rows")

    def _incomplete(self, file: str, why: str) -> None:
        self.record.incomplete.append({"file": file, "why": why})

    def _partition_chunks(self, part: sources.Partition, deduper: dedup.Deduper,
                          tally: dict[str, int]) -> Iterator[Chunk]:
        assert self.mapper is not None and self.spec is not None
        counts, rows = self.record.counts, self.rows
        for chunk in pipeline.mapped_chunks(self.svc.sources, part, self.mapper, self.spec, (self.mapper.columns[0],),
                                            self.record.warnings, workers=self.workers,
                                            encoding=lambda: self.encoding):
            counts.read += chunk.read
            tally["rows"] += chunk.read
            for line, rejected in chunk.rejects:
                rows.reject(part.key, line, rejected)
                tally["unreadable"] += rejected.reason is contacts.Reason.UNREADABLE_ROW
            for line, note in chunk.notes:
                rows.note(part.key, line, note)
            if chunk.trimmed:
                rows.trimmed.update(chunk.trimmed)
            if chunk.emails:
                keep: list[int] = np.flatnonzero(deduper.first_seen(chunk.fps)).tolist()
                counts.duplicates += len(chunk.emails) - len(keep)
                if keep:
                    if self.sorter is not None:  # every contact of the run, for the list's snapshot
                        emails = chunk.emails
                        self.sorter.extend(emails if len(keep) == len(emails) else [emails[k] for k in keep])
                    yield chunk, keep
            self.tick()
            self.deadline_check("while reading the export")

    def tick(self) -> None:
        now = time.monotonic()
        if self.svc.keeper is not None:  # the reading stops at once when the lease is lost
            self.svc.keeper.check()
        if self.svc.progress and now - self._last_progress >= 2.0:
            self._last_progress = now
            elapsed = now - self.started
            counts = self.record.counts
            self.svc.progress({"read": counts.read, "sent": counts.sent,
                               "rate": counts.read / elapsed if elapsed else 0.0})

    def deadline_check(self, where: str = "before the next request") -> None:
        if self.req.deadline is not None and time.monotonic() >= self.req.deadline:
            raise DeadlineReached(f"the run's deadline was reached {where}")

    # --- sending ------------------------------------------------------------------------------------------------------

    def work(self) -> Iterator[tuple[str, Any]]:
        """What the sender sends, in order: ("json", ContactBatch) request batches for the first bulk_threshold
        contacts, then ("csv", ImportFile) gzip CSV files of up to 1,000,000 contacts for the rest. Contacts before
        the checkpoint are replayed (counted, de-duplicated) but not sent."""
        skip = self.record.checkpoint.contacts_done
        limit = self.dest.bulk_threshold if self.importer is not None else None
        self.encoding = pipeline.CSV if limit is not None and skip >= limit else pipeline.JSON
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
                assert self.importer is not None and self.mapper is not None
                self.encoding = pipeline.CSV  # the chunks mapped from here on are import lines
                rest = itertools.chain([(chunk, keep[cut:], start + cut)], _numbered(chunks, index))
                yield from (("csv", f) for f in self.importer.files(_import_chunks(rest, self.mapper)))
                return
        if (batch := packer.flush()) is not None:
            yield "json", batch

    def send_all(self, client: SendGridClient) -> None:
        """Read and send, overlapped: this thread packs, one sender thread sends. With room for one waiting batch,
        5M runs waited 9-23 s beyond their CPU time (the sandbox answers slower as its store grows); with two, 0.2 s."""
        q: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=SENDER_QUEUE)
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

    def checkpoint(self, done: int) -> None:
        """The one place the checkpoint moves: `done` contacts of the stream are settled (accepted or refused)."""
        ck = self.record.checkpoint
        ck.contacts_done = done
        self.record.counts.sent = ck.contacts_done - ck.refused_by_sendgrid
        self.svc.state.save_run(self.record)

    def _accepted(self, job: Job, last_index: int, body_bytes: int, record_sent: Callable[[int], None]) -> None:
        """Record an accepted request or import and move the checkpoint past it. What SendGrid accepted is recorded
        as sent (`record_sent(done)`) and the run noted under its account before the checkpoint moves: whatever
        becomes of the run, erasure and purge find those contacts, and removals wait for the job."""
        if self.record.timings.get("first_request_s") is None:
            self.record.timings["first_request_s"] = round(time.monotonic() - self.started, 3)
        record_sent(last_index + 1)
        if not self._jobs_noted:
            self.svc.state.mark_open_jobs(self.account, self.record.run_id, self.dest.name)
            self._jobs_noted = True
        self.record.jobs.append(job)
        self.record.requests.accepted(body_bytes, job.contacts, is_import=job.kind == "import")
        self.checkpoint(last_index + 1)

    def send_import(self, client: SendGridClient, f: bulk.ImportFile) -> None:
        self.deadline_check()
        started = client.start_import([self.dest.list_id], f.field_mappings)
        with open(f.path, "rb") as fh:
            client.upload(started["upload_uri"], started.get("upload_headers", []), fh, f.size)
        try:
            self._accepted(Job(str(started["job_id"]), f.count, kind="import"), f.last_index, f.size,
                           lambda done: self.held.record_file(self.record.run_id, done, f.emails_path))
        finally:
            f.discard()

    def send_batch(self, client: SendGridClient, batch: batching.ContactBatch) -> None:
        """One request; the contacts SendGrid refuses by name are rejected and the rest sent again."""
        self.deadline_check()
        ck = self.record.checkpoint
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
                    self.rows.reject("SendGrid", None, contacts.Rejected(
                        f"refused by SendGrid: email '{live.emails[pos][:80]}' is not valid",
                        contacts.Reason.REFUSED_BY_SENDGRID))
                refused_here += len(refused)
                live = live.without(refused)
                continue
            # counted with the checkpoint that passes the batch: a resume re-sends (and re-counts) an unfinished one
            ck.refused_by_sendgrid += refused_here
            self._accepted(Job(job_id, len(live)), batch.last_index, len(body),
                           functools.partial(self.held.record, self.record.run_id, emails=live.emails))
            return
        ck.refused_by_sendgrid += refused_here
        self.checkpoint(batch.last_index + 1)  # every contact of the batch was refused


def _numbered(chunks: Iterator[Chunk], index: int) -> Iterator[tuple[pipeline.MappedChunk, list[int], int]]:
    for chunk, keep in chunks:
        yield chunk, keep, index
        index += len(keep)


def _import_chunks(chunks: Iterable[tuple[pipeline.MappedChunk, list[int], int]],
                   mapper: contacts.ContactMapper) -> Iterator[bulk.ImportChunk]:
    """The kept contacts of each chunk as import lines: as mapped (CSV), or, for chunks mapped as JSON before the run
    switched to the import (the one the threshold fell in; with worker processes, those already handed out), decoded
    in one orjson call and turned into the same lines by mapper.line_of."""
    for chunk, keep, index in chunks:
        if not keep:
            continue
        emails = chunk.emails if len(keep) == len(chunk.emails) else [chunk.emails[k] for k in keep]
        if chunk.encoding == pipeline.CSV and not batching.scattered(keep):  # runs of lines, written as they are
            data, ends = memoryview(chunk.data), chunk.ends
            yield bulk.ImportChunk(index, emails, [(data, ends[a:b], ends[a - 1] if a else 0)
                                                   for a, b in batching.runs(keep)])
            continue
        if chunk.encoding == pipeline.CSV:
            lines = [chunk.contact(k) for k in keep]
        else:
            decoded = orjson.loads(b"[" + b",".join([chunk.contact(k) for k in keep]) + b"]")
            lines = [mapper.line_of(contact).encode() for contact in decoded]
        yield bulk.ImportChunk(index, emails, [(b"".join(lines), list(itertools.accumulate(map(len, lines))), 0)])

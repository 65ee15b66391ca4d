"""A run's stream: read the export, map and de-duplicate its rows, pack them into requests and send them.

Rows are read and mapped chunk by chunk (`pipeline`), de-duplicated by fingerprint (`dedup`: first occurrence wins),
and packed (`batching.Packer`) into requests within SendGrid's limits; past `bulk_threshold` contacts the rest goes
as gzip CSV import files (`bulk`). A sender thread sends while the next batch is packed. The stream is deterministic
for one export version, so the checkpoint is one number (`contacts_done`): a resumed run replays the export, counting
and de-duplicating, and sends from there. What SendGrid accepted is recorded as sent (`held`) and the run noted under
its account (`jobs`) before the checkpoint moves past it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import orjson

from . import batching, bulk, contacts, dedup, delta, jobs, pipeline, report, sending, snapshots, sources
from .config import Destination
from .errors import DeadlineReached, SourceError
from .held import Held
from .record import Job, RunRecord
from .redaction import redact
from .report import RowReport
from .sendgrid import InvalidContacts, SendGridClient
from .services import RunRequest, Services
from .storage import Lease, ObjectInfo, ObjectStore, reads_snapshots

MAX_UNREADABLE_SHARE = 0.01  # a file with more unreadable rows than this share was not read completely
POLL_WHILE_SENDING_S = 5.0  # how often the jobs of committed requests are polled while the rest is sent

Chunk = tuple[pipeline.MappedChunk, list[int]]  # a mapped chunk and the positions of its contacts not seen before


class Stream:
    """One attempt of a run over its export. `prepare` (engine) sets the mapper, the partitions and the importer;
    `kept_chunks` reads; `send_all` reads and sends."""

    def __init__(self, req: RunRequest, svc: Services, dest: Destination, record: RunRecord) -> None:
        self.req, self.svc, self.dest, self.record = req, svc, dest, record
        self.rows = RowReport(dest.id_column)
        self.duplicates = Duplicates()
        self.mapper: contacts.ContactMapper | None = None
        self.spec: pipeline.MapperSpec | None = None  # the mapper's recipe, for worker processes
        self.workers = pipeline.worker_count(svc.environ)
        self.partitions: list[sources.Partition] = []
        self.missing: list[str] = []  # segments of the destination that the export does not hold
        self.importer: bulk.Importer | None = None
        self.run_warnings = 0  # warnings about the run as a whole come first; the reading's follow
        self.sorter: snapshots.EmailSorter | None = None  # every contact's record line (delta), in the first pass
        self.send_only: delta.Filter | None = None  # a delta run: which contacts to send (new or changed)
        self.held = Held(svc.state, dest.name, dest.list_id)  # where accepted contacts are recorded as sent
        self.account = jobs.account_of(dest)
        self._jobs_noted = False  # the run is noted under its account as having jobs that may be pending
        self._jobs_lock = threading.Lock()  # the job poller reads record.jobs while senders append to it
        self.read = True  # this attempt reads the export (a mirror run resumed past its sending does not)
        self.store = CountingStore(svc.sources)  # what is read, through it: bytes for the progress line
        self.total_bytes: int | None = None  # the partitions' sizes, once they are found
        self.encoding = pipeline.JSON  # what chunks mapped from now on are encoded as (work() switches it to CSV)
        self._last_progress = self.started = time.monotonic()

    # --- reading ------------------------------------------------------------------------------------------------------

    def new_reading(self) -> None:
        """Forget what an earlier pass over the export counted (the counting pass before the sending pass)."""
        self.rows.close()
        self.rows = RowReport(self.dest.id_column)
        self.duplicates.next_reading()
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
        counts = self.record.counts
        for chunk in pipeline.mapped_chunks(self.store, part, self.mapper, self.spec, (self.mapper.columns[0],),
                                            self.record.warnings, workers=self.workers,
                                            encoding=lambda: self.encoding, digests=lambda: self.sorter is not None,
                                            only_changed=self._only_changed):
            counts.read += chunk.read
            tally["rows"] += chunk.read
            keep: list[int] = np.flatnonzero(deduper.first_seen(chunk.fps)).tolist() if chunk.emails else []
            self.duplicates.remember_first(part.key, chunk, keep)
            counts.duplicates += len(chunk.emails) - len(keep)
            dropped = self.duplicates.left_out(chunk, keep) if len(keep) < len(chunk.emails) else []
            tally["unreadable"] += self._rows_of(part.key, chunk, dropped)
            if keep:
                if self.sorter is not None:  # every contact's record line: what was sent for whom (delta)
                    emails, digests, entry = chunk.emails, chunk.digests, delta.line
                    self.sorter.extend([entry(emails[k], digests[8 * k : 8 * k + 8]) for k in keep])
                yield chunk, keep
            self.tick()
            self.deadline_check("while reading the export")

    def _only_changed(self) -> pipeline.Changed | None:
        """A delta run reading once: the contacts its filter keeps are the only ones mapped as JSON."""
        return self.send_only if isinstance(self.send_only, delta.Unchanged) else None

    def _rows_of(self, file: str, chunk: pipeline.MappedChunk, dropped: list[int]) -> int:
        """The chunk's rejections, duplicates (positions `dropped`), notes and trimmed values into the reading's
        RowReport, its rows in line order whatever the chunking; returns its unreadable rows."""
        rows, ids, unreadable = self.rows, chunk.reject_ids, 0
        lines, d = chunk.lines, 0  # dropped[d:]: the duplicates not listed yet
        for i, (line, rejected) in enumerate(chunk.rejects):
            while d < len(dropped) and (line is None or lines[dropped[d]] < line):
                self._duplicate(file, chunk, dropped[d])
                d += 1
            rows.reject(file, line, rejected, ids[i] if ids else None)
            unreadable += rejected.reason is contacts.Reason.UNREADABLE_ROW
        for k in dropped[d:]:
            self._duplicate(file, chunk, k)
        for line, note in chunk.notes:
            rows.note(file, line, note)
        if chunk.trimmed:
            rows.trimmed.update(chunk.trimmed)
        return unreadable

    def _duplicate(self, file: str, chunk: pipeline.MappedChunk, k: int) -> None:
        self.rows.duplicate(file, chunk.lines[k], self.duplicates.first_row(chunk.emails[k]),
                            chunk.ids[k] if chunk.ids else None)

    def tick(self) -> None:
        now = time.monotonic()
        if self.svc.keeper is not None:  # the reading stops at once when the lease is lost
            self.svc.keeper.check()
        if self.svc.progress and now - self._last_progress >= 1.0:  # the console decides how often to show it
            self._last_progress = now
            counts = self.record.counts
            self.svc.progress({"phase": "reading", "rows": counts.read, "sent": counts.sent,
                               "bytes": self.store.read, "total_bytes": self.total_bytes})

    def deadline_check(self, where: str = "before the next request") -> None:
        if self.req.deadline is not None and time.monotonic() >= self.req.deadline:
            raise DeadlineReached(f"the run's deadline was reached {where}")

    # --- sending ------------------------------------------------------------------------------------------------------

    def work(self) -> Iterator[tuple[str, Any]]:
        """What the sender sends, in order: ("json", ContactBatch) request batches for the first bulk_threshold
        contacts, then ("csv", ImportFile) gzip CSV files of up to limits.IMPORT_FILE_CONTACTS contacts for the rest,
        each sent while the next is written. Contacts before the checkpoint are replayed (counted, de-duplicated) but
        not sent."""
        skip = self.record.checkpoint.contacts_done
        limit = self.dest.bulk_threshold if self.importer is not None else None
        self.encoding = pipeline.CSV if limit is not None and skip >= limit else pipeline.JSON
        packer = batching.Packer(batching.body_overhead([self.dest.list_id]))
        chunks = self.kept_chunks()
        index = 0  # stream index of the chunk's first kept contact
        for chunk, keep in chunks:
            if self.send_only is not None:  # a delta run sends only the contacts that are new or changed
                keep = self.send_only.keep(chunk, keep)
            start, index = index, index + len(keep)
            if index <= skip:
                continue
            if start < skip:
                keep, start = keep[skip - start :], skip
            cut = len(keep) if limit is None else min(len(keep), max(0, limit - start))
            for batch in packer.add(chunk.data, chunk.ends, chunk.emails, keep[:cut], start):
                yield "json", batch
            if cut < len(keep):
                if (rest_batch := packer.flush()) is not None:
                    yield "json", rest_batch
                assert self.importer is not None and self.mapper is not None
                self.encoding = pipeline.CSV  # the chunks mapped from here on are import lines
                rest = itertools.chain([(chunk, keep[cut:], start + cut)], _numbered(chunks, index))
                yield from (("csv", f) for f in self.importer.files(_import_chunks(rest, self.mapper)))
                return
        if (last := packer.flush()) is not None:
            yield "json", last

    def send_all(self, client: SendGridClient, read_all: Callable[[], None] | None = None) -> None:
        """Read and send, overlapped: this thread packs while up to max_in_flight requests are sent (`sending`), and
        SendGrid's jobs of committed requests are polled meanwhile, so the sweep at the end has little left.
        `read_all` runs on this thread once the export is read to its end, while the last requests are out."""
        stop = threading.Event()
        poller = threading.Thread(target=self._poll_while_sending, args=(client, stop), name="job-poller",
                                  daemon=True)
        poller.start()
        try:
            sending.send_in_flight(self.work(), lambda item: self._send(client, item), self._commit,
                                   in_flight=self.dest.max_in_flight, handed_all=read_all)
        finally:
            stop.set()
            poller.join()
            if self.importer is not None:
                self.importer.cleanup()

    def _poll_while_sending(self, client: SendGridClient, stop: threading.Event) -> None:
        while not stop.wait(POLL_WHILE_SENDING_S):
            with self._jobs_lock:
                snapshot = RunRecord(self.record.run_id, self.record.destination, self.record.status,
                                     jobs=jobs.pending(self.record))
            with contextlib.suppress(Exception):  # polling is a head start; the sweep at the end is authoritative
                jobs.refresh(snapshot, client)

    def checkpoint(self, done: int) -> None:
        """The one place the checkpoint moves: `done` contacts of the stream are settled (accepted or refused)."""
        ck = self.record.checkpoint
        ck.contacts_done = done
        self.record.counts.sent = ck.contacts_done - ck.refused_by_sendgrid
        self.svc.state.save_run(self.record)

    def _send(self, client: SendGridClient, item: tuple[str, Any]) -> Sent:
        kind, payload = item
        return self.send_batch(client, payload) if kind == "json" else self.send_import(client, payload)

    def _commit(self, sent: Sent) -> None:
        """A request settled, in stream order: its refusals, its job, and the checkpoint past it. What SendGrid
        accepted was recorded as sent (`held`) before this, and the run is noted under its account before the
        checkpoint moves: whatever becomes of the run, erasure and purge find those contacts, and removals wait for
        the job. Refusals are counted with the checkpoint that passes their batch: a resume re-sends (and re-counts)
        an unsettled one."""
        for email in sent.refused:
            self.rows.reject("SendGrid", None, contacts.Rejected(f"refused by SendGrid: email '{email[:80]}' is not "
                                                                 "valid", contacts.Reason.REFUSED_BY_SENDGRID))
        self.record.checkpoint.refused_by_sendgrid += len(sent.refused)
        if sent.job is not None:
            if self.record.timings.get("first_request_s") is None:
                self.record.timings["first_request_s"] = round(time.monotonic() - self.started, 3)
            if not self._jobs_noted:
                self.svc.state.mark_open_jobs(self.account, self.record.run_id, self.dest.name)
                self._jobs_noted = True
            with self._jobs_lock:
                self.record.jobs.append(sent.job)
            self.record.requests.accepted(sent.body_bytes, sent.job.contacts, is_import=sent.job.kind == "import")
        self.checkpoint(sent.done)

    def send_import(self, client: SendGridClient, f: bulk.ImportFile) -> Sent:
        self.deadline_check()
        started = client.start_import([self.dest.list_id], f.field_mappings)
        try:
            with open(f.path, "rb") as fh:
                client.upload(started.upload_uri, started.upload_headers, fh, f.size)
            done = f.last_index + 1
            self.held.record_file(self.record.run_id, done, f.emails_path)
        finally:
            f.discard()
        return Sent(done, Job(started.job_id, f.count, kind="import", done=done), f.size, [])

    def send_batch(self, client: SendGridClient, batch: batching.ContactBatch) -> Sent:
        """One request; the contacts SendGrid refuses by name are left out and the rest sent again."""
        self.deadline_check()
        live, refused = batch, []
        done = batch.last_index + 1
        while len(live):
            body = live.body([self.dest.list_id])
            try:
                job_id = client.upsert(body)
            except InvalidContacts as bad:
                positions = bad.positions(live.emails)
                if not positions:
                    raise
                refused += [live.emails[pos] for pos in sorted(positions)]
                live = live.without(positions)
                continue
            self.held.record(self.record.run_id, done, live.emails)
            return Sent(done, Job(job_id, len(live), done=done), len(body), refused)
        return Sent(done, None, 0, refused)  # every contact of the batch was refused


class Duplicates:
    """Lists the rows left out as duplicates (RowReport.duplicate). When the run reads the export a second time, each
    names the row it repeats: the first reading notes the duplicated emails (fingerprints, at most
    report.MAX_CSV_ROWS) and the second remembers where each first appears. The first reading of a run that reads
    once cannot know that row without holding every contact's location; its lines say so. The same for any chunking
    (workers or not). Memory: the duplicated emails only."""

    def __init__(self) -> None:
        self._seen: list[np.ndarray] = []  # this reading: fingerprints of the duplicated emails
        self._noted = 0
        self._wanted: delta.KeySet | None = None  # from the reading before: emails whose first row to remember
        self._first: dict[str, str] = {}  # email -> FILE:LINE of its first row, for those

    def next_reading(self) -> None:
        self._wanted = delta.KeySet(np.unique(np.concatenate(self._seen))) if self._seen else None
        self._seen, self._noted, self._first = [], 0, {}

    def remember_first(self, file: str, chunk: pipeline.MappedChunk, keep: list[int]) -> None:
        if self._wanted is None or not keep:
            return
        hit = self._wanted.contains(np.frombuffer(chunk.fps, dtype=np.uint64)[keep])
        if hit.any():
            for k in np.asarray(keep)[hit].tolist():
                self._first[chunk.emails[k]] = f"{file}:{chunk.lines[k]}"

    def left_out(self, chunk: pipeline.MappedChunk, keep: list[int]) -> list[int]:
        """The positions of the chunk's duplicates, noted for the next reading."""
        left_out = np.ones(len(chunk.emails), dtype=bool)
        left_out[keep] = False
        dropped: list[int] = np.flatnonzero(left_out).tolist()
        if self._noted < report.MAX_CSV_ROWS:
            self._seen.append(np.frombuffer(chunk.fps, dtype=np.uint64)[dropped])
            self._noted += len(dropped)
        return dropped

    def first_row(self, email: str) -> str | None:
        """FILE:LINE of the email's first row, when this reading knows it."""
        return self._first.get(email)


@dataclass(frozen=True)
class Sent:
    """What one request (or import file) came to; committed in stream order (`Stream._commit`)."""

    done: int  # the checkpoint once it is committed: the stream index after its last contact
    job: Job | None  # None when SendGrid refused every contact of the batch
    body_bytes: int
    refused: list[str]  # emails SendGrid refused by name


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


class CountingStore:
    """The export's store, counting the bytes read through its streams (for the progress line; approximate under
    worker processes, which parse chunks this process read). Everything else goes to the store as it is."""

    def __init__(self, store: ObjectStore) -> None:
        self._store, self.read = store, 0
        self.label = store.label
        self.reads_snapshots = reads_snapshots(store)

    def open_read(self, key: str, snapshot: str | None = None) -> BinaryIO:
        raw = self._store.open_read(key, snapshot=snapshot) if snapshot is not None and reads_snapshots(self._store) \
            else self._store.open_read(key)
        return io.BufferedReader(_Counted(self, raw), 1 << 16)

    def read_bytes(self, key: str) -> bytes | None:
        return self._store.read_bytes(key)

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        return self._store.read_with_etag(key)

    def info(self, key: str) -> ObjectInfo | None:
        return self._store.info(key)

    def write_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        return self._store.write_bytes(key, data, if_match=if_match, if_none_match=if_none_match)

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        return self._store.write_stream(key, chunks)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._store.list(prefix)

    def delete(self, key: str) -> None:
        self._store.delete(key)

    def lease(self, key: str, seconds: int = 60) -> contextlib.AbstractContextManager[Lease]:
        return self._store.lease(key, seconds)

    def key_for_url(self, url: str) -> str | None:
        return self._store.key_for_url(url)


class _Counted(io.RawIOBase):
    def __init__(self, owner: CountingStore, raw: BinaryIO) -> None:
        self._owner, self._raw = owner, raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self._owner.read += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()

"""Rows to encoded contacts, chunk by chunk, in this process or in worker processes, always in source order.

A chunk of rows becomes a MappedChunk: the rows' rejections and notes, and for every mapped contact its email and
its encoding, joined in one buffer: its JSON for an upsert request, or, once a run has switched to
the bulk import, its line of the import's CSV file (ContactMapper.map_line: the same rules, no dict on the way). The
exporting process then only de-duplicates, packs and sends.

Large CSV partitions are cut into chunks of whole records (sources.csv_chunks) that worker processes parse, map and
encode; results are taken in submission order, so the contacts come out exactly as a serial read gives them and a
run stays deterministic (its checkpoint is a count of contacts). Anything a worker cannot trust, a broken pool, or
a partition that is small, JSON Lines or read with no workers, goes through sources.read_rows in this process.
Workers see rows and the mapping only, never a secret or a client.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from array import array
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson

from . import contacts, sources
from .errors import SourceError
from .storage import ObjectStore

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 4096  # rows mapped at a time in this process
JSON, CSV = "json", "csv"  # what a chunk's contacts are encoded as: upsert JSON, or bulk import CSV lines
PARALLEL_MIN_BYTES = 2 * 1024 * 1024  # a smaller partition is not worth shipping to workers
MAX_WORKERS = 8
WORKERS_SETTING = "EXPORT_WORKERS"


@dataclass(frozen=True)
class MapperSpec:
    """A ContactMapper's recipe: what a worker process needs to build the same mapper."""

    mapping: tuple[tuple[str, str], ...]
    custom: tuple[contacts.CustomField, ...] = ()
    id_column: str | None = None

    @classmethod
    def of(cls, mapping: Mapping[str, str], custom: Sequence[contacts.CustomField] = (),
           id_column: str | None = None) -> MapperSpec:
        return cls(tuple(mapping.items()), tuple(custom), id_column)

    def build(self) -> contacts.ContactMapper:
        return contacts.ContactMapper(dict(self.mapping), self.custom, self.id_column)


@dataclass
class MappedChunk:
    read: int  # rows read, rejected ones included
    rejects: list[tuple[int | None, contacts.Rejected]]  # (line, the rejection: its text and its reason)
    notes: list[tuple[int | None, contacts.Note]]  # (line, note) of contacts sent without some value
    trimmed: dict[str, int]  # field -> values cut to SendGrid's length
    emails: list[str]
    lines: array[int]  # each contact's line in its file
    data: bytes  # the contacts' encodings: JSON objects with a comma between two, or CSV lines each ending in CRLF
    ends: array[int]  # end offset in data of each contact (its separator not included)
    encoding: str = JSON
    digests: bytes = b""  # with digests: 8 bytes of each contact's content_digest, in order
    ids: list[str | None] | None = None  # with an id column (ContactMapper.id_index): each contact's value of it
    reject_ids: list[str | None] | None = None  # and each rejected row's

    def contact(self, pos: int) -> bytes:
        return self.data[self.ends[pos - 1] + (self.encoding == JSON) if pos else 0 : self.ends[pos]]

    @functools.cached_property
    def fps(self) -> array[int]:
        """contacts.email_fps of the emails: made in the exporting process when first asked (never in a worker)."""
        return contacts.email_fps(self.emails)


def content_digest(line: bytes) -> bytes:
    """8 bytes of BLAKE2b over a contact's import line (ContactMapper.map_line's, or line_of's for a contact mapped
    as JSON: the same text): what it says, whichever way it was sent. Stable across processes and runs (delta)."""
    h = _BLAKE2B_64()
    h.update(line)
    return h.digest()


_BLAKE2B_64 = hashlib.blake2b(digest_size=8).copy  # a copy of a prepared state: cheaper than blake2b(line, ...)


class Changed(Protocol):
    """Which contacts of a chunk a delta run may send, by their content digests (delta.Unchanged)."""

    def changed(self, digests: bytes) -> list[int]: ...


# long on purpose: the per-row loop of the hot path, kept in one frame (a call per row costs ~5% at 1M)
def map_rows(mapper: contacts.ContactMapper, rows: Iterable[sources.Row], encoding: str = JSON, *,
             digests: bool = False, only_changed: Changed | None = None) -> MappedChunk:
    """Map and encode rows (as read_rows gives them) as JSON, a comma between two contacts (so that the packer
    copies contacts that follow each other in one slice), or as import CSV lines; with digests, each contact's
    content_digest too (JSON with only_changed: _json_of_changed). Pure but for mapper.trimmed, handed on, cleared."""
    if only_changed is not None and encoding == JSON:
        return _json_of_changed(mapper, rows, only_changed)
    mapfn: Callable[[Sequence[str | None]], contacts.Mapped | contacts.MappedLine | contacts.MappedBoth]
    dumps: Callable[[Any], bytes]
    if encoding == JSON:
        mapfn, dumps, sep = mapper.map, orjson.dumps, b","
    else:
        mapfn, dumps, sep = mapper.map_line, cast(Callable[[Any], bytes], str.encode), b""
    rejects: list[tuple[int | None, contacts.Rejected]] = []
    notes: list[tuple[int | None, contacts.Note]] = []
    emails: list[str] = []
    buf, ends, dig, lines = bytearray(), array("Q"), bytearray(), array("Q")
    with_line = digests and encoding == JSON  # the digest is over the import line: map_with_line gives both
    if with_line:
        mapfn = mapper.map_with_line
    at = mapper.id_index
    ids: list[str | None] | None = None if at is None else []
    reject_ids: list[str | None] | None = None if at is None else []
    pop = at is not None and at == len(mapper.columns)  # read after the mapped columns: taken off before map()
    ident = None
    read = 0
    for line, values, reason in rows:
        read += 1
        if values is None:
            rejects.append((line, contacts.Rejected(reason or "unreadable row", contacts.Reason.UNREADABLE_ROW)))
            if reject_ids is not None:
                reject_ids.append(None)
            continue
        if at is not None:
            ident = values.pop() if pop else values[at]
        mapped = mapfn(values)
        if type(mapped) is contacts.Rejected:
            rejects.append((line, mapped))
            if reject_ids is not None:
                reject_ids.append(ident)
            continue
        if with_line:
            email, contact, note, import_line = cast(tuple[str, Any, Any, str], mapped)
        else:
            email, contact, note = cast(tuple[str, Any, Any], mapped)
        if note:
            notes.append((line, note))
        encoded = dumps(contact)
        buf += encoded  # orjson's results are over-allocated: appended, never kept beyond this contact
        ends.append(len(buf))
        if digests:  # over the import line, however the contact is encoded (a JSON one is turned into it)
            dig += content_digest(import_line.encode() if with_line else encoded)
        buf += sep
        emails.append(email)
        lines.append(line)
        if ids is not None:
            ids.append(ident)
    trimmed = dict(mapper.trimmed)
    mapper.trimmed.clear()
    if sep and buf:
        del buf[-1]  # no separator after the last contact
    return MappedChunk(read, rejects, notes, trimmed, emails, lines, bytes(buf), ends, encoding, bytes(dig), ids,
                       reject_ids)


def _json_of_changed(mapper: contacts.ContactMapper, rows: Iterable[sources.Row], only_changed: Changed
                     ) -> MappedChunk:
    """A delta run's chunk: every row mapped as an import line (its digest taken over it, no dict, no JSON), then only
    the contacts `only_changed` names encoded as JSON; the others are empty entries, which the run's filter (the same
    digests) never sends. The same chunk as map_rows(JSON, digests=True) gives, but for those empty entries."""
    values_at: dict[int | None, list[str | None]] = {}

    def remembered() -> Iterator[sources.Row]:
        for row in rows:
            if row[1] is not None:
                values_at[row[0]] = row[1]  # the list map_rows maps (an id column popped off it in place)
            yield row

    chunk = map_rows(mapper, remembered(), CSV, digests=True)
    changed = set(only_changed.changed(chunk.digests))
    buf, ends = bytearray(), array("Q")
    for k, line in enumerate(chunk.lines):
        if k:
            buf += b","
        if k in changed:
            mapped = mapper.map(values_at[line])
            assert type(mapped) is not contacts.Rejected  # map_line took it, by the same rules
            buf += orjson.dumps(mapped[1])
        ends.append(len(buf))
    mapper.trimmed.clear()  # counted once, by map_line
    return dataclasses.replace(chunk, data=bytes(buf), ends=ends, encoding=JSON)


def chunked(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to size rows. When the source fails mid-chunk, the rows read before the failure come first."""
    chunk: list[Any] = []
    try:
        for row in rows:
            chunk.append(row)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except SourceError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


# --- workers ----------------------------------------------------------------------------------------------------------

_MAPPERS: dict[MapperSpec, contacts.ContactMapper] = {}  # in a worker: one mapper per recipe


class _Untrusted(Exception):
    pass


def _parsed(chunk: sources.CsvChunk) -> Iterator[sources.Row]:
    try:
        yield from sources.parse_csv_chunk(chunk)
    except ValueError as e:
        raise _Untrusted(str(e)) from None


def map_csv_chunk(spec: MapperSpec, chunk: sources.CsvChunk, encoding: str = JSON, digests: bool = False
                  ) -> MappedChunk | None:
    """A worker's job: parse, map and encode one chunk; None when the chunk must be read with read_rows instead."""
    mapper = _MAPPERS.get(spec)
    if mapper is None:
        mapper = _MAPPERS[spec] = spec.build()
    try:
        return map_rows(mapper, _parsed(chunk), encoding, digests=digests)
    except _Untrusted:
        mapper.trimmed.clear()
        return None


def _watch_parent(parent: int) -> None:
    """Pool initializer: end this worker once its parent is gone. A worker holds both ends of its task pipe, so it
    would otherwise wait for work forever after the exporting process was killed (and keep its pipes open)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_count(environ: Mapping[str, str]) -> int:
    """EXPORT_WORKERS (0 to MAX_WORKERS); unset or unreadable: 0, every row mapped in this process.

    Off by default: each worker adds ~45-50 MB to the process tree (at 1M: 122 MB in process, 174 MB with one worker,
    216 MB with two), and on the 2-core benchmark machine, whose second core the sandbox needs, one worker saved 5%
    of the wall time and two 9% (benchmarks/README.md)."""
    raw = environ.get(WORKERS_SETTING, "").strip()
    if not raw:
        return 0
    try:
        return max(0, min(int(raw), MAX_WORKERS))
    except ValueError:
        log.warning("%s=%r is not a number; mapping in this process", WORKERS_SETTING, raw[:20])
        return 0


_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_cannot_start: str | None = None  # why workers are not used any more in this process
_delivered = False  # the current pool has mapped at least one chunk
_fruitless = 0  # pools in a row that failed (to start, or broke) before mapping anything
MAX_FRUITLESS_POOLS = 2  # then workers are not tried again in this process


def _get_pool(workers: int) -> ProcessPoolExecutor:
    """The process's worker pool, started on first use and kept for later runs (spawning costs ~0.2 s a worker)."""
    global _pool, _pool_size, _delivered
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            _delivered = False
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            # spawn: fork is unsafe in a threaded process, and a forkserver would outlive a killed exporter
            ctx = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_watch_parent,
                                        initargs=(os.getpid(),))
            _pool_size = workers
        return _pool


def _took_a_chunk() -> None:
    global _delivered, _fruitless
    _delivered, _fruitless = True, 0


def _pool_broke(pool: ProcessPoolExecutor | None, key: str, why: str) -> None:
    """A pool failed: it could not be created (pool None), a submit failed, or a worker died (killed, out of memory,
    or never started: a failed exec shows as a broken pool too). Drop it; the next partition starts a new one, unless
    pools keep failing before they map anything: then workers are not used any more in this process."""
    global _fruitless, _cannot_start
    if pool is not None:
        with _pool_lock:
            current = pool is _pool  # a pool is counted once: its submit and its pending results may both report it
        if not current:
            return
    log.warning("%s: the worker processes failed (%s); reading on in this process", key, why[:300])
    if pool is None or not _delivered:
        _fruitless += 1
        if _fruitless >= MAX_FRUITLESS_POOLS and _cannot_start is None:
            _cannot_start = f"{_fruitless} worker pools in a row failed before mapping anything; the last: {why[:300]}"
            log.warning("worker processes are not used any more in this process: %s", _cannot_start)
    if pool is not None:
        _drop_pool(pool)


def _drop_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    """Stop the worker processes (tests; an exiting interpreter does it by itself)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


# --- one partition ----------------------------------------------------------------------------------------------------


def mapped_chunks(store: ObjectStore, part: sources.Partition, mapper: contacts.ContactMapper, spec: MapperSpec,
                  required: Collection[str], warnings: list[str], *, workers: int = 0, min_bytes: int | None = None,
                  chunk_bytes: int | None = None, encoding: Callable[[], str] = lambda: JSON,
                  digests: Callable[[], bool] = lambda: False,
                  only_changed: Callable[[], Changed | None] = lambda: None) -> Iterator[MappedChunk]:
    """The partition's rows as MappedChunks, in source order; mapper maps in this process, spec in workers (for CSV
    partitions of at least min_bytes, default PARALLEL_MIN_BYTES, cut into chunks of about chunk_bytes), each chunk
    encoded as encoding() says when it is mapped (or handed to a worker), with content digests when digests() says
    (in this process, JSON only for the contacts only_changed() names, when it names any: map_rows).
    Raises SourceError as read_rows does, after
    the chunks before the problem, and when the file is stopped (`Stop`). A file that gives no row at all is noted in
    warnings ("0 rows in <file>")."""
    stop = Stop(part.key)
    for chunk in _mapped(store, part, mapper, spec, required, warnings, workers, min_bytes, chunk_bytes, encoding,
                         digests, only_changed):
        yield chunk
        stop.check(chunk)
    if not stop.read:
        warnings.append(f"0 rows in {part.key}")


@dataclass
class Stop:
    """The rule that stops a file which is mostly junk, so one hostile file cannot cost without bound (100 MiB of
    junk rows gzip to ~100 KB). A file is stopped, as a file error naming it, once

    - at least JUNK_MIN_ROWS of its rows were read and more than JUNK_SHARE of them could not be read (wrong number
      of fields, broken quoting, bad bytes, over-long lines) or had an email that is not usable (invalid or too long);
    - or at least NOTHING_MIN_ROWS were read and not one gave a contact.

    A row without an email does not count as junk: a segment where most profiles lack an email is legitimate, and one
    usable row in the first NOTHING_MIN_ROWS keeps such a file going. The rows before the stop were exported."""

    key: str
    read: int = 0
    rejected: int = 0
    junk: int = 0

    JUNK_MIN_ROWS = 10_000
    JUNK_SHARE = 0.9
    NOTHING_MIN_ROWS = 100_000

    def check(self, chunk: MappedChunk) -> None:
        self.read += chunk.read
        if not chunk.rejects:
            return
        self.rejected += len(chunk.rejects)
        self.junk += sum(1 for _, rejected in chunk.rejects if rejected.reason is not contacts.Reason.MISSING_EMAIL)
        if self.read >= self.JUNK_MIN_ROWS and self.junk > self.JUNK_SHARE * self.read:
            raise SourceError(
                f"stopped after {self.read:,} rows: {self.junk:,} of them ({self.junk / self.read:.0%}) could not be "
                "read or had no usable email, so the file is probably damaged or not an export with these columns "
                "(check its delimiter, encoding and column mapping); the rest of it was not read", file=self.key)
        if self.read >= self.NOTHING_MIN_ROWS and self.rejected == self.read:
            raise SourceError(
                f"stopped after {self.read:,} rows: not one of them gave a contact (every row was rejected), so the "
                "file is probably damaged or mapped to the wrong columns; the rest of it was not read", file=self.key)


def _mapped(store: ObjectStore, part: sources.Partition, mapper: contacts.ContactMapper, spec: MapperSpec,
            required: Collection[str], warnings: list[str], workers: int, min_bytes: int | None,
            chunk_bytes: int | None, encoding: Callable[[], str], digests: Callable[[], bool],
            only_changed: Callable[[], Changed | None]) -> Iterator[MappedChunk]:
    wanted = mapper.read_columns
    min_bytes = PARALLEL_MIN_BYTES if min_bytes is None else min_bytes
    chunk_bytes = sources.CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    line = 1  # where read_rows starts
    if (workers > 0 and _cannot_start is None and part.fmt == "csv" and part.quoting
            and _big(store, part, min_bytes)):
        noted = len(warnings)
        read_on = yield from _in_workers(store, part, spec, wanted, required, warnings, workers, chunk_bytes,
                                         encoding, digests)
        if read_on is None:  # the workers read the whole partition
            return
        line = read_on
        if line == 1:  # read_rows notes the same file-level warnings again
            del warnings[noted:]
    rows = sources.read_rows(store, part, wanted, required, warnings if line == 1 else [])
    if line > 1:
        rows = (row for row in rows if row[0] >= line)
    for chunk in chunked(rows, ROWS_PER_CHUNK):
        yield map_rows(mapper, chunk, encoding(), digests=digests(), only_changed=only_changed())


def _big(store: ObjectStore, part: sources.Partition, min_bytes: int) -> bool:
    info = store.info(part.key)
    return info is not None and info.size >= min_bytes


def _in_workers(store: ObjectStore, part: sources.Partition, spec: MapperSpec, wanted: Sequence[str],
                required: Collection[str], warnings: list[str], workers: int, chunk_bytes: int,
                encoding: Callable[[], str], digests: Callable[[], bool]
                ) -> Generator[MappedChunk, None, int | None]:
    """Chunks mapped by the pool; returns None when the partition is done, else the line read_rows goes on from."""
    try:
        pool = _get_pool(workers)
    except (OSError, RuntimeError) as e:  # e.g. the resource tracker process could not be started
        _pool_broke(None, part.key, f"{type(e).__name__}: {e}")
        return 1
    source = sources.csv_chunks(store, part, wanted, required, warnings, chunk_bytes=chunk_bytes)
    pending: collections.deque[tuple[int, Future[MappedChunk | None]]] = collections.deque()
    read_on: int | None = None
    try:
        while True:
            while read_on is None and len(pending) <= workers:  # one chunk ahead: busy workers, bounded memory
                item = next(source, None)
                if item is None:
                    break
                if isinstance(item, sources.ReadOn):
                    read_on = item.line
                    break
                try:
                    pending.append((item.first_line, pool.submit(map_csv_chunk, spec, item, encoding(), digests())))
                except Exception as e:  # whatever stops a hand-over, this chunk is mapped here
                    # BrokenProcessPool, OSError, RuntimeError; and CPython 3.11's ValueError "bad value(s) in
                    # fds_to_keep" when a worker dies while its siblings spawn (the pool closes a pipe that the next
                    # spawn is about to pass on, and a new pipe reuses its number). The chunks before are still taken.
                    _pool_broke(pool, part.key, f"{type(e).__name__}: {e}")
                    read_on = item.first_line
                    break
            if not pending:
                return read_on
            first_line, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as e:
                _pool_broke(pool, part.key, f"{type(e).__name__}: {e}")
                return first_line
            except CancelledError:  # the pool was dropped after a failed start: this chunk goes on here
                return first_line
            _took_a_chunk()
            if result is None:
                return first_line
            yield result
    finally:
        for _, future in pending:
            future.cancel()
        source.close()

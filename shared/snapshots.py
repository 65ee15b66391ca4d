"""Snapshots of the emails last synced to a list, kept compactly and compared as sorted streams.

A snapshot is a gzip'd text object of lower-case emails, one per line, strictly ascending (Python string order, which
is code point order and so also UTF-8 byte order). A tiny sidecar `<key>.meta.json` holds {"count", "etag", "sha256",
"written_at"}; it is written after the snapshot and trusted only while its etag matches the snapshot's, so the
snapshot object itself is always the truth.

Nothing here holds a whole list in memory: `EmailSorter` sorts in bounded chunks spilled to temporary files and
merges them; `diff_sorted` and `subtract_sorted` walk sorted streams side by side. At 5 million emails a snapshot is
some 40-50 MB of gzip and the sorter's memory is one chunk.

The hot paths (sorting, merging, reading and writing snapshots) work on blocks of a few thousand emails so that the
per-email work happens in C: runs and snapshots are read with one `decode().split("\\n")` per block, blocks are
merged by sorting the pieces below a common cutoff together (timsort merges sorted pieces in C), and order is checked
with one `all(map(operator.lt, ...))` per block; the per-email Python paths only run to find and report a fault.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import hashlib
import inspect
import itertools
import operator
import os
import tempfile
import zlib
from collections.abc import Generator, Iterable, Iterator
from typing import Any, BinaryIO

import orjson

from .errors import StateError
from .state import now_iso
from .storage import NotFound, ObjectStore

META_SUFFIX = ".meta.json"
SNAPSHOT_SUFFIX = ".gz"
SNAPSHOT_COMPRESSLEVEL = 1  # zlib level of written snapshots: ~2.4x faster than 6, ~20% larger; readers are the same
DEFAULT_CHUNK_SIZE = 100_000  # emails held before a spill: ~8 MB of str objects (250,000 held ~20 MB)
MAX_MERGE_FANIN = 64  # runs merged at once; more runs are first merged in groups (bounded open files and buffers)
_WRITE_SLICE = 8_192  # emails joined, checked and compressed at a time
_READ_BYTES = 64 * 1024  # bytes read from a run or a snapshot at a time
_MERGE_READ_BUDGET = 1024 * 1024  # read size shared by the runs of one merge (at least _MIN_RUN_READ each)
_MIN_RUN_READ = 16 * 1024
_INFLATE_BYTES = 256 * 1024  # most decompressed bytes per step (bounded even for a hostile snapshot)
_COPY_BYTES = 1024 * 1024  # bytes a snapshot copy moves at a time
_GZIP_MAGIC = b"\x1f\x8b"


def meta_key(key: str) -> str:
    return key + META_SUFFIX


def _check_email(email: str) -> str:
    if not isinstance(email, str) or not email or "\n" in email or "\r" in email:
        raise ValueError("an email must be a non-empty string without line breaks")
    return email


def _unique_ascending(items: Iterable[str], what: str, prev: str | None = None) -> Iterator[str]:
    """Items of a non-decreasing stream with adjacent repeats collapsed; ValueError when the order breaks. `prev` is
    the item before the stream (from an earlier block), if any."""
    for item in items:
        if prev is not None and item <= prev:
            if item == prev:
                continue
            raise ValueError(f"{what} is not sorted: an item follows a greater one")
        prev = item
        yield item


# ---------------------------------------------------------------------------------------------------------- blocks


def _blocks(items: Iterable[str]) -> Iterator[list[str]]:
    """Consecutive non-empty lists of up to _WRITE_SLICE items."""
    iterator, size = iter(items), _WRITE_SLICE
    while block := list(itertools.islice(iterator, size)):
        yield block


def _ascending(block: list[str], strict: bool) -> bool:
    """Whether a block is strictly ascending (or, not strict, non-decreasing); one C-level pass."""
    return all(map(operator.lt if strict else operator.le, block, itertools.islice(block, 1, None)))


def _plain_emails(block: list[str]) -> bool:
    """Whether every item is a non-empty string without line breaks, cheaply (no per-item Python code)."""
    try:
        text = "\n".join(block)
    except TypeError:
        return False
    return "\r" not in text and text.count("\n") == len(block) - 1 and all(block)


def _unique_blocks(blocks: Iterable[list[str]], what: str, *,
                   check: bool = False) -> Generator[list[str], None, None]:
    """The blocks of a non-decreasing stream with repeats collapsed (within and across blocks); ValueError when the
    order breaks, and with `check` for items that are not emails (`_check_email`). A faulty block goes through the
    per-item path, which yields what came before the fault and raises the same error the per-item code would."""
    prev: str | None = None
    for block in blocks:
        if not block:
            continue
        plain = not check or _plain_emails(block)
        if plain and (prev is None or block[0] > prev) and _ascending(block, strict=True):
            pass  # the common case: nothing to do
        elif plain and (prev is None or block[0] >= prev) and _ascending(block, strict=False):
            block = list(dict.fromkeys(block))  # sorted with repeats (merged runs, unions): collapse them in C
            if block[0] == prev:
                del block[0]
            if not block:
                continue
        else:
            out: list[str] = []
            try:
                for item in _unique_ascending(map(_check_email, block) if check else block, what, prev):
                    out.append(item)
            except ValueError:
                if out:
                    yield out
                raise
            if not out:
                continue
            block = out
        prev = block[-1]
        yield block


def _ordered_blocks(blocks: Iterable[list[str]], what: str) -> Iterator[list[str]]:
    """Blocks of a stream that must be non-decreasing (repeats allowed); ValueError when it is not."""
    prev: str | None = None
    for block in blocks:
        if (prev is not None and block[0] < prev) or not _ascending(block, strict=False):
            raise ValueError(f"{what} is not sorted: an item follows a greater one")
        prev = block[-1]
        yield block


def _merge_blocks(sources: Iterable[Iterator[list[str]]]) -> Iterator[list[str]]:
    """Merge iterators of non-decreasing, non-empty blocks into non-decreasing blocks (repeats kept).

    Each round takes from every source's current block the items up to the smallest of those blocks' last items (so
    no later item of any source is smaller) and sorts them together: timsort finds the sorted pieces and merges them
    in C, far cheaper than heapq.merge's Python-level step per item. Memory: one block per source."""
    heads: list[list[Any]] = []  # [block, position, source]
    for source in sources:
        if block := _next_block(source):
            heads.append([block, 0, source])
    while len(heads) > 1:
        cutoff = min([head[0][-1] for head in heads])
        pieces = []
        for head in heads:
            block, pos = head[0], head[1]
            end = len(block) if block[-1] <= cutoff else bisect.bisect_right(block, cutoff, pos)  # progress assured
            if end > pos:
                pieces.append(block if end - pos == len(block) else block[pos:end])
                head[1] = end
        if len(pieces) == 1:
            yield pieces[0]
        else:
            merged = list(itertools.chain.from_iterable(pieces))
            merged.sort()
            yield merged
        live = []
        for head in heads:
            if head[1] == len(head[0]):
                head[0], head[1] = _next_block(head[2]), 0
                if head[0] is None:
                    continue
            live.append(head)
        heads = live
    if heads:
        block, pos, source = heads[0]
        yield block[pos:] if pos else block
        for block in source:
            if block:
                yield block


def _next_block(source: Iterator[list[str]]) -> list[str] | None:
    """The source's next non-empty block, or None at its end."""
    for block in source:
        if block:
            return block
    return None


class _Emails(itertools.chain[str]):
    """What `EmailSorter.sorted_unique`, `read_snapshot` and `union_sorted` return: an iterator of emails with a
    C-level `next` (it is an itertools.chain over a generator of blocks) whose blocks this module's own consumers
    take whole while it is unstarted (`_blocks_of`), so no email is handed from layer to layer one at a time.
    Its blocks are non-empty and non-decreasing. `close()` closes the generator (files, EmailSorter.count)."""

    blocks: Generator[list[str], None, None]

    @classmethod
    def of(cls, blocks: Generator[list[str], None, None]) -> _Emails:
        emails = cls.from_iterable(blocks)
        assert isinstance(emails, cls)  # typeshed's from_iterable returns a chain, not the subclass it is called on
        emails.blocks = blocks
        return emails

    def close(self) -> None:
        """Like a generator's close(): releases what the blocks hold, and nothing more comes."""
        self.blocks.close()
        collections.deque(self, maxlen=0)  # what is left of the block being iterated (at most one block)


def _blocks_of(items: Iterable[str]) -> tuple[Iterator[list[str]], bool]:
    """Blocks of a stream, and whether they are known to be non-decreasing (an unstarted `_Emails`)."""
    if type(items) is _Emails and inspect.getgeneratorstate(items.blocks) == inspect.GEN_CREATED:
        return items.blocks, True
    return _blocks(items), False


def _line_blocks(pieces: Iterable[bytes]) -> Iterator[list[str]]:
    """The lines of a UTF-8 byte stream without their newlines, a block per piece (pieces may split lines and
    characters anywhere: a line is decoded once it is complete). A last line without a newline counts, an empty
    remainder after the last newline does not. UnicodeDecodeError for bad UTF-8."""
    carry = b""
    for piece in pieces:
        cut = piece.rfind(b"\n")
        if cut < 0:
            carry += piece
            continue
        text = carry + piece[:cut] if carry else piece[:cut]
        carry = piece[cut + 1 :]
        yield text.decode("utf-8").split("\n")
    if carry:
        yield [carry.decode("utf-8")]


def _inflate(fh: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream in bounded pieces, read as gzip.GzipFile reads it: members one after
    another, zero padding after a member skipped. BadGzipFile for a bad header, zlib.error for damaged data, EOFError
    when it is cut short."""
    inflater: Any = None
    members = 0
    data = b""
    while True:
        if not data:
            data = fh.read(_READ_BYTES)
            if not data:
                break
        if inflater is None:
            if members:
                data = data.lstrip(b"\0")
                if not data:
                    continue
            while len(data) < 2 and (more := fh.read(_READ_BYTES)):
                data += more
            if data[:2] != _GZIP_MAGIC:
                raise gzip.BadGzipFile(f"Not a gzipped file ({data[:2]!r})")
            inflater = zlib.decompressobj(31)  # wbits 31: a gzip member, its CRC and length checked by zlib
            members += 1
        if out := inflater.decompress(data, _INFLATE_BYTES):
            yield out
        data = inflater.unconsumed_tail
        if inflater.eof:
            data, inflater = inflater.unused_data, None
    if inflater is not None:
        if out := inflater.flush():
            yield out
        if not inflater.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def _file_blocks(path: str, read_bytes: int) -> Iterator[list[str]]:
    """The lines of a plain-text run file as blocks."""
    with open(path, "rb", buffering=0) as fh:
        yield from _line_blocks(iter(lambda: fh.read(read_bytes), b""))


# ---------------------------------------------------------------------------------------------------- EmailSorter


class EmailSorter:
    """Sort and de-duplicate any number of emails in bounded memory.

    `add` keeps at most `chunk_size` emails in memory; a full chunk is sorted and spilled as a plain-text run (UTF-8,
    one email per line) to a private temporary directory. The last chunk stays in memory. `sorted_unique` merges the
    runs and the last chunk (at most `max_fanin` sources at once, repeats across and within them collapsed) and may
    be iterated again; `count` (distinct emails) is known once it has been iterated to the end. `close` removes the
    temporary files. Without a spill nothing touches the disk.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, *, tmp_dir: str | os.PathLike[str] | None = None,
                 max_fanin: int = MAX_MERGE_FANIN) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if max_fanin < 2:
            raise ValueError("max_fanin must be at least 2")
        self.chunk_size = chunk_size
        self.max_fanin = max_fanin
        self._tmp_parent = tmp_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._buffer: list[str] = []
        self._runs: list[str] = []
        self._seq = 0
        self._finished = False
        self._closed = False
        self.added = 0  # emails given to add(), repeats included
        self.spills = 0  # chunks written to disk (merge passes not included)
        self.count: int | None = None  # distinct emails, once sorted_unique() has been iterated to the end

    def __enter__(self) -> EmailSorter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmailSorter(added={self.added}, spills={self.spills}, count={self.count})"

    def add(self, email: str) -> None:
        if self._finished or self._closed:
            raise ValueError("EmailSorter: add() after sorted_unique() or close()")
        self._buffer.append(_check_email(email))
        self.added += 1
        if len(self._buffer) >= self.chunk_size:
            self._spill()

    def extend(self, emails: list[str]) -> None:
        """add() for many emails at once, without the per-email check: for addresses already validated (the
        contact mapper's emails are lower-cased and contain no line breaks)."""
        if self._finished or self._closed:
            raise ValueError("EmailSorter: extend() after sorted_unique() or close()")
        self._buffer.extend(emails)
        self.added += len(emails)
        if len(self._buffer) >= self.chunk_size:
            self._spill()

    def _new_path(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="emailsort-", dir=self._tmp_parent)
        self._seq += 1
        return os.path.join(self._tmp.name, f"run-{self._seq:06d}.txt")

    def _write_run(self, blocks: Iterable[list[str]]) -> str:
        path = self._new_path()
        with open(path, "wb") as fh:
            for block in blocks:
                fh.write(("\n".join(block) + "\n").encode())
        return path

    def _spill(self) -> None:
        buffer, self._buffer = self._buffer, []
        buffer.sort()  # repeats are written too: the merge collapses them (checking here would cost a pass)
        self._runs.append(self._write_run(_blocks(buffer)))
        self.spills += 1

    def _merge(self, paths: list[str], *, with_buffer: bool = False) -> Generator[list[str], None, None]:
        """The distinct emails of some runs (and the in-memory chunk) in ascending blocks."""
        read_bytes = max(_MIN_RUN_READ, min(_READ_BYTES, _MERGE_READ_BUDGET // max(1, len(paths))))
        sources: list[Iterator[list[str]]] = [_file_blocks(p, read_bytes) for p in paths]
        if with_buffer and self._buffer:
            sources.append(_blocks(self._buffer))
        return _unique_blocks(_merge_blocks(sources), "merged runs" if paths else "buffer")

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._buffer.sort()
        kept = 1 if self._buffer else 0  # the last chunk is merged from memory, as one more source
        while len(self._runs) + kept > self.max_fanin:  # merge in groups until one pass can merge them all
            group, self._runs = self._runs[: self.max_fanin], self._runs[self.max_fanin :]
            self._runs.append(self._write_run(self._merge(group)))
            for path in group:
                os.unlink(path)

    def sorted_unique(self) -> Iterator[str]:
        """The distinct emails in ascending order (lazily: nothing happens before the first one is asked for).
        Sets `count` when iterated to the end; `close()` on the iterator stops it early."""
        return _Emails.of(self._sorted_blocks())

    def _sorted_blocks(self) -> Generator[list[str], None, None]:
        if self._closed:
            raise ValueError("EmailSorter is closed")
        self._finish()
        blocks = self._merge(list(self._runs), with_buffer=True)
        n = 0
        try:
            for block in blocks:
                n += len(block)
                yield block
        finally:
            blocks.close()
        self.count = n

    def close(self) -> None:
        self._closed = True
        self._buffer = []
        self._runs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ------------------------------------------------------------------------------------------------------ snapshots


def write_snapshot(store: ObjectStore, key: str, emails: Iterable[str], *, trusted: bool = False,
                   written_by: str | None = None, extra: dict[str, Any] | None = None) -> int:
    """Stream `emails` (ascending; adjacent repeats are collapsed) as a gzip'd snapshot, then its sidecar.

    Raises ValueError when the input is out of order or holds a line break; the previous snapshot then stays as it
    was (stores write atomically). `trusted=True` skips those checks and the de-duplication, for input known to be
    distinct valid emails in strictly ascending order: `EmailSorter.sorted_unique`, `read_snapshot`, `union_sorted`
    (faulty trusted input makes a snapshot that `read_snapshot` refuses). Returns the number of emails written."""
    total = 0
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        nonlocal total
        comp = zlib.compressobj(SNAPSHOT_COMPRESSLEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper, header mtime 0
        blocks, _ = _blocks_of(emails)
        if not trusted:
            blocks = _unique_blocks(blocks, "snapshot input", check=True)
        for block in blocks:
            data = ("\n".join(block) + "\n").encode()
            total += len(block)
            digest.update(data)
            if out := comp.compress(data):
                yield out
        yield comp.flush()

    etag = store.write_stream(key, chunks())  # counts and digests as it writes
    _write_meta(store, key, etag, total, digest.hexdigest(), written_by, extra)
    return total


def _write_meta(store: ObjectStore, key: str, etag: str, count: int, sha256: str | None, written_by: str | None,
                extra: dict[str, Any] | None) -> None:
    """The sidecar that vouches for the snapshot `key` as written (its etag)."""
    meta = {"count": count, "etag": etag, "sha256": sha256, "written_at": now_iso(), "written_by": written_by,
            **(extra or {})}
    store.write_bytes(meta_key(key), orjson.dumps(meta))


def copy_snapshot(store: ObjectStore, source: str, key: str, *, written_by: str | None = None,
                  extra: dict[str, Any] | None = None) -> int | None:
    """`source`'s bytes as the snapshot `key` (no decompression, no compression), with a sidecar of its own; None
    (nothing written) when `source` has no current sidecar to vouch for its count and digest."""
    meta = snapshot_meta(store, source)
    if meta is None:
        return None
    with store.open_read(source) as fh:
        etag = store.write_stream(key, iter(lambda: fh.read(_COPY_BYTES), b""))
    _write_meta(store, key, etag, int(meta["count"]), meta.get("sha256"), written_by, extra)
    return int(meta["count"])


def read_snapshot(store: ObjectStore, key: str) -> Iterator[str]:
    """The snapshot's emails in ascending order, streamed (the object is opened at the first one); nothing when it
    does not exist. A damaged or unsorted snapshot raises StateError (a wrong diff would remove the wrong people).
    Old snapshots read the same: any gzip (any level, one or more members) of the lines."""
    return _Emails.of(_snapshot_blocks(store, key))


def _snapshot_blocks(store: ObjectStore, key: str) -> Generator[list[str], None, None]:
    try:
        fh = store.open_read(key)
    except NotFound:
        return
    prev: str | None = None
    try:
        with fh:
            for block in _line_blocks(_inflate(fh)):
                if (prev is not None and block[0] <= prev) or not _ascending(block, strict=True):
                    n = 0  # yield the emails before the fault, then raise
                    while n < len(block) and (prev is None or block[n] > prev):
                        prev, n = block[n], n + 1
                    if n:
                        yield block[:n]
                    raise StateError(f"snapshot {key} in {store.label} is not strictly sorted: rewrite or delete it")
                prev = block[-1]
                yield block
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise StateError(f"snapshot {key} in {store.label} is unreadable ({type(exc).__name__}): "
                         "rewrite or delete it") from None


def write_lines(store: ObjectStore, key: str, emails: Iterable[str]) -> int:
    """Emails in any order (repeats allowed) as a gzip of lines, without a sidecar: what a run records as sent at a
    checkpoint (`held`). Returns how many were written."""
    total = 0

    def chunks() -> Iterator[bytes]:
        nonlocal total
        comp = zlib.compressobj(SNAPSHOT_COMPRESSLEVEL, zlib.DEFLATED, 31)
        for block in _blocks(emails):
            total += len(block)
            if out := comp.compress(("\n".join(block) + "\n").encode()):
                yield out
        yield comp.flush()

    store.write_stream(key, chunks())
    return total


def read_lines(store: ObjectStore, key: str) -> Iterator[list[str]]:
    """The blocks of emails of an object `write_lines` wrote (any gzip of lines), in stored order; nothing when it does
    not exist. StateError when it is unreadable."""
    try:
        fh = store.open_read(key)
    except NotFound:
        return
    try:
        with fh:
            for block in _line_blocks(_inflate(fh)):
                if block and block[-1] == "":
                    block = block[:-1]
                if block:
                    yield block
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise StateError(f"{key} in {store.label} is unreadable ({type(exc).__name__}): rewrite or delete it") from None


def snapshot_meta(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The sidecar when it describes the snapshot as it is now (same etag), else None."""
    info = store.info(key)
    if info is None:
        return None
    raw = store.read_bytes(meta_key(key))
    if raw is None:
        return None
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(meta, dict) or meta.get("etag") != info.etag or not isinstance(meta.get("count"), int):
        return None
    return meta


def snapshot_size(store: ObjectStore, key: str) -> int:
    """How many emails the snapshot holds: 0 when missing, the sidecar's count when current, else counted."""
    if store.info(key) is None:
        return 0
    meta = snapshot_meta(store, key)
    if meta is not None:
        return int(meta["count"])
    return sum(1 for _ in read_snapshot(store, key))


def delete_snapshot(store: ObjectStore, key: str) -> None:
    """Remove a snapshot and its sidecar (the sidecar first: a lone sidecar would not match anything anyway)."""
    store.delete(meta_key(key))
    store.delete(key)


def list_snapshots(store: ObjectStore, prefix: str = "snapshots/") -> list[str]:
    """Keys of the snapshots under prefix (sidecars excluded), in key order."""
    return [i.key for i in store.list(prefix) if i.key.endswith(SNAPSHOT_SUFFIX)]


def filter_out(store: ObjectStore, key: str, email: str) -> bool:
    """Rewrite a snapshot without one email (erasure). Returns whether it was there; nothing is written otherwise.
    Callers hold the destination's lease: a concurrent rewrite of the same snapshot would be lost."""
    target = _check_email(email.strip().lower())
    found = False
    for item in read_snapshot(store, key):
        if item >= target:
            found = item == target
            break
    if found:
        write_snapshot(store, key, (e for e in read_snapshot(store, key) if e != target), trusted=True)
    return found


# ------------------------------------------------------------------------------------------------ sorted streams


def diff_sorted(previous: Iterable[str], current: Iterable[str]) -> Iterator[str]:
    """Emails of `previous` not in `current` (both ascending; repeats collapsed), by one merge walk in blocks."""
    return _Emails.of(_diff_blocks(_checked_blocks(previous, "previous stream"),
                                   _checked_blocks(current, "current stream")))


def _checked_blocks(items: Iterable[str], what: str) -> Generator[list[str], None, None]:
    """Blocks of a stream checked to be ascending (ValueError naming `what`), repeats collapsed."""
    blocks, _ = _blocks_of(items)
    return _unique_blocks(blocks, what)


def _diff_blocks(previous: Iterator[list[str]], current: Iterator[list[str]]) -> Generator[list[str], None, None]:
    """Blocks of `previous` without the items of `current` (both strictly ascending blocks). Each round handles the
    items of the two streams' current blocks up to the smaller of their last items: one set and one C-level filter
    per round, and at most a block of each stream in memory."""
    cur = _next_block(current)
    cur_pos = 0
    for block in previous:
        pos = 0
        while cur is not None and pos < len(block):
            cutoff = min(block[-1], cur[-1])
            end = bisect.bisect_right(block, cutoff, pos)
            cur_end = bisect.bisect_right(cur, cutoff, cur_pos)
            if end > pos:
                piece = block[pos:end] if pos or end < len(block) else block
                if cur_end > cur_pos:
                    piece = list(itertools.filterfalse(set(cur[cur_pos:cur_end]).__contains__, piece))
                if piece:
                    yield piece
            pos, cur_pos = end, cur_end
            if cur_pos == len(cur):
                cur, cur_pos = _next_block(current), 0
        if cur is None and pos < len(block):  # nothing left to remove: the rest passes as it is
            yield block[pos:] if pos else block


def subtract_sorted(a: Iterable[str], *others: Iterable[str]) -> Iterator[str]:
    """Emails of `a` in none of `others` (all ascending): for a purge, the emails no other snapshot holds."""
    if not others:
        return _Emails.of(_checked_blocks(a, "stream"))
    merged = _merge_blocks([_checked_blocks(o, f"stream {i + 1}") for i, o in enumerate(others)])
    return _Emails.of(_diff_blocks(_checked_blocks(a, "previous stream"), _unique_blocks(merged, "current stream")))


def union_sorted(*streams: Iterable[str]) -> Iterator[str]:
    """Emails in any of the ascending streams, ascending and distinct (upsert mode: all the product ever sent).
    ValueError when a stream is out of order. Merged in blocks (`_merge_blocks`), so the streams are read ahead by
    up to a block of emails each."""
    sources = []
    for stream in streams:
        blocks, ordered = _blocks_of(stream)
        sources.append(blocks if ordered else _ordered_blocks(blocks, "union"))
    return _Emails.of(_unique_blocks(_merge_blocks(sources), "union"))


def count_sorted(items: Iterable[str]) -> int:
    """Consume a stream and count it (e.g. the size of a diff before the guard rail decides)."""
    blocks, _ = _blocks_of(items)
    return sum(map(len, blocks))


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SNAPSHOT_COMPRESSLEVEL",
    "EmailSorter",
    "count_sorted",
    "delete_snapshot",
    "diff_sorted",
    "filter_out",
    "list_snapshots",
    "meta_key",
    "read_snapshot",
    "snapshot_meta",
    "snapshot_size",
    "subtract_sorted",
    "write_snapshot",
]

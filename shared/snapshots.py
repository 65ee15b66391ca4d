"""Snapshots of the emails last synced to a list, kept compactly and compared as sorted streams.

A snapshot is a gzip'd text object of lower-case emails, one per line, strictly ascending (Python string order, which
is code point order and so also UTF-8 byte order). A tiny sidecar `<key>.meta.json` holds {"count", "etag", "sha256",
"written_at"}; it is written after the snapshot and trusted only while its etag matches the snapshot's, so the
snapshot object itself is always the truth.

Nothing here holds a whole list in memory: `EmailSorter` sorts in bounded chunks spilled to temporary files and
merges them; `diff_sorted` and `subtract_sorted` walk sorted streams side by side. At 5 million emails a snapshot is
some 40 MB of gzip and the sorter's memory is one chunk.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import itertools
import os
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from .errors import StateError
from .storage import NotFound, ObjectStore

META_SUFFIX = ".meta.json"
SNAPSHOT_SUFFIX = ".gz"
DEFAULT_CHUNK_SIZE = 250_000
MAX_MERGE_FANIN = 64  # runs merged at once; more runs are first merged in groups (bounded open files and buffers)
_WRITE_SLICE = 8_192  # lines joined and compressed at a time


def meta_key(key: str) -> str:
    return key + META_SUFFIX


def _check_email(email: str) -> str:
    if not isinstance(email, str) or not email or "\n" in email or "\r" in email:
        raise ValueError("an email must be a non-empty string without line breaks")
    return email


def _unique_ascending(items: Iterable[str], what: str) -> Iterator[str]:
    """Items of a non-decreasing stream with adjacent repeats collapsed; ValueError when the order breaks."""
    prev: str | None = None
    for item in items:
        if prev is not None and item <= prev:
            if item == prev:
                continue
            raise ValueError(f"{what} is not sorted: an item follows a greater one")
        prev = item
        yield item


def _read_lines(fh: Any) -> Iterator[str]:
    """Lines of a gzip'd text stream without their newlines."""
    with gzip.GzipFile(fileobj=fh, mode="rb") as gz, io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as text:
        for line in text:
            yield line[:-1] if line.endswith("\n") else line


# ---------------------------------------------------------------------------------------------------- EmailSorter


class EmailSorter:
    """Sort and de-duplicate any number of emails in bounded memory.

    `add` keeps at most `chunk_size` emails in memory; a full chunk is sorted, de-duplicated and spilled to a gzip'd
    run in a private temporary directory. `sorted_unique` merges the runs (at most MAX_MERGE_FANIN open at once) and
    may be iterated again; `count` (distinct emails) is known once it has been iterated to the end. `close` removes
    the temporary files. Without a spill nothing touches the disk.
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
        return os.path.join(self._tmp.name, f"run-{self._seq:06d}.gz")

    def _write_run(self, items: Iterable[str]) -> str:
        path = self._new_path()
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
            iterator = iter(items)
            while piece := list(itertools.islice(iterator, _WRITE_SLICE)):
                gz.write(("\n".join(piece) + "\n").encode())
        return path

    def _spill(self) -> None:
        buffer, self._buffer = self._buffer, []
        buffer.sort()
        self._runs.append(self._write_run(_unique_ascending(buffer, "chunk")))
        self.spills += 1

    @staticmethod
    def _read_run(path: str) -> Iterator[str]:
        with open(path, "rb") as fh:
            yield from _read_lines(fh)

    def _merged(self, paths: list[str]) -> Iterator[str]:
        return _unique_ascending(heapq.merge(*(self._read_run(p) for p in paths)), "merged runs")

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._runs and self._buffer:
            self._spill()
        else:
            self._buffer.sort()
        while len(self._runs) > self.max_fanin:  # merge in groups until one pass can merge them all
            group, self._runs = self._runs[: self.max_fanin], self._runs[self.max_fanin :]
            self._runs.append(self._write_run(self._merged(group)))
            for path in group:
                os.unlink(path)

    def sorted_unique(self) -> Iterator[str]:
        """The distinct emails in ascending order. Sets `count` when iterated to the end."""
        if self._closed:
            raise ValueError("EmailSorter is closed")
        self._finish()
        source = self._merged(list(self._runs)) if self._runs else _unique_ascending(self._buffer, "buffer")
        n = 0
        for email in source:
            n += 1
            yield email
        self.count = n

    def close(self) -> None:
        self._closed = True
        self._buffer = []
        self._runs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ------------------------------------------------------------------------------------------------------ snapshots


def write_snapshot(store: ObjectStore, key: str, emails: Iterable[str]) -> int:
    """Stream `emails` (ascending; adjacent repeats are collapsed) as a gzip'd snapshot, then its sidecar.

    Raises ValueError when the input is out of order or holds a line break; the previous snapshot then stays as it
    was (stores write atomically). Returns the number of emails written."""
    total = 0
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        nonlocal total
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip wrapper, header mtime 0
        iterator = _unique_ascending((_check_email(e) for e in emails), "snapshot input")
        while piece := list(itertools.islice(iterator, _WRITE_SLICE)):
            data = ("\n".join(piece) + "\n").encode()
            total += len(piece)
            digest.update(data)
            if out := comp.compress(data):
                yield out
        yield comp.flush()

    etag = store.write_stream(key, chunks())
    meta = {"count": total, "etag": etag, "sha256": digest.hexdigest(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_bytes(meta_key(key), orjson.dumps(meta))
    return total


def read_snapshot(store: ObjectStore, key: str) -> Iterator[str]:
    """The snapshot's emails in ascending order, streamed; nothing when it does not exist. A damaged or unsorted
    snapshot raises StateError (a wrong diff would remove the wrong people)."""
    try:
        fh = store.open_read(key)
    except NotFound:
        return
    prev: str | None = None
    try:
        with fh:
            for email in _read_lines(fh):
                if prev is not None and email <= prev:
                    raise StateError(f"snapshot {key} in {store.label} is not strictly sorted: rewrite or delete it")
                prev = email
                yield email
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise StateError(f"snapshot {key} in {store.label} is unreadable ({type(exc).__name__}): "
                         "rewrite or delete it") from None


def snapshot_meta(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The sidecar when it describes the snapshot as it is now (same etag), else None."""
    info = store.info(key)
    raw = store.read_bytes(meta_key(key)) if info is not None else None
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
        write_snapshot(store, key, (e for e in read_snapshot(store, key) if e != target))
    return found


# ------------------------------------------------------------------------------------------------ sorted streams


def diff_sorted(previous: Iterable[str], current: Iterable[str]) -> Iterator[str]:
    """Emails of `previous` not in `current` (both ascending; repeats collapsed), by one merge walk."""
    prev_it = _unique_ascending(previous, "previous stream")
    cur_it = _unique_ascending(current, "current stream")
    cur = next(cur_it, None)
    for item in prev_it:
        while cur is not None and cur < item:
            cur = next(cur_it, None)
        if cur is None:
            yield item
            yield from prev_it
            return
        if cur != item:
            yield item


def subtract_sorted(a: Iterable[str], *others: Iterable[str]) -> Iterator[str]:
    """Emails of `a` in none of `others` (all ascending): for a purge, the emails no other snapshot holds."""
    if not others:
        return _unique_ascending(a, "stream")
    checked = [_unique_ascending(o, f"stream {i + 1}") for i, o in enumerate(others)]
    return diff_sorted(a, heapq.merge(*checked))


def union_sorted(*streams: Iterable[str]) -> Iterator[str]:
    """Emails in any of the ascending streams, ascending and distinct (upsert mode: all the product ever sent)."""
    return _unique_ascending(heapq.merge(*streams), "union")


def count_sorted(items: Iterable[str]) -> int:
    """Consume a stream and count it (e.g. the size of a diff before the guard rail decides)."""
    return sum(1 for _ in items)


__all__ = [
    "DEFAULT_CHUNK_SIZE",
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

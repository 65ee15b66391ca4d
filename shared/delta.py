"""Send only what changed: per email, a fingerprint of exactly what was sent for it, compared with this export's.

Beside a destination's snapshot (who the list holds from us) lies `<snapshot>.fp.gz`: sorted lines `email<TAB>fp`,
where fp is 8 bytes of BLAKE2b over the contact's import CSV line (pipeline.content_digest: every mapped value as it
goes to SendGrid, whether the contact was sent as JSON or in an import file), for the contacts whose last sending
SendGrid confirmed (job completed, not named in its errors file). Its sidecar says for which destination settings
(`destination_fp`: list, mapping, custom fields), how fp was taken (`content`) and when the last full send was.

A run reads the export once to collect its own `email<TAB>fp` lines (external sort, bounded memory), then:
- full (no record, settings changed, asked for, or `full_resync_days` since the last full send): every contact sent;
- delta: a contact whose email and content are not in the record is sent. Read once (`Unchanged`: the record as
  digests, 10 bytes per recorded contact with their index), or, for a record over MAX_UNCHANGED_KEYS, a counting
  pass or a dry run, planned: the lines not in the record (a plain sorted diff) give the email fingerprints to send
  (`Wanted`, 8 bytes per contact to send), which filter the sending pass.
When the run's jobs are final, the record becomes this export's lines minus the contacts SendGrid did not confirm
(failed jobs, rows in errors files), so those are sent again by the next run.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from . import snapshots
from .config import Destination
from .contacts import CustomField, email_fps
from .storage import ObjectStore

if TYPE_CHECKING:
    from .pipeline import MappedChunk

SEP = "\t"
FP_CHARS = 16  # hex digits of a content fingerprint
_TAIL = len(SEP) + FP_CHARS


CONTENT = "import-line"  # what fp is taken over; a record of another kind (an earlier version's) is not compared


def line(email: str, digest: bytes) -> str:
    """What the record holds for one contact: its email and pipeline.content_digest."""
    return f"{email}{SEP}{digest.hex()}"


def email_of(record_line: str) -> str:
    return record_line[:-_TAIL]


def emails(lines: Iterable[str]) -> Iterator[str]:
    """The emails of sorted record lines, in the same (ascending) order."""
    return (entry[:-_TAIL] for entry in lines)


def destination_fingerprint(dest: Destination, custom: Sequence[CustomField]) -> str:
    """What makes a contact's JSON mean the same thing: the list, the mapping and the custom fields (by id)."""
    doc = {"list": dest.list_id, "mapping": sorted(dest.mapping.items()),
           "custom": sorted((c.name, c.id, c.field_type, c.column) for c in custom)}
    return hashlib.blake2b(orjson.dumps(doc), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Kind:
    kind: str  # "full" | "delta"
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "why": self.why}


def decide(store: ObjectStore, fp_key: str, dest: Destination, dest_fp: str, *, full_resync: bool,
           now: float | None = None) -> Kind:
    """Whether this run sends everything or only what changed, and why."""
    meta = snapshots.snapshot_meta(store, fp_key)
    if meta is None:
        return Kind("full", "no record of what was sent yet (a first run, or one after a purge or an upgrade)")
    if meta.get("content") != CONTENT:
        return Kind("full", "the record of what was sent was made by an earlier version, which compared contents "
                            "another way")
    if meta.get("destination_fp") != dest_fp:
        return Kind("full", "the list, the mapping or the custom fields changed since the last run")
    if full_resync:
        return Kind("full", "a full resync was asked for")
    last_full = float(meta.get("last_full_at") or 0)
    if dest.full_resync_days is not None and (now or time.time()) - last_full >= dest.full_resync_days * 86_400:
        return Kind("full", f"the last full send was {dest.full_resync_days} or more days ago (full_resync_days), so "
                            "edits made in SendGrid are overwritten")
    every = f"; a full send every {dest.full_resync_days} days" if dest.full_resync_days else ""
    return Kind("delta", f"only contacts new or changed since the last run{every}")


def classify(store: ObjectStore, fp_key: str, held_key: str, current_key: str, *,
             want_filter: bool) -> tuple[dict[str, int], np.ndarray | None]:
    """Counts of this export's contacts that are new to the list, changed (or of unknown content), and unchanged;
    with want_filter, the email fingerprints of the new and changed ones (sorted), which a delta run's sending pass
    keeps. Streams over the sorted files: memory is 8 bytes per contact to send."""
    count, pieces = 0, []

    def changed() -> Iterator[str]:  # counted (and fingerprinted) as the second diff walks it: one pass over each file
        nonlocal count
        lines = snapshots.diff_sorted(snapshots.read_snapshot(store, current_key),
                                      snapshots.read_snapshot(store, fp_key))
        for block in _blocks(emails(lines)):
            count += len(block)
            if want_filter:
                pieces.append(np.frombuffer(email_fps(block), dtype=np.uint64))
            yield from block

    new = snapshots.count_sorted(snapshots.diff_sorted(changed(), snapshots.read_snapshot(store, held_key)))
    total = snapshots.snapshot_size(store, current_key)
    wanted = np.sort(np.concatenate(pieces)) if pieces else np.zeros(0, dtype=np.uint64)
    return {"new": new, "changed": count - new, "unchanged": total - count}, (wanted if want_filter else None)


def _blocks(items: Iterator[str], size: int = 8192) -> Iterator[list[str]]:
    while block := list(itertools.islice(items, size)):
        yield block


class Filter(Protocol):
    """Which of a chunk's kept contacts a delta run sends."""

    def keep(self, chunk: MappedChunk, positions: list[int]) -> list[int]: ...


class KeySet:
    """Sorted 64-bit keys (hashes: spread evenly) with an index of where each value of their top bits starts, so a
    chunk's keys are looked up in ~1 ms where np.searchsorted over a million keys takes ~8 (its reads jump over the
    whole array; here most keys take one read in a bucket of ~2-4). The index adds at most 2 bytes per key."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        bits = max(1, len(keys).bit_length() - 2)
        self._shift = np.uint64(64 - bits)
        bounds = np.arange(1 << bits, dtype=np.uint64) << self._shift
        self._starts = np.append(np.searchsorted(keys, bounds), len(keys)).astype(np.uint32)

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """For each value, whether it is one of the keys."""
        hit = np.zeros(len(values), dtype=bool)
        if not len(self.keys):
            return hit
        bucket = (values >> self._shift).astype(np.intp)
        at, end = self._starts[bucket].astype(np.intp), self._starts[bucket + 1]
        live = np.flatnonzero(at < end)
        while live.size:  # one round per place in the buckets; a value leaves at the end of its bucket
            i = at[live]
            hit[live] |= self.keys[i] == values[live]
            at[live] = i + 1
            live = live[at[live] < end[live]]
        return hit


class Wanted:
    """The email fingerprints (classify's filter, sorted) of the contacts to send: a planned delta run's filter."""

    def __init__(self, fps: np.ndarray) -> None:
        self.fps = KeySet(fps)

    def keep(self, chunk: MappedChunk, positions: list[int]) -> list[int]:
        return _pick(self.fps.contains(np.frombuffer(chunk.fps, dtype=np.uint64)), positions, want=True)


class Unchanged:
    """The record's content digests, sorted: a contact whose digest is there is unchanged (the digest is taken over
    its whole import line, email included). Filters a delta run that reads its export once, and tells the mapping
    which contacts need JSON at all (pipeline.map_rows' only_changed). 8 bytes per recorded contact (and the
    index's 2), at most MAX_UNCHANGED_KEYS of them."""

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = KeySet(digests)
        self._last: tuple[bytes, np.ndarray] | None = None  # a chunk's answer: asked for by the mapping, then keep()

    @classmethod
    def load(cls, store: ObjectStore, fp_key: str) -> Unchanged:
        """Filled in place and sorted in place: 8 bytes per contact at the peak, not three copies of them."""
        keys, n = np.empty(snapshots.snapshot_size(store, fp_key), dtype=np.uint64), 0
        for block in _blocks(snapshots.read_snapshot(store, fp_key)):
            piece = np.frombuffer(bytes.fromhex("".join([entry[-FP_CHARS:] for entry in block])), dtype=np.uint64)
            if n + len(piece) > len(keys):  # more lines than its sidecar said: grow
                keys = np.concatenate([keys[:n], np.empty(max(len(piece), n), dtype=np.uint64)])
            keys[n : n + len(piece)] = piece
            n += len(piece)
        keys = keys[:n]
        keys.sort()
        return cls(keys)

    def _recorded(self, digests: bytes) -> np.ndarray:
        if self._last is None or self._last[0] is not digests:
            self._last = (digests, self.digests.contains(np.frombuffer(digests, dtype=np.uint64)))
        return self._last[1]

    def changed(self, digests: bytes) -> list[int]:
        """Positions of the digests (8 bytes each) that are not in the record."""
        return np.flatnonzero(~self._recorded(digests)).tolist()

    def keep(self, chunk: MappedChunk, positions: list[int]) -> list[int]:
        return _pick(self._recorded(chunk.digests), positions, want=False)


MAX_UNCHANGED_KEYS = 4_000_000  # 40 MB: a larger record plans its delta run by a counting pass instead (read once,
# a 5M delta run peaked at 206 MB, over the 200 MB a full run of 5M keeps to)


def _pick(hit: np.ndarray, positions: list[int], *, want: bool) -> list[int]:
    """The positions whose hit is `want`."""
    if not positions:
        return []
    return [p for p, h in zip(positions, hit[positions].tolist(), strict=True) if h is want]


def record_synced(store: ObjectStore, fp_key: str, current_key: str, unconfirmed: Iterable[str], *,
                  dest_fp: str, full: bool, written_by: str) -> int:
    """The record after a run whose jobs are final: this export's lines, minus the contacts SendGrid did not confirm
    (`unconfirmed`, ascending emails). Returns how many contacts it holds."""
    before = snapshots.snapshot_meta(store, fp_key) or {}
    last_full = time.time() if full else before.get("last_full_at", 0)
    extra = {"destination_fp": dest_fp, "last_full_at": last_full, "content": CONTENT}
    missing = list(unconfirmed)
    if not missing:  # every contact confirmed: the record is the staged file as it is, copied, not re-compressed
        copied = snapshots.copy_snapshot(store, current_key, fp_key, written_by=written_by, extra=extra)
        if copied is not None:
            return copied
    lines = snapshots.read_snapshot(store, current_key)
    kept = _without(lines, missing) if missing else lines
    return snapshots.write_snapshot(store, fp_key, kept, trusted=True, written_by=written_by, extra=extra)


def _without(lines: Iterator[str], dropped: list[str]) -> Iterator[str]:
    """Sorted record lines without those of the (sorted) dropped emails."""
    gone = iter(dropped)
    nxt = next(gone, None)
    for entry in lines:
        email = entry[:-_TAIL]
        while nxt is not None and nxt < email:
            nxt = next(gone, None)
        if nxt != email:
            yield entry


def forget(store: ObjectStore, fp_key: str, address: str) -> None:
    """Erasure: the person's line goes (should they be exported again, they are sent again)."""
    meta = snapshots.snapshot_meta(store, fp_key)
    if meta is None:
        snapshots.delete_snapshot(store, fp_key)
        return
    snapshots.write_snapshot(store, fp_key, _without(snapshots.read_snapshot(store, fp_key), [address]), trusted=True,
                             written_by=meta.get("written_by"),
                             extra={k: meta[k] for k in ("destination_fp", "last_full_at", "content") if k in meta})

"""What an export's files are, whoever found them (`sources` for plain files, `cdm` for model.json): the Partition
value and the few byte-level helpers both readers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from .errors import SourceError, StateError
from .storage import ObjectStore, check_key, reads_snapshots

BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Partition:
    segment: str  # CDM entity name; for a plain file: the file name without its extensions
    key: str  # key in the ObjectStore
    fmt: Literal["csv", "jsonl"]
    compressed: bool  # gzip
    columns: tuple[str, ...] | None  # from model.json attributes; None = from the header row / object keys
    header: bool  # CSV has a header row (CDM: columnHeaders; plain CSV: always True)
    delimiter: str = ","
    quoting: bool = True  # CDM QuoteStyle.Csv (RFC 4180 quotes); False: QuoteStyle.None, quotes are data
    encoding: str = "utf-8"  # the declared encoding (a Python codec); a byte order mark in the file wins
    snapshot: str | None = None  # a blob snapshot's time: that snapshot is read, not the blob


def info(store: ObjectStore, key: str) -> Any:
    """The object's info. A key that could leave the store is a SourceError; storage that cannot be reached stays a
    StateError (the run stops resumable and the timer goes on: nothing is wrong with the export)."""
    try:
        check_key(key)
    except StateError as e:
        raise SourceError(str(e), file=key) from None
    return store.info(key)


def read_exactly(fh: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at the end of the stream (a network stream may return short reads). Reads in
    chunks: file objects allocate the whole requested size up front."""
    parts, got = [], 0
    while got < n:
        b = fh.read(min(n - got, READ_CHUNK))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def json_type(v: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(v), "null")


def open_version(store: ObjectStore, key: str, snapshot: str | None) -> BinaryIO:
    """store.open_read(key), or of its blob snapshot where the store keeps snapshots (a folder keeps one version of
    each file: discovery notes when it reads that one instead)."""
    if snapshot is not None and reads_snapshots(store):
        return store.open_read(key, snapshot=snapshot)
    return store.open_read(key)

"""Find the files of an export and stream their rows, never holding a file in memory.

Two layouts: a Customer Insights CDM folder (model.json names the tables, their columns and their partition files)
and a plain file (.csv, .jsonl or .ndjson, optionally .gz) that is one segment. Storage is reached only through the
ObjectStore protocol. Row-level problems are values `(line, None, reason)`; whole-file problems raise SourceError.

Reading pipeline: store stream -> gzip (when the magic bytes say so) -> _LineGuard -> TextIOWrapper + csv.reader
(CSV) or BufferedReader lines + orjson (JSONL). The guard hands on whole lines only, replaces a line longer than the
cap by a marker line (so a file without line breaks cannot fill memory) and notes NUL bytes. Undecodable bytes are
decoded with surrogateescape through a handler that notes them. Either note "taints" the stream: from then on every
row's wanted values are checked; clean streams never pay for that (the hot loop is csv.reader + itemgetter + a length
check, about 25% over a bare csv.reader loop).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import itertools
import zlib
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import orjson

from . import cdm
from .errors import RunRefused, SourceError, StateError
from .partitions import BOM, READ_CHUNK, Partition, info, json_type, open_version, read_exactly
from .storage import NotFound, ObjectStore

if TYPE_CHECKING:
    from .cdm import Found

__all__ = [
    "MAX_CSV_LINE_BYTES",
    "MAX_FIELD_CHARS",
    "MAX_JSONL_LINE_BYTES",
    "CsvChunk",
    "CsvLayout",
    "Partition",
    "ReadOn",
    "check_columns",
    "csv_chunks",
    "discover",
    "find",
    "parse_csv_chunk",
    "read_rows",
    "segment_names",
]

# Caps on what one export file may contain (our choices; the exporters document none).
MAX_FIELD_CHARS = 1024 * 1024  # one CSV field (csv.field_size_limit counts characters)
MAX_CSV_LINE_BYTES = 4 * 1024 * 1024  # one physical CSV line; bounds the cost of a line with millions of fields
MAX_JSONL_LINE_BYTES = 16 * 1024 * 1024

ACCEPTED_FILES = ".csv, .jsonl or .ndjson, each optionally followed by .gz, or a model.json (or its folder)"

_GZIP_MAGIC = b"\x1f\x8b"
# Replaces an over-long line; NUL bytes and letters only, so no delimiter or quote can split it.
_MARKER = b"\x00\x00LINETOOLONG\x00\x00"
_MARKER_STR = _MARKER.decode("ascii")
# Ends the last line of a CSV file that has no line break, as a field of its own, so the reader can tell a complete
# last record from one cut short. Made of NUL bytes and letters: no delimiter, quote or line break.
_CUT = b"\x00\x00CUTSHORT\x00\x00"
_CUT_STR = _CUT.decode("ascii")
# Byte order marks that decide a file's encoding whatever model.json declares (as .NET's StreamReader does).
BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"), (BOM, "utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Taint: a process-wide counter bumped whenever any stream meets a NUL byte, an over-long line or undecodable bytes.
# A reader compares it with the value it saw at its start; a bump by another stream only costs it speed, never
# correctness. The codec error handler is global, so this is the cheapest way for it to reach the reader.

_TAINT = [0]
_surrogateescape = codecs.lookup_error("surrogateescape")


def _flag_undecodable(exc: UnicodeError) -> tuple[str | bytes, int]:
    _TAINT[0] += 1
    return _surrogateescape(exc)


_DECODE_ERRORS = "sgconnector-sources-flagged-surrogateescape"
codecs.register_error(_DECODE_ERRORS, _flag_undecodable)


# ---------------------------------------------------------------------------------------------------------------
# discover


def discover(store: ObjectStore, key: str, segments: Sequence[str] | None = None) -> list[Partition]:
    """The partitions behind `key`: a model.json, a folder holding one, or a plain file (one segment; `segments`
    does not filter a plain file). CDM entities come in the order of `segments` (None = model.json order); an entity
    named in `segments` but absent, or without partitions, gives none (`find` says which)."""
    return find(store, key, segments).partitions


def find(store: ObjectStore, key: str, segments: Sequence[str] | None = None) -> Found:
    """What the export behind `key` holds for `segments`: a cdm.Found with its partitions, the segments it lacks or
    holds empty, and notes for the run's warnings (which name those segments too)."""
    model_key, plain_file = _source(store, key)
    if plain_file is not None:
        return cdm.Found(partitions=[plain_file])
    found = cdm.find(store, model_key, segments)
    if found.missing:
        found.notes.insert(0, f"segments not in this export: {', '.join(found.missing)}")
    for name in found.empty:
        found.notes.append(f"segment '{name}' is in the export without partitions (an empty segment): no contacts "
                           "come from it")
    if segments is not None and not found.partitions and not found.empty:
        raise SourceError(f"none of the segments ({', '.join(segments)}) is in this export", file=model_key)
    return found


def segment_names(store: ObjectStore, key: str) -> list[str]:
    """The segments the export behind `key` holds, by name only: model.json's entities (hidden, empty and
    referenced ones too) or a plain file's one segment. Reads model.json alone: no partition is resolved and no
    reference followed, so a broken entity fails only the destinations that name it."""
    model_key, plain_file = _source(store, key)
    return [plain_file.segment] if plain_file is not None else cdm.entity_names(store, model_key)


def _source(store: ObjectStore, key: str) -> tuple[str, Partition | None]:
    """(model.json key, None) for a CDM export, ("", partition) for a plain file."""
    k = key.strip("/")
    if k.rsplit("/", 1)[-1].lower() == "model.json":
        return k, None
    if k and info(store, k) is not None:
        return "", _plain_partition(store, k)
    model_key = f"{k}/model.json" if k else "model.json"
    if info(store, model_key) is not None:
        return model_key, None
    folder = k and next(iter(store.list(k + "/")), None) is not None
    what = "is a folder without a model.json" if folder else f"was not found in {store.label}"
    raise SourceError(f"{what}; point the source at a {ACCEPTED_FILES}", file=key or "/")


_PLAIN_TYPES: tuple[tuple[str, Literal["csv", "jsonl"]], ...] = (
    (".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"))  # a plain file's extension and format


def _plain_partition(store: ObjectStore, key: str) -> Partition:
    name = key.rsplit("/", 1)[-1]
    stem, compressed = (name[:-3], True) if name.lower().endswith(".gz") else (name, False)
    lower = stem.lower()
    for ext, fmt in _PLAIN_TYPES:  # noqa: B007 - used after
        if lower.endswith(ext) and len(stem) > len(ext):
            break
    else:
        raise SourceError(f"unknown file type; accepted: {ACCEPTED_FILES}", file=key)
    if not compressed:
        compressed = _sniff_gzip(store, key)
    return Partition(stem[: -len(ext)], key, fmt, compressed, None, fmt == "csv")


def _sniff_gzip(store: ObjectStore, key: str) -> bool:
    try:
        with contextlib.closing(store.open_read(key)) as fh:
            return read_exactly(fh, 2) == _GZIP_MAGIC
    except NotFound:
        raise SourceError(f"was not found in {store.label}", file=key) from None


def check_columns(store: ObjectStore, partitions: Sequence[Partition], wanted: Mapping[str, str]) -> None:
    """Refuse the run (RunRefused) when a mapped column (wanted: what maps it -> column) is in none of the export's
    files, matched as read_rows matches columns. A file's columns come from model.json, or from a plain CSV file's
    header row (one small read). JSON Lines files are not checked: their keys are only known object by object (a
    missing email key rejects each object naming the key; an optional key no object has is warned about)."""
    known: dict[tuple[str, ...], None] = {}
    for part in partitions:
        columns = part.columns if part.columns is not None else _header_of(store, part)
        if columns:
            known[columns] = None
    if not known:
        return
    absent = [(what, col) for what, col in wanted.items() if all(_resolve(c, [col])[0] is None for c in known)]
    if absent:
        have = list(dict.fromkeys(c for columns in known for c in columns))
        hint = _delimiter_hint(have, partitions[0].delimiter) if len(known) == 1 else ""
        raise RunRefused(f"column(s) {', '.join(f'{c!r} ({w})' for w, c in absent)} are in none of the export's "
                         f"files; the files have columns: {_show_columns(have)}{hint}. Fix the mapping or "
                         "custom_fields, or the export: nothing was sent")


def _header_of(store: ObjectStore, part: Partition) -> tuple[str, ...] | None:
    """The header row of a plain CSV file, or None when it has none or it cannot be read (the reading says why)."""
    if part.fmt != "csv" or not part.header:
        return None
    cut = part.delimiter.encode("utf-8") + _CUT + b"\n"
    try:
        with _open_lines(store, part, MAX_CSV_LINE_BYTES, b"\r\n", [], cut) as guard:
            text = io.TextIOWrapper(guard, encoding="utf-8-sig", errors=_DECODE_ERRORS, newline="")
            header = _csv_header(_csv_reader(text, part.delimiter, part.quoting), part, MAX_CSV_LINE_BYTES)
    except (SourceError, StateError, *_DAMAGED):
        return None
    return tuple(header) if header else None


# ---------------------------------------------------------------------------------------------------------------
# read_rows

Row = tuple[int, "list[str | None] | None", "str | None"]


def read_rows(store: ObjectStore, part: Partition, wanted: Sequence[str], required: Collection[str] = (),
              warnings: list[str] | None = None, *, max_field: int = MAX_FIELD_CHARS,
              max_line: int | None = None) -> Iterator[tuple[int, list[str | None] | None, str | None]]:
    """Stream `(line, values, None)` for good rows (values in `wanted` order) and `(line, None, reason)` for rejected
    ones. `line` is the 1-based physical line where the row starts, counting a header line. Whole-file problems
    (missing file, required column absent, unreadable header, truncated or corrupt gzip) raise SourceError when met,
    after the good rows before them were yielded. A wanted column that is absent gives None and one warning line.

    CSV columns match by exact name, else uniquely ignoring case and surrounding spaces; JSONL keys match exactly and
    an object without a required key is rejected. `max_field` is applied through csv.field_size_limit, which is
    process-wide: concurrent readers should use the same value."""
    warns = warnings if warnings is not None else []
    if part.fmt == "csv":
        return _read_csv(store, part, tuple(wanted), frozenset(required), warns, max_field,
                         max_line or MAX_CSV_LINE_BYTES)
    if part.fmt == "jsonl":
        return _read_jsonl(store, part, tuple(wanted), frozenset(required), warns, max_line or MAX_JSONL_LINE_BYTES)
    raise SourceError(f"unsupported format {part.fmt!r}; accepted: {ACCEPTED_FILES}", file=part.key)


class _Chain(io.RawIOBase):
    """Bytes already read (the magic-byte sniff) followed by the rest of a stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            k = len(self._head) if n is None or n < 0 else n
            out, self._head = self._head[:k], self._head[k:]
            return out
        return self._rest.read(n)

    def read1(self, n: int = -1) -> bytes:
        """As read, but one read1 of the rest (a damaged gzip stream gives the data before the damage first)."""
        if self._head:
            return self.read(n)
        return getattr(self._rest, "read1", self._rest.read)(n)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _flag_transcoding(exc: UnicodeError) -> tuple[str, int]:
    """Undecodable bytes in a file of another encoding: surrogate escapes (0xFF for a byte below 0x80) that turn
    back into invalid UTF-8, which the UTF-8 reading then flags on the row. Only decoding uses it."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _TAINT[0] += 1
    bad = exc.object[exc.start : exc.end]
    return "".join(chr(0xDC00 + b) if b >= 0x80 else "\udcff" for b in bad) or "\udcff", exc.end


_TRANSCODE_ERRORS = "sgconnector-sources-flagged-transcoding"
codecs.register_error(_TRANSCODE_ERRORS, _flag_transcoding)


class _Stream(io.RawIOBase):
    """A readable stream of this module's pipeline."""

    # TextIOWrapper checks `buffer.closed` on every line; a class attribute is much cheaper than IOBase's property.
    closed = False
    name = ""  # the key of the file read, as a file object names its file (TextIOWrapper.name)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class _Transcoder(_Stream):
    """A stream in another encoding as UTF-8, one read1() of the source at a time. Every reader after it (the line
    guard, csv, the chunker for worker processes) sees UTF-8 only."""

    def __init__(self, src: Any, encoding: str) -> None:
        self._read = getattr(src, "read1", src.read)
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=_TRANSCODE_ERRORS)
        self._eof = False

    def read1(self, n: int = -1) -> bytes:
        while not self._eof:
            data = self._read(READ_CHUNK)
            self._eof = not data
            text = self._decoder.decode(data, self._eof)
            if text:
                return text.encode("utf-8", "surrogateescape")
        return b""

    read = read1

    def readinto(self, b: Any) -> int:
        raise io.UnsupportedOperation("read1 only")  # BufferedReader is never put on top of this


def _decoded(src: Any, encoding: str) -> Any:
    """src as UTF-8: as it is when it is UTF-8 (or ASCII), else through a _Transcoder. A byte order mark at the start
    decides the encoding whatever was declared; the UTF-16/32 decoders drop theirs, UTF-8 readers drop theirs."""
    head = read_exactly(src, 4)
    src = _Chain(head, src)
    codec = next((c for bom, c in BOMS if head.startswith(bom)), encoding)
    return src if codec == "utf-8" else _Transcoder(src, codec)


class _LineGuard(_Stream):
    """Hands on whole lines only. A line longer than `max_line` bytes is dropped (never held whole: the bytes are
    discarded as they arrive) and replaced by _MARKER, keeping its line break so line numbers stay right.

    TextIOWrapper reads it directly through read1(); BufferedReader through readinto()."""

    def __init__(self, src: Any, max_line: int, newlines: bytes, cut: bytes = b"", name: str = "") -> None:
        self.name = name
        self._read = getattr(src, "read1", src.read)  # read1: a truncated gzip loses no data read before the damage
        self._max, self._cr = max_line, b"\r" in newlines
        self._cut = cut  # appended, with a line break, to a last line that has none (CSV: the delimiter + _CUT)
        self._chunk = min(READ_CHUNK, max_line)
        self._tail: list[bytes] = []  # bytes after the last line break, not handed on yet
        self._tail_len = 0
        self._skipping = False
        self._buf, self._pos = b"", 0  # whole lines ready to hand on
        self._eof = False

    def read1(self, n: int = -1) -> bytes:
        while self._pos >= len(self._buf):
            if self._eof:
                return b""
            self._fill()
        pos, buf = self._pos, self._buf
        if n < 0 or pos + n >= len(buf):
            self._pos = len(buf)
            return buf[pos:] if pos else buf
        self._pos = pos + n
        return buf[pos: pos + n]

    def readinto(self, b: Any) -> int:
        data = self.read1(len(b))
        b[: len(data)] = data
        return len(data)

    def _first_nl(self, data: bytes) -> int:
        i = data.find(b"\n")
        if self._cr:
            j = data.find(b"\r", 0, i if i >= 0 else len(data))
            if j >= 0:
                return j
        return i

    def _last_nl(self, data: bytes) -> int:
        i = data.rfind(b"\n")
        return max(i, data.rfind(b"\r", i + 1)) if self._cr else i

    def _fill(self) -> None:
        self._buf, self._pos = b"", 0
        data = self._read(self._chunk)
        if not data:
            self._eof = True
            self._buf = _MARKER if self._skipping else b"".join(self._tail)
            if self._buf and self._cut and not self._skipping:
                self._buf += self._cut
                _TAINT[0] += 1  # the rows read from here on take the slow path, which knows the marker
            self._tail, self._tail_len, self._skipping = [], 0, False
            return
        if b"\x00" in data:
            _TAINT[0] += 1
        out: list[Any] = []
        if self._skipping:
            i = self._first_nl(data)
            if i < 0:
                return  # still inside the over-long line: drop these bytes
            self._skipping, data = False, data[i:]
            out.append(_MARKER)
        j = self._last_nl(data)
        if j < 0:
            self._tail.append(data)
            self._tail_len += len(data)
            if self._tail_len > self._max:
                self._too_long()
        else:
            if self._tail:
                i = self._first_nl(data)
                if self._tail_len + i > self._max:  # the line the tail began ends here, too long: drop it
                    out.append(_MARKER)
                    data, j = data[i:], j - i
                    _TAINT[0] += 1
                else:
                    out += self._tail
                self._tail, self._tail_len = [], 0
            if j + 1 < len(data):
                rest = data[j + 1:]
                self._tail, self._tail_len = [rest], len(rest)
                out.append(memoryview(data)[: j + 1])
            else:
                out.append(data)
        self._buf = out[0] if len(out) == 1 and type(out[0]) is bytes else b"".join(out)

    def _too_long(self) -> None:
        self._tail, self._tail_len, self._skipping = [], 0, True
        _TAINT[0] += 1


@contextlib.contextmanager
def _open_lines(store: ObjectStore, part: Partition, max_line: int, newlines: bytes, warns: list[str],
                cut: bytes = b"") -> Iterator[_LineGuard]:
    """The partition as whole UTF-8 lines: store -> gzip (by its magic bytes) -> the declared encoding or the byte
    order mark's, as UTF-8 -> _LineGuard (with `cut` after a last line that has no line break)."""
    try:
        raw = open_version(store, part.key, part.snapshot)
    except NotFound:
        raise SourceError(f"was not found in {store.label}; it may have been deleted or the export run is still "
                          "being written", file=part.key) from None
    try:
        head = read_exactly(raw, 2)
        src: Any = _Chain(head, raw)
        if head == _GZIP_MAGIC:
            src = gzip.GzipFile(fileobj=src, mode="rb")
        elif part.compressed and head:
            warns.append(f"{part.key}: named as gzip but is not gzip data; read as plain text")
        try:
            src = _decoded(src, part.encoding)
        except _DAMAGED as e:
            raise _io_error(part, 1, e) from e
        yield _LineGuard(src, max_line, newlines, cut, part.key)
    finally:
        raw.close()


# Damaged compressed data. Other I/O errors (network, disk) propagate unchanged: they are not the file's fault, and
# their messages may carry URLs with SAS tokens.
_DAMAGED = (EOFError, zlib.error, gzip.BadGzipFile)


def _io_error(part: Partition, line: int, e: BaseException) -> SourceError:
    return SourceError(f"the file is truncated or corrupt ({type(e).__name__}: {e}); the rows before this line were "
                       "read. Re-create or re-upload the file", file=part.key, line=line)


def _fmt_bytes(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def _long_line_reason(line: int, max_line: int) -> str:
    return (f"line {line} is longer than {_fmt_bytes(max_line)} and was skipped; it probably lacks line breaks or "
            "holds a huge value: fix the export")


def _value_problem(values: Sequence[str | None], names: Sequence[str], line: int, max_line: int) -> str | None:
    """Why wanted values are unusable (NUL, undecodable bytes, over-long line marker), or None. Slow path only."""
    for name, v in zip(names, values, strict=False):
        if v is None or (v.isascii() and "\x00" not in v):
            continue
        if _MARKER_STR in v:
            return _long_line_reason(line, max_line)
        if "\x00" in v:
            return f"column '{name}' contains a NUL byte; the file may be binary or damaged: fix the export"
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(v[e.start]) - 0xDC00
            return (f"column '{name}' contains bytes that are not valid UTF-8 (0x{byte:02X} at character "
                    f"{e.start + 1}); save the export as UTF-8")
    return None


def _resolve(columns: Sequence[str], wanted: Sequence[str]) -> list[int | None]:
    """Index of each wanted column: exact name, else a unique match ignoring case and surrounding spaces."""
    exact: dict[str, int] = {}
    loose: dict[str, int | None] = {}
    for i, c in enumerate(columns):
        exact.setdefault(c, i)
        f = c.strip().casefold()
        loose[f] = None if f in loose and loose[f] != i else i
    return [exact[w] if w in exact else loose.get(w.strip().casefold()) for w in wanted]


def _show_columns(columns: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(repr(c if len(c) <= 60 else c[:57] + "...") for c in columns[:limit])
    return shown + (f" ... ({len(columns) - limit} more)" if len(columns) > limit else "") if columns else "(none)"


def _delimiter_hint(columns: Sequence[str], delimiter: str) -> str:
    if len(columns) == 1:
        for d, label in ((";", "';'"), ("\t", "tab"), ("|", "'|'"), (",", "','")):
            if d != delimiter and d in columns[0]:
                return f"; the header looks {label}-delimited, but the file is read with {delimiter!r}"
    return ""


def _picker(n: int, idx: Sequence[int | None]) -> Callable[[list[str]], Sequence[str | None]]:
    """A C-level getter for the wanted columns of a row of n fields, returning a list or a tuple (absent columns
    read a None appended to the row)."""
    if not idx:
        return lambda row: ()
    full = [n if i is None else i for i in idx]
    if full == list(range(full[0], full[0] + len(full))):
        get: Callable[[list[Any]], Any] = itemgetter(slice(full[0], full[0] + len(full)))
    else:
        get = itemgetter(*full)
    if None in idx:
        inner = get

        def get(row: list[Any]) -> Any:
            row.append(None)
            return inner(row)

    return get


def _csv_error_reason(e: csv.Error, start: int, end: int, max_field: int) -> str:
    msg = str(e)
    span = f"lines {start}-{end}" if end > start else f"line {start}"
    if "field larger than field limit" in msg:
        return (f"a field is longer than {max_field} characters (the limit) on {span}; if a quote opened there is "
                "never closed, fix the quoting, otherwise shorten the value")
    if "unexpected end of data" in msg:
        return (f"a quoted field that starts on line {start} is never closed, so the rest of the file ({span}) "
                "was read as one field; fix the quoting in the export")
    if "expected after" in msg:
        return (f"malformed quoting on {span}: text follows a closing quote; quote whole fields and double any "
                "quote inside them")
    return f"malformed CSV on {span} ({msg}); fix the export"


class _CutShort(Exception):
    """The file's last record is incomplete: it ends inside a quoted field, or its last line has too few fields and
    no line break."""

    def __init__(self, line: int, detail: str) -> None:
        super().__init__(detail)
        self.line, self.detail = line, detail


def _cut_short(part: Partition, e: _CutShort) -> SourceError:
    return SourceError(f"the file is cut short: its last record (from line {e.line}) {e.detail}; the rows before it "
                       "were read. The export may still be being written, or the file is damaged: re-run the export "
                       "or re-upload the file", file=part.key, line=e.line)


def _read_csv(store: ObjectStore, part: Partition, wanted: tuple[str, ...], required: frozenset[str],
              warns: list[str], max_field: int, max_line: int) -> Iterator[Row]:
    csv.field_size_limit(max_field)
    taint = _TAINT
    mark = taint[0]
    cut = part.delimiter.encode("utf-8") + _CUT + b"\n"
    with _open_lines(store, part, max_line, b"\r\n", warns, cut) as guard:
        text = io.TextIOWrapper(guard, encoding="utf-8-sig", errors=_DECODE_ERRORS, newline="")
        # One read1() per guard chunk, no copies. _CHUNK_SIZE is CPython's TextIOWrapper attribute; typeshed leaves
        # it out as private.
        text._CHUNK_SIZE = READ_CHUNK  # type: ignore[attr-defined]
        rd = _csv_reader(text, part.delimiter, part.quoting)
        try:
            header = _csv_header(rd, part, max_line) if part.header else None
        except _DAMAGED as e:
            raise _io_error(part, rd.line_num + 1, e) from e
        if header is None and part.header and part.columns is None:
            return  # an empty file: no header, no rows (the caller notes "0 rows")
        columns, idx = _csv_columns(part, header, wanted, required, warns)
        n = len(columns)
        get = _picker(n, idx)
        at, base = [rd.line_num], 1  # a row starts on line at[0] + base; base moves on when a new reader starts
        try:
            while True:
                try:
                    yield from _csv_records(rd, n, get, wanted, base, at, max_line, taint, mark)
                    return
                except csv.Error as e:
                    start, end = at[0] + base, rd.line_num + base - 1
                    if "unexpected end of data" in str(e):
                        raise _CutShort(start, "ends inside a quoted field (a quote is never closed)") from None
                    if end > start and "field larger than field limit" in str(e):
                        # Inside an over-long quoted field: resuming at the next line would read the rest of the
                        # field as rows. Skip to where the field closes and restart the reader there.
                        skipped, closed = _skip_quoted_field(text)
                        if not closed:
                            raise _CutShort(start, f"ends inside a quoted field longer than {max_field} characters "
                                                   "(a quote is never closed)") from None
                        end += skipped
                        yield start, None, _overflow_reason(start, end, closed, max_field)
                        rd = _csv_reader(text, part.delimiter, part.quoting)
                        at[0], base = 0, end + 1
                    else:
                        yield start, None, _csv_error_reason(e, start, end, max_field)
                        at[0] = rd.line_num
        except _DAMAGED as e:
            raise _io_error(part, at[0] + base, e) from e
        except _CutShort as e:
            raise _cut_short(part, e) from None


_UNTAINTED = [0]


def _csv_reader(lines: Iterable[str], delimiter: str, quoting: bool = True) -> Any:
    """The CSV dialect of every read: RFC 4180 quoting, strict (a stray quote is a csv.Error, not a guess); or, for
    QuoteStyle.None, no quoting at all (a quote is a character like any other)."""
    if not quoting:
        return csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE, strict=True)
    return csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)


def _csv_records(rd: Any, n: int, get: Callable[[list[str]], Sequence[str | None]], wanted: Sequence[str], base: int,
                 at: list[int], max_line: int, taint: list[int] = _UNTAINTED, mark: int = 0) -> Iterator[Row]:
    """The hot loop of every CSV read: the rows of reader rd (n fields, values picked by get), as read_rows gives
    them. A row starts on line at[0] + base; at[0] follows rd.line_num, so after a csv.Error the caller knows where
    the bad record began. taint[0] != mark: the line guard flagged bytes since (undecodable or over-long lines)."""
    if type(get) is itemgetter and type(get([None] * (n + 1))) is list:  # a slice getter: already a fresh list
        for row in rd:
            if len(row) == n and taint[0] == mark:
                yield at[0] + base, get(row), None
            elif row:
                yield _csv_slow(row, n, get, wanted, taint[0] != mark, at[0] + base, max_line)
            at[0] = rd.line_num
    else:
        for row in rd:
            if len(row) == n and taint[0] == mark:
                yield at[0] + base, [*get(row)], None
            elif row:
                yield _csv_slow(row, n, get, wanted, taint[0] != mark, at[0] + base, max_line)
            at[0] = rd.line_num


def _csv_columns(part: Partition, header: list[str] | None, wanted: Sequence[str], required: Collection[str],
                 warns: list[str]) -> tuple[tuple[str, ...], list[int | None]]:
    """The partition's columns (model.json's, else the header's) and the index of each wanted column."""
    columns = part.columns
    if columns is None:
        if not part.header:
            raise SourceError("has neither a header row nor column names from model.json", file=part.key)
        if header is None:
            raise SourceError("no header row: the file is empty; a plain CSV file needs a header row naming its "
                              "columns", file=part.key, line=1)
        columns = tuple(header)
    elif header is not None and [h.strip().casefold() for h in header] != [c.casefold() for c in columns]:
        warns.append(f"{part.key}: the header row ({_show_columns(header, 10)}) differs from model.json's "
                     f"attributes ({_show_columns(columns, 10)}); model.json's columns were used")
    return columns, _check_columns(part, columns, wanted, required, warns, part.delimiter)


def _skip_quoted_field(lines: Iterator[str]) -> tuple[int, bool]:
    """Consume lines while inside a quoted field; returns (lines consumed, whether the field closed)."""
    inside, count = True, 0
    for line in lines:
        count += 1
        if line.count('"') % 2:
            inside = not inside
        if not inside:
            return count, True
    return count, False


def _overflow_reason(start: int, end: int, closed: bool, max_field: int) -> str:
    if closed:
        return (f"a quoted field in the row on lines {start}-{end} is longer than {max_field} characters (the "
                "limit); the row was skipped: shorten the value or fix the quoting")
    return (f"a quoted field that starts on line {start} is never closed (it ran past {max_field} characters), so "
            f"the rest of the file (lines {start}-{end}) was skipped; fix the quoting in the export")


def _csv_header(rd: Any, part: Partition, max_line: int) -> list[str] | None:
    try:
        header = next((r for r in rd if r), None)
    except csv.Error as e:
        raise SourceError(f"the header row cannot be read ({e}); fix the quoting or the delimiter in the export",
                          file=part.key, line=rd.line_num) from None
    if header and header[-1] == _CUT_STR:  # a header without a line break: the file holds nothing else
        header.pop()
    if header is not None and any(_MARKER_STR in h for h in header):
        raise SourceError(f"the header row is longer than {_fmt_bytes(max_line)}; the file probably lacks line "
                          "breaks: fix the export", file=part.key, line=rd.line_num)
    return header


def _check_columns(part: Partition, columns: Sequence[str], wanted: Sequence[str], required: Collection[str],
                   warns: list[str], delimiter: str) -> list[int | None]:
    idx = _resolve(columns, wanted)
    absent = [w for w, i in zip(wanted, idx, strict=True) if i is None]
    missing = [w for w in dict.fromkeys(absent) if w in required]
    missing += [r for r in sorted(required) if r not in wanted and _resolve(columns, [r])[0] is None]
    if missing:
        raise SourceError(f"required column(s) {', '.join(map(repr, missing))} not found; the file has columns: "
                          f"{_show_columns(columns)}{_delimiter_hint(columns, delimiter)}. Fix the column mapping or "
                          "the export", file=part.key, line=1 if part.header else None)
    for w in dict.fromkeys(absent):
        warns.append(f"{part.key}: column {w!r} is not in the file (it has {_show_columns(columns, 10)}); its value "
                     "is empty in every row")
    return idx


def _csv_slow(row: list[str], n: int, get: Callable[[list[str]], Sequence[str | None]], wanted: Sequence[str],
              tainted: bool, line: int, max_line: int) -> Row:
    if tainted and row[-1] == _CUT_STR:  # the file's last line, which has no line break
        row.pop()
        if len(row) < n:
            raise _CutShort(line, f"has {len(row)} of {n} fields and no line break")
    if len(row) != n:
        if tainted and _MARKER_STR in "".join(row):
            return line, None, _long_line_reason(line, max_line)
        return line, None, (f"expected {n} fields, found {len(row)}; check the delimiter and quoting of this row "
                            "in the export")
    values = [*get(row)]
    problem = _value_problem(values, wanted, line, max_line)
    return (line, None, problem) if problem else (line, values, None)


# ---------------------------------------------------------------------------------------------------------------
# CSV in chunks, for parsing in other processes
#
# The reading process cuts a CSV partition into chunks of whole records at line breaks where the count of quote
# characters since the chunk's start is even, and other processes parse them (parse_csv_chunk). A chunk is only
# trusted when its own parse ends cleanly: a parse that starts at a record boundary and ends without error ends at a
# record boundary too, so chunk by chunk the rows are exactly those of one parse of the whole file. Anything unusual
# (a stray quote that defeats the parity rule, bytes that are not UTF-8, NUL bytes, an over-long line, a csv error,
# a damaged gzip) makes the caller read the rest of the partition with read_rows, from the first line not yet
# taken, so every reason, line number and SourceError stays what read_rows gives.

CHUNK_BYTES = 1024 * 1024  # a chunk is cut at the last usable line break after this many bytes


@dataclass(frozen=True)
class CsvLayout:
    """What parse_csv_chunk needs to know about a partition (small and picklable)."""

    key: str
    delimiter: str
    columns: int
    index: tuple[int | None, ...]  # of each wanted column in a row
    wanted: tuple[str, ...]
    max_field: int
    max_line: int


@dataclass(frozen=True)
class CsvChunk:
    layout: CsvLayout
    data: bytes  # whole records, UTF-8 without BOM
    first_line: int  # the 1-based physical line the chunk starts on


@dataclass(frozen=True)
class ReadOn:
    """The rest of the partition, from this line on, must be read with read_rows."""

    line: int


def _line_breaks(data: bytes) -> int:
    """Physical lines ended in data, counted like csv.reader does (\r\n, \r and \n each end one)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _record_cut(buf: bytes, tries: int = 256) -> int:
    """Length of the longest prefix of buf that ends with a line break outside quotes (by quote parity), or 0."""
    after = 0  # quotes after position p
    end = len(buf)
    total = buf.count(b'"')
    for _ in range(tries):
        p = buf.rfind(b"\n", 0, end)
        if p < 0:
            return 0
        after += buf.count(b'"', p + 1, end)
        if (total - after) % 2 == 0:
            return p + 1
        end = p
    return 0


def _first_record_end(buf: bytes, tries: int = 256) -> int:
    """Length of the shortest prefix of buf that ends with a line break outside quotes (by quote parity), or 0."""
    p = -1
    for _ in range(tries):
        p = buf.find(b"\n", p + 1)
        if p < 0:
            return 0
        if buf.count(b'"', 0, p) % 2 == 0:
            return p + 1
    return 0


# long and branchy on purpose (C901): the one loop that cuts a partition at record boundaries for workers, every way
# out of it in one place (a stray quote, bad bytes, a long line, a damaged gzip) so none is forgotten
def csv_chunks(store: ObjectStore, part: Partition, wanted: Sequence[str], required: Collection[str] = (),  # noqa: C901
               warnings: list[str] | None = None, *, chunk_bytes: int = CHUNK_BYTES, max_field: int = MAX_FIELD_CHARS,
               max_line: int | None = None) -> Generator[CsvChunk | ReadOn, None, None]:
    """A CSV partition as CsvChunks of whole records, in order; a ReadOn ends the stream early when the rest must
    be read with read_rows (see above). Header and column problems raise SourceError as read_rows does."""
    warns = warnings if warnings is not None else []
    max_line = max_line or MAX_CSV_LINE_BYTES
    csv.field_size_limit(max_field)
    with _open_lines(store, part, max_line, b"\r\n", warns) as guard:
        read = guard._read  # the decompressed stream: this reader needs none of the guard's line handling
        line, buf, layout, eof = 1, b"", None, False
        while not eof:
            try:
                block = read(chunk_bytes)
            except _DAMAGED:
                yield ReadOn(line)
                return
            eof = not block
            buf = buf + block if buf else block
            if layout is None:
                if len(buf) < len(BOM) and not eof:
                    continue
                buf = buf.removeprefix(BOM)
                if eof and not buf:
                    return  # an empty file: no rows (read_rows gives none either)
                if not part.header:
                    layout = _layout(part, None, wanted, required, warns, max_field, max_line)
                else:
                    if buf[:1] in (b"\r", b"\n"):  # blank lines before the header: rare, leave them to read_rows
                        yield ReadOn(1)
                        return
                    cut = _first_record_end(buf[: max_line + 1]) or (len(buf) if eof else 0)
                    if not cut and not eof:
                        if len(buf) > max_line:
                            yield ReadOn(1)
                            return
                        continue
                    head, buf = buf[:cut], buf[cut:]
                    try:
                        text = head.decode("utf-8")
                    except UnicodeDecodeError:
                        yield ReadOn(1)
                        return
                    rd = _csv_reader(io.StringIO(text, newline=""), part.delimiter)
                    layout = _layout(part, _csv_header(rd, part, max_line), wanted, required, warns, max_field,
                                     max_line)
                    line += _line_breaks(head)
            if eof:
                # a line read_rows would refuse as too long, or a last line without a line break (read_rows tells a
                # complete one from one cut short)
                if len(buf) > max_line or (buf and not buf.endswith((b"\n", b"\r"))):
                    yield ReadOn(line)
                elif buf:
                    yield CsvChunk(layout, buf, line)
                return
            if len(buf) < chunk_bytes:
                continue
            cut = _record_cut(buf)
            if cut and cut <= max_line:  # no line in the chunk can be longer than the chunk
                data = buf[:cut]
                yield CsvChunk(layout, data, line)
                line += _line_breaks(data)
                buf = buf[cut:]
            elif len(buf) > max_line:
                yield ReadOn(line)
                return


def _layout(part: Partition, header: list[str] | None, wanted: Sequence[str], required: Collection[str],
            warns: list[str], max_field: int, max_line: int) -> CsvLayout:
    columns, idx = _csv_columns(part, header, wanted, required, warns)
    return CsvLayout(part.key, part.delimiter, len(columns), tuple(idx), tuple(wanted), max_field, max_line)


def parse_csv_chunk(chunk: CsvChunk) -> Iterator[Row]:
    """The rows of a chunk, as read_rows gives them. Raises ValueError when the chunk cannot be trusted (see above):
    the caller then reads on from chunk.first_line with read_rows."""
    lay = chunk.layout
    text = chunk.data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\x00" in text:
        raise ValueError("NUL byte")
    csv.field_size_limit(lay.max_field)
    rd = _csv_reader(io.StringIO(text, newline=""), lay.delimiter)
    get = _picker(lay.columns, list(lay.index))
    try:
        yield from _csv_records(rd, lay.columns, get, lay.wanted, chunk.first_line, [0], lay.max_line)
    except csv.Error as e:
        raise ValueError(f"csv: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# JSON Lines


def _json_text(v: Any) -> str | None:
    if v is None or type(v) is str:
        return v
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is int:
        return str(v)
    return orjson.dumps(v).decode()


def _read_jsonl(store: ObjectStore, part: Partition, wanted: tuple[str, ...], required: frozenset[str],
                warns: list[str], max_line: int) -> Iterator[Row]:
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    unseen = set(wanted) - required  # optional keys no object has shown yet (warned about at the end)
    req = [r for r in dict.fromkeys(wanted) if r in required] + sorted(required - set(wanted))
    line = 0
    with _open_lines(store, part, max_line, b"\n", warns) as guard:
        lines = iter(io.BufferedReader(guard, READ_CHUNK))
        try:
            first = next(lines, None)
            if first is not None:
                lines = itertools.chain((first.removeprefix(BOM),), lines)
            for line, raw in enumerate(lines, 1):
                try:
                    obj = loads(raw)
                except decode_error as e:
                    if raw.startswith(_MARKER):
                        yield line, None, _long_line_reason(line, max_line)
                    elif raw.strip() and not raw.endswith(b"\n"):  # the last line, without a line break
                        raise _cut_short(part, _CutShort(line, f"is not complete JSON ({e.msg} at column {e.colno}) "
                                                               "and has no line break")) from None
                    elif raw.strip():
                        yield line, None, (f"not valid JSON ({e.msg} at column {e.colno}); each line must hold one "
                                           "JSON object")
                    continue
                if type(obj) is not dict:
                    yield line, None, f"a JSON {json_type(obj)}, not an object; each line must hold one JSON object"
                    continue
                lacking = [r for r in req if r not in obj]
                if lacking:
                    yield line, None, (f"no {', '.join(map(repr, lacking))} key; the object has "
                                       f"{_show_columns(list(obj), 10)}. Fix the column mapping or the export")
                    continue
                if unseen:
                    unseen.difference_update([k for k in unseen if k in obj])
                values = [_json_text(obj.get(w)) for w in wanted]
                if b"\\u0000" in raw and any(v and "\x00" in v for v in values):
                    yield line, None, "a value contains a NUL character (\\u0000); fix the export"
                    continue
                yield line, values, None
        except _DAMAGED as e:
            raise _io_error(part, line + 1, e) from e
    for w in sorted(unseen, key=wanted.index):
        warns.append(f"{part.key}: no object has the key {w!r}; its value is empty in every row")

"""The bulk path: contacts as gzip CSV files for SendGrid's import (PUT /v3/marketing/contacts/imports).

One file holds up to `per_file` contacts (the engine's choice: limits.IMPORT_FILE_CONTACTS; SendGrid takes up to
1,000,000). Files are written to a temporary folder as contacts stream past (memory stays
flat), and uploaded with a known length: the upload URI SendGrid gives is a presigned URL that wants Content-Length.
The rows are the mapper's own (contacts.ContactMapper.map_line: CSV lines in the order of its import_fields, which
are the destination's mapping then its custom fields, the order of the header and field mappings here); this module
only cuts them into files, compresses them and keeps each file's emails.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import limits
from .contacts import CustomField, csv_line
from .errors import ConfigError


@dataclass
class ImportFile:
    path: str
    size: int
    count: int
    last_index: int  # stream index of the file's last contact: the checkpoint once SendGrid has the file
    field_mappings: list[str | None]
    emails_path: str = ""  # the file's emails, a gzip of lines: recorded as sent once SendGrid has the file

    def discard(self) -> None:
        for path in (self.path, self.emails_path):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


DIR_PREFIX = "sg-import-"
LEVEL = 1  # gzip level of import files: 40% less CPU than level 3 for a file ~14% larger (~0.25 s at 1M)
STALE_AFTER_S = 3_600.0  # a run's folder changes at least every file; an invocation ends within 30 minutes


def _split(chunk: ImportChunk, room: int) -> tuple[ImportChunk, ImportChunk | None]:
    """The chunk's first `room` contacts, and the rest (None when nothing is left)."""
    if len(chunk.emails) <= room:
        return chunk, None
    taken: list[tuple[bytes | memoryview, Sequence[int], int]] = []
    count = 0
    for i, (data, ends, start) in enumerate(chunk.runs):
        if count + len(ends) <= room:
            taken.append((data, ends, start))
            count += len(ends)
            continue
        k = room - count  # the file's last contact is this run's k-th
        if k:
            taken.append((data, ends[:k], start))
        rest = [(data, ends[k:], ends[k - 1] if k else start), *chunk.runs[i + 1 :]]
        return (ImportChunk(chunk.first, chunk.emails[:room], taken),
                ImportChunk(chunk.first + room, chunk.emails[room:], rest))
    raise AssertionError("the runs hold fewer lines than the chunk has emails")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def sweep_stale(parent: str, *, older_than: float = STALE_AFTER_S, now: float | None = None) -> list[str]:
    """Remove import folders a killed process left behind (its finally never ran): those of a process that is gone
    (the folder is named after its pid), and those that have not changed for older_than seconds (a pid taken again
    by a new process). Returns the folders removed."""
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            pid = entry.name[len(DIR_PREFIX):].partition("-")[0]
            try:
                with os.scandir(entry.path) as files:
                    newest = max([entry.stat().st_mtime, *(f.stat().st_mtime for f in files)])
            except OSError:  # another process is removing it
                continue
            if (pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))) or now - newest > older_than:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


class ImportChunk(NamedTuple):
    """Contacts for the import, in stream order: the first one's stream index, their emails, and their CSV lines (CRLF
    included) as runs of lines that follow each other in a mapped chunk, each (the chunk's data, the end offsets of
    the run's lines in it, the offset of its first line): written a run at a time, never a line at a time."""

    first: int
    emails: Sequence[str]
    runs: Sequence[tuple[bytes | memoryview, Sequence[int], int]]


class Importer:
    """Turns mapped contacts into import files with the destination's columns."""

    def __init__(self, mapping: Mapping[str, str], custom: Sequence[CustomField],
                 reserved_fields: Iterable[Mapping[str, Any]], *, per_file: int = limits.MAX_CONTACTS_PER_IMPORT_FILE,
                 tmp_dir: str | None = None) -> None:
        ids = {f["name"]: f["id"] for f in reserved_fields}
        missing = [name for name in mapping if name not in ids]
        if missing:
            raise ConfigError(f"the CSV import cannot map {', '.join(missing)}: SendGrid's field definitions list no "
                              "such reserved field")
        self.headers = [*mapping, *(c.name for c in custom)]  # = ContactMapper(mapping, custom).import_fields
        self.field_mappings: list[str | None] = [ids[name] for name in mapping] + [c.id for c in custom]
        self.per_file = per_file
        self._tmp_parent, self._dir = tmp_dir, ""
        self._open: list[ImportFile] = []

    def files(self, chunks: Iterable[ImportChunk]) -> Iterator[ImportFile]:
        """Consume chunks of contacts and yield finished files, each of at most per_file contacts (a chunk may be
        split between two files)."""
        if not self._dir:
            self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=self._tmp_parent)
            sweep_stale(os.path.dirname(self._dir))
        source = iter(chunks)
        carry: ImportChunk | None = None  # what the previous file had no room for
        header = (csv_line(self.headers) + "\r\n").encode()
        while True:
            fd, path = tempfile.mkstemp(suffix=".csv.gz", dir=self._dir)
            efd, emails_path = tempfile.mkstemp(suffix=".emails.gz", dir=self._dir)
            count, last = 0, -1
            try:
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=LEVEL) as gz, \
                        os.fdopen(efd, "wb") as eraw, gzip.GzipFile(fileobj=eraw, mode="wb", compresslevel=1) as eg:
                    gz.write(header)
                    while count < self.per_file:
                        if carry is None and (carry := next(source, None)) is None:
                            break
                        taken, carry = _split(carry, self.per_file - count)
                        if taken.emails:
                            for data, ends, start in taken.runs:
                                gz.write(data[start : ends[-1]])
                            eg.write(("\n".join(taken.emails) + "\n").encode())
                            count, last = count + len(taken.emails), taken.first + len(taken.emails) - 1
            except BaseException:  # the export failed mid-file (a read error, the deadline): cleanup() cannot see it
                os.unlink(path)
                os.unlink(emails_path)
                raise
            if count == 0:
                os.unlink(path)
                os.unlink(emails_path)
                return
            f = ImportFile(path, os.path.getsize(path), count, last, self.field_mappings, emails_path)
            self._open.append(f)
            yield f

    def cleanup(self) -> None:
        for f in self._open:
            f.discard()
        if self._dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)

"""What a run reports about its rows: rejections (counted by reason, sampled, and every one in a CSV up to a cap),
notes about values left out, and trimmed fields; folded into the run record's counts when the run stops."""

from __future__ import annotations

import csv
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

from .contacts import Note, Reason, Rejected
from .record import RunRecord
from .redaction import redact
from .storage import ObjectStore

SAMPLE = 100  # rejections and notes kept in the record itself; the CSV has the rejections
DUPLICATE_OF_EARLIER = ("duplicate of an earlier row with the same email (a run that reads the export twice, a dry run "
                        "or one with max_profiles, names that row's FILE:LINE)")
MAX_ID_CHARS = 200  # of an id_column value in the rejections CSV
MAX_CSV_ROWS = 100_000  # rows in a run's rejections CSV; the rest are counted (counts.rejections_omitted)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Cells a spreadsheet would run as a formula get a leading apostrophe."""
    return "'" + cell if cell[:1] in _FORMULA else cell


class RowReport:
    """One reading of an export's rows: its rejections (counts by reason, a sample, the CSV spooled to disk, with the
    duplicates that were left out), its notes and its trimmed fields. A run makes a new one for each pass over the
    export. With an id_column, the CSV has its value for each row (to find the profile)."""

    def __init__(self, id_column: str | None = None) -> None:
        self.by_reason: Counter[Reason] = Counter()
        self.sample: list[dict[str, Any]] = []
        self.notes: Counter[str] = Counter()
        self.note_sample: list[dict[str, Any]] = []
        self.trimmed: Counter[str] = Counter()
        self.written = self.omitted = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=4 << 20, mode="w+", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.writer(self._file)
        self._id = id_column is not None
        self._csv.writerow(["file", "line", "reason", *([neutralise(id_column)] if id_column is not None else [])])

    def reject(self, file: str, line: int | None, rejected: Rejected, ident: str | None = None) -> None:
        self.by_reason[rejected.reason] += 1
        text = redact(rejected)
        if len(self.sample) < SAMPLE:
            self.sample.append({"file": file, "line": line, "reason": text})
        self._row(file, line, text, ident)

    def duplicate(self, file: str, line: int, original: str | None, ident: str | None = None) -> None:
        """A row left out because an earlier row has the same email (counts.duplicates); original is that row's
        FILE:LINE when the reading knows it."""
        self._row(file, line, f"duplicate of {original}" if original else DUPLICATE_OF_EARLIER, ident)

    def _row(self, file: str, line: int | None, reason: str, ident: str | None) -> None:
        if self.written >= MAX_CSV_ROWS:
            self.omitted += 1
            return
        self.written += 1
        cells = [neutralise(file), line or "", neutralise(reason)]
        if self._id:
            cells.append(neutralise(redact(ident[:MAX_ID_CHARS])) if ident else "")
        self._csv.writerow(cells)

    def note(self, file: str, line: int | None, note: Note) -> None:
        self.notes.update(note.fields)
        if len(self.note_sample) < SAMPLE:
            self.note_sample.append({"file": file, "line": line, "note": str(note)})

    def csv_chunks(self) -> Iterator[bytes]:
        self._file.seek(0)
        while block := self._file.read(1 << 20):
            yield block.encode("utf-8")

    def close(self) -> None:
        self._file.close()

    def fold_into(self, record: RunRecord) -> None:
        """The record's counts of what this reading found (SendGrid's refusals come from the checkpoint: a resumed
        run does not send those batches again, so they are not refused again)."""
        counts = record.counts
        counts.rejected = Counter({str(r): n for r, n in self.by_reason.items() if r is not Reason.REFUSED_BY_SENDGRID})
        refused = record.checkpoint.refused_by_sendgrid
        if refused:
            counts.rejected[Reason.REFUSED_BY_SENDGRID.value] = refused
        counts.rejections_omitted = self.omitted
        counts.field_notes = Counter(self.notes)
        counts.trimmed = Counter(self.trimmed)
        record.rejections = self.sample
        record.field_notes = self.note_sample


def write_emails_csv(store: ObjectStore, key: str, emails: Iterator[str]) -> int:
    """A one-column CSV (`email`) of a stream of addresses, e.g. who a dry run would remove. Returns the count."""
    count = 0

    def chunks() -> Iterator[bytes]:
        nonlocal count
        yield b"email\n"
        block: list[str] = []
        for email in emails:
            block.append(neutralise(email))
            if len(block) >= 8192:
                count += len(block)
                yield ("\n".join(block) + "\n").encode()
                block = []
        if block:
            count += len(block)
            yield ("\n".join(block) + "\n").encode()

    store.write_stream(key, chunks())
    return count

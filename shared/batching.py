"""Pack encoded contacts into PUT /v3/marketing/contacts bodies within SendGrid's count and byte limits.

A body is ``{"list_ids":[...],"contacts":[c1,c2,...]}`` with no whitespace, so its size is known exactly before it
is built: body_overhead(list_ids) + the contacts' sizes + one comma between each two contacts.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Collection, Iterator, Sequence

import orjson

from . import limits


class ContactBatch:
    """One request's contacts, held compactly: their JSON in one buffer with a comma between two (the body's
    "contacts" array without its brackets), their emails, and where each one lies.

    Packing copies runs of contacts that follow each other in a mapped chunk, commas included, in one slice; so
    positions are kept per run (its first contact's offset in the chunk, the chunk's end offsets of its contacts and
    its first stream index), never per contact. Holding each contact's bytes object instead costs about 4 KB apiece
    (orjson over-allocates every result), which at 30,000 contacts a request and a few requests in flight is hundreds
    of MB."""

    __slots__ = ("_runs", "_starts", "data", "emails")

    def __init__(self) -> None:
        self.data = bytearray()
        self.emails: list[str] = []
        self._starts: list[int] = []  # the batch position of each run's first contact
        self._runs: list[tuple[int, int, Sequence[int], int]] = []  # per run: (its offset in data, its first
        # contact's offset in its chunk, the chunk's end offsets of its contacts, its first contact's stream index)

    def _take(self, chunk: bytes | memoryview, start: int, ends: Sequence[int], emails: Sequence[str],
              first_index: int) -> None:
        """Append the contacts chunk[start:ends[-1]] (a comma between two, as map_rows writes them)."""
        if self.emails:
            self.data += b","
        self._starts.append(len(self.emails))
        self._runs.append((len(self.data), start, ends, first_index))
        self.data += chunk[start : ends[-1]]
        self.emails += emails

    def __len__(self) -> int:
        return len(self.emails)

    @property
    def indexes(self) -> list[int]:
        """The stream index of each contact."""
        return [first + k for (_, _, ends, first) in self._runs for k in range(len(ends))]

    @property
    def last_index(self) -> int:
        _, _, ends, first = self._runs[-1]
        return first + len(ends) - 1

    def body(self, list_ids: Sequence[str]) -> bytes:
        """The exact request body (see upsert_body)."""
        return b"".join((b'{"list_ids":', _list_ids_json(list_ids), _CONTACTS_KEY, self.data, b"]}"))

    def contact(self, position: int) -> bytes:
        r = bisect.bisect_right(self._starts, position) - 1
        offset, start, ends, _ = self._runs[r]
        k = position - self._starts[r]
        begin = ends[k - 1] + 1 if k else start
        return bytes(self.data[offset + begin - start : offset + ends[k] - start])

    def without(self, positions: Collection[int]) -> ContactBatch:
        """The same batch less the contacts at these positions (SendGrid refused their addresses)."""
        kept = ContactBatch()
        indexes = self.indexes
        for pos in range(len(self)):
            if pos not in positions:
                encoded = self.contact(pos)
                kept._take(encoded, 0, [len(encoded)], [self.emails[pos]], indexes[pos])
        return kept


class Packer:
    """Packs encoded contacts, chunk by chunk, in order, into ContactBatches of at most max_count contacts whose body
    is at most max_bytes; it runs once per chunk of an export, and its work per contact is copying bytes: a run of
    kept contacts that follow each other in the chunk is measured by its end offsets (bisect) and copied as one slice.

    Greedy: each batch takes contacts while they fit, which gives the fewest batches any in-order split can give, and
    the batches do not depend on how the contacts are cut into chunks. A contact too big for a request on its own
    makes add raise ValueError (the batches earlier adds returned stand). For contacts made by contacts.ContactMapper
    this cannot happen: its length limits keep one contact under about 3.2 MB even with 500 custom Text fields of
    escaped characters, well below REQUEST_BYTES_TARGET.
    """

    def __init__(self, overhead: int, *, max_count: int = limits.MAX_CONTACTS_PER_REQUEST,
                 max_bytes: int = limits.REQUEST_BYTES_TARGET) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, not {max_count}")
        self.overhead, self.max_count, self.max_bytes = overhead, max_count, max_bytes
        self._batch, self._used = ContactBatch(), overhead

    def add(self, data: bytes, ends: Sequence[int], emails: Sequence[str], positions: Sequence[int],
            first_index: int) -> list[ContactBatch]:
        """Take the contacts at positions (ascending; contact k is data[ends[k-1]+1:ends[k]], a comma between two,
        as pipeline.map_rows writes JSON), numbered from first_index on in the stream; return the batches this
        filled."""
        full: list[ContactBatch] = []
        index = first_index
        if scattered(positions):  # the chosen contacts are gathered first and packed as one run
            data, ends, emails = _gathered(data, ends, emails, positions)
            positions = range(len(ends))
        view = memoryview(data)
        for start, stop in runs(positions):
            index = self._run(view, ends, emails, start, stop, index, full)
        return full

    def _run(self, data: memoryview, ends: Sequence[int], emails: Sequence[str], pos: int, stop: int, index: int,
             full: list[ContactBatch]) -> int:
        """Pack the contacts pos..stop-1 of a chunk; returns the stream index after them."""
        batch, used = self._batch, self._used
        while pos < stop:
            start = ends[pos - 1] + 1 if pos else 0
            count = len(batch)
            room = self.max_bytes - used - (1 if count else 0)  # the comma before them, when they follow others
            fit = bisect.bisect_right(ends, start + room, pos, min(stop, pos + self.max_count - count))
            if fit == pos:  # the next contact does not fit
                if not count:
                    self._batch, self._used = batch, used
                    raise ValueError(f"contact #{index} is {ends[pos] - start} bytes: with the body's {self.overhead}"
                                     f" bytes of overhead it can never fit in a request of at most {self.max_bytes} "
                                     "bytes")
                full.append(batch)
                batch, used = ContactBatch(), self.overhead
                continue
            batch._take(data, start, ends[pos:fit], emails[pos:fit], index)
            used += ends[fit - 1] - start + (1 if count else 0)
            index += fit - pos
            pos = fit
        self._batch, self._used = batch, used
        return index

    def flush(self) -> ContactBatch | None:
        """The batch being filled, if it holds anything; packing starts a new one."""
        batch = self._batch
        if not len(batch):
            return None
        self._batch, self._used = ContactBatch(), self.overhead
        return batch


def runs(positions: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive numbers in ascending distinct positions, as (first, stop): [0, 1, 2, 5, 6] gives (0, 3)
    and (5, 7). A chunk's kept contacts are one run or a few (de-duplication drops ~1%): the rest being one run is
    checked first, and a run's end is found by galloping then bisecting, never by a step per position."""
    n, i = len(positions), 0
    while i < n:
        a = positions[i]
        d = a - i  # positions[k] - k never decreases; the run is where it stays d
        if positions[n - 1] - (n - 1) == d:  # the rest is one run: the common case
            j = n
        else:
            lo, step = i, 1  # positions[lo] - lo == d
            while (hi := i + step) < n and positions[hi] - hi == d:
                lo, step = hi, step * 2
            j = bisect.bisect_right(range(n), d, lo + 1, min(hi, n), key=lambda k: positions[k] - k)
        yield a, a + j - i
        i = j


def scattered(positions: Sequence[int]) -> bool:
    """Whether more than 1/16 of the span of ascending positions is left out (a sparse choice, e.g. only the contacts
    that changed): then runs are short (~4 us each to copy), and copying the contacts one by one (~0.3 us each) into
    one run costs less."""
    return bool(positions) and len(positions) * 16 < (positions[-1] - positions[0] + 1) * 15


def _gathered(data: bytes, ends: Sequence[int], emails: Sequence[str],
              positions: Sequence[int]) -> tuple[bytes, list[int], list[str]]:
    """The contacts at positions as a chunk of their own (data with a comma between two, end offsets, emails)."""
    parts = [data[ends[k - 1] + 1 if k else 0 : ends[k]] for k in positions]
    gathered_ends = list(map(operator.add, itertools.accumulate(map(len, parts)), range(len(parts))))
    return b",".join(parts), gathered_ends, [emails[k] for k in positions]


_CONTACTS_KEY = b',"contacts":['


def _list_ids_json(list_ids: Sequence[str]) -> bytes:
    return orjson.dumps(list(list_ids))


def body_overhead(list_ids: Sequence[str]) -> int:
    """Bytes of the body with zero contacts."""
    return len(b'{"list_ids":') + len(_list_ids_json(list_ids)) + len(_CONTACTS_KEY) + len(b"]}")


def body_size(overhead: int, sizes: Sequence[int]) -> int:
    """Bytes of the body holding contacts of these sizes: the overhead, the contacts and the commas between them."""
    return overhead + sum(sizes) + max(len(sizes) - 1, 0)


def upsert_body(list_ids: Sequence[str], contacts: Sequence[bytes]) -> bytes:
    """The exact request body; its length is body_size(body_overhead(list_ids), [len(c) for c in contacts])."""
    return b"".join((b'{"list_ids":', _list_ids_json(list_ids), _CONTACTS_KEY, b",".join(contacts), b"]}"))


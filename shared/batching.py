"""Pack encoded contacts into PUT /v3/marketing/contacts bodies within SendGrid's count and byte limits.

A body is ``{"list_ids":[...],"contacts":[c1,c2,...]}`` with no whitespace, so its size is known exactly before it
is built: body_overhead(list_ids) + the contacts' sizes + one comma between each two contacts.
"""

from __future__ import annotations

from array import array
from collections.abc import Collection, Iterable, Sequence

import orjson

from . import limits


class ContactBatch:
    """One request's contacts, held compactly: their JSON joined in one buffer, their emails and stream indexes.

    Holding each contact's bytes object instead costs about 4 KB apiece (orjson over-allocates every result), which
    at 30,000 contacts a request and a few requests in flight is hundreds of MB."""

    __slots__ = ("data", "emails", "ends", "indexes")

    def __init__(self) -> None:
        self.data = bytearray()
        self.ends = array("Q")
        self.emails: list[str] = []
        self.indexes = array("Q")

    def append(self, item: tuple[int, str, bytes]) -> None:
        index, email, encoded = item
        if self.ends:
            self.data += b","
        self.data += encoded
        self.ends.append(len(self.data))
        self.emails.append(email)
        self.indexes.append(index)

    def __len__(self) -> int:
        return len(self.emails)

    @property
    def last_index(self) -> int:
        return self.indexes[-1]

    def body(self, list_ids: Sequence[str]) -> bytes:
        """The exact request body (see upsert_body)."""
        return b"".join((b'{"list_ids":', _list_ids_json(list_ids), _CONTACTS_KEY, self.data, b"]}"))

    def contact(self, position: int) -> bytes:
        start = self.ends[position - 1] + 1 if position else 0
        return bytes(self.data[start : self.ends[position]])

    def without(self, positions: Collection[int]) -> ContactBatch:
        """The same batch less the contacts at these positions (SendGrid refused their addresses)."""
        kept = ContactBatch()
        for pos in range(len(self)):
            if pos not in positions:
                kept.append((self.indexes[pos], self.emails[pos], self.contact(pos)))
        return kept


class Packer:
    """Packs encoded contacts, chunk by chunk, in order, into ContactBatches of at most max_count contacts whose body
    is at most max_bytes; one tight loop, as it runs once per contact of an export.

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

    def add(self, data: bytes, ends: Sequence[int], emails: Sequence[str], positions: Iterable[int],
            first_index: int) -> list[ContactBatch]:
        """Take the contacts at positions (contact k is data[ends[k-1]:ends[k]]), numbered from first_index on in
        the stream; return the batches this filled."""
        full: list[ContactBatch] = []
        max_count, max_bytes, overhead = self.max_count, self.max_bytes, self.overhead
        batch, used = self._batch, self._used
        buf, bends, bemails, bindexes = batch.data, batch.ends, batch.emails, batch.indexes
        count = len(bemails)
        view = memoryview(data)
        index = first_index
        for pos in positions:
            start = ends[pos - 1] if pos else 0
            n = ends[pos] - start
            if count and (count >= max_count or used + 1 + n > max_bytes):
                full.append(batch)
                batch, used, count = ContactBatch(), overhead, 0
                buf, bends, bemails, bindexes = batch.data, batch.ends, batch.emails, batch.indexes
            if count:
                buf += b","
                used += 1 + n
            elif overhead + n > max_bytes:
                raise ValueError(f"contact #{index} is {n} bytes: with the body's {overhead} bytes of overhead it can"
                                 f" never fit in a request of at most {max_bytes} bytes")
            else:
                used += n
            buf += view[start : start + n]
            bends.append(len(buf))
            bemails.append(emails[pos])
            bindexes.append(index)
            index += 1
            count += 1
        self._batch, self._used = batch, used
        return full

    def flush(self) -> ContactBatch | None:
        """The batch being filled, if it holds anything; packing starts a new one."""
        batch = self._batch
        if not len(batch):
            return None
        self._batch, self._used = ContactBatch(), self.overhead
        return batch


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


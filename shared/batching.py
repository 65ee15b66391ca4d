"""Pack encoded contacts into PUT /v3/marketing/contacts bodies within SendGrid's count and byte limits.

A body is ``{"list_ids":[...],"contacts":[c1,c2,...]}`` with no whitespace, so its size is known exactly before it
is built: body_overhead(list_ids) + the contacts' sizes + one comma between each two contacts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import orjson

from . import limits

T = TypeVar("T")

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


def pack(items: Iterable[T], size: Callable[[T], int], *, overhead: int,
         max_count: int = limits.MAX_CONTACTS_PER_REQUEST,
         max_bytes: int = limits.REQUEST_BYTES_TARGET) -> Iterator[list[T]]:
    """Split items, in order, into batches of at most max_count items whose body is at most max_bytes.

    Greedy: each batch takes items while they fit, which gives the fewest batches any in-order split can give.
    An item too big for a request on its own raises ValueError. For contacts made by contacts.ContactMapper this
    cannot happen: its length limits keep one contact under about 3.2 MB even with 500 custom Text fields of
    escaped characters, well below REQUEST_BYTES_TARGET.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, not {max_count}")
    batch: list[T] = []
    used = overhead  # body bytes of the current batch (commas included)
    for position, item in enumerate(items):
        n = size(item)
        if batch and (len(batch) >= max_count or used + 1 + n > max_bytes):
            yield batch
            batch, used = [], overhead
        if not batch:
            if overhead + n > max_bytes:
                raise ValueError(f"item #{position} is {n} bytes: with the body's {overhead} bytes of overhead it can"
                                 f" never fit in a request of at most {max_bytes} bytes")
            used += n
        else:
            used += 1 + n
        batch.append(item)
    if batch:
        yield batch

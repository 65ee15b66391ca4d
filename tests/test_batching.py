"""Packing encoded contacts into PUT /v3/marketing/contacts bodies: exact sizes, limits, fewest requests."""

from __future__ import annotations

import itertools
import random

import orjson
import pytest

from shared import limits
from shared.batching import ContactBatch, body_overhead, body_size, pack, upsert_body
from shared.contacts import CUSTOM_TEXT_MAX_LENGTH, ContactMapper, CustomField, encode

LIST_IDS = ["0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"]


def blob(n: int) -> bytes:
    """A valid JSON object of exactly n bytes."""
    assert n >= 8
    return b'{"e":"' + b"a" * (n - 8) + b'"}'


def check_batches(items: list[bytes], batches: list[list[bytes]], *, max_count: int, max_bytes: int) -> None:
    """Every invariant pack() promises, checked against real bodies."""
    assert [x for b in batches for x in b] == items  # all items, in order, once
    overhead = body_overhead(LIST_IDS)
    for i, batch in enumerate(batches):
        assert 1 <= len(batch) <= max_count
        body = upsert_body(LIST_IDS, batch)
        assert len(body) == body_size(overhead, [len(c) for c in batch]) <= max_bytes
        if i + 1 < len(batches):  # greedy: the next item did not fit
            nxt = batches[i + 1][0]
            assert len(batch) == max_count or len(upsert_body(LIST_IDS, [*batch, nxt])) > max_bytes


def fewest_batches(sizes: list[int], overhead: int, max_count: int, max_bytes: int) -> int:
    """Reference: the fewest in-order batches, by dynamic programming."""
    best = [0] + [10**9] * len(sizes)
    for end in range(1, len(sizes) + 1):
        for start in range(end - 1, -1, -1):
            chunk = sizes[start:end]
            if len(chunk) > max_count or body_size(overhead, chunk) > max_bytes:
                break
            best[end] = min(best[end], best[start] + 1)
    return best[-1]


# --- bodies -------------------------------------------------------------------------------------------------------


def test_upsert_body_is_exact_compact_json() -> None:
    contacts = [encode({"email": "a@example.com"}), encode({"email": "b@example.com", "first_name": "Zoë"})]
    body = upsert_body(["l1", "l2"], contacts)
    assert body == ('{"list_ids":["l1","l2"],"contacts":[{"email":"a@example.com"},'
                    '{"email":"b@example.com","first_name":"Zoë"}]}').encode()
    assert orjson.loads(body) == {"list_ids": ["l1", "l2"], "contacts": [orjson.loads(c) for c in contacts]}


def test_overhead_is_the_empty_body() -> None:
    for ids in ([], LIST_IDS, ["a", "b", "c"], ("tuple-id",)):
        assert body_overhead(ids) == len(upsert_body(ids, [])) == len(b'{"list_ids":' + orjson.dumps(list(ids))
                                                                         + b',"contacts":[]}')
    assert upsert_body(LIST_IDS, []) == b'{"list_ids":["0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"],"contacts":[]}'


def test_body_size_counts_commas() -> None:
    assert body_size(10, []) == 10
    assert body_size(10, [5]) == 15
    assert body_size(10, [5, 6, 7]) == 10 + 18 + 2


# --- packing: edge cases ------------------------------------------------------------------------------------------


def test_nothing_in_nothing_out() -> None:
    assert list(pack([], len, overhead=body_overhead(LIST_IDS))) == []


def test_exact_fit_then_one_byte_over() -> None:
    overhead = body_overhead(LIST_IDS)
    max_bytes = 10_000
    sizes = [1_000, 2_000, 3_000]
    last = max_bytes - overhead - sum(sizes) - len(sizes)  # a fourth item that fills the body to the byte
    items = [blob(s) for s in [*sizes, last]]
    batches = list(pack(items, len, overhead=overhead, max_bytes=max_bytes))
    assert len(batches) == 1
    assert len(upsert_body(LIST_IDS, batches[0])) == max_bytes
    items[-1] = blob(last + 1)
    batches = list(pack(items, len, overhead=overhead, max_bytes=max_bytes))
    assert [len(b) for b in batches] == [3, 1]
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=max_bytes)


def test_single_item_exactly_filling_a_request() -> None:
    overhead = body_overhead(LIST_IDS)
    item = blob(limits.REQUEST_BYTES_TARGET - overhead)
    [batch] = list(pack([item], len, overhead=overhead))
    assert len(upsert_body(LIST_IDS, batch)) == limits.REQUEST_BYTES_TARGET


def test_item_that_can_never_fit_raises_after_earlier_batches() -> None:
    overhead = body_overhead(LIST_IDS)
    items = [blob(100), blob(100), blob(1_000 - overhead + 1)]
    gen = pack(items, len, overhead=overhead, max_bytes=1_000)
    assert next(gen) == items[:2]
    with pytest.raises(ValueError, match=r"item #2 is \d+ bytes.*never fit"):
        next(gen)


def test_invalid_max_count() -> None:
    with pytest.raises(ValueError, match="max_count"):
        list(pack([b"{}"], len, overhead=10, max_count=0))


def test_thirty_thousand_tiny_items_make_one_request() -> None:
    items = [encode({"email": f"u{i}@ex.co"}) for i in range(limits.MAX_CONTACTS_PER_REQUEST)]
    batches = list(pack(items, len, overhead=body_overhead(LIST_IDS)))
    assert len(batches) == 1 and len(batches[0]) == 30_000
    batches = list(pack([*items, b'{"email":"last@ex.co"}'], len, overhead=body_overhead(LIST_IDS)))
    assert [len(b) for b in batches] == [30_000, 1]
    check_batches([*items, b'{"email":"last@ex.co"}'], batches, max_count=30_000,
                  max_bytes=limits.REQUEST_BYTES_TARGET)


def test_big_items_split_by_bytes_under_the_real_limit() -> None:
    items = [blob(150_000 + 7 * i) for i in range(90)]  # ~13.7 MB in total
    batches = list(pack(items, len, overhead=body_overhead(LIST_IDS)))
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=limits.REQUEST_BYTES_TARGET)
    assert len(batches) == 3
    for batch in batches:
        assert len(upsert_body(LIST_IDS, batch)) <= limits.REQUEST_BYTES_TARGET < limits.MAX_REQUEST_BYTES


def test_pack_is_lazy_and_keeps_arbitrary_items() -> None:
    """Items can be any value with a size function; an endless stream yields batches as they fill."""
    stream = ((i, blob(50)) for i in itertools.count())
    batches = pack(stream, lambda item: len(item[1]), overhead=100, max_count=4, max_bytes=10_000)
    first, second = next(batches), next(batches)
    assert [i for i, _ in first] == [0, 1, 2, 3] and [i for i, _ in second] == [4, 5, 6, 7]


# --- packing: randomised ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_sizes_fit_exactly_and_are_fewest(seed: int) -> None:
    rng = random.Random(seed)
    max_bytes = rng.choice([200, 1_000, 5_000])
    max_count = rng.choice([1, 2, 3, 7, 1_000])
    overhead = body_overhead(LIST_IDS)
    room = max_bytes - overhead
    sizes = [rng.randint(8, min(room, rng.choice([20, 100, room]))) for _ in range(rng.randint(0, 150))]
    items = [blob(s) for s in sizes]
    batches = list(pack(items, len, overhead=overhead, max_count=max_count, max_bytes=max_bytes))
    check_batches(items, batches, max_count=max_count, max_bytes=max_bytes)
    assert len(batches) == fewest_batches(sizes, overhead, max_count, max_bytes)


@pytest.mark.parametrize("seed", range(3))
def test_random_real_contacts_under_real_limits(seed: int) -> None:
    rng = random.Random(seed)
    mapper = ContactMapper({"email": "E", "first_name": "F", "city": "C"},
                           [CustomField("notes", "e1_T", "Text", "N")])
    items = []
    for i in range(3_000):
        notes = "".join(rng.choices("aé\"\\\n東🎉", k=rng.randint(0, 3_000)))
        result = mapper.map([f"user{i}@example.com", "Zoë", "Köln", notes])
        assert not isinstance(result, str)
        items.append(encode(result[1]))
    batches = list(pack(items, len, overhead=body_overhead(LIST_IDS)))
    assert len(batches) >= 2  # several MB of contacts: the byte limit, not the count, splits them
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=limits.REQUEST_BYTES_TARGET)
    for batch in batches:
        assert orjson.loads(upsert_body(LIST_IDS, batch))["contacts"][0]["email"].startswith("user")


def test_largest_possible_mapped_contact_fits_one_request() -> None:
    """The mapper's limits make pack()'s ValueError impossible: 500 custom Text fields of the worst characters."""
    custom = [CustomField(f"f{i}", f"e{i}_T", "Text", f"C{i}") for i in range(limits.MAX_CUSTOM_FIELDS)]
    mapping = {f: f.upper() for f in limits.WRITABLE_RESERVED_FIELDS}
    mapper = ContactMapper(mapping, custom)
    worst = "\x01" * (CUSTOM_TEXT_MAX_LENGTH * 2)  # control characters encode as 6 bytes each
    values = {c: worst for c in mapper.columns}
    values["EMAIL"] = "a@example.com"
    values["ALTERNATE_EMAILS"] = ",".join(f"{'b' * 63}{i}@{'c' * 63}.{'d' * 63}.{'e' * 50}.com" for i in range(9))
    result = mapper.map([values[c] for c in mapper.columns])
    assert not isinstance(result, str)
    assert len(result[1]["alternate_emails"]) == limits.MAX_ALTERNATE_EMAILS
    size = len(encode(result[1]))
    assert 3_000_000 < size < 3_200_000
    assert size + body_overhead(LIST_IDS) < limits.REQUEST_BYTES_TARGET


def test_contact_batch_builds_the_same_body_and_drops_refused_contacts() -> None:
    rng = random.Random(3)
    items = [(i, f"u{i}@x.com", orjson.dumps({"email": f"u{i}@x.com", "first_name": "n" * rng.randint(0, 40)}))
             for i in range(5000)]
    overhead = body_overhead(["l1"])
    batches = list(pack(items, lambda t: len(t[2]), overhead=overhead, max_bytes=60_000, collect=ContactBatch))
    assert [list(b.indexes) for b in batches] == [[t[0] for t in g] for g in
                                                   pack(items, lambda t: len(t[2]), overhead=overhead,
                                                        max_bytes=60_000)]
    for batch in batches:
        group = [items[i] for i in batch.indexes]
        assert batch.body(["l1"]) == upsert_body(["l1"], [t[2] for t in group])
        assert len(batch.body(["l1"])) <= 60_000 and batch.emails == [t[1] for t in group]
    first = batches[0]
    kept = first.without({0, 3})
    assert kept.emails == [e for p, e in enumerate(first.emails) if p not in (0, 3)]
    assert orjson.loads(kept.body(["l1"]))["contacts"] == [
        orjson.loads(items[i][2]) for p, i in enumerate(first.indexes) if p not in (0, 3)]
    assert kept.last_index == first.last_index

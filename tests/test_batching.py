"""Packing encoded contacts into PUT /v3/marketing/contacts bodies: exact sizes, limits, fewest requests."""

from __future__ import annotations

import itertools
import random

import orjson
import pytest

from shared import limits
from shared.batching import ContactBatch, Packer, body_overhead, body_size, runs, upsert_body
from shared.contacts import CUSTOM_TEXT_MAX_LENGTH, ContactMapper, CustomField, encode

LIST_IDS = ["0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"]


def blob(n: int) -> bytes:
    """A valid JSON object of exactly n bytes."""
    assert n >= 8
    return b'{"e":"' + b"a" * (n - 8) + b'"}'


def email(i: int) -> str:
    return f"u{i}@example.com"


def joined(items: list[bytes]) -> tuple[bytes, list[int]]:
    """A chunk's data and end offsets as pipeline.map_rows lays JSON out: a comma between two contacts."""
    return b",".join(items), [end - 1 for end in itertools.accumulate(len(x) + 1 for x in items)]


def pack_all(items: list[bytes], overhead: int | None = None, *, rng: random.Random | None = None,
             **limits_: int) -> list[ContactBatch]:
    """Items through a Packer as the engine feeds it (each chunk's data, ends and emails, then flush), in one add, or
    with rng in chunks of random sizes (empty ones included); contact i has email(i)."""
    packer = Packer(body_overhead(LIST_IDS) if overhead is None else overhead, **limits_)
    cuts = [0]
    while cuts[-1] < len(items):
        cuts.append(len(items) if rng is None else min(len(items), cuts[-1] + rng.randint(0, 40)))
    batches: list[ContactBatch] = []
    for start, stop in itertools.pairwise(cuts):
        chunk = items[start:stop]
        batches += packer.add(*joined(chunk), [email(i) for i in range(start, stop)], range(len(chunk)), start)
    last = packer.flush()
    assert packer.flush() is None  # flush empties the packer
    return batches if last is None else [*batches, last]


def contents(batch: ContactBatch) -> list[bytes]:
    return [batch.contact(p) for p in range(len(batch))]


def check_batches(items: list[bytes], batches: list[ContactBatch], *, max_count: int, max_bytes: int) -> None:
    """Every invariant the packer promises, checked against real bodies."""
    assert [x for b in batches for x in contents(b)] == items  # all items, in order, once
    assert [i for b in batches for i in b.indexes] == list(range(len(items)))
    assert [e for b in batches for e in b.emails] == [email(i) for i in range(len(items))]
    overhead = body_overhead(LIST_IDS)
    for i, batch in enumerate(batches):
        group = contents(batch)
        assert 1 <= len(batch) <= max_count
        body = batch.body(LIST_IDS)
        assert body == upsert_body(LIST_IDS, group)
        assert orjson.loads(body) == {"list_ids": LIST_IDS, "contacts": [orjson.loads(c) for c in group]}
        assert len(body) == body_size(overhead, [len(c) for c in group]) <= max_bytes
        assert batch.last_index == batch.indexes[-1]
        if i + 1 < len(batches):  # greedy: the next item did not fit
            nxt = batches[i + 1].contact(0)
            assert len(batch) == max_count or len(upsert_body(LIST_IDS, [*group, nxt])) > max_bytes


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
    packer = Packer(body_overhead(LIST_IDS))
    assert packer.add(b"", [], [], [], 0) == []
    assert packer.flush() is None
    assert pack_all([]) == []


def test_exact_fit_then_one_byte_over() -> None:
    overhead = body_overhead(LIST_IDS)
    max_bytes = 10_000
    sizes = [1_000, 2_000, 3_000]
    last = max_bytes - overhead - sum(sizes) - len(sizes)  # a fourth item that fills the body to the byte
    items = [blob(s) for s in [*sizes, last]]
    batches = pack_all(items, max_bytes=max_bytes)
    assert len(batches) == 1
    assert len(batches[0].body(LIST_IDS)) == max_bytes
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=max_bytes)
    items[-1] = blob(last + 1)
    batches = pack_all(items, max_bytes=max_bytes)
    assert [len(b) for b in batches] == [3, 1]
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=max_bytes)


def test_single_item_exactly_filling_a_request() -> None:
    item = blob(limits.REQUEST_BYTES_TARGET - body_overhead(LIST_IDS))
    [batch] = pack_all([item])
    assert len(batch.body(LIST_IDS)) == limits.REQUEST_BYTES_TARGET
    check_batches([item], [batch], max_count=1, max_bytes=limits.REQUEST_BYTES_TARGET)


def test_item_that_can_never_fit_raises_after_earlier_batches() -> None:
    overhead = body_overhead(LIST_IDS)
    items = [blob(100), blob(100), blob(100), blob(1_000 - overhead + 1)]
    packer = Packer(overhead, max_count=2, max_bytes=1_000)
    [first] = packer.add(*joined(items[:3]), [email(i) for i in range(3)], range(3), 0)
    assert contents(first) == items[:2] and list(first.indexes) == [0, 1]
    with pytest.raises(ValueError, match=rf"contact #3 is {len(items[3])} bytes.*never fit.* at most 1000 bytes"):
        packer.add(items[3], [len(items[3])], [email(3)], [0], 3)
    # one byte less fits on its own
    batches = pack_all([*items[:3], blob(1_000 - overhead)], max_count=2, max_bytes=1_000)
    assert [len(b) for b in batches] == [2, 1, 1] and len(batches[-1].body(LIST_IDS)) == 1_000


def test_invalid_max_count() -> None:
    with pytest.raises(ValueError, match="max_count"):
        Packer(10, max_count=0)


def test_thirty_thousand_tiny_items_make_one_request() -> None:
    items = [encode({"email": f"u{i}@ex.co"}) for i in range(limits.MAX_CONTACTS_PER_REQUEST)]
    batches = pack_all(items)
    assert len(batches) == 1 and len(batches[0]) == 30_000
    check_batches(items, batches, max_count=30_000, max_bytes=limits.REQUEST_BYTES_TARGET)
    items.append(b'{"email":"last@ex.co"}')
    batches = pack_all(items, rng=random.Random(1))
    assert [len(b) for b in batches] == [30_000, 1]
    check_batches(items, batches, max_count=30_000, max_bytes=limits.REQUEST_BYTES_TARGET)


def test_big_items_split_by_bytes_under_the_real_limit() -> None:
    items = [blob(150_000 + 7 * i) for i in range(90)]  # ~13.7 MB in total
    batches = pack_all(items, rng=random.Random(2))
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=limits.REQUEST_BYTES_TARGET)
    assert len(batches) == 3
    for batch in batches:
        assert len(batch.body(LIST_IDS)) <= limits.REQUEST_BYTES_TARGET < limits.MAX_REQUEST_BYTES


def test_batches_come_out_as_they_fill() -> None:
    """A full batch is returned by the add that brings the contact it cannot take; flush hands over the rest and
    packing goes on in a new batch."""
    overhead = body_overhead(LIST_IDS)
    packer = Packer(overhead, max_count=4, max_bytes=10_000)
    item = blob(50)
    returned = [packer.add(item, [50], [email(i)], [0], i) for i in range(9)]
    assert [[list(b.indexes) for b in r] for r in returned] == [[]] * 4 + [[[0, 1, 2, 3]]] + [[]] * 3 + [[[4, 5, 6, 7]]]
    rest = packer.flush()
    assert rest is not None and list(rest.indexes) == [8] and rest.emails == [email(8)]
    assert packer.flush() is None
    assert packer.add(*joined([item] * 3), ["a@x.co", "b@x.co", "c@x.co"], [0, 2], 9) == []
    again = packer.flush()
    assert again is not None and list(again.indexes) == [9, 10] and again.emails == ["a@x.co", "c@x.co"]
    half = (10_000 - overhead - 1) // 2  # after a flush a batch has the whole request again: these two fill it
    exact = [blob(half), blob(10_000 - overhead - 1 - half)]
    assert packer.add(*joined(exact), ["d@x.co", "e@x.co"], [0, 1], 11) == []
    full = packer.flush()
    assert full is not None and contents(full) == exact and len(full.body(LIST_IDS)) == 10_000


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
    batches = pack_all(items, rng=rng if seed % 2 else None, max_count=max_count, max_bytes=max_bytes)
    check_batches(items, batches, max_count=max_count, max_bytes=max_bytes)
    assert len(batches) == fewest_batches(sizes, overhead, max_count, max_bytes)


def batch_view(batches: list[ContactBatch]) -> list[tuple[bytes, list[str], list[int]]]:
    return [(b.body(LIST_IDS), b.emails, list(b.indexes)) for b in batches]


@pytest.mark.parametrize("share", [0.7, 0.98])
@pytest.mark.parametrize("seed", range(12))
def test_chunking_and_skipped_positions_do_not_change_the_batches(seed: int, share: float) -> None:
    """The engine feeds each mapped chunk's kept positions (de-duplication skips some: few, packed in runs, or many,
    gathered first), numbered on from the previous chunk's: the batches are those of the kept contacts in one add."""
    rng = random.Random(100 + seed)
    max_bytes = rng.choice([300, 2_000, 20_000])
    max_count = rng.choice([1, 3, 10, 30_000])
    room = max_bytes - body_overhead(LIST_IDS)
    items = [blob(rng.randint(8, min(room, 200))) for _ in range(rng.randint(1, 600))]
    kept = [i for i in range(len(items)) if rng.random() < share]
    kept_items = [items[i] for i in kept]
    expected = pack_all(kept_items, max_count=max_count, max_bytes=max_bytes)
    check_batches(kept_items, expected, max_count=max_count, max_bytes=max_bytes)
    assert batch_view(pack_all(kept_items, rng=rng, max_count=max_count, max_bytes=max_bytes)) == batch_view(expected)

    def skipping(cuts: list[int]) -> list[ContactBatch]:
        packer = Packer(body_overhead(LIST_IDS), max_count=max_count, max_bytes=max_bytes)
        out: list[ContactBatch] = []
        index = 0
        for start, stop in itertools.pairwise(cuts):
            chunk = items[start:stop]
            keep = [i - start for i in kept if start <= i < stop]
            emails = [email(kept.index(start + p)) if start + p in kept else "dup@x.co" for p in range(len(chunk))]
            out += packer.add(*joined(chunk), emails, keep, index)
            index += len(keep)
        last = packer.flush()
        return out if last is None else [*out, last]

    cuts = sorted({0, len(items), *rng.sample(range(len(items) + 1), min(len(items), rng.randint(0, 50)))})
    assert batch_view(skipping([0, len(items)])) == batch_view(expected)
    assert batch_view(skipping(cuts)) == batch_view(expected)
    assert batch_view(skipping(list(range(len(items) + 1)))) == batch_view(expected)


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
    batches = pack_all(items, rng=rng)
    assert len(batches) >= 2  # several MB of contacts: the byte limit, not the count, splits them
    check_batches(items, batches, max_count=limits.MAX_CONTACTS_PER_REQUEST, max_bytes=limits.REQUEST_BYTES_TARGET)
    for batch in batches:
        assert orjson.loads(batch.body(LIST_IDS))["contacts"][0]["email"].startswith("user")


def test_largest_possible_mapped_contact_fits_one_request() -> None:
    """The mapper's limits make Packer's ValueError impossible: 500 custom Text fields of the worst characters."""
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
    contact = encode(result[1])
    assert 3_000_000 < len(contact) < 3_200_000
    assert len(contact) + body_overhead(LIST_IDS) < limits.REQUEST_BYTES_TARGET
    [batch] = pack_all([contact])
    assert batch.body(LIST_IDS) == upsert_body(LIST_IDS, [contact])


def test_contact_batch_builds_the_same_body_and_drops_refused_contacts() -> None:
    rng = random.Random(3)
    items = [orjson.dumps({"email": email(i), "first_name": "n" * rng.randint(0, 40)}) for i in range(5000)]
    batches = pack_all(items, body_overhead(["l1"]), rng=rng, max_bytes=60_000)
    assert len(batches) > 3
    for batch in batches:
        group = [items[i] for i in batch.indexes]
        assert batch.body(["l1"]) == upsert_body(["l1"], group)
        assert len(batch.body(["l1"])) <= 60_000 and batch.emails == [email(i) for i in batch.indexes]
    first = batches[0]
    kept = first.without({0, 3})
    assert kept.emails == [e for p, e in enumerate(first.emails) if p not in (0, 3)]
    assert list(kept.indexes) == [i for p, i in enumerate(first.indexes) if p not in (0, 3)]
    assert orjson.loads(kept.body(["l1"]))["contacts"] == [
        orjson.loads(items[i]) for p, i in enumerate(first.indexes) if p not in (0, 3)]
    assert kept.last_index == first.last_index
    assert first.without(set()).body(["l1"]) == first.body(["l1"])


@pytest.mark.parametrize("seed", range(20))
def test_runs_are_the_stretches_of_consecutive_positions(seed: int) -> None:
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(300), rng.randint(0, 300)))
    expected: list[tuple[int, int]] = []
    for p in positions:
        if expected and expected[-1][1] == p:
            expected[-1] = (expected[-1][0], p + 1)
        else:
            expected.append((p, p + 1))
    assert list(runs(positions)) == expected
    assert list(runs([0, 1, 2, 5, 6])) == [(0, 3), (5, 7)] and list(runs([])) == []

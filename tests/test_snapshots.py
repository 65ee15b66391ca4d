"""Snapshots and sorted streams: the sorter against sorted(set()), bounded memory, diffs against set arithmetic,
snapshot round trips on a real folder (and on Azurite), erasure rewrites."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.errors import StateError
from shared.snapshots import (
    EmailSorter,
    count_sorted,
    delete_snapshot,
    diff_sorted,
    filter_out,
    list_snapshots,
    meta_key,
    read_snapshot,
    snapshot_meta,
    snapshot_size,
    subtract_sorted,
    write_snapshot,
)
from shared.storage import LocalFolderStore

REPO = Path(__file__).resolve().parent.parent
KEY = "snapshots/dest-a/list-1.gz"


def random_emails(rng: random.Random, n: int, universe: int) -> list[str]:
    """n emails drawn with repeats from `universe` distinct ones, including non-ASCII and prefix-sharing ones."""
    domains = ["example.com", "exämple.de", "a.io", "mail.example.org"]
    return [f"u{v}{'x' * (v % 3)}@{domains[v % len(domains)]}" for v in (rng.randrange(universe) for _ in range(n))]


@pytest.fixture
def store(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "state")


# ---------------------------------------------------------------------------------------------------- EmailSorter


@pytest.mark.parametrize(("chunk_size", "max_fanin"), [(1, 2), (37, 4), (500, 64), (100_000, 64)])
def test_sorter_equals_sorted_set(tmp_path: Path, chunk_size: int, max_fanin: int) -> None:
    data = random_emails(random.Random(chunk_size), 3_000, 1_200)
    with EmailSorter(chunk_size, tmp_dir=tmp_path, max_fanin=max_fanin) as sorter:
        for email in data:
            sorter.add(email)
        assert sorter.count is None  # unknown until iterated
        result = list(sorter.sorted_unique())
        assert result == sorted(set(data))
        assert sorter.count == len(set(data))
        assert sorter.added == len(data)
        assert sorter.spills == (math.ceil(len(data) / chunk_size) if chunk_size < len(data) else 0)
        assert list(sorter.sorted_unique()) == result  # iterable again
        spilled = list(tmp_path.iterdir())
        if chunk_size < len(data):
            assert spilled and sum(1 for _ in spilled[0].iterdir()) <= max_fanin  # merged down to one pass
        else:
            assert spilled == []  # nothing touched the disk
    assert list(tmp_path.iterdir()) == []  # close() removed the runs


def test_sorter_edge_cases(tmp_path: Path) -> None:
    with EmailSorter(4, tmp_dir=tmp_path) as empty:
        assert list(empty.sorted_unique()) == []
        assert empty.count == 0
    with EmailSorter(4, tmp_dir=tmp_path) as sorter:
        for email in ["b@x.io"] * 9:  # repeats across spills
            sorter.add(email)
        assert list(sorter.sorted_unique()) == ["b@x.io"]
        with pytest.raises(ValueError, match="after sorted_unique"):
            sorter.add("c@x.io")
    with EmailSorter(tmp_dir=tmp_path) as sorter:
        for bad in ("", "a@x.io\nb@x.io", "a@x.io\r"):
            with pytest.raises(ValueError, match="line breaks"):
                sorter.add(bad)
    with pytest.raises(ValueError):
        EmailSorter(0)


def test_sorter_memory_stays_bounded_at_one_million() -> None:
    """1M distinct emails through chunks of 100k, in a child process so its peak RSS is its own. Holding them all
    in a list and a set costs ~135 MB; the sorter must stay near one chunk (~10 MB over the baseline)."""
    script = textwrap.dedent("""
        import json, resource, sys
        from shared.snapshots import EmailSorter
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n, prev, count = 1_000_000, "", 0
        with EmailSorter(chunk_size=100_000) as sorter:
            for i in range(n):
                j = (i * 7919) % n  # a permutation: every email once, in scrambled order
                sorter.add(f"user{j:07d}@example{j % 97}.com")
            for email in sorter.sorted_unique():
                assert email > prev
                prev, count = email, count + 1
            out = {"count": count, "spills": sorter.spills, "sorter_count": sorter.count}
        out["delta_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["count"] == out["sorter_count"] == 1_000_000
    assert out["spills"] == 10
    assert out["delta_kb"] < 45_000, out  # Linux ru_maxrss is in KiB


# ------------------------------------------------------------------------------------------------ sorted streams


@pytest.mark.parametrize("seed", range(6))
def test_diff_and_subtract_match_set_arithmetic(seed: int) -> None:
    rng = random.Random(seed)
    prev = set(random_emails(rng, rng.randrange(0, 400), 500))
    cur = set(random_emails(rng, rng.randrange(0, 400), 500))
    others = [set(random_emails(rng, rng.randrange(0, 200), 500)) for _ in range(rng.randrange(0, 4))]
    assert list(diff_sorted(iter(sorted(prev)), iter(sorted(cur)))) == sorted(prev - cur)
    assert list(subtract_sorted(sorted(prev), *(sorted(o) for o in others))) == sorted(prev.difference(*others))
    assert count_sorted(diff_sorted(sorted(prev), sorted(cur))) == len(prev - cur)


def test_streams_tolerate_repeats_and_refuse_disorder() -> None:
    assert list(diff_sorted(["a", "a", "b", "c"], ["b", "b"])) == ["a", "c"]
    assert list(diff_sorted(["a", "b"], [])) == ["a", "b"]
    assert list(diff_sorted([], ["a"])) == []
    with pytest.raises(ValueError, match="previous stream is not sorted"):
        list(diff_sorted(["b", "a"], []))
    with pytest.raises(ValueError, match="current stream is not sorted"):
        list(diff_sorted(["a", "z"], ["c", "b"]))
    with pytest.raises(ValueError, match="stream 2 is not sorted"):
        list(subtract_sorted(["a", "z"], ["b"], ["d", "c"]))


# ----------------------------------------------------------------------------------------------------- snapshots


def test_write_read_round_trip(store: LocalFolderStore) -> None:
    emails = sorted(set(random_emails(random.Random(7), 20_000, 30_000)))
    assert write_snapshot(store, KEY, iter(emails)) == len(emails)
    assert list(read_snapshot(store, KEY)) == emails
    assert snapshot_size(store, KEY) == len(emails)
    meta = snapshot_meta(store, KEY)
    assert meta is not None and meta["count"] == len(emails) and meta["etag"] == store.info(KEY).etag
    # a plain gzip of lines: readable with standard tools
    assert gzip.decompress(store.read_bytes(KEY)).decode() == "".join(e + "\n" for e in emails)
    assert list_snapshots(store) == [KEY]  # the sidecar is not a snapshot


def test_empty_and_missing_snapshots(store: LocalFolderStore) -> None:
    assert list(read_snapshot(store, KEY)) == []
    assert snapshot_size(store, KEY) == 0
    assert write_snapshot(store, KEY, []) == 0
    assert store.info(KEY) is not None and list(read_snapshot(store, KEY)) == []
    assert snapshot_size(store, KEY) == 0
    delete_snapshot(store, KEY)
    assert store.info(KEY) is None and store.info(meta_key(KEY)) is None


def test_unsorted_input_is_refused_and_keeps_the_previous_snapshot(store: LocalFolderStore) -> None:
    write_snapshot(store, KEY, ["a@x.io", "b@x.io"])
    before = store.read_bytes(KEY)
    with pytest.raises(ValueError, match="not sorted"):
        write_snapshot(store, KEY, ["a@x.io", "c@x.io", "b@x.io"])
    assert store.read_bytes(KEY) == before
    assert snapshot_size(store, KEY) == 2
    assert not [p for p in Path(store.root).rglob(".tmp-*")]  # the aborted write left nothing behind
    assert write_snapshot(store, KEY, ["a@x.io", "a@x.io", "b@x.io"]) == 2  # repeats collapse


def test_stale_sidecar_is_not_trusted(store: LocalFolderStore) -> None:
    write_snapshot(store, KEY, ["a@x.io", "b@x.io", "c@x.io"])
    store.write_bytes(KEY, gzip.compress(b"a@x.io\n"))  # the snapshot changed without its sidecar (a crash)
    assert snapshot_meta(store, KEY) is None
    assert snapshot_size(store, KEY) == 1


def test_damaged_snapshots_raise_state_errors(store: LocalFolderStore) -> None:
    store.write_bytes(KEY, gzip.compress(b"b@x.io\na@x.io\n"))
    with pytest.raises(StateError, match="not strictly sorted"):
        list(read_snapshot(store, KEY))
    store.write_bytes(KEY, b"not gzip at all")
    with pytest.raises(StateError, match="unreadable"):
        list(read_snapshot(store, KEY))
    store.write_bytes(KEY, gzip.compress("".join(f"{i:04d}@x.io\n" for i in range(500)).encode())[:-12])  # truncated
    with pytest.raises(StateError, match="unreadable"):
        list(read_snapshot(store, KEY))


def test_filter_out(store: LocalFolderStore) -> None:
    emails = [f"p{i:04d}@x.io" for i in range(2_000)]
    write_snapshot(store, KEY, emails)
    assert filter_out(store, KEY, "  P0500@X.io ") is True  # normalised like the emails it holds
    assert list(read_snapshot(store, KEY)) == [e for e in emails if e != "p0500@x.io"]
    assert snapshot_size(store, KEY) == 1_999 and snapshot_meta(store, KEY) is not None
    etag = store.info(KEY).etag
    assert filter_out(store, KEY, "p0500@x.io") is False
    assert filter_out(store, KEY, "zzz@x.io") is False
    assert store.info(KEY).etag == etag  # nothing written when absent
    assert filter_out(store, "snapshots/dest-a/missing.gz", "p0001@x.io") is False
    assert store.info("snapshots/dest-a/missing.gz") is None


def test_sorter_into_snapshot_into_diff(store: LocalFolderStore, tmp_path: Path) -> None:
    """The mirror flow's storage half: export -> sorter -> diff against the stored snapshot -> new snapshot."""
    rng = random.Random(3)
    first = random_emails(rng, 5_000, 4_000)
    second = random_emails(rng, 5_000, 4_000)
    with EmailSorter(700, tmp_dir=tmp_path) as sorter:
        for e in first:
            sorter.add(e)
        write_snapshot(store, KEY, sorter.sorted_unique())
    with EmailSorter(700, tmp_dir=tmp_path) as sorter:
        for e in second:
            sorter.add(e)
        gone = list(diff_sorted(read_snapshot(store, KEY), sorter.sorted_unique()))
        assert gone == sorted(set(first) - set(second))
        assert write_snapshot(store, KEY, sorter.sorted_unique()) == sorter.count == len(set(second))
    assert list(read_snapshot(store, KEY)) == sorted(set(second))


@pytest.mark.azurite
def test_blob_round_trip_and_filter_out(blob_container) -> None:  # type: ignore[no-untyped-def]
    from shared.blobstore import BlobContainerStore

    blobs = BlobContainerStore(blob_container)
    emails = [f"b{i:05d}@x.io" for i in range(30_000)]
    assert write_snapshot(blobs, KEY, emails) == 30_000
    assert snapshot_meta(blobs, KEY) is not None and snapshot_size(blobs, KEY) == 30_000
    assert filter_out(blobs, KEY, "b01234@x.io") is True  # reads the blob while its replacement is staged
    assert list(read_snapshot(blobs, KEY)) == [e for e in emails if e != "b01234@x.io"]
    assert snapshot_size(blobs, KEY) == 29_999
    assert list_snapshots(blobs) == [KEY]
    assert list(read_snapshot(blobs, "snapshots/none.gz")) == []


def test_no_temp_files_leak_from_abandoned_iteration(tmp_path: Path) -> None:
    sorter = EmailSorter(10, tmp_dir=tmp_path)
    for i in range(100):
        sorter.add(f"{i:03d}@x.io")
    it = sorter.sorted_unique()
    next(it)
    it.close()
    assert sorter.count is None
    sorter.close()
    assert os.listdir(tmp_path) == []

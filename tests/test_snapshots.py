"""Snapshots and sorted streams: the sorter against sorted(set()), bounded memory, diffs against set arithmetic,
snapshot round trips on a real folder (and on Azurite), erasure rewrites; plain-text spills, trusted writes, the
block paths at tiny block sizes, and the reader against gzip.GzipFile on old and odd snapshots."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from shared import snapshots
from shared.errors import StateError
from shared.snapshots import (
    EmailSorter,
    copy_snapshot,
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
    union_sorted,
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
        assert sorter.spills == len(data) // chunk_size  # full chunks; the last one stays in memory
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


def test_a_stream_that_breaks_its_order_yields_each_item_once_up_to_the_break() -> None:
    """A block out of order goes through the per-item path: what came before the break is yielded, repeats still
    collapsed (a consumer acting as it reads, such as a removal, sees each contact once), then the error."""
    seen: list[str] = []
    with pytest.raises(ValueError, match="previous stream is not sorted"):
        for email in diff_sorted(["a", "a", "b", "b", "c", "a"], ["c"]):
            seen.append(email)
    assert seen == ["a", "b"]


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


def test_a_copied_snapshot_reads_the_same_with_a_sidecar_of_its_own(store: LocalFolderStore) -> None:
    """A copy moves the bytes as they are; its sidecar vouches for the copy (its etag), carries the source's count
    and digest and the caller's fields. A source without a current sidecar is not copied."""
    emails = sorted(set(random_emails(random.Random(3), 5_000, 8_000)))
    write_snapshot(store, KEY, emails, written_by="run-1")
    assert copy_snapshot(store, KEY, "snapshots/copy.gz", written_by="run-2", extra={"content": "x"}) == len(emails)
    assert list(read_snapshot(store, "snapshots/copy.gz")) == emails
    source, copy = snapshot_meta(store, KEY), snapshot_meta(store, "snapshots/copy.gz")
    assert source is not None and copy is not None
    assert (copy["count"], copy["sha256"], copy["written_by"], copy["content"]) == (
        len(emails), source["sha256"], "run-2", "x")
    store.write_bytes(meta_key(KEY), b"{}")  # the source's sidecar no longer describes it
    assert copy_snapshot(store, KEY, "snapshots/other.gz") is None and store.info("snapshots/other.gz") is None


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


# ------------------------------------------------------------------------------ plain runs, trusted writes, blocks


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 3 emails and reads of a few bytes: every boundary case (a line or a UTF-8 character split between
    reads, repeats and faults across blocks) happens many times even on small inputs."""
    monkeypatch.setattr(snapshots, "_WRITE_SLICE", 3)
    monkeypatch.setattr(snapshots, "_READ_BYTES", 7)
    monkeypatch.setattr(snapshots, "_MIN_RUN_READ", 5)
    monkeypatch.setattr(snapshots, "_MERGE_READ_BUDGET", 11)
    monkeypatch.setattr(snapshots, "_INFLATE_BYTES", 5)


def test_spilled_runs_are_plain_text_and_removed_on_close(tmp_path: Path) -> None:
    data = [*random_emails(random.Random(11), 25, 12), "zz@exämple.de"]
    sorter = EmailSorter(10, tmp_dir=tmp_path)
    sorter.extend(data[:13])  # a spill of 13 (extend may overshoot the chunk by its own size)
    for email in data[13:]:
        sorter.add(email)  # one more spill of 10; the last 3 stay in memory
    assert sorter.spills == 2
    (work,) = tmp_path.iterdir()
    runs = sorted(work.iterdir())
    assert len(runs) == 2 and all(p.suffix == ".txt" for p in runs)
    for path, chunk in zip(runs, (data[:13], data[13:23]), strict=True):  # readable plain text, sorted, repeats kept
        assert path.read_text(encoding="utf-8") == "".join(e + "\n" for e in sorted(chunk))
    assert list(sorter.sorted_unique()) == sorted(set(data)) == list(sorter.sorted_unique())
    assert sorter.count == len(set(data))
    sorter.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        next(sorter.sorted_unique())


def test_merge_passes_keep_the_fanin_and_clean_up(tmp_path: Path, tiny_blocks: None) -> None:
    data = random_emails(random.Random(5), 400, 150)
    with EmailSorter(9, tmp_dir=tmp_path, max_fanin=3) as sorter:
        for email in data:
            sorter.add(email)
        assert list(sorter.sorted_unique()) == sorted(set(data))
        (work,) = tmp_path.iterdir()
        assert len(list(work.iterdir())) <= 2  # two runs + the last chunk in memory = the fan-in of 3
    assert list(tmp_path.iterdir()) == []


def test_trusted_write_equals_checked_write(store: LocalFolderStore, tmp_path: Path) -> None:
    data = random_emails(random.Random(2), 6_000, 5_000)
    with EmailSorter(700, tmp_dir=tmp_path) as sorter:
        sorter.extend(data)
        checked = write_snapshot(store, "a.gz", sorter.sorted_unique())
        trusted = write_snapshot(store, "b.gz", sorter.sorted_unique(), trusted=True)
        assert checked == trusted == sorter.count == len(set(data))
    assert store.read_bytes("a.gz") == store.read_bytes("b.gz")  # same bytes (gzip header mtime 0)
    meta_a, meta_b = snapshot_meta(store, "a.gz"), snapshot_meta(store, "b.gz")
    assert meta_a is not None and meta_b is not None
    assert (meta_a["count"], meta_a["sha256"]) == (meta_b["count"], meta_b["sha256"])
    assert list(read_snapshot(store, "b.gz")) == sorted(set(data))
    # the other trusted sources: a snapshot, a union of snapshots
    assert write_snapshot(store, "c.gz", read_snapshot(store, "a.gz"), trusted=True) == len(set(data))
    assert store.read_bytes("c.gz") == store.read_bytes("a.gz")
    extra = sorted(set(random_emails(random.Random(3), 500, 9_000)))
    write_snapshot(store, "d.gz", extra)
    union = union_sorted(read_snapshot(store, "a.gz"), read_snapshot(store, "d.gz"))
    assert write_snapshot(store, "e.gz", union, trusted=True) == len(set(data) | set(extra))
    assert list(read_snapshot(store, "e.gz")) == sorted(set(data) | set(extra))


def test_snapshot_format_is_a_fast_gzip_of_lines(store: LocalFolderStore) -> None:
    emails = ["a@x.io", "b@exämple.de", "c@x.io"]
    write_snapshot(store, KEY, emails)
    raw = store.read_bytes(KEY)
    assert raw[:2] == b"\x1f\x8b" and raw[8] == 4  # gzip header, XFL 4: written at the fastest level
    assert gzip.decompress(raw) == "a@x.io\nb@exämple.de\nc@x.io\n".encode()
    meta = snapshot_meta(store, KEY)
    assert meta is not None and meta["sha256"] == __import__("hashlib").sha256(gzip.decompress(raw)).hexdigest()


def _old_snapshot(text: bytes) -> bytes:
    """A snapshot as the previous write_snapshot made it: zlib level 6, gzip wrapper."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    return comp.compress(text) + comp.flush()


def _gzipfile_lines(data: bytes) -> tuple[list[str], str | None]:
    """What the previous reader (GzipFile + TextIOWrapper) made of some bytes: the lines, or the error's type."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz, io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as t:
            return [line.removesuffix("\n") for line in t], None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        return [], type(exc).__name__


LINES = "".join(f"p{i:04d}@exämple.de\n" for i in range(300)).encode()
ODD_SNAPSHOTS = {
    "old level 6": _old_snapshot(LINES),
    "gzip.compress, level 9, mtime": gzip.compress(LINES, 9),
    "two members": gzip.compress(LINES[:1000]) + gzip.compress(LINES[1000:]),
    "member split inside a line and a character": gzip.compress(LINES[:1001]) + gzip.compress(LINES[1001:]),
    "zero padding": gzip.compress(LINES) + b"\0" * 20,
    "no newline at the end": gzip.compress(LINES[:-1]),
    "empty": gzip.compress(b""),
    "empty object": b"",
    "trailing garbage": gzip.compress(LINES) + b"junk",
    "one stray byte": gzip.compress(LINES) + b"\x1f",
    "zeros first": b"\0" + gzip.compress(LINES),
    "not gzip": b"not gzip at all",
    "truncated": gzip.compress(LINES)[:-12],
    "cut in the header": gzip.compress(LINES)[:5],
    "bad utf-8": gzip.compress(b"a@x.io\n\xff@x.io\n"),
}


@pytest.mark.parametrize("tiny", [False, True], ids=["default reads", "tiny reads"])
@pytest.mark.parametrize("name", list(ODD_SNAPSHOTS))
def test_reader_agrees_with_gzipfile(store: LocalFolderStore, monkeypatch: pytest.MonkeyPatch, name: str,
                                     tiny: bool) -> None:
    """Old snapshots and odd gzip objects read exactly as with gzip.GzipFile: the same lines, or StateError naming
    the same error."""
    if tiny:
        monkeypatch.setattr(snapshots, "_READ_BYTES", 3)
        monkeypatch.setattr(snapshots, "_INFLATE_BYTES", 4)
    data = ODD_SNAPSHOTS[name]
    store.write_bytes(KEY, data)
    lines, error = _gzipfile_lines(data)
    if error is None:
        assert list(read_snapshot(store, KEY)) == lines
        assert count_sorted(read_snapshot(store, KEY)) == len(lines)
    else:
        with pytest.raises(StateError, match=rf"unreadable \({error}\)"):
            list(read_snapshot(store, KEY))


@pytest.mark.parametrize("tiny", [False, True], ids=["default blocks", "tiny blocks"])
def test_read_snapshot_yields_the_emails_before_a_fault(store: LocalFolderStore, monkeypatch: pytest.MonkeyPatch,
                                                        tiny: bool) -> None:
    if tiny:
        monkeypatch.setattr(snapshots, "_READ_BYTES", 5)
    store.write_bytes(KEY, gzip.compress(b"a@x.io\nb@x.io\nc@x.io\nc@x.io\nd@x.io\n"))
    seen: list[str] = []
    with pytest.raises(StateError, match="not strictly sorted"):
        for email in read_snapshot(store, KEY):
            seen.append(email)
    assert seen == ["a@x.io", "b@x.io", "c@x.io"]


@pytest.mark.parametrize("seed", range(4))
def test_tiny_blocks_match_set_arithmetic(store: LocalFolderStore, tmp_path: Path, tiny_blocks: None,
                                          seed: int) -> None:
    """The whole flow with blocks of 3 and reads of a few bytes against set arithmetic: sorter, trusted and checked
    writes, reads, unions (of snapshots, lists with repeats, started iterators), diffs, subtractions, counts."""
    rng = random.Random(seed)
    first, second = random_emails(rng, 300, 200), random_emails(rng, 300, 200)
    with EmailSorter(rng.choice([7, 13, 1_000]), tmp_dir=tmp_path, max_fanin=rng.choice([2, 3, 64])) as sorter:
        sorter.extend(first[:100])
        for email in first[100:]:
            sorter.add(email)
        assert write_snapshot(store, "a.gz", sorter.sorted_unique(), trusted=bool(seed % 2)) == len(set(first))
        assert list(sorter.sorted_unique()) == sorted(set(first))
    assert list(read_snapshot(store, "a.gz")) == sorted(set(first))
    write_snapshot(store, "b.gz", sorted(second + second))  # repeats collapse
    assert list(read_snapshot(store, "b.gz")) == sorted(set(second))
    a, b = set(first), set(second)
    started = read_snapshot(store, "b.gz")
    head = next(started)
    assert head == min(b)
    assert list(union_sorted(read_snapshot(store, "a.gz"), started, sorted(second))) == sorted(a | b)
    assert list(union_sorted(read_snapshot(store, "a.gz"))) == sorted(a)
    assert list(union_sorted()) == []
    assert list(diff_sorted(read_snapshot(store, "a.gz"), read_snapshot(store, "b.gz"))) == sorted(a - b)
    assert list(diff_sorted(sorted(first), sorted(second))) == sorted(a - b)
    assert count_sorted(diff_sorted(read_snapshot(store, "b.gz"), read_snapshot(store, "a.gz"))) == len(b - a)
    c = set(random_emails(rng, 100, 200))
    assert list(subtract_sorted(read_snapshot(store, "a.gz"), read_snapshot(store, "b.gz"), sorted(c))) == sorted(
        a - b - c)
    assert list(subtract_sorted(sorted(first))) == sorted(a)
    write_snapshot(store, "a.gz", union_sorted(read_snapshot(store, "a.gz"), read_snapshot(store, "b.gz")),
                   trusted=True)
    assert list(read_snapshot(store, "a.gz")) == sorted(a | b)
    assert snapshot_size(store, "a.gz") == len(a | b)


def test_write_errors_are_the_per_email_ones(store: LocalFolderStore, tiny_blocks: None) -> None:
    """Bad input fails as it did email by email: the first fault in stream order decides the message."""
    for bad, message in [
        (["a@x.io", "c@x.io", "b@x.io", "d@x.io\n"], "not sorted"),  # the order breaks before the line break
        (["a@x.io", "c@x.io", "b@x.io\n"], "line breaks"),  # an email is checked before its place in the order
        (["a@x.io", "b@x.io", "c@x.io", "d@x.io\n", "a@x.io"], "line breaks"),
        (["a@x.io", None], "line breaks"),
        (["a@x.io", ""], "line breaks"),
        (["a@x.io", "b@x.io\r"], "line breaks"),
        (["a@x.io", "b@x.io", "c@x.io", "c@x.io", "b@x.io"], "not sorted"),  # across blocks, after a repeat
    ]:
        with pytest.raises(ValueError, match=message):
            write_snapshot(store, KEY, bad)  # type: ignore[arg-type]
        assert store.info(KEY) is None
    with pytest.raises(ValueError, match="union is not sorted"):
        list(union_sorted(["a", "b", "c", "d", "c"], ["b"]))
    assert write_snapshot(store, KEY, ["a@x.io"] * 7 + ["b@x.io"] * 4) == 2


def test_closing_an_unfinished_read_releases_it(store: LocalFolderStore) -> None:
    write_snapshot(store, KEY, [f"{i:05d}@x.io" for i in range(20_000)])
    emails = read_snapshot(store, KEY)
    assert next(emails) == "00000@x.io"
    emails.close()  # type: ignore[attr-defined]
    assert list(emails) == []  # like a closed generator
    started = union_sorted(read_snapshot(store, KEY), ["zzz@x.io"])
    assert next(started) == "00000@x.io"
    started.close()  # type: ignore[attr-defined]
    assert list(started) == []

"""StateStore on both backends: runs, open markers, the export ledger, latest exports, disabled markers, leases."""

from __future__ import annotations

import calendar
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from shared.blobstore import BlobContainerStore
from shared.errors import LeaseUnavailable, StateError
from shared.state import (
    DESTINATION_PATTERN,
    OPEN_STATUSES,
    RUN_ID_PATTERN,
    InvalidIdentifier,
    StateStore,
    new_run_id,
)
from shared.storage import LeaseKeeper, LeaseLost, LocalFolderStore, ObjectStore

REPO = Path(__file__).resolve().parent.parent

T0 = calendar.timegm((2024, 3, 1, 12, 0, 0))


@pytest.fixture(params=["local", pytest.param("blob", marks=pytest.mark.azurite)])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "local":
        return StateStore(LocalFolderStore(tmp_path / "state"), clock=lambda: T0)
    return StateStore(BlobContainerStore(request.getfixturevalue("blob_container")), clock=lambda: T0)


def _run(destination: str, at: float, status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"run_id": new_run_id(at), "destination": destination, "status": status, **extra}


def test_run_ids_match_the_pattern_and_sort_by_start_time() -> None:
    times = [T0, T0 + 0.001, T0 + 0.5, T0 + 1, T0 + 86_400 * 400]
    ids = [new_run_id(t) for t in times]
    assert all(RUN_ID_PATTERN.match(i) for i in ids)
    assert ids[0].startswith("20240301T120000Z-000")
    assert sorted(ids) == ids and len(set(ids)) == len(ids)
    assert RUN_ID_PATTERN.match(new_run_id())


def test_save_load_and_list_newest_first(state: StateStore) -> None:
    runs = [_run("newsletter", T0 + i * 60, report={"sent": i, "name": "Zoë"}) for i in range(5)]
    for run in reversed(runs):  # written out of order: listing order comes from the run ids
        state.save_run(run)
    state.save_run(_run("other", T0))
    assert state.load_run(runs[2]["run_id"]) == runs[2]
    assert state.load_run(new_run_id(T0 + 9999)) is None
    assert [r["run_id"] for r in state.list_runs("newsletter")] == [r["run_id"] for r in reversed(runs)]
    assert [r["run_id"] for r in state.list_runs("newsletter", limit=2)] == [runs[4]["run_id"], runs[3]["run_id"]]
    assert state.list_runs("newsletter", limit=0) == []
    assert state.list_runs("nobody") == []

    runs[4]["report"]["sent"] = 99  # rewritten as the run progresses
    state.save_run(runs[4])
    assert state.load_run(runs[4]["run_id"])["report"]["sent"] == 99  # type: ignore[index]


def test_open_markers_follow_the_status(state: StateStore) -> None:
    a = _run("alpha", T0 + 10, status="running")
    b = _run("beta", T0, status="submitted")
    state.save_run(a)
    state.save_run(b)
    assert [r["run_id"] for r in state.open_runs()] == [b["run_id"], a["run_id"]]  # oldest first

    a["status"] = "interrupted"
    state.save_run(a)
    assert [r["status"] for r in state.open_runs()] == ["submitted", "interrupted"]

    a["status"] = "completed"
    state.save_run(a)
    b["status"] = "failed"
    state.save_run(b)
    assert state.open_runs() == []
    assert state.store.info(f"open/alpha/{a['run_id']}") is None
    assert state.load_run(a["run_id"])["status"] == "completed"  # type: ignore[index]


class Recording:
    """A thin ObjectStore wrapper that logs writes and deletes; with crash_at=n the n-th of them raises instead."""

    def __init__(self, inner: ObjectStore, crash_at: int | None = None) -> None:
        self.inner, self.label, self.crash_at = inner, inner.label, crash_at
        self.ops: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _op(self, kind: str, key: str) -> None:
        if self.crash_at is not None and len(self.ops) >= self.crash_at:
            raise Crash(f"{kind} {key}")
        self.ops.append((kind, key))

    def write_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        self._op("write", key)
        return self.inner.write_bytes(key, data, **kwargs)

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> str:
        self._op("write", key)
        return self.inner.write_stream(key, chunks)

    def delete(self, key: str) -> None:
        self._op("delete", key)
        self.inner.delete(key)


class Crash(Exception):
    """The process 'dies' before this storage operation."""


def _fresh(state: StateStore) -> StateStore:
    """Another StateStore on the same storage, as another process would have (no shared cache, new store object)."""
    store = state.store.inner if isinstance(state.store, Recording) else state.store
    if isinstance(store, LocalFolderStore):
        return StateStore(LocalFolderStore(store.root), clock=lambda: T0)
    assert isinstance(store, BlobContainerStore)
    return StateStore(BlobContainerStore(store.container), clock=lambda: T0)


def _seen(state: StateStore, run: dict[str, Any]) -> tuple[str | None, str | None, bytes | None]:
    """What a reader finds: the status by run id, the status among open runs, the open marker's content."""
    loaded = state.load_run(run["run_id"])
    listed = [r["status"] for r in state.open_runs() if r["run_id"] == run["run_id"]]
    marker = state.store.read_bytes(f"open/{run['destination']}/{run['run_id']}")
    return (loaded or {}).get("status"), listed[0] if listed else None, marker


def test_index_and_marker_follow_status_changes_for_other_instances(state: StateStore) -> None:
    run = _run("news", T0, status="running", checkpoint={"contacts_done": 0})
    seq = [("running", "running"), ("running", "running"), ("submitted", "submitted"), ("submitted", "submitted"),
           ("completed", None)]
    for i, (status, listed) in enumerate(seq):
        run["status"] = status
        run["checkpoint"]["contacts_done"] = i * 1000
        state.save_run(run)
        other = _fresh(state)
        assert _seen(other, run) == (status, listed, status.encode() if listed else None)
        assert other.load_run(run["run_id"])["checkpoint"]["contacts_done"] == i * 1000  # type: ignore[index]

    stopped = _run("news", T0 + 1, status="running")
    state.save_run(stopped)
    stopped["status"] = "interrupted"
    state.save_run(stopped)
    assert _seen(_fresh(state), stopped) == ("interrupted", "interrupted", b"interrupted")
    assert [r["run_id"] for r in _fresh(state).open_runs()] == [stopped["run_id"]]


def test_a_holder_whose_run_was_resumed_elsewhere_cannot_overwrite_its_record(state: StateStore) -> None:
    """The ETag chain: a save goes through only if the record is still what this instance last read or wrote. The
    first holder's lease lapsed and another process resumed the run; the first holder's next save must not turn
    the resumed record back."""
    run = _run("news", T0, status="running", checkpoint={"contacts_done": 1000, "resumed": 0})
    state.save_run(run)
    state.save_run(run)
    other = _fresh(state)
    resumed = other.load_run(run["run_id"])
    assert resumed is not None
    resumed["checkpoint"].update(contacts_done=2000, resumed=1)
    other.save_run(resumed)

    run["checkpoint"]["contacts_done"] = 1500
    run["status"] = "completed"
    with pytest.raises(LeaseLost, match="saved by another process"):
        state.save_run(run)
    assert isinstance(state.failed_save, LeaseLost)
    stored = _fresh(state).load_run(run["run_id"])
    assert stored is not None and stored["status"] == "running" and stored["checkpoint"]["resumed"] == 1
    assert [r["run_id"] for r in _fresh(state).open_runs()] == [run["run_id"]]  # its marker stays
    resumed["status"] = "completed"
    other.save_run(resumed)  # the new holder's chain goes on
    assert _fresh(state).load_run(run["run_id"])["status"] == "completed"  # type: ignore[index]


def test_a_record_is_created_once(state: StateStore) -> None:
    run = _run("news", T0, status="queued")
    state.save_run(run)
    twin = dict(run, status="running")
    with pytest.raises(LeaseLost):
        _fresh(state).save_run(twin)  # it never read the record: it may not replace it
    assert state.load_run(run["run_id"])["status"] == "queued"  # type: ignore[index]


def test_the_lease_holders_state_store_writes_nothing_once_the_lease_is_lost(tmp_path: Path) -> None:
    recording = Recording(LocalFolderStore(tmp_path))
    state = StateStore(recording)
    now = [0.0]
    with state.lease("news", 60) as lease:
        keeper = LeaseKeeper(lease, clock=lambda: now[0])  # not started: nothing renews it
        held = state.held(keeper)
        run = _run("news", T0, status="running")
        held.save_run(run)
        state.save_run(run)  # the door's instance shares the ETag chain with the holder's view
        held.save_run(run)
        recording.ops.clear()
        now[0] += 3600  # unrenewed for an hour: not to be relied on
        run["status"] = "completed"
        for write in (lambda: held.save_run(run), lambda: held.set_latest_export("news", "x.csv", "e1"),
                      lambda: held.store.write_stream(f"runs/news/{run['run_id']}.rejections.csv", iter([b"x"]))):
            with pytest.raises(LeaseLost):
                write()
    assert recording.ops == []
    assert state.load_run(run["run_id"])["status"] == "running"  # type: ignore[index]


def test_a_checkpoint_save_writes_only_the_record(tmp_path: Path) -> None:
    store = Recording(LocalFolderStore(tmp_path))
    state = StateStore(store)
    run = _run("news", T0, status="running", checkpoint={"contacts_done": 0})
    rid = run["run_id"]
    record, index, marker = f"runs/news/{rid}.json", f"run-index/{rid}", f"open/news/{rid}"

    state.save_run(run)  # first save: index and marker before the record
    assert store.ops == [("write", index), ("write", marker), ("write", record)]
    for done in range(1, 6):
        store.ops.clear()
        run["checkpoint"]["contacts_done"] = done
        state.save_run(run)
        assert store.ops == [("write", record)]

    store.ops.clear()
    run["status"] = "submitted"
    state.save_run(run)
    assert store.ops == [("write", marker), ("write", record)]
    assert store.read_bytes(marker) == b"submitted"
    store.ops.clear()
    state.save_run(run)
    assert store.ops == [("write", record)]

    store.ops.clear()
    run["status"] = "completed"
    state.save_run(run)  # final: the marker goes after the record
    assert store.ops == [("write", record), ("delete", marker)]
    assert _seen(_fresh(state), run) == ("completed", None, None)


def test_a_stale_cache_does_not_hide_a_marker(state: StateStore) -> None:
    """Another process saved the run meanwhile; this instance reads the run before saving it again (as resuming and
    polling do), so it writes index and marker again instead of trusting what it wrote before."""
    run = _run("news", T0, status="running")
    state.save_run(run)
    elsewhere = _fresh(state)
    taken = elsewhere.load_run(run["run_id"])
    assert taken is not None
    taken["status"] = "failed"  # final: the marker is deleted
    elsewhere.save_run(taken)

    again = state.load_run(run["run_id"])  # picked up here again (an explicit resume)
    assert again is not None
    again["status"] = "running"
    state.save_run(again)
    assert _seen(_fresh(state), again) == ("running", "running", b"running")

    taken = elsewhere.open_runs()[0]
    taken["status"] = "interrupted"
    elsewhere.save_run(taken)
    [again] = state.open_runs()  # the timer finds it here
    again["status"] = "running"
    state.save_run(again)
    assert state.store.read_bytes(f"open/news/{run['run_id']}") == b"running"


@pytest.mark.parametrize("statuses", [["running", "running", "interrupted", "running", "submitted", "completed"],
                                      ["queued", "running", "failed"], ["running", "refused"]])
def test_a_crash_between_writes_never_loses_a_run(tmp_path: Path, statuses: list[str]) -> None:
    """Die before each storage operation of each save in turn: whenever a record is stored, a fresh reader finds it
    by its run id, and finds it among the open runs while its stored status is open."""
    crash_at = 0
    while True:
        root = tmp_path / f"crash-{crash_at}"
        state = StateStore(Recording(LocalFolderStore(root), crash_at=crash_at))
        run = _run("news", T0, status=statuses[0])
        try:
            for status in statuses:
                run["status"] = status
                state.save_run(run)
        except Crash:
            pass
        else:
            break  # no operation left to crash before
        reader = _fresh(state)
        stored = LocalFolderStore(root).read_bytes(f"runs/news/{run['run_id']}.json")
        if stored is not None:
            loaded = reader.load_run(run["run_id"])
            assert loaded is not None, f"crash at op {crash_at}: record stored but not found by run id"
            open_ids = [r["run_id"] for r in reader.open_runs()]
            assert (run["run_id"] in open_ids) == (loaded["status"] in OPEN_STATUSES), f"crash at op {crash_at}"
        crash_at += 1
    assert crash_at > len(statuses)


def test_another_process_sees_index_and_markers(tmp_path: Path) -> None:
    state = StateStore(LocalFolderStore(tmp_path))
    runs = [_run("news", T0 + i, status="running") for i in range(3)]
    for run in runs:
        for _ in range(3):
            state.save_run(run)
    runs[0]["status"] = "completed"
    runs[1]["status"] = "interrupted"
    for run in runs:
        state.save_run(run)
    script = ("import sys; from shared.state import StateStore; from shared.storage import LocalFolderStore; "
              "s = StateStore(LocalFolderStore(sys.argv[1])); "
              "print(*[r['run_id'] + ':' + r['status'] for r in s.open_runs()]); "
              "print(*[s.load_run(i)['status'] for i in sys.argv[2:]])")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), *[r["run_id"] for r in runs]], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"{runs[1]['run_id']}:interrupted {runs[2]['run_id']}:running", "completed interrupted running"]


def test_stale_open_marker_is_skipped(state: StateStore) -> None:
    run = _run("alpha", T0, status="completed")
    state.save_run(run)
    state.store.write_bytes(f"open/alpha/{run['run_id']}", b"running")  # a crash between record and marker delete
    state.store.write_bytes("open/alpha/not-a-run-id", b"")
    assert state.open_runs() == []


def test_claim_export_once(state: StateStore) -> None:
    first, second = new_run_id(T0), new_run_id(T0 + 1)
    assert state.claim_export("news", "exports/seg/part.csv", '"0x8DABC"', first) is None
    existing = state.claim_export("news", "exports/seg/part.csv", "0x8DABC", second)  # same version, other quoting
    assert existing is not None and existing["run_id"] == first and existing["etag"] == "0x8DABC"
    assert state.claim_export("news", "exports/seg/part.csv", "0x8DDEF", second) is None  # a new version
    assert state.claim_export("other", "exports/seg/part.csv", "0x8DABC", second) is None  # another destination

    state.release_export("news", "exports/seg/part.csv", "0x8DABC", run_id=second)  # not its claim: kept
    assert state.export_claim("news", "exports/seg/part.csv", "0x8DABC")["run_id"] == first  # type: ignore[index]
    state.release_export("news", "exports/seg/part.csv", "0x8DABC")
    assert state.export_claim("news", "exports/seg/part.csv", "0x8DABC") is None
    assert state.claim_export("news", "exports/seg/part.csv", "0x8DABC", second) is None  # retried after a fix


def test_claim_export_concurrently_has_one_winner(state: StateStore) -> None:
    run_ids = [new_run_id(T0 + i) for i in range(10)]
    barrier = threading.Barrier(len(run_ids))
    results: list[Any] = [None] * len(run_ids)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ("claimed", state.claim_export("news", "exports/x.csv", "0x1", run_ids[i]))
        except Exception as e:
            results[i] = ("error", e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(run_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(kind == "claimed" for kind, _ in results), results
    winners = [run_ids[i] for i, (_, entry) in enumerate(results) if entry is None]
    assert len(winners) == 1
    assert {entry["run_id"] for _, entry in results if entry is not None} == {winners[0]}


def test_latest_export(state: StateStore) -> None:
    assert state.latest_export("news") is None
    state.set_latest_export("news", "exports/a.csv", '"0x1"')
    state.set_latest_export("news", "exports/b.csv", "0x2")
    assert state.latest_export("news") == {"source": "exports/b.csv", "etag": "0x2", "seen_at": "2024-03-01T12:00:00Z"}


def test_disabled_markers(state: StateStore) -> None:
    assert state.disabled("news") is None
    state.disable("news", by="ops@example.com", reason="list deleted in SendGrid")
    assert state.disabled("news") == {"at": "2024-03-01T12:00:00Z", "by": "ops@example.com",
                                      "reason": "list deleted in SendGrid"}
    assert state.disabled("other") is None
    state.enable("news")
    state.enable("news")
    assert state.disabled("news") is None


def test_destination_lease(state: StateStore) -> None:
    with state.lease("news", 15):
        with pytest.raises(LeaseUnavailable), state.lease("news", 15):
            pass
        with state.lease("other", 15):
            pass
    with state.lease("news", 15):
        pass


BAD_DESTINATIONS = ["../x", "a/b", "", "News", "-x", "x" * 64, "a.b", "a\\b", "ä", None, 3]
BAD_RUN_IDS = ["../../etc/passwd", "20240301T120000Z-0000000g", "20240301T120000Z", "x", "", None]


@pytest.mark.parametrize("destination", BAD_DESTINATIONS)
def test_bad_destination_refused(state: StateStore, destination: Any) -> None:
    rid = new_run_id(T0)
    calls = [
        lambda: state.save_run({"run_id": rid, "destination": destination, "status": "running"}),
        lambda: state.list_runs(destination),
        lambda: state.claim_export(destination, "k", "e", rid),
        lambda: state.release_export(destination, "k", "e"),
        lambda: state.export_claim(destination, "k", "e"),
        lambda: state.set_latest_export(destination, "k", "e"),
        lambda: state.latest_export(destination),
        lambda: state.disable(destination, "me", "why"),
        lambda: state.enable(destination),
        lambda: state.disabled(destination),
        lambda: state.lease(destination),
        lambda: state.snapshot_key(destination, "0d1a5d5c-58a2-4a33-a0d6-4d5a3b1d6a0e"),
    ]
    for call in calls:
        with pytest.raises(InvalidIdentifier):
            call()
    assert list(state.store.list()) == []


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_bad_run_id_refused(state: StateStore, run_id: Any) -> None:
    for call in [
        lambda: state.load_run(run_id),
        lambda: state.save_run({"run_id": run_id, "destination": "news", "status": "running"}),
        lambda: state.claim_export("news", "k", "e", run_id),
    ]:
        with pytest.raises(InvalidIdentifier):
            call()
    assert list(state.store.list()) == []


def test_invalid_identifier_is_both_state_and_value_error() -> None:
    assert issubclass(InvalidIdentifier, StateError) and issubclass(InvalidIdentifier, ValueError)
    assert DESTINATION_PATTERN.match("a") and DESTINATION_PATTERN.match("x" * 63)


def test_snapshot_key(state: StateStore) -> None:
    list_id = "0d1a5d5c-58a2-4a33-a0d6-4d5a3b1d6a0e"
    assert state.snapshot_key("news", list_id) == f"snapshots/news/{list_id}.gz"
    for bad in ("../x", "a/b", ""):
        with pytest.raises(InvalidIdentifier):
            state.snapshot_key("news", bad)


def test_record_without_status_or_unserialisable_is_refused(state: StateStore) -> None:
    with pytest.raises(StateError):
        state.save_run({"run_id": new_run_id(T0), "destination": "news"})
    with pytest.raises(StateError):
        state.save_run({"run_id": new_run_id(T0), "destination": "news", "status": "running", "x": object()})
    assert list(state.store.list()) == []


def test_corrupt_record_is_a_state_error(state: StateStore) -> None:
    run = _run("news", T0)
    state.save_run(run)
    state.store.write_bytes(f"runs/news/{run['run_id']}.json", b"{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        state.load_run(run["run_id"])

"""StateStore on both backends: runs, open markers, the export ledger, latest exports, disabled markers, leases."""

from __future__ import annotations

import calendar
import threading
from pathlib import Path
from typing import Any

import pytest

from shared.blobstore import BlobContainerStore
from shared.errors import LeaseUnavailable, StateError
from shared.state import (
    DESTINATION_PATTERN,
    RUN_ID_PATTERN,
    InvalidIdentifier,
    StateStore,
    new_run_id,
)
from shared.storage import LocalFolderStore

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

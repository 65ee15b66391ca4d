"""Send only what changed (issue 14): each run says what it changed; a dry run previews exactly what the real run
then does. Engine in this process, state and exports in local folders, the sandbox over HTTP on loopback."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sandbox.server import Sandbox, serve
from shared import batching, delta, engine, report, snapshots
from shared import stream as stream_module
from shared.sendgrid import RetryPolicy
from shared.storage import LocalFolderStore
from tests.engine_world import EngineWorld

KEY = "SG.delta-" + "k" * 20 + "." + "s" * 43
PUT = "PUT /v3/marketing/contacts"


def person(i: int, city: str = "Oslo") -> dict[str, str]:
    return {"email": f"p{i:05d}@example.com", "first": f"P{i}", "city": city}


class World(EngineWorld):
    def __init__(self, box: Sandbox, url: str, tmp: Path) -> None:
        super().__init__(box, url, tmp, key=KEY, mapping={"email": "email", "first_name": "first", "city": "city"},
                         policy=RetryPolicy(max_attempts=2))
        self.version = 0

    def export(self, people: list[dict[str, str]]) -> str:
        self.version += 1
        key = f"members/v{self.version}.csv"
        rows = "".join(f"{p['email']},{p['first']},{p['city']}\n" for p in people)
        self.exports.write_bytes(key, ("email,first,city\n" + rows).encode())
        return key

    def sent(self) -> dict[str, int]:
        return dict(self.box.send_counts())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    box = Sandbox(api_keys=[KEY], job_delay=0.02, count_sends=True)
    with serve(box) as server:
        yield World(box, server.url, tmp_path)


PEOPLE = [person(i) for i in range(1000)]


def test_a_second_run_of_an_unchanged_export_sends_nothing_and_says_so(world: World) -> None:
    first = world.run(world.export(PEOPLE))
    assert first["sync"]["kind"] == "full" and first["changes"]["new"] == 1000 and first["counts"]["sent"] == 1000
    puts = world.puts()
    second = world.run(world.export(PEOPLE))
    assert second["status"] == "completed" and second["sync"]["kind"] == "delta", second
    assert second["changes"] | {"rejected": 0} == {"new": 0, "changed": 0, "unchanged": 1000, "rejected": 0,
                                                    "not_applied": 0}
    assert world.puts() == puts and second["counts"]["sent"] == 0


@pytest.fixture(params=["read once", "planned"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Reading:
    """How a delta run reads: once (the record held as keys), or planned by a counting pass first (a record over
    delta.MAX_UNCHANGED_KEYS)."""
    if request.param == "planned":
        monkeypatch.setattr(delta, "MAX_UNCHANGED_KEYS", 0)
    seen = Reading(request.param == "planned", [])
    real = engine._count
    monkeypatch.setattr(engine, "_count", lambda stream: (seen.counted.append(stream.record.run_id), real(stream))[1])
    return seen


@dataclasses.dataclass
class Reading:
    planned: bool
    counted: list[str]  # the runs that made a counting pass


def test_one_percent_changed_sends_exactly_those_contacts(world: World, reading: Reading) -> None:
    world.run(world.export(PEOPLE))
    before = world.sent()
    moved = {i for i in range(0, 1000, 100)}  # 10 people changed city
    joined = [person(i) for i in range(1000, 1005)]
    again_later = [person(100, "Tromsø"), person(5, "Tromsø")]  # repeats: their first rows count
    second = world.run(world.export([person(i, "Bergen") if i in moved else person(i) for i in range(1000)] + joined
                                    + again_later))
    assert second["sync"]["kind"] == "delta" and second["counts"]["duplicates"] == 2
    assert reading.counted == ([second["run_id"]] if reading.planned else [])
    assert second["changes"]["changed"] == 10 and second["changes"]["new"] == 5
    assert second["changes"]["unchanged"] == 990 and second["counts"]["sent"] == 15
    again = {e for e, n in world.sent().items() if n > before.get(e, 0)}
    assert again == {person(i)["email"] for i in moved} | {p["email"] for p in joined}
    assert world.box.contact(person(0)["email"])["city"] == "Bergen"
    assert world.box.contact(person(100)["email"])["city"] == "Bergen"


def test_a_delta_run_stopped_after_its_first_request_sends_the_rest_when_resumed(
        world: World, reading: Reading, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted (503s past the retry budget) after its first accepted request, a delta run resumed sends the
    changed contacts it had not sent, and no unchanged one: its filter is the same on the second attempt."""
    world.run(world.export(PEOPLE))
    before = world.sent()
    monkeypatch.setattr(batching, "Packer", functools.partial(batching.Packer, max_count=7))
    real_checkpoint = stream_module.Stream.checkpoint

    def then_503s(self: stream_module.Stream, done: int) -> None:
        real_checkpoint(self, done)
        if done == 7:
            world.box.inject({"endpoint": PUT, "kind": "503", "times": 2})  # the retry budget: 2 attempts

    monkeypatch.setattr(stream_module.Stream, "checkpoint", then_503s)
    moved = set(range(0, 1000, 40))  # 25 changed: 4 requests of 7
    key = world.export([person(i, "Bergen") if i in moved else person(i) for i in range(1000)])
    world.configure(max_in_flight=1)  # the request after the first is not under way when the 503s are armed
    first = world.run(key)
    assert first["status"] == "interrupted" and first["checkpoint"]["contacts_done"] == 7, first
    second = world.run(key)
    assert second["run_id"] == first["run_id"] and second["status"] == "completed", second
    assert second["checkpoint"]["resumed"] == 1 and second["checkpoint"]["contacts_done"] == 25
    assert second["changes"]["changed"] == 25 and second["changes"]["unchanged"] == 975
    assert len(reading.counted) == (1 if reading.planned else 0)  # the plan is staged: not made again
    again = {e: n - before.get(e, 0) for e, n in world.sent().items() if n > before.get(e, 0)}
    assert again == {person(i)["email"]: 1 for i in moved}
    assert all(world.box.contact(person(i)["email"])["city"] == "Bergen" for i in moved)


# Past bulk_threshold the chunks are mapped as import lines, not JSON (pipeline.CSV), and a delta run's reading pass
# maps otherwise than the full run's: what the record holds of a contact's content must not depend on how it was
# encoded, or every delta run re-sends the contacts past the threshold. 9,000 rows: more than one chunk (4,096).
@pytest.mark.parametrize("threshold", [None, 100, 5_000])
def test_what_changed_does_not_depend_on_how_contacts_were_sent(world: World, threshold: int | None) -> None:
    world.configure(bulk_threshold=threshold)
    people = [person(i) for i in range(9_000)]
    first = world.run(world.export(people))
    assert first["counts"]["sent"] == 9_000 and first["status"] == "completed", first
    moved = set(range(0, 9_000, 450))  # 20 people changed city, before and after the threshold
    before = world.sent()
    second = world.run(world.export([person(i, "Bergen") if i in moved else p for i, p in enumerate(people)]))
    assert second["sync"]["kind"] == "delta"
    assert second["changes"] | {"rejected": 0} == {"new": 0, "changed": 20, "unchanged": 8_980, "rejected": 0,
                                                    "not_applied": 0}, second["changes"]
    assert {e for e, n in world.sent().items() if n > before.get(e, 0)} == {person(i)["email"] for i in moved}
    third = world.run(world.export([person(i, "Bergen") if i in moved else p for i, p in enumerate(people)]))
    assert third["changes"]["unchanged"] == 9_000 and third["counts"]["sent"] == 0, third["changes"]


def test_a_record_an_earlier_version_made_is_not_compared(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records written before contents were taken over the import line compared JSON: a full run replaces them."""
    monkeypatch.setattr(delta, "CONTENT", "json")
    world.run(world.export(PEOPLE))
    monkeypatch.undo()
    second = world.run(world.export(PEOPLE))
    assert second["sync"]["kind"] == "full" and "earlier version" in second["sync"]["why"]
    assert second["counts"]["sent"] == 1000
    third = world.run(world.export(PEOPLE))
    assert third["sync"]["kind"] == "delta" and third["counts"]["sent"] == 0


def test_a_mapping_change_and_a_full_resync_send_everyone(world: World) -> None:
    world.run(world.export(PEOPLE))
    full = world.run(world.export(PEOPLE), full_resync=True)
    assert full["sync"]["kind"] == "full" and "asked" in full["sync"]["why"] and full["counts"]["sent"] == 1000
    assert full["changes"]["unchanged"] == 1000  # nothing had changed, and everyone was sent anyway
    world.configure(mapping={"email": "email", "first_name": "first"})  # city no longer mapped
    remapped = world.run(world.export(PEOPLE))
    assert remapped["sync"]["kind"] == "full" and "mapping" in remapped["sync"]["why"]
    assert remapped["counts"]["sent"] == 1000


def test_full_resync_days_sends_everyone_when_they_have_passed(world: World) -> None:
    world.run(world.export(PEOPLE))
    svc = world.services()
    fp_key = svc.state.fingerprints_key("members", world.list_id)
    meta_key = fp_key + ".meta.json"
    meta = orjson.loads(svc.state.store.read_bytes(meta_key) or b"{}")
    meta["last_full_at"] -= 8 * 86_400  # the last full send was eight days ago
    svc.state.store.write_bytes(meta_key, orjson.dumps(meta))
    report = world.run(world.export(PEOPLE))
    assert report["sync"]["kind"] == "full" and "7 or more days" in report["sync"]["why"]
    assert report["counts"]["sent"] == 1000


def test_contacts_of_an_errored_job_are_sent_again_by_the_next_run(world: World) -> None:
    world.box.inject({"endpoint": "job", "kind": "errored", "times": 1, "error_count": 3})
    first = world.run(world.export(PEOPLE))
    assert first["status"] == "completed_with_errors" and first["counts"]["not_applied"] == 3
    before = world.sent()
    second = world.run(world.export(PEOPLE))
    assert second["sync"]["kind"] == "delta" and second["counts"]["sent"] == 3, second
    resent = {e for e, n in world.sent().items() if n > before.get(e, 0)}
    assert len(resent) == 3


def test_contacts_of_a_failed_job_are_sent_again_by_the_next_run(world: World) -> None:
    world.box.inject({"endpoint": "job", "kind": "failed", "times": 1})
    assert world.run(world.export(PEOPLE))["status"] == "failed"
    second = world.run(world.export(PEOPLE))
    assert second["status"] == "completed" and second["counts"]["sent"] == 1000, second


# ------------------------------------------------------------------------------------------ dry run: preflight + plan


def test_a_dry_run_previews_exactly_what_the_real_run_then_does(world: World) -> None:
    world.configure(mode="mirror")
    world.run(world.export(PEOPLE))
    changed = [person(i, "Bergen") if i < 7 else person(i) for i in range(40, 1000)] + [person(2000)]
    key = world.export(changed)
    puts = world.puts()
    dry = world.run(key, dry_run=True)
    assert dry["status"] == "dry_run" and world.puts() == puts  # nothing sent
    plan = dry["plan"]
    assert plan["guard_rail"] == "allowed" and plan["to_remove"] == 40
    removals = world.services().state.store.read_bytes(plan["removals_file"])
    assert removals is not None and removals.decode().splitlines() == ["email"] + [person(i)["email"]
                                                                               for i in range(40)]
    real = world.run(key)
    assert real["status"] == "completed", real
    assert {k: real["changes"][k] for k in ("new", "changed", "unchanged", "removed")} == plan["changes"]
    assert real["mirror"]["to_remove"] == plan["to_remove"] == real["changes"]["removed"]


@pytest.mark.parametrize("broken", ["list", "column", "key"])
def test_a_dry_run_refuses_what_the_real_run_would_refuse(world: World, broken: str) -> None:
    key = world.export(PEOPLE)
    if broken == "list":
        world.configure(list_id="0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10")
    elif broken == "column":
        world.configure(mapping={"email": "email", "first_name": "FirstName"})
    else:
        world.environ["SENDGRID_API_KEY"] = "SG.wrong-" + "x" * 20 + "." + "y" * 43
    dry = world.run(key, dry_run=True)
    real = world.run(key)
    assert dry["status"] == real["status"] != "dry_run", (dry, real)
    assert dry["error"] == real["error"] and dry["counts"]["sent"] == 0
    assert world.puts() == 0


# --- the rejections CSV: duplicates and id_column ---------------------------------------------------------------------


def rejections(world: World, report: dict[str, Any]) -> list[dict[str, str]]:
    import csv
    import io
    data = (world.tmp / "state" / report["rejections_file"]).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(data)))


def export_with_ids(world: World, rows: list[tuple[str, str]]) -> str:
    """(CustomerId, email) rows; line 1 is the header, so row i is on line i + 2."""
    world.version += 1
    key = f"members/v{world.version}.csv"
    world.exports.write_bytes(key, ("CustomerId,email,first,city\n" + "".join(f"{c},{e},F,Oslo\n" for c, e in rows))
                              .encode())
    return key


def test_duplicates_and_rejections_are_listed_with_the_id_column(world: World) -> None:
    world.configure(id_column="CustomerId")
    people = [(f"C{i}", person(i)["email"]) for i in range(5_000)]  # two chunks of 4,096 rows and more
    rows = [*people[:10], ("C-dup-near", people[3][1].upper()), ("C-bad", "not-an-email"), *people[10:],
            ("=C-dup-far", people[1][1])]
    key = export_with_ids(world, rows)
    first = world.run(key)
    assert first["counts"]["duplicates"] == 2 and first["counts"]["sent"] == 5_000
    listed = {r["CustomerId"]: r for r in rejections(world, first)}
    assert listed["C-bad"]["reason"].startswith("invalid email") and listed["C-bad"]["line"] == "13"
    near, far = listed["C-dup-near"], listed["'=C-dup-far"]  # a cell a spreadsheet would run gets an apostrophe
    assert near["line"] == "12" and far["line"] == str(len(rows) + 1)
    assert near["reason"] == far["reason"] == report.DUPLICATE_OF_EARLIER  # a run that reads once cannot know it
    second = world.run(key)  # a delta run reads its export once too
    assert second["sync"]["kind"] == "delta"
    reasons = {r["CustomerId"]: r["reason"] for r in rejections(world, second)}
    assert reasons["C-dup-near"] == report.DUPLICATE_OF_EARLIER
    # a run with max_profiles reads the export twice: the second reading names the row a duplicate repeats
    world.configure(id_column="CustomerId", max_profiles=10_000)
    second = world.run(key)
    assert second["sync"]["kind"] == "delta"
    listed = {r["CustomerId"]: r for r in rejections(world, second)}
    assert listed["'=C-dup-far"]["reason"] == f"duplicate of {key}:3"  # people[1] is on line 3
    assert listed["C-dup-near"]["reason"] == f"duplicate of {key}:5"
    assert second["counts"]["duplicates"] == 2 and second["counts"]["rejected"] == {"invalid_email": 1}


def test_an_id_column_the_export_lacks_leaves_the_cell_empty_and_says_so(world: World) -> None:
    world.configure(id_column="CustomerId")
    report_ = world.run(world.export([*PEOPLE[:5], {"email": "bad", "first": "B", "city": "X"}]))
    assert report_["status"] == "completed" and report_["counts"]["sent"] == 5
    (row,) = rejections(world, report_)
    assert row["CustomerId"] == "" and row["reason"].startswith("invalid email")
    assert any("CustomerId" in w for w in report_["warnings"]), report_["warnings"]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 1000, 70_000])
def test_a_key_set_answers_as_a_set_does(n: int) -> None:
    """delta.KeySet (sorted keys and a bucket index) against Python's set, with keys at both ends of the range,
    neighbours of keys and repeats among the asked."""
    rng = np.random.default_rng(n)
    keys = np.unique(np.concatenate([rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False),
                                     np.array([0, 2**64 - 1], dtype=np.uint64)[: min(n, 2)]]))
    asked = np.concatenate([keys[::3], keys[::5] + np.uint64(1), keys[::7] - np.uint64(1),
                            rng.integers(0, 2**64, 500, dtype=np.uint64, endpoint=False), keys[:3], keys[:3]])
    expected = set(keys.tolist())
    assert delta.KeySet(keys).contains(asked).tolist() == [int(v) in expected for v in asked.tolist()]


@pytest.mark.parametrize("said", ["its sidecar", "no sidecar", "fewer than it holds"])
def test_the_record_loads_as_its_sorted_digests(tmp_path: Path, said: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalFolderStore(tmp_path)
    digests = [i.to_bytes(8, "little") for i in np.random.default_rng(1).integers(0, 2**63, 20_000).tolist()]
    snapshots.write_snapshot(store, "fp.gz", sorted(delta.line(f"p{i:06d}@x.io", d) for i, d in enumerate(digests)))
    if said == "no sidecar":
        store.write_bytes(snapshots.meta_key("fp.gz"), b"{}")
    elif said == "fewer than it holds":
        monkeypatch.setattr(snapshots, "snapshot_size", lambda store, key: 5)
    keys = delta.Unchanged.load(store, "fp.gz").digests.keys
    assert keys.tolist() == sorted(int.from_bytes(d, "little") for d in digests)

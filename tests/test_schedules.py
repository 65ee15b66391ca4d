"""A schedule per destination (issue 15): the timer runs a destination when its own NCRONTAB schedule is due and not
otherwise, each occurrence once, with a clock the test controls; `on_new_export: false` destinations are not run by
the blob trigger. State in a local folder, the SendGrid sandbox over HTTP on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox import samplegen
from sandbox.server import Sandbox, serve
from shared import app, http_api, ncrontab, schedules
from shared.context import AppContext, Settings
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore

NAME = "vip-newsletter"
DAILY_SIX = "0 0 6 * * *"


def at(text: str) -> float:
    """A moment of the controlled clock: 'YYYY-MM-DD HH:MM:SS' UTC."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


@dataclass
class Place:
    box: Sandbox
    info: samplegen.ExportInfo
    tmp: Path
    environ: dict[str, str]
    list_id: str

    def configure(self, **fields: Any) -> None:
        config = samplegen.demo_destinations(self.list_id, max_profiles=None)
        config["destinations"][0].update(fields)
        (self.tmp / "destinations.json").write_bytes(orjson.dumps(config))

    def ctx(self) -> AppContext:
        settings = Settings("exports", "state", str(self.tmp / "destinations.json"), 600.0, self.environ)
        return AppContext(settings, LocalFolderStore(self.tmp / "exports"),
                          StateStore(LocalFolderStore(self.tmp / "state")), EnvSecrets(self.environ))

    def tick(self, when: str) -> list[dict[str, Any]]:
        return app.on_timer(self.ctx(), now=at(when))

    def runs(self, trigger: str | None = None) -> list[dict[str, Any]]:
        runs = self.ctx().state.list_runs(NAME, limit=200)
        return [r for r in runs if trigger is None or r["trigger"] == trigger]

    def puts(self) -> int:
        return self.box.stats["requests"].get("PUT /v3/marketing/contacts", 0)


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Place]:
    key = "SG.sched-" + "k" * 22 + "." + "s" * 43
    box = Sandbox(api_keys=[key], job_delay=0.0)
    with serve(box) as server:
        list_id = box.create_list("VIP")
        box.create_field("lifetime_value", "Number")
        box.create_field("signup_date", "Date")
        info = samplegen.write_cdm_export(tmp_path / "exports", 400, partitions=1, seed=3)
        (tmp_path / "state").mkdir()
        found = Place(box, info, tmp_path, {"SENDGRID_API_URL": server.url, "SENDGRID_API_KEY": key}, list_id)
        found.configure()
        yield found


# ------------------------------------------------------------------------------------------------------ pure rules
def test_the_first_tick_notes_a_schedule_then_each_occurrence_is_due_once() -> None:
    assert schedules.decide(DAILY_SIX, None, at("2030-01-01 05:00:00")) is schedules.Decision.NEW
    noted = schedules.Marker(DAILY_SIX, at("2030-01-01 05:00:00"))
    assert schedules.decide(DAILY_SIX, noted, at("2030-01-01 05:59:59")) is schedules.Decision.NOT_DUE
    assert schedules.decide(DAILY_SIX, noted, at("2030-01-01 06:00:00")) is schedules.Decision.DUE
    taken = schedules.Marker(DAILY_SIX, at("2030-01-01 06:04:00"))
    assert schedules.decide(DAILY_SIX, taken, at("2030-01-02 05:59:00")) is schedules.Decision.NOT_DUE
    assert schedules.decide(DAILY_SIX, taken, at("2030-01-09 07:00:00")) is schedules.Decision.DUE  # missed: one run
    assert schedules.decide("0 0 7 * * *", taken, at("2030-01-09 07:00:00")) is schedules.Decision.NEW  # changed


def test_next_due_is_the_first_occurrence_after_what_was_handled() -> None:
    assert schedules.next_due(None, None, at("2030-01-01 05:00:00")) is None
    assert schedules.next_due(DAILY_SIX, None, at("2030-01-01 05:00:00")) == "2030-01-01T06:00:00Z"
    handled = schedules.Marker(DAILY_SIX, at("2030-01-01 05:00:00"))
    assert schedules.next_due(DAILY_SIX, handled, at("2030-01-01 09:00:00")) == "2030-01-01T06:00:00Z"  # overdue
    other = schedules.Marker("0 0 7 * * *", at("2030-01-01 05:00:00"))
    assert schedules.next_due(DAILY_SIX, other, at("2030-01-01 09:00:00")) == "2030-01-02T06:00:00Z"


def test_of_two_ticks_that_read_the_same_marker_only_one_takes_the_occurrence(tmp_path: Path) -> None:
    markers = schedules.Markers(StateStore(LocalFolderStore(tmp_path)))
    first = markers.advance(NAME, DAILY_SIX, at("2030-01-01 05:00:00"), None)
    assert first is not None
    assert markers.advance(NAME, DAILY_SIX, at("2030-01-01 05:00:01"), None) is None  # created meanwhile
    read = markers.read(NAME)
    assert read == first
    taken = markers.advance(NAME, DAILY_SIX, at("2030-01-01 06:01:00"), read)
    assert taken is not None and markers.advance(NAME, DAILY_SIX, at("2030-01-01 06:01:00"), read) is None
    markers.give_back(NAME, taken, first)
    assert markers.read(NAME).through == first.through  # type: ignore[union-attr]


def test_an_unreadable_marker_is_noted_again(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.write_bytes(schedules.Markers.key(NAME), b"{not json")
    markers = schedules.Markers(StateStore(store))
    read = markers.read(NAME)
    assert schedules.decide(DAILY_SIX, read, at("2030-01-01 06:30:00")) is schedules.Decision.NEW
    assert markers.advance(NAME, DAILY_SIX, at("2030-01-01 06:30:00"), read) is not None


# ------------------------------------------------------------------------------------------------- the timer door
def test_a_scheduled_destination_runs_when_due_and_not_otherwise(place: Place) -> None:
    place.configure(schedule=DAILY_SIX)
    (first,) = app.on_blob(place.ctx(), place.info.model_key)  # a new export runs it at once, as before
    assert first["trigger"] == "blob"
    place.tick("2030-01-01 05:00:00")  # the timer sees the schedule: its first occurrence is 06:00
    place.tick("2030-01-01 05:59:59")
    assert place.runs("schedule") == []
    puts = place.puts()
    place.tick("2030-01-01 06:04:00")
    (scheduled,) = place.runs("schedule")
    # the same export version the blob run had already exported, run again: a new run, not "skipped"
    assert (scheduled["source"], scheduled["source_etag"]) == (first["source"], first["source_etag"])
    assert scheduled["run_id"] != first["run_id"] and scheduled["status"] == "completed"
    # it re-synced only what changed since the blob run: nothing (a full send comes every full_resync_days)
    assert scheduled["sync"]["kind"] == "delta" and scheduled["changes"]["unchanged"] == place.info.valid_distinct
    assert place.puts() == puts and scheduled["counts"]["sent"] == 0
    place.tick("2030-01-01 06:09:00")
    place.tick("2030-01-02 05:59:00")
    assert len(place.runs("schedule")) == 1
    place.tick("2030-01-02 06:00:30")
    assert len(place.runs("schedule")) == 2


def test_two_timer_instances_run_one_occurrence_once(place: Place) -> None:
    place.configure(schedule=DAILY_SIX)
    app.on_blob(place.ctx(), place.info.model_key)
    place.tick("2030-01-01 05:00:00")  # noted; the blob run's jobs are final now
    start = threading.Barrier(3)
    answers: list[list[dict[str, Any]]] = []

    def tick() -> None:
        start.wait()
        answers.append(place.tick("2030-01-01 06:01:00"))

    threads = [threading.Thread(target=tick) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 3
    assert len(place.runs("schedule")) == 1


def test_a_busy_destination_runs_its_due_occurrence_at_the_next_tick(place: Place) -> None:
    place.configure(schedule=DAILY_SIX)
    app.on_blob(place.ctx(), place.info.model_key)
    place.tick("2030-01-01 05:00:00")
    ctx = place.ctx()
    with ctx.state.lease(NAME):  # another run holds the destination
        answers = place.tick("2030-01-01 06:01:00")
    assert {"destination": NAME, "status": "deferred"} in answers and place.runs("schedule") == []
    place.tick("2030-01-01 06:06:00")  # the occurrence was given back: this tick runs it
    assert len(place.runs("schedule")) == 1


def test_on_new_export_false_waits_for_its_schedule(place: Place) -> None:
    place.configure(schedule=DAILY_SIX, on_new_export=False)
    assert app.on_blob(place.ctx(), place.info.model_key) == []  # not run by the blob trigger
    assert place.ctx().state.latest_export(NAME)["source"] == place.info.model_key  # type: ignore[index]
    place.tick("2030-01-01 05:00:00")  # nor by the timer's pass over exports not exported yet
    assert place.runs() == [] and place.puts() == 0
    place.tick("2030-01-01 06:02:00")
    (run,) = place.runs()
    assert run["trigger"] == "schedule" and run["counts"]["sent"] == place.info.valid_distinct
    claim = place.ctx().state.export_claim(NAME, run["source"], run["source_etag"])
    assert claim is not None and claim["run_id"] == run["run_id"]  # a late blob event finds the version taken
    place.configure(schedule=DAILY_SIX)  # takes new exports again: the late event is a no-op
    assert app.on_blob(place.ctx(), place.info.model_key)[0]["status"] == "skipped"


def test_without_schedule_and_new_exports_only_a_person_runs_it(place: Place) -> None:
    place.configure(on_new_export=False)
    assert app.on_blob(place.ctx(), place.info.model_key) == []
    place.tick("2030-01-01 06:00:00")
    place.tick("2030-01-02 06:00:00")
    assert place.runs() == []
    answer = http_api.handle("POST", "destinations/{name}/runs", {"name": NAME}, {}, b"", place.ctx())
    assert answer.status == 202  # the latest export it was sent is known: a person can run it


def test_a_disabled_destination_is_not_run_by_its_schedule(place: Place) -> None:
    place.configure(schedule=DAILY_SIX)
    app.on_blob(place.ctx(), place.info.model_key)
    place.tick("2030-01-01 05:00:00")
    place.ctx().state.disable(NAME, by="test", reason="paused")
    place.tick("2030-01-01 06:01:00")
    assert place.runs("schedule") == []


def test_destinations_answer_says_when_the_next_run_is_due(place: Place) -> None:
    yearly = "0 0 0 1 1 *"  # its next occurrence moves once a year: the test cannot straddle it
    place.configure(schedule=yearly)
    answer = http_api.handle("GET", "destinations", {}, {}, b"", place.ctx())
    (entry,) = answer.body["destinations"]
    expected = ncrontab.parse(yearly).next_after(datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert entry["schedule"] == yearly and entry["on_new_export"] is True and entry["next_due"] == expected
    place.configure()
    (entry,) = http_api.handle("GET", "destinations", {}, {}, b"", place.ctx()).body["destinations"]
    assert entry["schedule"] is None and entry["next_due"] is None

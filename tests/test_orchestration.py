"""The app's orchestration under overlap and crashes: the timer, the queue worker, the blob trigger and the HTTP API
working on the same destination's runs and purges (state in a local folder, the sandbox over HTTP on loopback).

Each test is a scenario a review found to lose or double-send contacts before it was fixed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox import samplegen
from sandbox.server import Sandbox, serve
from shared import app, engine, http_api, purge, queue_worker, stream
from shared.context import AppContext, Settings
from shared.errors import DeadlineReached, RunRefused
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore

NAME = "vip-newsletter"
REPO = Path(__file__).resolve().parent.parent
PUT = "PUT /v3/marketing/contacts"


@dataclass
class World:
    box: Sandbox
    list_id: str
    info: samplegen.ExportInfo
    tmp: Path
    environ: dict[str, str]

    def ctx(self) -> AppContext:
        """A fresh context, as every Functions invocation builds one."""
        settings = Settings("exports", "state", str(self.tmp / "destinations.json"), 600.0, self.environ)
        return AppContext(settings, LocalFolderStore(self.tmp / "exports"),
                          StateStore(LocalFolderStore(self.tmp / "state")), EnvSecrets(self.environ))

    def call(self, method: str, route: str, params: dict[str, str] | None = None, body: Any = None,
             **values: str) -> http_api.Response:
        return http_api.handle(method, route, values, params or {}, orjson.dumps(body) if body else b"", self.ctx())

    def record_path(self, run_id: str) -> Path:
        return self.tmp / "state" / "runs" / NAME / f"{run_id}.json"

    def record(self, run_id: str) -> dict[str, Any]:
        return orjson.loads(self.record_path(run_id).read_bytes())

    def age(self, run_id: str) -> None:
        """Its queue message was lost: the record was queued longer ago than the timer waits for one."""
        record = self.record(run_id)
        record["queued_at"] = "2020-01-01T00:00:00Z"
        self.record_path(run_id).write_bytes(orjson.dumps(record))

    def puts(self) -> int:
        return self.box.stats["requests"].get(PUT, 0)

    def jobs_applied(self) -> None:
        """SendGrid applies every job it accepted (held or not): the next look at them finds them final."""
        self.box.release_jobs()
        self.box.complete_jobs()

    def in_list(self) -> int:
        self.box.complete_jobs()
        return len(self.box.list_emails(self.list_id))

    def most_sends(self) -> int:
        return max(self.box.send_counts().values(), default=0)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    key = "SG.orch-" + "k" * 22 + "." + "s" * 43
    box = Sandbox(api_keys=[key], job_delay=0.05, count_sends=True)
    with serve(box) as server:
        list_id = box.create_list("VIP")
        box.create_field("lifetime_value", "Number")
        box.create_field("signup_date", "Date")
        info = samplegen.write_cdm_export(tmp_path / "exports", 3_000, partitions=2, seed=5)
        config = samplegen.demo_destinations(list_id, max_profiles=None)
        (tmp_path / "destinations.json").write_bytes(orjson.dumps(config))
        (tmp_path / "state").mkdir()
        yield World(box, list_id, info, tmp_path, {"SENDGRID_API_URL": server.url, "SENDGRID_API_KEY": key})


def _deadline(self: Any, client: Any, read_all: Any = None) -> None:
    """stream.Stream.send_all for a run that meets its deadline before its first request."""
    raise DeadlineReached("the deadline came before the first request")


@pytest.fixture
def interrupted_blob_run(world: World, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """A blob-triggered run (of the generated export, or of `key`) that stops at its deadline before its first
    request (open, claim held)."""
    def run(key: str | None = None) -> dict[str, Any]:
        with monkeypatch.context() as m:
            m.setattr(stream.Stream, "send_all", _deadline)
            (record,) = app.on_blob(world.ctx(), key or world.info.model_key)
        assert record["status"] == "interrupted"
        return record

    return run


def test_the_timer_runs_a_purge_whose_message_was_lost(world: World) -> None:
    app.on_blob(world.ctx(), world.info.model_key)
    world.jobs_applied()
    app.on_timer(world.ctx())
    assert world.in_list() == world.info.valid_distinct
    answer = world.call("DELETE", "destinations/{name}", {"purge": "list"}, name=NAME)
    assert answer.status == 202
    world.age(answer.body["run_id"])  # its message never came
    app.on_timer(world.ctx())
    purged = world.record(answer.body["run_id"])
    assert purged["kind"] == "purge" and purged["status"] == "completed", purged
    assert world.in_list() == 0


def test_a_second_purge_request_names_the_unfinished_one(world: World) -> None:
    first = world.call("DELETE", "destinations/{name}", {"purge": "list", "reason": "ticket 42"}, name=NAME)
    again = world.call("DELETE", "destinations/{name}", {"purge": "list", "reason": "ticket 42"}, name=NAME)
    assert again.status == 202 and again.body["run_id"] == first.body["run_id"] and again.message is None
    other = world.call("DELETE", "destinations/{name}", {"purge": "contacts", "confirm": "true", "reason": "oops"},
                       name=NAME)
    assert other.status == 409 and first.body["run_id"] in other.body["error"]
    assert world.ctx().state.disabled(NAME)["reason"] == "ticket 42"  # a refused request changes nothing
    with pytest.raises(RunRefused, match=r"purge=list .* is unfinished"):  # the CLI's door
        purge.remove_destination(world.ctx().services(world.ctx().config()), NAME, "contacts", confirmed=True)


def test_a_reason_holding_a_key_is_stored_without_it(world: World) -> None:
    key = world.environ["SENDGRID_API_KEY"]
    assert world.call("DELETE", "destinations/{name}", {"reason": f"rotated {key}"}, name=NAME).status == 200
    stored = (world.tmp / "state" / "disabled" / f"{NAME}.json").read_text()
    assert key not in stored and key[:12] not in stored and "rotated" in stored


def test_a_dry_run_resumed_by_the_timer_sends_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = world.call("POST", "destinations/{name}/runs", body={"source": world.info.model_key, "dry_run": True},
                        name=NAME)

    def deadline(state: Any) -> None:
        raise DeadlineReached("the deadline came while reading")

    with monkeypatch.context() as m:
        m.setattr(engine, "_execute", deadline)
        stopped = queue_worker.work(world.ctx(), answer.message_json() or "", 1)
    assert stopped is not None and stopped["status"] == "interrupted" and stopped["dry_run"] is True
    (resumed,) = app.on_timer(world.ctx())
    assert resumed["run_id"] == answer.body["run_id"] and resumed["dry_run"] is True
    assert resumed["status"] == "dry_run" and world.puts() == 0 and world.in_list() == 0


def test_the_timer_does_not_run_again_a_queued_run_a_late_message_ran(world: World) -> None:
    answer = world.call("POST", "destinations/{name}/runs", body={"source": world.info.model_key}, name=NAME)
    world.age(answer.body["run_id"])
    timer = world.ctx()
    listed = timer.state.open_runs()  # the timer lists the open runs; then the late message is delivered
    world.box.hold_jobs()  # the run's jobs stay pending: it ends submitted, and only a poll could finish it
    done = queue_worker.work(world.ctx(), answer.message_json() or "", 3)
    assert done is not None and done["status"] == "submitted" and world.puts() == 1
    timer.state.open_runs = lambda: listed  # type: ignore[method-assign]
    app.on_timer(timer)
    assert world.puts() == 1 and world.most_sends() == 1
    assert world.record(answer.body["run_id"]) == done  # the timer left the run as the message's delivery left it


def test_a_posted_run_continues_the_unfinished_run_of_its_export(world: World, interrupted_blob_run: Any) -> None:
    unfinished = interrupted_blob_run()
    answer = world.call("POST", "destinations/{name}/runs", body={"source": world.info.model_key}, name=NAME)
    queued_id = answer.body["run_id"]
    world.box.hold_jobs()  # an upsert run polls its jobs once at its end: they are pending then
    ran = queue_worker.work(world.ctx(), answer.message_json() or "", 1)
    assert ran is not None and ran["run_id"] == unfinished["run_id"] and ran["status"] == "submitted"
    superseded = world.record(queued_id)
    assert superseded["status"] == "superseded" and superseded["continued_as"] == unfinished["run_id"]
    world.age(queued_id)
    world.jobs_applied()
    app.on_timer(world.ctx())  # nothing starts the superseded run afresh; the run it continued as is finished
    assert world.record(unfinished["run_id"])["status"] == "completed"
    assert world.record(queued_id)["status"] == "superseded"
    assert world.puts() == 1 and world.most_sends() == 1 and world.in_list() == world.info.valid_distinct


def test_an_interrupted_run_waits_while_its_destination_is_disabled(world: World, interrupted_blob_run: Any) -> None:
    run = interrupted_blob_run()
    assert world.call("DELETE", "destinations/{name}", name=NAME).status == 200
    app.on_timer(world.ctx())
    assert world.record(run["run_id"])["status"] == "interrupted" and world.puts() == 0
    app.on_timer(world.ctx())
    assert [p.name for p in (world.tmp / "state" / "runs" / NAME).glob("*.json")] == [f"{run['run_id']}.json"]
    assert world.call("POST", "destinations/{name}/enable", name=NAME).status == 200
    world.box.hold_jobs()
    app.on_timer(world.ctx())  # resumes it: its jobs are pending at its end
    assert world.record(run["run_id"])["status"] == "submitted"
    world.jobs_applied()
    app.on_timer(world.ctx())  # polls them
    assert world.record(run["run_id"])["status"] == "completed"
    assert world.in_list() == world.info.valid_distinct


def test_a_crash_right_after_the_claim_leaves_a_run_the_timer_finishes(world: World) -> None:
    """The host dies while the run sets up its SendGrid client, after it claimed the export version."""
    code = (
        "import os, sys\n"
        "from shared import app, engine\n"
        "from shared.context import AppContext, Settings\n"
        "from shared.state import StateStore\n"
        "from shared.storage import LocalFolderStore\n"
        "from shared.secrets import EnvSecrets\n"
        f"environ = {world.environ!r}\n"
        f"settings = Settings('exports', 'state', {str(world.tmp / 'destinations.json')!r}, 600.0, environ)\n"
        f"ctx = AppContext(settings, LocalFolderStore({str(world.tmp / 'exports')!r}),"
        f" StateStore(LocalFolderStore({str(world.tmp / 'state')!r})), EnvSecrets(environ))\n"
        "engine.Services.client = lambda self, dest: os._exit(137)\n"
        f"app.on_blob(ctx, {world.info.model_key!r})\n"
    )
    crashed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 137, crashed.stderr
    (left,) = world.ctx().state.open_runs()  # the claim's run exists, open
    app.on_timer(world.ctx())  # resumes it
    world.jobs_applied()
    app.on_timer(world.ctx())  # and finishes it
    assert world.record(left["run_id"])["status"] == "completed"
    assert world.in_list() == world.info.valid_distinct and world.most_sends() == 1
    assert app.on_blob(world.ctx(), world.info.model_key)[0]["status"] == "skipped"  # a redelivered event


def test_the_disabled_marker_is_read_under_the_lease(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge that disabled the destination and held its lease while an export waited for it: the export, once it
    has the lease, sees the destination disabled and sends nothing."""
    exporting = world.ctx()
    real_lease = StateStore.lease
    purged: list[dict[str, Any]] = []

    def lease(self: StateStore, destination: str, seconds: int = 60) -> Any:
        if self is exporting.state and not purged:
            answer = world.call("DELETE", "destinations/{name}", {"purge": "list"}, name=NAME)
            purged.append(queue_worker.work(world.ctx(), answer.message_json() or "", 1) or {})
        return real_lease(self, destination, seconds)

    monkeypatch.setattr(StateStore, "lease", lease)
    (export,) = app.on_blob(exporting, world.info.model_key)
    assert purged and purged[0]["status"] == "completed"
    assert export["status"] == "refused" and "disabled" in export["error"]
    assert world.puts() == 0 and world.in_list() == 0


def test_a_disabled_destination_gets_no_run_records_from_the_timer(world: World) -> None:
    ctx = world.ctx()
    etag = ctx.exports.info(world.info.model_key)
    assert etag is not None
    ctx.state.set_latest_export(NAME, world.info.model_key, etag.etag)
    assert world.call("DELETE", "destinations/{name}", name=NAME).status == 200
    for _ in range(3):
        assert app.on_timer(world.ctx()) == []
    assert not (world.tmp / "state" / "runs").exists() or not list((world.tmp / "state" / "runs").rglob("*.json"))


def test_one_record_that_fails_unexpectedly_does_not_stop_the_tick(world: World, interrupted_blob_run: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A run record damaged by hand fails every time it is resumed; the rest of each tick goes on: here, a second
    destination's latest export is exported."""
    broken = interrupted_blob_run()
    record = world.record(broken["run_id"])
    del record["checkpoint"]  # resuming it raises KeyError
    world.record_path(broken["run_id"]).write_bytes(orjson.dumps(record))
    config = orjson.loads((world.tmp / "destinations.json").read_bytes())
    copy_list = world.box.create_list("Copy")
    config["destinations"] += samplegen.demo_destinations(copy_list, max_profiles=None, name="copy")["destinations"]
    (world.tmp / "destinations.json").write_bytes(orjson.dumps(config))
    ctx = world.ctx()
    info = ctx.exports.info(world.info.model_key)
    assert info is not None
    ctx.state.set_latest_export("copy", world.info.model_key, info.etag)
    app.on_timer(ctx)
    world.jobs_applied()
    app.on_timer(world.ctx())
    assert caplog.text.count("failed unexpectedly") == 2
    world.box.complete_jobs()
    assert len(world.box.list_emails(copy_list)) == world.info.valid_distinct


def _two_exports(world: World, mode: str) -> tuple[list[str], list[str]]:
    config = orjson.loads((world.tmp / "destinations.json").read_bytes())
    config["destinations"][0].update(mode=mode, mapping={"email": "EmailAddress"}, custom_fields={})
    (world.tmp / "destinations.json").write_bytes(orjson.dumps(config))
    older = [f"person{i}@example.com" for i in range(0, 300)]
    newer = [f"person{i}@example.com" for i in range(100, 400)]  # 100 left, 100 joined
    folder = world.tmp / "exports" / NAME
    folder.mkdir()
    for name, people in (("export-1.csv", older), ("export-2.csv", newer)):
        (folder / name).write_text("EmailAddress\n" + "\n".join(people) + "\n", encoding="utf-8")
    return older, newer


@pytest.mark.parametrize("mode", ["mirror", "upsert"])
def test_an_unfinished_run_of_an_older_export_does_not_undo_a_newer_one(world: World, mode: str,
                                                                         interrupted_blob_run: Any) -> None:
    """The older export's unfinished run is finished (what it started to add is then in a snapshot); in mirror
    mode the latest export is then synced again, so the list ends as the newer export (who left is out again, and
    whatever only the older run added). Upsert keeps everything it ever sent."""
    older, newer = _two_exports(world, mode)
    first = interrupted_blob_run(f"{NAME}/export-1.csv")
    if mode == "upsert":
        world.box.hold_jobs()  # an upsert run polls its jobs once at its end: they are pending then
    (second,) = app.on_blob(world.ctx(), f"{NAME}/export-2.csv")
    # a mirror run waits for its jobs (its removals need them) within its deadline; an upsert run leaves them
    assert first["status"] == "interrupted" and second["status"] == ("completed" if mode == "mirror" else "submitted")
    for _ in range(4):  # resume it, poll its jobs and sync the latest again, poll those jobs
        world.jobs_applied()
        app.on_timer(world.ctx())
    world.box.complete_jobs()
    assert world.record(first["run_id"])["status"] == "completed"
    expected = set(newer) if mode == "mirror" else set(older) | set(newer)
    assert set(world.box.list_emails(world.list_id)) == expected
    assert not world.ctx().state.open_runs()


def test_a_rerun_of_an_older_export_does_not_outlast_the_latest(world: World, interrupted_blob_run: Any) -> None:
    """The latest export's run is interrupted; an admin re-runs the older export by hand. The timer finishes the
    latest's run: the list ends as the latest export."""
    _, newer = _two_exports(world, "mirror")
    app.on_blob(world.ctx(), f"{NAME}/export-1.csv")
    latest = interrupted_blob_run(f"{NAME}/export-2.csv")
    answer = world.call("POST", "destinations/{name}/runs", body={"source": f"{NAME}/export-1.csv"}, name=NAME)
    rerun = queue_worker.work(world.ctx(), answer.message_json() or "", 1)
    # a mirror run waits for its jobs (its removals need them) within its deadline
    assert latest["status"] == "interrupted" and rerun is not None and rerun["status"] == "completed"
    for _ in range(3):
        world.jobs_applied()
        app.on_timer(world.ctx())
    world.box.complete_jobs()
    assert world.record(latest["run_id"])["status"] == "completed"
    assert set(world.box.list_emails(world.list_id)) == set(newer)


def test_two_exports_between_ticks_are_each_sent_once(world: World) -> None:
    """Nothing interrupted: the timer only polls both runs' jobs; nobody is sent a third time."""
    _, newer = _two_exports(world, "mirror")
    app.on_blob(world.ctx(), f"{NAME}/export-1.csv")
    world.box.complete_jobs()
    app.on_blob(world.ctx(), f"{NAME}/export-2.csv")
    puts = world.puts()
    for _ in range(3):
        world.jobs_applied()
        app.on_timer(world.ctx())
    assert world.puts() == puts and world.most_sends() == 1  # the second export sent only the 100 who joined
    assert set(world.box.list_emails(world.list_id)) == set(newer)


def test_a_repeated_event_of_an_older_export_does_not_make_it_the_latest(world: World,
                                                                         interrupted_blob_run: Any) -> None:
    _, newer = _two_exports(world, "mirror")
    interrupted_blob_run(f"{NAME}/export-1.csv")
    app.on_blob(world.ctx(), f"{NAME}/export-2.csv")
    assert app.on_blob(world.ctx(), f"{NAME}/export-1.csv")[0]["status"] == "skipped"  # redelivered
    assert world.ctx().state.latest_export(NAME)["source"] == f"{NAME}/export-2.csv"
    for _ in range(4):
        world.jobs_applied()
        app.on_timer(world.ctx())
    world.box.complete_jobs()
    assert set(world.box.list_emails(world.list_id)) == set(newer)


def test_a_refused_resume_gives_its_claim_back(world: World, interrupted_blob_run: Any) -> None:
    """The export runs once the configuration that refused its resume is fixed."""
    run = interrupted_blob_run()
    config_path = world.tmp / "destinations.json"
    config = orjson.loads(config_path.read_bytes())
    config["destinations"][0]["max_profiles"] = 10
    config_path.write_bytes(orjson.dumps(config))
    app.on_timer(world.ctx())
    assert world.record(run["run_id"])["status"] == "refused" and world.puts() == 0
    config["destinations"][0]["max_profiles"] = None
    config_path.write_bytes(orjson.dumps(config))
    for _ in range(2):
        app.on_timer(world.ctx())
        world.jobs_applied()
    assert world.in_list() == world.info.valid_distinct


def test_an_unfinished_run_of_a_replaced_file_is_closed_not_resumed_on_the_new_content(
        world: World, interrupted_blob_run: Any) -> None:
    """Its checkpoint counts rows of the old version: resuming it on the new one would skip rows never sent."""
    _, newer = _two_exports(world, "upsert")
    path = world.tmp / "exports" / NAME / "export-1.csv"
    first = interrupted_blob_run(f"{NAME}/export-1.csv")
    path.write_text("EmailAddress\n" + "\n".join(newer) + "\n", encoding="utf-8")  # a new version, same name
    world.box.hold_jobs()  # an upsert run polls its jobs once at its end: they are pending then
    (second,) = app.on_blob(world.ctx(), f"{NAME}/export-1.csv")
    assert second["run_id"] != first["run_id"] and second["status"] == "submitted"
    puts = world.puts()
    world.jobs_applied()
    app.on_timer(world.ctx())
    closed = world.record(first["run_id"])
    assert closed["status"] == "superseded" and "new version" in closed["note"] and world.puts() == puts
    assert world.record(second["run_id"])["status"] == "completed"

"""What the connector guarantees on incomplete exports and slow jobs (README): each test is a reproduction from
issues 11 and 12 that removed, kept or forgot the wrong people before it was fixed.

Engine, purge and erasure in this process; state and exports in local folders; the sandbox over HTTP on loopback
with jobs that stay pending until the test lets them finish (`box.complete_jobs()`), as SendGrid's take minutes."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox.server import Sandbox, serve
from shared import app, batching, engine, held, purge, report, stream
from shared.config import Destination, load_config
from shared.context import AppContext, Settings
from shared.errors import AuthError
from shared.secrets import EnvSecrets
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.state import StateStore
from shared.storage import LocalFolderStore

KEY = "SG.guarantees-" + "k" * 16 + "." + "s" * 43
SEGMENT = "Members"


def people(n: int, start: int = 0, domain: str = "example.com") -> list[str]:
    return [f"p{i:05d}@{domain}" for i in range(start, start + n)]


class World:
    """One SendGrid account (the sandbox, jobs pending until released), destinations, exports and state in tmp."""

    def __init__(self, box: Sandbox, url: str, tmp: Path) -> None:
        self.box, self.url, self.tmp = box, url, tmp
        self.environ = {"SENDGRID_API_KEY": KEY, "SENDGRID_API_URL": url}
        self.exports = LocalFolderStore(tmp / "exports")
        self.state_root = tmp / "state"
        self.config = tmp / "destinations.json"
        self.destinations: list[dict[str, Any]] = []
        self.lists: dict[str, str] = {}
        self.client_class: type[SendGridClient] = SendGridClient

    def destination(self, name: str, mode: str = "mirror", **extra: Any) -> str:
        list_id = self.box.create_list(name)
        self.lists[name] = list_id
        self.destinations.append({"name": name, "consent": True, "api_key_secret": "sendgrid-api-key",
                                  "list_id": list_id, "segments": [SEGMENT], "mode": mode, "max_profiles": None,
                                  "bulk_threshold": None, "mapping": {"email": "email", "first_name": "first"},
                                  **extra})
        self.config.write_bytes(orjson.dumps({"destinations": self.destinations}))
        return list_id

    def services(self, wait_timeout: float = 30.0) -> engine.Services:
        secrets = EnvSecrets(self.environ)

        def client(dest: Destination) -> SendGridClient:
            return self.client_class(self.url, secrets, dest.api_key_secret,
                                     policy=RetryPolicy(max_attempts=2, backoff_base=0.01))

        return engine.Services(config=load_config(self.config), secrets=secrets,
                               state=StateStore(LocalFolderStore(self.state_root)), sources=self.exports,
                               environ=self.environ, client_factory=client, poll_interval=0.05,
                               wait_timeout=wait_timeout)

    def ctx(self) -> AppContext:
        settings = Settings("exports", "state", str(self.config), 600.0, self.environ)
        return AppContext(settings, self.exports, StateStore(LocalFolderStore(self.state_root)),
                          EnvSecrets(self.environ))

    # -- exports: a CDM folder with one entity, its partitions as CSV without a header ------------------------------
    def cdm(self, version: int, partitions: list[list[str]]) -> str:
        folder = f"v{version}"
        for i, emails in enumerate(partitions):
            rows = "".join(f"{e},{e.split('@')[0]}\n" for e in emails)
            self.exports.write_bytes(f"{folder}/{SEGMENT}/part{i + 1}.csv", rows.encode())
        model = {"name": "export", "version": "1.0", "entities": [{
            "$type": "LocalEntity", "name": SEGMENT,
            "attributes": [{"name": "email", "dataType": "string"}, {"name": "first", "dataType": "string"}],
            "partitions": [{"name": f"part{i + 1}", "location": f"{SEGMENT}/part{i + 1}.csv"}
                           for i in range(len(partitions))]}]}
        self.exports.write_bytes(f"{folder}/model.json", orjson.dumps(model))
        return f"{folder}/model.json"

    def run(self, name: str, source: str, *, wait: bool = True, **svc: Any) -> dict[str, Any]:
        info = self.exports.info(source)
        assert info is not None
        return engine.run(engine.RunRequest(name, source, info.etag, wait=wait), self.services(**svc))

    # -- what SendGrid and the state hold ---------------------------------------------------------------------------
    def in_list(self, name: str) -> set[str]:
        self.box.complete_jobs()
        return set(self.box.list_emails(self.lists[name]))

    def in_account(self, emails: list[str]) -> set[str]:
        self.box.complete_jobs()
        return {e for e in emails if self.box.contact(e) is not None}

    def held(self, name: str) -> set[str]:
        svc = self.services()
        with held.Held(svc.state, name, self.lists[name]).emails() as emails:
            return set(emails)

    def record(self, run_id: str) -> dict[str, Any]:
        record = self.services().state.load_run(run_id)
        assert record is not None
        return record


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    box = Sandbox(api_keys=[KEY], job_delay=3600.0)  # jobs stay pending until the test completes them
    with serve(box) as server:
        yield World(box, server.url, tmp_path)


def _settled(world: World, report: dict[str, Any]) -> dict[str, Any]:
    """Let SendGrid finish and bring a `submitted` run to its end (what the timer does)."""
    while report["status"] == "submitted":
        world.box.complete_jobs()
        report = engine.finish_submitted(report, world.services())
    return report


def _mirror_run(world: World, name: str, source: str) -> dict[str, Any]:
    """A mirror run as the timer sees it through: sent, then finished once SendGrid's jobs are done."""
    return _settled(world, world.run(name, source, wait=False))


# ------------------------------------------------------------------------------------ incomplete exports (issue 11 §2)

MEMBERS = people(477)
PARTS = [MEMBERS[:159], MEMBERS[159:318], MEMBERS[318:]]


def _damage(world: World, source: str, how: str) -> str:
    """Damage partition 2 of an export: gone, emptied, or cut in the middle of a row."""
    key = source.rsplit("/", 1)[0] + f"/{SEGMENT}/part2.csv"
    data = world.exports.read_bytes(key)
    assert data is not None
    if how == "missing":
        world.exports.delete(key)
    elif how == "empty":
        world.exports.write_bytes(key, b"")
    else:
        world.exports.write_bytes(key, data[: len(data) // 2 - 7])
    return key


@pytest.mark.parametrize("how", ["missing", "empty", "cut"])
def test_a_mirror_run_of_an_incomplete_export_removes_nobody_and_adds_what_it_read(world: World, how: str) -> None:
    world.destination("members")
    assert _mirror_run(world, "members", world.cdm(1, PARTS))["status"] == "completed"
    assert world.in_list("members") == set(MEMBERS)
    joiners = people(5, start=1000)
    leavers = MEMBERS[:10]  # in partition 1, which is intact
    source = world.cdm(2, [MEMBERS[10:159] + joiners, PARTS[1], PARTS[2]])
    damaged = _damage(world, source, how)

    report = _mirror_run(world, "members", source)

    assert report["status"] == "completed_with_errors", report
    assert report["mirror"]["guard_rail"] == "refused" and report["mirror"]["files"] == [damaged]
    assert "not read completely" in report["mirror"]["reason"] and report["mirror"]["removed"] == 0
    assert world.in_list("members") == set(MEMBERS) | set(joiners)  # nobody removed; what was read was added
    assert world.held("members") == set(MEMBERS) | set(joiners)  # the new snapshot is the union
    # the next complete export removes who left, and only them
    assert _mirror_run(world, "members", world.cdm(3, [MEMBERS[10:159] + joiners, PARTS[1], PARTS[2]]))[
        "status"] == "completed"
    assert world.in_list("members") == (set(MEMBERS) | set(joiners)) - set(leavers)


def test_rerunning_an_export_after_the_guard_rail_refused_converges_on_it(world: World) -> None:
    """Issue 12 §4: a refused run had already added its export; the same export again removes the old members."""
    world.destination("members")
    old, new = people(1000), people(1000, start=5000)
    assert _mirror_run(world, "members", world.cdm(1, [old]))["status"] == "completed"
    source = world.cdm(2, [new])
    refused = _mirror_run(world, "members", source)
    assert refused["status"] == "failed" and refused["mirror"]["guard_rail"] == "refused"
    assert world.in_list("members") == set(old) | set(new)
    again = _mirror_run(world, "members", source)  # 1,000 of the 2,000 now held: exactly max_removal_fraction
    assert again["status"] == "completed" and again["mirror"]["removed"] == 1000, again
    assert world.in_list("members") == set(new)


# ------------------------------------------------------------------------------- SendGrid's pending jobs (issue 11 §3)


def test_an_erasure_while_the_upsert_is_pending_completes_only_once_the_contact_is_gone(world: World) -> None:
    world.destination("members", mode="upsert")
    report = world.run("members", world.cdm(1, [people(20)]), wait=False)
    assert report["status"] == "submitted"  # the upsert job is pending: search cannot see anyone yet
    person = people(1, start=7)[0]

    first = purge.erase(world.services(), person, wait_seconds=0.2)
    assert first["status"] == "incomplete", first  # not "completed, 0 deleted" while the job could still create it
    assert person in world.held("members")  # nothing forgotten before SendGrid confirms

    world.box.complete_jobs()
    (deleting,) = purge.finish_erasures(world.services(), wait_seconds=0.5)  # the timer's tick
    assert deleting["status"] == "incomplete" and deleting["accounts_deleted"] == 1, deleting  # asked, not applied
    assert person in world.held("members")
    world.box.complete_jobs()  # SendGrid applies the deletion
    (again,) = purge.finish_erasures(world.services(), wait_seconds=0.5)  # the next tick
    assert again["status"] == "completed" and again["not_found"] == 1, again
    assert world.in_account([person]) == set()
    assert person not in world.held("members")
    assert purge.finish_erasures(world.services(), wait_seconds=1.0) == []  # nothing left open
    for path in world.state_root.rglob("*"):
        if path.is_file() and not path.name.endswith(".gz"):
            assert person.encode() not in path.read_bytes(), path  # the open erasure's address is gone


def test_a_second_mirror_run_during_pending_jobs_still_removes_the_leaver(world: World) -> None:
    """Both runs without --wait (as the blob trigger runs them): the leaver's upsert is pending when the second run
    would look it up."""
    world.destination("members")
    first = world.run("members", world.cdm(1, [people(50)]), wait=False)
    second = world.run("members", world.cdm(2, [people(49)]), wait=False)  # p00049 left
    assert (first["status"], second["status"]) == ("submitted", "submitted")

    world.box.complete_jobs()
    done = [engine.finish_submitted(r, world.services()) for r in (first, second)]  # the timer, oldest first
    done = [_settled(world, r) for r in done]
    assert [r["status"] for r in done] == ["completed", "completed"], done
    assert world.in_list("members") == set(people(49))
    assert world.held("members") == set(people(49))


def test_a_removal_that_sendgrid_applies_late_keeps_the_run_open_until_it_is_confirmed(world: World) -> None:
    world.destination("members")
    _mirror_run(world, "members", world.cdm(1, [people(30)]))
    # the 20 who stay are unchanged (nothing to send); the removal of the 10 leavers is asked, and stays pending
    report = world.run("members", world.cdm(2, [people(20)]), wait=False)
    assert report["status"] == "submitted" and report["checkpoint"]["phase"] == "removing", report
    assert world.held("members") >= set(people(30)[20:])  # leavers stay held until their removal is confirmed
    report = engine.finish_submitted(report, world.services())  # the timer: SendGrid has not applied them yet
    assert report["status"] == "submitted" and report["checkpoint"]["phase"] == "removing", report
    report = _settled(world, report)
    assert report["status"] == "completed" and report["mirror"]["removed"] == 10
    assert world.in_list("members") == set(people(20)) == world.held("members")


# ---------------------------------------------------------------------- what a run sent is ours (issue 12 §3)


class _ForbiddenAfter(SendGridClient):
    """SendGrid answers 403 from the Nth upsert on (a key whose scopes were cut mid-run)."""

    accepted = 0
    limit = 3

    def upsert(self, body: bytes) -> str:
        if type(self).accepted >= type(self).limit:
            raise AuthError("403: too many bad requests, temporary block", status=403)
        type(self).accepted += 1
        return super().upsert(body)


@pytest.fixture
def failed_run(world: World, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], list[str]]:
    """An upsert run that had 3 requests (of 1,000 contacts each) accepted, then failed on a 403."""
    world.box.job_delay = 0.05  # SendGrid is quick here: these tests are about what is recorded, not about timing
    world.destination("members", mode="upsert")
    emails = people(5000)
    monkeypatch.setattr(batching, "Packer", functools.partial(batching.Packer, max_count=1000))
    monkeypatch.setattr(_ForbiddenAfter, "accepted", 0)
    world.client_class = _ForbiddenAfter
    report = world.run("members", world.cdm(1, [emails]))
    world.client_class = SendGridClient
    assert report["status"] == "failed" and report["counts"]["sent"] == 3000, report
    return report, emails


def test_erasure_after_a_failed_run_finds_what_that_run_sent(world: World, failed_run: Any, fault_tally: Any) -> None:
    _, emails = failed_run
    person = emails[1234]
    assert world.in_account([person]) == {person}
    report = purge.erase(world.services(), person)
    assert report["status"] == "completed" and report["destinations"] == ["members"], report
    assert world.in_account([person]) == set()
    kept = [e for e in emails[:3000] if e != person]  # what the failed run had sent, but the erased person
    in_account = world.in_account(kept)
    fault_tally.record(scenario="erasure after a run that failed on a 403", faults=1, runs=2, expected=len(kept),
                       in_list=len(in_account), lost=len(kept) - len(in_account))


def test_a_purge_after_a_failed_run_deletes_everything_it_sent(world: World, failed_run: Any) -> None:
    _, emails = failed_run
    record = purge.remove_destination(world.services(), "members", "contacts", confirmed=True)
    assert record["status"] == "completed" and record["counts"]["deleted"] == 3000, record
    assert world.in_account(emails) == set()


def test_erasure_and_purge_after_a_guard_rail_refusal_cover_what_it_added(world: World, fault_tally: Any) -> None:
    world.box.job_delay = 0.05
    world.destination("members")
    old, new = people(1000), people(1000, start=5000)
    _mirror_run(world, "members", world.cdm(1, [old]))
    assert _mirror_run(world, "members", world.cdm(2, [new]))["mirror"]["guard_rail"] == "refused"
    erased = purge.erase(world.services(), new[10])
    assert erased["status"] == "completed" and erased["destinations"] == ["members"], erased
    kept = set(old + new) - {new[10]}  # the refused run removed nobody; only the erased person is gone
    in_list = world.in_list("members")
    assert in_list == kept
    fault_tally.record(scenario="erasure after a mirror run the guard rail refused", faults=1, runs=3,
                       expected=len(kept), in_list=len(in_list & kept), lost=len(kept - in_list))
    record = purge.remove_destination(world.services(), "members", "list")
    assert record["status"] == "completed" and record["counts"]["removed"] == 1999, record
    assert world.in_list("members") == set()


def test_a_run_killed_while_removing_is_finished_by_the_timer(world: World, monkeypatch: pytest.MonkeyPatch,
                                                              fault_tally: Any) -> None:
    """Issue 12 §4: the run stays open with its removal checkpoint, and the timer goes on from there."""
    world.box.job_delay = 0.05
    world.destination("members")
    _mirror_run(world, "members", world.cdm(1, [people(1000)]))
    calls = itertools.count()

    class Killed(BaseException):
        pass

    real = SendGridClient.remove_from_list

    def dies_on_the_third(self: SendGridClient, list_id: str, ids: Any) -> list[str]:
        if next(calls) == 2:
            raise Killed  # the process is gone: no handler runs
        return real(self, list_id, ids)

    monkeypatch.setattr(SendGridClient, "remove_from_list", dies_on_the_third)
    source = world.cdm(2, [people(600)])
    with contextlib.suppress(Killed):
        world.run("members", source)
    monkeypatch.setattr(SendGridClient, "remove_from_list", real)
    (record,) = world.services().state.open_runs()
    assert record["status"] == "running" and record["checkpoint"]["phase"] == "removing"
    assert record["checkpoint"]["removal"]["done"] == 200  # two chunks of 100 were removed

    world.box.complete_jobs()
    (resumed,) = app.on_timer(world.ctx())
    resumed = _settled(world, resumed)
    assert resumed["status"] == "completed" and resumed["run_id"] == record["run_id"], resumed
    in_list, wanted = world.in_list("members"), set(people(600))
    assert in_list == wanted
    fault_tally.record(scenario="killed while removing leavers, finished by the timer", faults=1, runs=2,
                       expected=len(wanted), in_list=len(in_list & wanted), lost=len(wanted - in_list))


# ------------------------------------------------------------- an export seen too early (issue 11 §5)


def _app_world(world: World) -> None:
    world.destination("members", mode="upsert")


def _due(world: World, run_id: str, *, hours_ago: float = 0.0) -> None:
    """Let time pass for a waiting run: its retry is due (and it first waited `hours_ago`)."""
    state = world.services().state
    record = state.load_run(run_id)
    assert record is not None
    record["waiting"]["retry_at"] = 0
    record["waiting"]["since"] -= hours_ago * 3600
    state.save_run(record)


def test_a_model_json_that_lands_before_its_partitions_is_exported_once_they_land(world: World) -> None:
    _app_world(world)
    source = world.cdm(1, [people(40), people(40, start=40)])
    part2 = world.exports.read_bytes(f"v1/{SEGMENT}/part2.csv")
    world.exports.delete(f"v1/{SEGMENT}/part2.csv")

    (waiting,) = app.on_blob(world.ctx(), source)
    assert waiting["status"] == "waiting" and "still being written" in waiting["error"], waiting
    assert world.box.stats["requests"].get("PUT /v3/marketing/contacts", 0) == 0  # nothing sent from half an export
    assert app.on_timer(world.ctx()) == []  # not due yet: nothing happens

    assert part2 is not None
    world.exports.write_bytes(f"v1/{SEGMENT}/part2.csv", part2)
    _due(world, waiting["run_id"])
    world.box.hold_jobs()  # under any profile: the run's jobs are pending when it polls them once at its end
    (done,) = app.on_timer(world.ctx())
    assert done["run_id"] == waiting["run_id"] and done["status"] == "submitted", done
    assert world.in_list("members") == set(people(80))


def test_an_export_that_stays_incomplete_fails_after_six_hours_saying_why(world: World) -> None:
    _app_world(world)
    source = world.cdm(1, [people(10), people(10, start=10)])
    world.exports.delete(f"v1/{SEGMENT}/part2.csv")
    (waiting,) = app.on_blob(world.ctx(), source)
    _due(world, waiting["run_id"], hours_ago=6.5)
    (failed,) = app.on_timer(world.ctx())
    assert failed["status"] == "failed" and "stayed incomplete for 6" in failed["error"], failed
    assert world.services().state.open_runs() == []


def test_an_empty_model_json_is_never_claimed_and_its_content_is_exported_by_the_timer(world: World) -> None:
    """ADLS Gen2: CreateFile (0 bytes) raises an event; if the FlushWithClose one is lost, the timer still runs it."""
    _app_world(world)
    source = world.cdm(1, [people(25)])
    content = world.exports.read_bytes(source)
    world.exports.write_bytes(source, b"")
    assert app.on_blob(world.ctx(), source) == []
    assert not list((world.state_root / "ledger").rglob("*.json")) if (world.state_root / "ledger").exists() else True
    assert content is not None
    world.exports.write_bytes(source, content)  # flushed; its event never comes
    world.box.hold_jobs()  # under any profile: the run's jobs are pending when it polls them once at its end
    (done,) = app.on_timer(world.ctx())
    assert done["status"] == "submitted" and done["counts"]["sent"] == 25, done
    assert world.in_list("members") == set(people(25))


# ------------------------------------------------------------------------- statuses and bounds (issues 11 §6, 12 §6-7)


def test_a_run_that_could_read_no_file_fails(world: World) -> None:
    world.destination("members", mode="upsert")
    source = world.cdm(1, [people(5), people(5, start=5)])
    for n in (1, 2):
        world.exports.delete(f"v1/{SEGMENT}/part{n}.csv")
    report = world.run("members", source)
    assert report["status"] == "failed" and "no file of the export could be read" in report["error"], report
    assert len(report["file_errors"]) == 2


def test_the_rejections_file_is_capped_and_the_rest_counted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "MAX_CSV_ROWS", 7)
    world.destination("members", mode="upsert")
    done = world.run("members", world.cdm(1, [[f"not-an-email-{i}" for i in range(30)] + people(3)]))
    assert done["counts"]["rejected_total"] == 30 and done["counts"]["rejections_omitted"] == 23, done
    data = world.services().state.store.read_bytes(done["rejections_file"])
    assert data is not None and len(data.decode().splitlines()) == 1 + 7


def test_a_replay_that_cannot_fit_the_deadline_fails_after_two_attempts_saying_why(world: World,
                                                                                    monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    """Issue 12 §7: the deadline is checked while reading, and attempts that move nothing do not go on forever."""
    world.destination("members", mode="upsert")
    source = world.cdm(1, [people(1)] + [people(1)] * 30)  # many partitions of the same contact
    reads = itertools.count()

    def deadline_now_and_then(self: stream.Stream, where: str = "before the next request") -> None:
        if where == "while reading the export" and next(reads) % 10 == 5:  # each attempt meets it while reading
            raise engine.DeadlineReached(f"the run's deadline was reached {where}")

    monkeypatch.setattr(stream.Stream, "deadline_check", deadline_now_and_then)
    first = world.run("members", source)
    assert first["status"] == "interrupted" and "while reading the export" in first["error"], first
    second = engine.run(engine.RunRequest("members", resume=first["run_id"]), world.services())
    assert second["status"] == "failed" and "two attempts in a row" in second["error"], second

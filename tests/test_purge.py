"""Purges and erasure (shared.purge) against the SendGrid sandbox over HTTP, with state in a local folder: which
record a purge works on, what a list purge leaves for a later deletion, two callers of one purge, and an erasure
that failed half-way."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared import engine, purge, snapshots
from shared.config import Destination, load_config
from shared.secrets import EnvSecrets
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.state import StateStore
from shared.storage import LocalFolderStore


class World:
    """Destinations on the sandbox, exports from CSV files and a state folder in tmp, all in this process."""

    def __init__(self, sandbox: Any, tmp: Path) -> None:
        self.box, self.tmp = sandbox.box, tmp
        self.environ = {"SENDGRID_API_KEY": sandbox.key, "SENDGRID_API_URL": sandbox.url}
        self.lists: dict[str, str] = {}
        self.destinations: list[dict[str, Any]] = []
        self.config = tmp / "destinations.json"
        self.sources = LocalFolderStore(tmp / "sources")
        self.state_root = tmp / "state"

    def destination(self, name: str, list_id: str | None = None) -> str:
        list_id = list_id or self.box.create_list(name)
        self.lists[name] = list_id
        self.destinations.append({"name": name, "consent": True, "api_key_secret": "sendgrid-api-key",
                                  "list_id": list_id, "segments": [name], "mode": "mirror", "max_profiles": None,
                                  "mapping": {"email": "email", "first_name": "first"}})
        self.config.write_bytes(orjson.dumps({"destinations": self.destinations}))
        return list_id

    def services(self) -> engine.Services:
        """Fresh services, as each invocation (CLI, queue worker, timer) builds its own. Retries are quick so that
        an injected outage ends the call at once."""
        secrets = EnvSecrets(self.environ)

        def client(dest: Destination) -> SendGridClient:
            return SendGridClient(self.environ["SENDGRID_API_URL"], secrets, dest.api_key_secret,
                                  policy=RetryPolicy(max_attempts=2, backoff_base=0.01))

        return engine.Services(config=load_config(self.config), secrets=secrets,
                               state=StateStore(LocalFolderStore(self.state_root)), sources=self.sources,
                               environ=self.environ, client_factory=client, poll_interval=0.05)

    def export(self, name: str, emails: list[str], version: int = 0) -> dict[str, Any]:
        key = f"v{version}/{name}.csv"
        self.sources.write_bytes(key, ("email,first\n" + "".join(f"{e},{e.split('@')[0]}\n" for e in emails)).encode())
        info = self.sources.info(key)
        assert info is not None
        report = engine.run(engine.RunRequest(name, key, info.etag, wait=True), self.services())
        assert report["status"] == "completed", report
        self.box.complete_jobs()
        return report

    def in_list(self, name: str) -> set[str]:
        self.box.complete_jobs()  # list removals and deletions are asynchronous jobs
        return set(self.box.list_emails(self.lists[name]))

    def in_account(self, emails: list[str]) -> set[str]:
        self.box.complete_jobs()
        return {e for e in emails if self.box.contact(e) is not None}

    def snapshot(self, name: str) -> list[str]:
        svc = self.services()
        return list(snapshots.read_snapshot(svc.state.store, svc.state.snapshot_key(name, self.lists[name])))

    def stored(self, run_id: str) -> dict[str, Any]:
        record = self.services().state.load_run(run_id)
        assert record is not None
        return record


@pytest.fixture
def world(sandbox: Any, tmp_path: Path) -> World:
    return World(sandbox, tmp_path)


def people(*names: str) -> list[str]:
    return [f"{n}@example.com" for n in names]


def many(n: int) -> list[str]:
    return [f"p{i:05d}@example.com" for i in range(n)]


def without_jobs(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in counts.items() if k != "jobs"}


# ------------------------------------------------------------------------------------------ which purge is worked on


def test_a_purge_message_runs_the_purge_it_names_not_the_oldest_one(world: World) -> None:
    """Two purges queued (list, then contacts): the message of the second runs the deletion, whatever is older."""
    world.destination("alpha")
    world.export("alpha", people("ann", "bob", "cat"))
    svc = world.services()
    dest = svc.config.destinations["alpha"]
    first = purge.queued_purge(svc.state, dest, "list", by="http")
    time.sleep(0.01)
    second = purge.queued_purge(svc.state, dest, "contacts", by="http")
    # the purge argument is what the caller thought; the record's own kind wins
    done = purge.remove_destination(world.services(), "alpha", "list", confirmed=True, by="http",
                                    run_id=second["run_id"])
    assert (done["run_id"], done["purge"], done["status"]) == (second["run_id"], "contacts", "completed")
    assert done["counts"]["deleted"] == 3
    assert world.in_account(people("ann", "bob", "cat")) == set()
    assert world.stored(first["run_id"])["status"] == "queued"  # untouched: its own message runs it
    again = purge.remove_destination(world.services(), "alpha", "contacts", confirmed=True, run_id=second["run_id"])
    assert again == world.stored(second["run_id"])  # a redelivered message does nothing
    done = purge.remove_destination(world.services(), "alpha", "list", confirmed=True, run_id=first["run_id"])
    assert (done["run_id"], done["purge"], done["status"]) == (first["run_id"], "list", "completed")


def test_a_run_id_that_is_not_an_open_purge_of_the_destination_is_returned_unchanged(world: World) -> None:
    world.destination("alpha")
    world.destination("beta")
    world.export("alpha", people("ann"))
    world.export("beta", people("bob"))
    svc = world.services()
    beta_purge = purge.queued_purge(svc.state, svc.config.destinations["beta"], "list", by="http")
    export_run = svc.state.list_runs("alpha")[0]
    for run_id, expected in ((beta_purge["run_id"], beta_purge), (export_run["run_id"], export_run)):
        assert purge.remove_destination(world.services(), "alpha", "list", run_id=run_id) == expected
    assert world.stored(beta_purge["run_id"])["status"] == "queued"
    assert world.in_list("alpha") == set(people("ann")) and world.in_list("beta") == set(people("bob"))
    assert world.services().state.disabled("alpha") is None  # nothing was done at all


# ------------------------------------------------------------------------------------ list purge, then a deletion


def test_a_deletion_after_a_list_purge_still_deletes_what_the_product_put_there(world: World) -> None:
    world.destination("alpha")
    everyone = people("ann", "bob", "cat")
    world.export("alpha", everyone)
    listed = purge.remove_destination(world.services(), "alpha", "list")
    assert listed["status"] == "completed" and listed["counts"]["removed"] == 3
    assert world.in_list("alpha") == set() and world.in_account(everyone) == set(everyone)
    assert world.snapshot("alpha") == everyone  # kept: the record of what is in the account
    deleted = purge.remove_destination(world.services(), "alpha", "contacts", confirmed=True)
    assert deleted["status"] == "completed" and deleted["counts"]["deleted"] == 3, deleted
    assert world.in_account(everyone) == set()
    assert world.snapshot("alpha") == []  # a completed deletion is the end of it


def test_a_list_purge_does_not_spare_contacts_a_list_purged_destination_held(world: World) -> None:
    """Two destinations on one list, both purged from it: the contacts they shared leave the list too (the first
    purge's kept snapshot must not count as still holding them), and a deletion still spares them."""
    list_id = world.destination("alpha")
    world.destination("beta", list_id)
    world.export("alpha", people("ann", "bob"))
    world.export("beta", people("bob", "cat"))
    assert purge.remove_destination(world.services(), "alpha", "list")["counts"]["removed"] == 1  # ann only
    assert world.in_list("alpha") == set(people("bob", "cat"))
    assert purge.remove_destination(world.services(), "beta", "list")["counts"]["removed"] == 2
    assert world.in_list("beta") == set()
    done = purge.remove_destination(world.services(), "beta", "contacts", confirmed=True)
    assert done["counts"]["deleted"] == 1  # cat: alpha's snapshot still holds bob, its own deletion takes him
    assert world.in_account(people("ann", "bob", "cat")) == set(people("ann", "bob"))


# --------------------------------------------------------------------------------------- two callers of one purge


@pytest.mark.parametrize("by_run_id", [False, True], ids=["open-purge", "run-id"])
def test_the_timer_waits_for_a_running_purge_and_leaves_its_record_and_reason_alone(world: World,
                                                                                    by_run_id: bool) -> None:
    """The queue worker runs a purge; the timer sees it 'running' and calls too. It must not overwrite the admin's
    reason or the live record, and once it has the lease it finds the purge completed and leaves it so."""
    world.destination("alpha")
    everyone = many(600)
    world.export("alpha", everyone)
    svc = world.services()
    svc.state.disable("alpha", by="http", reason="retired by Alice, ticket 42")
    queued = purge.queued_purge(svc.state, svc.config.destinations["alpha"], "list", by="http")
    named: dict[str, Any] = {"run_id": queued["run_id"]} if by_run_id else {}
    world.box.inject({"endpoint": "DELETE /v3/marketing/lists/{id}/contacts", "kind": "slow", "delay": 0.3,
                      "times": 1000})
    worker: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: worker.update(purge.remove_destination(
        world.services(), "alpha", "list", confirmed=True, by="http", **named)))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while (world.stored(queued["run_id"])["checkpoint"].get("removal") or {}).get("done", 0) == 0:  # under way
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        timer = purge.remove_destination(world.services(), "alpha", "list", confirmed=True, by="timer", **named)
    finally:
        thread.join(60)
    assert worker["status"] == "completed" and without_jobs(worker["counts"])["removed"] == 600
    final = world.stored(queued["run_id"])
    assert final["status"] == "completed" and without_jobs(final["counts"]) == without_jobs(worker["counts"])
    assert timer["status"] == "completed" and without_jobs(timer["counts"]) == without_jobs(worker["counts"])
    marker = world.services().state.disabled("alpha")
    assert marker is not None and (marker["by"], marker["reason"]) == ("http", "retired by Alice, ticket 42")
    assert world.in_list("alpha") == set()


def test_a_busy_destination_leaves_the_stored_purge_record_alone(world: World,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    world.destination("alpha")
    world.export("alpha", people("ann", "bob"))
    monkeypatch.setattr(purge, "LEASE_WAIT_SECONDS", 0.2)
    svc = world.services()
    record = purge.queued_purge(svc.state, svc.config.destinations["alpha"], "list", by="http")
    record.update(status="running", started_at=engine.now_iso())  # another process works on it, lease held
    svc.state.save_run(record)
    with svc.state.lease("alpha"):
        busy = purge.remove_destination(world.services(), "alpha", "list", by="timer")
    assert busy == record and world.stored(record["run_id"]) == record
    assert world.in_list("alpha") == set(people("ann", "bob"))


# ---------------------------------------------------------------------------------------------------------- erasure


def test_an_erasure_that_failed_in_sendgrid_finishes_when_run_again(world: World) -> None:
    list_id = world.destination("alpha")
    world.destination("beta", list_id)
    world.export("alpha", people("ann", "bob"))
    world.export("beta", people("bob", "cat"))
    world.box.inject({"endpoint": "POST /v3/marketing/contacts/search/emails", "kind": "503", "times": 2})
    first = purge.erase(world.services(), "Bob@Example.com")
    assert first["status"] == "incomplete" and first["errors"] and first["accounts_deleted"] == 0
    assert world.in_account(people("bob")) == set(people("bob"))
    assert "bob@example.com" in world.snapshot("alpha") and "bob@example.com" in world.snapshot("beta")
    again = purge.erase(world.services(), "bob@example.com")
    assert again["status"] == "completed" and again["errors"] == [], again
    assert again["destinations"] == ["alpha", "beta"] and again["accounts_deleted"] == 1
    assert again["person"] == first["person"]
    assert world.in_account(people("ann", "bob", "cat")) == set(people("ann", "cat"))
    assert world.snapshot("alpha") == people("ann") and world.snapshot("beta") == people("cat")
    for path in world.state_root.rglob("*.json"):
        assert b"bob@example.com" not in path.read_bytes().lower(), path
    assert "bob@example.com" not in orjson.dumps([first, again]).decode().lower()


def test_a_purge_keeps_its_lease_while_sendgrid_answers_slowly(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob lease lapses unrenewed (60 s at most): a purge's lease keeper renews it on its own clock, also while
    one SendGrid call hangs (here a 2.5 s answer against a 2 s lease, renewed every 0.5 s)."""
    from shared import storage

    renewals: list[float] = []
    monkeypatch.setattr(storage._FileLease, "renew", lambda self: renewals.append(time.monotonic()))
    world.destination("alpha")
    world.export("alpha", many(350))
    world.box.inject({"endpoint": "DELETE /v3/marketing/lists/{id}/contacts", "kind": "slow", "delay": 2.5})
    record = purge.remove_destination(dataclasses.replace(world.services(), lease_seconds=2), "alpha", "list")
    assert record["status"] == "completed" and record["counts"]["removed"] == 350
    assert len(renewals) >= 3  # at least the renewals due during the slow answer


def test_a_purge_whose_record_was_taken_over_stops_and_leaves_it_alone(world: World) -> None:
    """Another process saved the purge's record while this one waited on SendGrid (its lease lapsed, the timer
    resumed the purge): this one stops `interrupted` at its next checkpoint and writes nothing more."""
    world.destination("alpha")
    world.export("alpha", many(350))
    arrived, release = threading.Event(), threading.Event()
    original = world.box.op_list_remove

    def held(req: Any) -> Any:  # the first removal stays in flight until the record was taken over
        arrived.set()
        release.wait(30)
        return original(req)

    world.box.op_list_remove = held  # type: ignore[method-assign]
    queued = purge.queued_purge(world.services().state, world.services().config.destinations["alpha"], "list",
                                by="test")
    outcome: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: outcome.append(
        purge.remove_destination(world.services(), "alpha", "list", run_id=queued["run_id"])))
    worker.start()
    try:
        assert arrived.wait(30), "the purge never removed anything"
        other = world.services().state  # the process that took the purge over
        taken = other.load_run(queued["run_id"])
        assert taken is not None
        taken["note"] = "taken over"
        other.save_run(taken)
    finally:
        release.set()
        worker.join(timeout=30)
        del world.box.op_list_remove
    [stopped] = outcome
    assert stopped["status"] == "interrupted" and "saved by another process" in stopped["error"]
    assert world.stored(queued["run_id"]) == taken

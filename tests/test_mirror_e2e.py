"""Mirror mode, removal with purge and erasure, through the CLI against the sandbox over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent


class World:
    """Destinations, exports and a state folder in tmp, driven through `python -m shared`."""

    def __init__(self, sandbox, tmp: Path) -> None:
        self.box, self.tmp = sandbox.box, tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
        self.env.update(SENDGRID_API_KEY=sandbox.key, SENDGRID_API_URL=sandbox.url)
        self.lists: dict[str, str] = {}
        self.destinations: list[dict] = []
        self.config = tmp / "destinations.json"

    def destination(self, name: str, **extra: object) -> str:
        list_id = self.box.create_list(name)
        self.lists[name] = list_id
        self.destinations.append({"name": name, "consent": True, "api_key_secret": "sendgrid-api-key",
                                  "list_id": list_id, "segments": [name], "mode": "mirror", "max_profiles": None,
                                  "mapping": {"email": "email", "first_name": "first"}, **extra})
        self.config.write_bytes(orjson.dumps({"destinations": self.destinations}))
        return list_id

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared", *args, "--config", str(self.config),
                               "--state-dir", str(self.tmp / "state")], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=120)

    def export(self, name: str, emails: list[str], version: int) -> tuple[subprocess.CompletedProcess[str], dict]:
        src = self.tmp / f"v{version}" / f"{name}.csv"
        src.parent.mkdir(exist_ok=True)
        src.write_text("email,first\n" + "".join(f"{e},{e.split('@')[0]}\n" for e in emails), encoding="utf-8")
        report = self.tmp / f"report-{name}-{version}.json"
        res = self.cli("export", "--destination", name, "--source", str(src), "--wait", "--quiet",
                       "--report", str(report))
        return res, orjson.loads(report.read_bytes())

    def in_list(self, name: str) -> set[str]:
        """The list once SendGrid has applied every queued job: list removals are asynchronous (202 + job id) and
        have no documented status call, so the CLI cannot wait for them; the sandbox applies them here instead."""
        self.box.complete_jobs()
        return set(self.box.list_emails(self.lists[name]))


@pytest.fixture
def world(sandbox, tmp_path: Path) -> World:
    return World(sandbox, tmp_path)


def people(*names: str) -> list[str]:
    return [f"{n}@example.com" for n in names]


def test_people_join_leave_and_return_and_the_list_follows(world: World) -> None:
    world.destination("members")
    versions = [people("ann", "bob", "cat", "dan"), people("ann", "bob", "cat", "eve"),
                people("ann", "bob", "cat", "dan", "eve")]
    for version, emails in enumerate(versions):
        res, report = world.export("members", emails, version)
        assert res.returncode == 0, res.stdout + res.stderr
        assert world.in_list("members") == set(emails)
    assert report["mirror"]["guard_rail"] == "allowed"
    second = orjson.loads((world.tmp / "report-members-1.json").read_bytes())
    assert second["mirror"]["to_remove"] == 1 and second["mirror"]["removed"] == 1
    assert world.box.contact("dan@example.com") is not None  # removed from the list, never deleted


def test_a_failed_upsert_run_removes_nobody(world: World) -> None:
    world.destination("members")
    world.export("members", people("ann", "bob", "cat", "dan"), 0)
    world.box.inject({"endpoint": "job", "kind": "failed", "times": 1})
    res, report = world.export("members", people("ann", "bob", "cat", "eve"), 1)  # eve's upsert job fails
    assert res.returncode == 1 and report["status"] == "failed" and "mirror" not in report
    assert "dan@example.com" in world.in_list("members")
    res, report = world.export("members", people("ann", "bob", "cat"), 2)  # the next good run diffs the old snapshot
    assert res.returncode == 0 and report["mirror"]["removed"] == 1
    assert world.in_list("members") == set(people("ann", "bob", "cat"))


def test_guard_rail_stops_an_empty_or_half_size_export(world: World) -> None:
    world.destination("members")
    ten = people(*"abcdefghij")
    world.export("members", ten, 0)
    res, report = world.export("members", [], 1)
    assert res.returncode == 1 and report["mirror"]["guard_rail"] == "refused"
    assert "max_removal_fraction" in report["error"] and world.in_list("members") == set(ten)
    res, report = world.export("members", ten[:4], 2)  # 60% would leave
    assert res.returncode == 1 and "max_removal_fraction" in report["error"] and report["mirror"]["to_remove"] == 6
    assert world.in_list("members") == set(ten)
    world.destinations[0]["max_removal_fraction"] = 1.0
    world.config.write_bytes(orjson.dumps({"destinations": world.destinations}))
    res, report = world.export("members", ten[:4], 3)
    assert res.returncode == 0 and report["mirror"]["removed"] == 6 and world.in_list("members") == set(ten[:4])


def test_purge_of_one_destination_leaves_another_destinations_contacts_alone(world: World) -> None:
    world.destination("alpha")
    world.destination("beta")
    world.export("alpha", people("ann", "bob", "cat"), 0)
    world.export("beta", people("bob", "cat", "dan"), 0)
    res = world.cli("remove", "--destination", "alpha", "--purge", "contacts")
    assert res.returncode == 2 and "confirm" in res.stderr  # deleting needs an explicit yes
    res = world.cli("remove", "--destination", "alpha", "--purge", "contacts", "--yes")
    assert res.returncode == 0, res.stdout + res.stderr
    world.box.complete_jobs()  # deletions are asynchronous jobs
    assert world.box.contact("ann@example.com") is None  # only alpha held ann: deleted
    for shared_person in people("bob", "cat", "dan"):
        assert world.box.contact(shared_person) is not None
    assert world.in_list("beta") == set(people("bob", "cat", "dan"))
    res, report = world.export("alpha", people("ann"), 1)
    assert res.returncode == 1 and "disabled" in report["error"]  # removed destinations never run again
    res = world.cli("enable", "--destination", "alpha")  # until an admin enables them
    assert res.returncode == 0 and "was disabled at" in res.stdout, res.stdout + res.stderr
    res, report = world.export("alpha", people("ann"), 2)
    assert res.returncode == 0 and "ann@example.com" in world.in_list("alpha"), report
    assert world.box.contact("ann@example.com") is not None
    assert world.cli("enable", "--destination", "nobody").returncode == 2


def test_purge_list_empties_only_that_list(world: World) -> None:
    world.destination("alpha")
    world.destination("beta")
    world.export("alpha", people("ann", "bob"), 0)
    world.export("beta", people("bob", "cat"), 0)
    res = world.cli("remove", "--destination", "alpha", "--purge", "list")
    assert res.returncode == 0, res.stdout + res.stderr
    assert world.in_list("alpha") == set() and world.in_list("beta") == set(people("bob", "cat"))
    assert world.box.contact("ann@example.com") is not None  # removed from the list, not deleted


def test_erasure_removes_one_person_everywhere_and_logs_no_address(world: World) -> None:
    world.destination("alpha")
    world.destination("beta")
    world.export("alpha", people("ann", "bob"), 0)
    world.export("beta", people("bob", "cat"), 0)
    res = world.cli("erase", "--email", "Bob@Example.com")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bob@example.com" not in (res.stdout + res.stderr).lower()
    assert "alpha" in res.stdout and "beta" in res.stdout
    world.box.complete_jobs()
    assert world.box.contact("bob@example.com") is None
    assert world.box.contact("ann@example.com") is not None and world.box.contact("cat@example.com") is not None
    for path in (world.tmp / "state").rglob("*"):
        if path.is_file() and path.suffix in (".json",):
            assert b"bob@example.com" not in path.read_bytes().lower(), path
    # the person is gone from the snapshots too: the next mirror run of beta does not try to remove them again
    res, report = world.export("beta", people("cat"), 1)
    assert res.returncode == 0 and report["mirror"]["to_remove"] == 0

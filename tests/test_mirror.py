"""Mirror mode against the real sandbox over loopback HTTP: the guard rail, removing the contacts that left the
segment (join/leave/return), resume, chunking, not-found and invalid addresses, deletion, purge and erasure."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import requests

from sandbox.server import Sandbox, serve
from shared import limits
from shared.mirror import (
    JOBS_KEPT,
    PASS_WAIT_FIRST,
    RemovalPlan,
    delete_emails,
    erasure_hash,
    new_passes,
    plan_removal,
    remove_emails,
    until_confirmed,
)
from shared.secrets import EnvSecrets
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.snapshots import (
    EmailSorter,
    count_sorted,
    diff_sorted,
    filter_out,
    list_snapshots,
    read_snapshot,
    snapshot_size,
    subtract_sorted,
    write_snapshot,
)
from shared.storage import LocalFolderStore

SEARCH = "POST /v3/marketing/contacts/search/emails"
LIST_REMOVE = "DELETE /v3/marketing/lists/{id}/contacts"
CONTACTS_DELETE = "DELETE /v3/marketing/contacts"


class Recorder:
    """Every request the client's session really sent (method, URL, body), via a requests response hook."""

    def __init__(self) -> None:
        self.sent: list[requests.PreparedRequest] = []

    def hook(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.sent.append(resp.request)

    def searched(self) -> list[list[str]]:
        return [orjson.loads(r.body)["emails"] for r in self.sent if r.url.endswith("/contacts/search/emails")]

    def deletes(self) -> list[tuple[str, list[str]]]:
        out = []
        for r in self.sent:
            if r.method == "DELETE":
                query = parse_qs(urlsplit(r.url).query)
                out.append((r.url, (query.get("contact_ids") or query.get("ids"))[0].split(",")))
        return out


def make_client(url: str, key: str, recorder: Recorder | None = None, cls: type = SendGridClient) -> SendGridClient:
    session = requests.Session()
    if recorder is not None:
        session.hooks["response"].append(recorder.hook)
    policy = RetryPolicy(max_attempts=2, backoff_base=0.0, connect_timeout=2.0, read_timeout=5.0)
    return cls(url, EnvSecrets({"SENDGRID_API_KEY": key}), "sendgrid-api-key", policy=policy, session=session)


@pytest.fixture
def api(sandbox: Any) -> Iterator[tuple[Any, SendGridClient, Recorder]]:
    recorder = Recorder()
    client = make_client(sandbox.url, sandbox.key, recorder)
    yield sandbox, client, recorder
    client.close()


def upsert(client: SendGridClient, box: Sandbox, emails: Iterable[str], list_id: str | None = None) -> None:
    emails = list(emails)
    for i in range(0, len(emails), 1_000):
        body: dict[str, Any] = {"contacts": [{"email": e} for e in emails[i : i + 1_000]]}
        if list_id:
            body["list_ids"] = [list_id]
        client.upsert(orjson.dumps(body))
    box.complete_jobs()


def requests_of(box: Sandbox, template: str) -> int:
    return box.stats["requests"].get(template, 0)


def people(ids: Iterable[int]) -> list[str]:
    return [f"p{i:04d}@example.com" for i in ids]


# ----------------------------------------------------------------------------------------------------- guard rail


def test_plan_allows_up_to_exactly_the_fraction() -> None:
    assert plan_removal(1_000, 600, 500, 0.5) == RemovalPlan(500, 1_000, 600, True, None)
    refused = plan_removal(1_000, 499, 501, 0.5)
    assert not refused.allowed and refused.to_remove == 501
    assert "max_removal_fraction" in refused.reason and "501" in refused.reason and "1,000" in refused.reason
    assert "500" in refused.reason  # the most it allows
    assert plan_removal(10, 3, 7, 0.7).allowed  # 0.7 is 7/10, not the binary float just below it
    assert not plan_removal(10, 2, 8, 0.7).allowed
    assert not plan_removal(3, 2, 1, 0.3).allowed  # 33% > 30%: at most 0 of 3
    assert plan_removal(5_000_000, 4_000_000, 1_000_000, 0.2).allowed


def test_plan_empty_export_and_edges() -> None:
    empty = plan_removal(250, 0, 250, 0.5)
    assert not empty.allowed
    assert "no valid contacts" in empty.reason and "max_removal_fraction" in empty.reason and "1.0" in empty.reason
    assert not plan_removal(250, 0, 250, 0.99).allowed
    assert plan_removal(250, 0, 250, 1.0).allowed  # 1.0 allows any removal, an empty export too
    assert plan_removal(0, 0, 0, 0.5).allowed  # first run, nothing to compare
    assert plan_removal(0, 800, 0, 0.1).allowed
    assert plan_removal(800, 800, 0, 0.1).allowed
    for bad in ((10, 5, 11, 0.5), (0, 5, 1, 0.5), (10, -1, 1, 0.5)):
        with pytest.raises(ValueError, match="impossible"):
            plan_removal(*bad)
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_removal_fraction"):
            plan_removal(10, 5, 1, fraction)


# -------------------------------------------------------------------------------------------- the mirror cycle


def mirror_sync(client: SendGridClient, box: Sandbox, store: LocalFolderStore, list_id: str, export: list[str],
                tmp_path: Path, max_fraction: float = 0.5) -> dict[str, Any] | RemovalPlan:
    """What the engine does in mirror mode: upsert the export, diff it against the last snapshot, check the guard
    rail, remove the leavers, advance the snapshot."""
    key = f"snapshots/dest/{list_id}.gz"
    upsert(client, box, export, list_id)
    with EmailSorter(chunk_size=64, tmp_dir=tmp_path) as current:
        for email in export:
            current.add(email)
        current_count = count_sorted(current.sorted_unique())
        removal = count_sorted(diff_sorted(read_snapshot(store, key), current.sorted_unique()))
        plan = plan_removal(snapshot_size(store, key), current_count, removal, max_fraction)
        if not plan.allowed:
            return plan
        counts = remove_emails(client, list_id, diff_sorted(read_snapshot(store, key), current.sorted_unique()))
        box.complete_jobs()
        write_snapshot(store, key, current.sorted_unique())
    return counts


def test_join_leave_return_leaves_the_list_equal_to_the_export(api, tmp_path: Path) -> None:
    running, client, _ = api
    box = running.box
    store = LocalFolderStore(tmp_path / "state")
    list_id = box.create_list("segment")
    upsert(client, box, ["manual@example.com"], list_id)  # added by someone else: in no snapshot, never removed

    exports = [
        people(range(0, 200)),
        people(range(50, 250)),  # 50 leave, 50 join
        people([*range(0, 30), *range(100, 300)]),  # 30 return, 50 more leave, 50 more join
    ]
    expected_removed = [0, 50, 50]
    for export, removed in zip(exports, expected_removed, strict=True):
        counts = mirror_sync(client, box, store, list_id, export, tmp_path)
        assert isinstance(counts, dict)
        assert counts["requested"] == counts["removed"] == removed and counts["not_found"] == 0
        assert box.list_emails(list_id) == sorted({*export, "manual@example.com"})
    leaver = box.contact("p0060@example.com")
    assert leaver is not None and leaver["list_ids"] == []  # removed from the list, not deleted
    assert box.contact("p0010@example.com")["list_ids"] == [list_id]  # left, then returned

    # the guard rail: an empty export and a big drop remove nothing
    before = box.list_emails(list_id)
    for export in ([], people(range(0, 40))):
        plan = mirror_sync(client, box, store, list_id, export, tmp_path)
        assert isinstance(plan, RemovalPlan) and not plan.allowed and "max_removal_fraction" in plan.reason
    assert box.list_emails(list_id) == sorted({*before, *people(range(0, 40))})
    assert requests_of(box, LIST_REMOVE) == 2  # only the two allowed syncs removed anything


def test_not_found_and_invalid_are_counted_not_errors(api) -> None:
    running, client, _ = api
    box = running.box
    list_id = box.create_list("segment")
    long_email = "l" * 60 + "@" + "d" * 80 + ".com"  # upserts take it; the search refuses over 100 characters
    upsert(client, box, [*people(range(5)), long_email], list_id)
    client.delete_contacts([client.search_contacts(["p0003@example.com"])["p0003@example.com"].id])
    box.complete_jobs()
    gone = sorted([*people(range(5)), "ghost@example.com", long_email])
    counts = remove_emails(client, list_id, gone)
    box.complete_jobs()
    assert counts["requested"] == 7
    assert counts["removed"] == 4
    assert counts["not_found"] == 2  # the deleted one and the one never there
    assert counts["invalid"] == 1
    assert box.list_emails(list_id) == [long_email]

    # a chunk SendGrid knows nothing of: the search answers 404 and no removal is sent
    before = requests_of(box, LIST_REMOVE)
    counts = remove_emails(client, list_id, ["ghost1@example.com", "ghost2@example.com"])
    assert counts == {"requested": 2, "removed": 0, "not_found": 2, "not_in_list": 0, "invalid": 0, "jobs": [],
                      "job_count": 0}
    assert requests_of(box, LIST_REMOVE) == before


def test_chunks_stay_within_search_and_url_limits(api) -> None:
    running, client, recorder = api
    box = running.box
    list_id = box.create_list("segment")
    emails = people(range(1_000))
    upsert(client, box, emails, list_id)
    recorder.sent.clear()
    counts = remove_emails(client, list_id, emails)
    box.complete_jobs()
    assert counts["removed"] == 1_000 and box.list_emails(list_id) == []
    searched = recorder.searched()
    assert len(searched) == 10 and all(len(chunk) <= limits.MAX_SEARCH_EMAILS for chunk in searched)
    assert sorted(e for chunk in searched for e in chunk) == emails
    deletes = recorder.deletes()
    assert len(deletes) == 10
    for url, ids in deletes:
        assert len(ids) <= limits.MAX_IDS_PER_DELETE
        assert len(url.encode()) < limits.MAX_URL_BYTES < 8_192
    assert counts["job_count"] == 10 and len(counts["jobs"]) == 10


def test_resume_sends_nothing_for_the_part_already_done(api) -> None:
    running, client, recorder = api
    box = running.box
    list_id = box.create_list("segment")
    emails = people(range(250))
    upsert(client, box, emails, list_id)
    checkpoints: list[tuple[int, dict[str, Any]]] = []

    class Crash(Exception):
        pass

    def crash_after_first(done: int, counts: dict[str, Any]) -> None:
        checkpoints.append((done, json.loads(json.dumps(counts))))  # what a checkpoint would store
        raise Crash

    with pytest.raises(Crash):
        remove_emails(client, list_id, iter(emails), on_progress=crash_after_first)
    box.complete_jobs()
    done, saved = checkpoints[-1]
    assert done == 100 and saved["removed"] == 100
    assert box.list_emails(list_id) == emails[100:]

    searches, removals = requests_of(box, SEARCH), requests_of(box, LIST_REMOVE)
    recorder.sent.clear()
    positions: list[int] = []
    counts = remove_emails(client, list_id, iter(emails), start=done, counts=saved,
                           on_progress=lambda n, c: positions.append(n))
    box.complete_jobs()
    assert positions == [200, 250]
    assert requests_of(box, SEARCH) - searches == 2 and requests_of(box, LIST_REMOVE) - removals == 2
    assert not set(emails[:100]) & {e for chunk in recorder.searched() for e in chunk}
    assert counts["requested"] == counts["removed"] == 250 and counts["job_count"] == 3
    assert box.list_emails(list_id) == []

    # a start past the end sends nothing at all
    recorder.sent.clear()
    assert remove_emails(client, list_id, emails, start=10_000)["requested"] == 0
    assert recorder.sent == []


def test_contact_deleted_between_search_and_removal(sandbox: Any) -> None:
    box = sandbox.box

    class DeletedMeanwhile(SendGridClient):
        victim: str | None = "p0001@example.com"

        def search_contacts(self, emails):  # type: ignore[no-untyped-def]
            found = super().search_contacts(emails)
            if self.victim in found:  # someone deletes the contact right after our search
                super().delete_contacts([found[self.victim].id])
                box.complete_jobs()
                self.victim = None
            return found

    client = make_client(sandbox.url, sandbox.key, cls=DeletedMeanwhile)
    list_id = box.create_list("segment")
    upsert(client, box, people(range(3)), list_id)
    counts = remove_emails(client, list_id, people(range(3)))
    box.complete_jobs()
    assert (counts["removed"], counts["not_found"]) == (2, 1)
    assert box.list_emails(list_id) == []
    assert box.stats["status_counts"].get("404", 0) >= 1  # the refused removal really happened
    client.close()


def test_jobs_kept_are_bounded_to_the_newest(api) -> None:
    running, client, _ = api
    box = running.box
    list_id = box.create_list("segment")
    carried = [f"old-{i:03d}" for i in range(500)]  # an interrupted attempt's job ids, oldest first
    counts = remove_emails(client, list_id, [], counts={"requested": 5, "removed": 5, "jobs": carried,
                                                        "job_count": 500})
    assert counts["requested"] == 5 and counts["job_count"] == 500
    assert counts["not_found"] == counts["not_in_list"] == counts["invalid"] == 0  # not carried: none yet
    assert counts["jobs"] == carried[-100:]  # the newest 100 are kept: the oldest jobs are the settled ones

    emails = people(range(250))
    upsert(client, box, emails, list_id)
    counts = remove_emails(client, list_id, emails, counts={"requested": 5, "removed": 5, "jobs": carried,
                                                            "job_count": 500})
    new = counts["jobs"][-3:]  # three chunks of 100, one removal job each, appended after the carried ones
    assert len(counts["jobs"]) == JOBS_KEPT and counts["job_count"] == 503
    assert counts["jobs"][:-3] == carried[-(JOBS_KEPT - 3):] and not set(new) & set(carried) and all(new)


def test_a_negative_start_is_refused(api) -> None:
    _, client, recorder = api
    with pytest.raises(ValueError, match="start must not be negative"):
        remove_emails(client, "some-list", people(range(3)), start=-1)
    assert recorder.sent == []


@pytest.fixture
def slow_jobs() -> Iterator[tuple[Sandbox, SendGridClient]]:
    """A sandbox whose jobs stay pending until the test lets them finish (`complete_jobs()`), as SendGrid's take
    minutes: a removal is not seen by the next search until then."""
    key = "SG.slow-" + "k" * 16 + "." + "s" * 43
    box = Sandbox(api_keys=[key], job_delay=3600.0)
    with serve(box) as server:
        client = make_client(server.url, key)
        yield box, client
        client.close()


def test_removal_passes_go_on_until_one_finds_nobody_left(slow_jobs: tuple[Sandbox, SendGridClient]) -> None:
    box, client = slow_jobs
    list_id = box.create_list("segment")
    emails = people(range(5))
    upsert(client, box, emails, list_id)
    passes, saved, pauses = new_passes(), [], []
    assert passes == {"pass": 1, "done": 0, "counts": None, "first": None}

    def pause(seconds: float) -> None:  # SendGrid applies the removals only after the second pause
        pauses.append(seconds)
        if len(pauses) == 2:
            box.complete_jobs()

    done = until_confirmed(functools.partial(remove_emails, client, list_id), "removed", lambda: emails, passes,
                           checkpoint=lambda: saved.append(dict(passes)), until=time.monotonic() + 3600, pause=pause)
    assert done is True and passes["confirmed"] is True and passes["pass"] == 3
    assert pauses == [PASS_WAIT_FIRST, 2 * PASS_WAIT_FIRST]  # the wait doubles between passes
    assert passes["first"]["removed"] == 5 and passes["last"] == 0  # the first pass's counts are what the run reports
    assert saved[-1] == passes and box.list_emails(list_id) == []


def test_removal_passes_stop_when_the_next_would_start_too_late(slow_jobs: tuple[Sandbox, SendGridClient]) -> None:
    box, client = slow_jobs
    list_id = box.create_list("segment")
    emails = people(range(5))
    upsert(client, box, emails, list_id)
    passes, pauses = new_passes(), []
    done = until_confirmed(functools.partial(remove_emails, client, list_id), "removed", lambda: emails, passes,
                           checkpoint=lambda: None, until=time.monotonic() - 1, pause=pauses.append)
    assert done is False and "confirmed" not in passes and pauses == []
    assert passes["pass"] == 2 and passes["done"] == 0 and passes["counts"] is None  # the next pass starts afresh
    assert passes["first"]["removed"] == 5


# ---------------------------------------------------------------------------------------------- delete and purge


def test_delete_emails_deletes_contacts_entirely(api) -> None:
    running, client, _ = api
    box = running.box
    list_id = box.create_list("segment")
    upsert(client, box, people(range(10)), list_id)
    counts = delete_emails(client, people(range(3, 6)))
    box.complete_jobs()
    assert (counts["requested"], counts["deleted"], counts["not_found"]) == (3, 3, 0)
    assert counts["not_in_list"] == counts["invalid"] == 0  # no list here: nothing is "not in the list"
    assert all(box.contact(e) is None for e in people(range(3, 6)))
    assert box.contact_count() == 7
    assert box.list_emails(list_id) == people([*range(3), *range(6, 10)])


def test_purge_never_touches_contacts_other_snapshots_hold(api, tmp_path: Path) -> None:
    running, client, _ = api
    box = running.box
    store = LocalFolderStore(tmp_path / "state")
    list_a, list_b = box.create_list("a"), box.create_list("b")
    upsert(client, box, people(range(0, 100)), list_a)
    upsert(client, box, people(range(50, 150)), list_b)
    write_snapshot(store, f"snapshots/dest-a/{list_a}.gz", people(range(0, 100)))
    write_snapshot(store, f"snapshots/dest-b/{list_b}.gz", people(range(50, 150)))

    mine = f"snapshots/dest-a/{list_a}.gz"
    others = [k for k in list_snapshots(store) if not k.startswith("snapshots/dest-a/")]
    counts = delete_emails(client, subtract_sorted(read_snapshot(store, mine), *(read_snapshot(store, k)
                                                                                for k in others)))
    box.complete_jobs()
    assert counts["deleted"] == 50
    assert all(box.contact(e) is None for e in people(range(0, 50)))
    assert box.list_emails(list_b) == people(range(50, 150))  # shared contacts survive, still in list b
    assert box.list_emails(list_a) == people(range(50, 100))

    counts = remove_emails(client, list_a, read_snapshot(store, mine))  # purge by removal from the list
    box.complete_jobs()
    assert (counts["removed"], counts["not_found"]) == (50, 50)
    assert box.list_emails(list_a) == [] and box.contact_count() == 100


# -------------------------------------------------------------------------------------------------------- erasure


def test_erasure_hash() -> None:
    salt = b"s" * 32
    h = erasure_hash("Erase.Me@Example.com ", salt)
    assert h == erasure_hash("erase.me@example.com", salt) and len(h) == 32 and int(h, 16) >= 0
    assert h != erasure_hash("erase.me@example.com", b"other salt")
    assert h != erasure_hash("erase.mf@example.com", salt)
    assert "erase" not in h
    assert len(erasure_hash("x@y.io", b"k" * 200)) == 32  # salts longer than BLAKE2b's key are hashed first
    with pytest.raises(ValueError, match="salt"):
        erasure_hash("x@y.io", b"")


def test_erasure_logs_name_no_address(sandbox: Any, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Remove a person from every snapshot and delete them in two accounts, with every logger at DEBUG: nothing
    logged, returned or raised names the address."""
    caplog.set_level(logging.DEBUG)
    person = "Erase.Me@Example.com"
    email = person.lower()
    store = LocalFolderStore(tmp_path / "state")
    second_key = "SG.second-" + "k" * 40
    with serve(Sandbox([second_key], job_delay=0.0)) as second_server:
        accounts = [(sandbox.box, make_client(sandbox.url, sandbox.key)),
                    (second_server.sandbox, make_client(second_server.url, second_key))]
        for n, (box, client) in enumerate(accounts):
            list_id = box.create_list("segment")
            members = sorted([email, *people(range(n, n + 5))])
            upsert(client, box, members, list_id)
            write_snapshot(store, f"snapshots/dest-{n}/{list_id}.gz", members)
        caplog.clear()

        erased_from = [key for key in list_snapshots(store) if filter_out(store, key, person)]
        reports = [delete_emails(client, [email]) for _, client in accounts]
        for box, client in accounts:
            box.complete_jobs()
            assert box.contact(email) is None and box.contact_count() == 5
            client.close()
    assert len(erased_from) == 2
    assert all(email not in read_snapshot(store, key) for key in erased_from)
    assert [r["deleted"] for r in reports] == [1, 1]
    assert any("/v3/marketing/contacts" in r.getMessage() for r in caplog.records)  # the logs were captured
    logged = caplog.text.lower()
    assert "erase.me" not in logged and "erase%2eme" not in logged
    assert "erase.me" not in json.dumps(reports).lower()

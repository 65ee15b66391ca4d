"""jobs.poll_jobs against the sandbox over HTTP: every job gets its own status, several calls at a time."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from sandbox.server import Sandbox, serve
from shared import jobs
from shared.record import Job, RunRecord, Status
from shared.secrets import EnvSecrets
from shared.sendgrid import SendGridClient

KEY = "SG.jobs-test-" + "k" * 40


class _Counting(Sandbox):
    """Counts the requests waiting out their latency at the same moment (each connection is served in a thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy = self.most_busy = 0
        self._busy_lock = threading.Lock()

    def pause(self) -> None:
        with self._busy_lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            super().pause()
        finally:
            with self._busy_lock:
                self.busy -= 1


@pytest.fixture
def account() -> Any:
    # latency: each answer waits, so calls that are made together overlap in the sandbox
    with serve(_Counting([KEY], job_delay=0.0, latency=0.05)) as server:
        client = SendGridClient(server.url, EnvSecrets({"SENDGRID_API_KEY": KEY}), "sendgrid-api-key")
        yield server.sandbox, client
        client.close()


def _record(job_list: list[Job]) -> RunRecord:
    return RunRecord("20260101T000000Z-00000000", "segment", Status.SUBMITTED, jobs=job_list)


def _jobs(box: Sandbox, client: SendGridClient, count: int, failing: set[int]) -> list[Job]:
    list_id = box.create_list("segment")
    jobs = []
    for n in range(count):
        if n in failing:
            box.inject({"endpoint": "job", "kind": "failed", "times": 1})
        body = orjson.dumps({"list_ids": [list_id], "contacts": [{"email": f"person{n}@example.com"}]})
        jobs.append(Job(client.upsert(body), 1))
    return jobs


def test_every_job_gets_its_own_status(account: Any) -> None:
    box, client = account
    failing = {3, 11, 17}
    record = _record(_jobs(box, client, 20, failing))
    box.most_busy = 0  # (the upserts went one by one)
    assert jobs.poll_jobs(record, client, SimpleNamespace(wait_timeout=60.0, poll_interval=0.05), wait=True)
    statuses = [job.status for job in record.jobs]
    assert statuses == ["failed" if n in failing else "completed" for n in range(20)]
    for job in record.jobs:
        assert job.status == box.job(job.id)["status"]
        assert job.results is not None and job.results["requested_count"] == 1
    assert jobs.outcome(record) == ("completed_with_errors", None) and record.counts.not_applied == len(failing)
    assert 1 < box.most_busy <= jobs.POLL_CONCURRENCY  # a sweep asks several at a time, never more than that


def test_a_sweep_without_wait_leaves_the_run_submitted_and_asks_only_for_open_jobs(account: Any) -> None:
    box, client = account
    record = _record(_jobs(box, client, 1, set()))
    box.job_delay = 60.0  # the next job stays pending
    record.jobs += _jobs(box, client, 1, set())
    svc = SimpleNamespace(wait_timeout=60.0, poll_interval=0.05)
    assert not jobs.poll_jobs(record, client, svc, wait=False)
    assert [job.status for job in record.jobs] == ["completed", "pending"]
    asked = box.stats["requests"].get("GET /v3/marketing/contacts/imports/{id}", 0)
    assert not jobs.poll_jobs(record, client, svc, wait=False)
    assert box.stats["requests"]["GET /v3/marketing/contacts/imports/{id}"] == asked + 1  # the open job only

"""Requests in flight (issue 16): several senders, one checkpoint (the contiguous prefix of settled requests), one
rate limit that pauses every sender. The SIGKILL contract with 2 and 4 in flight is in test_faults.py."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox.server import Sandbox, serve
from shared import batching, engine, sending, stream
from shared.config import load_config
from shared.secrets import EnvSecrets
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.state import StateStore
from shared.storage import LocalFolderStore

KEY = "SG.inflight-" + "k" * 20 + "." + "s" * 43
PUT = "PUT /v3/marketing/contacts"
PEOPLE = [f"p{i:05d}@example.com" for i in range(3000)]


def _run(box: Sandbox, url: str, tmp: Path, in_flight: int, *, run_id: str | None = None) -> dict[str, Any]:
    list_id = box.create_list(f"members-{in_flight}")
    (tmp / "exports").mkdir(exist_ok=True)
    (tmp / "exports" / "people.csv").write_text("email\n" + "\n".join(PEOPLE) + "\n", encoding="utf-8")
    config = tmp / f"destinations-{in_flight}.json"
    config.write_bytes(orjson.dumps({"destinations": [{
        "name": f"members-{in_flight}", "consent": True, "api_key_secret": "sendgrid-api-key", "list_id": list_id,
        "segments": ["people"], "mapping": {"email": "email"}, "max_profiles": None, "bulk_threshold": None,
        "max_in_flight": in_flight}]}))
    environ = {"SENDGRID_API_KEY": KEY}
    secrets = EnvSecrets(environ)
    svc = engine.Services(config=load_config(config), secrets=secrets,
                          state=StateStore(LocalFolderStore(tmp / f"state-{in_flight}")),
                          sources=LocalFolderStore(tmp / "exports"), environ=environ, poll_interval=0.05,
                          client_factory=lambda d: SendGridClient(url, secrets, d.api_key_secret,
                                                                  policy=RetryPolicy(max_attempts=3)))
    info = svc.sources.info("people.csv")
    assert info is not None
    report = engine.run(engine.RunRequest(f"members-{in_flight}", "people.csv", info.etag, wait=True, run_id=run_id),
                        svc)
    box.complete_jobs()
    report["list"] = sorted(box.list_emails(list_id))
    return report


@pytest.fixture
def small_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests of 100 contacts: 30 requests from 3,000 people, so several are in flight at once."""
    monkeypatch.setattr(batching, "Packer", functools.partial(batching.Packer, max_count=100))


@pytest.fixture
def sandbox_box() -> Iterator[tuple[Sandbox, str]]:
    box = Sandbox(api_keys=[KEY], job_delay=0.01, latency=0.02)  # answers take a while: senders overlap
    with serve(box) as server:
        yield box, server.url


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_every_contact_is_sent_once_in_order_whatever_is_in_flight(sandbox_box: Any, tmp_path: Path,
                                                                    small_requests: None, in_flight: int) -> None:
    box, url = sandbox_box
    report = _run(box, url, tmp_path, in_flight)
    assert report["status"] == "completed" and report["counts"]["sent"] == 3000
    assert report["list"] == PEOPLE and report["requests"]["count"] == 30
    assert report["checkpoint"]["contacts_done"] == 3000
    assert [j["done"] for j in report["jobs"]] == list(range(100, 3001, 100))  # committed in stream order


class _Arrivals(Sandbox):
    """Notes when each upsert arrives (the sandbox's monotonic clock) and which one was answered 429."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []

    def op_upsert(self, req: Any) -> Any:
        self.arrivals.append(time.monotonic())
        return super().op_upsert(req)


def test_a_429_pauses_every_sender(tmp_path: Path, small_requests: None) -> None:
    """One upsert is answered 429 with Retry-After: 2 while four senders are busy: none of them sends another
    upsert until the two seconds have passed (the requests already on their way are answered as usual)."""
    box = _Arrivals(api_keys=[KEY], job_delay=0.01, latency=0.02)
    box.inject({"endpoint": PUT, "kind": "429", "times": 1, "retry_after": 2})
    with serve(box) as server:
        report = _run(box, server.url, tmp_path, 4)
    assert report["status"] == "completed" and report["list"] == PEOPLE and report["requests"]["rate_limited"] == 1
    first = box.arrivals[0]  # the others sent with the one answered 429 (which never reached the operation)
    paused = [round(t - first, 3) for t in box.arrivals if 0.5 < t - first < 1.9]
    assert paused == [], f"upserts sent while the rate limit paused every sender: {paused}"
    assert len(box.arrivals) == 30 and max(b - a for a, b in itertools.pairwise(box.arrivals)) >= 1.9


def test_polling_beside_four_senders_keeps_its_connections(tmp_path: Path, small_requests: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The job poller's 8 status calls and 4 senders share one client: its pool keeps a connection for each, so none
    is opened and dropped (urllib3 logs "Connection pool is full" then, a WARNING on a run that succeeds)."""
    monkeypatch.setattr(stream, "POLL_WHILE_SENDING_S", 0.02)  # polled while sending, many jobs still pending
    box = Sandbox(api_keys=[KEY], job_delay=1.0, latency=0.02)
    with serve(box) as server:
        report = _run(box, server.url, tmp_path, 4)
    assert report["status"] == "completed" and report["list"] == PEOPLE
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
# --------------------------------------------------------------------------------- sending.send_in_flight on its own


def _senders() -> int:
    return sum(t.name.startswith("sendgrid-sender-") for t in threading.enumerate())


@pytest.mark.parametrize(("in_flight", "senders"), [(1, 1), (3, 3), (0, 1)])
def test_as_many_senders_as_requests_in_flight_and_at_least_one(in_flight: int, senders: int) -> None:
    seen: list[int] = []
    committed: list[int] = []
    between: list[int] = []

    def send(item: int) -> int:
        seen.append(_senders())
        return item * 10

    sending.send_in_flight(iter(range(7)), send, committed.append, in_flight=in_flight,
                           between=lambda: between.append(1))
    assert set(seen) == {senders}  # every sender is started before the first item is handed on
    assert committed == [i * 10 for i in range(7)]  # in work order, whatever finished first
    assert len(between) == 7  # `between` runs each time an item is handed on
    assert _senders() == 0


def test_a_failure_stops_the_work_and_is_raised_once_every_sender_stopped() -> None:
    handed: list[int] = []

    def work() -> Iterator[int]:
        for i in range(100):
            handed.append(i)
            yield i

    def send(item: int) -> int:
        if item == 2:
            raise RuntimeError("boom")
        return item

    with pytest.raises(RuntimeError, match="boom"):
        sending.send_in_flight(work(), send, lambda _: None, in_flight=1, between=lambda: None)
    assert len(handed) < 100 and _senders() == 0


@pytest.mark.parametrize("in_flight", [1, 2])
def test_handed_all_runs_once_the_work_is_read_while_the_last_requests_are_out(in_flight: int) -> None:
    """The last request waits until handed_all has run: it ran after every item was handed on, before that request
    came back (else this would time out), exactly once; a failed run never calls it."""
    handed_all = threading.Event()
    calls: list[int] = []
    committed: list[int] = []

    def send(item: int) -> int:
        if item == 4:
            assert handed_all.wait(10), "handed_all did not run while the last request was out"
        return item

    def on_handed_all() -> None:
        calls.append(len(committed))
        handed_all.set()

    sending.send_in_flight(iter(range(5)), send, committed.append, in_flight=in_flight, handed_all=on_handed_all)
    assert len(calls) == 1 and calls[0] < 5 and committed == [0, 1, 2, 3, 4]

    def fail(item: int) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sending.send_in_flight(iter(range(5)), fail, committed.append, in_flight=in_flight,
                               handed_all=lambda: calls.append(-1))
    assert -1 not in calls

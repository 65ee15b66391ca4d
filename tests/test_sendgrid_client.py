"""The SendGrid HTTP client against the real local sandbox over loopback HTTP.

Waits never pass for real (except in the pacing test): the client's `sleep` is a recorder that advances a virtual
monotonic clock, so a 30 s rate-limit reset costs nothing and the recorded waits are what the client asked for. The
wall clock stays real, so X-RateLimit-Reset headers from the sandbox are read against the same clock that wrote them.
Every test is also checked for key leaks: the keys it used must not appear in log records, in raised exceptions
(with their tracebacks) or in repr(client).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import random
import secrets
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import requests

from sandbox.server import Sandbox, serve
from shared import USER_AGENT, limits
from shared import sendgrid as sendgrid_module
from shared.errors import (
    AuthError,
    ConfigError,
    DeadlineReached,
    PayloadRejected,
    RateLimited,
    SendGridError,
    TransientError,
)
from shared.secrets import EnvSecrets, Secret
from shared.sendgrid import InvalidContacts, RetryPolicy, SendGridClient, base_url_for
from tests.conftest import QuietJsonHandler, loopback_server

SECRET_NAME = "sendgrid-api-key"
ENV_VAR = "SENDGRID_API_KEY"
FIELDS = "GET /v3/marketing/field_definitions"
UPSERT = "PUT /v3/marketing/contacts"
SEARCH = "POST /v3/marketing/contacts/search/emails"
LIST_REMOVE = "DELETE /v3/marketing/lists/{id}/contacts"
CONTACTS_DELETE = "DELETE /v3/marketing/contacts"
UPLOAD = "PUT /_sandbox/uploads/{job_id}"


def new_key() -> str:
    return "SG." + secrets.token_urlsafe(16) + "." + secrets.token_urlsafe(32)


# ------------------------------------------------------------------------------------------------------ harness


class Clock:
    """The client's clock. Virtual (default): a wait is recorded and moves monotonic time on, without sleeping.
    Real: the wait is recorded and slept (capped), for tests that need the sandbox's own clock to move."""

    def __init__(self, events: list[tuple[Any, ...]], real: bool = False, real_cap: float = 2.5) -> None:
        self.events, self.real, self.real_cap = events, real, real_cap
        self.offset = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.events.append(("wait", seconds))
        if self.real:
            time.sleep(min(seconds, self.real_cap))
        else:
            self.offset += seconds


@dataclass(frozen=True)
class Sent:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None


class RecordingSession(requests.Session):
    """A real requests.Session that also remembers what went on the wire (prepared requests) and what came back."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.events = events
        self.sent: list[Sent] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        body = request.body if isinstance(request.body, bytes | type(None)) else b"<stream>"
        self.sent.append(Sent(str(request.method), str(request.url), dict(request.headers), body))
        self.events.append(("send", request.method, request.url))
        resp = super().send(request, **kwargs)
        self.events.append(("answer", resp.status_code, dict(resp.headers)))
        return resp

    def to(self, fragment: str) -> list[Sent]:
        return [s for s in self.sent if fragment in s.url]


class CachingEnvSecrets(EnvSecrets):
    """Like the Key Vault provider: `get` serves the cached value; `refresh` re-reads it (and is counted)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self._cache: dict[str, Secret] = {}
        self.refreshes = 0

    def get(self, name: str) -> Secret:
        if name not in self._cache:
            self._cache[name] = super().get(name)
        return self._cache[name]

    def refresh(self, name: str) -> Secret:
        self.refreshes += 1
        self._cache[name] = super().refresh(name)
        return self._cache[name]


class MaxRandom(random.Random):
    """Jitter that always takes the top of the range: shows the backoff caps themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class LeakWatch:
    """Keys a test used, and every text that must not contain them."""

    keys: set[str] = field(default_factory=set, repr=False)
    texts: list[str] = field(default_factory=list)
    clients: list[SendGridClient] = field(default_factory=list)

    @contextlib.contextmanager
    def raises(self, exc_type: type[BaseException]) -> Iterator[pytest.ExceptionInfo[Any]]:
        with pytest.raises(exc_type) as info:
            yield info
        self.texts.append("".join(traceback.format_exception(info.value)))
        self.texts.append(repr(info.value))


def fast_policy(**overrides: Any) -> RetryPolicy:
    values: dict[str, Any] = {"max_attempts": 4, "backoff_base": 0.5, "backoff_max": 4.0, "max_rate_limit_wait": 120.0,
                              "max_single_wait": 120.0, "connect_timeout": 2.0, "read_timeout": 5.0}
    return RetryPolicy(**{**values, **overrides})


@dataclass
class Api:
    box: Sandbox
    url: str
    key: str = field(repr=False)
    env: dict[str, str] = field(repr=False)
    clock: Clock
    session: RecordingSession
    events: list[tuple[Any, ...]]
    watch: LeakWatch

    def client(self, *, secrets_provider: Any = None, rng: random.Random | None = None,
               **policy: Any) -> SendGridClient:
        client = SendGridClient(self.url, secrets_provider or EnvSecrets(self.env), SECRET_NAME,
                                policy=fast_policy(**policy), session=self.session,
                                sleep=self.clock.sleep, rng=rng or random.Random(1))
        self.watch.clients.append(client)
        return client

    def stats(self) -> dict[str, Any]:
        return settled_stats(self.box, len(self.session.sent))

    def requests_to(self, endpoint: str) -> int:
        return self.stats()["requests"].get(endpoint, 0)

    def statuses(self) -> dict[str, int]:
        return self.stats()["status_counts"]


def settled_stats(box: Sandbox, sent: int) -> dict[str, Any]:
    """The sandbox's stats once it has recorded all `sent` requests: it records each one just after answering it,
    so a client can read the stats a moment before its last request is counted."""
    give_up = time.monotonic() + 5.0
    while True:
        stats = box.stats
        if sum(stats["requests"].values()) >= sent or time.monotonic() > give_up:
            return stats
        time.sleep(0.002)


@pytest.fixture
def watch(caplog: pytest.LogCaptureFixture) -> Iterator[LeakWatch]:
    caplog.set_level(logging.DEBUG)
    w = LeakWatch()
    yield w
    # (at teardown caplog.text holds the teardown phase only: take the records of the setup and call phases)
    formatter = logging.Formatter("%(name)s %(message)s")
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    corpus = [*(formatter.format(r) for r in records), *w.texts, *(repr(c) for c in w.clients),
              *(str(c) for c in w.clients)]
    leaked = [i for i, text in enumerate(corpus) if any(k in text for k in w.keys)]
    assert not leaked, "an API key appeared in a log record, an exception or a repr"


@pytest.fixture
def api(sandbox: Any, watch: LeakWatch, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    events: list[tuple[Any, ...]] = []
    clock = Clock(events)
    monkeypatch.setattr(sendgrid_module, "time", SimpleNamespace(time=time.time, monotonic=clock.monotonic,
                                                                 sleep=clock.sleep))
    session = RecordingSession(events)
    watch.keys.add(sandbox.key)
    yield Api(sandbox.box, sandbox.url, sandbox.key, {ENV_VAR: sandbox.key}, clock, session, events, watch)
    session.close()


def add_contacts(api: Api, count: int, list_id: str | None = None) -> list[str]:
    """Upsert `count` contacts through the client and let the sandbox apply them; returns their emails."""
    emails = [f"person{i:04d}@example.com" for i in range(count)]
    body = {"contacts": [{"email": e} for e in emails], **({"list_ids": [list_id]} if list_id else {})}
    api.client().upsert(orjson.dumps(body))
    api.box.complete_jobs()
    return emails


def ids_in(url: str, param: str) -> list[str]:
    return [i for v in parse_qs(urlsplit(url).query).get(param, []) for i in v.split(",") if i]


# --------------------------------------------------------------------------------------------------- base URL


def test_region_picks_the_official_host_without_an_override() -> None:
    assert base_url_for("global", {}) == limits.GLOBAL_BASE_URL
    assert base_url_for("eu", {}) == limits.EU_BASE_URL
    assert base_url_for("eu", {"SENDGRID_API_URL": "   "}) == limits.EU_BASE_URL


@pytest.mark.parametrize(("override", "expected"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ("http://localhost", "http://localhost"),
    ("http://[::1]:9000", "http://[::1]:9000"),
    ("https://api.sendgrid.com", "https://api.sendgrid.com"),
    ("https://API.SendGrid.com/", "https://api.sendgrid.com"),
    ("https://api.eu.sendgrid.com", "https://api.eu.sendgrid.com"),
])
def test_override_accepted_for_loopback_and_official_https(override: str, expected: str) -> None:
    assert base_url_for("global", {"SENDGRID_API_URL": override}) == expected


KEY_IN_URL = "SG.fixed-key-in-url-test.Zm9yLXBhcmFtZXRyaXplLWlkcy10aGF0LWFyZS1zdGFibGU"  # stable test ids


@pytest.mark.parametrize("override", [
    "http://api.sendgrid.com",  # official host, but the key would cross the network in clear
    "http://10.0.0.5",
    "https://evil.example.com",
    "https://api.sendgrid.com.evil.example.com",
    "http://localhost.evil.example.com",
    "http://127.0.0.1@evil.example.com",  # userinfo trick: the host is evil.example.com
    "ftp://127.0.0.1",
    "api.sendgrid.com",
    f"https://evil.example.com/?key={KEY_IN_URL}",
    f"http://10.0.0.5/{KEY_IN_URL}",
    f"http://{KEY_IN_URL}@10.0.0.5/",
    f"http://user:{KEY_IN_URL}@127.0.0.1:8080",  # a loopback URL carrying credentials would show them in repr
    f"https://api.sendgrid.com/#{KEY_IN_URL}",
], ids=lambda url: url.replace(KEY_IN_URL, "KEY"))
def test_override_refused_elsewhere_and_never_echoes_a_key(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        base_url_for("global", {"SENDGRID_API_URL": override})
    assert info.value.field == "SENDGRID_API_URL"
    assert KEY_IN_URL not in str(info.value)
    assert KEY_IN_URL.lower() not in str(info.value).lower()


# ------------------------------------------------------------------------------------------------- happy paths


def test_upsert_returns_a_job_and_import_status_reports_it(api: Api) -> None:
    list_id = api.box.create_list("newsletter")
    body = orjson.dumps({"list_ids": [list_id], "contacts": [{"email": "a@example.com"},
                                                             {"email": "B@Example.com", "first_name": "Bea"}]})
    client = api.client()

    job_id = client.upsert(body)

    assert uuid.UUID(job_id) and api.box.job(job_id) is not None
    status = client.import_status(job_id)
    assert status.id == job_id
    assert status.status in ("pending", "completed")
    assert status.job_type == "upsert_contacts"
    assert status.results["requested_count"] == 2
    api.box.complete_jobs()
    done = client.import_status(job_id)
    assert done.status == "completed" and done.results["created_count"] == 2
    assert api.box.list_emails(list_id) == ["a@example.com", "b@example.com"]
    put = api.session.to("/v3/marketing/contacts")[0]
    assert put.method == "PUT" and put.body == body
    assert put.headers["Content-Type"] == "application/json" and put.headers["Accept"] == "application/json"
    assert put.headers["User-Agent"] == USER_AGENT
    sent_key = put.headers["Authorization"] == f"Bearer {api.key}"
    assert sent_key  # (not compared in an assert message, which would print the key)
    assert client.stats["bytes_sent"] == len(body) and client.stats["retries"] == 0


def test_get_list_returns_the_list_or_none_when_missing(api: Api) -> None:
    list_id = api.box.create_list("vip")
    client = api.client()
    assert client.get_list(list_id)["name"] == "vip"
    assert client.get_list(str(uuid.uuid4())) is None
    assert client.get_list("x/contacts/count") is None  # an id never changes the path it goes to
    assert api.session.sent[-1].url.endswith("/v3/marketing/lists/x%2Fcontacts%2Fcount")


def test_field_definitions_lists_reserved_and_custom_fields(api: Api) -> None:
    field_id = api.box.create_field("loyalty_tier", "Text")
    defs = api.client().field_definitions()
    assert {"id": field_id, "name": "loyalty_tier", "field_type": "Text"} in defs["custom_fields"]
    assert "email" in {f["name"] for f in defs["reserved_fields"]}


def test_lists_asks_for_the_largest_page(api: Api) -> None:
    made = {api.box.create_list(f"list {i}"): f"list {i}" for i in range(3)}
    assert {item["id"]: item["name"] for item in api.client().lists()} == made
    sent = api.session.to("/v3/marketing/lists")
    assert len(sent) == 1 and parse_qs(urlsplit(sent[0].url).query) == {"page_size": ["1000"]}


def test_lists_reads_every_page_through_the_clients_own_base_url(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "LISTS_PAGE_SIZE", 100)  # an account holds at most 1,000 lists: smaller pages show it
    made = {api.box.create_list(f"list {i:03d}"): f"list {i:03d}" for i in range(234)}
    add_contacts(api, 3, next(iter(made)))
    found = api.client().lists()
    assert {item["id"]: item["name"] for item in found} == made and len(found) == len(made)
    assert found[0]["contact_count"] == 3 and set(found[0]) == {"id", "name", "contact_count"}
    pages = api.session.to("/v3/marketing/lists")
    assert all(s.url.startswith(api.url + "/v3/marketing/lists?") for s in pages)
    assert [parse_qs(urlsplit(s.url).query).get("page_token") for s in pages] == [None, ["100"], ["200"]]


class LoopingListsSandbox(Sandbox):
    """Answers every page of lists with the same next page, as a broken proxy might; its next URLs point elsewhere."""

    def op_lists_get(self, req: Any) -> Any:
        status, body = super().op_lists_get(req)
        body["_metadata"]["next"] = "https://elsewhere.example/v3/marketing/lists?page_size=1000&page_token=7"
        return status, body


def test_lists_stops_on_a_page_token_that_comes_back_and_never_follows_a_foreign_url(watch: LeakWatch) -> None:
    key = new_key()
    watch.keys.add(key)
    box = LoopingListsSandbox(api_keys=[key], job_delay=0.05)
    box.create_list("only")
    with serve(box) as server:
        session = RecordingSession([])
        client = SendGridClient(server.url, EnvSecrets({ENV_VAR: key}), SECRET_NAME, policy=fast_policy(),
                                session=session)
        watch.clients.append(client)
        with watch.raises(SendGridError) as info:
            client.lists()
    assert "came back twice" in str(info.value)
    assert len(session.sent) == 2 and all(s.url.startswith(server.url) for s in session.sent)


def test_unknown_job_and_unknown_list_are_payload_rejections(api: Api) -> None:
    client = api.client()
    with api.watch.raises(PayloadRejected) as info:
        client.import_status(str(uuid.uuid4()))
    assert info.value.status == 404
    with api.watch.raises(PayloadRejected) as info:
        client.upsert(orjson.dumps({"list_ids": ["no-such-list"], "contacts": [{"email": "a@example.com"}]}))
    assert info.value.status == 404 and not isinstance(info.value, InvalidContacts)
    assert api.clock.waits == []  # a 4xx is not retried


# ------------------------------------------------------------------------------------------------- rate limits


def test_429_waits_until_the_reset_header_then_succeeds(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "429", "reset_after": 30})
    client = api.client()

    defs = client.field_definitions()

    assert "reserved_fields" in defs
    assert len(api.clock.waits) == 1  # and the pacer does not wait a second time for the same reset
    # reset = ceil(now + 30) in Unix seconds, so the wait is 30 to 31 s (plus a small margin), never capped here
    assert 29.5 < api.clock.waits[0] < 31.5
    assert api.statuses() == {"429": 1, "200": 1}
    assert client.stats["rate_limited"] == 1 and client.stats["retries"] == 0


@pytest.mark.parametrize(("fault", "policy", "expected"), [
    ({"retry_after": 7, "reset_after": 30}, {}, 7.0),  # Retry-After wins over the reset header
    ({"reset_after": 500}, {"max_single_wait": 60.0}, 60.0),  # a far-away reset is capped
    ({"retry_after": 0}, {}, 0.05),  # "retry now" still pauses a little
])
def test_429_wait_honours_retry_after_and_caps(api: Api, fault: dict[str, Any], policy: dict[str, Any],
                                              expected: float) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "429", **fault})
    api.client(**policy).field_definitions()
    assert api.clock.waits == [pytest.approx(expected)]


@pytest.mark.parametrize(("retry_after", "low", "high"), [
    (30, 28.9, 30.0),  # an HTTP date 30 s ahead (whole seconds, so 29 to 30 s from now); the reset would be ~1 s
    (-3600, 0.05, 0.05),  # a date in the past: no more than the pause every 429 gets, not the reset
], ids=["future", "past"])
def test_429_with_retry_after_as_an_http_date(api: Api, retry_after: int, low: float, high: float) -> None:
    when = formatdate(time.time() + retry_after, usegmt=True)
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": when, "reset_after": 1})
    api.client().field_definitions()
    assert len(api.clock.waits) == 1 and low - 1e-9 <= api.clock.waits[0] <= high + 1e-9
    assert api.statuses() == {"429": 1, "200": 1}


def test_429_with_a_retry_after_that_is_not_ascii_digits_falls_back_to_the_reset(api: Api) -> None:
    """"²" passes str.isdigit() but float("²") raises: it must not escape from the client as a ValueError."""
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": "²", "reset_after": 30})
    api.client().field_definitions()
    assert len(api.clock.waits) == 1 and 29.5 < api.clock.waits[0] < 31.5


def test_429s_do_not_spend_the_attempts_kept_for_errors(api: Api) -> None:
    """Three 429s and a 503 on a budget of two error attempts: the call goes through. (One budget for both, or the
    two swapped, would give up at the second 429.)"""
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 1, "times": 3})
    api.box.inject({"endpoint": FIELDS, "kind": "503"})
    client = api.client(max_attempts=2, backoff_base=0.5, rng=MaxRandom())
    assert "reserved_fields" in client.field_definitions()
    assert api.clock.waits == [1.0, 1.0, 1.0, 0.5]
    assert client.stats["rate_limited"] == 3 and client.stats["retries"] == 1


def test_error_backoff_does_not_spend_the_seconds_kept_for_429s(api: Api) -> None:
    """3.5 s of backoff for three 503s, then a 1 s 429, with 1 s of patience for 429s: the call goes through. (Backoff
    counted as rate-limit waiting, or the budgets swapped, would give up.)"""
    api.box.inject({"endpoint": FIELDS, "kind": "503", "times": 3})
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 1})
    client = api.client(max_attempts=4, backoff_base=0.5, backoff_max=4.0, max_rate_limit_wait=1.0, rng=MaxRandom())
    assert "reserved_fields" in client.field_definitions()
    assert api.clock.waits == [0.5, 1.0, 2.0, 1.0]


def test_a_429_between_two_errors_does_not_give_the_errors_a_fresh_budget(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "503"})
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 1})
    api.box.inject({"endpoint": FIELDS, "kind": "503", "times": 5})
    with api.watch.raises(TransientError) as info:
        api.client(max_attempts=2).field_definitions()
    assert info.value.status == 503 and "503 from SendGrid 2 times; giving up" in str(info.value)
    assert api.statuses() == {"503": 2, "429": 1}


def test_a_503_that_says_when_to_come_back_is_believed(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "503", "retry_after": 3})
    client = api.client(backoff_base=0.5, rng=MaxRandom())
    assert "reserved_fields" in client.field_definitions()
    assert api.clock.waits == [3.0] and client.stats["retries"] == 1


def test_429_storm_longer_than_the_patience_raises_rate_limited(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 6, "times": 50})
    client = api.client(max_rate_limit_wait=20.0, max_attempts=2)

    with api.watch.raises(RateLimited) as info:
        client.field_definitions()

    assert info.value.status == 429
    assert api.clock.waits == [6.0, 6.0, 6.0]  # a fourth wait would pass 20 s
    # 429s do not spend the attempt budget (2): four requests were made
    assert api.requests_to(FIELDS) == 4


def test_429_storm_with_retry_after_zero_ends_instead_of_spinning(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 0, "times": 1000})
    client = api.client(max_rate_limit_wait=0.5)
    with api.watch.raises(RateLimited):
        client.field_definitions()
    assert api.clock.waits and all(w > 0 for w in api.clock.waits)
    assert api.requests_to(FIELDS) <= 11


def test_rate_limit_wait_that_would_pass_the_deadline_stops_the_run(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "429", "reset_after": 30})
    client = api.client()
    client.deadline = api.clock.monotonic() + 10
    with api.watch.raises(DeadlineReached):
        client.field_definitions()
    assert api.clock.waits == []


def test_pacing_waits_for_the_reset_after_remaining_zero(watch: LeakWatch) -> None:
    """A real rate limit (2 calls a window): after an answer saying 0 remain, the next call waits before it sends,
    and so never earns a 429. Waits here are slept for real (about a second), as the sandbox's clock must move."""
    key = new_key()
    watch.keys.add(key)
    box = Sandbox(api_keys=[key], rate_limit=2, rate_window=0.25)
    events: list[tuple[Any, ...]] = []
    clock = Clock(events, real=True)
    with serve(box) as server, RecordingSession(events) as session:
        client = SendGridClient(server.url, EnvSecrets({ENV_VAR: key}), SECRET_NAME, policy=fast_policy(),
                                session=session, sleep=clock.sleep)
        watch.clients.append(client)
        for _ in range(5):
            client.field_definitions()
            if clock.waits:
                break
        else:
            client.field_definitions()
        client.close()
        stats = settled_stats(box, len(session.sent))

    assert stats["responses_429"] == 0
    first_wait = next(i for i, e in enumerate(events) if e[0] == "wait")
    before, after = events[first_wait - 1], events[first_wait + 1]
    assert before[0] == "answer" and before[2]["X-RateLimit-Remaining"] == "0"
    assert after[0] == "send"  # the wait came first, then the call
    assert 0 < events[first_wait][1] <= 2.1


# ------------------------------------------------------------------------------- several threads, one client


def test_a_429_pauses_every_thread_of_the_client_until_its_wait_is_over(api: Api,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread "first" earns a 429 that carries only Retry-After: 5 (no X-RateLimit-* headers, as a front proxy
    answers). Thread "second" calls the same endpoint while "first" is still waiting: it waits too, then sends,
    instead of earning a 429 of its own. The clock is virtual: "first" holds its wait until "second" is done."""
    api.box.inject({"endpoint": FIELDS, "kind": "429", "retry_after": 5, "rate_headers": False})
    seen: list[tuple[str, Any]] = []
    lock = threading.Lock()
    first_waits, second_done = threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:
        name = threading.current_thread().name
        with lock:
            seen.append((name, seconds))
        if name == "first":
            first_waits.set()
            second_done.wait(timeout=30)
        with lock:
            api.clock.offset += seconds

    real_send = api.session.send

    def send(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        with lock:
            seen.append((threading.current_thread().name, "send"))
        resp = real_send(request, **kwargs)
        with lock:
            seen.append((threading.current_thread().name, resp.status_code))
        return resp

    monkeypatch.setattr(api.session, "send", send)
    client = SendGridClient(api.url, EnvSecrets(api.env), SECRET_NAME, policy=fast_policy(), session=api.session,
                            sleep=sleep, rng=random.Random(1))
    api.watch.clients.append(client)
    outcomes: dict[str, Any] = {}

    def call(name: str, done: threading.Event | None = None) -> None:
        try:
            outcomes[name] = "reserved_fields" in client.field_definitions()
        except Exception as exc:  # reported by the assertion below
            outcomes[name] = exc
        finally:
            if done is not None:
                done.set()

    first = threading.Thread(target=call, args=("first",), name="first")
    first.start()
    assert first_waits.wait(timeout=30)
    second = threading.Thread(target=call, args=("second", second_done), name="second")
    second.start()
    second.join(timeout=30)
    first.join(timeout=30)

    assert outcomes == {"first": True, "second": True}
    assert api.statuses() == {"429": 1, "200": 2}
    second_seen = [what for name, what in seen if name == "second"]
    assert len(second_seen) == 3 and second_seen[1:] == ["send", 200]  # it waited first, then sent once
    assert 0 < second_seen[0] <= 5.0
    assert [what for name, what in seen if name == "first"] == ["send", 429, 5.0, "send", 200]


def test_two_threads_sharing_a_client_stay_within_the_rate_limit(watch: LeakWatch) -> None:
    """A real limit of 2 calls per window and two threads sending through one client: an answer's
    X-RateLimit-Remaining does not count the other thread's call still in flight, so each thread going by its own
    answers overspends the window. The client counts calls in flight and waits for the reset instead: no 429 at
    all. Waits are slept for real (the sandbox's clock must move); nothing here measures time."""
    key = new_key()
    watch.keys.add(key)
    box = Sandbox(api_keys=[key], rate_limit=2, rate_window=1.0)
    with serve(box) as server:
        client = SendGridClient(server.url, EnvSecrets({ENV_VAR: key}), SECRET_NAME, policy=fast_policy())
        watch.clients.append(client)
        start = threading.Barrier(2)
        outcomes: list[Any] = []

        def sender() -> None:
            start.wait(timeout=30)
            try:
                for _ in range(4):
                    outcomes.append("reserved_fields" in client.field_definitions())
            except Exception as exc:  # reported by the assertion below
                outcomes.append(exc)

        threads = [threading.Thread(target=sender) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        client.close()
        stats = settled_stats(box, 8)

    assert outcomes == [True] * 8
    assert stats["responses_429"] == 0 and client.stats["rate_limited"] == 0
    assert stats["requests"][FIELDS] == 8 == client.stats["requests"]
    assert client.stats["waited_seconds"] > 0  # 8 calls do not fit in one window of 2: the client waited


# ---------------------------------------------------------------------------------------- 5xx, resets, timeouts


@pytest.mark.parametrize("kind", ["500", "503"])
def test_5xx_burst_shorter_than_the_budget_succeeds_with_growing_backoff(api: Api, kind: str) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": kind, "times": 4})
    client = api.client(max_attempts=5, backoff_base=0.5, backoff_max=1.5, rng=MaxRandom())

    assert "reserved_fields" in client.field_definitions()

    assert api.clock.waits == [0.5, 1.0, 1.5, 1.5]  # caps: base * 2^(n-1), up to backoff_max
    assert client.stats["retries"] == 4
    assert api.statuses() == {kind: 4, "200": 1}


def test_backoff_is_jittered_within_its_caps(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "503", "times": 6})
    api.client(max_attempts=7, backoff_base=0.5, backoff_max=4.0, rng=random.Random(7)).field_definitions()
    caps = [min(4.0, 0.5 * 2**i) for i in range(6)]
    assert len(api.clock.waits) == 6
    assert all(0 <= w <= cap for w, cap in zip(api.clock.waits, caps, strict=True))
    assert len(set(api.clock.waits)) == 6 and api.clock.waits != caps


@pytest.mark.parametrize("kind", ["500", "503"])
def test_5xx_burst_longer_than_the_budget_raises_transient(api: Api, kind: str) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": kind, "times": 20})
    with api.watch.raises(TransientError) as info:
        api.client(max_attempts=3).field_definitions()
    assert info.value.status == int(kind)
    assert api.requests_to(FIELDS) == 3
    assert len(api.clock.waits) == 2


def test_dropped_connections_are_retried(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "reset", "times": 2})
    client = api.client(max_attempts=3)
    assert "reserved_fields" in client.field_definitions()
    assert client.stats["retries"] == 2 and len(api.clock.waits) == 2
    assert api.requests_to(FIELDS) == 3


def test_connections_dropped_every_time_raise_transient(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "reset", "times": 10})
    with api.watch.raises(TransientError) as info:
        api.client(max_attempts=3).field_definitions()
    assert "connection failed 3 times" in str(info.value)
    assert api.requests_to(FIELDS) == 3


def test_an_upsert_dropped_after_processing_is_resent(api: Api) -> None:
    """SendGrid may have accepted a request whose answer was lost: the client resends it (upserts are idempotent)."""
    api.box.inject({"endpoint": UPSERT, "kind": "reset", "processed": True})
    job_id = api.client().upsert(orjson.dumps({"contacts": [{"email": "a@example.com"}]}))
    api.box.complete_jobs()
    assert api.stats()["jobs_created"] == 2 and api.box.job(job_id)["status"] == "completed"
    assert api.box.contact_count() == 1


def test_slow_answer_beyond_the_read_timeout_is_retried(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "slow", "delay": 1.0})
    client = api.client(read_timeout=0.25, max_attempts=2)
    assert "reserved_fields" in client.field_definitions()
    assert client.stats["retries"] == 1 and len(api.clock.waits) == 1


def test_slow_answers_every_time_raise_transient(api: Api) -> None:
    api.box.inject({"endpoint": FIELDS, "kind": "slow", "delay": 1.0, "times": 2})
    with api.watch.raises(TransientError) as info:
        api.client(read_timeout=0.25, max_attempts=2).field_definitions()
    assert "timed out 2 times" in str(info.value)


# ------------------------------------------------------------------------------------------------------- auth


def test_401_after_rotation_rereads_the_key_once_and_goes_on(api: Api) -> None:
    env = dict(api.env)
    provider = CachingEnvSecrets(env)
    client = api.client(secrets_provider=provider)
    client.field_definitions()
    rotated = new_key()
    api.watch.keys.add(rotated)
    api.box.rotate_keys([rotated])
    env[ENV_VAR] = rotated

    client.field_definitions()  # the cached key earns a 401; the re-read key works
    client.field_definitions()  # and is used from then on

    assert provider.refreshes == 1
    assert api.statuses() == {"200": 3, "401": 1}
    used_rotated = [s.headers.get("Authorization") == f"Bearer {rotated}" for s in api.session.sent]
    assert used_rotated == [False, False, True, True]
    assert api.clock.waits == []


def test_a_changed_environment_key_is_used_without_a_401(api: Api) -> None:
    env = dict(api.env)
    client = api.client(secrets_provider=EnvSecrets(env))
    rotated = new_key()
    api.watch.keys.add(rotated)
    api.box.rotate_keys([rotated])
    env[ENV_VAR] = rotated
    client.field_definitions()
    assert api.statuses() == {"200": 1}


def test_a_single_injected_401_is_survived_by_a_refresh(api: Api) -> None:
    provider = CachingEnvSecrets(api.env)
    api.box.inject({"endpoint": FIELDS, "kind": "401"})
    api.client(secrets_provider=provider).field_definitions()
    assert provider.refreshes == 1 and api.statuses() == {"401": 1, "200": 1}


def test_401_twice_raises_auth_error(api: Api) -> None:
    provider = CachingEnvSecrets(api.env)
    revoked = new_key()
    api.watch.keys.add(revoked)
    api.box.rotate_keys([revoked])  # the key we hold is revoked, and the secret still holds it

    with api.watch.raises(AuthError) as info:
        api.client(secrets_provider=provider).field_definitions()

    assert info.value.status == 401
    assert "update the secret" in str(info.value)
    assert provider.refreshes == 1
    assert api.statuses() == {"401": 2} and api.clock.waits == []


@pytest.mark.parametrize(("kind", "hint"), [
    ("403", "scopes"),  # a key without Marketing scopes, or SendGrid's temporary block after bad requests
    ("451", "region"),  # the account's data refused for legal or residency reasons
])
def test_403_and_451_raise_auth_error_at_once(api: Api, kind: str, hint: str) -> None:
    """No retry and no re-read of the key changes these answers."""
    provider = CachingEnvSecrets(api.env)
    api.box.inject({"endpoint": FIELDS, "kind": kind, "times": 5})
    with api.watch.raises(AuthError) as info:
        api.client(secrets_provider=provider).field_definitions()
    assert info.value.status == int(kind) and hint in str(info.value)
    assert api.requests_to(FIELDS) == 1
    assert provider.refreshes == 0 and api.clock.waits == []


def test_repr_names_the_secret_not_the_key(api: Api) -> None:
    client = api.client()
    client.field_definitions()
    assert SECRET_NAME in repr(client) and api.key not in repr(client) and api.key not in str(client)


# ------------------------------------------------------------------------------ answers that are not JSON objects


class OddAnswers(QuietJsonHandler):
    """Something between the app and SendGrid (a proxy, a wrong SENDGRID_API_URL) answering 2xx with another body."""

    answer: tuple[int, bytes] = (200, b"")  # (status, body), set per test

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_json(*self.answer)

    do_GET = do_PUT = do_POST = do_DELETE = _answer


@pytest.mark.parametrize(("call", "answer", "said"), [
    pytest.param(lambda c: c.field_definitions(), (200, b"<html>Sign in to the proxy</html>"),
                 "GET /v3/marketing/field_definitions: HTTP 200 answered with 33 bytes that are not JSON", id="html"),
    pytest.param(lambda c: c.import_status("job-1"), (200, b"[]"),
                 "GET /v3/marketing/contacts/imports/{id}: HTTP 200 answered with a JSON array", id="array"),
    pytest.param(lambda c: c.get_list("list-1"), (200, b'"ok"'),
                 "GET /v3/marketing/lists/{id}: HTTP 200 answered with a JSON string", id="string"),
    pytest.param(lambda c: c.upsert(b"{}"), (202, b"{}"),
                 "PUT /v3/marketing/contacts: HTTP 202 without a job_id", id="no-job-id"),
    pytest.param(lambda c: c.start_import(["l"], ["e"]), (200, b"null"),
                 "PUT /v3/marketing/contacts/imports: HTTP 200 answered with a JSON null", id="null"),
    pytest.param(lambda c: c.search_contacts(["a@example.com"]), (200, b'{"result"'),
                 "POST /v3/marketing/contacts/search/emails: HTTP 200 answered with 9 bytes that are not JSON",
                 id="cut-short"),
    pytest.param(lambda c: c.delete_contacts(["id-1"]), (202, b"[1]"),
                 "DELETE /v3/marketing/contacts: HTTP 202 answered with a JSON array", id="delete"),
])
def test_a_success_that_is_not_a_json_object_is_a_sendgrid_error_naming_the_call(
        watch: LeakWatch, call: Callable[[SendGridClient], object], answer: tuple[int, bytes], said: str) -> None:
    """Such an answer used to escape as a JSONDecodeError, a KeyError, or a list where a dict was promised: now the
    run stops with a reason (engine: a SendGridError leaves it failed, resumable)."""
    key = new_key()
    watch.keys.add(key)
    with loopback_server(type("Odd", (OddAnswers,), {"answer": answer})) as url:
        client = SendGridClient(url, EnvSecrets({ENV_VAR: key}), SECRET_NAME, policy=fast_policy(),
                                sleep=lambda _: None)
        watch.clients.append(client)
        with watch.raises(SendGridError) as info:
            call(client)
        client.close()
    assert type(info.value) is SendGridError and info.value.status == answer[0]
    assert str(info.value).startswith(said)


# ------------------------------------------------------------------------------------------ invalid addresses


def test_invalid_addresses_are_named_by_email(api: Api) -> None:
    body = {"contacts": [{"email": "ok0@example.com"}, {"email": "x@host.invalid"}, {"email": "ok2@example.com"},
                         {"email": "Y@Other.Invalid"}, {"email": "o'brien@host.invalid"}]}
    with api.watch.raises(InvalidContacts) as info:
        api.client().upsert(orjson.dumps(body))
    assert info.value.emails == {"x@host.invalid", "y@other.invalid", "o'brien@host.invalid"}  # a quote inside too
    sent = ["ok0@example.com", "x@host.invalid", "ok2@example.com", "y@other.invalid", "o'brien@host.invalid"]
    assert info.value.positions(sent) == {1, 3, 4}
    assert info.value.status == 400 and isinstance(info.value, PayloadRejected)
    assert api.stats()["jobs_created"] == 0 and api.clock.waits == []


@pytest.mark.parametrize("errors,named", [
    # SendGrid named contact 1's address at contacts[0]: only contact 1 goes
    ([{"field": "contacts[0].email", "message": "email 'bad@example.com' is not valid"}], {1}),
    # an index without an address drops nobody: the whole request is refused instead
    ([{"field": "contacts[0].email", "message": "email is not valid"}], None),
    # an address the request does not hold drops nobody, whatever index comes with it
    ([{"field": "contacts[1].email", "message": "email 'other@example.com' is not valid"}], set()),
])
def test_a_contact_is_dropped_only_when_the_error_names_its_email(errors: list[dict[str, str]],
                                                                  named: set[int] | None) -> None:
    resp = requests.Response()
    resp.status_code, resp._content = 400, orjson.dumps({"errors": errors})
    emails = sendgrid_module._invalid_addresses(resp)
    if named is None:
        assert emails == set()
        return
    assert InvalidContacts(emails).positions(["good@example.com", "bad@example.com"]) == named


def test_other_errors_beside_invalid_addresses_are_a_plain_rejection(api: Api) -> None:
    body = {"contacts": [{"email": "x@host.invalid"}, {"email": "a@example.com", "nickname": "Al"}]}
    with api.watch.raises(PayloadRejected) as info:
        api.client().upsert(orjson.dumps(body))
    assert not isinstance(info.value, InvalidContacts)
    assert info.value.status == 400 and "unknown contact field" in str(info.value)


# ------------------------------------------------------------------------------------ search and id chunking


def test_search_contacts_goes_100_at_a_time_and_maps_lowercase_emails_to_ids_and_lists(api: Api) -> None:
    known = add_contacts(api, 230)
    unknown = [f"nobody{i}@example.com" for i in range(40)]
    wanted = [e.upper() if i % 7 == 0 else e for i, e in enumerate(known)] + unknown

    found = api.client().search_contacts(wanted)

    assert set(found) == set(known)
    assert all(found[e].id == api.box.contact(e)["id"] for e in known[:5] + known[-5:])
    assert all(found[e].list_ids == frozenset(api.box.contact(e)["list_ids"]) for e in known[:5])
    searches = api.session.to("/search/emails")
    assert len(searches) == 3 == api.requests_to(SEARCH)
    sizes = [len(orjson.loads(s.body)["emails"]) for s in searches]
    assert sizes == [100, 100, 70]


def test_search_contacts_ignores_a_contact_found_by_an_alternate_email(api: Api) -> None:
    """SendGrid's search matches alternate emails too (tests/contracts/tsg_mc_contacts_v3.json, ListContactByEmail:
    "including any alternate_emails"); the sandbox does as well. Only a contact whose primary email was searched is
    that address's contact: the other one is someone else, never to be removed or deleted in its place."""
    client = api.client()
    client.upsert(orjson.dumps({"contacts": [{"email": "ann@example.com", "alternate_emails": ["ann@work.example"]},
                                             {"email": "bob@example.com"}]}))
    api.box.complete_jobs()

    found = client.search_contacts(["ann@work.example", "bob@example.com"])
    alone = client.search_contacts(["ANN@work.example"])

    assert set(found) == {"bob@example.com"} and alone == {}
    assert api.statuses() == {"202": 1, "200": 2}  # SendGrid answered with a hit both times
    ann = client.search_contacts(["ann@example.com"])
    assert ann["ann@example.com"].id == api.box.contact("ann@example.com")["id"]


def test_search_contacts_for_unknown_addresses_returns_nothing(api: Api) -> None:
    add_contacts(api, 3)
    assert api.client().search_contacts(["nobody@example.com", "no.one@example.org"]) == {}
    assert api.statuses().get("404") == 1


def test_remove_from_list_sends_at_most_100_ids_per_short_url(api: Api) -> None:
    list_id = api.box.create_list("to-empty")
    emails = add_contacts(api, 250, list_id)
    client = api.client()
    ids = [hit.id for hit in client.search_contacts(emails).values()]
    assert len(ids) == 250

    jobs = client.remove_from_list(list_id, ids)

    assert len(jobs) == 3 and all(jobs)
    calls = api.session.to(f"/lists/{list_id}/contacts")
    assert len(calls) == 3 == api.requests_to(LIST_REMOVE)
    assert all(len(c.url) < limits.MAX_URL_BYTES for c in calls)
    chunks = [ids_in(c.url, "contact_ids") for c in calls]
    assert all(len(chunk) <= limits.MAX_IDS_PER_DELETE for chunk in chunks)
    assert [i for chunk in chunks for i in chunk] == ids
    api.box.complete_jobs()
    assert api.box.list_emails(list_id) == [] and api.box.contact_count() == 250


@pytest.mark.parametrize("make_id", [
    lambda i: str(uuid.uuid4()),
    lambda i: f"{i:05d}/" * 12,  # not a real id shape: encoded, each "/" costs three bytes
    lambda i: f"{i:05d}-" + "x" * 180,
], ids=["uuid", "slashes", "long"])
def test_delete_contacts_keeps_every_url_short(api: Api, make_id: Callable[[int], str]) -> None:
    ids = [make_id(i) for i in range(1000)]
    jobs = api.client().delete_contacts(ids)
    calls = api.session.to("/v3/marketing/contacts?")
    assert len(jobs) == len(calls) == api.requests_to(CONTACTS_DELETE)
    assert all(len(c.url) < limits.MAX_URL_BYTES and c.method == "DELETE" for c in calls)
    chunks = [ids_in(c.url, "ids") for c in calls]
    assert all(len(chunk) <= limits.MAX_IDS_PER_DELETE for chunk in chunks)
    assert [i for chunk in chunks for i in chunk] == ids
    assert "414" not in api.statuses()


def test_delete_contacts_deletes_them(api: Api) -> None:
    emails = add_contacts(api, 120)
    client = api.client()
    ids = [hit.id for hit in client.search_contacts(emails[:110]).values()]
    assert len(client.delete_contacts(ids)) == 2
    api.box.complete_jobs()
    assert api.box.contact_count() == 10


# ------------------------------------------------------------------------------------ errors file and upload


def test_errors_head_reads_the_errors_file_without_the_api_key(api: Api) -> None:
    api.box.inject({"endpoint": "job", "kind": "errored", "error_count": 2})
    client = api.client()
    job_id = client.upsert(orjson.dumps({"contacts": [{"email": f"p{i}@example.com"} for i in range(3)]}))
    api.box.complete_jobs()
    status = client.import_status(job_id)
    assert status.status == "errored" and "errors_url" not in status.results
    errors_url = status.errors_url
    assert errors_url is not None and errors_url.startswith(api.url)

    lines = client.errors_head(errors_url)
    assert lines == ["index,email,error", "0,p0@example.com,sandbox fault: contact errored",
                     "1,p1@example.com,sandbox fault: contact errored"]
    assert client.errors_head(errors_url, lines=2) == lines[:2]

    fetches = [s for s in api.session.sent if s.url == errors_url]
    assert len(fetches) == 2
    assert all("Authorization" not in s.headers for s in fetches)
    api_calls = [s for s in api.session.sent if "/v3/" in s.url]
    assert all("Authorization" in s.headers for s in api_calls)


def test_errors_head_reports_a_missing_or_unreachable_file(api: Api) -> None:
    client = api.client()
    assert client.errors_head(f"{api.url}/_sandbox/errors/{uuid.uuid4()}.csv") == ["errors file answered 404"]
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert client.errors_head(f"http://127.0.0.1:{closed_port}/x.csv") == ["errors file unreadable: ConnectionError"]


def test_csv_import_upload_goes_to_the_upload_uri_without_the_api_key(api: Api) -> None:
    list_id = api.box.create_list("imported")
    client = api.client()
    started = client.start_import([list_id], ["_rf2_T", "_rf0_T"])
    data = gzip.compress(b"email,first_name\nann@example.com,Ann\nbob@example.com,Bob\n")

    client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))

    api.box.complete_jobs()
    assert client.import_status(started.job_id).status == "completed"
    assert api.box.list_emails(list_id) == ["ann@example.com", "bob@example.com"]
    upload = api.session.to("/_sandbox/uploads/")[0]
    assert "Authorization" not in upload.headers and upload.headers["Content-Length"] == str(len(data))


def test_an_upload_whose_answer_was_lost_is_not_refused_when_sent_again(api: Api,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The file arrived but the answer did not: the retry meets 409 (already received), which means it is there."""
    list_id = api.box.create_list("imported")
    client = api.client()
    started = client.start_import([list_id], ["_rf2_T"])
    data = gzip.compress(b"email\nann@example.com\n")
    real_send, lost = api.session.send, []

    def send(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        resp = real_send(request, **kwargs)
        if "/_sandbox/uploads/" in str(request.url) and not lost:
            lost.append(resp.status_code)
            raise requests.ConnectionError("the connection broke before the answer was read")
        return resp

    monkeypatch.setattr(api.session, "send", send)
    client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))
    assert lost == [200] and len(api.session.to("/_sandbox/uploads/")) == 2
    api.box.complete_jobs()
    assert client.import_status(started.job_id).status == "completed"
    assert api.box.list_emails(list_id) == ["ann@example.com"]


def test_an_upload_refused_at_once_is_not_taken_for_a_lost_answer(api: Api) -> None:
    client = api.client()
    started = client.start_import([api.box.create_list("imported")], ["_rf2_T"])
    data = gzip.compress(b"email\nann@example.com\n")
    client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))
    with pytest.raises(PayloadRejected, match="409"):  # a second upload of the same job, not a retry
        client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))


def _started_upload(api: Api, client: SendGridClient) -> tuple[dict[str, Any], bytes]:
    started = client.start_import([api.box.create_list("imported")], ["_rf2_T"])
    return started, gzip.compress(b"email\nann@example.com\n")


def test_an_upload_told_when_to_come_back_waits_that_long(api: Api) -> None:
    client = api.client(backoff_base=0.5, rng=MaxRandom())
    started, data = _started_upload(api, client)
    api.box.inject({"endpoint": UPLOAD, "kind": "503", "retry_after": 4})
    client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))
    assert api.clock.waits == [4.0] and client.stats["retries"] == 1
    api.box.complete_jobs()
    assert client.import_status(started.job_id).status == "completed"


def test_an_upload_failing_past_the_budget_names_what_failed_and_wastes_no_last_wait(api: Api) -> None:
    client = api.client(max_attempts=3)
    started, data = _started_upload(api, client)
    api.box.inject({"endpoint": UPLOAD, "kind": "500", "times": 2})
    api.box.inject({"endpoint": UPLOAD, "kind": "reset", "times": 5})
    with api.watch.raises(TransientError) as info:
        client.upload(started.upload_uri, started.upload_headers, io.BytesIO(data), len(data))
    assert "PUT import upload: failed 3 times (500 from SendGrid x2, connection failed x1)" in str(info.value)
    assert started.upload_uri not in str(info.value)  # a capability URL: never shown
    assert len(api.session.to("/_sandbox/uploads/")) == 3 and len(api.clock.waits) == 2


# ------------------------------------------------------------------------ answers SendGrid may give, on a loopback


class Scripted(QuietJsonHandler):
    """Answers every call with (status, headers, body), and an errors file (CSV) at /errors.csv."""

    answer: tuple[int, dict[str, str], bytes] = (200, {}, b"{}")

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/errors.csv"):
            body = b"Email,Error\r\nBad@Example.com,invalid\r\nother@example.com,too long\r\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        status, headers, body = self.answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _answer


@contextlib.contextmanager
def scripted(watch: LeakWatch, answer: tuple[int, dict[str, str], bytes], clock: Clock | None = None
             ) -> Iterator[SendGridClient]:
    key = new_key()
    watch.keys.add(key)
    with loopback_server(type("S", (Scripted,), {"answer": answer})) as url:
        client = SendGridClient(url, EnvSecrets({ENV_VAR: key}), SECRET_NAME, policy=fast_policy(),
                                sleep=clock.sleep if clock else lambda _: None)
        watch.clients.append(client)
        yield client
        client.close()


def test_remaining_zero_without_a_reset_time_waits_before_the_next_call(watch: LeakWatch,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """X-RateLimit-Remaining: 0 and no X-RateLimit-Reset (or one that is not Unix seconds): the next call to that
    endpoint waits the default second first instead of earning a 429."""
    clock = Clock([])
    monkeypatch.setattr(sendgrid_module, "time", SimpleNamespace(time=time.time, monotonic=clock.monotonic,
                                                                 sleep=clock.sleep))
    answer = (200, {"Content-Type": "application/json", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"},
              b'{"custom_fields": [], "reserved_fields": []}')
    with scripted(watch, answer, clock) as client:
        client.field_definitions()
        assert clock.waits == []
        client.field_definitions()
    assert len(clock.waits) == 1 and 0 < clock.waits[0] <= 1.0  # the second, less the time the answer took

    one_left = (200, {**answer[1], "X-RateLimit-Remaining": "1"}, answer[2])
    clock.waits.clear()
    with scripted(watch, one_left, clock) as client:  # one call left: the next goes at once
        client.field_definitions()
        client.field_definitions()
    assert clock.waits == []


@pytest.mark.parametrize(("status", "body", "job"), [(202, b'{"job_id": "j-1"}', "j-1"),
                                                     (200, b'{"job_id": "j-2"}', "j-2"), (204, b"", "")])
def test_a_removal_answered_200_202_or_204_is_accepted(watch: LeakWatch, status: int, body: bytes, job: str) -> None:
    with scripted(watch, (status, {"Content-Type": "application/json"}, body)) as client:
        assert client.remove_from_list("list-1", ["id-1", "id-2"]) == [job]
        assert client.delete_contacts(["id-3"]) == [job]


def test_the_errors_file_names_its_emails_lower_cased(watch: LeakWatch) -> None:
    with scripted(watch, (200, {}, b"{}")) as client:
        url = client.base_url + "/errors.csv"
        assert client.errored_emails(url) == ["bad@example.com", "other@example.com"]

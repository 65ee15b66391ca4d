"""The SendGrid HTTP client: every call the engine makes, paced by rate-limit headers, retried by one policy.

The retry policy is a small value object the client consults; no call site sleeps on its own. Errors are typed
(errors.AuthError, RateLimited, PayloadRejected, TransientError). The API key is read from a SecretProvider for each
request, re-read once after a 401 (a rotated key), and never logged: requests and their errors are reported by method,
path and status only.
"""

from __future__ import annotations

import csv
import enum
import ipaddress
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import orjson
import requests

from . import USER_AGENT, limits
from .errors import (
    AuthError,
    ConfigError,
    DeadlineReached,
    PayloadRejected,
    RateLimited,
    SendGridError,
    TransientError,
)
from .partitions import json_type
from .secrets import SecretProvider, redact

log = logging.getLogger(__name__)

_INVALID_EMAIL = re.compile(r"email '(.*)' is not valid", re.IGNORECASE)  # greedy: an address may hold a quote
_MESSAGE_MAX = 200  # characters of each SendGrid message kept in an error
_MIN_RATE_LIMIT_WAIT = 0.05  # a 429 is never retried without a pause, even after "Retry-After: 0"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url_for(region: str, environ: Mapping[str, str]) -> str:
    """The API base URL: `SENDGRID_API_URL` when set (sandbox, tests, benchmarks), else the region's official host.

    An override must be https on an official host, or http(s) on a loopback address: an API key is never sent to any
    other host, nor in clear over a network."""
    override = environ.get("SENDGRID_API_URL", "").strip()
    if not override:
        return limits.EU_BASE_URL if region == "eu" else limits.GLOBAL_BASE_URL
    parsed = urlparse(override)
    host = (parsed.hostname or "").lower()
    if "@" in parsed.netloc or parsed.query or parsed.fragment:
        raise ConfigError(
            "SENDGRID_API_URL must be scheme://host[:port] with no credentials, query or fragment (not shown, it may "
            "hold a key)",
            field="SENDGRID_API_URL",
        )
    if parsed.scheme == "https" and host in limits.OFFICIAL_HOSTS:
        return f"https://{host}"
    if parsed.scheme in ("http", "https") and _is_loopback(host):
        return override.rstrip("/")
    raise ConfigError(
        f"SENDGRID_API_URL={parsed.scheme}://{host} is refused: use https://api.sendgrid.com, "
        "https://api.eu.sendgrid.com or a loopback address (the local sandbox); the API key goes nowhere else",
        field="SENDGRID_API_URL",
    )


class Trouble(enum.Enum):
    """What went wrong with an attempt, and so which budget it spends: budgets are never shared."""

    RATE_LIMITED = "rate limited"  # 429: seconds waited per call, `max_rate_limit_wait`
    FAILED = "failed"  # 5xx, timeouts, dropped connections: attempts per call, `max_attempts`
    UNAUTHORIZED = "unauthorized"  # 401: re-reads of the key per call, `max_key_refreshes`


@dataclass(frozen=True)
class Attempt:
    """One failed attempt of a call, as the policy recorded it."""

    trouble: Trouble
    status: int | None  # None: no answer (`error` says why)
    error: str | None  # "timed out", "connection failed"
    wait: float  # seconds the policy asks for before the next attempt

    def label(self) -> str:
        return self.error or f"{self.status} from SendGrid"


_NO_HEADERS: Mapping[str, str] = {}
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit takes "²", which float() refuses
_UNIX_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class RetryPolicy:
    """What to retry, how long to wait, when to give up: one immutable value per call, in the spirit of urllib3's
    `Retry`. `increment(...)` returns a copy that remembers one more failed attempt (`history`, with the wait it asks
    for); `is_exhausted()` says a budget is spent; `sleep_for()` is the wait before the next attempt. The settings
    below are the budgets and waits; a client holds the policy with an empty history and starts each call from it."""

    max_attempts: int = 8  # attempts that failed with a 5xx, a timeout or a dropped connection, per call
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_rate_limit_wait: float = 900.0  # total seconds one call may spend waiting on 429s
    max_single_wait: float = 120.0  # a Retry-After or reset further away than this is capped (clock skew, bad header)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_key_refreshes: int = 1  # a 401 re-reads the key (it may have been rotated) this many times per call
    history: tuple[Attempt, ...] = ()

    @staticmethod
    def trouble_of(status: int | None) -> Trouble | None:
        """The budget an answer's status (None: no answer) draws on; None when it is never retried (other 4xx)."""
        if status is None or status >= 500:
            return Trouble.FAILED
        if status == 429:
            return Trouble.RATE_LIMITED
        if status == 401:
            return Trouble.UNAUTHORIZED
        return None

    def new(self) -> RetryPolicy:
        """The same settings with an empty history: the start of a call."""
        return replace(self, history=())

    def increment(self, *, status: int | None = None, error: str | None = None,
                  headers: Mapping[str, str] = _NO_HEADERS, now: float, rng: random.Random) -> RetryPolicy:
        """A copy that remembers one more failed attempt: its answer's status and headers, or no answer (`error`).
        `now` is the wall clock (Unix seconds), for Retry-After dates and reset times."""
        trouble = self.trouble_of(status)
        if trouble is None:
            raise ValueError(f"a {status} answer is final, not retried")
        if trouble is Trouble.RATE_LIMITED:
            wait = self.rate_limit_wait(headers, now)
        elif trouble is Trouble.FAILED:
            told = self.retry_after(headers, now)  # a 503 may say when to come back
            wait = told if told is not None else self.backoff(self.count(Trouble.FAILED) + 1, rng)
        else:
            wait = 0.0
        return replace(self, history=(*self.history, Attempt(trouble, status, error, wait)))

    def count(self, trouble: Trouble) -> int:
        return sum(1 for a in self.history if a.trouble is trouble)

    def waited(self, trouble: Trouble) -> float:
        """Seconds the attempts of this kind asked to wait (the last one's wait included)."""
        return sum(a.wait for a in self.history if a.trouble is trouble)

    def is_exhausted(self) -> bool:
        """A budget is spent: the caller gives up instead of waiting `sleep_for()`."""
        return (self.count(Trouble.FAILED) >= self.max_attempts
                or self.waited(Trouble.RATE_LIMITED) > self.max_rate_limit_wait
                or self.count(Trouble.UNAUTHORIZED) > self.max_key_refreshes)

    def sleep_for(self) -> float:
        """Seconds to wait before the next attempt."""
        return self.history[-1].wait if self.history else 0.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with full jitter (attempt counts from 1)."""
        return rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))

    def parse_retry_after(self, value: str, now: float) -> float | None:
        """Retry-After in seconds: ASCII digits, or an HTTP date relative to `now` (a past date: 0). Capped at
        `max_single_wait`; None when it is neither."""
        text = value.strip()
        if _DIGITS.fullmatch(text):
            seconds = float(text)
        else:
            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - now
        return min(max(seconds, 0.0), self.max_single_wait)

    def retry_after(self, headers: Mapping[str, str], now: float) -> float | None:
        value = headers.get("Retry-After")
        return None if value is None else self.parse_retry_after(value, now)

    def reset_wait(self, headers: Mapping[str, str], now: float) -> float | None:
        """Seconds until X-RateLimit-Reset (Unix seconds, ASCII digits), plus a small margin; capped."""
        reset = headers.get("X-RateLimit-Reset", "").strip()
        if not _UNIX_SECONDS.fullmatch(reset):
            return None
        return min(max(float(reset) - now, 0.0) + _MIN_RATE_LIMIT_WAIT, self.max_single_wait)

    def rate_limit_wait(self, headers: Mapping[str, str], now: float) -> float:
        """Seconds until the window resets: Retry-After, else X-RateLimit-Reset, else 1 s; never less than a pause."""
        told = self.retry_after(headers, now)
        if told is None:
            told = self.reset_wait(headers, now)
        return 1.0 if told is None else min(max(told, _MIN_RATE_LIMIT_WAIT), self.max_single_wait)


@dataclass(frozen=True)
class JobStatus:
    """A job as SendGrid reports it: `status` pending, completed, errored or failed; `results` its counts; the
    errors file's link (a capability: kept out of records and logs) when some rows failed."""

    id: str
    status: str
    job_type: str | None
    results: dict[str, Any]
    errors_url: str | None


@dataclass(frozen=True)
class ImportStarted:
    """A CSV import SendGrid is ready for: upload the file to `upload_uri` with every header of `upload_headers`."""

    job_id: str
    upload_uri: str
    upload_headers: list[dict[str, str]]


@dataclass(frozen=True)
class SearchHit:
    """A contact found by email: its id and the lists it is on."""

    id: str
    list_ids: frozenset[str]


class InvalidContacts(PayloadRejected):
    """400 naming invalid addresses: the caller drops the contacts whose email it names (reported) and resends the
    rest. The error's `field` index is not trusted: an index alone never drops a contact (SendGrid has named an
    address at another contact's index), so a 400 that names no address is a plain PayloadRejected."""

    def __init__(self, emails: set[str]) -> None:
        super().__init__(f"SendGrid refused {len(emails)} invalid address(es)", status=400)
        self.emails = frozenset(emails)

    def positions(self, emails: Sequence[str]) -> set[int]:
        """Where in `emails` (lower-cased, as sent) the addresses this error names are."""
        return {pos for pos, email in enumerate(emails) if email in self.emails}


@dataclass
class _Window:
    """What the latest answers said of an endpoint's current rate-limit window."""

    reset: float  # its X-RateLimit-Reset (Unix seconds): which window this is
    until: float  # monotonic time it ends (capped like any wait)
    left: int  # calls this client may still start in it


class _Pacer:
    """Paces every thread of one client, per endpoint, so that no call earns a 429 the client could have foreseen.

    - A 429 (`block`) pauses every call to its endpoint until the wait it asked for has passed.
    - X-RateLimit-Remaining counts what the window still allows; calls still in flight when it was written may not be
      in it yet, so they are taken off too, and each call started since takes one more. When nothing is left, calls
      wait for the reset (Remaining: 0 without a reset header: the policy's rate-limit wait).
    A window whose end has passed is forgotten: the next answer tells the new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocked: dict[str, float] = {}
        self._windows: dict[str, _Window] = {}
        self._in_flight: Counter[str] = Counter()

    def acquire(self, endpoint: str, mono: float) -> float:
        """0 when a call may start now (it is then in flight until `release`), else the seconds to wait first."""
        with self._lock:
            blocked = self._blocked.get(endpoint, 0.0) - mono
            if blocked > 0:
                return blocked
            window = self._windows.get(endpoint)
            if window is not None and mono < window.until:
                if window.left <= 0:
                    return window.until - mono
                window.left -= 1
            elif window is not None:
                del self._windows[endpoint]
            self._in_flight[endpoint] += 1
            return 0.0

    def release(self, endpoint: str, headers: Mapping[str, str] | None, policy: RetryPolicy, wall: float,
                mono: float) -> None:
        """A call ended, with these answer headers (None: no answer)."""
        with self._lock:
            self._in_flight[endpoint] -= 1
            remaining = (headers or _NO_HEADERS).get("X-RateLimit-Remaining", "").strip()
            if headers is None or not _DIGITS.fullmatch(remaining):
                return
            left = int(remaining) - self._in_flight[endpoint]
            reset = headers.get("X-RateLimit-Reset", "").strip()
            if not _UNIX_SECONDS.fullmatch(reset):
                if left <= 0:
                    self._block(endpoint, mono + policy.rate_limit_wait(headers, wall))
                return
            until = mono + policy.rate_limit_wait(headers, wall)  # Retry-After, if told, wins over the reset
            window = self._windows.get(endpoint)
            if window is None or float(reset) > window.reset:
                self._windows[endpoint] = _Window(float(reset), until, left)
            elif float(reset) == window.reset:
                window.left = min(window.left, left)

    def block(self, endpoint: str, until: float) -> None:
        with self._lock:
            self._block(endpoint, until)

    def _block(self, endpoint: str, until: float) -> None:
        self._blocked[endpoint] = max(self._blocked.get(endpoint, 0.0), until)



# Connections kept per host: the job poller's threads (jobs.POLL_CONCURRENCY, 8) beside up to 4 senders
# (config.MAX_IN_FLIGHT_MAX) and a call of the run's own. With 8, a run polling while it sends opened connections
# it then dropped, and urllib3 logged "Connection pool is full" on runs that succeeded.
POOL_SIZE = 16

class SendGridClient:
    """One account's API. Safe for several threads at once (senders and status polls): they share the pacing, the
    stats and the jitter; each call has its own retry history."""

    def __init__(
        self,
        base_url: str,
        secrets: SecretProvider,
        secret_name: str,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secrets, self._secret_name = secrets, secret_name
        self.policy = (policy or RetryPolicy()).new()
        self._session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._pacer = _Pacer()
        self.deadline: float | None = None  # time.monotonic() value; waits that would pass it raise DeadlineReached
        # The engine's lease keeper (LeaseKeeper.sleep): every wait goes through it and it is asked (with 0) before
        # each attempt, so a run whose lease is lost sends nothing more and stops waiting at once.
        self.guard: Callable[[float], None] | None = None
        self.stats = {"requests": 0, "retries": 0, "rate_limited": 0, "bytes_sent": 0, "waited_seconds": 0.0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SendGridClient({self.base_url!r}, secret={self._secret_name!r})"

    def close(self) -> None:
        self._session.close()

    # --- transport -------------------------------------------------------------------------------------------------

    def _count(self, name: str, amount: float = 1) -> None:
        with self._stats_lock:
            self.stats[name] += amount

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            if self.guard is not None:
                self.guard(0)
            return
        if self.deadline is not None and time.monotonic() + seconds > self.deadline:
            raise DeadlineReached(f"waiting {seconds:.0f} s for SendGrid would pass the run's deadline")
        self._count("waited_seconds", seconds)
        (self.guard or self._sleep)(seconds)

    def _attempt(self, endpoint: str, send: Callable[[], requests.Response]) -> tuple[requests.Response | None, str]:
        """One attempt, once the pacer lets it go: the answer, or None and why there was none."""
        if self.guard is not None:  # the lease the work holds: checked before every attempt (LeaseLost)
            self.guard(0)
        while (wait := self._pacer.acquire(endpoint, time.monotonic())) > 0:
            self._wait(wait)
        self._count("requests")
        resp: requests.Response | None = None
        try:
            resp = send()
            return resp, ""
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            return None, "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
        finally:
            self._pacer.release(endpoint, None if resp is None else resp.headers, self.policy, time.time(),
                                time.monotonic())

    def _retry(self, endpoint: str, retry: RetryPolicy, resp: requests.Response | None, error: str) -> RetryPolicy:
        """Record a failed attempt and wait as the policy says; raise the matching error when a budget is spent."""
        with self._rng_lock:
            retry = retry.increment(status=None if resp is None else resp.status_code, error=error or None,
                                    headers=_NO_HEADERS if resp is None else resp.headers, now=time.time(),
                                    rng=self._rng)
        last = retry.history[-1]
        if last.trouble is Trouble.RATE_LIMITED:
            self._count("rate_limited")
            self._pacer.block(endpoint, time.monotonic() + last.wait)  # every thread waits, not this one alone
        if retry.is_exhausted():
            raise _given_up(endpoint, retry, resp)
        if last.trouble is Trouble.RATE_LIMITED:
            log.info("%s: rate limited, waiting %.1f s", endpoint, last.wait)
        elif last.trouble is Trouble.FAILED:
            self._count("retries")
            log.warning("%s: %s (attempt %d), retrying", endpoint, last.label(), retry.count(Trouble.FAILED))
        self._wait(retry.sleep_for())
        return retry

    def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str | None = None,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 202, 204),
        allow: Sequence[int] = (),
    ) -> requests.Response:
        """Send one call with pacing and retries; returns the response when its status is in ok or allow."""
        endpoint = endpoint or f"{method} {path}"
        url = self.base_url + path
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        secret = self._secrets.get(self._secret_name)

        def send() -> requests.Response:
            headers["Authorization"] = "Bearer " + secret.reveal()
            try:
                return self._session.request(method, url, data=body, params=params, headers=headers,
                                             timeout=(self.policy.connect_timeout, self.policy.read_timeout))
            finally:
                headers.pop("Authorization", None)

        retry = self.policy
        while True:
            resp, error = self._attempt(endpoint, send)
            if resp is not None:
                if body is not None:
                    self._count("bytes_sent", len(body))
                if resp.status_code in ok or resp.status_code in allow:
                    return resp
                if retry.trouble_of(resp.status_code) is None:
                    raise _refused(endpoint, resp)
            retry = self._retry(endpoint, retry, resp, error)
            if retry.history[-1].trouble is Trouble.UNAUTHORIZED:
                secret = self._secrets.refresh(self._secret_name)  # the key may have been rotated: read it again

    # --- API calls ----------------------------------------------------------------------------------------------------

    def field_definitions(self) -> dict[str, Any]:
        endpoint = "GET /v3/marketing/field_definitions"
        return _json_object(endpoint, self.request("GET", "/v3/marketing/field_definitions", endpoint=endpoint))

    def get_list(self, list_id: str) -> dict[str, Any] | None:
        endpoint = "GET /v3/marketing/lists/{id}"
        resp = self.request("GET", f"/v3/marketing/lists/{_segment(list_id)}", endpoint=endpoint, allow=(404,))
        return None if resp.status_code == 404 else _json_object(endpoint, resp)

    def lists(self) -> list[dict[str, Any]]:
        """Every list of the account ({id, name, contact_count}), page by page (GET /v3/marketing/lists, 1,000 a
        page). A page's `_metadata.next` gives only the next page_token: the next request goes to this client's own
        base URL, so the key never follows a URL from an answer."""
        found: list[dict[str, Any]] = []
        token, seen = "", set[str]()
        while True:
            params = {"page_size": str(limits.LISTS_PAGE_SIZE)} | ({"page_token": token} if token else {})
            page = orjson.loads(self.request("GET", "/v3/marketing/lists", params=params).content)
            found += [{k: item.get(k) for k in ("id", "name", "contact_count")} for item in page.get("result") or []]
            token = _next_page_token((page.get("_metadata") or {}).get("next"))
            if not token:
                return found
            if token in seen:
                raise SendGridError(f"GET /v3/marketing/lists: the page token {token[:40]!r} came back twice; "
                                    f"stopped after {len(found):,} lists")
            seen.add(token)

    def upsert(self, body: bytes) -> str:
        """PUT /v3/marketing/contacts; returns the job id. Raises InvalidContacts when addresses are refused."""
        endpoint = "PUT /v3/marketing/contacts"
        job_id = _json_object(endpoint, self.request("PUT", "/v3/marketing/contacts", body=body, ok=(202,))).get(
            "job_id")
        if not job_id:
            raise SendGridError(f"{endpoint}: HTTP 202 without a job_id: the contacts' fate is unknown; run again "
                                "(an upsert sent twice changes nothing)", status=202)
        return str(job_id)

    def import_status(self, job_id: str) -> JobStatus:
        """GET /v3/marketing/contacts/imports/{id}: any job's status (upserts, imports, deletions)."""
        endpoint = "GET /v3/marketing/contacts/imports/{id}"
        doc = _json_object(endpoint, self.request("GET", f"/v3/marketing/contacts/imports/{_segment(job_id)}",
                                                  endpoint=endpoint))
        found = doc.get("results")
        results: dict[str, Any] = found if isinstance(found, dict) else {}
        errors_url = results.get("errors_url")
        return JobStatus(str(doc.get("id") or job_id), str(doc.get("status") or "pending"), doc.get("job_type"),
                         {k: v for k, v in results.items() if k != "errors_url"},
                         errors_url if isinstance(errors_url, str) and errors_url else None)

    def start_import(self, list_ids: Sequence[str], field_mappings: Sequence[str | None]) -> ImportStarted:
        """PUT /v3/marketing/contacts/imports for a gzip CSV upload: the job, and where and how to upload the file.
        The body names only the documented fields: SendGrid takes a gzip upload as it is, with no flag for it."""
        body = orjson.dumps({"list_ids": list(list_ids), "file_type": "csv", "field_mappings": list(field_mappings)})
        endpoint = "PUT /v3/marketing/contacts/imports"
        doc = _json_object(endpoint, self.request("PUT", "/v3/marketing/contacts/imports", endpoint=endpoint,
                                                  body=body))
        job_id, uri, headers = doc.get("job_id"), doc.get("upload_uri"), doc.get("upload_headers") or []
        if not job_id or not isinstance(uri, str) or not isinstance(headers, list):
            raise SendGridError(f"{endpoint}: the answer lacks job_id, upload_uri or upload_headers")
        return ImportStarted(str(job_id), uri, [dict(h) for h in headers if isinstance(h, dict)])

    def upload(self, upload_uri: str, upload_headers: Iterable[Mapping[str, str]], data: Any, size: int) -> None:
        """PUT the import file to the URI SendGrid gave (no API key goes there), retried like any call. The URI is a
        capability: it is never logged, the endpoint is named "PUT import upload"."""
        headers = {h["header"]: h["value"] for h in upload_headers}
        headers["Content-Length"] = str(size)
        unanswered = False  # an earlier attempt may have arrived without its answer reaching us

        def send() -> requests.Response:
            if hasattr(data, "seek"):
                data.seek(0)
            return self._session.put(upload_uri, data=data, headers=headers,
                                     timeout=(self.policy.connect_timeout, self.policy.read_timeout * 5))

        retry = self.policy
        while True:
            resp, error = self._attempt(_UPLOAD, send)
            if resp is None:
                unanswered = True
            elif resp.status_code < 300 or (resp.status_code == 409 and unanswered):
                self._count("bytes_sent", size)  # 409 after a lost answer: the file is there already
                return
            elif retry.trouble_of(resp.status_code) in (None, Trouble.UNAUTHORIZED):  # no key to re-read here
                raise PayloadRejected(f"import upload refused: {resp.status_code}", status=resp.status_code)
            retry = self._retry(_UPLOAD, retry, resp, error)

    def errors_head(self, url: str, lines: int = 20) -> list[str]:
        """The first lines of a job's errors file. It lives on another host: no API key is sent there."""
        try:
            with self._session.get(url, stream=True, timeout=(self.policy.connect_timeout, 30)) as resp:
                if resp.status_code != 200:
                    return [f"errors file answered {resp.status_code}"]
                out: list[str] = []
                for line in resp.iter_lines(decode_unicode=False):
                    out.append(redact(line.decode("utf-8", "replace"))[:500])
                    if len(out) >= lines:
                        break
                return out
        except requests.RequestException as exc:
            return [f"errors file unreadable: {type(exc).__name__}"]

    def errored_emails(self, url: str) -> list[str] | None:
        """Every email a job's errors file names (its `email` column), or None when it cannot be read or names none
        (the caller then counts every contact of the job as not applied). No API key is sent to its host."""
        try:
            with self._session.get(url, stream=True, timeout=(self.policy.connect_timeout, 60)) as resp:
                if resp.status_code != 200:
                    return None
                found = _errored_emails(resp.iter_lines(decode_unicode=False))
                return None if found is None else sorted(set(found))
        except requests.RequestException:
            return None

    def search_contacts(self, emails: Sequence[str]) -> dict[str, SearchHit]:
        """Email -> (contact id, list ids) for those SendGrid knows (100 a call). A contact whose upsert job is still
        pending is not known yet: callers settle the account's jobs first (`jobs.settle_account`)."""
        found: dict[str, SearchHit] = {}
        endpoint = "POST /v3/marketing/contacts/search/emails"
        for chunk in _chunks(emails, limits.MAX_SEARCH_EMAILS):
            resp = self.request("POST", "/v3/marketing/contacts/search/emails", endpoint=endpoint,
                                body=orjson.dumps({"emails": list(chunk)}), allow=(404,))
            if resp.status_code == 404:
                continue
            for email, item in _json_object(endpoint, resp).get("result", {}).items():
                contact = item.get("contact") if isinstance(item, dict) else None
                # the search also matches alternate emails: only a contact whose primary email it is counts
                if contact and contact.get("id") and str(contact.get("email", "")).lower() == email.lower():
                    lists = contact.get("list_ids")
                    found[email.lower()] = SearchHit(str(contact["id"]), frozenset(map(str, lists or ())))
        return found

    def remove_from_list(self, list_id: str, contact_ids: Sequence[str]) -> list[str]:
        """DELETE /v3/marketing/lists/{id}/contacts in chunks of 100 ids (URLs well under 8 KB); returns job ids."""
        path = f"/v3/marketing/lists/{_segment(list_id)}/contacts"
        return [
            self._delete_ids(path, "contact_ids", chunk, "DELETE /v3/marketing/lists/{id}/contacts")
            for chunk in _id_chunks(contact_ids, len(self.base_url + path))
        ]

    def delete_contacts(self, contact_ids: Sequence[str]) -> list[str]:
        """DELETE /v3/marketing/contacts?ids=: deletes contacts from the account entirely; returns job ids."""
        path = "/v3/marketing/contacts"
        chunks = _id_chunks(contact_ids, len(self.base_url + path))
        return [self._delete_ids(path, "ids", chunk, None) for chunk in chunks]

    def _delete_ids(self, path: str, param: str, ids: Sequence[str], endpoint: str | None) -> str:
        resp = self.request("DELETE", path, params={param: ",".join(ids)}, endpoint=endpoint, ok=(200, 202, 204))
        if not resp.content:
            return ""
        return str(_json_object(endpoint or f"DELETE {path}", resp).get("job_id", ""))


def _json_object(endpoint: str, resp: requests.Response) -> dict[str, Any]:
    """The JSON object a successful call answers with; SendGridError naming the call and what came instead when it is
    not one (a proxy's page, a cut answer), so the run stops with a reason, resumable, instead of crashing."""
    try:
        value = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        what = f"{len(resp.content)} bytes that are not JSON"
    else:
        if isinstance(value, dict):
            return value
        what = f"a JSON {json_type(value)}"
    raise SendGridError(f"{endpoint}: HTTP {resp.status_code} answered with {what} instead of a JSON object; if this "
                        "lasts, check what stands between this app and SendGrid (a proxy, SENDGRID_API_URL)",
                        status=resp.status_code)


_AUTH_HINT = {
    401: "the API key is wrong, expired or revoked: update the secret (Key Vault) and run again",
    403: "the key lacks 'Marketing' scopes or SendGrid blocked it temporarily after bad requests: check the key's "
    "scopes (Marketing: Full Access) and wait before retrying",
    451: "SendGrid refuses this account's data for legal or residency reasons: check the region setting",
}


_UPLOAD = "PUT import upload"


def _refused(endpoint: str, resp: requests.Response) -> SendGridError:
    """The error for an answer that is final (never retried)."""
    status = resp.status_code
    if status in (401, 403, 451):
        return AuthError(f"{endpoint}: {status} {_messages(resp)}; {_AUTH_HINT.get(status, '')}", status=status)
    if status == 400:
        emails = _invalid_addresses(resp)
        if emails:
            return InvalidContacts(emails)
    return PayloadRejected(f"{endpoint}: {status} {_messages(resp)}", status=status)


def _given_up(endpoint: str, retry: RetryPolicy, resp: requests.Response | None) -> SendGridError:
    """The error for a call whose last attempt spent a budget."""
    last = retry.history[-1]
    if last.trouble is Trouble.RATE_LIMITED:
        waited = retry.waited(Trouble.RATE_LIMITED) - last.wait
        return RateLimited(f"{endpoint}: still rate limited after {waited:.0f} s", status=429)
    if last.trouble is Trouble.UNAUTHORIZED and resp is not None:
        return _refused(endpoint, resp)
    failures = Counter(a.label() for a in retry.history if a.trouble is Trouble.FAILED)
    n = sum(failures.values())
    what = f"{last.label()} {n} times" if len(failures) == 1 else "failed {} times ({})".format(
        n, ", ".join(f"{label} x{count}" for label, count in failures.items()))
    return TransientError(f"{endpoint}: {what}; giving up for now", status=last.status)


def _messages(resp: requests.Response) -> str:
    """SendGrid's error messages, each redacted before it is cut short (a cut key would escape the patterns)."""
    try:
        errors = orjson.loads(resp.content).get("errors") or []
        return "; ".join(redact(str(e.get("message", "")))[:_MESSAGE_MAX] for e in errors[:5]) or str(resp.reason)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return str(resp.reason)


def _invalid_addresses(resp: requests.Response) -> set[str]:
    """The addresses a 400 names as not valid (lower-cased); empty unless every error in it is such a one."""
    try:
        errors = orjson.loads(resp.content).get("errors") or []
    except (orjson.JSONDecodeError, AttributeError):
        return set()
    emails: set[str] = set()
    for err in errors:
        if not isinstance(err, dict):
            continue
        match = _INVALID_EMAIL.search(str(err.get("message", "")))
        if not match:
            return set()  # another kind of error in the same answer: not fixable by dropping addresses
        emails.add(match.group(1).lower())
    return emails


def _next_page_token(next_url: object) -> str:
    """The page_token of a `_metadata.next` URL ("" when there is no next page)."""
    if not isinstance(next_url, str) or not next_url:
        return ""
    tokens = parse_qs(urlparse(next_url).query).get("page_token") or [""]
    if not tokens[-1]:
        raise SendGridError("GET /v3/marketing/lists: the answer names a next page without a page_token")
    return tokens[-1]


def _segment(value: str) -> str:
    """Percent-encode a value for one path segment or query item ("/" too: an id never changes the path)."""
    return quote(value, safe="")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _id_chunks(ids: Sequence[str], base_len: int) -> Iterator[list[str]]:
    """At most MAX_IDS_PER_DELETE ids a call and a URL under MAX_URL_BYTES."""
    chunk: list[str] = []
    length = base_len + 20
    for contact_id in ids:
        add = len(_segment(contact_id)) + 3  # an encoded comma
        if chunk and (len(chunk) >= limits.MAX_IDS_PER_DELETE or length + add > limits.MAX_URL_BYTES):
            yield chunk
            chunk, length = [], base_len + 20
        chunk.append(contact_id)
        length += add
    if chunk:
        yield chunk


__all__ = ["Attempt", "InvalidContacts", "RetryPolicy", "SendGridClient", "SendGridError", "Trouble", "base_url_for"]


def _errored_emails(lines: Iterable[bytes]) -> list[str] | None:
    """The emails of an errors file's `email` column (any case), or None when it has no such column."""
    rows = csv.reader(line.decode("utf-8", "replace") for line in lines)
    header = [h.strip().lower() for h in next(rows, [])]
    if "email" not in header:
        return None
    at = header.index("email")
    return [row[at].strip().lower() for row in rows if len(row) > at and row[at].strip()]

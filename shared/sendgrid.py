"""The SendGrid HTTP client: every call the engine makes, paced by rate-limit headers, retried by one policy.

The retry policy is a small value object the client consults; no call site sleeps on its own. Errors are typed
(errors.AuthError, RateLimited, PayloadRejected, TransientError). The API key is read from a SecretProvider for each
request, re-read once after a 401 (a rotated key), and never logged: requests and their errors are reported by method,
path and status only.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse

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


@dataclass(frozen=True)
class RetryPolicy:
    """What to retry, how long to wait, when to give up."""

    max_attempts: int = 8  # 5xx, timeouts and connection errors, per call
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_rate_limit_wait: float = 900.0  # total seconds one call may spend waiting on 429s
    max_single_wait: float = 120.0  # a reset header further away than this is capped (clock skew, bad header)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with full jitter (attempt counts from 1)."""
        return rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))

    def rate_limit_wait(self, headers: Mapping[str, str], now: float) -> float:
        """Seconds until the window resets: Retry-After, else X-RateLimit-Reset (Unix seconds), else 1 s."""
        for name in ("Retry-After",):
            value = headers.get(name)
            if value and value.strip().isdigit():
                return min(max(float(value), _MIN_RATE_LIMIT_WAIT), self.max_single_wait)
        reset = headers.get("X-RateLimit-Reset")
        if reset:
            try:
                return min(max(float(reset) - now, 0.0) + _MIN_RATE_LIMIT_WAIT, self.max_single_wait)
            except ValueError:
                pass
        return 1.0


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
class _Pacer:
    """Remembers each endpoint's remaining allowance so the next call waits for the reset instead of earning a 429."""

    blocked_until: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, endpoint: str, headers: Mapping[str, str], policy: RetryPolicy, wall: float, mono: float) -> None:
        if headers.get("X-RateLimit-Remaining", "").strip() == "0":
            with self.lock:
                self.blocked_until[endpoint] = mono + policy.rate_limit_wait(headers, wall)

    def wait_time(self, endpoint: str, mono: float) -> float:
        with self.lock:
            return max(0.0, self.blocked_until.get(endpoint, 0.0) - mono)


class SendGridClient:
    """One account's API. Thread-safe for the engine's use (one sender thread plus status polls)."""

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
        self.policy = policy or RetryPolicy()
        self._session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._pacer = _Pacer()
        self.deadline: float | None = None  # time.monotonic() value; waits that would pass it raise DeadlineReached
        # The engine's lease keeper (LeaseKeeper.sleep): every wait goes through it and it is asked (with 0) before
        # each attempt, so a run whose lease is lost sends nothing more and stops waiting at once.
        self.guard: Callable[[float], None] | None = None
        self.stats = {"requests": 0, "retries": 0, "rate_limited": 0, "bytes_sent": 0, "waited_seconds": 0.0}

    def __repr__(self) -> str:
        return f"SendGridClient({self.base_url!r}, secret={self._secret_name!r})"

    def close(self) -> None:
        self._session.close()

    # --- transport -------------------------------------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            if self.guard is not None:
                self.guard(0)
            return
        if self.deadline is not None and time.monotonic() + seconds > self.deadline:
            raise DeadlineReached(f"waiting {seconds:.0f} s for SendGrid would pass the run's deadline")
        self.stats["waited_seconds"] += seconds
        (self.guard or self._sleep)(seconds)

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
        attempt, rate_waited, refreshed = 0, 0.0, False
        secret = self._secrets.get(self._secret_name)
        while True:
            self._wait(self._pacer.wait_time(endpoint, time.monotonic()))
            headers["Authorization"] = "Bearer " + secret.reveal()
            attempt += 1
            self.stats["requests"] += 1
            try:
                resp = self._session.request(
                    method, url, data=body, params=params, headers=headers,
                    timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                )
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                if attempt >= self.policy.max_attempts:
                    raise TransientError(f"{endpoint}: {kind} {attempt} times; giving up for now") from None
                self.stats["retries"] += 1
                log.warning("%s: %s (attempt %d), retrying", endpoint, kind, attempt)
                self._wait(self.policy.backoff(attempt, self._rng))
                continue
            finally:
                headers.pop("Authorization", None)
            if body is not None:
                self.stats["bytes_sent"] += len(body)
            self._pacer.note(endpoint, resp.headers, self.policy, time.time(), time.monotonic())
            status = resp.status_code
            if status in ok or status in allow:
                return resp
            if status == 429:
                self.stats["rate_limited"] += 1
                wait = self.policy.rate_limit_wait(resp.headers, time.time())
                if rate_waited + wait > self.policy.max_rate_limit_wait:
                    raise RateLimited(f"{endpoint}: still rate limited after {rate_waited:.0f} s", status=429)
                rate_waited += wait
                attempt -= 1  # a 429 is not a failure of the attempt budget
                log.info("%s: rate limited, waiting %.1f s", endpoint, wait)
                self._wait(wait)
                continue
            if status == 401 and not refreshed:
                refreshed = True  # the key may have been rotated: read it again once
                secret = self._secrets.refresh(self._secret_name)
                continue
            if status in (401, 403, 451):
                raise AuthError(f"{endpoint}: {status} {_messages(resp)}; {_AUTH_HINT.get(status, '')}", status=status)
            if status >= 500:
                if attempt >= self.policy.max_attempts:
                    raise TransientError(f"{endpoint}: {status} from SendGrid {attempt} times; giving up for now",
                                         status=status)
                self.stats["retries"] += 1
                log.warning("%s: %d (attempt %d), retrying", endpoint, status, attempt)
                self._wait(self.policy.backoff(attempt, self._rng))
                continue
            if status == 400:
                emails = _invalid_addresses(resp)
                if emails:
                    raise InvalidContacts(emails)
            raise PayloadRejected(f"{endpoint}: {status} {_messages(resp)}", status=status)

    # --- API calls ----------------------------------------------------------------------------------------------------

    def field_definitions(self) -> dict[str, Any]:
        return orjson.loads(self.request("GET", "/v3/marketing/field_definitions").content)

    def get_list(self, list_id: str) -> dict[str, Any] | None:
        resp = self.request("GET", f"/v3/marketing/lists/{_segment(list_id)}", endpoint="GET /v3/marketing/lists/{id}",
                            allow=(404,))
        return None if resp.status_code == 404 else orjson.loads(resp.content)

    def upsert(self, body: bytes) -> str:
        """PUT /v3/marketing/contacts; returns the job id. Raises InvalidContacts when addresses are refused."""
        resp = self.request("PUT", "/v3/marketing/contacts", body=body, ok=(202,))
        return str(orjson.loads(resp.content)["job_id"])

    def import_status(self, job_id: str) -> dict[str, Any]:
        resp = self.request("GET", f"/v3/marketing/contacts/imports/{_segment(job_id)}",
                            endpoint="GET /v3/marketing/contacts/imports/{id}")
        return orjson.loads(resp.content)

    def start_import(self, list_ids: Sequence[str], field_mappings: Sequence[str | None]) -> dict[str, Any]:
        """PUT /v3/marketing/contacts/imports for a gzip CSV upload; returns job_id, upload_uri, upload_headers.
        The body names only the documented fields: SendGrid takes a gzip upload as it is, with no flag for it."""
        body = orjson.dumps({"list_ids": list(list_ids), "file_type": "csv", "field_mappings": list(field_mappings)})
        return orjson.loads(self.request("PUT", "/v3/marketing/contacts/imports", body=body).content)

    def upload(self, upload_uri: str, upload_headers: Iterable[Mapping[str, str]], data: Any, size: int) -> None:
        """PUT the import file to the URI SendGrid gave (no API key goes there), retried like any call."""
        headers = {h["header"]: h["value"] for h in upload_headers}
        headers["Content-Length"] = str(size)
        unanswered = False  # an earlier attempt may have arrived without its answer reaching us
        for attempt in range(1, self.policy.max_attempts + 1):
            if hasattr(data, "seek"):
                data.seek(0)
            try:
                resp = self._session.put(upload_uri, data=data, headers=headers,
                                         timeout=(self.policy.connect_timeout, self.policy.read_timeout * 5))
            except (requests.ConnectionError, requests.Timeout):
                resp, unanswered = None, True
            if resp is not None and (resp.status_code < 300 or (resp.status_code == 409 and unanswered)):
                self.stats["bytes_sent"] += size  # 409 after a lost answer: the file is there already
                return
            if resp is not None and resp.status_code < 500 and resp.status_code != 429:
                raise PayloadRejected(f"import upload refused: {resp.status_code}", status=resp.status_code)
            self._wait(self.policy.backoff(attempt, self._rng))
        raise TransientError("import upload failed after retries")

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

    def search_contacts(self, emails: Sequence[str]) -> dict[str, SearchHit]:
        """Email -> (contact id, list ids) for those SendGrid knows (100 a call). A contact whose upsert job is still
        pending is not known yet: callers settle the account's jobs first (`jobs.settle_account`)."""
        found: dict[str, SearchHit] = {}
        for chunk in _chunks(emails, limits.MAX_SEARCH_EMAILS):
            resp = self.request("POST", "/v3/marketing/contacts/search/emails",
                                body=orjson.dumps({"emails": list(chunk)}), allow=(404,))
            if resp.status_code == 404:
                continue
            for email, item in orjson.loads(resp.content).get("result", {}).items():
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
        return str(orjson.loads(resp.content).get("job_id", ""))


_AUTH_HINT = {
    401: "the API key is wrong, expired or revoked: update the secret (Key Vault) and run again",
    403: "the key lacks 'Marketing' scopes or SendGrid blocked it temporarily after bad requests: check the key's "
    "scopes (Marketing: Full Access) and wait before retrying",
    451: "SendGrid refuses this account's data for legal or residency reasons: check the region setting",
}


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


__all__ = ["InvalidContacts", "RetryPolicy", "SendGridClient", "SendGridError", "base_url_for"]

"""The smoke test after a deployment: `python -m shared smoke --url https://APP.azurewebsites.net --key KEY`.

Through the deployed HTTP API only (docs/functions-app.md), as a person would: list the destinations, start a dry
run of each one that may run (its latest export, read, mapped and checked against SendGrid, nothing sent), wait for
each, and print one verdict per destination. The key goes in the `x-functions-key` header, never in a URL, and is
never printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .errors import ConfigError, ConnectorError
from .redaction import redact
from .runlog import FINAL_STATUSES
from .sendgrid import _is_loopback

FINAL = FINAL_STATUSES | {"skipped"}  # a run's last status (skipped: another run had its export version)
READY, WARNING, SKIPPED, WAITING, NOT_READY = "ready", "ready, with warnings", "skipped", "no export yet", "NOT READY"
NO_EXPORT_YET = "no export has arrived"  # http_api.start_run's 409 when the destination has never had an export


class SmokeError(ConnectorError):
    """The API cannot be used at all (unreachable, the key refused, not this app)."""


@dataclass
class Verdict:
    destination: str
    outcome: str
    detail: str
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None

    def lines(self) -> list[str]:
        return [f"{self.destination}: {self.outcome}: {self.detail}"] + [f"  warning: {n}" for n in self.notes]


def api_base(url: str) -> str:
    """`https://APP.azurewebsites.net` (or with `/api`) as the API's base URL. https only, except on loopback (a
    local host in tests); never credentials, a query or a fragment in it: the key goes in a header."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if not host or "@" in parts.netloc or parts.query or parts.fragment:
        raise ConfigError("must be https://<app host> with no credentials, query or fragment (pass the key with "
                          "--key)", field="--url")
    if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(host)):
        raise ConfigError(f"{parts.scheme}://{host} is refused: the function key goes only over https (http only to a "
                          "loopback address)", field="--url")
    path = parts.path.rstrip("/")
    path = path[: -len("/api")] if path.endswith("/api") else path
    return f"{parts.scheme}://{parts.netloc}{path}/api"


class Api:
    """The few calls the smoke test makes, with the function key in a header."""

    def __init__(self, base: str, key: str, timeout: float = 30.0) -> None:
        self.base, self.timeout = base, timeout
        self.session = requests.Session()
        self.session.headers.update({"x-functions-key": key, "Accept": "application/json"})

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        try:
            resp = self.session.request(method, f"{self.base}/{path}", json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise SmokeError(f"{self.base} cannot be reached: {type(exc).__name__}") from None
        if resp.status_code == 401:
            raise SmokeError(f"{self.base} refused the key (HTTP 401): pass the app's host key, `az functionapp keys "
                             "list -g RG -n APP --query functionKeys.default -o tsv`")
        try:
            answer = resp.json()
        except ValueError:
            raise SmokeError(f"{method} {self.base}/{path} answered HTTP {resp.status_code} without JSON: is this the "
                             "connector's function app?") from None
        return resp.status_code, answer if isinstance(answer, dict) else {}

    def close(self) -> None:
        self.session.close()


def start(api: Api, item: Mapping[str, Any]) -> Verdict:
    """Start a dry run of one listed destination, or say why it is not started."""
    name = str(item.get("name"))
    if not item.get("valid"):
        return Verdict(name, NOT_READY, f"invalid in the destinations file: {item.get('error')}")
    if item.get("blocked"):
        return Verdict(name, SKIPPED, str(item["blocked"]))
    status, answer = api.call("POST", f"destinations/{quote(name, safe='')}/runs", {"dry_run": True})
    if status == 202 and answer.get("run_id"):
        return Verdict(name, "started", f"dry run {answer['run_id']} of {answer.get('source')}",
                       run_id=str(answer["run_id"]))
    error = str(answer.get("error") or f"HTTP {status}")
    if status == 409 and NO_EXPORT_YET in error:
        return Verdict(name, WAITING, "it runs when its first export arrives (or POST a run naming a source)")
    return Verdict(name, NOT_READY, f"the dry run was not started (HTTP {status}): {error}")


def judge(verdict: Verdict, run: Mapping[str, Any]) -> Verdict:
    """The verdict of a dry run that has ended."""
    status, counts = run.get("status"), run.get("counts") or {}
    if status != "dry_run":
        why = run.get("error") or run.get("note") or "no reason given"
        return Verdict(verdict.destination, NOT_READY, f"dry run {verdict.run_id} ended {status}: {why}",
                       run_id=verdict.run_id)
    notes = [str(w) for w in [*(run.get("warnings") or []), *(run.get("file_errors") or [])]]
    detail = (f"dry run {verdict.run_id} of {run.get('source')}: {counts.get('read', 0):,} rows read, "
              f"{counts.get('valid', 0):,} valid, {counts.get('rejected_total', 0):,} rejected, nothing sent")
    return Verdict(verdict.destination, WARNING if notes else READY, detail, notes, verdict.run_id)


def wait(api: Api, verdicts: list[Verdict], timeout: float, poll: float) -> list[Verdict]:
    """Poll the started dry runs until each has ended or the time is up."""
    deadline = time.monotonic() + timeout
    pending = {v.run_id: v for v in verdicts if v.outcome == "started"}
    done = {v.destination: v for v in verdicts if v.outcome != "started"}
    while pending:
        for run_id, verdict in list(pending.items()):
            status, run = api.call("GET", f"runs/{run_id}")
            if status == 200 and run.get("status") in FINAL:
                done[verdict.destination] = judge(verdict, run)
                del pending[run_id]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for verdict in pending.values():
        done[verdict.destination] = Verdict(verdict.destination, NOT_READY, f"dry run {verdict.run_id} did not end "
                                            f"within {timeout:.0f} s", run_id=verdict.run_id)
    return [done[v.destination] for v in verdicts]


def run(url: str, key: str, *, timeout: float = 600.0, poll: float = 5.0,
        out: Callable[[str], None] = print) -> int:
    """The smoke test; 0 when every destination that may run passed its dry run, 1 otherwise."""
    api = Api(api_base(url), key)
    try:
        status, listed = api.call("GET", "destinations")
        if status != 200 or not isinstance(listed.get("destinations"), list):
            raise SmokeError(f"GET {api.base}/destinations answered HTTP {status}: {listed.get('error')}")
        items = listed["destinations"]
        out(f"smoke: {api.base} answers; {len(items)} destination(s)")
        verdicts = wait(api, [start(api, item) for item in items], timeout, poll)
    finally:
        api.close()
    for verdict in verdicts:
        for line in verdict.lines():
            out(redact(line))
    tally = {o: sum(v.outcome == o for v in verdicts) for o in (READY, WARNING, SKIPPED, WAITING, NOT_READY)}
    out("smoke: " + ", ".join(f"{n} {o}" for o, n in tally.items() if n) if verdicts else "smoke: no destinations")
    return 1 if tally[NOT_READY] else 0

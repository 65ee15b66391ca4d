"""The fault suite: reliability and security under faults, bad input and hostile timing, with nothing lost.

Every run here goes to the sandbox over real HTTP on loopback: the CLI in subprocesses where the door matters, the
engine in-process where a test needs a short retry policy (the CLI has no flag for it). Each test compares the list
with a reference computed apart from the engine (the export read with shared.sources + shared.contacts), counts
per-email sends in the sandbox, and records its figures for the summary table (tests/fault_report.py). The whole
module uses a recognisable API key; no output of any run may contain it.

Expected behaviour per fault (on PUT /v3/marketing/contacts unless said otherwise). "list = sent": after the run the
list holds exactly `counts.sent` contacts; "resume": `--resume RUN_ID` then completes it, resending nothing accepted.

| fault | the run | then |
|---|---|---|
| 429 storm with `X-RateLimit-Reset` / `Retry-After` | waits for each reset; `completed`, each contact sent once | - |
| 429s outlasting `max_rate_limit_wait` | `interrupted` (the timer or a rerun goes on later); list = sent | resume |
| bursts of 500 / 503 within the retry budget | backoff with jitter, retried; `completed` | - |
| 500 / 503 outlasting the budget (8 attempts) | `interrupted`, error names endpoint and status; list = sent | resume |
| connection reset before processing | retried; `completed`, each contact sent once | - |
| connection reset after processing | retried; only the request in flight is applied twice; `completed` | - |
| connections reset outlasting the budget | `interrupted`; list = sent | resume |
| answer slower than the read timeout | retried; the late request may be applied too (in flight: twice at most) | - |
| 503 / reset / slow on the job-status endpoint | polls retried; `completed` | - |
| job ends `errored` (errors file) | `completed_with_errors`; `jobs[].errors` names the refused contacts | new run |
| job ends `failed` | `failed` when every job failed ("every SendGrid job failed") | new run |
| 401 once (key rotated since read) | key read again once, call retried; `completed` | - |
| key rotated mid-run (SendGrid and key source) | new key used (re-read each call, or after one 401 if cached) | - |
| 401 after the re-read (revoked key) | `failed`: typed error "update the secret", no blind retries | fix key, resume |
| 403 "temporary block" | `failed`: typed error naming scopes / the block, no retries | resume later |
| SIGKILL at 5 seeded points (see Killer) | checkpoint saved after each accepted request | resume each time |
| storage answers 503 for 25 s after a checkpoint | `interrupted`, resumable, the retry budget named | timer |
| storage stopped for 25 s after a checkpoint | `interrupted`; stored record at its last checkpoint | timer |
| 429 / slow answer outlasting the lease | the lease is renewed meanwhile; timer ticks find it busy | - |
| lease broken during a long wait | the run stops at once, writes nothing | the timer's run finishes |
| mirror removal waiting past its lease, a newer export lands | the newer export waits for the timer | list = latest |
| two runs of one export at once | the second refused at once: "being exported by another run", exit 1 | - |
| bad files (see `_write_bad_inputs`) | exit 0/1, a clear message naming file and line, never a traceback | - |

After every scenario the list holds exactly the export's valid contacts (a reference read with shared.sources and
shared.contacts, not the engine), and per-email send counts show nothing was sent twice beyond a request in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from azure.storage.blob import BlobLeaseClient

from sandbox import samplegen
from sandbox.server import Sandbox, serve
from shared import app, blobstore, contacts, context, engine, limits, services, sources, stream
from shared.config import parse_config
from shared.errors import SourceError, StateError
from shared.secrets import EnvSecrets, Secret
from shared.sendgrid import RetryPolicy, SendGridClient
from shared.state import StateStore
from shared.storage import LocalFolderStore, ObjectStore
from tests.storage_faults import DiskAzurite, StorageProxy

REPO = Path(__file__).resolve().parent.parent
PUT = "PUT /v3/marketing/contacts"
JOB_STATUS = "GET /v3/marketing/contacts/imports/{id}"
KEY = "SG.FAULTSUITE-" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(32)
KEY2 = "SG.FAULTSUITE-" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(32)  # the rotated key
WIDE_NOTES = ("note1", "note2", "note3", "note4", "note5")  # 1,000-character Text fields: ~1,150 contacts a request
FAST = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_max=0.05, max_rate_limit_wait=30.0, connect_timeout=5.0,
                   read_timeout=30.0)


# ------------------------------------------------------------------------------------------------ leak guard


class Leaks:
    """Everything a test saw come out of a run; checked for the API keys when the test ends."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        self.texts.append((where, text.decode("utf-8", "replace") if isinstance(text, bytes) else text))


def _needles() -> list[tuple[str, str]]:
    """(label, text) for each key and each of its random parts: a partial leak counts too."""
    out = []
    for n, key in enumerate((KEY, KEY2), start=1):
        out.append((f"key {n}", key))
        out += [(f"key {n} part {i}", part.removeprefix("FAULTSUITE-")) for i, part in enumerate(key.split(".")[1:])]
    return out


def _find_leaks(texts: Sequence[tuple[str, str]], folders: Sequence[Path]) -> list[str]:
    needles = _needles()
    found = [f"{where}: {label}" for where, text in texts for label, needle in needles if needle in text]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path}: {label}" for label, needle in needles if needle.encode() in data]
    return found


@pytest.fixture(autouse=True)
def leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Leaks]:
    """Collects outputs; at the end no output, log record or file the test wrote (reports, rejection CSVs, state
    folders) may hold either API key or a part of it."""
    caplog.set_level(logging.DEBUG)
    guard = Leaks()
    yield guard
    guard.add("log records", caplog.text)
    found = _find_leaks(guard.texts, [tmp_path])
    assert not found, f"the API key leaked into: {found}"


# ------------------------------------------------------------------------------------------------ sandbox and data


@dataclass
class Box:
    box: Sandbox
    url: str
    list_id: str

    def settled_list(self) -> set[str]:
        """The list once every accepted job has been applied."""
        self.box.complete_jobs()
        return set(self.box.list_emails(self.list_id))

    def statuses(self) -> dict[str, int]:
        return self.box.stats["status_counts"]


@pytest.fixture
def sg() -> Iterator[Box]:
    """A sandbox that counts every send per email, with the fields the exports here use."""
    box = Sandbox(api_keys=[KEY], job_delay=0.02, count_sends=True)
    list_id = box.create_list("VIP")
    box.create_field("lifetime_value", "Number")
    box.create_field("signup_date", "Date")
    for name in WIDE_NOTES:
        box.create_field(name, "Text")
    with serve(box) as server:
        yield Box(box, server.url, list_id)


def reference_emails(root: Path, key: str, email_column: str, segments: Sequence[str] | None = None) -> set[str]:
    """The distinct valid emails of an export, read apart from the engine (sources + contacts only)."""
    store = LocalFolderStore(root)
    mapper = contacts.ContactMapper({"email": email_column})
    found: set[str] = set()
    try:
        parts = sources.discover(store, key, segments)
    except SourceError:
        return found
    for part in parts:
        with contextlib.suppress(SourceError):  # the rows before a whole-file problem count
            for _line, values, _reason in sources.read_rows(store, part, mapper.columns, required=mapper.columns[:1]):
                if values is not None and not isinstance(mapped := mapper.map(values), str):
                    found.add(mapped[0])
    return found


@dataclass(frozen=True)
class Export:
    root: Path  # plays the storage container
    key: str  # the source inside it
    destination: dict[str, Any]  # the destination's settings, but for list_id
    expected: frozenset[str]

    def config(self, list_id: str) -> dict[str, Any]:
        return {"destinations": [{**self.destination, "list_id": list_id}]}


def _samplegen_destination() -> dict[str, Any]:
    dest = samplegen.demo_destinations("x", max_profiles=None)["destinations"][0]
    dest.pop("list_id")
    return {**dest, "bulk_threshold": None, "max_in_flight": 1}  # one request at a time: each fault hits one request


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """A Customer Insights export (samplegen): 3,000 rows, bad rows and duplicates, one request."""
    root = tmp_path_factory.mktemp("small-export")
    info = samplegen.write_cdm_export(root, 3_000, seed=11, partitions=2)
    expected = reference_emails(root, info.model_key, "EmailAddress", [info.segment])
    assert len(expected) == info.valid_distinct
    return Export(root, info.model_key, _samplegen_destination(), frozenset(expected))


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """A plain CSV of 3,000 wide rows (five 1,000-character notes): three requests from a small file, so a fault
    can strike after some contacts were accepted. Bad emails and case-variant duplicates included."""
    root = tmp_path_factory.mktemp("wide-export")
    rng = random.Random(5)
    lines = ["email,first,last," + ",".join(WIDE_NOTES)]
    emails: list[str] = []
    for i in range(3_000):
        if i % 37 == 5:
            email = f"broken-{i}.example.com"
        elif i % 53 == 7 and emails:
            email = rng.choice(emails).upper()
        else:
            email = f"wide.{i}@example.com"
            emails.append(email)
        notes = [(f"{n}-{i}-" + "lorem ipsum dolor " * 60)[:1000] for n in WIDE_NOTES]
        lines.append(f"{email},First{i},Last{i}," + ",".join(notes))
    (root / "people.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    expected = reference_emails(root, "people.csv", "email")
    assert len(expected) == len(emails)
    dest = {"name": "wide", "consent": True, "api_key_secret": "sendgrid-api-key", "segments": ["people"],
            "mapping": {"email": "email", "first_name": "first", "last_name": "last"},
            "custom_fields": {n: n for n in WIDE_NOTES}, "max_profiles": None, "bulk_threshold": None,
            "max_in_flight": 1}
    return Export(root, "people.csv", dest, frozenset(expected))


def wait_until_counted(box: Sandbox, endpoint: str, requests: int, timeout: float = 30) -> None:
    """Wait until the sandbox has handled `requests` calls to endpoint: a request the client gave up on (timed out)
    is still being served, and applied, after the run has moved on."""
    give_up = time.monotonic() + timeout
    while box.stats["requests"].get(endpoint, 0) < requests:
        assert time.monotonic() < give_up, f"the sandbox never handled {requests} x {endpoint}"
        time.sleep(0.02)


def excess_sends(box: Sandbox) -> tuple[int, int]:
    """(sends beyond the first of each email, the most times one email was sent)."""
    counts = box.send_counts()
    return sum(c - 1 for c in counts.values()), max(counts.values(), default=0)


# ------------------------------------------------------------------------------------------------ the two doors


def cli_env(url: str, key: str = KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    env.update(SENDGRID_API_KEY=key, SENDGRID_API_URL=url, PYTHONUNBUFFERED="1")
    return env


def cli_args(config: Path, destination: str, source: Path, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shared", "export", "--config", str(config), "--destination", destination,
            "--source", str(source), "--state-dir", str(state), "--quiet", *extra]


def run_cli(leaks: Leaks, env: dict[str, str], args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    leaks.add("cli stdout", res.stdout)
    leaks.add("cli stderr", res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    return res


class CachedSecrets:
    """A provider that caches like Key Vault does (the key is read again only after a 401): a rotation in the key
    source reaches it through the client's refresh, not through get."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._source = EnvSecrets(environ)
        self._cache: dict[str, Secret] = {}

    def get(self, name: str) -> Secret:
        if name not in self._cache:
            self._cache[name] = self._source.get(name)
        return self._cache[name]

    def refresh(self, name: str) -> Secret:
        self._cache[name] = self._source.refresh(name)
        return self._cache[name]


@dataclass
class Engine:
    """In-process runs of one export to the sandbox, with a short retry policy."""

    sg: Box
    export: Export
    state_dir: Path
    leaks: Leaks
    policy: RetryPolicy = FAST
    environ: dict[str, str] = field(default_factory=lambda: {"SENDGRID_API_KEY": KEY})
    cached_key: bool = False
    state_store: Callable[[Path], ObjectStore] = LocalFolderStore

    def __post_init__(self) -> None:
        self.secrets = CachedSecrets(self.environ) if self.cached_key else EnvSecrets(self.environ)
        self.config = parse_config(orjson.dumps(self.export.config(self.sg.list_id)), "destinations.json")
        self.name = self.export.destination["name"]

    def client(self, dest: Any) -> SendGridClient:
        return SendGridClient(self.sg.url, self.secrets, dest.api_key_secret, policy=self.policy)

    def run(self, resume: str | None = None) -> dict[str, Any]:
        state = StateStore(self.state_store(self.state_dir))
        svc = engine.Services(config=self.config, secrets=self.secrets, state=state,
                              sources=LocalFolderStore(self.export.root), client_factory=self.client,
                              poll_interval=0.05, wait_timeout=60.0)
        record = engine.run(engine.RunRequest(self.name, self.export.key, wait=True, resume=resume), svc)
        self.leaks.add("run record", orjson.dumps(record))
        return record


@contextlib.contextmanager
def after_accepted_put(box: Sandbox, n: int, action: Callable[[], None], answer: int = 202) -> Iterator[None]:
    """Do `action` inside the sandbox right after the n-th upsert answered `answer` (accepted, by default), before
    that answer leaves: the next request meets whatever the action arms (a fault, a key rotation)."""
    original = box.op_upsert
    seen = [0]

    def hooked(req: Any) -> tuple[int, Any]:
        status, payload = original(req)
        if status == answer:
            seen[0] += 1
            if seen[0] == n:
                action()
        return status, payload

    box.op_upsert = hooked  # type: ignore[method-assign]
    try:
        yield
    finally:
        del box.op_upsert


def read_runs(state: Path, destination: str) -> list[dict[str, Any]]:
    return [orjson.loads(p.read_bytes()) for p in sorted((state / "runs" / destination).glob("*.json"))]


# ------------------------------------------------------------------------------------------------ faults via the CLI


CLI_FAULTS = {
    "429 storm with reset headers": [{"endpoint": PUT, "kind": "429", "reset_after": 0, "times": 2},
                                     {"endpoint": PUT, "kind": "429", "retry_after": 0, "times": 2}],
    "500 and 503": [{"endpoint": PUT, "kind": "500"}, {"endpoint": PUT, "kind": "503"}],
    "connection reset, before and after processing": [{"endpoint": PUT, "kind": "reset"},
                                                      {"endpoint": PUT, "kind": "reset", "processed": True}],
    "503 and reset on the job status": [{"endpoint": JOB_STATUS, "kind": "503"},
                                        {"endpoint": JOB_STATUS, "kind": "reset"}],
    "401 once (key read again)": [{"endpoint": PUT, "kind": "401"}],
}


@pytest.mark.parametrize("faults", list(CLI_FAULTS.values()), ids=list(CLI_FAULTS))
def test_cli_rides_out_transient_faults(faults: list[dict[str, Any]], sg: Box, small_export: Export, tmp_path: Path,
                                        leaks: Leaks, fault_tally: Any) -> None:
    config = tmp_path / "destinations.json"
    config.write_bytes(orjson.dumps(small_export.config(sg.list_id)))
    for fault in faults:
        sg.box.inject(fault)
    res = run_cli(leaks, cli_env(sg.url), cli_args(config, "vip-newsletter", small_export.root / small_export.key,
                                                   tmp_path / "state", "--wait", "--report", str(tmp_path / "r.json")))
    assert res.returncode == 0, res.stdout + res.stderr
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    stats = sg.box.stats
    assert stats["faults_fired"] == sum(f.get("times", 1) for f in faults)
    assert report["status"] == "completed" and report["error"] is None
    in_list = sg.settled_list()
    assert in_list == small_export.expected and report["counts"]["sent"] == len(in_list)
    rate_limited = sum(f.get("times", 1) for f in faults if f["kind"] == "429")
    assert report["requests"]["rate_limited"] == rate_limited
    # a request the sandbox applied but whose answer was lost is the only one sent twice
    replays = sum(1 for f in faults if f.get("processed") and f["endpoint"] == PUT)
    excess, most = excess_sends(sg.box)
    assert excess == replays * len(in_list) and most == 1 + replays
    if any(f["kind"] == "401" for f in faults):
        assert sg.statuses()["401"] == 1 and stats["requests"][PUT] == 2  # one re-read of the key, one retry
    fault_tally.record(faults=stats["faults_fired"], runs=1, expected=len(small_export.expected), in_list=len(in_list),
                       lost=len(small_export.expected - in_list), dup_beyond=excess - replays * len(in_list))


def test_errored_job_is_reported_with_its_errors_and_a_new_run_fills_the_list(sg: Box, small_export: Export,
                                                                               tmp_path: Path, leaks: Leaks,
                                                                               fault_tally: Any) -> None:
    config = tmp_path / "destinations.json"
    config.write_bytes(orjson.dumps(small_export.config(sg.list_id)))
    args = cli_args(config, "vip-newsletter", small_export.root / small_export.key, tmp_path / "state", "--wait")
    sg.box.inject({"endpoint": "job", "kind": "errored", "error_count": 3})
    res = run_cli(leaks, cli_env(sg.url), [*args, "--report", str(tmp_path / "r1.json")])
    assert res.returncode == 0, res.stdout + res.stderr
    report = orjson.loads((tmp_path / "r1.json").read_bytes())
    assert report["status"] == "completed_with_errors"
    [job] = report["jobs"]
    assert job["status"] == "errored" and job["results"]["errored_count"] == 3
    assert report["counts"]["not_applied"] == 3 and report["counts"]["sent"] == len(small_export.expected)
    named = {line.split(",")[1] for line in job["errors"][1:]}  # index,email,error
    assert len(named) == 3 and all("errored" in line for line in job["errors"][1:])
    in_list = sg.settled_list()
    assert in_list == small_export.expected - named  # every contact is in the list or named in the report
    excess, _ = excess_sends(sg.box)
    assert excess == 0

    res = run_cli(leaks, cli_env(sg.url), [*args, "--report", str(tmp_path / "r2.json")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert orjson.loads((tmp_path / "r2.json").read_bytes())["status"] == "completed"
    in_list = sg.settled_list()
    assert in_list == small_export.expected
    fault_tally.record(faults=1, runs=2, expected=len(small_export.expected), in_list=len(in_list),
                       lost=len(small_export.expected - in_list), dup_beyond=excess)


def test_failed_job_fails_the_run_and_a_new_run_fills_the_list(sg: Box, small_export: Export, tmp_path: Path,
                                                               leaks: Leaks, fault_tally: Any) -> None:
    config = tmp_path / "destinations.json"
    config.write_bytes(orjson.dumps(small_export.config(sg.list_id)))
    args = cli_args(config, "vip-newsletter", small_export.root / small_export.key, tmp_path / "state", "--wait")
    sg.box.inject({"endpoint": "job", "kind": "failed"})
    res = run_cli(leaks, cli_env(sg.url), [*args, "--report", str(tmp_path / "r1.json")])
    assert res.returncode == 1
    report = orjson.loads((tmp_path / "r1.json").read_bytes())
    assert report["status"] == "failed" and "every SendGrid job failed" in report["error"]
    assert "failed" in res.stdout and [j["status"] for j in report["jobs"]] == ["failed"]
    assert report["counts"]["not_applied"] == report["counts"]["sent"] == len(small_export.expected)
    assert sg.settled_list() == set()  # the report says the one job failed: nothing is claimed to be in the list
    excess, _ = excess_sends(sg.box)

    res = run_cli(leaks, cli_env(sg.url), [*args, "--report", str(tmp_path / "r2.json")])
    assert res.returncode == 0, res.stdout + res.stderr
    in_list = sg.settled_list()
    assert in_list == small_export.expected
    fault_tally.record(faults=1, runs=2, expected=len(small_export.expected), in_list=len(in_list),
                       lost=len(small_export.expected - in_list), dup_beyond=excess)


def test_failed_job_report_holds_its_errors_file(sg: Box, small_export: Export, tmp_path: Path, leaks: Leaks) -> None:
    sg.box.inject({"endpoint": "job", "kind": "failed"})
    record = Engine(sg, small_export, tmp_path / "state", leaks).run()
    assert record["status"] == "failed"
    assert record["jobs"][0].get("errors"), "a failed job's errors file is not in the report"


# ------------------------------------------------------------------------------------------------ faults mid-run


def _arm(box: Sandbox, *faults: dict[str, Any]) -> Callable[[], None]:
    return lambda: [box.inject(f) for f in faults]


MID_RUN = {
    # id: (faults armed after the first accepted request, or "revoke" the key; policy; status; error words)
    "500/503 outlasting the retry budget": (
        [{"endpoint": PUT, "kind": "503", "times": 2}, {"endpoint": PUT, "kind": "500", "times": 2}], FAST,
        "interrupted", ["PUT /v3/marketing/contacts", "500", "giving up for now"]),
    "connections reset outlasting the budget": (
        [{"endpoint": PUT, "kind": "reset", "times": 4}], FAST, "interrupted", ["connection failed 4 times"]),
    "429 outlasting the patience": (
        [{"endpoint": PUT, "kind": "429", "reset_after": 5}],
        RetryPolicy(max_attempts=4, backoff_base=0.01, max_rate_limit_wait=1.0), "interrupted", ["still rate limited"]),
    "403 temporary block": (
        [{"endpoint": PUT, "kind": "403"}], FAST, "failed", ["403", "temporary block", "Marketing"]),
    "401 revoked key": (
        "revoke", FAST, "failed", ["401", "update the secret"]),
}


@pytest.mark.parametrize("case", list(MID_RUN.values()), ids=list(MID_RUN))
def test_fault_mid_run_stops_resumably_and_resume_completes(case: tuple[Any, ...], sg: Box, wide_export: Export,
                                                            tmp_path: Path, leaks: Leaks, fault_tally: Any) -> None:
    faults, policy, status, words = case
    runner = Engine(sg, wide_export, tmp_path / "state", leaks, policy=policy)
    action = (lambda: sg.box.rotate_keys([KEY2])) if faults == "revoke" else _arm(sg.box, *faults)
    with after_accepted_put(sg.box, 1, action):
        first = runner.run()
    assert first["status"] == status, first["error"]
    assert all(w in first["error"] for w in words), first["error"]
    accepted = first["requests"]["count"]
    assert accepted == 1 and 0 < first["counts"]["sent"] == first["checkpoint"]["contacts_done"]
    in_list = sg.settled_list()
    assert len(in_list) == first["counts"]["sent"]  # the report says exactly what was sent
    if status == "failed" and faults != "revoke":
        assert sg.statuses().get(faults[0]["kind"]) == 1  # no blind retries of a 403 / of a long 429

    if faults == "revoke":  # the admin stores the new key
        runner.environ["SENDGRID_API_KEY"] = KEY2
    second = runner.run(resume=first["run_id"])
    assert second["run_id"] == first["run_id"] and second["status"] == "completed", second["error"]
    assert second["checkpoint"]["resumed"] == 1
    in_list = sg.settled_list()
    assert in_list == wide_export.expected and second["counts"]["sent"] == len(in_list)
    excess, most = excess_sends(sg.box)
    assert excess == 0 and most == 1  # nothing accepted was sent again; nothing refused was counted as sent
    fault_tally.record(faults=sg.box.stats["faults_fired"] + (faults == "revoke"), runs=2,
                       expected=len(wide_export.expected), in_list=len(in_list),
                       lost=len(wide_export.expected - in_list), dup_beyond=excess)


def test_refusals_of_a_batch_interrupted_before_it_was_accepted_are_counted_once(sg: Box, tmp_path: Path,
                                                                                   leaks: Leaks) -> None:
    """SendGrid refuses three addresses; the resend of the rest fails past the retry budget. The checkpoint counts
    refusals with the batch that passes, so the resume (which re-sends that batch and meets them again) ends with
    three refusals, a report that says what the list holds, and nothing sent twice."""
    refused = {f"bad.{i}@refused.invalid" for i in (10, 20, 30)}
    emails = [f"bad.{i}@refused.invalid" if i in (10, 20, 30) else f"person.{i}@example.com" for i in range(200)]
    (tmp_path / "people.csv").write_text("email,first\r\n" + "".join(f"{e},P\r\n" for e in emails), encoding="utf-8")
    dest = {"name": "people", "consent": True, "api_key_secret": "sendgrid-api-key", "segments": ["people"],
            "mapping": {"email": "email", "first_name": "first"}, "max_profiles": None, "bulk_threshold": None,
            "max_in_flight": 1}
    export = Export(tmp_path, "people.csv", dest, frozenset(set(emails) - refused))
    runner = Engine(sg, export, tmp_path / "state", leaks)
    with after_accepted_put(sg.box, 1, _arm(sg.box, {"endpoint": PUT, "kind": "500", "times": FAST.max_attempts}),
                            answer=400):
        first = runner.run()
    assert first["status"] == "interrupted" and first["checkpoint"]["contacts_done"] == 0, first["error"]
    assert first["checkpoint"]["refused_by_sendgrid"] == 0 and first["counts"]["sent"] == 0
    second = runner.run(resume=first["run_id"])
    assert second["status"] == "completed", second["error"]
    assert second["checkpoint"]["refused_by_sendgrid"] == 3 and second["counts"]["rejected"]["refused_by_sendgrid"] == 3
    assert sg.settled_list() == export.expected and second["counts"]["sent"] == len(export.expected)
    assert excess_sends(sg.box) == (0, 1)


def test_temporary_block_is_marked_resumable(sg: Box, small_export: Export, tmp_path: Path, leaks: Leaks) -> None:
    sg.box.inject({"endpoint": PUT, "kind": "403"})
    record = Engine(sg, small_export, tmp_path / "state", leaks).run()
    assert record["status"] == "failed" and "temporary block" in record["error"]
    assert record.get("resumable") is True


@pytest.mark.parametrize("cached_key", [False, True], ids=["key re-read each call", "key cached until a 401"])
def test_key_rotated_mid_run_is_picked_up(cached_key: bool, sg: Box, wide_export: Export, tmp_path: Path,
                                          leaks: Leaks, fault_tally: Any) -> None:
    runner = Engine(sg, wide_export, tmp_path / "state", leaks, cached_key=cached_key)

    def rotate() -> None:
        sg.box.rotate_keys([KEY2])
        runner.environ["SENDGRID_API_KEY"] = KEY2

    with after_accepted_put(sg.box, 1, rotate):
        record = runner.run()
    assert record["status"] == "completed", record["error"]
    assert sg.statuses().get("401", 0) == (1 if cached_key else 0)
    in_list = sg.settled_list()
    assert in_list == wide_export.expected and record["counts"]["sent"] == len(in_list)
    excess, _ = excess_sends(sg.box)
    assert excess == 0
    fault_tally.record(faults=1, runs=1, expected=len(wide_export.expected), in_list=len(in_list),
                       lost=len(wide_export.expected - in_list), dup_beyond=excess)


def test_bursts_and_answers_slower_than_the_read_timeout_are_retried(sg: Box, small_export: Export, tmp_path: Path,
                                                                      leaks: Leaks, fault_tally: Any) -> None:
    policy = RetryPolicy(max_attempts=10, backoff_base=0.01, backoff_max=0.05, read_timeout=1.0)
    for fault in ({"endpoint": PUT, "kind": "500", "times": 3}, {"endpoint": PUT, "kind": "503", "times": 3},
                  {"endpoint": PUT, "kind": "slow", "delay": 2.5},
                  {"endpoint": JOB_STATUS, "kind": "slow", "delay": 2.5}):
        sg.box.inject(fault)
    record = Engine(sg, small_export, tmp_path / "state", leaks, policy=policy).run()
    assert record["status"] == "completed", record["error"]
    assert record["requests"]["retries"] == 8  # 3 x 500, 3 x 503, 2 timeouts
    wait_until_counted(sg.box, PUT, 8)  # 6 errors, the slow one (still sleeping), its retry
    in_list = sg.settled_list()
    assert in_list == small_export.expected and record["counts"]["sent"] == len(in_list)
    # the slow request was applied after the client gave up on it: that request in flight, and only it, went twice
    excess, most = excess_sends(sg.box)
    assert excess == len(in_list) and most == 2
    fault_tally.record(faults=sg.box.stats["faults_fired"], runs=1, expected=len(small_export.expected),
                       in_list=len(in_list), lost=len(small_export.expected - in_list),
                       dup_beyond=excess - len(in_list))


# ------------------------------------------------------------------------------------------------ crash and resume


def _checkpoint(state: Path, destination: str) -> tuple[str | None, int]:
    """(run id, contacts_done) of the one run in the state folder, or (None, -1) before its record exists."""
    runs = read_runs(state, destination)
    if not runs:
        return None, -1
    return runs[0]["run_id"], runs[0]["checkpoint"]["contacts_done"]


def _sent(state: Path, destination: str) -> int:
    """counts.sent of the one run in the state folder (its stored checkpoint), or -1 before its record exists."""
    runs = read_runs(state, destination)
    return runs[0]["counts"]["sent"] if runs else -1


class Killer:
    """SIGKILLs the CLI from inside the sandbox at planned points, in order, observed through the sandbox's calls and
    the state store, never the clock: ("fields", _) on its field definitions call (while it starts, before its run
    record exists); ("put", "before"|"after") on a request, before SendGrid applies it or after (applied, its answer
    lost), once the run's stored checkpoint has passed the previous request kill's (so no request is in flight at two
    kills); ("poll", _) on a job-status call once the stored run says all `total` contacts were sent (the job poller
    also asks while requests are in flight: a kill then would send them again). While "poll" is the next point the
    sandbox holds its jobs, so the sweep after the last request is sure to ask for their status."""

    def __init__(self, box: Sandbox, state: Path, destination: str, plan: list[tuple[str, str]], total: int) -> None:
        self.box, self.state, self.destination, self.plan, self.total = box, state, destination, list(plan), total
        self.proc: subprocess.Popen[str] | None = None
        self.floor = -1  # the stored checkpoint at the last request kill
        self.kills: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        for where, op in (("fields", "op_fields_get"), ("put", "op_upsert"), ("poll", "op_job_status")):
            original = getattr(box, op)
            setattr(box, op, lambda req, where=where, original=original: self._at(where, req, original))
        self._hold_before_poll()

    def _hold_before_poll(self) -> None:
        if self.plan and self.plan[0][0] == "poll":
            self.box.hold_jobs()
        else:
            self.box.release_jobs()

    def _at(self, where: str, req: Any, original: Callable[[Any], tuple[int, Any]]) -> tuple[int, Any]:
        with self._lock:
            due = bool(self.plan) and self.plan[0][0] == where and self.proc is not None
            if due and where == "put":
                done = _checkpoint(self.state, self.destination)[1]
                due = done > self.floor
                self.floor = done if due else self.floor
            elif due and where == "poll":
                due = _sent(self.state, self.destination) == self.total
            if not due:
                return original(req)
            _, phase = self.plan.pop(0)
            proc = self.proc
            self._hold_before_poll()
        answer = original(req) if phase == "after" else (503, {"errors": [{"message": "the client was killed"}]})
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        self.kills.append((where, phase))
        return answer

    def close(self) -> None:
        for op in ("op_fields_get", "op_upsert", "op_job_status"):
            delattr(self.box, op)
        self.box.release_jobs()


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_sigkill_at_seeded_points_then_resume_loses_nothing(sg: Box, tmp_path: Path, leaks: Leaks,
                                                            fault_tally: Any, in_flight: int) -> None:
    """The CLI is killed (SIGKILL) five times at points a seeded generator picks (see Killer) and resumed with
    --resume each time: while it starts, on three requests (each before or after SendGrid applied it), and while it
    polls the jobs. The list always holds what the stored checkpoint says plus at most the requests in flight; in
    the end every contact is there, none sent more than twice, and only the requests in flight at a kill went
    twice."""
    rng = random.Random(20261128)
    plan = [("fields", "-"), *(("put", rng.choice(("before", "after"))) for _ in range(3)), ("poll", "-")]
    info = samplegen.write_cdm_export(tmp_path / "export", 150_000, seed=3, partitions=4)  # 5 requests
    expected = reference_emails(tmp_path / "export", info.model_key, "EmailAddress", [info.segment])
    assert len(expected) == info.valid_distinct
    config = tmp_path / "destinations.json"
    dest = {**_samplegen_destination(), "list_id": sg.list_id, "max_in_flight": in_flight}
    config.write_bytes(orjson.dumps({"destinations": [dest]}))
    state = tmp_path / "state"
    base = cli_args(config, "vip-newsletter", tmp_path / "export" / info.model_key, state, "--wait")
    per_request = limits.MAX_CONTACTS_PER_REQUEST
    killer = Killer(sg.box, state, "vip-newsletter", plan, total=len(expected))
    runs, run_id = 0, None
    try:
        while True:
            args = [*base, "--resume", run_id] if run_id else base
            killer.proc = subprocess.Popen(args, cwd=REPO, env=cli_env(sg.url), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
            runs += 1
            out, err = killer.proc.communicate(timeout=180)
            for text in (out, err):
                leaks.add("cli output", text)
                assert "Traceback" not in text
            if killer.proc.returncode == 0:
                break
            assert killer.proc.returncode == -signal.SIGKILL, out + err
            run_id, done = _checkpoint(state, "vip-newsletter")
            if run_id is not None:  # the list holds what the record says was sent, plus the requests in flight
                assert 0 <= len(sg.settled_list()) - done <= per_request * in_flight
    finally:
        killer.close()
    assert killer.kills == [(w, p) for w, p in plan] and runs == len(plan) + 1
    [final] = read_runs(state, "vip-newsletter")
    assert final["status"] == "completed" and final["counts"]["sent"] == len(expected), final["error"]
    assert final["checkpoint"]["resumed"] == len(plan) - 1  # the kill at start-up left no record to resume
    in_list = sg.settled_list()
    assert in_list == expected and len(in_list) == info.valid_distinct
    assert set(sg.box.send_counts()) == expected
    excess, most = excess_sends(sg.box)
    allowance = sum(phase == "after" for _, phase in plan) * sg.box.stats["max_contacts_per_request"] * in_flight
    assert most <= 2, "a contact was sent more than twice"
    assert excess <= allowance
    beyond = sum(c - 2 for c in sg.box.send_counts().values() if c > 2) + max(0, excess - allowance)
    fault_tally.record(scenario=f"SIGKILL at 5 seeded points, resumed each time, {in_flight} in flight",
                       faults=len(killer.kills),
                       runs=runs, expected=len(expected), in_list=len(in_list), lost=len(expected - in_list),
                       dup_beyond=beyond)


def test_resume_after_everything_was_accepted_reports_what_was_sent(sg: Box, small_export: Export, tmp_path: Path,
                                                                    leaks: Leaks) -> None:
    runner = Engine(sg, small_export, tmp_path / "state", leaks)
    sg.box.inject({"endpoint": JOB_STATUS, "kind": "503", "times": FAST.max_attempts})  # polls give up
    first = runner.run()
    assert first["status"] == "interrupted" and first["counts"]["sent"] == len(small_export.expected)
    second = runner.run(resume=first["run_id"])
    assert second["status"] == "completed" and second["requests"]["count"] == 1
    assert second["counts"]["sent"] == len(small_export.expected) == len(sg.settled_list())


# ------------------------------------------------------------------------------------------------ storage and leases


LEASE_S = 15  # the shortest blob lease: the lease tests below outwait it


class AppWorld:
    """The Functions app's doors (app.on_blob, app.on_timer) on Blob Storage: the export and the state in two
    containers of one account, reached through `connection_string` (Azurite, maybe behind the 503 proxy), as in
    Azure; SendGrid is the sandbox. Each ctx() is a fresh context, as every invocation builds one."""

    def __init__(self, connection_string: str, sg: Box, export: Export, tmp: Path, lease_seconds: int) -> None:
        self.connection_string, self.sg, self.export, self.lease_seconds = connection_string, sg, export, lease_seconds
        self.name = export.destination["name"]
        self.key = f"{self.name}/{export.key}"  # a plain file under <destination>/ runs that destination
        self.config = tmp / "destinations.json"
        self.config.write_bytes(orjson.dumps(export.config(sg.list_id)))
        self.environ = {"SENDGRID_API_URL": sg.url, "SENDGRID_API_KEY": KEY}
        self.suffix = secrets.token_hex(4)

    def ctx(self) -> context.AppContext:
        world = self

        class Context(context.AppContext):
            def services(self, config: Any) -> engine.Services:
                return dataclasses.replace(super().services(config), lease_seconds=world.lease_seconds)

        settings = context.Settings(f"exports-{self.suffix}", f"state-{self.suffix}", str(self.config), 600.0,
                                self.environ)
        return Context(settings, blobstore.from_connection_string(self.connection_string, settings.exports_container,
                                                                  create=True),
                       StateStore(blobstore.from_connection_string(self.connection_string, settings.state_container,
                                                                   create=True)),
                       EnvSecrets(self.environ))

    def upload(self) -> None:
        with open(self.export.root / self.export.key, "rb") as fh:
            self.ctx().exports.write_stream(self.key, iter(lambda: fh.read(1 << 20), b""))

    def record(self, run_id: str) -> dict[str, Any]:
        record = self.ctx().state.load_run(run_id)
        assert record is not None
        return record

    def tick_until_final(self, run_id: str, leaks: Leaks, patience: float = 90) -> dict[str, Any]:
        """Timer ticks until the run is final (the first may find its lease still held: it lapses in LEASE_S)."""
        give_up = time.monotonic() + patience
        while True:
            for report in app.on_timer(self.ctx()):
                leaks.add("timer report", orjson.dumps(report))
            record = self.record(run_id)
            if record["status"] not in ("running", "interrupted", "submitted"):
                return record
            assert time.monotonic() < give_up, f"the timer never finished run {run_id}: {record['status']}"
            time.sleep(1.0)  # the timer's period, shortened

    def tally(self, fault_tally: Any, scenario: str, *, faults: int, runs: int, in_flight: int) -> None:
        """Check and record: the list holds the export, nothing sent beyond `in_flight` contacts twice."""
        in_list = self.sg.settled_list()
        excess, most = excess_sends(self.sg.box)
        assert in_list == self.export.expected
        assert most <= 2 and excess <= in_flight, (excess, in_flight)
        fault_tally.record(scenario=scenario, faults=faults, runs=runs, expected=len(self.export.expected),
                           in_list=len(in_list), lost=len(self.export.expected - in_list),
                           dup_beyond=max(0, excess - in_flight))


@pytest.fixture
def disk_azurite(tmp_path: Path) -> Iterator[DiskAzurite]:
    azurite = DiskAzurite(tmp_path / "azurite-data")
    azurite.start()
    try:
        yield azurite
    finally:
        azurite.stop()


@pytest.mark.azurite
@pytest.mark.slow
def test_storage_answering_503_for_25_s_after_a_checkpoint_leaves_the_run_resumable(
        azurite: Any, sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks, fault_tally: Any) -> None:
    """Issue 12 §1: Blob Storage answers 503 for 25 s right after the first request was accepted, longer than the
    storage retry budget. The run stops `interrupted` (resumable, the budget named), never `failed`, and the timer
    finishes it."""
    proxy = StorageProxy(azurite.blob_url)
    try:
        world = AppWorld(proxy.connection_string, sg, wide_export, tmp_path, services.LEASE_SECONDS)
        world.upload()
        with after_accepted_put(sg.box, 1, lambda: proxy.outage(seconds=25)):
            [first] = app.on_blob(world.ctx(), world.key)
        leaks.add("first run", orjson.dumps(first))
        assert first["status"] == "interrupted" and first["resumable"] is True, first["error"]
        assert blobstore.RETRY_BUDGET in first["error"] and "503" in first["error"]
        assert proxy.refused >= blobstore.STORAGE_ATTEMPTS
        stored = world.record(first["run_id"])
        assert stored["status"] in ("running", "interrupted")  # never final after a failed checkpoint save
        final = world.tick_until_final(first["run_id"], leaks)
    finally:
        proxy.close()
    assert final["status"] == "completed" and final["checkpoint"]["resumed"] == 1, final["error"]
    assert final["counts"]["sent"] == len(wide_export.expected)
    # the accepted request is stored with the interrupted record; only if even that save failed is it sent again
    world.tally(fault_tally, "storage: 503 for 25 s after a checkpoint", faults=1, runs=2,
                in_flight=sg.box.stats["max_contacts_per_request"] if stored["checkpoint"]["contacts_done"] == 0 else 0)


@pytest.mark.azurite
@pytest.mark.slow
def test_azurite_stopped_for_25_s_after_a_checkpoint_then_the_timer_resumes_the_run(
        disk_azurite: DiskAzurite, sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks,
        fault_tally: Any) -> None:
    """Issue 12 §1: the storage process is gone (every connection refused) from right after the first accepted
    request until the run gave up, and 25 s at least. Even the run's last save fails: the stored record stays at its
    last good checkpoint, `running`, and the timer resumes it once its lease has lapsed."""
    world = AppWorld(disk_azurite.connection_string, sg, wide_export, tmp_path, LEASE_S)
    world.upload()
    stopped: list[float] = []

    def stop() -> None:
        stopped.append(time.monotonic())
        disk_azurite.stop()

    with after_accepted_put(sg.box, 1, stop):
        [first] = app.on_blob(world.ctx(), world.key)
    leaks.add("first run", orjson.dumps(first))
    assert first["status"] == "interrupted" and first["resumable"] is True, first["error"]
    assert "could not be stored" in first["error"] or "nothing more was stored" in first["error"], first["error"]
    time.sleep(max(0.0, stopped[0] + 25 - time.monotonic()))  # the outage lasts 25 s at least
    disk_azurite.start()
    stored = world.record(first["run_id"])
    assert stored["status"] == "running" and stored["checkpoint"]["contacts_done"] == 0  # its last good save
    final = world.tick_until_final(first["run_id"], leaks)
    assert final["status"] == "completed" and final["checkpoint"]["resumed"] == 1, final["error"]
    assert final["counts"]["sent"] == len(wide_export.expected)
    # the request accepted while storage was gone had no checkpoint: it is the one request sent twice
    world.tally(fault_tally, "storage: Azurite stopped for 25 s after a checkpoint", faults=1, runs=2,
                in_flight=sg.box.stats["max_contacts_per_request"])


LONG_WAITS = {
    "429 with Retry-After beyond the lease": {"endpoint": PUT, "kind": "429", "retry_after": LEASE_S + 5},
    "answer slower than the lease": {"endpoint": PUT, "kind": "slow", "delay": LEASE_S + 5},
}


@pytest.mark.azurite
@pytest.mark.slow
@pytest.mark.parametrize("fault", list(LONG_WAITS.values()), ids=list(LONG_WAITS))
def test_the_lease_outlives_a_long_wait_on_sendgrid_and_the_timer_keeps_off(
        fault: dict[str, Any], azurite: Any, sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks,
        fault_tally: Any) -> None:
    """Issue 12 §2: the run waits on SendGrid longer than its lease lasts unrenewed (here 20 s against 15 s). The
    keeper renews it meanwhile, so every timer tick during the wait finds the destination busy: nothing is resumed
    beside the run, every contact is sent once, and the record is the run's own (resumed 0)."""
    world = AppWorld(azurite.connection_string, sg, wide_export, tmp_path, LEASE_S)
    world.upload()
    armed: list[float] = []
    outcome: list[Any] = []

    def arm() -> None:
        armed.append(time.monotonic())
        sg.box.inject(fault)

    def first_run() -> None:
        with after_accepted_put(sg.box, 1, arm):
            outcome.extend(app.on_blob(world.ctx(), world.key))

    sg.box.hold_jobs()  # the run's jobs are pending when it polls them once at its end
    runner = threading.Thread(target=first_run)
    runner.start()
    ticks_after_lapse = 0
    while runner.is_alive():
        for report in app.on_timer(world.ctx()):  # each finds the destination busy
            leaks.add("timer report", orjson.dumps(report))
        ticks_after_lapse += bool(armed) and time.monotonic() > armed[0] + LEASE_S + 1
        runner.join(timeout=1.0)  # the timer's period, shortened
    [first] = outcome
    leaks.add("first run", orjson.dumps(first))
    assert ticks_after_lapse >= 1, "no tick came after an unrenewed lease would have lapsed"
    assert first["status"] == "submitted" and first["checkpoint"]["resumed"] == 0, first["error"]
    sg.box.release_jobs()
    sg.box.complete_jobs()
    final = world.tick_until_final(first["run_id"], leaks)  # a blob-triggered run leaves its jobs to the timer
    assert final["status"] == "completed" and final["checkpoint"]["resumed"] == 0, final["error"]
    world.tally(fault_tally, f"lease: {fault['kind']} wait of {LEASE_S + 5} s (lease {LEASE_S} s)", faults=1,
                runs=1, in_flight=0)


@pytest.mark.azurite
@pytest.mark.slow
def test_a_run_whose_lease_is_lost_during_a_long_wait_stops_and_writes_nothing(
        azurite: Any, sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks, fault_tally: Any) -> None:
    """Issue 12 §2 and §5: while the run waits on a 429 (Retry-After 20 s), its lease is broken and the timer's run
    takes the destination over and finishes the export. The first run stops at once as `interrupted` and writes
    nothing: it sends no request again and cannot overwrite the record of the run that finished."""
    world = AppWorld(azurite.connection_string, sg, wide_export, tmp_path, LEASE_S)
    world.upload()
    outcome: list[Any] = []

    def first_run() -> None:
        with after_accepted_put(sg.box, 1, _arm(sg.box, {"endpoint": PUT, "kind": "429",
                                                         "retry_after": LEASE_S + 5})):
            outcome.extend(app.on_blob(world.ctx(), world.key))

    runner = threading.Thread(target=first_run)
    runner.start()
    give_up = time.monotonic() + 60
    while sg.statuses().get("429", 0) < 1:  # the first run is waiting on the 429
        assert time.monotonic() < give_up and runner.is_alive(), "the 429 was never served"
        time.sleep(0.02)
    state_container = world.ctx().state.store.container  # type: ignore[attr-defined]
    BlobLeaseClient(state_container.get_blob_client(f"leases/{world.name}")).break_lease(lease_break_period=0)
    run_id = world.ctx().state.open_runs()[0]["run_id"]
    final = world.tick_until_final(run_id, leaks)  # the timer's run takes the lease and finishes the export
    runner.join(timeout=60)
    assert not runner.is_alive(), "the first run did not stop"
    [first] = outcome
    leaks.add("first run", orjson.dumps(first))
    assert first["status"] == "interrupted" and "lost" in first["error"], first["error"]
    assert final["status"] == "completed" and final["checkpoint"]["resumed"] == 1, final["error"]
    assert world.record(run_id) == final  # the first run's last save never happened
    world.tally(fault_tally, "lease: lost during a 429 wait, taken over by the timer", faults=1, runs=2,
                in_flight=0)


class FailingRecordWrites(LocalFolderStore):
    """A state folder whose run record writes fail from the `first`-th one on (`count` of them): a store that stopped
    answering, as the state store sees it (a StateError)."""

    def __init__(self, root: Path, first: int, count: int) -> None:
        super().__init__(root)
        self.first, self.count, self.seen = first, count, 0

    def write_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        if key.startswith("runs/") and key.endswith(".json"):
            self.seen += 1
            if self.first <= self.seen < self.first + self.count:
                raise StateError(f"writing {key!r} failed: storage unreachable (injected)")
        return super().write_bytes(key, data, **kwargs)


# (record write that fails first, how many fail, what the store holds after the run)
FAILED_SAVES = {
    "a checkpoint save": (3, 1, "interrupted"),  # after the second request; the run's last save goes through
    "every save from the last checkpoint on": (4, 99, "running"),  # the record stays at the second request's
}


@pytest.mark.parametrize("case", list(FAILED_SAVES.values()), ids=list(FAILED_SAVES))
def test_a_failed_state_write_never_leaves_a_final_status_and_the_resume_completes(
        case: tuple[int, int, str], sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks) -> None:
    """Issue 12 §1: a run whose record cannot be written stops `interrupted` and resumable (it was saved `failed`,
    final, before), and no final status is stored after a failed save. The resume sends only what no stored
    checkpoint covers."""
    first, count, stored_status = case
    state = tmp_path / "state"
    runner = Engine(sg, wide_export, state, leaks, state_store=lambda root: FailingRecordWrites(root, first, count))
    stopped = runner.run()
    assert stopped["status"] == "interrupted" and stopped["resumable"] is True, stopped["error"]
    assert "storage unreachable (injected)" in stopped["error"]
    [stored] = read_runs(state, runner.name)
    assert stored["status"] == stored_status
    done = stored["checkpoint"]["contacts_done"]
    assert 0 < done < len(wide_export.expected)
    resumed = Engine(sg, wide_export, state, leaks).run(resume=stopped["run_id"])
    assert resumed["status"] == "completed" and resumed["counts"]["sent"] == len(wide_export.expected)
    assert sg.settled_list() == wide_export.expected
    excess, _ = excess_sends(sg.box)
    assert excess == stopped["checkpoint"]["contacts_done"] - done  # only what no stored checkpoint covered


def test_a_step_that_swallows_a_failed_save_cannot_make_the_run_final(
        sg: Box, wide_export: Export, tmp_path: Path, leaks: Leaks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a step does with a failed checkpoint save (here: goes on as if it had worked), the run's end does not
    store a final status: what SendGrid holds is not known to the store."""
    original = stream.Stream._commit

    def swallowing(self: Any, *args: Any) -> None:
        with contextlib.suppress(StateError):
            original(self, *args)

    monkeypatch.setattr(stream.Stream, "_commit", swallowing)
    state = tmp_path / "state"
    runner = Engine(sg, wide_export, state, leaks, state_store=lambda root: FailingRecordWrites(root, 2, 1))
    stopped = runner.run()
    assert stopped["status"] == "interrupted" and "storage unreachable (injected)" in stopped["error"]
    assert read_runs(state, runner.name)[0]["status"] == "interrupted"
    monkeypatch.undo()
    assert Engine(sg, wide_export, state, leaks).run(resume=stopped["run_id"])["status"] == "completed"


def _people(numbers: range) -> bytes:
    return ("email,first\r\n" + "".join(f"person.{i}@example.com,P{i}\r\n" for i in numbers)).encode()


@pytest.mark.azurite
@pytest.mark.slow
def test_a_mirror_removal_waiting_past_its_lease_keeps_a_newer_export_out_until_it_is_done(
        azurite: Any, sg: Box, tmp_path: Path, leaks: Leaks, fault_tally: Any) -> None:
    """Issue 12 §5: a mirror run's removal waits on a 429 longer than its lease lasts unrenewed while a newer export
    arrives. Before, the newer export ran beside it (the lease had lapsed), re-added the people the old run was about
    to remove, and the old run's late removal took them out again: the list ended 100 short of the latest export.
    Now the lease is kept, the newer export waits for the timer, and the list follows the latest export."""
    dest = {"name": "mirrored", "consent": True, "api_key_secret": "sendgrid-api-key", "segments": ["people"],
            "mapping": {"email": "email", "first_name": "first"}, "mode": "mirror", "max_profiles": None,
            "bulk_threshold": None}
    latest = frozenset(f"person.{i}@example.com" for i in range(1_000))
    world = AppWorld(azurite.connection_string, sg, Export(tmp_path, "e.csv", dest, latest), tmp_path, LEASE_S)
    exports = world.ctx().exports
    for version, numbers in (("e0", range(1_000)), ("e1", range(100, 1_100)), ("e2", range(1_000))):
        exports.write_bytes(f"mirrored/{version}.csv", _people(numbers))
    [first] = app.on_blob(world.ctx(), "mirrored/e0.csv")
    world.tick_until_final(first["run_id"], leaks)
    sg.box.inject({"endpoint": "DELETE /v3/marketing/lists/{id}/contacts", "kind": "429", "retry_after": LEASE_S + 5})
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.extend(app.on_blob(world.ctx(), "mirrored/e1.csv")))
    runner.start()  # e1 leaves 100 people out: its removal meets the 429
    give_up = time.monotonic() + 60
    while sg.statuses().get("429", 0) < 1:
        assert time.monotonic() < give_up and runner.is_alive(), "the removal never met the 429"
        time.sleep(0.02)
    assert [r["status"] for r in app.on_blob(world.ctx(), "mirrored/e2.csv")] == ["deferred"]  # e2 lands meanwhile
    while runner.is_alive():
        for report in app.on_timer(world.ctx()):
            leaks.add("timer report", orjson.dumps(report))
        runner.join(timeout=1.0)  # the timer's period, shortened
    [older] = outcome
    # a mirror run waits for its jobs and its removals within its deadline (600 s here)
    assert older["status"] == "completed" and older["mirror"]["removed"] == 100, older["error"]
    give_up = time.monotonic() + 90
    while True:  # the timer syncs the latest export, e2, once the older run is done
        for report in app.on_timer(world.ctx()):
            leaks.add("timer report", orjson.dumps(report))
        state = world.ctx().state
        claim = state.export_claim("mirrored", "mirrored/e2.csv", exports.info("mirrored/e2.csv").etag)
        if claim and not state.open_runs():
            break
        assert time.monotonic() < give_up, "the latest export was never synced"
        time.sleep(1.0)
    assert world.record(claim["run_id"])["status"] == "completed"
    in_list = sg.settled_list()
    assert in_list == latest, f"{len(in_list)} in the list against {len(latest)} in the latest export"
    fault_tally.record(scenario="lease: mirror removal waiting past its lease, newer export", faults=1, runs=3,
                       expected=len(latest), in_list=len(in_list & latest), lost=len(latest - in_list))


# ------------------------------------------------------------------------------------------------ two runs at once


def test_a_second_run_of_the_same_export_is_refused_while_the_first_runs(sg: Box, small_export: Export,
                                                                         tmp_path: Path, leaks: Leaks,
                                                                         fault_tally: Any) -> None:
    config = tmp_path / "destinations.json"
    config.write_bytes(orjson.dumps(small_export.config(sg.list_id)))
    state = tmp_path / "state"
    args = cli_args(config, "vip-newsletter", small_export.root / small_export.key, state, "--wait")
    entered, release = threading.Event(), threading.Event()
    original = sg.box.op_upsert

    def held(req: Any) -> tuple[int, Any]:  # the first run's request stays in flight until the second has ended
        entered.set()
        release.wait(60)
        return original(req)

    sg.box.op_upsert = held  # type: ignore[method-assign]
    try:
        first = subprocess.Popen(args, cwd=REPO, env=cli_env(sg.url), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert entered.wait(60), "the first run never sent its request"
        second = run_cli(leaks, cli_env(sg.url), args)
        release.set()
        out, err = first.communicate(timeout=60)
    finally:
        release.set()
        del sg.box.op_upsert
    leaks.add("first stdout", out)
    leaks.add("first stderr", err)
    assert second.returncode == 1 and "being exported by another run" in second.stderr
    assert first.returncode == 0, out + err
    [record] = read_runs(state, "vip-newsletter")  # the refused run left no record and sent nothing
    assert record["status"] == "completed" and record["requests"]["count"] == sg.box.stats["requests"][PUT] == 1
    in_list = sg.settled_list()
    assert in_list == small_export.expected
    excess, _ = excess_sends(sg.box)
    assert excess == 0
    fault_tally.record(faults=1, runs=2, expected=len(small_export.expected), in_list=len(in_list),
                       lost=len(small_export.expected - in_list), dup_beyond=excess)


# ------------------------------------------------------------------------------------------------ bad input


def _write_bad_inputs(root: Path) -> dict[str, tuple[str, tuple[int, ...], list[str]]]:
    """name -> (source path relative to root, accepted exit codes, words the output must hold)."""
    root.mkdir(parents=True)
    (root / "empty.csv").write_bytes(b"")
    (root / "header_only.csv").write_bytes(b"email,first\r\n")
    (root / "no_email.csv").write_bytes(b"name,first\r\nx,y\r\n")
    (root / "bad_utf8.csv").write_bytes(b"email,first\r\nutf@example.com,\xff\xfeA\r\nutf2@example.com,B\r\n")
    (root / "nul.csv").write_bytes(b"email,first\r\nn\x00ul@example.com,A\r\nnul2@example.com,B\r\n")
    body = ("email,first\r\n" + "".join(f"gz{i}@example.com,N{i}\r\n" for i in range(9_000))).encode()
    packed = gzip.compress(body)
    (root / "truncated.csv.gz").write_bytes(packed[: len(packed) * 2 // 3])
    (root / "cdm").mkdir()
    (root / "cdm" / "model.json").write_bytes(b'{"name": "BlobExport", "entities": [{"name": "people", ')
    (root / "all_invalid.csv").write_bytes(b"email,first\r\nnot-an-email,A\r\n,B\r\nx@y,C\r\n")
    (root / "garbage.jsonl").write_bytes(b'[1,2]\n{"email": 5}\nnot json\n{"email":"j@example.com","first":"J"}\n')
    return {
        "empty file": ("empty.csv", (0, 1), ["empty.csv", "empty"]),
        "header only": ("header_only.csv", (0,), ["valid distinct 0"]),
        "no email column": ("no_email.csv", (1,), ["refused", "'email' (mapping email) are in none of the export's "
                                                   "files", "'name', 'first'"]),
        "invalid UTF-8": ("bad_utf8.csv", (0,), ["bad_utf8.csv line 2", "UTF-8"]),
        "NUL byte": ("nul.csv", (0,), ["nul.csv line 2", "NUL"]),
        "truncated gzip": ("truncated.csv.gz", (0, 1), ["truncated.csv.gz", "truncated"]),
        "malformed model.json": ("cdm/model.json", (1,), ["model.json", "not valid JSON", "incomplete"]),
        "every row invalid": ("all_invalid.csv", (0,), ["rejected 3", "invalid email"]),
        "JSON Lines garbage": ("garbage.jsonl", (0,), ["garbage.jsonl line 1", "JSON object"]),
    }


def test_bad_inputs_end_cleanly_with_a_clear_message(sg: Box, tmp_path: Path, leaks: Leaks,
                                                     fault_tally: Any) -> None:
    inputs = _write_bad_inputs(tmp_path / "bad")
    config = tmp_path / "destinations.json"
    config.write_bytes(orjson.dumps({"destinations": [{
        "name": "bad-inputs", "consent": True, "api_key_secret": "sendgrid-api-key", "list_id": sg.list_id,
        "segments": ["people"], "mapping": {"email": "email", "first_name": "first"}, "max_profiles": None,
        "bulk_threshold": None}]}))
    procs = {
        name: subprocess.Popen(cli_args(config, "bad-inputs", tmp_path / "bad" / rel, tmp_path / f"s{i}", "--wait"),
                               cwd=REPO, env=cli_env(sg.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, (name, (rel, _, _)) in enumerate(inputs.items())
    }
    problems = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        leaks.add(f"{name} stdout", out)
        leaks.add(f"{name} stderr", err)
        _, codes, words = inputs[name]
        if "Traceback" in out + err or proc.returncode not in codes or not all(w in out + err for w in words):
            problems.append(f"{name}: exit {proc.returncode}\n{out}{err}")
    assert not problems, "\n".join(problems)
    # the valid rows of the bad files still reach the list (the truncated file's are checked apart: see below)
    expected = {"utf2@example.com", "nul2@example.com", "j@example.com"}
    in_list = sg.settled_list()
    assert in_list - {e for e in in_list if e.startswith("gz")} == expected
    fault_tally.record(bad_inputs=len(inputs), runs=len(inputs), expected=len(expected),
                       in_list=len(in_list & expected), lost=len(expected - in_list))


def test_rows_before_a_truncation_reach_the_list(sg: Box, tmp_path: Path, leaks: Leaks) -> None:
    _write_bad_inputs(tmp_path / "bad")
    export = Export(tmp_path / "bad", "truncated.csv.gz",
                    {"name": "bad-inputs", "consent": True, "api_key_secret": "sendgrid-api-key",
                     "segments": ["people"], "mapping": {"email": "email"}, "max_profiles": None,
                     "bulk_threshold": None},
                    frozenset(reference_emails(tmp_path / "bad", "truncated.csv.gz", "email")))
    assert len(export.expected) > 1000  # the readable part of the file
    record = Engine(sg, export, tmp_path / "state", leaks).run()
    assert record["status"] == "completed_with_errors" and "truncated" in record["file_errors"][0]
    assert sg.settled_list() == export.expected


def _bad_inputs_config(path: Path, list_id: str, segments: Sequence[str] = ("people",)) -> Path:
    path.write_bytes(orjson.dumps({"destinations": [{
        "name": "bad-inputs", "consent": True, "api_key_secret": "sendgrid-api-key", "list_id": list_id,
        "segments": list(segments), "mapping": {"email": "email", "first_name": "first"}, "max_profiles": None,
        "bulk_threshold": None}]}))
    return path


def test_a_rejection_bomb_is_stopped_with_a_file_error(sg: Box, tmp_path: Path, leaks: Leaks,
                                                       fault_tally: Any) -> None:
    """Issue 12 §6: ~100 KB of .csv.gz holding 100 MiB of junk rows made 52M rejections and a 2.4 GB rejections CSV.
    The file is stopped after its good rows and a few thousand junk ones; the run ends, naming it."""
    good = [f"bomb{i}@example.com" for i in range(300)]
    path = tmp_path / "drop" / "people.csv.gz"
    path.parent.mkdir()
    junk = b"\x01junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk;junk\n" * 16_384
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(("email,first\r\n" + "".join(f"{e},B\r\n" for e in good)).encode())
        for _ in range(100 * 1024 * 1024 // len(junk)):  # 100 MiB of junk rows
            fh.write(junk)
    assert path.stat().st_size < 400_000
    config = _bad_inputs_config(tmp_path / "d.json", sg.list_id)
    res = run_cli(leaks, cli_env(sg.url), cli_args(config, "bad-inputs", path, tmp_path / "state", "--wait"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "people.csv.gz: stopped after" in res.stdout and "completed_with_errors" in res.stdout
    [record] = read_runs(tmp_path / "state", "bad-inputs")
    assert record["counts"]["read"] < 20_000 and record["counts"]["rejected_total"] < 20_000
    in_list = sg.settled_list()
    assert in_list == set(good)
    fault_tally.record(faults=1, runs=1, bad_inputs=1, expected=len(good), in_list=len(in_list),
                       lost=len(set(good) - in_list))


def _attribute_bomb(path: Path) -> None:
    """Issue 12 §6: a 62.9 MB model.json with 3.2M attributes (1.2 GB RSS when parsed whole)."""
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:
        fh.write(b'{"name": "BlobExport", "entities": [{"$type": "LocalEntity", "name": "people", "attributes": [')
        block = b"".join(b'{"name":"c%07d"},' % i for i in range(100_000))
        for _ in range(32):
            fh.write(block)
        fh.write(b'{"name":"email"}], "partitions": []}]}')


# The CLI, then its own peak RSS: VmHWM starts afresh at exec (ru_maxrss, which the CLI's summary shows, would start
# at the forking test process's).
_CLI_THEN_PEAK = ("import sys\nfrom shared.cli import main\ncode = main(sys.argv[1:])\n"
                  "print('VmHWM', next(int(line.split()[1]) for line in open('/proc/self/status')"
                  " if line.startswith('VmHWM:')) // 1024)\nsys.exit(code)\n")


def test_a_model_json_bomb_is_refused_before_it_is_parsed(sg: Box, tmp_path: Path, leaks: Leaks,
                                                          fault_tally: Any) -> None:
    """The attribute bomb is refused by its size before it is read; a file under the size cap made of tiny objects
    by its count of objects: each run ends at once, in little memory, naming the file and the limit."""
    big = tmp_path / "big" / "model.json"
    _attribute_bomb(big)
    assert big.stat().st_size > 60_000_000
    dense = tmp_path / "dense" / "model.json"
    dense.parent.mkdir()
    dense.write_bytes(b'{"name": "x", "entities": [' + b"{}," * 2_000_000 + b"{}]}")  # 6 MB, 2M objects
    config = _bad_inputs_config(tmp_path / "d.json", sg.list_id)
    for bomb, words in ((big, "model.json: is larger than 8,388,608 bytes, the limit for a model.json"),
                        (dense, "model.json: holds 2,000,003 JSON objects and arrays, over the limit of 100,000")):
        args = cli_args(config, "bad-inputs", bomb, tmp_path / f"s-{bomb.parent.name}")
        res = run_cli(leaks, cli_env(sg.url), [sys.executable, "-c", _CLI_THEN_PEAK, *args[3:]])
        assert res.returncode == 1 and words in res.stdout, res.stdout + res.stderr
        peak = int(res.stdout.rsplit("VmHWM ", 1)[1])
        assert peak < 200, f"{bomb}: peak RSS {peak} MB"
    in_list = sg.settled_list()
    assert in_list == set()
    fault_tally.record(faults=2, runs=2, bad_inputs=2, expected=0, in_list=len(in_list), lost=0)


# ------------------------------------------------------------------------------------------------ secrets


def test_the_leak_guard_finds_a_key_or_a_part_of_it(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "report.json").write_text('{"error": "token ' + KEY.split(".")[2] + '"}')
    assert _find_leaks([("stdout", "all clear")], [tmp_path]) == [f"{tmp_path / 'state' / 'report.json'}: key 1 part 1"]
    assert _find_leaks([("stderr", f"Bearer {KEY2}")], []) == ["stderr: key 2", "stderr: key 2 part 0",
                                                               "stderr: key 2 part 1"]
    assert not _find_leaks([("x", "SG.other.key FAULTSUITE-")], [])
    (tmp_path / "state" / "report.json").unlink()  # this test's own file must not trip the autouse guard


def test_the_key_stays_out_of_errors_reprs_and_logs(sg: Box, small_export: Export, tmp_path: Path,
                                                    leaks: Leaks) -> None:
    """The autouse guard scans every output; this adds the objects and errors a caller could print."""
    environ = {"SENDGRID_API_KEY": KEY}
    provider = EnvSecrets(environ)
    client = SendGridClient(sg.url, provider, "sendgrid-api-key", policy=FAST)
    sg.box.rotate_keys([KEY2])  # the key the client holds is now refused: 401, re-read, 401
    with pytest.raises(Exception) as caught:
        client.get_list(sg.list_id)
    client.close()
    leaks.add("AuthError", f"{caught.value!s} {caught.value!r} {caught.value.args!r}")
    leaks.add("reprs", f"{client!r} {provider!r} {provider.get('sendgrid-api-key')!r} {sg.box!r} "
                       f"{provider.get('sendgrid-api-key')} {sg.box.stats}")
    assert "401" in str(caught.value) and "update the secret" in str(caught.value)
    environ["SENDGRID_API_KEY"] = KEY2
    record = Engine(sg, small_export, tmp_path / "state", leaks, environ=environ).run()
    assert record["status"] == "completed"

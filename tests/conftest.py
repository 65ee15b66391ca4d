"""Shared fixtures: the Azurite storage emulator (one per test session) and a fresh Blob container per test."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from sandbox.server import REALISTIC, Sandbox, serve

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.fault_report"]  # the fault suite's tally and its summary table

AZURITE_BIN = REPO / "node_modules" / ".bin" / "azurite"
# The emulator's well-known development account key (public, documented by Microsoft; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Azurite:
    connection_string: str
    blob_url: str  # http://127.0.0.1:<port>/devstoreaccount1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _blob_url_of(connection_string: str) -> str:
    parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        return f"http://127.0.0.1:10000/{DEV_ACCOUNT}"
    if "BlobEndpoint" in parts:
        return parts["BlobEndpoint"].rstrip("/")
    return f"{parts.get('DefaultEndpointsProtocol', 'https')}://{parts['AccountName']}.blob.core.windows.net"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A running Azurite: the one CI started (AZURITE_CONNECTION_STRING), or our own on free loopback ports."""
    given = os.environ.get("AZURITE_CONNECTION_STRING")
    if given:
        yield Azurite(given, _blob_url_of(given))
        return
    if not AZURITE_BIN.exists():
        pytest.fail(f"{AZURITE_BIN} is missing: run `npm ci` in {REPO} to install the Azurite storage emulator")
    blob_port, queue_port, table_port = _free_port(), _free_port(), _free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    log_path = workdir / "azurite.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(AZURITE_BIN), "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--silent",
             "--blobHost", "127.0.0.1", "--blobPort", str(blob_port), "--queuePort", str(queue_port),
             "--tablePort", str(table_port)],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(blob_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"Azurite did not start on port {blob_port} (exit code {proc.poll()}):\n{output}")
            time.sleep(0.1)
        blob_url = f"http://127.0.0.1:{blob_port}/{DEV_ACCOUNT}"
        connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={blob_url};"
            f"QueueEndpoint=http://127.0.0.1:{queue_port}/{DEV_ACCOUNT};"
        )
        yield Azurite(connection_string, blob_url)
    finally:
        _stop(proc)


@pytest.fixture(autouse=True)
def _fresh_worker_process() -> None:
    """Each test starts as a new Functions worker process would: the app's per-process clients (shared.context) are
    built from the settings this test sets, never kept from an earlier test's."""
    from shared import context

    context.forget_process_clients()


@pytest.fixture
def blob_container(azurite: Azurite) -> Iterator[ContainerClient]:
    """A fresh, uniquely named container, deleted after the test."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container(f"t{uuid.uuid4().hex}")
    try:
        yield container
    finally:
        with contextlib.suppress(Exception):
            container.delete_container()
        service.close()


# The realistic profile with short but non-trivial jobs (0.5 to 2 s each, in order), seeded: the same run of a test
# gets the same job times. `--sandbox-profile realistic` runs every sandbox of a test session under it.
REALISTIC_TEST_PROFILE = dataclasses.replace(REALISTIC, job_seconds=(0.5, 2.0), seed=20261130)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sandbox-profile", choices=("default", "realistic"), default="default",
                     help="the profile of every SendGrid sandbox the tests start (realistic: slow jobs applied in "
                          "order, SendGrid's identifier rule; see sandbox/server.py)")


@pytest.fixture(scope="session", autouse=True)
def _sandbox_profile(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under `--sandbox-profile realistic`, every Sandbox made without a profile gets REALISTIC_TEST_PROFILE."""
    if request.config.getoption("--sandbox-profile") != "realistic":
        yield
        return
    previous, Sandbox.default_profile = Sandbox.default_profile, REALISTIC_TEST_PROFILE
    try:
        yield
    finally:
        Sandbox.default_profile = previous


@dataclass
class RunningSandbox:
    box: Sandbox
    url: str
    key: str


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    """A fresh SendGrid sandbox on a free loopback port, with a recognisable fake API key."""
    key = "SG.test-" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(32)
    box = Sandbox(api_keys=[key], job_delay=0.05)
    with serve(box) as server:
        yield RunningSandbox(box, server.url, key)


@pytest.fixture
def realistic_sg() -> Iterator[RunningSandbox]:
    """A fresh sandbox under the realistic profile (REALISTIC_TEST_PROFILE): every job (upsert, import, list removal,
    deletion) stays pending 0.5 to 2 s and jobs apply in order, so search, list membership and counts lag behind them;
    an update must carry the contact's existing identifiers. `box.jobs_final()` says whether every job is final,
    `box.wait_for_jobs(timeout)` waits for that, `box.complete_jobs()` forces it; `box.hold_jobs()` keeps every job
    pending until `box.release_jobs()` (any profile: a test then knows what a run that polls its jobs finds)."""
    key = "SG.test-" + secrets.token_urlsafe(12) + "." + secrets.token_urlsafe(32)
    box = Sandbox(api_keys=[key], profile=REALISTIC_TEST_PROFILE)
    with serve(box) as server:
        yield RunningSandbox(box, server.url, key)


class QuietJsonHandler(BaseHTTPRequestHandler):
    """A test server's request handler: JSON answers, no access log on stderr."""

    def send_json(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port for the duration of the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

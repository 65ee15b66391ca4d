"""Storage outages for tests: a loopback proxy in front of Azurite that answers 503 for a while, and an Azurite of
its own (data in a folder) that can be stopped and started again on the same port.

Both are real parts on loopback: the product's Blob client talks HTTP to them exactly as it talks to Azure Storage.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
AZURITE_BLOB_BIN = REPO / "node_modules" / ".bin" / "azurite-blob"
DEV_ACCOUNT = "devstoreaccount1"
# The emulator's well-known development account key (public, documented by Microsoft; not a secret).
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-connection", "proxy-authorization", "proxy-authenticate"})
_BUSY = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code><Message>The server is currently '
         b"unable to receive requests. Please retry your request.</Message></Error>")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def connection_string(blob_url: str) -> str:
    """A connection string for the development account at blob_url (http://127.0.0.1:<port>/devstoreaccount1)."""
    return f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={blob_url};"


class StorageProxy:
    """Forwards every request to a Blob endpoint, or answers 503 ServerBusy (as Azure Storage does when it sheds
    load) while an outage lasts: for `seconds`, or for the next `requests` requests. Counts what it forwarded and
    what it refused."""

    def __init__(self, target_blob_url: str) -> None:
        target = urlsplit(target_blob_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._account_path = target.path.rstrip("/")
        self._lock = threading.Lock()
        self._until: float | None = None
        self._left: int | None = None
        self.forwarded = 0
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = do_PATCH = do_OPTIONS = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="storage-proxy", daemon=True)
        self._thread.start()

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self._account_path}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_url)

    def outage(self, *, seconds: float | None = None, requests: int | None = None) -> None:
        """Answer 503 from now on, for `seconds` or for the next `requests` requests."""
        with self._lock:
            self._until = None if seconds is None else time.monotonic() + seconds
            self._left = requests

    def _refusing(self) -> bool:
        with self._lock:
            if self._left is not None and self._left > 0:
                self._left -= 1
                self.refused += 1
                return True
            if self._until is not None and time.monotonic() < self._until:
                self.refused += 1
                return True
            self.forwarded += 1
            return False

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if self._refusing():
            handler.send_response_only(503, "Server Busy")
            for name, value in (("Content-Type", "application/xml"), ("x-ms-error-code", "ServerBusy"),
                                ("Content-Length", str(len(_BUSY)))):
                handler.send_header(name, value)
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(_BUSY)
            return
        conn = http.client.HTTPConnection(*self._target, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(handler.command, handler.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        handler.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            # a HEAD answer's Content-Length is the blob's size: pass it on; otherwise the body read here decides
            if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or handler.command == "HEAD"):
                handler.send_header(name, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class DiskAzurite:
    """An Azurite Blob service of its own on a fixed loopback port, keeping its data in `folder`, so that a test can
    stop it (every call is refused) and start it again with its data.

    stop() sends SIGTERM, which ends the process at once (connections are refused from then on) after Azurite writes
    its metadata out. A SIGKILL would lose the last seconds of acknowledged writes (Azurite saves its metadata store
    every 5 s), which Azure Storage never does: that would test the emulator, not the product."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.blob_url = f"http://127.0.0.1:{self.port}/{DEV_ACCOUNT}"
        self.connection_string = connection_string(self.blob_url)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        if not AZURITE_BLOB_BIN.exists():
            raise RuntimeError(f"{AZURITE_BLOB_BIN} is missing: run `npm ci` in {REPO}")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "azurite.log", "ab")  # noqa: SIM115 - the child writes to it
        with log:
            self._proc = subprocess.Popen(
                [str(AZURITE_BLOB_BIN), "--location", str(self.folder), "--blobHost", "127.0.0.1", "--blobPort",
                 str(self.port), "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        give_up = time.monotonic() + timeout
        while not answers(self.port):
            if self._proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"Azurite did not start on port {self.port}: "
                                   f"{(self.folder / 'azurite.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

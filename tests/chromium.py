"""A real headless Chromium (Debian's `chromium` package, /usr/bin/chromium), driven through its DevTools protocol over
a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on file descriptors 3 and 4), so the tests need no
browser download and no websocket library. Each page loads in a new target; every request the page makes is
recorded (`Network.requestWillBeSent`), whether it would reach its server or not.

Also runnable, to make the README's screenshot: `python -m tests.chromium URL OUT.png [WIDTH]`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

BINARY = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--mute-audio",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--remote-debugging-pipe")
TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which(BINARY) is not None


@dataclass
class Loaded:
    """A page after its load event: what it requested, and the session to ask it things."""

    browser: Chromium
    session: str
    requests: list[str] = field(default_factory=list)  # every URL the page requested, in order

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools' own evaluation: the page's CSP and the
        absence of page scripts do not stop it)."""
        answer = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                   self.session)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression!r} failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self) -> bytes:
        import base64

        data = self.browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                 self.session)["data"]
        return base64.b64decode(data)


class Chromium:
    """One browser process for a test module; `load(url)` opens a page in a fresh target."""

    def __init__(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def descriptors() -> None:  # the browser reads commands on 3 and writes answers on 4
            a, b = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [BINARY, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"], preexec_fn=descriptors,
            pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium ended (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return orjson.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, orjson.dumps(message) + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def _wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._message(deadline))

    def load(self, url: str, *, width: int = 1280, height: int = 900, mobile: bool = False) -> Loaded:
        """Open `url` in a new target of the given viewport and wait for its load event."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": mobile}, session)
        for domain in ("Page", "Network"):
            self.call(f"{domain}.enable", {}, session)
        self.call("Page.navigate", {"url": url}, session)
        self._wait_for("Page.loadEventFired", session)
        requests = [e["params"]["request"]["url"] for e in self.events
                    if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]
        return Loaded(self, session, requests)

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only the processes it started
            self.process.wait(timeout=10)
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


@contextlib.contextmanager
def browser() -> Iterator[Chromium]:
    chromium = Chromium()
    try:
        yield chromium
    finally:
        chromium.close()


if __name__ == "__main__":
    url, out = sys.argv[1], sys.argv[2]
    with browser() as chrome:
        shot = chrome.load(url, width=int(sys.argv[3]) if len(sys.argv) > 3 else 1100, height=800).screenshot()
    with open(out, "wb") as fh:
        fh.write(shot)

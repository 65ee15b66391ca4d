"""`python -m shared smoke` against the HTTP API served on loopback: a tiny host that checks the function key as
Azure does, hands each request to `shared.http_api.handle` (the code the HTTP functions call) and each queued
message to `queue_worker.work` (what the queue trigger calls), over Azurite and the SendGrid sandbox. Never Azure."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
import pytest

from sandbox import samplegen
from shared import cli, http_api, queue_worker
from shared.app import on_blob
from shared.context import AppContext, Settings
from tests.conftest import QuietJsonHandler, loopback_server
from tests.test_http_api import NAME, deployed  # noqa: F401  (the HTTP tests' deployment: Azurite + sandbox)

FUNCTION_KEY = "loopback-host-key-5b1f0c7e9a"
ROUTES = [(re.compile(r"^/api/destinations$"), "destinations"),
          (re.compile(r"^/api/destinations/(?P<name>[^/]+)/runs$"), "destinations/{name}/runs"),
          (re.compile(r"^/api/runs/(?P<run_id>[^/]+)$"), "runs/{run_id}")]


def _context() -> AppContext:
    return AppContext.from_settings(Settings.from_env(os.environ))


class FunctionsHost(QuietJsonHandler):
    """The part of the Functions host the smoke test meets: function keys, routing, the runs queue."""

    workers: list[threading.Thread]

    def _serve(self) -> None:
        url = urlsplit(self.path)
        if self.headers.get("x-functions-key") != FUNCTION_KEY:  # AuthLevel.FUNCTION
            self.send_json(401, b"")
            return
        for pattern, route in ROUTES:
            m = pattern.match(url.path)
            if m:
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = http_api.handle(self.command, route, params, dict(parse_qsl(url.query)), body, _context)
                if answer.message is not None:  # the queue output binding, then the queue trigger
                    worker = threading.Thread(target=queue_worker.work, args=(_context(), answer.message_json()))
                    worker.start()
                    self.workers.append(worker)
                self.send_json(answer.status, answer.json())
                return
        self.send_json(404, b'{"error": "no such route"}')

    do_GET = do_POST = _serve


@pytest.fixture
def app_url() -> Iterator[str]:
    workers: list[threading.Thread] = []
    try:
        with loopback_server(type("Host", (FunctionsHost,), {"workers": workers})) as url:
            yield url
    finally:
        for worker in workers:
            worker.join(timeout=60)


def smoke(url: str, capsys: pytest.CaptureFixture[str], key: str = FUNCTION_KEY) -> tuple[int, str]:
    code = cli.main(["smoke", "--url", url, "--key", key, "--timeout", "120", "--poll-seconds", "0.05"])
    out = capsys.readouterr()
    assert key not in out.out + out.err
    return code, out.out + out.err


def test_after_an_export_every_destination_gets_its_verdict(deployed, app_url: str, capsys) -> None:  # noqa: F811
    on_blob(_context(), deployed["info"].model_key)  # the export arrives: it becomes each destination's latest
    code, out = smoke(app_url, capsys)
    info = deployed["info"]
    lines = out.splitlines()
    assert lines[0] == f"smoke: {app_url}/api answers; 3 destination(s)"
    (ready,) = [line for line in lines if line.startswith(f"{NAME}: ")]
    assert re.fullmatch(rf"{NAME}: ready: dry run \S+ of {re.escape(info.model_key)}: 3,000 rows read, "
                        rf"{info.valid_distinct:,} valid, \d+ rejected, nothing sent", ready), ready
    assert "no-consent: skipped: destination 'no-consent' has no data-privacy consent" in out
    assert re.search(r"^broken: NOT READY: invalid in the destinations file: .*field 'list_id'", out, flags=re.M)
    assert lines[-1] == "smoke: 1 ready, 1 skipped, 1 NOT READY"
    assert code == 1  # the invalid destination is a finding


def test_a_deployment_whose_destinations_all_pass_exits_0(deployed, app_url: str, capsys) -> None:  # noqa: F811
    good = samplegen.demo_destinations(deployed["list_id"], max_profiles=None)
    deployed["state"].upload_blob("destinations.json", orjson.dumps(good), overwrite=True)
    on_blob(_context(), deployed["info"].model_key)
    code, out = smoke(app_url, capsys)
    assert code == 0 and out.splitlines()[-1] == "smoke: 1 ready", out


def test_before_the_first_export_it_says_so_and_passes(deployed, app_url: str, capsys) -> None:  # noqa: F811
    good = samplegen.demo_destinations(deployed["list_id"], max_profiles=None)
    deployed["state"].upload_blob("destinations.json", orjson.dumps(good), overwrite=True)
    code, out = smoke(app_url, capsys)
    assert f"{NAME}: no export yet: it runs when its first export arrives" in out
    assert code == 0 and out.splitlines()[-1] == "smoke: 1 no export yet"


def test_a_dry_run_that_cannot_reach_sendgrid_is_a_warning(deployed, app_url: str, capsys,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    good = samplegen.demo_destinations(deployed["list_id"], max_profiles=None)
    deployed["state"].upload_blob("destinations.json", orjson.dumps(good), overwrite=True)
    on_blob(_context(), deployed["info"].model_key)
    monkeypatch.delenv("SENDGRID_API_KEY")  # the key is missing where the app reads it
    code, out = smoke(app_url, capsys)
    assert f"{NAME}: ready, with warnings: dry run" in out
    assert re.search(r"^  warning: dry run without SendGrid .*SENDGRID_API_KEY", out, flags=re.M), out
    assert code == 0


def test_a_wrong_key_is_named_and_never_shown(deployed, app_url: str, capsys) -> None:  # noqa: F811
    wrong = "wrong-key-3c9d2e"
    code, out = smoke(app_url, capsys, key=wrong)
    assert code == 1 and "refused the key (HTTP 401)" in out and "functionKeys.default" in out


@pytest.mark.parametrize("url", ["http://example.com", "https://user:pw@app.azurewebsites.net",
                                 "https://app.azurewebsites.net/?code=abc", "ftp://127.0.0.1", "app.azurewebsites.net"])
def test_urls_that_would_expose_the_key_are_refused(url: str, capsys) -> None:
    assert cli.main(["smoke", "--url", url, "--key", FUNCTION_KEY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: field '--url': ") and FUNCTION_KEY not in err

"""The run-history page served by the Functions app's own HTTP functions (function_app, over Azurite and the SendGrid
sandbox, with runs made by the blob trigger, the timer and the queue worker), and what a person sees of it in a real
headless Chromium (Debian's chromium package; .ci/run installs it): the rows, the status colours, the chart, a
hostile file name and rejection reason shown as text, no request to any other origin, a phone's width."""

from __future__ import annotations

import contextlib
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import azure.functions as func
import azure.functions.timer as timer
import orjson
import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from sandbox.server import Sandbox, serve
from shared import history, http_api
from tests import chromium
from tests.conftest import Azurite, loopback_server

pytestmark = pytest.mark.azurite

NAME, LAPSED = "vip-newsletter", "lapsed"
HOSTILE_NAME = '<b onmouseover="alert(1)">Q3 & "VIP"</b>.csv'  # a file name in an export can hold markup
KEY = "k3y_Of-the-function="  # what a person opened the page with (?code=)
ROUTES = {"ui": "history_page", "ui/runs/{run_id}": "run_page", "runs/{run_id}/rejections": "run_rejections"}


@dataclass
class Served:
    base: str  # http://127.0.0.1:<port>/api/
    other: str  # another origin: it must never be asked for anything
    requests: list[str] = field(default_factory=list)  # every request the app's server answered
    elsewhere: list[str] = field(default_factory=list)  # every request the other origin received
    exports: ContainerClient | None = None
    state: ContainerClient | None = None
    hostile_email: str = ""


def _route(path: str) -> tuple[str, dict[str, str]] | None:
    """The route template and route values of an /api/... path, as the Functions host matches them."""
    parts = path.removeprefix("/api/").split("/")
    for template in ROUTES:
        names = template.split("/")
        if len(names) == len(parts) and all(n == p or n.startswith("{") for n, p in zip(names, parts, strict=True)):
            return template, {n[1:-1]: urllib.parse.unquote(p) for n, p in zip(names, parts, strict=True)
                              if n.startswith("{")}
    return None


def _host(served: Served) -> type[BaseHTTPRequestHandler]:
    """The Functions host's part: route the request to function_app's function, send its answer back."""
    import function_app

    class Host(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests.append(self.path)
            url = urllib.parse.urlsplit(self.path)
            found = _route(url.path)
            if found is None:
                self.send_error(404)
                return
            template, values = found
            params = dict(urllib.parse.parse_qsl(url.query))
            request = func.HttpRequest("GET", f"http://127.0.0.1{self.path}", body=b"", route_params=values,
                                       params=params)
            answer = getattr(function_app, ROUTES[template])(request)
            self.send_response(answer.status_code)
            headers = {"Content-Type": f"{answer.mimetype}; charset={answer.charset}", **answer.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            body = answer.get_body()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Host


def _elsewhere(served: Served) -> type[BaseHTTPRequestHandler]:
    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.elsewhere.append(self.path)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    return Other


def _csv(hostile_email: str) -> bytes:
    rows = ["Email,First"] + [f"person{i}@example.com,P{i}" for i in range(40)]
    rows += [f"{hostile_email},Mallory", ",Nobody", "not-an-email,X"]
    return ("\r\n".join(rows) + "\r\n").encode()


def _destinations(list_id: str) -> dict[str, Any]:
    good = {"name": NAME, "display_name": "VIP newsletter", "consent": True, "api_key_secret": "sendgrid-api-key",
            "list_id": list_id, "segments": ["VIP"], "mapping": {"email": "Email", "first_name": "First"},
            "max_profiles": None, "schedule": "0 0 6 * * *"}
    return {"destinations": [
        good, good | {"name": LAPSED, "display_name": "Lapsed", "list_id": str(uuid.uuid4()), "schedule": None},
        good | {"name": "typo", "schedule": "0 6 * * *"}]}


def _make_runs(served: Served, exports: ContainerClient) -> None:
    """A completed run (blob trigger, then the timer), a refused one (its list does not exist) and a dry run (HTTP
    POST, then the queue worker)."""
    import function_app

    for key in (f"{NAME}/{HOSTILE_NAME}", f"{LAPSED}/contacts.csv"):
        exports.upload_blob(key, _csv(served.hostile_email))
        function_app.on_export(exports.get_blob_client(key))
    function_app.scheduled_refresh(timer.TimerRequest(past_due=False))  # finalises the submitted run's jobs
    queue = _Out()
    request = func.HttpRequest("POST", "http://127.0.0.1/api/x", body=orjson.dumps({"dry_run": True}),
                               route_params={"name": NAME}, params={})
    assert function_app.destination_runs(request, queue).status_code == 202
    function_app.run_queued_export(func.QueueMessage(body=queue.values[-1].encode()))


class _Out:
    def __init__(self) -> None:
        self.values: list[str] = []

    def set(self, value: str) -> None:
        self.values.append(value)


@pytest.fixture(scope="module")
def served(azurite: Azurite) -> Iterator[Served]:
    key = "SG.page-" + "k" * 22 + "." + "s" * 43
    box = Sandbox(api_keys=[key], job_delay=0.0)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    suffix = uuid.uuid4().hex[:10]
    exports, state = service.create_container(f"exports-{suffix}"), service.create_container(f"state-{suffix}")
    with serve(box) as sendgrid, contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as env:
        list_id = box.create_list("VIP")
        state.upload_blob("destinations.json", orjson.dumps(_destinations(list_id)))
        for k, v in {"ExportsStorage": azurite.connection_string, "EXPORTS_CONTAINER": exports.container_name,
                     "STATE_CONTAINER": state.container_name, "DESTINATIONS_CONFIG": "blob:destinations.json",
                     "SENDGRID_API_URL": sendgrid.url, "SENDGRID_API_KEY": key, "RUN_DEADLINE_SECONDS": "600",
                     "RUNS_QUEUE": "runs"}.items():
            env.setenv(k, v)
        env.delenv("KEY_VAULT_URL", raising=False)
        found = Served("", "", exports=exports, state=state)
        found.other = stack.enter_context(loopback_server(_elsewhere(found)))
        found.base = stack.enter_context(loopback_server(_host(found))) + "/api/"
        found.hostile_email = f'<img src="{found.other}/leak.png">'
        _make_runs(found, exports)
        yield found
    service.delete_container(exports.container_name)
    service.delete_container(state.container_name)


@pytest.fixture(scope="module")
def browser() -> Iterator[chromium.Chromium]:
    if not chromium.available():
        pytest.fail(f"{chromium.BINARY} is missing: install Debian's chromium package (apt-get install -y chromium), "
                    "as .ci/run does")
    with chromium.browser() as chrome:
        yield chrome


def _runs(served: Served, name: str) -> list[dict[str, Any]]:
    assert served.state is not None
    found = [orjson.loads(served.state.download_blob(b.name).readall())
             for b in served.state.list_blobs(name_starts_with=f"runs/{name}/") if b.name.endswith(".json")]
    return sorted(found, key=lambda r: r["run_id"], reverse=True)


def test_the_overview_as_a_person_sees_it(served: Served, browser: chromium.Chromium) -> None:
    shown = browser.load(f"{served.base}ui?code={KEY}")
    summary = shown.evaluate("[...document.querySelector('table').tBodies[0].rows].map(r => r.innerText)")
    assert [row.split("\n")[0].split("\t")[0] for row in summary] == ["Lapsed", "VIP newsletter", "typo"]
    assert "0 0 6 * * * UTC" in summary[1] and "06:00:00" in summary[1]  # its schedule and when it is next due
    assert "invalid" in summary[2] and "field 'schedule'" in shown.evaluate("document.body.innerText")
    # each destination's runs, newest first, one row each
    vip, lapsed = _runs(served, NAME), _runs(served, LAPSED)
    statuses = shown.evaluate(f"[...document.querySelectorAll('#{NAME} tbody tr')].map(r => r.cells[2].innerText)")
    assert statuses == [r["status"].replace("_", " ") for r in vip] == ["dry run", "completed"]
    # the status colours a person sees
    colour = "(s) => getComputedStyle(document.querySelector(`tr:has(a[href*='${s}']) .badge`)).backgroundColor"
    assert shown.evaluate(f"({colour})('{vip[1]['run_id']}')") == "rgb(26, 127, 55)"  # completed: green
    assert shown.evaluate(f"({colour})('{lapsed[0]['run_id']}')") == "rgb(207, 34, 46)"  # refused: red
    assert lapsed[0]["status"] == "refused"
    # the chart: a bar per run that sent or rejected something, drawn with a height
    bars = shown.evaluate(f"document.querySelectorAll('#{NAME} figure.chart rect').length")
    assert bars == sum(1 for r in vip if r["counts"]["sent"]) + sum(1 for r in vip if r["counts"]["rejected_total"])
    assert shown.evaluate("Math.min(...[...document.querySelectorAll('rect')].map(r => r.getBBox().height))") >= 1
    # nothing came from anywhere else, and nothing needs a script
    assert all(url.startswith(served.base) for url in shown.requests), shown.requests
    assert shown.evaluate("document.scripts.length") == 0 and served.elsewhere == []


def test_a_run_page_shows_a_hostile_file_name_as_text_and_downloads_every_rejection(
        served: Served, browser: chromium.Chromium) -> None:
    overview = browser.load(f"{served.base}ui?code={KEY}")
    completed = _runs(served, NAME)[1]
    href = overview.evaluate(f"document.querySelector(\"a[href*='{completed['run_id']}']\").href")
    assert href == f"{served.base}ui/runs/{completed['run_id']}?code={urllib.parse.quote(KEY, safe='')}"
    shown = browser.load(href)  # what a click opens: the key goes along
    cells = shown.evaluate("[...document.querySelectorAll('td')].map(td => td.querySelector('span').textContent)")
    assert f"{NAME}/{HOSTILE_NAME}" in cells and f"{completed['source']}" in shown.evaluate("document.body.innerText")
    reason = f"invalid email {served.hostile_email!r}"
    assert reason in cells  # the reason names the other origin in an <img>: shown, never fetched
    assert shown.evaluate("document.querySelectorAll('img, b, script, [onmouseover]').length") == 0
    assert "SendGrid jobs (1)" in shown.evaluate("document.body.innerText")
    assert all(url.startswith(served.base) for url in shown.requests) and served.elsewhere == []
    download = shown.evaluate("document.querySelector('a[download]').href")
    assert download == f"{served.base}runs/{completed['run_id']}/rejections?code={urllib.parse.quote(KEY, safe='')}"
    with urllib.request.urlopen(download) as answer:
        assert answer.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert answer.headers["Content-Disposition"] == f'attachment; filename="{completed["run_id"]}-rejections.csv"'
        text = answer.read().decode()
    assert served.state is not None
    stored = served.state.download_blob(completed["rejections_file"]).readall().decode()
    assert text == stored and f"{served.other}/leak.png" in text and text.count("\n") == 1 + 3


def test_on_a_phone_nothing_runs_off_the_side(served: Served, browser: chromium.Chromium) -> None:
    for path in ("ui", f"ui/runs/{_runs(served, NAME)[1]['run_id']}"):
        shown = browser.load(served.base + path, width=390, height=844, mobile=True)
        assert shown.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        assert shown.evaluate("getComputedStyle(document.querySelector('thead')).display") == "none"  # rows as cards
        label = "getComputedStyle(document.querySelector('td'), '::before').content"
        assert shown.evaluate(label).strip('"') in ("Destination", "Job")


# ----------------------------------------------------------------------------------- the handlers, without a browser
def _get(function: str, **values: Any) -> func.HttpResponse:
    import function_app

    params = values.pop("params", {})
    request = func.HttpRequest("GET", "http://127.0.0.1/api/x", body=b"", route_params=values, params=params)
    return getattr(function_app, function)(request)


def test_pages_say_what_they_are_and_allow_nothing_external(served: Served) -> None:
    run_id = _runs(served, NAME)[1]["run_id"]
    for answer in (_get("history_page"), _get("run_page", run_id=run_id)):
        assert answer.status_code == 200 and answer.mimetype == "text/html" and answer.charset == "utf-8"
        headers = answer.headers
        assert headers["Content-Security-Policy"].startswith("default-src 'none'; style-src 'sha256-")
        assert headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
        assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"


def test_a_key_that_is_not_key_shaped_is_not_put_in_the_links(served: Served) -> None:
    hostile = '"><script>alert(1)</script>'
    body = _get("history_page", params={"code": hostile}).get_body().decode()
    assert "alert(1)" not in body and "code=" not in body
    body = _get("history_page", params={"code": KEY}).get_body().decode()
    assert f"?code={urllib.parse.quote(KEY, safe='')}" in body


def test_bad_run_ids_are_an_error_page_before_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    import function_app

    def no_storage() -> Any:
        raise AssertionError("storage was touched before the run id was checked")

    monkeypatch.setattr(function_app, "_context", no_storage)
    answer = _get("run_page", run_id="../../destinations.json")
    assert answer.status_code == 400 and answer.mimetype == "text/html"
    assert "invalid run id" in answer.get_body().decode()
    answer = _get("run_rejections", run_id="../x")
    assert answer.status_code == 400 and orjson.loads(answer.get_body())["error"].startswith("invalid run id")


def test_unknown_runs_and_runs_without_rejections_are_404(served: Served) -> None:
    answer = _get("run_page", run_id="20300101T000000Z-0a1b2c3d")
    assert answer.status_code == 404 and "no run with that id" in answer.get_body().decode()
    refused = _runs(served, LAPSED)[0]
    assert refused["status"] == "refused" and not refused.get("rejections_file")
    answer = _get("run_rejections", run_id=refused["run_id"])
    assert answer.status_code == 404 and "no rejections file" in orjson.loads(answer.get_body())["error"]


def test_the_rejections_download_is_read_in_chunks(tmp_path: Any) -> None:
    from shared.state import StateStore
    from shared.storage import LocalFolderStore

    state = StateStore(LocalFolderStore(tmp_path))
    line = b"vip/a.csv,7,invalid email 'x'\r\n"
    state.store.write_bytes("runs/vip/r.rejections.csv", b"file,line,reason\r\n" + line * 20_000)
    chunks = list(history.rejections_chunks(state, "runs/vip/r.rejections.csv"))
    assert len(chunks) > 5 and max(map(len, chunks)) <= history.CHUNK_BYTES + len(line)
    assert b"".join(chunks) == state.store.read_bytes("runs/vip/r.rejections.csv")
    assert http_api.Response(200, {}, stream=iter(chunks), mimetype=http_api.CSV).content() is not None

"""The HTTP API and its queue worker: function_app's functions called directly (no `func` host here) against a real
Azurite and the SendGrid sandbox. The queue output binding is a small fake that keeps what the function set; the
worker gets that message as a func.QueueMessage."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import azure.functions as func
import orjson
import pytest
from azure.storage.blob import BlobServiceClient

from sandbox import samplegen
from shared import context, http_api, queue_worker
from shared.blobstore import BlobContainerStore
from shared.context import AppContext
from shared.errors import LeaseUnavailable, StateError
from shared.state import RUN_ID_PATTERN
from tests.test_secrets import FakeCredential, FakeVault, FakeVaultTransport

NAME = "vip-newsletter"
KEY_VALUE = "recognisable-api-key-value-7f3a9c"  # not SendGrid-shaped: redaction would not hide a leak of it


class Out:
    """func.Out for the queue output binding: keeps every value set."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def set(self, value: str) -> None:
        self.values.append(value)

    def get(self) -> str:
        return self.values[-1]


QUEUEING = ("destination_runs", "disable_destination")  # functions with the runs queue as an output


class Api:
    """Calls function_app's HTTP functions as the host would, and keeps every answer's text."""

    def __init__(self) -> None:
        import function_app

        self.app = function_app
        self.answers: list[bytes] = []
        self.queue = Out()

    def call(self, method: str, function: str, *, name: str | None = None, run_id: str | None = None,
             params: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request to function_app.<function> with the route values the host would pass."""
        route_params = {k: v for k, v in (("name", name), ("run_id", run_id)) if v is not None}
        req = func.HttpRequest(method, "http://localhost/api/...", body=body, route_params=route_params,
                               params=params or {})
        fn = getattr(self.app, function)
        resp = fn(req, self.queue) if function in QUEUEING else fn(req)
        self.answers.append(resp.get_body())
        assert resp.mimetype == "application/json" and resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        return resp.status_code, orjson.loads(resp.get_body()), dict(resp.headers)

    def start(self, name: str = NAME, **fields: Any) -> dict[str, Any]:
        status, body, headers = self.call("POST", "destination_runs", name=name,
                                          body=orjson.dumps(fields) if fields else b"")
        assert status == 202, body
        assert headers["Location"] == body["status_url"] == f"/api/runs/{body['run_id']}"
        return body

    def work(self, message: str | None = None, dequeue_count: int | None = None) -> Any:
        msg = func.QueueMessage(body=(message or self.queue.get()).encode())
        if dequeue_count is None:
            return self.app.run_queued_export(msg)
        return queue_worker.work(self.app._context(), msg.get_body(), dequeue_count)

    def run(self, run_id: str) -> dict[str, Any]:
        status, body, _ = self.call("GET", "get_run", run_id=run_id)
        assert status == 200, body
        return body


# ---------------------------------------------------------------------------------------------------------------
# checks that never reach storage


def _no_storage() -> AppContext:
    raise AssertionError("storage was touched before the request was checked")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Api:
    import function_app

    monkeypatch.setattr(function_app, "_context", _no_storage)
    return Api()


BAD_NAMES = ["../x", "..", "%2e%2e", "%2E%2E%2Fstate", "VIP", "Vip-newsletter", "a" * 64, "-vip", "vip/../../x",
             "vip%2f..", "", " vip", "vip\n", "vip.json"]
BAD_RUN_IDS = ["../../destinations", "..", "%2e%2e", "20250101T120000Z-0A1B2C3D", "20250101T120000Z-0a1b2c3d/..",
               "20250101T120000Z-0a1b2c3d\n",
               "20250101T120000Z-0a1b2c3d.json", "x" * 300, ""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
@pytest.mark.parametrize("method,function", [("POST", "destination_runs"), ("GET", "destination_runs"),
                                             ("DELETE", "disable_destination"), ("POST", "enable_destination")])
def test_bad_destination_names_are_refused_before_storage(offline: Api, name: str, method: str,
                                                          function: str) -> None:
    status, body, _ = offline.call(method, function, name=name)
    assert status == 400 and body["error"].startswith("invalid destination name")
    assert offline.queue.values == []


@pytest.mark.parametrize("run_id", BAD_RUN_IDS, ids=range(len(BAD_RUN_IDS)))
def test_bad_run_ids_are_refused_before_storage(offline: Api, run_id: str) -> None:
    status, body, _ = offline.call("GET", "get_run", run_id=run_id)
    assert status == 400 and body["error"].startswith("invalid run id")


def test_a_missing_route_value_is_400(offline: Api) -> None:
    assert offline.call("GET", "get_run")[0] == 400
    assert offline.call("POST", "destination_runs")[0] == 400


def test_oversize_body_is_413(offline: Api) -> None:
    body = orjson.dumps({"source": "x" * http_api.MAX_BODY_BYTES})
    status, answer, _ = offline.call("POST", "destination_runs", name=NAME, body=body)
    assert status == 413 and "65,536" in answer["error"]
    assert offline.queue.values == []


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"x"', b"\xff\xfe", b'{"source": 5}', b'{"source": ""}',
                                  b'{"dry_run": "yes"}', b'{"sauce": "x/model.json"}', b"null"])
def test_wrong_json_is_400(offline: Api, body: bytes) -> None:
    status, answer, _ = offline.call("POST", "destination_runs", name=NAME, body=body)
    assert status == 400 and answer["error"]
    assert offline.queue.values == []


@pytest.mark.parametrize("params", [{"purge": "true"}, {"purge": ""}, {"purge": "all"}, {"purge": "contacts"},
                                    {"purge": "contacts", "confirm": "yes"}])
def test_bad_purge_requests_are_400_before_storage(offline: Api, params: dict[str, str]) -> None:
    status, answer, _ = offline.call("DELETE", "disable_destination", name=NAME, params=params)
    assert status == 400 and "purge" in answer["error"]
    assert offline.queue.values == []


@pytest.mark.parametrize("body", [b"", b"{}", b'{"email": 5}', b'{"email": "nobody"}',
                                  b'{"email": "a@b.com", "more": 1}', b'{"email": "a@example.com\\r\\nb@example.com"}',
                                  b'{"email": "a@exa\\nmple.com"}', b'{"email": "@@@"}', b'{"email": "*@*"}',
                                  b'{"email": "a@example.com,b@example.com"}', b'{"email": "a@example.com\\u0000"}',
                                  b'{"email": ["a@example.com"]}'])
def test_bad_erasure_bodies_are_400_before_storage(offline: Api, body: bytes) -> None:
    status, answer, _ = offline.call("POST", "erase_person", body=body)
    assert status == 400 and answer["error"].startswith('the body must be {"email": "<one address>"}')


@pytest.mark.parametrize("reason", ["list\u202eretired", "a\u2028b", "zero\u200bwidth", "c1\x85", "tab\there",
                                    "x" * 501])
def test_a_reason_that_is_not_one_printable_line_is_400_before_storage(offline: Api, reason: str) -> None:
    status, answer, _ = offline.call("DELETE", "disable_destination", name=NAME, params={"reason": reason})
    assert status == 400 and "reason must be one line" in answer["error"]


@pytest.mark.parametrize("limit", ["0", "201", "-1", "abc", "1.5", "", "\u00b2", "\u0663", "1\u0660"])
def test_history_limit_is_1_to_200(offline: Api, limit: str) -> None:
    status, answer, _ = offline.call("GET", "destination_runs", name=NAME, params={"limit": limit})
    assert status == 400 and "limit" in answer["error"]


def test_methods_a_route_does_not_take_are_405() -> None:
    answer = http_api.handle("PUT", "destinations/{name}/runs", {"name": NAME}, {}, b"", _no_storage)
    assert answer.status == 405 and answer.headers["Allow"] == "GET, POST"
    answer = http_api.handle("POST", "runs/{run_id}", {"run_id": "x"}, {}, b"", _no_storage)
    assert answer.status == 405 and answer.headers["Allow"] == "GET"
    assert http_api.handle("GET", "admin", {}, {}, b"", _no_storage).status == 404


def test_answers_are_redacted_on_the_way_out() -> None:
    answer = http_api.Response(500, {"error": "boom SG.abcdefgh.ijklmnop"})
    assert b"SG.abcdefgh" not in answer.json() and b"[REDACTED]" in answer.json()


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"run_id": "../../x", "destination": "vip"}',
                                  b'{"run_id": "20250101T120000Z-0a1b2c3d", "destination": "../x"}',
                                  b'{"run_id": "20250101T120000Z-0a1b2c3d\\n", "destination": "vip"}',
                                  b'{"run_id": "20250101T120000Z-0a1b2c3d", "destination": "vip\\n"}'])
def test_worker_drops_messages_that_are_not_runs(body: bytes) -> None:
    assert queue_worker.work(_no_storage, body) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# against Azurite and the sandbox

PROFILES = 3_000


def _destinations(list_id: str) -> dict[str, Any]:
    good = samplegen.demo_destinations(list_id, max_profiles=None)["destinations"][0]
    return {"destinations": [
        good,
        good | {"name": "no-consent", "consent": False},
        good | {"name": "broken", "list_id": "not a list id"},
    ]}


@pytest.fixture
def deployed(azurite, sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    suffix = uuid.uuid4().hex[:10]
    exports, state = f"exports-{suffix}", f"state-{suffix}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    exports_client = service.create_container(exports)
    state_client = service.create_container(state)
    info = samplegen.write_cdm_export(tmp_path / "x", PROFILES, partitions=2, account_url=azurite.blob_url,
                                      container=exports)
    for path in sorted((tmp_path / "x").rglob("*")):  # model.json last, as Customer Insights writes it
        if path.is_file() and path.name != "model.json":
            exports_client.upload_blob(path.relative_to(tmp_path / "x").as_posix(), path.read_bytes())
    exports_client.upload_blob(info.model_key, (tmp_path / "x" / info.model_key).read_bytes())
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    state_client.upload_blob("destinations.json", orjson.dumps(_destinations(list_id)))
    for k, v in {"ExportsStorage": azurite.connection_string, "EXPORTS_CONTAINER": exports, "STATE_CONTAINER": state,
                 "DESTINATIONS_CONFIG": "blob:destinations.json", "SENDGRID_API_URL": sandbox.url,
                 "SENDGRID_API_KEY": sandbox.key, "RUN_DEADLINE_SECONDS": "600", "RUNS_QUEUE": "runs"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KEY_VAULT_URL", raising=False)
    yield {"info": info, "list_id": list_id, "exports": exports_client, "state": state_client}
    service.delete_container(exports)
    service.delete_container(state)


@pytest.fixture
def api() -> Api:
    return Api()


def _puts(sandbox) -> int:
    return sandbox.box.stats["requests"].get("PUT /v3/marketing/contacts", 0)


def _jobs_applied(sandbox) -> None:
    """SendGrid applies every job it holds (see hold_jobs): the next look at them finds them final."""
    sandbox.box.release_jobs()
    sandbox.box.complete_jobs()


def _timer() -> None:
    import azure.functions.timer as timer

    import function_app

    function_app.scheduled_refresh(timer.TimerRequest(past_due=False))


def test_post_queues_a_run_the_worker_runs_to_completion(deployed, sandbox, api: Api) -> None:
    model_key = deployed["info"].model_key
    started = api.start(source=model_key)
    run_id = started["run_id"]
    assert RUN_ID_PATTERN.match(run_id) and started["status"] == "queued" and started["source"] == model_key
    (message,) = api.queue.values
    etag = deployed["exports"].get_blob_client(model_key).get_blob_properties().etag.strip('"')
    assert orjson.loads(message) == {"run_id": run_id, "destination": NAME, "source": model_key, "etag": etag}
    queued = api.run(run_id)
    assert queued["status"] == "queued" and queued["trigger"] == "http" and queued["queued_at"]
    assert _puts(sandbox) == 0  # nothing runs before the worker

    sandbox.box.hold_jobs()  # SendGrid has not applied the run's jobs when it polls them once at its end
    api.work()
    run = api.run(run_id)
    assert run["run_id"] == run_id and run["trigger"] == "http" and run["status"] == "submitted", run
    _jobs_applied(sandbox)
    _timer()  # polls the submitted run's jobs and finalises it
    run = api.run(run_id)
    assert run["status"] == "completed", run
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct

    puts = _puts(sandbox)
    api.work(message)  # the queue is at-least-once: a redelivered message does nothing
    api.app.on_export(deployed["exports"].get_blob_client(model_key))  # the run claimed the version: a no-op
    assert _puts(sandbox) == puts
    status, history, _ = api.call("GET", "destination_runs", name=NAME)
    assert status == 200 and [r["run_id"] for r in history["runs"]] == [run_id]
    assert all(sandbox.key.encode() not in answer for answer in api.answers)


def test_history_is_newest_first_and_limited(deployed, sandbox, api: Api) -> None:
    ids = []
    for _ in range(3):
        ids.append(api.start(source=deployed["info"].model_key, dry_run=True)["run_id"])
        api.work()
    assert _puts(sandbox) == 0  # dry runs send nothing
    status, body, _ = api.call("GET", "destination_runs", name=NAME)
    assert status == 200 and [r["run_id"] for r in body["runs"]] == ids[::-1]
    assert {r["status"] for r in body["runs"]} == {"dry_run"}
    assert body["runs"][0]["url"] == f"/api/runs/{ids[-1]}"
    assert body["runs"][0]["counts"]["valid"] == deployed["info"].valid_distinct
    _, body, _ = api.call("GET", "destination_runs", name=NAME, params={"limit": "2"})
    assert [r["run_id"] for r in body["runs"]] == ids[:0:-1]


def test_default_source_is_the_latest_export(deployed, sandbox, api: Api) -> None:
    status, body, _ = api.call("POST", "destination_runs", name=NAME)
    assert status == 409 and "no export has arrived" in body["error"]
    assert api.queue.values == []
    model_key = deployed["info"].model_key
    sandbox.box.hold_jobs()  # both runs end with their jobs pending: 'submitted'
    api.app.on_export(deployed["exports"].get_blob_client(model_key))  # the blob trigger runs it and remembers it
    started = api.start()
    assert started["source"] == model_key
    api.work()  # an explicit request runs even a version that was exported already
    run = api.run(started["run_id"])
    assert run["status"] == "submitted" and run["source"] == model_key and run["counts"]["sent"] > 0, run
    _, history, _ = api.call("GET", "destination_runs", name=NAME)
    assert [r["trigger"] for r in history["runs"]] == ["http", "blob"]


def test_destinations_show_public_settings_state_and_no_secret(deployed, sandbox, api: Api, monkeypatch) -> None:
    started = api.start(source=deployed["info"].model_key, dry_run=True)
    api.work()
    monkeypatch.setenv("SENDGRID_API_KEY", KEY_VALUE)  # from here on the app reads this key
    status, body, _ = api.call("GET", "list_destinations")
    assert status == 200
    by_name = {d["name"]: d for d in body["destinations"]}
    assert set(by_name) == {NAME, "no-consent", "broken"}
    vip = by_name[NAME]
    assert vip["valid"] and vip["consent"] is True and vip["enabled"] is True and vip["disabled"] is None
    assert vip["segments"] == ["HighValueSegment"] and vip["list_id"] == deployed["list_id"]
    assert vip["api_key_secret"] == "sendgrid-api-key" and vip["blocked"] is None
    assert vip["last_run"]["run_id"] == started["run_id"] and vip["last_run"]["status"] == "dry_run"
    assert vip["last_run"]["finished_at"]
    assert by_name["no-consent"]["consent"] is False and "consent" in by_name["no-consent"]["blocked"]
    assert by_name["no-consent"]["last_run"] is None
    assert by_name["broken"]["valid"] is False and "list_id" in by_name["broken"]["error"]

    failed = api.start(source=deployed["info"].model_key)  # the sandbox refuses this key: the run fails
    api.work()
    run = api.run(failed["run_id"])
    assert run["status"] == "failed" and run["error"]
    api.call("GET", "destination_runs", name=NAME)
    api.call("GET", "list_destinations")
    assert len(api.answers) == 6
    for answer in api.answers:
        assert KEY_VALUE.encode() not in answer and sandbox.key.encode() not in answer


def test_unknown_and_unrunnable_destinations(deployed, api: Api) -> None:
    for method, function, value in [("POST", "destination_runs", {"name": "nobody"}),
                                    ("GET", "destination_runs", {"name": "nobody"}),
                                    ("DELETE", "disable_destination", {"name": "nobody"}),
                                    ("GET", "get_run", {"run_id": "20250101T120000Z-0a1b2c3d"})]:
        status, body, _ = api.call(method, function, **value)
        assert status == 404 and body["error"], function
    status, body, _ = api.call("POST", "destination_runs", name="no-consent")
    assert status == 409 and "consent" in body["error"]
    status, body, _ = api.call("POST", "destination_runs", name="broken")
    assert status == 409 and "invalid" in body["error"] and "list_id" in body["error"]
    for source in ("nothing/here.csv", "nothing"):
        status, body, _ = api.call("POST", "destination_runs", name=NAME, body=orjson.dumps({"source": source}))
        assert status == 404 and source in body["error"]
    status, body, _ = api.call("POST", "destination_runs", name=NAME, body=b'{"source": "a/../../state/x"}')
    assert status == 400 and "source" in body["error"]
    assert api.queue.values == []
    assert list(deployed["state"].list_blobs(name_starts_with="runs/")) == []


def test_a_source_must_be_an_export_of_the_destination(deployed, api: Api) -> None:
    info, exports = deployed["info"], deployed["exports"]
    model = orjson.loads(exports.download_blob(info.model_key).readall())
    for entity in model["entities"]:
        entity["name"] = "SomeoneElsesSegment"
    exports.upload_blob("Other/model.json", orjson.dumps(model))
    for key in ("no-consent/people.csv", "people.csv", "vip-newsletter/people.csv"):
        exports.upload_blob(key, b"email\nada@example.com\n")
    for source in ("Other/model.json", "Other", "no-consent/people.csv", "people.csv"):
        status, body, _ = api.call("POST", "destination_runs", name=NAME, body=orjson.dumps({"source": source}))
        assert status == 400 and f"is not an export of destination '{NAME}'" in body["error"], source
    assert api.queue.values == []
    assert list(deployed["state"].list_blobs(name_starts_with="runs/")) == []
    assert api.start(source="vip-newsletter/people.csv", dry_run=True)["source"] == "vip-newsletter/people.csv"
    assert api.start(source=info.model_key, dry_run=True)["source"] == info.model_key


def test_a_reason_is_stored_on_one_line_without_secrets(deployed, api: Api) -> None:
    reason = "retired  by  ops, key SG.abcdefgh.ijklmnop pasted"
    status, body, _ = api.call("DELETE", "disable_destination", name=NAME, params={"reason": reason})
    assert status == 200 and body["reason"] == "retired by ops, key [REDACTED] pasted"


def test_a_folder_source_means_its_model_json(deployed, api: Api) -> None:
    model_key = deployed["info"].model_key
    folder = model_key.rsplit("/", 1)[0]
    assert api.start(source=folder + "/", dry_run=True)["source"] == model_key


def test_delete_disables_so_no_trigger_runs_it(deployed, sandbox, api: Api) -> None:
    status, body, _ = api.call("DELETE", "disable_destination", name=NAME, params={"reason": "list retired"})
    assert status == 200 and body["destination"] == NAME and body["disabled"] is True
    assert body["by"] == "http" and body["reason"] == "list retired"
    _, listing, _ = api.call("GET", "list_destinations")
    vip = next(d for d in listing["destinations"] if d["name"] == NAME)
    assert vip["disabled"]["by"] == "http" and "disabled by http" in vip["blocked"]
    status, body, _ = api.call("POST", "destination_runs", name=NAME,
                               body=orjson.dumps({"source": deployed["info"].model_key}))
    assert status == 409 and "disabled" in body["error"] and api.queue.values == []

    api.app.on_export(deployed["exports"].get_blob_client(deployed["info"].model_key))
    _, history, _ = api.call("GET", "destination_runs", name=NAME)
    assert [r["status"] for r in history["runs"]] == ["refused"]
    assert "disabled by http" in history["runs"][0]["error"]
    assert _puts(sandbox) == 0 and sandbox.box.list_emails(deployed["list_id"]) == []


def test_disabled_after_queueing_the_worker_refuses(deployed, sandbox, api: Api) -> None:
    run_id = api.start(source=deployed["info"].model_key)["run_id"]
    assert api.call("DELETE", "disable_destination", name=NAME)[0] == 200
    api.work()
    run = api.run(run_id)
    assert run["status"] == "refused" and "disabled" in run["error"] and _puts(sandbox) == 0


def test_destination_removed_after_queueing_the_worker_refuses(deployed, api: Api) -> None:
    run_id = api.start(source=deployed["info"].model_key)["run_id"]
    deployed["state"].upload_blob("destinations.json", b'{"destinations": []}', overwrite=True)
    api.work()
    run = api.run(run_id)
    assert run["status"] == "refused" and NAME in run["error"] and run["finished_at"]


def test_busy_destination_is_retried_then_left_to_the_timer(deployed, sandbox, api: Api) -> None:
    model_key = deployed["info"].model_key
    run_id = api.start(source=model_key)["run_id"]
    ctx = api.app._context()
    with ctx.state.lease(NAME):  # another run holds the destination
        with pytest.raises(LeaseUnavailable):
            api.work(dequeue_count=1)  # the host redelivers the message
        etag = deployed["exports"].get_blob_client(model_key).get_blob_properties().etag
        assert ctx.state.export_claim(NAME, model_key, etag) is None  # its claim was given back
        record = api.work(dequeue_count=queue_worker.MAX_ATTEMPTS)  # the last delivery: the timer takes it over
        assert record["status"] == "queued" and "busy" in record["note"]
    assert api.run(run_id)["status"] == "queued" and _puts(sandbox) == 0
    sandbox.box.hold_jobs()  # its jobs are pending at its end
    api.work(dequeue_count=1)  # had another delivery come: free now, it runs
    assert api.run(run_id)["status"] == "submitted" and _puts(sandbox) > 0


def test_delete_with_purge_queues_a_purge_the_worker_runs(deployed, sandbox, api: Api) -> None:
    api.start(source=deployed["info"].model_key)
    api.work()
    sandbox.box.complete_jobs()  # SendGrid applied the run's jobs before the timer polls them
    _timer()
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct
    status, body, headers = api.call("DELETE", "disable_destination", name=NAME, params={"purge": "list"})
    assert status == 202 and body["disabled"] is True and body["purge"] == "list"
    assert headers["Location"] == body["status_url"]
    assert api.run(body["run_id"])["status"] == "queued"
    api.work()  # the purge message
    purge = api.run(body["run_id"])
    assert purge["status"] == "completed" and purge["counts"]["removed"] == deployed["info"].valid_distinct, purge
    sandbox.box.complete_jobs()  # SendGrid applies removals in jobs, after it accepted them
    assert sandbox.box.list_emails(deployed["list_id"]) == []


def test_enable_waits_for_the_purge_then_runs_again(deployed, sandbox, api: Api) -> None:
    """A destination disabled with a purge can be enabled once the purge has finished; its next run fills the list
    again. While the purge is open, enabling is refused (the purge and the run would undo each other)."""
    assert api.call("POST", "enable_destination", name="nobody")[0] == 404
    status, body, _ = api.call("POST", "enable_destination", name=NAME)
    assert status == 200 and body == {"destination": NAME, "disabled": False, "was_disabled": None}
    api.start(source=deployed["info"].model_key)
    api.work()
    sandbox.box.complete_jobs()  # SendGrid applied the run's jobs before the timer polls them
    _timer()
    purge_id = api.call("DELETE", "disable_destination", name=NAME, params={"purge": "list"})[1]["run_id"]
    status, body, _ = api.call("POST", "enable_destination", name=NAME)
    assert status == 409 and purge_id in body["error"] and "unfinished purge" in body["error"]
    assert api.call("POST", "destination_runs", name=NAME)[0] == 409  # still disabled
    api.work()  # the purge
    assert api.run(purge_id)["status"] == "completed"
    status, body, _ = api.call("POST", "enable_destination", name=NAME)
    assert status == 200 and body["disabled"] is False and body["was_disabled"]["by"] == "http"
    _, listing, _ = api.call("GET", "list_destinations")
    vip = next(d for d in listing["destinations"] if d["name"] == NAME)
    assert vip["disabled"] is None and vip["blocked"] is None
    run_id = api.start(source=deployed["info"].model_key)["run_id"]  # a manual run takes an exported version too
    api.work()
    sandbox.box.complete_jobs()  # SendGrid applied the run's jobs before the timer polls them
    _timer()
    sandbox.box.complete_jobs()
    assert api.run(run_id)["status"] == "completed"
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct


def test_erasure_over_http_names_the_person_by_hash_only(deployed, sandbox, api: Api) -> None:
    api.start(source=deployed["info"].model_key)
    api.work()
    sandbox.box.complete_jobs()  # SendGrid applied the run's jobs before the timer polls them
    _timer()
    person = sandbox.box.list_emails(deployed["list_id"])[0]
    status, body, _ = api.call("POST", "erase_person", body=orjson.dumps({"email": person.upper()}))
    assert status == 200 and body["destinations"] == [NAME] and body["accounts_deleted"] == 1, body
    assert person not in api.answers[-1].decode().lower() and len(body["person"]) == 32
    sandbox.box.complete_jobs()  # the delete is an asynchronous job, as in SendGrid
    assert sandbox.box.contact(person) is None


# ---------------------------------------------------------------------------------------------------------------
# one set of clients per worker process


@pytest.fixture
def key_vault(deployed, sandbox, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeVault, list[FakeCredential]]:
    """KEY_VAULT_URL set and no key in the environment: the API key comes from Key Vault, played by the fake vault of
    test_secrets under the real SecretClient; every DefaultAzureCredential the app makes is kept."""
    import azure.identity
    import azure.keyvault.secrets

    vault = FakeVault({"sendgrid-api-key": sandbox.key})
    made: list[FakeCredential] = []

    class RecordingDefaultCredential(FakeCredential):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            made.append(self)

    real_client = azure.keyvault.secrets.SecretClient
    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", RecordingDefaultCredential)
    monkeypatch.setattr(azure.keyvault.secrets, "SecretClient",
                        lambda url, cred, **kw: real_client(url, cred, transport=FakeVaultTransport(vault), **kw))
    # a fresh vault host: the SDK keeps each host's authentication challenge for the whole test session
    monkeypatch.setenv("KEY_VAULT_URL", f"https://doors{uuid.uuid4().hex[:10]}.vault.azure.net")
    monkeypatch.delenv("SENDGRID_API_KEY")
    return vault, made


@pytest.fixture
def services_built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every blob service client the app builds from its connection settings."""
    built: list[Any] = []
    real = context.blob_service_from_settings

    def building(name: str, environ: Any) -> Any:
        built.append(real(name, environ))
        return built[-1]

    monkeypatch.setattr(context, "blob_service_from_settings", building)
    return built


def test_invocations_reuse_the_clients_the_credential_and_the_key_cache(deployed, sandbox, api: Api, key_vault,
                                                                       services_built: list[Any]) -> None:
    """The blob trigger, an HTTP request and the queue worker: three invocations, one blob service client, one
    credential asked for one token, one read of the key from Key Vault (its cache outlives an invocation)."""
    vault, credentials = key_vault
    model_key = deployed["info"].model_key
    sandbox.box.hold_jobs()  # both runs end with their jobs pending: 'submitted'
    api.app.on_export(deployed["exports"].get_blob_client(model_key))
    started = api.start(source=model_key)  # an explicit run of the exported version: it reads the key again
    api.work()
    runs = [api.run(r["run_id"]) for r in api.call("GET", "destination_runs", name=NAME)[1]["runs"]]
    assert [r["trigger"] for r in runs] == ["http", "blob"] and runs[0]["run_id"] == started["run_id"]
    assert [r["status"] for r in runs] == ["submitted", "submitted"] and runs[1]["counts"]["sent"] > 0, runs
    assert vault.served == 1  # the key was read once, for both runs
    assert len(credentials) == 1 and len(credentials[0].requests) == 1  # one credential, one token
    assert len(services_built) == 1
    one, two = api.app._context(), api.app._context()
    assert one.exports is two.exports and one.secrets is two.secrets


def test_concurrent_first_invocations_build_one_context(deployed, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker runs functions in a thread pool: invocations arriving together before any context exists wait for
    the one the first of them builds."""
    entered = threading.Condition()
    builds: list[int] = []
    real = context.blob_service_from_settings

    def slow_build(name: str, environ: Any) -> Any:
        with entered:
            builds.append(1)
            entered.notify_all()
            entered.wait_for(lambda: len(builds) > 1, timeout=0.5)  # a second builder would show up here
        return real(name, environ)

    monkeypatch.setattr(context, "blob_service_from_settings", slow_build)
    start = threading.Barrier(4)
    contexts: list[Any] = []

    def invoke() -> None:
        start.wait()
        contexts.append(api.app._context())

    threads = [threading.Thread(target=invoke) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(contexts) == 4
    assert all(c.exports is contexts[0].exports and c.secrets is contexts[0].secrets for c in contexts)


def test_reading_a_run_while_another_invocation_saves_it_leaves_the_runs_record_chain_alone(
        deployed, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker runs a run in one thread while `GET /api/runs/{id}` reads it in another: the read lands between
    two of the run's saves. The run's next save must still be conditional on its own last write (a state store shared
    by both invocations would have the read take that condition away, and the run would stop as if its lease were
    lost)."""
    run_id = api.start(source=deployed["info"].model_key, dry_run=True)["run_id"]
    running = api.app._context()  # the queue worker's invocation
    record = running.state.load_run(run_id)
    assert record is not None
    real_read = BlobContainerStore.read_with_etag
    saved: list[str] = []

    def read_while_the_run_saves(self: BlobContainerStore, key: str) -> Any:
        if key.endswith(f"{run_id}.json") and not saved:
            saved.append(key)
            record["note"] = "a checkpoint"
            running.state.save_run(record)  # lands while the GET reads
        return real_read(self, key)

    monkeypatch.setattr(BlobContainerStore, "read_with_etag", read_while_the_run_saves)
    status, body, _ = api.call("GET", "get_run", run_id=run_id)
    assert saved and status == 200 and body["run_id"] == run_id
    record["note"] = "the next checkpoint"
    running.state.save_run(record)  # raises LeaseLost if the read had moved its condition
    assert api.run(run_id)["note"] == "the next checkpoint"


def test_a_context_that_could_not_be_built_is_built_by_the_next_invocation(deployed, api: Api,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage outage while the first invocation builds the clients fails that invocation only."""
    real = context.blob_service_from_settings
    failures = [StateError("creating container 'state' failed: the account did not answer")]

    def flaky(name: str, environ: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(name, environ)

    monkeypatch.setattr(context, "blob_service_from_settings", flaky)
    status, body, _ = api.call("GET", "list_destinations")
    assert status == 503 and "did not answer" in body["error"]
    status, body, _ = api.call("GET", "list_destinations")
    assert status == 200 and NAME in {d["name"] for d in body["destinations"]}

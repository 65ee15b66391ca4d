"""The Functions app, called directly (no `func` host here) against a real Azurite and the sandbox over HTTP."""

from __future__ import annotations

import uuid
from pathlib import Path

import azure.functions as func
import orjson
import pytest
from azure.storage.blob import BlobServiceClient

from sandbox import samplegen
from shared import context

pytestmark = pytest.mark.azurite


@pytest.fixture(scope="module")
def functions():
    import function_app

    return {f.get_function_name(): f for f in function_app.app.get_functions()}  # once per session: see docs


HTTP_FUNCTIONS = {  # function -> (route, methods); every one at function-level auth
    "list_destinations": ("destinations", {"GET"}),
    "disable_destination": ("destinations/{name}", {"DELETE"}),
    "enable_destination": ("destinations/{name}/enable", {"POST"}),
    "destination_runs": ("destinations/{name}/runs", {"GET", "POST"}),
    "get_run": ("runs/{run_id}", {"GET"}),
    "erase_person": ("erasure", {"POST"}),
    "run_rejections": ("runs/{run_id}/rejections", {"GET"}),
    "history_page": ("ui", {"GET"}),
    "run_page": ("ui/runs/{run_id}", {"GET"}),
}


def test_binding_contract(functions) -> None:
    assert set(functions) == {"on_export", "scheduled_refresh", "run_queued_export", *HTTP_FUNCTIONS}
    (trigger,) = functions["on_export"].get_bindings()
    assert trigger.type == "blobTrigger" and trigger.path == "%EXPORTS_CONTAINER%/{name}"
    assert trigger.connection == "ExportsStorage" and trigger.source == "EventGrid"
    (timer,) = functions["scheduled_refresh"].get_bindings()
    assert timer.type == "timerTrigger" and timer.schedule == "%REFRESH_SCHEDULE%"
    assert timer.use_monitor is True and timer.run_on_startup is False
    for name, (route, methods) in HTTP_FUNCTIONS.items():
        bindings = {b.type: b for b in functions[name].get_bindings()}
        http = bindings.pop("httpTrigger")
        assert http.route == route and {getattr(m, "value", m) for m in http.methods} == methods, name
        assert http.auth_level == func.AuthLevel.FUNCTION and http.name == "req", name
        assert bindings.pop("http").name == "$return", name
        if name in ("destination_runs", "disable_destination"):  # runs and purges go on the queue the worker reads
            out = bindings.pop("queue")
            assert out.name == "runs" and out.queue_name == "%RUNS_QUEUE%" and out.connection == "ExportsStorage"
        assert bindings == {}, name
    (worker,) = functions["run_queued_export"].get_bindings()
    assert worker.type == "queueTrigger" and worker.name == "message"
    assert worker.queue_name == "%RUNS_QUEUE%" and worker.connection == "ExportsStorage"


@pytest.fixture
def deployed(azurite, sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An exports container holding a generated Customer Insights export, a state container with the destinations
    file, and the app settings pointing at them."""
    suffix = uuid.uuid4().hex[:10]
    exports, state = f"exports-{suffix}", f"state-{suffix}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    exports_client = service.create_container(exports)
    state_client = service.create_container(state)
    info = samplegen.write_cdm_export(tmp_path / "x", 40_000, partitions=3, account_url=azurite.blob_url,
                                      container=exports)
    for path in sorted((tmp_path / "x").rglob("*")):
        if path.is_file() and path.name != "model.json":
            exports_client.upload_blob(path.relative_to(tmp_path / "x").as_posix(), path.read_bytes())
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    state_client.upload_blob("destinations.json",
                             orjson.dumps(samplegen.demo_destinations(list_id, max_profiles=None)))
    for k, v in {"ExportsStorage": azurite.connection_string, "EXPORTS_CONTAINER": exports, "STATE_CONTAINER": state,
                 "DESTINATIONS_CONFIG": "blob:destinations.json", "SENDGRID_API_URL": sandbox.url,
                 "SENDGRID_API_KEY": sandbox.key, "RUN_DEADLINE_SECONDS": "600"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KEY_VAULT_URL", raising=False)

    def land_model_json():  # Customer Insights writes model.json last: its arrival means the export is complete
        return exports_client.upload_blob(info.model_key, (tmp_path / "x" / info.model_key).read_bytes(),
                                          overwrite=True)

    yield {"info": info, "list_id": list_id, "exports": exports_client, "state": state_client,
           "land": land_model_json}
    service.delete_container(exports)
    service.delete_container(state)


def _runs(state_client) -> list[dict]:
    return [orjson.loads(state_client.download_blob(b.name).readall())
            for b in state_client.list_blobs(name_starts_with="runs/") if b.name.endswith(".json")]


def _jobs_applied(sandbox) -> None:
    """SendGrid applies every job it holds (see hold_jobs): the next look at them finds them final."""
    sandbox.box.release_jobs()
    sandbox.box.complete_jobs()


def _timer():
    import azure.functions.timer as timer

    import function_app

    function_app.scheduled_refresh(timer.TimerRequest(past_due=False))


def test_export_landing_in_storage_reaches_the_list_once(deployed, sandbox) -> None:
    import function_app

    deployed["land"]()
    blob = deployed["exports"].get_blob_client(deployed["info"].model_key)
    sandbox.box.hold_jobs()  # SendGrid has not applied the run's jobs when it polls them once at its end
    function_app.on_export(blob)
    puts = sandbox.box.stats["requests"]["PUT /v3/marketing/contacts"]
    function_app.on_export(blob)  # the same blob version again (Event Grid is at-least-once): a no-op
    assert sandbox.box.stats["requests"]["PUT /v3/marketing/contacts"] == puts
    (run,) = _runs(deployed["state"])
    assert run["status"] == "submitted" and run["trigger"] == "blob", run  # an upsert run leaves its jobs to the timer
    _jobs_applied(sandbox)
    _timer()  # polls the submitted run's jobs and finalises it
    (run,) = _runs(deployed["state"])
    assert run["status"] == "completed", run
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct


def test_a_new_version_of_the_export_is_a_new_run(deployed, sandbox) -> None:
    import function_app

    deployed["land"]()
    function_app.on_export(deployed["exports"].get_blob_client(deployed["info"].model_key))
    deployed["land"]()  # rewritten: new ETag
    function_app.on_export(deployed["exports"].get_blob_client(deployed["info"].model_key))
    assert len(_runs(deployed["state"])) == 2


def test_run_interrupted_at_its_deadline_is_resumed_by_the_timer(deployed, sandbox, monkeypatch) -> None:
    import function_app

    monkeypatch.setenv("RUN_DEADLINE_SECONDS", "5")
    config = samplegen.demo_destinations(deployed["list_id"], max_profiles=None)
    config["destinations"][0]["max_in_flight"] = 1  # one request at a time: the deadline passes during the first
    deployed["state"].upload_blob("destinations.json", orjson.dumps(config), overwrite=True)
    sandbox.box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "slow", "delay": 7.0, "times": 1})
    deployed["land"]()
    function_app.on_export(deployed["exports"].get_blob_client(deployed["info"].model_key))
    (run,) = _runs(deployed["state"])
    assert run["status"] == "interrupted" and 0 < run["checkpoint"]["contacts_done"] < deployed["info"].valid_distinct
    monkeypatch.setenv("RUN_DEADLINE_SECONDS", "600")
    context.forget_process_clients()  # in Azure, changing an app setting restarts the worker process
    sandbox.box.hold_jobs()
    _timer()  # resumes from the checkpoint
    (run,) = _runs(deployed["state"])
    assert run["status"] == "submitted" and run["checkpoint"]["resumed"] == 1, run
    _jobs_applied(sandbox)
    _timer()  # finalises its jobs
    (run,) = _runs(deployed["state"])
    assert run["status"] == "completed" and run["checkpoint"]["resumed"] == 1
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct


def test_blobs_that_are_not_exports_are_ignored(deployed, sandbox) -> None:
    import function_app

    deployed["exports"].upload_blob("random/notes.txt", b"hello")
    function_app.on_export(deployed["exports"].get_blob_client("random/notes.txt"))
    assert _runs(deployed["state"]) == []


def test_a_broken_export_is_reported_once_and_not_retried(deployed, sandbox) -> None:
    import function_app

    deployed["exports"].upload_blob("CustomerInsights_y/BlobExport/model.json", b'{"entities": "none"}')
    function_app.on_export(deployed["exports"].get_blob_client("CustomerInsights_y/BlobExport/model.json"))  # no raise
    (error,) = [b.name for b in deployed["state"].list_blobs(name_starts_with="blob-errors/")]
    report = orjson.loads(deployed["state"].download_blob(error).readall())
    assert report["source"] == "CustomerInsights_y/BlobExport/model.json" and "model.json" in report["error"]
    assert _runs(deployed["state"]) == []


def test_a_model_json_cut_short_is_looked_at_again_not_reported_broken(deployed, sandbox) -> None:
    """Being written, or seen before its flush: no error report, no claim; the timer looks again (issue 11 §5)."""
    import function_app

    deployed["exports"].upload_blob("CustomerInsights_y/BlobExport/model.json", b'{"entities": [')
    function_app.on_export(deployed["exports"].get_blob_client("CustomerInsights_y/BlobExport/model.json"))
    assert list(deployed["state"].list_blobs(name_starts_with="blob-errors/")) == []
    assert len(list(deployed["state"].list_blobs(name_starts_with="pending-exports/"))) == 1
    assert _runs(deployed["state"]) == []


def test_two_triggers_for_one_destination_at_once_never_interleave(deployed, sandbox) -> None:
    import threading

    import function_app

    deployed["land"]()
    blob = deployed["exports"].get_blob_client(deployed["info"].model_key)
    sandbox.box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "slow", "delay": 1.0, "times": 1})
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            function_app.on_export(blob)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fire) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (run,) = _runs(deployed["state"])  # one version, one run: the others were a no-op or deferred
    assert run["requests"]["count"] == 2 and sandbox.box.stats["requests"]["PUT /v3/marketing/contacts"] == 2
    sandbox.box.complete_jobs()  # SendGrid applied the run's jobs before the timer polls them
    _timer()
    (run,) = _runs(deployed["state"])
    assert run["status"] == "completed"
    assert len(sandbox.box.list_emails(deployed["list_id"])) == deployed["info"].valid_distinct


def test_mirror_destination_through_the_blob_trigger_follows_the_segment(deployed, sandbox) -> None:
    import function_app

    config = orjson.loads(deployed["state"].download_blob("destinations.json").readall())
    config["destinations"][0]["mode"] = "mirror"
    deployed["state"].upload_blob("destinations.json", orjson.dumps(config), overwrite=True)
    deployed["land"]()
    model = deployed["exports"].get_blob_client(deployed["info"].model_key)
    function_app.on_export(model)
    sandbox.box.complete_jobs()
    _timer()
    everyone = set(sandbox.box.list_emails(deployed["list_id"]))
    assert len(everyone) == deployed["info"].valid_distinct
    # the next export drops the last partition's people: they leave the list (and stay in SendGrid)
    meta = orjson.loads(model.download_blob().readall())
    dropped = meta["entities"][0]["partitions"].pop()
    model.upload_blob(orjson.dumps(meta), overwrite=True)
    function_app.on_export(model)
    sandbox.box.complete_jobs()
    _timer()
    sandbox.box.complete_jobs()  # list removals are asynchronous SendGrid jobs with no status call to wait on
    remaining = set(sandbox.box.list_emails(deployed["list_id"]))
    runs = sorted(_runs(deployed["state"]), key=lambda r: r["run_id"])
    assert runs[-1]["mirror"]["guard_rail"] == "allowed" and runs[-1]["mirror"]["removed"] == len(everyone - remaining)
    assert remaining < everyone and len(everyone - remaining) > 1000, dropped["name"]
    assert all(sandbox.box.contact(e) is not None for e in list(everyone - remaining)[:50])

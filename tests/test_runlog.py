"""The structured run record (shared/runlog.py) that Application Insights charts and alerts on: one record per
finished run, from every door of the Functions app, with the fields the alert queries read (infra/app/alerts/*.kql),
as OpenTelemetry's LoggingHandler exports them (the attributes become custom dimensions) and as the message the
Functions host forwards by default."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from shared import runlog
from tests.conftest import REPO
from tests.test_http_api import NAME, Api, deployed  # noqa: F401  (the HTTP tests' deployment: Azurite + sandbox)

pytestmark = pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated")

FINISHED = {"run_id": "20250101T120000Z-0a1b2c3d", "destination": NAME, "trigger": "blob", "status": "completed",
            "dry_run": False, "started_at": "2025-01-01T12:00:00Z", "finished_at": "2025-01-01T12:01:40.5Z",
            "counts": {"read": 1000, "valid": 950, "sent": 950, "rejected_total": 30, "duplicates": 20,
                       "not_applied": 2, "rejected": {"invalid_email": 30}},
            "timings": {"seconds": 12.0}}


def test_the_fields_of_a_finished_run() -> None:
    assert runlog.run_fields(FINISHED) == {
        "event": "run_finished", "destination": NAME, "run_id": "20250101T120000Z-0a1b2c3d", "kind": "run",
        "trigger": "blob", "status": "completed", "dry_run": False, "read": 1000, "valid": 950, "sent": 950,
        "rejected_total": 30, "not_applied": 2, "duration_seconds": 100.5}
    changes = {"new": 5, "changed": 3, "unchanged": 900, "removed": 1, "rejected": 30, "not_applied": 2}
    fields = runlog.run_fields(FINISHED | {"changes": changes, "kind": "purge"})
    assert fields is not None and fields["kind"] == "purge"
    assert {k: v for k, v in fields.items() if k.startswith("changes_")} == {f"changes_{k}": v
                                                                             for k, v in changes.items()}
    refused = {"run_id": FINISHED["run_id"], "destination": NAME, "trigger": "http", "status": "refused",
               "queued_at": "2025-01-01T12:00:00Z", "finished_at": "2025-01-01T12:00:02Z", "started_at": None}
    assert runlog.run_fields(refused) == {"event": "run_finished", "destination": NAME, "run_id": FINISHED["run_id"],
                                          "kind": "run", "trigger": "http", "status": "refused", "dry_run": False,
                                          "duration_seconds": 2.0}


@pytest.mark.parametrize("record", [
    FINISHED | {"status": s} for s in ("running", "interrupted", "submitted", "waiting", "queued", "skipped")
] + [{"destination": NAME, "status": "skipped", "run_id": FINISHED["run_id"]},  # "another run has it": not a run
     {"destination": NAME, "status": "deferred"}, {}], ids=lambda r: str(r.get("status")) + str(len(r)))
def test_no_record_for_a_run_that_is_open_or_for_an_answer_that_is_not_a_run(record: dict[str, Any]) -> None:
    assert runlog.run_fields(record) is None


@pytest.fixture
def telemetry() -> Iterator[InMemoryLogRecordExporter]:
    """OpenTelemetry's LoggingHandler (what Application Insights' exporter sits behind) on the run log, at INFO as the
    Functions worker sets the root logger."""
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(level=logging.INFO, logger_provider=provider)
    logger = logging.getLogger("shared.runlog")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield exporter
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        provider.shutdown()


def records(exporter: InMemoryLogRecordExporter, event: str) -> list[dict[str, Any]]:
    """The custom dimensions of each exported record of `event`, checked against the JSON its message carries."""
    found = []
    for item in exporter.get_finished_logs():
        record = item.log_record
        body = str(record.body)
        if not body.startswith(f"{event} "):
            continue
        dims = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (record.attributes or {}).items()
                if not k.startswith(("code.", "exception.")) and k not in ("otelSpanID", "otelTraceID")}
        assert orjson.loads(body[len(event) + 1:]) == dims  # the message the host forwards says the same
        found.append(dims)
    return found


def _timer() -> None:
    import azure.functions.timer as timer

    import function_app

    function_app.scheduled_refresh(timer.TimerRequest(past_due=False))


def _until_final(api: Api, run_id: str) -> dict[str, Any]:
    """Timer ticks until the run is final (the sandbox applies its jobs within a fraction of a second)."""
    for _ in range(100):
        run = api.run(run_id)
        if run["status"] in runlog.FINAL_STATUSES:
            return run
        _timer()
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish: {api.run(run_id)['status']}")


def test_every_door_writes_one_record_per_finished_run(deployed, sandbox, telemetry) -> None:  # noqa: F811
    api = Api()
    model_key = deployed["info"].model_key
    reports = {r["destination"]: r for r in api.app.connector.on_blob(api.app._context(), model_key)}  # on_export
    refused = reports["no-consent"]  # the export holds its segment too; it refuses without consent
    run = _until_final(api, reports[NAME]["run_id"])
    assert run["status"] == "completed"
    (blob,) = [r for r in records(telemetry, "run_finished") if r["run_id"] == run["run_id"]]
    info = deployed["info"]
    assert blob == {"event": "run_finished", "destination": NAME, "run_id": run["run_id"], "kind": "run",
                    "trigger": "blob", "status": "completed", "dry_run": False, "read": run["counts"]["read"],
                    "valid": info.valid_distinct, "sent": info.valid_distinct,
                    "rejected_total": run["counts"]["rejected_total"], "not_applied": 0,
                    "duration_seconds": blob["duration_seconds"],
                    **{f"changes_{k}": v for k, v in run["changes"].items()}}
    assert run["changes"]["new"] == info.valid_distinct  # a first run: everyone is new to the list
    assert blob["read"] > blob["valid"] and blob["rejected_total"] > 0 and blob["duration_seconds"] > 0

    _timer()  # a tick of its own: the run may have ended within the blob trigger, with no tick needed
    (seen, *_) = records(telemetry, "destinations_seen")  # each tick names who should run
    assert seen == {"event": "destinations_seen", "enabled": ["no-consent", NAME], "disabled": [],
                    "invalid": ["broken"]}

    dry = api.start(source=model_key, dry_run=True)
    api.work()
    api.work()  # the queue redelivers: the run has finished, nothing runs and nothing is logged again
    status, purged, _ = api.call("DELETE", "disable_destination", name=NAME, params={"purge": "list"})
    assert status == 202
    api.work()
    _until_final(api, purged["run_id"])
    ours = [r for r in records(telemetry, "run_finished") if r["destination"] == NAME]
    by_run = {r["run_id"]: r for r in records(telemetry, "run_finished")}
    assert len(ours) == 3 == len({r["run_id"] for r in ours})  # one each, the redelivery added none
    assert {k: by_run[refused["run_id"]][k] for k in ("destination", "trigger", "status")} == {
        "destination": "no-consent", "trigger": "blob", "status": "refused"}
    assert by_run[dry["run_id"]] | {"duration_seconds": 0} == {
        "event": "run_finished", "destination": NAME, "run_id": dry["run_id"], "kind": "run", "trigger": "http",
        "status": "dry_run", "dry_run": True, "read": blob["read"], "valid": blob["valid"], "sent": 0,
        "rejected_total": blob["rejected_total"], "duration_seconds": 0,
        "changes_new": 0, "changes_changed": 0, "changes_unchanged": blob["valid"],  # nothing changed since
        "changes_rejected": blob["rejected_total"]}
    assert {k: by_run[purged["run_id"]][k] for k in ("kind", "trigger", "status")} == {
        "kind": "purge", "trigger": "http", "status": "completed"}
    _timer()
    assert records(telemetry, "destinations_seen")[-1]["disabled"] == [NAME]  # disabled through the API


def test_a_run_that_goes_on_later_writes_one_record_when_it_ends(deployed, sandbox, telemetry) -> None:  # noqa: F811
    """A run whose SendGrid jobs are still pending (or that stopped at its deadline) is not finished: no record, so
    no alert, until the timer brings it to its end."""
    api = Api()
    sandbox.box.job_delay = 1.0  # SendGrid applies the upsert later than the trigger's answer
    reports = {r["destination"]: r for r in api.app.connector.on_blob(api.app._context(), deployed["info"].model_key)}
    report = reports[NAME]
    assert report["status"] not in runlog.FINAL_STATUSES, report["status"]
    assert [r["destination"] for r in records(telemetry, "run_finished")] == ["no-consent"]  # none for NAME yet
    run = _until_final(api, report["run_id"])
    assert run["status"] == "completed"
    (only,) = [r for r in records(telemetry, "run_finished") if r["destination"] == NAME]
    assert only["run_id"] == run["run_id"] and only["status"] == "completed" and only["trigger"] == "blob"


def test_run_records_are_not_sampled_away_among_sdk_noise() -> None:
    """Application Insights' adaptive sampling drops traces under load; an alert must never miss a failed run. Traces
    are kept whole (host.json), and the Azure SDK's per-request INFO lines, hundreds a run, are not written."""
    import function_app  # noqa: F401  the app's start-up, as the worker runs it

    sampling = orjson.loads((REPO / "host.json").read_bytes())["logging"]["applicationInsights"]["samplingSettings"]
    assert "Trace" in sampling["excludedTypes"].split(";")
    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    assert not sdk.isEnabledFor(logging.INFO) and sdk.isEnabledFor(logging.WARNING)

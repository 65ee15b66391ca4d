"""No API key reaches a log handler, whenever the handler was attached: tested with OpenTelemetry's real
`LoggingHandler` (what Application Insights exporters sit behind; it reads the exception object itself) and a
SendGrid stand-in on loopback that echoes the request's Authorization header in its 403 body."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from sandbox import samplegen
from sandbox.server import Sandbox, serve
from shared.errors import SendGridError
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore
from tests.conftest import QuietJsonHandler, loopback_server

# The SDK's handler is what Application Insights and OTLP exporters use today; its deprecation notice points at a
# successor that reads records the same way.
pytestmark = pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated")

KEY_ID = "EchoKeyId" + secrets.token_hex(6)  # 21 characters, like a real key id
KEY = f"SG.{KEY_ID}.{secrets.token_urlsafe(32)}"
CUT_AT = 200  # SendGrid messages are kept to 200 characters in errors


class EchoingSendGrid(QuietJsonHandler):
    """403 for everything, echoing the key twice: after "Bearer", and bare where a 200-character cut falls in it."""

    def do_GET(self) -> None:
        header = self.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        pad = "x" * (CUT_AT - len(" key ") - len("SG.") - 6)  # the cut leaves "SG." and 6 characters of the key id
        body = orjson.dumps({"errors": [{"message": f"forbidden: Authorization: {header}"},
                                        {"message": f"{pad} key {token} is blocked"}]})
        self.send_json(403, body)


@pytest.fixture
def echo_url() -> Iterator[str]:
    with loopback_server(EchoingSendGrid) as url:
        yield url


@pytest.fixture
def telemetry() -> Iterator[InMemoryLogRecordExporter]:
    """OpenTelemetry's LoggingHandler on the root logger and on `shared`, attached after the app was imported (as an
    Application Insights distro configured later, or the worker's own handler, would be)."""
    import function_app  # noqa: F401  the Functions app's start-up, as the worker runs it

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(level=logging.DEBUG, logger_provider=provider)
    loggers = [logging.getLogger(), logging.getLogger("shared")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield exporter
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        provider.shutdown()


def exported_text(exporter: InMemoryLogRecordExporter) -> str:
    return "\n".join(record.to_json() for record in exporter.get_finished_logs())


def assert_no_key(text: str) -> None:
    assert KEY not in text and KEY_ID[:6] not in text and KEY.split(".")[2][:8] not in text


def test_a_403_echoing_the_key_during_job_polling_reaches_telemetry_redacted(
        telemetry: InMemoryLogRecordExporter, echo_url: str, tmp_path: Path) -> None:
    from shared import app, context

    box = Sandbox(api_keys=[KEY], job_delay=3600)  # jobs stay pending: the run ends submitted
    list_id = box.create_list("VIP")
    (tmp_path / "exports" / "vip-newsletter").mkdir(parents=True)
    (tmp_path / "exports" / "vip-newsletter" / "people.csv").write_text("email\nada@example.com\n", encoding="utf-8")
    config = samplegen.demo_destinations(list_id)
    config["destinations"][0].update(segments=["people"], mapping={"email": "email"}, custom_fields={})
    (tmp_path / "destinations.json").write_bytes(orjson.dumps(config))
    environ = {"SENDGRID_API_KEY": KEY}
    settings = context.Settings("exports", "state", str(tmp_path / "destinations.json"), 600.0, environ)
    ctx = context.AppContext(settings, LocalFolderStore(tmp_path / "exports"),
                         StateStore(LocalFolderStore(tmp_path / "state")), EnvSecrets(environ))
    with serve(box) as server:
        environ["SENDGRID_API_URL"] = server.url
        key = "vip-newsletter/people.csv"
        run = app.run_export(ctx, ctx.config(), "vip-newsletter", key, ctx.exports.info(key).etag, "blob")
    assert run["status"] == "submitted"

    environ["SENDGRID_API_URL"] = echo_url  # the job poll now meets the echoing 403
    app.on_timer(ctx)
    text = exported_text(telemetry)
    assert "could not be finished" in text and "403" in text and "[REDACTED]" in text  # logged, and scrubbed
    assert_no_key(text)


def test_an_exception_carrying_the_key_is_scrubbed_before_telemetry_reads_it(
        telemetry: InMemoryLogRecordExporter) -> None:
    log = logging.getLogger("shared.engine")
    try:
        try:
            raise ValueError(f"upstream said {KEY}")
        except ValueError as inner:
            raise RuntimeError(f"request failed with Authorization: Bearer {KEY}") from inner
    except RuntimeError:
        log.exception("send failed for %s", KEY)
    try:
        raise SendGridError(f"answer echoed {KEY}", status=403)
    except SendGridError as exc:
        assert KEY not in str(exc) and KEY not in repr(exc.args)  # redacted when made
        log.error("giving up: %s", exc, exc_info=True)
    records = telemetry.get_finished_logs()
    assert len(records) >= 2
    text = exported_text(telemetry)
    assert "exception.stacktrace" in text and "RuntimeError" in text and "ValueError" in text
    assert "send failed for [REDACTED]" in text
    assert_no_key(text)


@pytest.mark.parametrize("length", [5, 10, len("SG.") + len(KEY_ID), len("SG.") + len(KEY_ID) + 1, 30])
def test_a_key_cut_short_is_still_redacted(length: int) -> None:
    from shared.redaction import redact

    assert redact(f"message ending in {KEY[:length]}") == "message ending in [REDACTED]"


def test_installing_redaction_twice_wraps_the_factory_once_and_keeps_the_one_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.redaction import install_log_redaction

    made: list[logging.LogRecord] = []
    base = logging.getLogRecordFactory()

    def previous(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base(*args, **kwargs)
        made.append(record)
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", previous)
    install_log_redaction()
    installed = logging.getLogRecordFactory()
    install_log_redaction()
    assert logging.getLogRecordFactory() is installed is not previous
    record = logging.getLogger("shared.x").makeRecord("shared.x", logging.INFO, __file__, 1, "key %s", (KEY,), None)
    assert made == [record] and record.getMessage() == "key [REDACTED]" and record.args is None

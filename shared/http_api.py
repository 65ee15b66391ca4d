"""The HTTP door. `function_app.py` turns a func.HttpRequest into `handle(...)` and the `Response` back; nothing here
imports azure.functions. It only translates: route values, parameters and bodies are checked, the rules of
`services` (refusal) and `routing` (which exports a destination takes) are asked, and their answers or errors become
JSON answers.

Route values (destination names, run ids) are checked against the state store's patterns before anything touches
storage: the app context (blob clients, containers) is asked for only after the checks pass. Every answer is JSON,
and its text goes through `redact` on the way out, so not even a bug can put an API key in it.

`POST .../runs` and `DELETE ...?purge=` store a queued record and answer with a message for the runs queue; the
queue worker (`queue_worker`) runs it.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson

from . import contacts, history, page, schedules
from .config import Config, Destination
from .context import AppContext
from .errors import (
    ConfigError,
    ConnectorError,
    LeaseUnavailable,
    RunRefused,
    SourceError,
    StateError,
    UnsupportedInterpreter,
)
from .queue_worker import QUEUED
from .record import RunRecord
from .secrets import redact
from .services import refusal
from .state import DESTINATION_PATTERN, RUN_ID_PATTERN, new_run_id, now_iso
from .storage import NotFound, check_key

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # every JSON body this API takes is a few hundred bytes
HISTORY_DEFAULT, HISTORY_MAX = 20, 200
MAX_SOURCE_CHARS = 1024  # Blob Storage's limit for a blob name
MAX_REASON_CHARS = 500
START_FIELDS = ("source", "dry_run")
MIMETYPE = "application/json"  # utf-8
HTML, CSV = "text/html", "text/csv"  # utf-8
FUNCTION_KEY = re.compile(r"[A-Za-z0-9_\-=+/.~]{1,512}")  # what a key passed as ?code= may look like
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
ERASURE_BODY = '{"email": "<one address>"}'

ContextSource: TypeAlias = AppContext | Callable[[], AppContext]


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    message: dict[str, Any] | None = None  # for the runs queue (an accepted POST .../runs only)
    page: str | None = None  # an HTML page instead of the JSON body (GET ui...)
    stream: Iterable[bytes] | None = None  # a download read chunk by chunk instead (GET .../rejections)
    mimetype: str = MIMETYPE

    def json(self) -> bytes:
        """The body as JSON text, with anything secret-shaped or registered as a secret scrubbed."""
        return redact(orjson.dumps(self.body).decode()).encode()

    def content(self) -> Iterable[bytes]:
        """What is sent: the page or the JSON body, scrubbed like it; or the download's chunks (scrubbed line by line
        where they are read, history.rejections_chunks)."""
        if self.stream is not None:
            return self.stream
        return [redact(self.page).encode() if self.page is not None else self.json()]

    def all_headers(self) -> dict[str, str]:
        return {**HEADERS, **self.headers}

    def message_json(self) -> str | None:
        return None if self.message is None else orjson.dumps(self.message).decode()


class HttpError(Exception):
    """An answer other than success, with a message safe to show."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


@dataclass
class Call:
    """One checked request: route values have matched their patterns; the context is built on first use."""

    method: str
    route_params: Mapping[str, str]
    params: Mapping[str, str]
    body: bytes
    context: ContextSource
    _ctx: AppContext | None = None

    @property
    def ctx(self) -> AppContext:
        if self._ctx is None:
            self._ctx = self.context() if callable(self.context) else self.context
        return self._ctx

    @property
    def name(self) -> str:
        return self.route_params["name"]


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, {"error": redact(message)}, dict(headers or {}))


# ------------------------------------------------------------------------------------------------------ checks
_ROUTE_VALUES = {
    "name": (DESTINATION_PATTERN, "destination name", "lower-case letters, digits and '-', 1-63 characters, "
                                                      "starting with a letter or digit"),
    "run_id": (RUN_ID_PATTERN, "run id", "like 20250101T120000Z-0a1b2c3d"),
}


def check_route_values(template: str, route_params: Mapping[str, str]) -> dict[str, str]:
    """The template's route values, each matching its pattern in full (`match` would let "name\\n" through: `$`
    matches before a final newline). The value itself is never echoed."""
    checked: dict[str, str] = {}
    for key in re.findall(r"{(\w+)}", template):
        pattern, what, rule = _ROUTE_VALUES[key]
        value = route_params.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise HttpError(400, f"invalid {what}: use {rule}")
        checked[key] = value
    return checked


def parse_object(body: bytes) -> dict[str, Any]:
    """A JSON object body; an empty body is {}."""
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    return value


def _limit(params: Mapping[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return HISTORY_DEFAULT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= HISTORY_MAX:  # isdigit alone takes "²", "٣"
        raise HttpError(400, f"limit must be a whole number from 1 to {HISTORY_MAX}")
    return int(raw)


def _printable_line(text: str) -> bool:
    """No control, format (bidi overrides, zero-width), private-use, unassigned or line/paragraph separator
    characters: what is stored and shown again reads as what was sent, on one line."""
    return not any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in text)


def _reason(params: Mapping[str, str], default: str) -> str:
    raw = params.get("reason")
    if raw is None or not raw.strip():
        return default
    if len(raw) > MAX_REASON_CHARS or not _printable_line(raw):
        raise HttpError(400, f"reason must be one line of at most {MAX_REASON_CHARS} printable characters")
    return " ".join(redact(raw).split())  # stored and logged: a pasted key must not be; runs of spaces become one


def _named(config: Config, name: str) -> Config:
    """`config`, when its file names the destination (valid or not); 404 otherwise."""
    if name not in config.destinations and name not in config.errors:
        raise HttpError(404, f"no destination named '{name}'")
    return config


def _configured(config: Config, name: str) -> Destination:
    """The named valid destination: 404 when the file does not name it, 409 when its entry is invalid."""
    if name in config.errors:
        raise HttpError(409, f"destination '{name}' is invalid: {config.errors[name]}")
    return _named(config, name).destinations[name]


def resolve_source(ctx: AppContext, source: str) -> tuple[str, str]:
    """(key, ETag) of an export in the exports container: a model.json, a folder holding one, or a plain file."""
    key = source.strip("/")
    try:
        check_key(key)
    except StateError:
        raise HttpError(400, "source must be a key in the exports container, like 'folder/model.json'") from None
    candidates = [key] if key.rsplit("/", 1)[-1].lower() == "model.json" else [key, f"{key}/model.json"]
    for candidate in candidates:
        info = ctx.exports.info(candidate)
        if info is not None:
            return candidate, info.etag
    raise HttpError(404, f"no export '{key}' in {ctx.exports.label}")


def _check_export_of(ctx: AppContext, config: Config, dest: Destination, key: str) -> None:
    """A run reads only the destination's own exports, by the blob trigger's rule (routing.destinations_for_blob): a
    model.json holding one of its segments, or a plain file under '<destination>/'."""
    from .routing import destinations_for_blob  # here: it reads exports, which no read-only route loads
    try:
        takers = destinations_for_blob(ctx.exports, config, key)
    except SourceError as exc:
        raise HttpError(400, f"source {key} cannot be read: {exc}") from None
    if dest.name not in takers:
        raise HttpError(400, f"source {key} is not an export of destination '{dest.name}': name a model.json that "
                             f"holds one of its segments ({', '.join(dest.segments)}), or a file under '{dest.name}/'")


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("run_id", "status", "trigger", "dry_run", "source", "queued_at", "started_at", "finished_at", "error",
            "counts")
    return {k: record.get(k) for k in keys} | {"url": f"/api/runs/{record.get('run_id')}"}


def _last_run(ctx: AppContext, name: str) -> dict[str, Any] | None:
    runs = ctx.state.list_runs(name, limit=1)
    return {k: runs[0].get(k) for k in ("run_id", "status", "finished_at")} if runs else None


# ------------------------------------------------------------------------------------------------------ handlers
def list_destinations(call: Call) -> Response:
    ctx = call.ctx
    config = ctx.config()
    items: list[dict[str, Any]] = []
    now = time.time()
    for name, dest in sorted(config.destinations.items()):
        disabled = ctx.state.disabled(name)
        items.append(dest.public() | {"valid": True, "disabled": disabled, "blocked": refusal(dest, disabled),
                                      "next_due": schedules.next_run(ctx.state, dest, disabled, now),
                                      "last_run": _last_run(ctx, name)})
    for name, exc in sorted(config.errors.items()):
        entry: dict[str, Any] = {"name": name, "valid": False, "error": str(exc)}
        if DESTINATION_PATTERN.fullmatch(name):  # "#3" (an entry without a usable name) has no state
            entry |= {"disabled": ctx.state.disabled(name), "last_run": _last_run(ctx, name)}
        items.append(entry)
    return Response(200, {"destinations": items})


def start_run(call: Call) -> Response:
    fields = parse_object(call.body)
    unknown = sorted(set(fields) - set(START_FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(unknown)}; the body may hold {', '.join(START_FIELDS)}")
    source, dry_run = fields.get("source"), fields.get("dry_run", False)
    if source is not None and (not isinstance(source, str) or not source.strip() or len(source) > MAX_SOURCE_CHARS):
        raise HttpError(400, f"source must be a non-empty string of at most {MAX_SOURCE_CHARS} characters")
    if not isinstance(dry_run, bool):
        raise HttpError(400, "dry_run must be true or false")
    full_resync = call.params.get("full_resync", "false")
    if full_resync not in ("true", "false"):
        raise HttpError(400, "full_resync must be true or false")
    ctx, name = call.ctx, call.name
    config = ctx.config()
    dest = _configured(config, name)
    blocked = refusal(dest, ctx.state.disabled(name))
    if blocked:
        raise HttpError(409, blocked)
    if source is None:
        latest = ctx.state.latest_export(name)
        if latest is None:
            raise HttpError(409, f"no export has arrived for destination '{name}' yet: name one in the body, "
                                 '{"source": "<key in the exports container>"}')
        source = latest["source"]
        try:
            key, etag = resolve_source(ctx, source)
        except HttpError as exc:
            if exc.status != 404:
                raise
            raise HttpError(409, f"the latest export of '{name}', {source}, is no longer in {ctx.exports.label}: "
                                 "name another in the body") from None
    else:
        key, etag = resolve_source(ctx, source)
        _check_export_of(ctx, config, dest, key)
    run_id = new_run_id()
    ctx.state.save_run(queued_record(dest, run_id, key, etag, dry_run, full_resync=full_resync == "true"))
    url = f"/api/runs/{run_id}"
    message = {"run_id": run_id, "destination": name, "source": key, "etag": etag}
    log.info("%s: run %s queued for %s%s", name, run_id, key, " (dry run)" if dry_run else "")
    return Response(202, {"run_id": run_id, "status": QUEUED, "status_url": url, "destination": name, "source": key,
                          "dry_run": dry_run, "full_resync": full_resync == "true"}, {"Location": url}, message)


def queued_record(dest: Destination, run_id: str, source: str, etag: str | None, dry_run: bool, *,
                  full_resync: bool = False) -> RunRecord:
    record = RunRecord.queued(run_id, dest, source=source, source_etag=etag, dry_run=dry_run, queued_at=now_iso())
    if full_resync:
        record.extra["full_resync"] = True
    return record


def run_history(call: Call) -> Response:
    limit = _limit(call.params)
    ctx, name = call.ctx, call.name
    runs = ctx.state.list_runs(name, limit=limit)
    if not runs:
        _named(ctx.config(), name)
    return Response(200, {"destination": name, "runs": [_summary(r) for r in runs]})


def get_run(call: Call) -> Response:
    record = call.ctx.state.load_run(call.route_params["run_id"])
    if record is None:
        raise HttpError(404, "no run with that id")
    return Response(200, record)


def disable_destination(call: Call) -> Response:
    """Disable a destination. With ?purge=list|contacts, also take its contacts back out of SendGrid: the purge is
    queued (202 with a run id, like a run); purge=contacts deletes contacts and needs &confirm=true."""
    from . import purge  # here: the read-only routes start without it (tests/test_cold_start.py)
    what = call.params.get("purge")
    if what is not None and not purge.is_purge_what(what):
        raise HttpError(400, "purge must be 'list' (remove its contacts from its list) or 'contacts' (delete them "
                             "from the SendGrid account, with confirm=true)")
    if what == "contacts" and call.params.get("confirm") != "true":
        raise HttpError(400, "purge=contacts deletes the contacts from the SendGrid account entirely; add "
                             "confirm=true to confirm")
    reason = _reason(call.params, "disabled through the HTTP API" + (f" with purge={what}" if what else ""))
    ctx, name = call.ctx, call.name
    config = _named(ctx.config(), name)
    record = None
    if what is not None:  # refused before anything changes
        if name not in config.destinations:
            raise HttpError(409, f"destination '{name}' is invalid in the destinations file; fix it to purge it")
        try:
            record = purge.unfinished_purge(ctx.state, name, what)
        except RunRefused as exc:
            raise HttpError(409, str(exc)) from exc
    ctx.state.disable(name, by="http", reason=reason)
    log.warning("%s disabled through the HTTP API: %s", name, reason)
    marker = ctx.state.disabled(name) or {}
    body = {"destination": name, "disabled": True, "at": marker.get("at"), "by": marker.get("by"),
            "reason": marker.get("reason")}
    if what is None:
        return Response(200, body)
    message = None  # the same purge asked again answers its run: no second one, no second message
    if record is None:
        record = purge.queued_purge(ctx.state, config.destinations[name], what, by="http")
        message = {"run_id": record["run_id"], "destination": name, "kind": "purge"}
    url = f"/api/runs/{record['run_id']}"
    body.update(purge=what, run_id=record["run_id"], status=record["status"], status_url=url)
    return Response(202, body, {"Location": url}, message)


def enable_destination(call: Call) -> Response:
    """Enable a destination disabled by DELETE (or the CLI's remove); 409 while a purge of it is unfinished."""
    from . import purge  # here: the read-only routes start without it (tests/test_cold_start.py)
    ctx, name = call.ctx, call.name
    _named(ctx.config(), name)
    try:
        return Response(200, purge.enable_destination(ctx.state, name, by="http"))
    except RunRefused as exc:
        raise HttpError(409, str(exc)) from exc


def erase_person(call: Call) -> Response:
    """Forget one person everywhere; the answer names them by a salted hash only."""
    from . import purge  # here: the read-only routes start without it (tests/test_cold_start.py)
    data = parse_object(call.body)
    if set(data) != {"email"}:
        raise HttpError(400, f"the body must be {ERASURE_BODY}")
    try:
        address = contacts.single_address(data["email"])
    except ConfigError:
        raise HttpError(400, f"the body must be {ERASURE_BODY}, exactly one valid email address") from None
    ctx = call.ctx
    report = purge.erase(ctx.services(ctx.config()), address, by="http")
    return Response(200 if report["status"] == "completed" else 207, report)


def ui_links(params: Mapping[str, str], depth: int) -> page.Links:
    """Links between the pages and the CSV, relative to a page `depth` folders below the API's root (/api/ui: 0,
    /api/ui/runs/{id}: 2), so they hold whatever route prefix the host uses. A function key the page was opened with
    (`?code=`, the one way a browser can pass it) goes on with every link: a person who clicks needs it, and the
    pages load nothing from anywhere and send no referrer, so it goes nowhere else."""
    code = params.get("code")
    query = f"?code={urllib.parse.quote(code, safe='')}" if code and FUNCTION_KEY.fullmatch(code) else ""
    up = "../" * depth
    return page.Links(home=f"{up}ui{query}", run=lambda run_id: f"{up}ui/runs/{run_id}{query}",
                      rejections=lambda _destination, run_id: f"{up}runs/{run_id}/rejections{query}")


def _page(text: str, status: int = 200) -> Response:
    return Response(status, {}, dict(page.HEADERS), page=text, mimetype=HTML)


def history_page(call: Call) -> Response:
    """Every destination with its settings, schedule and last runs (page.overview)."""
    ctx = call.ctx
    now = time.time()
    views = history.destination_views(ctx.config(), ctx.state, now)
    return _page(page.overview(views, now, ui_links(call.params, 0)))


def _run_record(call: Call) -> dict[str, Any]:
    record = call.ctx.state.peek_run(call.route_params["run_id"])  # read only: no save of it follows
    if record is None:
        raise HttpError(404, "no run with that id")
    return record


def run_page(call: Call) -> Response:
    """One run (page.run_page), with a dry run's removals preview."""
    record = _run_record(call)
    removals = history.removals_preview(call.ctx.state, record)
    return _page(page.run_page(record, ui_links(call.params, 2), removals))


def run_rejections(call: Call) -> Response:
    """Every rejected row of a run (up to report.MAX_CSV_ROWS), as the CSV the run wrote, streamed from storage."""
    record = _run_record(call)
    key = history.rejections_key(record)
    try:
        chunks = history.rejections_chunks(call.ctx.state, key) if key else None
    except NotFound:
        chunks = None
    if chunks is None:
        raise HttpError(404, "this run has no rejections file: it rejected no rows, or it has not finished reading")
    name = f"{record['run_id']}-rejections.csv"
    return Response(200, {}, {"Content-Disposition": f'attachment; filename="{name}"'}, stream=chunks, mimetype=CSV)


Handler = Callable[[Call], Response]
ROUTES: dict[str, dict[str, Handler]] = {
    "destinations": {"GET": list_destinations},
    "destinations/{name}": {"DELETE": disable_destination},
    "destinations/{name}/enable": {"POST": enable_destination},
    "destinations/{name}/runs": {"GET": run_history, "POST": start_run},
    "runs/{run_id}": {"GET": get_run},
    "runs/{run_id}/rejections": {"GET": run_rejections},
    "erasure": {"POST": erase_person},
    "ui": {"GET": history_page},
    "ui/runs/{run_id}": {"GET": run_page},
}


def handle(method: str, route: str, route_params: Mapping[str, str], params: Mapping[str, str], body: bytes,
           ctx: ContextSource) -> Response:
    """Answer one request to `route` (a template from ROUTES). `ctx` may be a factory: it is called only once the
    method, body size and route values have passed their checks. The pages (ui...) answer their errors as a page."""
    answer = _answer(method, route, route_params, params, body, ctx)
    if route.startswith("ui") and answer.page is None:
        message = str(answer.body.get("error", ""))
        links = ui_links(params, route.count("/"))
        return Response(answer.status, {}, {**answer.headers, **page.HEADERS},
                        page=page.error_page(answer.status, message, links), mimetype=HTML)
    return answer


def _answer(method: str, route: str, route_params: Mapping[str, str], params: Mapping[str, str], body: bytes,
            ctx: ContextSource) -> Response:
    methods = ROUTES.get(route)
    if methods is None:
        return error(404, "no such route")
    method = method.upper()
    if method not in methods:
        allowed = ", ".join(sorted(methods))
        return error(405, f"{method} is not allowed here; use {allowed}", {"Allow": allowed})
    if len(body) > MAX_BODY_BYTES:
        return error(413, f"the body is {len(body):,} bytes; at most {MAX_BODY_BYTES:,} are accepted")
    try:
        values = check_route_values(route, route_params)
        return methods[method](Call(method, values, params, body, ctx))
    except HttpError as exc:
        return error(exc.status, exc.message, exc.headers)
    except UnsupportedInterpreter as exc:  # the app refuses to work on this interpreter (function_app.REFUSAL)
        return error(503, str(exc))
    except ConfigError as exc:
        log.error("%s %s: %s", method, route, exc)
        return error(500, f"configuration problem: {exc}")
    except LeaseUnavailable as exc:
        return error(409, str(exc))
    except StateError as exc:
        log.error("%s %s: %s", method, route, exc)
        return error(503, f"the state store cannot be reached: {exc}")
    except ConnectorError as exc:
        log.error("%s %s: %s", method, route, exc)
        return error(500, str(exc))
    except Exception:
        log.exception("%s %s failed", method, route)
        return error(500, "internal error; the function's log has the details")

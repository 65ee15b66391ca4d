"""Azure Functions (Python v2) wiring: each trigger hands off to shared.app (blob, timer), shared.http_api (HTTP) or
shared.queue_worker (the runs queue) in a few lines. No business rules here.

Every invocation works with the worker process's one set of clients (shared.context.invocation_context): built by
the first invocation, shared by every later one, so the blob clients, the Key Vault client, its token and the key
cache live as long as the process. Nothing is read or built at import, and the engine (with numpy and the modules
that read, pack and send exports) is imported by the blob, timer and queue doors when they first run: a worker
process that only answers the HTTP routes that read state never loads it (tests/test_cold_start.py)."""

from __future__ import annotations

import logging
import os

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from shared import app as connector  # importing it makes every log record redacted (secrets.install_log_redaction)
from shared import contacts, context, http_api, queue_worker
from shared.errors import UnsupportedInterpreter

# Checked once per worker process, without I/O. Raising here would leave the host with "0 functions found" and, in
# Azure, often no trace of why; instead every invocation fails with this reason (HTTP answers 503), so it shows in
# each function's invocation log and in Application Insights.
REFUSAL = contacts.email_validator_problem()
if REFUSAL:
    logging.getLogger(__name__).critical(REFUSAL)

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _context() -> context.AppContext:
    if REFUSAL:
        raise UnsupportedInterpreter(REFUSAL)
    return context.invocation_context(os.environ)


@app.blob_trigger(arg_name="client", path="%EXPORTS_CONTAINER%/{name}", connection="ExportsStorage",
                  source=func.BlobSource.EVENT_GRID)
def on_export(client: blob.BlobClient) -> None:
    """A new blob in the exports container: a model.json (a finished Customer Insights export) or a plain file."""
    connector.on_blob(_context(), client.blob_name)


@app.timer_trigger(arg_name="timer", schedule="%REFRESH_SCHEDULE%", run_on_startup=False, use_monitor=True)
def scheduled_refresh(timer: func.TimerRequest) -> None:
    """Finish open runs, then export each destination's latest export not yet exported."""
    connector.on_timer(_context())


# --- HTTP API (shared.http_api): route values are checked before _context() builds any storage client ---------------
def _http(req: func.HttpRequest, route: str) -> http_api.Response:
    return http_api.handle(req.method, route, req.route_params, req.params, req.get_body(), _context)


def _queued(answer: http_api.Response, queue: func.Out[str]) -> http_api.Response:
    message = answer.message_json()
    if message is not None:
        queue.set(message)
    return answer


def _answer(answer: http_api.Response) -> func.HttpResponse:
    # One body: the Python worker's HTTP binding takes no stream (HTTP streams would make every HTTP function a
    # FastAPI one). A download (the rejections CSV, at most report.MAX_CSV_ROWS rows) is read chunk by chunk.
    return func.HttpResponse(b"".join(answer.content()), status_code=answer.status, headers=answer.all_headers(),
                             mimetype=answer.mimetype, charset="utf-8")


@app.route(route="destinations", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def list_destinations(req: func.HttpRequest) -> func.HttpResponse:
    """Each destination's public settings, consent, disabled state and last run; invalid ones with their error."""
    return _answer(_http(req, "destinations"))


@app.route(route="destinations/{name}", methods=["DELETE"], auth_level=func.AuthLevel.FUNCTION)
@app.queue_output(arg_name="runs", queue_name="%RUNS_QUEUE%", connection="ExportsStorage")
def disable_destination(req: func.HttpRequest, runs: func.Out[str]) -> func.HttpResponse:
    """Disable a destination: no trigger runs it again. ?purge=list|contacts queues taking its contacts back out."""
    return _answer(_queued(_http(req, "destinations/{name}"), runs))


@app.route(route="destinations/{name}/enable", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def enable_destination(req: func.HttpRequest) -> func.HttpResponse:
    """Enable a destination that DELETE disabled; 409 while a purge of it is unfinished."""
    return _answer(_http(req, "destinations/{name}/enable"))


@app.route(route="erasure", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def erase_person(req: func.HttpRequest) -> func.HttpResponse:
    """Forget one person in every destination and SendGrid account; answers with a salted hash, never the address."""
    return _answer(_http(req, "erasure"))


@app.route(route="destinations/{name}/runs", methods=["GET", "POST"], auth_level=func.AuthLevel.FUNCTION)
@app.queue_output(arg_name="runs", queue_name="%RUNS_QUEUE%", connection="ExportsStorage")
def destination_runs(req: func.HttpRequest, runs: func.Out[str]) -> func.HttpResponse:
    """GET: run history, newest first. POST: queue a run (202 with its id); run_queued_export runs it."""
    return _answer(_queued(_http(req, "destinations/{name}/runs"), runs))


@app.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def get_run(req: func.HttpRequest) -> func.HttpResponse:
    """One run record (report and checkpoint)."""
    return _answer(_http(req, "runs/{run_id}"))


@app.route(route="runs/{run_id}/rejections", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_rejections(req: func.HttpRequest) -> func.HttpResponse:
    """Every rejected row of one run, as a CSV download."""
    return _answer(_http(req, "runs/{run_id}/rejections"))


@app.route(route="ui", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def history_page(req: func.HttpRequest) -> func.HttpResponse:
    """The run-history page: every destination, its schedule and its last runs (HTML, self-contained)."""
    return _answer(_http(req, "ui"))


@app.route(route="ui/runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def run_page(req: func.HttpRequest) -> func.HttpResponse:
    """One run's page: counts, SendGrid's jobs, warnings, file errors, the first rejections, a dry run's plan."""
    return _answer(_http(req, "ui/runs/{run_id}"))


@app.queue_trigger(arg_name="message", queue_name="%RUNS_QUEUE%", connection="ExportsStorage")
def run_queued_export(message: func.QueueMessage) -> None:
    """Run a run queued by POST .../runs under the id the caller was given."""
    queue_worker.work(_context(), message.get_body(), message.dequeue_count)

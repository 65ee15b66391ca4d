"""The runs queue's worker: runs what the HTTP door queued (a run under the id the caller was given, or a purge).

On-demand runs are two steps: `POST .../runs` stores a run record with status "queued" and hands this worker a queue
message naming it; the worker runs the engine under that run id. The stored record is the authority; a message is
only a pointer to it. A queued run whose message is lost is started by the timer (app.QUEUED_GRACE_SECONDS).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from . import runlog
from .context import AppContext
from .errors import ConfigError, LeaseUnavailable
from .secrets import redact
from .services import RunRequest, destination
from .state import DESTINATION_PATTERN, RUN_ID_PATTERN, now_iso

log = logging.getLogger(__name__)

QUEUED = "queued"  # the status of a run record the HTTP door stored and this worker has not started
MAX_ATTEMPTS = 5  # host.json extensions.queues.maxDequeueCount (the host's default is 5)


def parse_message(body: bytes | str) -> dict[str, Any] | None:
    """The run message, or None (logged) when it is not one of ours: it would fail the same way on every retry."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        log.error("runs queue: a message that is not JSON was dropped")
        return None
    if not isinstance(msg, dict) or not all(
            isinstance(msg.get(k), str) and p.fullmatch(msg[k])
            for k, p in (("run_id", RUN_ID_PATTERN), ("destination", DESTINATION_PATTERN))):
        log.error("runs queue: a message without a valid run_id and destination was dropped")
        return None
    return msg


def work(ctx: AppContext, body: bytes | str, dequeue_count: int | None = None) -> dict[str, Any] | None:
    """Run the queued run a message names. The stored record is the authority (source, ETag, dry run); a message
    whose run has started or finished already (a redelivery) does nothing: the timer resumes open runs."""
    msg = parse_message(body)
    if msg is None:
        return None
    run_id, name = msg["run_id"], msg["destination"]
    record = ctx.state.load_run(run_id)
    if record is None or record.get("destination") != name:
        log.error("runs queue: no run %s for destination %s; message dropped", run_id, name)
        return None
    if record.get("kind") == "purge":
        if record.get("status") not in (QUEUED, "interrupted"):
            return record
        from . import purge  # here, not at import: the HTTP door imports this module for QUEUED
        return runlog.finished(purge.remove_destination(ctx.services(ctx.config()), name, record["purge"],
                                                        confirmed=True, by="http", run_id=run_id))
    return run_queued(ctx, record, attempt=dequeue_count or 1)  # which runs it only if it is still queued


def run_queued(ctx: AppContext, record: dict[str, Any], *, attempt: int = MAX_ATTEMPTS) -> dict[str, Any]:
    """Run a queued record under its own run id. An explicit request runs even an export version that was exported
    already; a version nobody has exported is claimed first, so the timer does not export it once more.

    Busy destination: LeaseUnavailable is raised for the host to redeliver the message (after host.json's
    queues.visibilityTimeout) until the last attempt; then the run stays queued and the timer starts it."""
    from . import engine  # here, not at import: the HTTP door imports this module for QUEUED
    name, run_id = record["destination"], record["run_id"]
    stored = ctx.state.load_run(run_id)  # the caller's copy may be old: the timer lists open runs once per tick
    if stored is None or stored.get("status") != QUEUED:
        log.info("%s: run %s is %s already; nothing to do", name, run_id, stored and stored.get("status"))
        return stored or record
    record = stored
    source, etag, dry_run = record.get("source"), record.get("source_etag"), bool(record.get("dry_run"))
    try:
        config = ctx.config()
        destination(config, name)
    except ConfigError as exc:
        return _refuse(ctx, record, f"the run cannot start: {exc}")
    claim: tuple[str, str] | None = None  # the export version this run claimed: not in a dry run, nor one already had
    if isinstance(source, str) and source and isinstance(etag, str) and etag and not dry_run \
            and ctx.state.claim_export(name, source, etag, run_id) is None:
        claim = (source, etag)
    request = RunRequest(name, source, etag, trigger="http", deadline=ctx.deadline(), dry_run=dry_run, run_id=run_id,
                         full_resync=bool(record.get("full_resync")))
    try:
        report = engine.run(request, ctx.services(config))
    except LeaseUnavailable:
        if claim is not None:
            ctx.state.release_export(name, *claim, run_id=run_id)
        if attempt < MAX_ATTEMPTS:
            log.info("%s: busy with another run; run %s waits for the next delivery (attempt %d of %d)", name, run_id,
                     attempt, MAX_ATTEMPTS)
            raise
        return _leave_for_the_timer(ctx, record, attempt)
    if claim is not None and report.get("status") == "refused":
        ctx.state.release_export(name, *claim, run_id=run_id)
    log.info("%s: run %s %s", name, run_id, report.get("status"))
    return runlog.finished(report)


def _leave_for_the_timer(ctx: AppContext, record: dict[str, Any], attempt: int) -> dict[str, Any]:
    """The last delivery found the destination busy: the run stays queued, with a note, and the timer starts it."""
    name, run_id = record["destination"], record["run_id"]
    record = ctx.state.load_run(run_id) or record
    if record.get("status") != QUEUED:  # the run that held the destination was this one, from another delivery
        return record
    record["note"] = (f"destination '{name}' was busy with another run on {attempt} attempts; the timer starts "
                      "this run once it is free")
    ctx.state.save_run(record)
    log.warning("%s: run %s left queued for the timer: %s", name, run_id, record["note"])
    return record


def _refuse(ctx: AppContext, record: dict[str, Any], message: str) -> dict[str, Any]:
    """A queued run whose destination the engine cannot even look up (gone from the destinations file, invalid, or
    the file unreadable): refused, final, as the engine refuses the runs it can look up."""
    record.update(status="refused", error=redact(message), finished_at=now_iso())
    ctx.state.save_run(record)
    log.error("%s: run %s refused: %s", record["destination"], record["run_id"], record["error"])
    return runlog.finished(record)

"""The blob and timer doors. `function_app.py` only wires their triggers to `on_blob` and `on_timer`.

A new blob becomes the runs of the destinations it belongs to (`routing`) that take new exports at once
(`on_new_export`); the others only note it as their latest export. A timer tick finishes what is open (submitted
runs' jobs, interrupted runs and purges, queued runs whose message was lost, erasures), runs each such destination's
latest export not exported yet, and re-syncs the latest export of each destination whose own `schedule` is due
(`schedules`). Both hand `RunRequest`s to the engine and log each finished run (`runlog`). State lives in a Blob
container (STATE_CONTAINER) of the exports account (connection setting `ExportsStorage`); exports are read from
EXPORTS_CONTAINER by streaming; API keys come from Key Vault when KEY_VAULT_URL is set (`context` builds the
clients).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from . import queue_worker, runlog, schedules
from .config import Config
from .context import AppContext
from .errors import ConnectorError, ExportIncomplete, LeaseUnavailable, SourceError
from .secrets import install_log_redaction, redact
from .services import RunRequest, Services
from .state import parse_iso

log = logging.getLogger(__name__)
install_log_redaction()  # every log record of the Functions process is redacted when made, for every handler
# The Azure SDK logs every storage request and answer at INFO: hundreds of traces a run that would cost ingestion and
# crowd the run records (shared/runlog.py) in Application Insights. Its warnings and errors still come through.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)

QUEUED_GRACE_SECONDS = 600  # a queued on-demand run not started by then lost its message: the timer runs it


def _age_seconds(stamp: str | None) -> float:
    """Seconds since a record's time stamp; a missing or unreadable one counts as long ago."""
    since = parse_iso(stamp)
    return float("inf") if since is None else time.time() - since


def run_export(ctx: AppContext, config: Config, name: str, key: str, etag: str, trigger: str) -> dict[str, Any]:
    """Run one destination on one export version once: a repeated trigger for the same (key, ETag) is a no-op, a
    destination busy with another run defers to the timer (the export is remembered as its latest)."""
    from . import engine  # here, not at import: the HTTP door shares the process and starts without it
    claim = ctx.state.export_claim(name, key, etag)
    if claim is not None:  # a repeated event: it is not the latest export again
        log.info("%s: %s (ETag %s) was already handled by run %s; nothing to do", name, key, etag, claim.get("run_id"))
        return {"destination": name, "status": "skipped", "run_id": claim.get("run_id")}
    ctx.state.set_latest_export(name, key, etag)
    svc = ctx.services(config)
    request = RunRequest(name, key, etag, trigger=trigger, deadline=ctx.deadline(), settle=True)
    try:
        report = engine.run(request, svc, claim=True)
    except LeaseUnavailable:
        log.info("%s is busy with another run; the timer will export %s", name, key)
        return {"destination": name, "status": "deferred"}
    log.info("%s: run %s %s", name, report.get("run_id"), report.get("status"))
    return runlog.finished(report)


def on_blob(ctx: AppContext, key: str) -> list[dict[str, Any]]:
    from .routing import destinations_for_blob  # it reads exports: loaded by the doors that export only
    config = ctx.config()
    info = ctx.exports.info(key)
    if info is None:
        log.warning("blob %s vanished before it could be read; ignored", key)
        return []
    try:
        if info.size == 0:  # ADLS Gen2's CreateFile event: the content comes with FlushWithClose
            raise ExportIncomplete("is empty: the export is still being written", file=key)
        names = destinations_for_blob(ctx.exports, config, key)
    except ExportIncomplete as exc:  # never claimed: the timer looks again (and so does the blob's next event)
        ctx.state.note_pending_export(key, info.etag, redact(str(exc)))
        log.info("blob %s is not a complete export yet; the timer looks again: %s", key, exc)
        return []
    except SourceError as exc:  # a broken export fails the same way every time: report it once, do not retry
        where = ctx.state.record_blob_error(key, info.etag, redact(str(exc)))
        log.error("blob %s cannot be exported: %s (report: %s in the state container)", key, exc, where)
        return []
    ctx.state.drop_pending_export(key)
    if not names:
        log.info("blob %s is not an export any enabled destination takes; ignored", key)
    for name in names:
        if not config.destinations[name].on_new_export:  # its schedule runs it
            ctx.state.set_latest_export(name, key, info.etag)
            log.info("%s: %s is its latest export; its schedule (%s) runs it", name, key,
                     config.destinations[name].schedule or "none: run it through the HTTP API")
    return [run_export(ctx, config, name, key, info.etag, "blob") for name in names
            if config.destinations[name].on_new_export]


def _retry_pending_exports(ctx: AppContext) -> list[dict[str, Any]]:
    """Blobs that looked like exports still being written: look again; after engine.EXPORT_WAIT_HOURS the blob is
    reported as one that can never be exported (state container, blob-errors/) and an error is logged."""
    from . import engine
    done: list[dict[str, Any]] = []
    for _, note in ctx.state.pending_exports():
        source = note["source"]
        info = ctx.exports.info(source)
        if info is None:
            ctx.state.drop_pending_export(source)
            continue
        if _age_seconds(note.get("since")) >= engine.EXPORT_WAIT_HOURS * 3600:
            why = f"still incomplete after {engine.EXPORT_WAIT_HOURS} hours: {note.get('why')}"
            where = ctx.state.record_blob_error(source, info.etag, why)
            ctx.state.drop_pending_export(source)
            log.error("blob %s was never a complete export: %s (report: %s)", source, why, where)
            continue
        done.extend(on_blob(ctx, source))
    return done


def _overtaken(ctx: AppContext, name: str, record: Mapping[str, Any]) -> str | None:
    """Before the timer resumes a mirror run of an export that is no longer the latest: the newer run that has synced
    the latest export since, if any. The engine notes it on the run (`overtakes`, under the lease), so the latest is
    synced again once this run is done."""
    latest = ctx.state.latest_export(name)
    if latest is None or (latest["source"], latest["etag"]) == (record.get("source"), record.get("source_etag")):
        return None
    claim = ctx.state.export_claim(name, latest["source"], latest["etag"])
    holder = ctx.state.load_run(str(claim["run_id"])) if claim and claim.get("run_id") else None
    if (holder is not None and holder["run_id"] > record["run_id"]
            and holder.get("status") in ("submitted", "completed", "completed_with_errors")):
        return str(holder["run_id"])
    return None


def _resync_latest_if_overtaken(ctx: AppContext, name: str, resumed: Mapping[str, Any]) -> None:
    """A resumed run that overtook a newer run of the latest export (see _overtaken) has made the list the older
    export's again: once its jobs are done (a removal cannot find contacts whose upsert is still pending), give the
    latest export's claim back, so this tick's latest-export pass syncs it once more; its diff also takes out what
    the older run added."""
    overtaken = resumed.get("overtakes")  # only the timer's resumes of mirror runs carry it
    if not overtaken or resumed.get("status") not in ("completed", "completed_with_errors"):
        return
    latest = ctx.state.latest_export(name)
    if latest is None:
        return
    if any(r["destination"] == name and r["run_id"] != resumed["run_id"] and r["run_id"] < overtaken
           and r.get("kind") is None for r in ctx.state.open_runs()):
        return  # another older run is still unfinished: the last one to finish re-syncs (its removals need theirs)
    info = ctx.exports.info(latest["source"])
    if info is None or info.etag != latest["etag"]:
        log.warning("%s: run %s of an older export finished after run %s, and the latest export is gone: the list "
                    "follows the older export until the next one", name, resumed["run_id"], overtaken)
        return
    log.info("%s: run %s of an older export finished after run %s of the latest; the latest is synced again",
             name, resumed["run_id"], overtaken)
    ctx.state.release_export(name, latest["source"], latest["etag"], run_id=overtaken)


def _runnable(ctx: AppContext, config: Config, name: str) -> bool:
    """Enabled in the destinations file and not disabled by an admin: only then do triggers start or resume it."""
    return config.destinations[name].enabled and ctx.state.disabled(name) is None


def _log_destinations(ctx: AppContext, config: Config) -> None:
    """Each tick's record of which destinations should run (runlog.destinations_seen): the "no successful run"
    alert reads it. It never stops the tick."""
    try:
        runnable = {name: _runnable(ctx, config, name) for name in config.destinations}
    except Exception:
        log.exception("the destinations' state could not be read for the tick's record; the tick goes on")
        return
    runlog.destinations_seen([n for n, ok in runnable.items() if ok], [n for n, ok in runnable.items() if not ok],
                             config.errors)


def on_timer(ctx: AppContext, now: float | None = None) -> list[dict[str, Any]]:
    """A tick: finish what is open (poll jobs of submitted runs, resume interrupted or crashed runs, retry exports
    that were not complete, go on with erasures), run each enabled destination's latest export that has not been
    exported yet (when it takes new exports at once), then re-sync the latest export of each destination whose
    schedule is due at `now` (default: the clock)."""
    now = time.time() if now is None else now
    from . import purge  # here, not at import: the HTTP door shares the process and starts without it
    config = ctx.config()
    svc = ctx.services(config)
    _log_destinations(ctx, config)
    done: list[dict[str, Any]] = []
    for record in ctx.state.open_runs():
        done.extend(_go_on_with(ctx, config, svc, record))
    try:
        done.extend(purge.finish_erasures(svc, wait_seconds=min(300.0, ctx.settings.run_deadline_seconds)))
    except Exception:  # the exports below must not wait on an erasure that cannot finish
        log.exception("open erasures could not be finished; the next tick tries again")
    done.extend(_retry_pending_exports(ctx))
    synced = _run_latest_exports(ctx, config, done)
    for name, dest in config.destinations.items():
        if dest.schedule is not None and _runnable(ctx, config, name):
            try:
                done.extend(_run_scheduled(ctx, config, name, now, just_synced=name in synced))
            except Exception:  # one destination's schedule must not stop the others'
                log.exception("%s: its scheduled run failed unexpectedly; the next tick tries again", name)
    return done


def _go_on_with(ctx: AppContext, config: Config, svc: Services, record: dict[str, Any]) -> list[dict[str, Any]]:
    """One open run or purge, as its status says; one broken record never stops the rest of the tick."""
    name, run_id = record["destination"], record["run_id"]
    try:
        return _go_on(ctx, config, svc, record)
    except LeaseUnavailable:
        log.info("%s: run %s is still going elsewhere", name, run_id)
    except ConnectorError as exc:
        log.error("%s: run %s could not be finished: %s", name, run_id, exc)
    except Exception:  # every tick would meet it again: log it, go on with the others
        log.exception("%s: run %s failed unexpectedly; the next tick tries again", name, run_id)
    return []


def _go_on(ctx: AppContext, config: Config, svc: Services, record: dict[str, Any]) -> list[dict[str, Any]]:
    from . import engine, purge
    name, run_id, status = record["destination"], record["run_id"], record["status"]
    queued = status == queue_worker.QUEUED
    if name not in config.destinations and not queued:
        return []
    if record.get("kind") == "purge":
        if queued and _age_seconds(record.get("queued_at")) < QUEUED_GRACE_SECONDS:
            return []
        return [runlog.finished(purge.remove_destination(svc, name, record["purge"], confirmed=True, by="timer",
                                                         run_id=run_id))]
    if queued:  # its queue message was lost once the grace period has passed
        if _age_seconds(record.get("queued_at")) < QUEUED_GRACE_SECONDS:
            return []
        return [queue_worker.run_queued(ctx, record, attempt=queue_worker.MAX_ATTEMPTS)]
    if status == "waiting":  # for its export to be complete
        if time.time() < float((record.get("waiting") or {}).get("retry_at") or 0):
            return []
        return [runlog.finished(engine.run(RunRequest(name, resume=run_id, deadline=ctx.deadline(), settle=True),
                                           svc))]
    if status == "submitted":
        report = runlog.finished(engine.finish_submitted(record, svc, deadline=ctx.deadline()))
    elif not _runnable(ctx, config, name):
        log.info("%s: run %s stays %s while the destination is disabled", name, run_id, status)
        return []
    else:  # interrupted, or running with its lease free (its process died)
        overtakes = _overtaken(ctx, name, record) if config.destinations[name].mode == "mirror" else None
        report = runlog.finished(engine.run(RunRequest(name, resume=run_id, deadline=ctx.deadline(),
                                                       overtakes=overtakes, settle=True), svc))
    _resync_latest_if_overtaken(ctx, name, report)
    return [report]


def _run_latest_exports(ctx: AppContext, config: Config, done: list[dict[str, Any]]) -> set[str]:
    """Each destination that takes new exports at once runs its latest export when no run has claimed it yet, or
    when it was rewritten since it was noted (a version whose event never came: ADLS's FlushWithClose). Returns the
    destinations it ran."""
    synced: set[str] = set()
    for name in config.destinations:
        latest = ctx.state.latest_export(name)
        if not config.destinations[name].on_new_export or not _runnable(ctx, config, name) or not latest:
            continue
        info = ctx.exports.info(latest["source"])
        if info is None or info.size == 0:  # gone, or a model.json still being written
            continue
        if info.etag != latest["etag"] or ctx.state.export_claim(name, latest["source"], latest["etag"]) is None:
            done.append(run_export(ctx, config, name, latest["source"], info.etag, "timer"))
            synced.add(name)
    return synced


def _run_scheduled(ctx: AppContext, config: Config, name: str, now: float, *, just_synced: bool
                   ) -> list[dict[str, Any]]:
    """A destination whose schedule is due re-syncs its latest export, even a version exported before: a new run
    (not a claim, which would answer "skipped"; a version no run has claimed yet is claimed by it). The occurrence is
    taken first (schedules.Markers.advance), so two ticks never both run it; given back when the destination is busy
    with another run, so the next tick tries again."""
    from . import engine
    schedule, markers = str(config.destinations[name].schedule), schedules.Markers(ctx.state)
    marker = markers.read(name)
    decision = schedules.decide(schedule, marker, now)
    if decision is schedules.Decision.NEW:
        markers.advance(name, schedule, now, marker)
        log.info("%s: schedule %s noted; its first run is due at %s", name, schedule,
                 schedules.next_due(schedule, None, now))
        return []
    if decision is schedules.Decision.NOT_DUE or marker is None:
        return []
    latest = ctx.state.latest_export(name)
    info = ctx.exports.info(latest["source"]) if latest else None
    if latest is not None and info is not None and info.size == 0:
        return []  # a model.json being written: the next tick looks again
    taken = markers.advance(name, schedule, now, marker)
    if taken is None:
        return []  # another tick took this occurrence
    if latest is None or info is None or just_synced:
        log.info("%s: scheduled run due, but %s", name, "this tick has just synced its latest export" if just_synced
                 else "no export has arrived yet" if latest is None else f"its latest export {latest['source']} "
                 "is no longer in the exports container")
        return []
    source, etag = latest["source"], info.etag
    if info.etag != latest["etag"]:
        ctx.state.set_latest_export(name, source, etag)  # rewritten since it was noted
    unclaimed = ctx.state.export_claim(name, source, etag) is None
    request = RunRequest(name, source, etag, trigger="schedule", deadline=ctx.deadline(), settle=True)
    try:
        report = engine.run(request, ctx.services(config), claim=unclaimed)
    except LeaseUnavailable:
        markers.give_back(name, taken, marker)
        log.info("%s is busy with another run; its scheduled run waits for the next tick", name)
        return [{"destination": name, "status": "deferred"}]
    log.info("%s: scheduled run %s %s", name, report.get("run_id"), report.get("status"))
    return [runlog.finished(report)]

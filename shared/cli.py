"""The command line door: `python -m shared export|validate|smoke|sandbox|demo ...`. No business rules here."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import secrets as pysecrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import contacts, engine
from .config import load_config
from .errors import ConfigError, ConnectorError, LeaseUnavailable
from .secrets import install_log_redaction, provider_from_env
from .services import RunRequest, Services, destination
from .state import StateStore
from .storage import LocalFolderStore, ObjectStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUCCESS = ("completed", "completed_with_errors", "submitted", "dry_run")


def setup_logging(verbose: bool = False) -> None:
    install_log_redaction()  # every record, whichever handler takes it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


def source_location(path: str) -> tuple[LocalFolderStore, str]:
    """A local export path as (store, key): the store is the folder holding model.json or the plain file."""
    p = Path(path)
    if p.is_dir():
        if not (p / "model.json").is_file():
            raise ConfigError(f"{path} is a folder without model.json: name a model.json, a CSV or a JSON Lines file",
                              field="--source")
        return LocalFolderStore(p), "model.json"
    if not p.is_file():
        raise ConfigError(f"{path} does not exist", field="--source")
    return LocalFolderStore(p.parent), p.name


def _progress(info: dict[str, Any]) -> None:
    print(f"  read {info['read']:,} rows, sent {info['sent']:,} contacts, {info['rate']:,.0f} rows/s",
          file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(report: dict[str, Any]) -> str:
    c, r = report["counts"], report["requests"]
    lines = [
        f"run {report['run_id']} of '{report['destination']}': {report['status']}"
        + (f" ({report['error']})" if report.get("error") else ""),
        f"  rows read {c['read']:,}; valid distinct {c['valid']:,}; duplicates {c['duplicates']:,}; "
        f"rejected {c['rejected_total']:,} {c['rejected'] or ''}",
        f"  sent {c['sent']:,} contacts in {r['count']} request(s), {r['bytes']:,} bytes "
        f"(largest {r['max_bytes']:,} bytes / {r['max_contacts']:,} contacts); trimmed {c['trimmed'] or 0}",
    ]
    if report["jobs"]:
        states: dict[str, int] = {}
        for job in report["jobs"]:
            states[job["status"]] = states.get(job["status"], 0) + 1
        lines.append(f"  SendGrid jobs: {states}")
    if mirror := report.get("mirror"):
        if mirror.get("guard_rail") == "refused":
            lines.append(f"  mirror: removed nobody ({mirror.get('reason')})")
        elif "to_remove" in mirror:
            lines.append(f"  mirror: {mirror.get('removed', 0):,} of {mirror['to_remove']:,} leaver(s) removed from "
                         f"the list, {mirror.get('not_found', 0):,} not in SendGrid; {mirror.get('previous', 0):,} "
                         f"held before, {mirror.get('current', 0):,} now")
    for w in report.get("warnings", []) + report.get("file_errors", []):
        lines.append(f"  warning: {w}")
    for rej in report.get("rejections", [])[:5]:
        lines.append(f"  rejected: {rej['file']} line {rej['line']}: {rej['reason']}")
    if report.get("rejections_file"):
        lines.append(f"  every rejection: {report['rejections_file']} in the state folder")
    if report["timings"].get("seconds") is not None:
        lines.append(f"  {report['timings']['seconds']:.2f} s; first request after "
                     f"{report['timings'].get('first_request_s')} s; peak memory {peak_rss_mb():.0f} MB")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    store, key = source_location(args.source)
    svc = _services(args, store, progress=None if args.quiet else _progress)
    deadline = time.monotonic() + args.deadline_seconds if args.deadline_seconds else None
    info = store.info(key)  # the export's version: an unfinished run of the same version is resumed, not redone
    req = RunRequest(args.destination, key, info.etag if info else None, trigger="cli", dry_run=args.dry_run,
                     wait=args.wait, resume=args.resume, deadline=deadline)
    try:
        report = engine.run(req, svc)
    except LeaseUnavailable:
        print(f"destination '{args.destination}' is being exported by another run; try again when it ends",
              file=sys.stderr)
        return EXIT_FAILED
    if args.report:
        Path(args.report).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(summary(report))
    return EXIT_OK if report["status"] in SUCCESS else EXIT_FAILED


def _services(args: argparse.Namespace, sources: ObjectStore | None = None,
              progress: Callable[[dict[str, Any]], None] | None = None) -> Services:
    """The command line's I/O parts: the destinations file (--config), the API key from the environment or Key Vault,
    the state folder (--state-dir), and `sources`, the folder an export is read from (the state folder for the
    commands that read none)."""
    state = LocalFolderStore(args.state_dir)
    return Services(config=load_config(args.config), secrets=provider_from_env(), state=StateStore(state),
                    sources=state if sources is None else sources, environ=os.environ, progress=progress)


def cmd_remove(args: argparse.Namespace) -> int:
    from . import purge

    if args.purge == "contacts" and not args.yes and sys.stdin.isatty():
        answer = input(f"Delete every contact destination '{args.destination}' put into SendGrid from the account "
                       "entirely? Type 'delete' to confirm: ")
        args.yes = answer.strip() == "delete"
    record = purge.remove_destination(_services(args), args.destination, args.purge, confirmed=args.yes)
    print(f"destination '{args.destination}' is disabled; no trigger runs it again")
    if args.purge:
        c = record.get("counts") or {}
        print(f"purge={args.purge} run {record['run_id']}: {record['status']}"
              + (f" ({record['error']})" if record.get("error") else "")
              + f"; {c.get('removed', c.get('deleted', 0)):,} contacts taken out, {c.get('not_found', 0):,} not found")
    return EXIT_OK if record.get("status", "completed") == "completed" or not args.purge else EXIT_FAILED


def cmd_enable(args: argparse.Namespace) -> int:
    from . import purge

    svc = _services(args)
    destination(svc.config, args.destination)  # a name the destinations file does not know is a usage error
    result = purge.enable_destination(svc.state, args.destination)
    was = result["was_disabled"]
    print(f"destination '{args.destination}' is enabled"
          + (f" (it was disabled at {was.get('at')} by {was.get('by')})" if was else " (it was not disabled)"))
    return EXIT_OK


def cmd_erase(args: argparse.Namespace) -> int:
    from . import purge

    report = purge.erase(_services(args), args.email)
    print(f"erasure of person {report['person']}: {report['status']}; destinations affected: "
          f"{', '.join(report['destinations']) or 'none'}; contacts deleted: {report['accounts_deleted']}")
    for error in report["errors"]:
        print(f"  error: {error}")
    return EXIT_OK if report["status"] == "completed" else EXIT_FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for name, dest in config.destinations.items():
        notes = [] if dest.consent else ["no consent: will refuse to run"]
        if not dest.enabled:
            notes.append("disabled")
        print(f"ok   {name}: list {dest.list_id}, segments {', '.join(dest.segments)}, mode {dest.mode}"
              + (f" ({'; '.join(notes)})" if notes else ""))
    for error in config.errors.values():
        print(f"FAIL {error}")
    return EXIT_USAGE if config.errors else EXIT_OK


def cmd_smoke(args: argparse.Namespace) -> int:
    from . import smoke

    return smoke.run(args.url, args.key, timeout=args.timeout, poll=args.poll_seconds)


def cmd_ui(args: argparse.Namespace) -> int:
    """The run-history page as files: the overview at --out, each run's page in <out>-runs/ beside it (the same
    pages GET /api/ui serves), linking to the rejections CSVs in the state folder."""
    from urllib.parse import quote

    from . import history, page

    if not Path(args.state_dir).is_dir():
        raise ConfigError(f"{args.state_dir} is not a folder: name the state folder runs were written to",
                          field="--state-dir")
    state, out = StateStore(LocalFolderStore(args.state_dir)), Path(args.out).resolve()
    runs_dir = out.parent / f"{out.stem}-runs"
    now = time.time()
    views = history.destination_views(load_config(args.config) if args.config else None, state, now)

    def csv_link(destination: str, run_id: str) -> str:
        where = Path(args.state_dir).resolve() / state.rejections_key(destination, run_id)
        return "/".join(quote(part) for part in Path(os.path.relpath(where, runs_dir)).parts)

    overview_links = page.Links(home=quote(out.name), run=lambda r: f"{quote(runs_dir.name)}/{r}.html",
                                rejections=csv_link)
    run_links = page.Links(home=f"../{quote(out.name)}", run=lambda r: f"{r}.html", rejections=csv_link)
    runs_dir.mkdir(parents=True, exist_ok=True)
    records = [record for view in views for record in view.runs]
    for record in records:
        (runs_dir / f"{record['run_id']}.html").write_text(
            page.run_page(record, run_links, history.removals_preview(state, record)), encoding="utf-8")
    out.write_text(page.overview(views, now, overview_links), encoding="utf-8")
    print(f"wrote {out} ({len(views)} destination(s)) and {len(records)} run page(s) in {runs_dir}")
    return EXIT_OK


def _dev_tools() -> Any:
    """The development tools (top-level `sandbox` package): in a checkout only, never in the deployed app."""
    try:
        import sandbox.samplegen
        import sandbox.server
    except ImportError:
        raise ConfigError("the demo and the sandbox are development tools: run them from a checkout of the project "
                          "(the deployed app does not hold them)") from None
    return sandbox


def cmd_sandbox(argv: Sequence[str]) -> int:
    return int(_dev_tools().server.main(list(argv)))


def cmd_demo(args: argparse.Namespace) -> int:
    tools = _dev_tools()
    samplegen, sandbox = tools.samplegen, tools.server

    work = Path(args.dir).resolve()
    export_root = work / "export"
    print(f"demo: generating a Customer Insights export of {args.profiles:,} profiles in {export_root} ...")
    info = samplegen.write_cdm_export(export_root, args.profiles, seed=args.seed)
    key = "SG." + pysecrets.token_urlsafe(16) + "." + pysecrets.token_urlsafe(32)
    box = sandbox.Sandbox(api_keys=[key], job_delay=0.5)
    list_id = box.create_list("VIP newsletter")
    box.create_field("lifetime_value", "Number")
    box.create_field("signup_date", "Date")
    with sandbox.serve(box) as server:
        os.environ["SENDGRID_API_KEY"] = key  # this process only: the export reads it like a real deployment would
        os.environ["SENDGRID_API_URL"] = server.url
        config_path = work / "destinations.json"
        config_path.write_bytes(orjson.dumps(samplegen.demo_destinations(list_id), option=orjson.OPT_INDENT_2))
        print(f"demo: SendGrid sandbox at {server.url}; list {list_id}; config {config_path}")
        args_export = argparse.Namespace(
            config=str(config_path), destination="vip-newsletter", source=str(export_root / info.model_key),
            state_dir=str(work / "state"), report=str(work / "report.json"), dry_run=False, wait=True, resume=None,
            deadline_seconds=None, quiet=False)
        code = cmd_export(args_export)
        in_list = len(box.list_emails(list_id))
    expected = info.valid_distinct
    print(f"demo: the sandbox list now holds {in_list:,} contacts; the export had {expected:,} distinct valid "
          f"profiles ({info.bad_rows:,} bad rows, {info.duplicate_rows:,} duplicates)")
    print(f"demo: report {work / 'report.json'}")
    if in_list != expected:
        print("demo: MISMATCH between the list and the export", file=sys.stderr)
        return EXIT_FAILED
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export one destination from one source")
    p.add_argument("--config", required=True, help="destinations JSON file")
    p.add_argument("--destination", required=True)
    p.add_argument("--source", required=True, help="model.json, a folder with one, or a CSV / JSON Lines file (.gz ok)")
    p.add_argument("--state-dir", default=".state", help="where run reports and checkpoints go (default .state)")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--dry-run", action="store_true", help="read, map and validate everything; send nothing")
    p.add_argument("--wait", action="store_true", help="poll SendGrid's jobs until they finish")
    p.add_argument("--resume", metavar="RUN_ID", help="resume an interrupted run from its checkpoint")
    p.add_argument("--deadline-seconds", type=float, help="stop cleanly (resumable) after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="check a destinations file")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("remove", help="disable a destination; optionally take its contacts back out of SendGrid")
    p.add_argument("--config", required=True)
    p.add_argument("--destination", required=True)
    p.add_argument("--purge", choices=("list", "contacts"),
                   help="list: remove its contacts from its list; contacts: delete them from the account")
    p.add_argument("--yes", action="store_true", help="confirm --purge contacts without a prompt")
    p.add_argument("--state-dir", default=".state")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("enable", help="enable a destination that remove disabled")
    p.add_argument("--config", required=True)
    p.add_argument("--destination", required=True)
    p.add_argument("--state-dir", default=".state")
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("erase", help="forget one person in every destination and SendGrid account")
    p.add_argument("--config", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--state-dir", default=".state")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("smoke", help="after a deployment: dry-run every destination through the deployed HTTP API")
    p.add_argument("--url", required=True, help="the function app, e.g. https://APP.azurewebsites.net")
    p.add_argument("--key", required=True, help="the app's host key (docs/deploy.md, 'The function key')")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the dry runs (default 600)")
    p.add_argument("--poll-seconds", type=float, default=5.0, help="seconds between looks at a run (default 5)")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("ui", help="write the run-history page (what GET /api/ui shows) as HTML files")
    p.add_argument("--state-dir", default=".state", help="the state folder runs were written to (default .state)")
    p.add_argument("--out", default="history.html", help="the page to write; run pages go to <name>-runs/ beside it")
    p.add_argument("--config", help="destinations file: adds each destination's settings and schedule")
    p.set_defaults(func=cmd_ui)

    sub.add_parser("sandbox", help="run the local SendGrid sandbox (see its --help)", add_help=False)

    p = sub.add_parser("demo", help="generate a sample export, start the sandbox, export it, print the summary")
    p.add_argument("--dir", default=".demo", help="working folder (default .demo)")
    p.add_argument("--profiles", type=int, default=25_000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = contacts.email_validator_problem()  # before anything is read or sent: see contacts.EMAIL_KNOWN_ANSWERS
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if argv[:1] == ["sandbox"]:
        setup_logging()
        return cmd_sandbox(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

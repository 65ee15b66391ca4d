"""The command line door: arguments to a request or a read, an answer to text (shared.console) and an exit code.
No business rules here; HELP is what `python -m shared --help` shows."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import secrets as pysecrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import console, contacts, engine
from .config import REGIONS, Destination, load_config
from .errors import ConfigError, ConnectorError, LeaseUnavailable
from .secrets import install_log_redaction, provider_from_env
from .sendgrid import SendGridClient, base_url_for
from .services import RunRequest, Services, destination
from .state import InvalidIdentifier, StateStore
from .storage import LocalFolderStore, ObjectStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUCCESS = ("completed", "completed_with_errors", "submitted", "dry_run")
DEMO_CHANGED = 25  # profiles the demo changes before its second run

HELP = """Stream customer-segment exports (Dynamics 365 Customer Insights CDM folders, CSV or JSON Lines files) into
SendGrid Marketing contact lists, and look at what each run did. The destinations file (--config) says which
segments go to which list, with which mapping; the API key comes from the environment variable named after the
destination's api_key_secret (SENDGRID_API_KEY for "sendgrid-api-key") or from Key Vault when KEY_VAULT_URL is set."""

EPILOG = """exit codes:
  0  success: a run completed (with or without rejected rows), was submitted or was a dry run; a command did what
     it says
  1  a run failed, was refused or interrupted; SendGrid or storage failed; a confirmation was declined (cancelled)
  2  usage or configuration error; a Python whose email check gives wrong answers

examples:
  python -m shared export --config destinations.json --destination vip-newsletter --source export/model.json --wait
  python -m shared runs --config destinations.json --destination vip-newsletter --limit 10

Progress goes to stderr (a redrawn line on a terminal, a line every 10 s otherwise); `COMMAND --help` tells more."""


class UsageError(Exception):
    """Arguments that do not go together, or name nothing (exit 2)."""


def setup_logging(verbose: bool = False) -> None:
    install_log_redaction()  # every record, whichever handler takes it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


def source_location(path: str) -> tuple[LocalFolderStore, str]:
    """A local export path as (store, key). The key names the export folder too ('BlobExport/model.json': what a
    run's report says it read); the store is the folder above it, or the one holding a plain file."""
    p = Path(path).resolve()
    if p.is_dir():
        if not (p / "model.json").is_file():
            raise ConfigError(f"{path} is a folder without model.json: name a model.json, a CSV or a JSON Lines file",
                              field="--source")
        p = p / "model.json"
    if not p.is_file():
        raise ConfigError(f"{path} does not exist", field="--source")
    if p.name == "model.json" and p.parent != p.parent.parent:
        return LocalFolderStore(p.parent.parent), f"{p.parent.name}/model.json"
    return LocalFolderStore(p.parent), p.name


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[console.Progress | None]:
    """The progress renderer on stderr (none with --quiet). Its redrawn line is cleared before a log record is
    written and at the end, so a log line or the summary starts at the left margin."""
    if getattr(args, "quiet", False):
        yield None
        return
    with console.Progress(sys.stderr) as progress:
        def clear(record: logging.LogRecord) -> bool:
            progress.close()
            return True

        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(clear)
        try:
            yield progress
        finally:
            for handler in handlers:
                handler.removeFilter(clear)


def cmd_export(args: argparse.Namespace) -> int:
    store, key = source_location(args.source)
    deadline = time.monotonic() + args.deadline_seconds if args.deadline_seconds else None
    info = store.info(key)  # the export's version: an unfinished run of the same version is resumed, not redone
    req = RunRequest(args.destination, key, info.etag if info else None, trigger="cli", dry_run=args.dry_run,
                     full_resync=args.full_resync,
                     wait=args.wait, resume=args.resume, deadline=deadline)
    with _progress(args) as progress:
        svc = _services(args, store, progress=progress)
        try:
            report = engine.run(req, svc)
        except LeaseUnavailable:
            report = None
    if report is None:
        print(f"destination '{args.destination}' is being exported by another run; try again when it ends",
              file=sys.stderr)
        return EXIT_FAILED
    if args.report:
        Path(args.report).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(console.summary(report, peak_mb=peak_rss_mb(), state_dir=args.state_dir))
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

    with _progress(args) as progress:
        svc = _services(args, progress=progress)
        destination(svc.config, args.destination)  # an unknown name is a usage error before anyone is asked
        if args.purge == "contacts" and not args.yes and sys.stdin.isatty():
            answer = input(f"Delete every contact destination '{args.destination}' put into SendGrid from the "
                           "account entirely? Type 'delete' to confirm: ")
            if answer.strip() != "delete":
                print("cancelled: nothing was changed", file=sys.stderr)
                return EXIT_FAILED
            args.yes = True
        record = purge.remove_destination(svc, args.destination, args.purge, confirmed=args.yes)
    print(f"destination '{args.destination}' is disabled; no trigger runs it again")
    if args.purge:
        print(console.purge_line(record))
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

    with _progress(args) as progress:
        report = purge.erase(_services(args, progress=progress), args.email)
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


def cmd_runs(args: argparse.Namespace) -> int:
    state = StateStore(LocalFolderStore(args.state_dir))
    runs = state.list_runs(args.destination, limit=args.limit)
    if not runs:
        destination(load_config(args.config), args.destination)  # an unknown name says which names there are
        print(f"no runs of '{args.destination}' in {Path(args.state_dir).resolve()} yet")
        return EXIT_OK
    print(console.runs_table(runs))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    state = StateStore(LocalFolderStore(args.state_dir))
    record = state.load_run(args.run_id)
    if record is None:
        raise UsageError(f"no run {args.run_id} in {Path(args.state_dir).resolve()} (is --state-dir right?)")
    note = None
    if record.get("status") == "submitted":
        record, note = _finish_submitted(args, record)
    if args.json:
        print(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
    else:
        print(console.summary(record, state_dir=args.state_dir))
    if note:
        print(note, file=sys.stderr)
    return EXIT_OK


def _finish_submitted(args: argparse.Namespace, record: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A run left `submitted`: its SendGrid jobs polled to their end (engine.finish_submitted) when --config says
    where its key is; else the record as stored and a note saying they were not polled."""
    if not args.config:
        return record, ("its SendGrid jobs were not polled: give --config FILE (with the API key in the environment "
                        "or Key Vault) to bring the run to its final status")
    with _progress(args) as progress:
        try:
            return engine.finish_submitted(record, _services(args, progress=progress)), None
        except LeaseUnavailable:
            return record, (f"its SendGrid jobs were not polled: another run holds destination "
                            f"'{record.get('destination')}'; try again when it ends")


def _account(args: argparse.Namespace) -> SendGridClient:
    """The SendGrid account `lists` and `fields` read: a destination's (--config, --destination) or a key's by its
    secret name (--api-key-secret, --region)."""
    if bool(args.api_key_secret) == bool(args.config or args.destination):
        raise UsageError("name the account either with --config FILE --destination NAME, or with --api-key-secret NAME")
    if args.api_key_secret:
        secret, region = args.api_key_secret, args.region
    else:
        if not (args.config and args.destination):
            raise UsageError("--config and --destination go together")
        dest = _destination_for_account(args.config, args.destination)
        secret, region = dest.api_key_secret, dest.region
    return SendGridClient(base_url_for(region, os.environ), provider_from_env(), secret)


def _destination_for_account(config: str, name: str) -> Destination:
    try:
        return destination(load_config(config), name)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (to read the account before the destination is complete, use --api-key-secret "
                          "NAME instead)") from None


def cmd_account(args: argparse.Namespace) -> int:
    """`lists` and `fields`: one read of the SendGrid account (args.read), printed as a table."""
    client = _account(args)
    try:
        print(args.read(client))
    finally:
        client.close()
    return EXIT_OK


ACCOUNT_READS: dict[str, tuple[str, Callable[[SendGridClient], str]]] = {
    "lists": ("the SendGrid account's lists: list_id, name, contact count",
              lambda client: console.lists_table(client.lists())),
    "fields": ("the SendGrid account's custom fields: name, type, id",
               lambda client: console.fields_table(client.field_definitions())),
}


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
            state_dir=str(work / "state"), report=str(work / "report.json"), dry_run=False, full_resync=False,
            wait=True, resume=None, deadline_seconds=None, quiet=False)
        code = cmd_export(args_export)
        in_list = len(box.list_emails(list_id))
        if code == EXIT_OK:  # a day later: a few profiles changed; the refresh sends only those
            changed = samplegen.change_profiles(export_root, info, DEMO_CHANGED)
            print(f"\ndemo: {changed} profiles changed in the export; running it again (only they are sent) ...")
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


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


CONFIG_HELP = "the destinations JSON file (README: 'Configuration: the destinations file')"
STATE_HELP = "the state folder: run records, checkpoints, snapshots (default .state)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared", description=HELP, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    _run_commands(sub)
    _admin_commands(sub)
    _tool_commands(sub)
    return parser


Subparsers = Any  # argparse's _SubParsersAction, which it does not export


def _run_commands(sub: Subparsers) -> None:
    """Runs and what they did: export, validate, runs, show, and the account's lists and fields."""
    p = sub.add_parser("export", help="export one destination from one source")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--destination", required=True, help="the destination's name in the destinations file")
    p.add_argument("--source", required=True, help="model.json, a folder with one, or a CSV / JSON Lines file (.gz ok)")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--dry-run", action="store_true", help="read, map and validate everything; send nothing")
    p.add_argument("--full-resync", action="store_true",
                   help="send every contact, not only those new or changed since the last run")
    p.add_argument("--wait", action="store_true", help="poll SendGrid's jobs until they finish")
    p.add_argument("--resume", metavar="RUN_ID", help="resume an interrupted run from its checkpoint")
    p.add_argument("--deadline-seconds", type=float, help="stop cleanly (resumable) after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="check a destinations file")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("runs", help="a table of a destination's past runs, newest first")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--destination", required=True, help="the destination's name in the destinations file")
    p.add_argument("--limit", type=_positive, default=20, help="show at most this many runs (default 20)")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("show", help="one run's summary (--json: its record); polls a submitted run")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id, as `runs` and the end of a run print it")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.add_argument("--config", help=CONFIG_HELP + "; with it, a run left submitted has its SendGrid jobs polled "
                                                  "to their end (the API key must be available)")
    p.add_argument("--json", action="store_true", help="print the run's whole record as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_show)

    for name, (what, read) in ACCOUNT_READS.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", help=CONFIG_HELP + " (with --destination: that destination's account)")
        p.add_argument("--destination", help="the destination whose API key and region are used")
        p.add_argument("--api-key-secret", metavar="NAME",
                       help="instead of --config/--destination: the secret holding the key (as api_key_secret)")
        p.add_argument("--region", choices=REGIONS, default="global",
                       help="with --api-key-secret: the account's region (default global)")
        p.set_defaults(func=cmd_account, read=read)


def _admin_commands(sub: Subparsers) -> None:
    """Taking data back out: remove (and purge), enable, erase."""
    p = sub.add_parser("remove", help="disable a destination; --purge takes its contacts out too")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--destination", required=True, help="the destination's name in the destinations file")
    p.add_argument("--purge", choices=("list", "contacts"),
                   help="list: remove its contacts from its list; contacts: delete them from the account")
    p.add_argument("--yes", action="store_true", help="confirm --purge contacts without a prompt")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("enable", help="enable a destination that remove disabled")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--destination", required=True, help="the destination's name in the destinations file")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("erase", help="forget one person in every destination and SendGrid account")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--email", required=True, help="the person's email address (exactly one valid address)")
    p.add_argument("--state-dir", default=".state", help=STATE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_erase)


def _tool_commands(sub: Subparsers) -> None:
    """After deploying and around the product: smoke, ui, sandbox, demo."""
    p = sub.add_parser("smoke", help="after deploying: dry-run every destination through the app")
    p.add_argument("--url", required=True, help="the function app, e.g. https://APP.azurewebsites.net")
    p.add_argument("--key", required=True, help="the app's host key (docs/deploy.md, 'The function key')")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the dry runs (default 600)")
    p.add_argument("--poll-seconds", type=float, default=5.0, help="seconds between looks at a run (default 5)")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("ui", help="write the run-history page (as GET /api/ui) to HTML files")
    p.add_argument("--state-dir", default=".state", help="the state folder runs were written to (default .state)")
    p.add_argument("--out", default="history.html", help="the page to write; run pages go to <name>-runs/ beside it")
    p.add_argument("--config", help="destinations file: adds each destination's settings and schedule")
    p.set_defaults(func=cmd_ui)

    sub.add_parser("sandbox", help="run the local SendGrid sandbox (see its --help)", add_help=False)

    p = sub.add_parser("demo", help="generate an export, start the sandbox, export it")
    p.add_argument("--dir", default=".demo", help="working folder (default .demo)")
    p.add_argument("--profiles", type=int, default=25_000, help="profiles in the generated export (default 25,000)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated export (default 7)")
    p.set_defaults(func=cmd_demo)


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
        return int(args.func(args))
    except BrokenPipeError:  # `runs ... | head`: the reader went away; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (UsageError, InvalidIdentifier) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

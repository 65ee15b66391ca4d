"""The command line's looking commands (`runs`, `show`, `lists`, `fields`), its help, its prompts and the README's
examples, through the real `python -m shared` against the sandbox over HTTP on loopback."""

from __future__ import annotations

import argparse
import io
import logging
import os
import pty
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sandbox import server as sandbox_server
from sandbox.server import Sandbox, serve
from shared import cli as cli_module
from tests.conftest import RunningSandbox
from tests.test_e2e_cli import cli, write_config, write_export

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
DEST = "vip-newsletter"


@pytest.fixture
def env(sandbox: RunningSandbox) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    e.update(SENDGRID_API_KEY=sandbox.key, SENDGRID_API_URL=sandbox.url)
    return e


def lines_of(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def assert_clean(text: str) -> None:
    assert all(line == line.rstrip() for line in text.splitlines()), text
    assert "None" not in text, text


# ------------------------------------------------------------------------------------------------- lists, fields


def test_lists_and_fields_show_the_account_by_destination_or_by_secret_name(sandbox: RunningSandbox,
                                                                           env: dict[str, str], tmp_path: Path) -> None:
    vip = sandbox.box.create_list("VIP newsletter")
    other = sandbox.box.create_list("Another list")
    ltv = sandbox.box.create_field("lifetime_value", "Number")
    signup = sandbox.box.create_field("signup_date", "Date")
    config = write_config(tmp_path / "d.json", vip)
    res = cli(env, "export", "--config", str(config), "--destination", DEST, "--source",
              str(write_export(tmp_path / "export")), "--state-dir", str(tmp_path / "state"), "--wait", "--quiet")
    assert res.returncode == 0, res.stderr

    by_dest = cli(env, "lists", "--config", str(config), "--destination", DEST)
    assert by_dest.returncode == 0, by_dest.stderr
    assert lines_of(by_dest.stdout) == [["list_id", "name", "contacts"], [other, "Another", "list", "0"],
                                        [vip, "VIP", "newsletter", "3"]]
    by_secret = cli(env, "lists", "--api-key-secret", "sendgrid-api-key")
    assert by_secret.stdout == by_dest.stdout

    fields = cli(env, "fields", "--api-key-secret", "sendgrid-api-key")
    assert fields.returncode == 0, fields.stderr
    assert lines_of(fields.stdout) == [["name", "type", "id"], ["lifetime_value", "Number", ltv],
                                       ["signup_date", "Date", signup]]
    assert cli(env, "fields", "--config", str(config), "--destination", DEST).stdout == fields.stdout
    for res in (by_dest, by_secret, fields):
        assert_clean(res.stdout)
        assert sandbox.key not in res.stdout + res.stderr


def test_lists_needs_one_way_to_name_the_account_and_says_so(sandbox: RunningSandbox, env: dict[str, str],
                                                             tmp_path: Path) -> None:
    config = write_config(tmp_path / "d.json", "not-a-uuid")  # a destination not complete yet
    for args in ([], ["--config", str(config), "--destination", DEST, "--api-key-secret", "sendgrid-api-key"],
                 ["--config", str(config)]):
        res = cli(env, "lists", *args)
        assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
    res = cli(env, "lists", "--config", str(config), "--destination", DEST)
    assert res.returncode == 2 and "list_id" in res.stderr and "--api-key-secret NAME" in res.stderr
    wrong_key = cli(env | {"SENDGRID_API_KEY": "SG.wrong.key"}, "fields", "--api-key-secret", "sendgrid-api-key")
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr and "Traceback" not in wrong_key.stderr


# ---------------------------------------------------------------------------------------------------- runs, show


def test_runs_lists_past_runs_newest_first_and_show_prints_the_summary_of_the_run(
        sandbox: RunningSandbox, env: dict[str, str], tmp_path: Path) -> None:
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    config, state = write_config(tmp_path / "d.json", list_id), str(tmp_path / "state")
    model = str(write_export(tmp_path / "export"))
    dry = cli(env, "export", "--config", str(config), "--destination", DEST, "--source", model, "--state-dir", state,
              "--dry-run", "--quiet")
    real = cli(env, "export", "--config", str(config), "--destination", DEST, "--source", model, "--state-dir", state,
               "--wait", "--quiet")
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    assert_clean(dry.stdout)
    assert_clean(real.stdout)
    dry_id, real_id = (re.match(r"run (\S+) of", r.stdout).group(1) for r in (dry, real))  # type: ignore[union-attr]

    runs = cli(env, "runs", "--config", str(config), "--destination", DEST, "--state-dir", state)
    assert runs.returncode == 0, runs.stderr
    rows = lines_of(runs.stdout)
    assert rows[0] == ["started", "(UTC)", "trigger", "status", "new", "changed", "unchanged", "removed", "rejected",
                       "duration", "run", "id"]
    assert [(r[-1], r[3], r[2]) for r in rows[1:]] == [(real_id, "completed", "cli"), (dry_id, "dry_run", "cli")]
    one = cli(env, "runs", "--config", str(config), "--destination", DEST, "--state-dir", state, "--limit", "1")
    assert [r[-1] for r in lines_of(one.stdout)[1:]] == [real_id]
    assert_clean(runs.stdout)

    shown = cli(env, "show", real_id, "--state-dir", state)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == re.sub(r"; peak memory \d+ MB", "", real.stdout)  # the summary the run ended with
    as_json = cli(env, "show", real_id, "--state-dir", state, "--json")
    stored = orjson.loads((tmp_path / "state" / "runs" / DEST / f"{real_id}.json").read_bytes())
    assert orjson.loads(as_json.stdout) == stored

    unknown = cli(env, "show", "20200101T000000Z-00000000", "--state-dir", state)
    assert unknown.returncode == 2 and "no run 20200101T000000Z-00000000" in unknown.stderr
    malformed = cli(env, "show", "../../etc/passwd", "--state-dir", state)
    assert malformed.returncode == 2 and "invalid run id" in malformed.stderr
    for limit in ("0", "-1", "x"):
        bad = cli(env, "runs", "--config", str(config), "--destination", DEST, "--state-dir", state, "--limit", limit)
        assert bad.returncode == 2 and "expected a whole number of at least 1" in bad.stderr
    nobody = cli(env, "runs", "--config", str(config), "--destination", "no-such", "--state-dir", state)
    assert nobody.returncode == 2 and "destinations are: vip-newsletter" in nobody.stderr


def test_show_polls_a_submitted_run_to_its_final_status(tmp_path: Path) -> None:
    key = "SG.e2e-show." + secrets.token_urlsafe(32)
    box = Sandbox(api_keys=[key], job_delay=3600)  # jobs stay pending until the test completes them
    list_id = box.create_list("VIP")
    config, state = write_config(tmp_path / "d.json", list_id, custom_fields={}), str(tmp_path / "state")
    with serve(box) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
        env.update(SENDGRID_API_KEY=key, SENDGRID_API_URL=server.url)
        run = cli(env, "export", "--config", str(config), "--destination", DEST, "--source",
                  str(write_export(tmp_path / "export")), "--state-dir", state, "--quiet")
        assert run.returncode == 0, run.stderr
        run_id = re.match(r"run (\S+) of '[^']+': submitted", run.stdout).group(1)  # type: ignore[union-attr]
        assert f"`python -m shared show {run_id} --config FILE` polls them" in run.stdout

        unpolled = cli(env, "show", run_id, "--state-dir", state)
        assert unpolled.returncode == 0 and ": submitted" in unpolled.stdout.splitlines()[0]
        assert "its SendGrid jobs were not polled: give --config FILE" in unpolled.stderr
        still = cli(env, "show", run_id, "--state-dir", state, "--config", str(config), "--quiet")
        assert ": submitted" in still.stdout.splitlines()[0] and "SendGrid jobs: 1 pending" in still.stdout

        box.complete_jobs()
        polled = cli(env, "show", run_id, "--state-dir", state, "--config", str(config), "--quiet")
    assert polled.returncode == 0, polled.stderr
    assert polled.stdout.splitlines()[0] == f"run {run_id} of '{DEST}': completed"
    assert "SendGrid jobs: 1 completed" in polled.stdout
    stored = orjson.loads((tmp_path / "state" / "runs" / DEST / f"{run_id}.json").read_bytes())
    assert stored["status"] == "completed" and stored["jobs"][0]["status"] == "completed"


# ----------------------------------------------------------------------------------------- prompts and logging


def test_a_declined_confirmation_is_cancelled_not_a_configuration_error(sandbox: RunningSandbox,
                                                                        env: dict[str, str], tmp_path: Path) -> None:
    config, state = write_config(tmp_path / "d.json", sandbox.box.create_list("VIP")), tmp_path / "state"
    master, slave = pty.openpty()  # a person at a terminal: the prompt is asked
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shared", "remove", "--config", str(config), "--destination",
                                 DEST, "--purge", "contacts", "--state-dir", str(state)], cwd=REPO, env=env,
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(master, b"no\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 1, err
    assert "Type 'delete' to confirm" in out and err == "cancelled: nothing was changed\n"
    assert not (state / "disabled" / f"{DEST}.json").exists()  # still enabled: nothing happened


def test_successful_commands_log_no_warning(sandbox: RunningSandbox, env: dict[str, str], tmp_path: Path) -> None:
    config, state = write_config(tmp_path / "d.json", sandbox.box.create_list("VIP")), str(tmp_path / "state")
    for command in ("remove", "enable"):
        res = cli(env, command, "--config", str(config), "--destination", DEST, "--state-dir", state)
        assert res.returncode == 0 and res.stderr == "", (command, res.stderr)
    assert "is enabled (it was disabled at" in res.stdout


def test_a_log_line_during_progress_starts_on_a_clean_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()  # as the CLI leaves it (setup_logging): this handler alone, warnings and up
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.WARNING)
    try:
        with cli_module._progress(argparse.Namespace(quiet=False)) as progress:
            assert progress is not None
            progress({"phase": "jobs", "pending": 1, "completed": 0})
            logging.getLogger("shared.sendgrid").warning("GET /x: 503 (attempt 1), retrying")
            progress({"phase": "jobs", "pending": 0, "completed": 1})
        logging.getLogger("shared.sendgrid").warning("after the progress")
    finally:
        root.removeHandler(handler)
    assert term.getvalue() == (
        "\rwaiting for SendGrid's jobs: 1 pending, 0 completed\x1b[K\r\x1b[K"
        "WARNING shared.sendgrid: GET /x: 503 (attempt 1), retrying\n"
        "\rwaiting for SendGrid's jobs: 0 pending, 1 completed\x1b[K\r\x1b[K"
        "WARNING shared.sendgrid: after the progress\n")


# ------------------------------------------------------------------------------------------------------- help


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_help_text() -> None:
    parsers = _commands(cli_module.build_parser()) | {"sandbox": sandbox_server._parser()}
    parsers["(top level)"] = cli_module.build_parser()
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in parsers.items() for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == []


def test_the_top_level_help_lists_every_command_on_a_line_the_exit_codes_and_two_examples() -> None:
    res = subprocess.run([sys.executable, "-m", "shared", "--help"], cwd=REPO, capture_output=True, text=True,
                         env=os.environ | {"COLUMNS": "80"}, timeout=60)
    assert res.returncode == 0
    text = res.stdout
    sub = next(a for a in cli_module.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: str(a.help) for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, what in helps.items():
        assert re.search(rf"^    {name} +{re.escape(what)}$", text, re.MULTILINE), name  # on one whole line
    codes = text.split("exit codes:")[1].split("examples:")[0]
    assert [c for c in ("0", "1", "2") if re.search(rf"^  {c}  ", codes, re.MULTILINE)] == ["0", "1", "2"]
    examples = text.split("examples:")[1].strip().split("\n\n")[0].splitlines()
    assert len(examples) == 2 and all(e.strip().startswith("python -m shared ") for e in examples)
    assert cli_module.__doc__ and cli_module.__doc__.strip().splitlines()[0] not in text  # not the docstring


# ----------------------------------------------------------------------------------------------------- README


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_command_line_section_lists_every_command() -> None:
    section = _section("Command line")
    listed = set(re.findall(r"^python -m shared ([a-z]+)", section, re.MULTILINE))
    assert listed == set(_commands(cli_module.build_parser()))


def test_the_sample_config_is_the_readmes_destinations_file() -> None:
    shown = _section("Configuration: the destinations file").split("```json\n", 1)[1].split("```", 1)[0]
    assert orjson.loads(shown) == orjson.loads((REPO / "samples" / "destinations.json").read_bytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_readmes_sandbox_example_works_as_written(tmp_path: Path) -> None:
    """The bash block of 'Local SendGrid sandbox', run as written: its first command serves the sandbox (in a terminal
    of its own), the rest run in a second shell. Only the port (a free one) and the interpreter (this one) change, and
    it runs in a scratch folder linked to the checkout so its `.state` stays out of the repository."""
    block = _section("Local SendGrid sandbox").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    port = str(_free_port())
    commands = [c.replace("3030", port).replace(".venv/bin/python", shlex.quote(sys.executable)) for c in commands]
    for name in ("shared", "sandbox", "samples"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    box = subprocess.Popen(["bash", "-c", commands[0]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert box.stdout is not None
        first = box.stdout.readline().strip()
        assert first == f"http://127.0.0.1:{port}", first
        res = subprocess.run(["bash", "-ec", "\n".join(commands[1:])], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        os.killpg(box.pid, signal.SIGTERM)  # its own session: the shell and the sandbox it started
        box.communicate(timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "of 'vip-newsletter': completed" in res.stdout and "custom field" not in res.stderr
    assert re.search(r"^0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10 +VIP newsletter +7$", res.stdout, re.MULTILINE)
    assert re.search(r"^lifetime_value +Number +\S+$", res.stdout, re.MULTILINE)
    assert "WARNING" not in res.stderr and "error" not in res.stderr.lower()

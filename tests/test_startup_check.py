"""Every door refuses to work when this interpreter's email check disagrees with its known answers
(contacts.EMAIL_KNOWN_ANSWERS): the CLI, `python -m shared` and the Functions app. The checks run in child processes
with the check broken on purpose, as a regex engine of a wrong patch level would break it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
BREAK = "import re; from shared import contacts; contacts.EMAIL_RE = re.compile('(?!)'); "  # rejects every address
WRONGLY = "checks email addresses wrongly: 'a@example.com' should be valid"


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    from sandbox import samplegen

    path = tmp_path / "destinations.json"
    path.write_bytes(orjson.dumps(samplegen.demo_destinations("0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10")))
    return path


def test_the_cli_starts_when_the_check_agrees(config: Path, tmp_path: Path) -> None:
    res = python(f"import sys; from shared import cli; sys.exit(cli.main(['validate', '--config', {str(config)!r}]))",
                 tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("ok "), res.stderr


@pytest.mark.parametrize("door", [
    "from shared import cli; sys.exit(cli.main(['validate', '--config', CONFIG]))",
    "import runpy; sys.argv = ['shared', 'validate', '--config', CONFIG]; "
    "runpy.run_module('shared', run_name='__main__')",
], ids=["cli.main", "python -m shared"])
def test_the_cli_refuses_to_start_when_the_check_disagrees(config: Path, tmp_path: Path, door: str) -> None:
    res = python(f"import sys; {BREAK}CONFIG = {str(config)!r}; {door}", tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error: this Python (") and WRONGLY in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""  # validate never ran


def test_the_functions_app_notes_the_refusal_at_import(tmp_path: Path) -> None:
    res = python(f"{BREAK}import function_app; print(function_app.REFUSAL)", tmp_path)
    assert res.returncode == 0, res.stderr  # the host still indexes the functions: each invocation says why
    assert WRONGLY in res.stdout and WRONGLY in res.stderr  # printed, and logged (critical) at import
    res = python("import function_app; print(function_app.REFUSAL)", tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch):
    import function_app

    monkeypatch.setattr(function_app, "REFUSAL", "this Python checks email addresses wrongly (test)")
    return function_app


def test_a_refusing_app_answers_503_with_the_reason(refusing) -> None:
    for name, route_params, body in (("list_destinations", {}, b""), ("erase_person", {}, b'{"email": "a@b.co"}'),
                                     ("get_run", {"run_id": "20250101T120000Z-0a1b2c3d"}, b"")):
        req = func.HttpRequest("POST" if body else "GET", "http://localhost/api/x", body=body,
                               route_params=route_params)
        resp = getattr(refusing, name)(req)
        assert resp.status_code == 503, name
        assert orjson.loads(resp.get_body()) == {"error": "this Python checks email addresses wrongly (test)"}


def test_a_refusing_app_fails_every_trigger_with_the_reason(refusing) -> None:
    import azure.functions.timer as timer

    from shared.errors import UnsupportedInterpreter

    with pytest.raises(UnsupportedInterpreter, match="wrongly"):
        refusing.scheduled_refresh(timer.TimerRequest(past_due=False))
    with pytest.raises(UnsupportedInterpreter, match="wrongly"):
        refusing.run_queued_export(func.QueueMessage(body=b'{"run_id": "x", "destination": "y"}'))

    class Client:
        blob_name = "exports/model.json"

    with pytest.raises(UnsupportedInterpreter, match="wrongly"):
        refusing.on_export(Client())

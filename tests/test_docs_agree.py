"""The deployment docs agree with each other and with infra/: one queue and container naming, one Event Grid subject
filter, one way to get and pass the function key, and docs/deploy.md ending with the smoke test."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.test_infra import bicep_param, bicep_string

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = [REPO / "infra" / "hooks" / "postdeploy.sh", REPO / "infra" / "hooks" / "postdeploy.ps1"]
LOCAL = json.loads((REPO / "local.settings.sample.json").read_text(encoding="utf-8"))["Values"]


def _texts(paths: list[Path]) -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in paths}


def test_queue_and_container_names_are_the_templates_everywhere() -> None:
    names = {setting: bicep_string(bicep_param(param)[0]) for setting, param in (
        ("RUNS_QUEUE", "runsQueueName"), ("EXPORTS_CONTAINER", "exportsContainerName"),
        ("STATE_CONTAINER", "stateContainerName"))}
    assert {k: LOCAL[k] for k in names} == names  # local runs use the names Azure gets
    runs = names["RUNS_QUEUE"]
    for where, text in _texts(DOCS).items():
        for found in re.findall(r"\bsendgrid-[a-z-]*runs[a-z-]*\b", text):
            assert found in (runs, f"{runs}-poison"), f"{where} names the runs queue {found!r}"
        for found in re.findall(r"\bsendgrid-[a-z-]*state\b", text):
            assert found == names["STATE_CONTAINER"], f"{where} names the state container {found!r}"


def test_one_event_grid_subject_filter() -> None:
    for where, text in _texts(DOCS + SCRIPTS).items():
        subjects = re.findall(r"(?<![\w}])/blobServices/default/containers/[^\s`'\"]*", text)  # not a resource id
        for prefix in subjects:
            assert re.fullmatch(r"/blobServices/default/containers/[^/]+/blobs/.*", prefix), f"{where}: {prefix}"
        assert "--included-event-types" not in text and "advanced-filter" not in text.lower(), where


def test_one_way_to_get_and_pass_the_function_key() -> None:
    for where, text in _texts(DOCS).items():
        for url in re.findall(r"\S*[?&]code=\S*", text):  # a key in a URL: only Event Grid's webhook has one
            assert "runtime/webhooks/blobs" in url or url.strip("`,.():") in ("?code=",), f"{where}: {url}"
        assert "function keys list" not in text, f"{where}: per-function keys as the way to get one"
        for query in re.findall(r"az functionapp keys list[^\n]*--query (\S+)", text):
            assert query in ("functionKeys.default", "systemKeys.blobs_extension"), f"{where}: {query}"
        for curl in re.findall(r"curl [^\n]*\$API[^\n]*", text):
            assert 'x-functions-key' in curl or '-H "$H"' in curl, f"{where}: {curl}"


def test_deploy_doc_ends_with_the_smoke_test_and_names_the_lists_and_fields_commands() -> None:
    deploy = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    last = deploy.split("\n## ")[-1]
    assert last.startswith("After deploying: the smoke test")
    assert ('python -m shared smoke --url "https://$(azd env get-value AZURE_FUNCTION_APP_HOSTNAME)" --key "$KEY"'
            in last)
    assert "`python -m shared lists`" in deploy and "`python -m shared fields`" in deploy
    for heading in ("## SendGrid IP Access Management", "## Upgrade and rollback", "## The function key"):
        assert heading in deploy

"""The bulk CSV import path against the sandbox: same list content as the JSON path, and complete at 300,000 rows."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from shared import engine, samplegen
from shared.config import parse_config
from shared.secrets import EnvSecrets
from shared.state import StateStore
from shared.storage import LocalFolderStore


def _run(sandbox, export_root: Path, info: samplegen.ExportInfo, tmp: Path, *, bulk_threshold: int | None,
         list_name: str) -> tuple[dict, str]:
    list_id = sandbox.box.create_list(list_name)
    config = samplegen.demo_destinations(list_id, max_profiles=None)
    config["destinations"][0]["bulk_threshold"] = bulk_threshold
    svc = engine.Services(
        config=parse_config(orjson.dumps(config), "destinations.json"),
        secrets=EnvSecrets({"SENDGRID_API_KEY": sandbox.key}),
        state=StateStore(LocalFolderStore(tmp / f"state-{list_name}")),
        sources=LocalFolderStore(export_root),
        environ={"SENDGRID_API_URL": sandbox.url},
        poll_interval=0.1,
    )
    report = engine.run(engine.RunRequest("vip-newsletter", info.model_key, wait=True), svc)
    return report, list_id


@pytest.fixture
def fields(sandbox) -> None:
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")


def test_bulk_and_json_paths_give_the_same_list_content(sandbox, fields, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 12_000, partitions=2, seed=11)
    json_report, json_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=None, list_name="json")
    bulk_report, bulk_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=5_000, list_name="bulk")
    assert json_report["status"] == bulk_report["status"] == "completed", (json_report["error"], bulk_report["error"])
    assert json_report["requests"]["imports"] == 0
    assert bulk_report["requests"]["imports"] == 1  # the first 5,000 as JSON requests, the rest in one import file
    assert {j.get("kind") for j in bulk_report["jobs"]} == {None, "import"}
    emails = sandbox.box.list_emails(json_list)
    assert emails == sandbox.box.list_emails(bulk_list) and len(emails) == info.valid_distinct
    assert json_report["counts"]["sent"] == bulk_report["counts"]["sent"] == info.valid_distinct


def _list_contents(sandbox, list_id: str) -> dict[str, tuple]:
    keys = ("first_name", "last_name", "city", "country", "postal_code", "state_province_region")
    out = {}
    for email in sandbox.box.list_emails(list_id):
        c = sandbox.box.contact(email)
        out[email] = (*tuple(c.get(k) for k in keys), tuple(sorted((c.get("custom_fields") or {}).items())))
    return out


def test_fields_are_identical_between_paths(sandbox, fields, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 3_000, partitions=1, seed=5)
    # the sandbox's contact store is shared by its lists: reset it between the paths so the second writes every field
    _, json_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=None, list_name="a")
    before = _list_contents(sandbox, json_list)
    sandbox.box.reset()
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    bulk_report, bulk_list = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=1, list_name="b")
    assert bulk_report["requests"]["imports"] == 1 and bulk_report["status"] == "completed"
    assert _list_contents(sandbox, bulk_list) == before


@pytest.mark.slow
def test_300k_rows_through_the_bulk_path_complete_and_correct(sandbox, fields, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "x", 300_000, partitions=6, seed=3)
    report, list_id = _run(sandbox, tmp_path / "x", info, tmp_path, bulk_threshold=200_000, list_name="big")
    assert report["status"] == "completed", report["error"]
    assert report["requests"]["imports"] == 1
    assert len(sandbox.box.list_emails(list_id)) == info.valid_distinct
    assert report["counts"]["sent"] == info.valid_distinct
    assert report["counts"]["rejected_total"] == info.bad_rows

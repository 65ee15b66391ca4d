"""End to end through the command line door against the sandbox over real HTTP on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox import samplegen
from sandbox.server import Sandbox, serve

REPO = Path(__file__).resolve().parent.parent

HEADERLESS = [
    # CustomerId, EmailAddress, FirstName, LastName, Country, State, City, PostalCode, LifetimeValue, SignupDate,
    # Notes
    '"C1","Ada@Example.com","Ada","Lovelace","GB","England","London","EC1A 1BB","1200.50","2024-02-01",'
    '"line one\nline two"',
    '"C2","  bob@example.org ","Bob","Builder","US","WA","Seattle","98101","x","2024-13-45",""',
    '"C3","not-an-email","Eve","X","US","WA","Seattle","98101","5","",""',
    '"C4","ADA@example.com","Ada","Again","GB","","","","","",""',
    '"C5","","No","Email","US","","","","","",""',
    '"C6","carol@example.net","' + "C" * 80 + '","Smith, Jr.","FR","IDF","Paris","75001","42","01/31/2025","a, b"',
]


def write_export(root: Path, *, header: bool = False) -> Path:
    """A two-partition CDM export: headerless (or headed) partitions, multi-line fields, duplicates, bad emails."""
    folder = root / "CustomerInsights_x" / "BlobExport"
    part_dir = folder / "HighValueSegment" / "2026" / "11" / "28" / "0130"
    part_dir.mkdir(parents=True)
    head = ",".join(f'"{c}"' for c in samplegen.COLUMNS) + "\r\n" if header else ""
    (part_dir / "HighValueSegment_1.csv").write_text(head + "\r\n".join(HEADERLESS[:3]) + "\r\n", encoding="utf-8")
    (part_dir / "HighValueSegment_2.csv").write_text(head + "\r\n".join(HEADERLESS[3:]) + "\r\n", encoding="utf-8")
    base = "https://acct.blob.core.windows.net/exports/CustomerInsights_x/BlobExport/HighValueSegment/2026/11/28/0130"
    model = {
        "name": "BlobExport",
        "version": "1.0",
        "entities": [{
            "$type": "LocalEntity",
            "name": "HighValueSegment",
            "attributes": [{"name": n, "dataType": t} for n, t in samplegen.ATTRIBUTES],
            "partitions": [
                {"name": f"HighValueSegment_{i}", "location": f"{base}/HighValueSegment_{i}.csv",
                 "fileFormatSettings": {"$type": "CsvFormatSettings", "columnHeaders": header}}
                for i in (1, 2)
            ],
        }],
    }
    (folder / "model.json").write_bytes(orjson.dumps(model))
    return folder / "model.json"


def write_config(path: Path, list_id: str, **overrides: object) -> Path:
    config = samplegen.demo_destinations(list_id)
    config["destinations"][0].update(overrides)
    path.write_bytes(orjson.dumps(config))
    return path


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def env(sandbox) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    e.update(SENDGRID_API_KEY=sandbox.key, SENDGRID_API_URL=sandbox.url)
    return e


def test_cdm_export_reaches_the_list_mapped_with_rejections_reported(sandbox, env, tmp_path: Path) -> None:
    model = write_export(tmp_path / "export")
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    config = write_config(tmp_path / "destinations.json", list_id)
    report_path = tmp_path / "report.json"
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(model),
              "--state-dir", str(tmp_path / "state"), "--report", str(report_path), "--wait", "--quiet")
    assert res.returncode == 0, res.stderr + res.stdout
    assert sandbox.box.list_emails(list_id) == ["ada@example.com", "bob@example.org", "carol@example.net"]
    ada = sandbox.box.contact("ada@example.com")
    assert ada["first_name"] == "Ada" and ada["last_name"] == "Lovelace"  # the first occurrence wins
    assert 1200.5 in ada["custom_fields"].values()  # keyed by the field's id; a Number goes as a JSON number
    carol = sandbox.box.contact("carol@example.net")
    assert len(carol["first_name"]) == 50 and carol["last_name"] == "Smith, Jr."
    assert "01/31/2025" in carol["custom_fields"].values()
    bob = sandbox.box.contact("bob@example.org")
    assert not bob.get("custom_fields")  # 'x' is not a number, 2024-13-45 not a date: left out, noted

    report = orjson.loads(report_path.read_bytes())
    assert report["status"] == "completed"
    counts = report["counts"]
    assert counts["read"] == 6 and counts["valid"] == 3 and counts["duplicates"] == 1 and counts["sent"] == 3
    assert counts["rejected"] == {"invalid_email": 1, "missing_email": 1}
    assert counts["trimmed"] == {"first_name": 1}
    assert {r["line"] for r in report["rejections"]} == {4, 2}  # C3: line 4 (after a 2-line row); C5: part 2 line 2
    assert all(r["file"].endswith(".csv") for r in report["rejections"])
    assert report["jobs"][0]["status"] == "completed" and report["requests"]["count"] == 1
    assert counts["field_notes"] == {"LifetimeValue": 1, "SignupDate": 1}
    assert "LifetimeValue" in report["field_notes"][0]["note"] and "SignupDate" in report["field_notes"][0]["note"]
    rejections_csv = (tmp_path / "state" / report["rejections_file"]).read_text()
    assert "missing email" in rejections_csv and "invalid email" in rejections_csv


def test_headed_partitions_and_dry_run_send_nothing(sandbox, env, tmp_path: Path) -> None:
    model = write_export(tmp_path / "export", header=True)
    list_id = sandbox.box.create_list("VIP")
    config = write_config(tmp_path / "d.json", list_id, custom_fields={})
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(model),
              "--state-dir", str(tmp_path / "state"), "--dry-run", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "dry_run" in res.stdout and "valid distinct 3" in res.stdout
    assert sandbox.box.list_emails(list_id) == []
    assert sandbox.box.stats["requests"].get("PUT /v3/marketing/contacts", 0) == 0


def test_unknown_custom_field_fails_before_sending_and_lists_the_account_fields(sandbox, env, tmp_path: Path) -> None:
    model = write_export(tmp_path / "export")
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    config = write_config(tmp_path / "d.json", list_id)  # signup_date does not exist in the account
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(model),
              "--state-dir", str(tmp_path / "state"), "--quiet")
    assert res.returncode == 1
    assert "signup_date" in res.stdout and "lifetime_value (Number)" in res.stdout
    assert sandbox.box.list_emails(list_id) == []


def test_no_consent_and_over_max_profiles_refuse_without_sending(sandbox, env, tmp_path: Path) -> None:
    model = write_export(tmp_path / "export")
    list_id = sandbox.box.create_list("VIP")
    base = ["--destination", "vip-newsletter", "--source", str(model), "--state-dir", str(tmp_path / "s"), "--quiet"]
    no_consent = write_config(tmp_path / "a.json", list_id, consent=False, custom_fields={})
    res = cli(env, "export", "--config", str(no_consent), *base)
    assert res.returncode == 1 and "consent" in res.stdout
    too_many = write_config(tmp_path / "b.json", list_id, max_profiles=2, custom_fields={})
    res = cli(env, "export", "--config", str(too_many), *base)
    assert res.returncode == 1 and "3 distinct valid profiles" in res.stdout and "max_profiles" in res.stdout
    assert sandbox.box.list_emails(list_id) == []


def test_configuration_errors_exit_2_and_name_file_destination_field(env, tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_bytes(orjson.dumps({"destinations": [{"name": "x1", "mode": "sync"}]}))
    res = cli(env, "validate", "--config", str(config))
    assert res.returncode == 2
    assert "bad.json" in res.stdout and "x1" in res.stdout and "mode" in res.stdout
    res = cli(env, "export", "--config", str(config), "--destination", "x1", "--source", str(config))
    assert res.returncode == 2 and "configuration error" in res.stderr


def test_missing_api_key_is_a_clear_error(sandbox, env, tmp_path: Path) -> None:
    model = write_export(tmp_path / "export")
    list_id = sandbox.box.create_list("VIP")
    config = write_config(tmp_path / "d.json", list_id, custom_fields={})
    env.pop("SENDGRID_API_KEY")
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(model),
              "--state-dir", str(tmp_path / "s"), "--quiet")
    assert res.returncode == 1 and "SENDGRID_API_KEY" in res.stdout


def test_invalid_addresses_refused_by_sendgrid_are_dropped_and_the_rest_sent(sandbox, env, tmp_path: Path) -> None:
    src = tmp_path / "people.csv"
    src.write_text("email,first\nok1@example.com,A\nbad@host.invalid,B\nok2@example.com,C\n", encoding="utf-8")
    list_id = sandbox.box.create_list("VIP")
    config = write_config(tmp_path / "d.json", list_id, custom_fields={}, segments=["people"],
                          mapping={"email": "email", "first_name": "first"})
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(src),
              "--state-dir", str(tmp_path / "s"), "--wait", "--report", str(tmp_path / "r.json"), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sandbox.box.list_emails(list_id) == ["ok1@example.com", "ok2@example.com"]
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    assert report["counts"]["rejected"] == {"refused_by_sendgrid": 1} and report["counts"]["sent"] == 2


class MisindexingSandbox(Sandbox):
    """Names each address it refuses at the index of the contact before it, as SendGrid was seen to do."""

    def op_upsert(self, req: Any) -> Any:
        status, body = super().op_upsert(req)
        if status == 400:
            for err in body["errors"]:
                i = int(err["field"].split("[")[1].split("]")[0])
                err["field"] = f"contacts[{max(i - 1, 0)}].email"
        return status, body


def test_a_refusal_at_another_contacts_index_drops_only_the_address_it_names(tmp_path: Path) -> None:
    key = "SG.e2e-misindex." + "k" * 43
    box = MisindexingSandbox(api_keys=[key], job_delay=0.05)
    list_id = box.create_list("VIP")
    src = tmp_path / "people.csv"
    src.write_text("email,first\nok1@example.com,A\nbad@host.invalid,B\nok2@example.com,C\n", encoding="utf-8")
    config = write_config(tmp_path / "d.json", list_id, custom_fields={}, segments=["people"],
                          mapping={"email": "email", "first_name": "first"})
    with serve(box) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
        env.update(SENDGRID_API_KEY=key, SENDGRID_API_URL=server.url)
        res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(src),
                  "--state-dir", str(tmp_path / "s"), "--wait", "--report", str(tmp_path / "r.json"), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert box.list_emails(list_id) == ["ok1@example.com", "ok2@example.com"]  # ok1, at the index named, stays
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    assert report["counts"]["rejected"] == {"refused_by_sendgrid": 1} and report["counts"]["sent"] == 2
    assert [r["reason"] for r in report["rejections"]] == ["refused by SendGrid: email 'bad@host.invalid' is not valid"]


def test_deadline_interrupts_and_resume_completes_the_list(sandbox, env, tmp_path: Path) -> None:
    info = samplegen.write_cdm_export(tmp_path / "export", 70_000, partitions=3)
    list_id = sandbox.box.create_list("VIP")
    sandbox.box.create_field("lifetime_value", "Number")
    sandbox.box.create_field("signup_date", "Date")
    config = write_config(tmp_path / "d.json", list_id, max_profiles=None, max_in_flight=1)
    base = ["--config", str(config), "--destination", "vip-newsletter", "--state-dir", str(tmp_path / "s"), "--quiet"]
    source = str(tmp_path / "export" / info.model_key)
    # one request at a time; the first is answered slowly; the deadline passes while it is in flight, so the run
    # stops after it
    sandbox.box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "slow", "delay": 7.0, "times": 1})
    res = cli(env, "export", *base, "--source", source, "--deadline-seconds", "5",
              "--report", str(tmp_path / "r.json"))
    assert res.returncode == 1 and "interrupted" in res.stdout
    first = orjson.loads((tmp_path / "r.json").read_bytes())
    assert 0 < first["checkpoint"]["contacts_done"] < info.valid_distinct
    assert first["requests"]["count"] == 1
    # the same export again, without --resume: the unfinished run of that version goes on from its checkpoint
    res = cli(env, "export", *base, "--source", source, "--wait", "--report", str(tmp_path / "r2.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    second = orjson.loads((tmp_path / "r2.json").read_bytes())
    assert second["run_id"] == first["run_id"] and second["status"] == "completed"
    assert len(sandbox.box.list_emails(list_id)) == info.valid_distinct
    assert second["counts"]["sent"] == info.valid_distinct


def test_rejection_file_neutralises_spreadsheet_formulas(sandbox, env, tmp_path: Path) -> None:
    src = tmp_path / "=HYPERLINK(1).csv"
    src.write_text("email\n=1+2\nok@example.com\n", encoding="utf-8")
    list_id = sandbox.box.create_list("VIP")
    config = write_config(tmp_path / "d.json", list_id, custom_fields={}, segments=["x"], mapping={"email": "email"})
    res = cli(env, "export", "--config", str(config), "--destination", "vip-newsletter", "--source", str(src),
              "--state-dir", str(tmp_path / "s"), "--report", str(tmp_path / "r.json"), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    rows = (tmp_path / "s" / report["rejections_file"]).read_text().splitlines()
    assert rows[0] == "file,line,reason" and len(rows) == 2
    assert rows[1].startswith("'=HYPERLINK(1).csv,2,")  # a spreadsheet shows the text, it does not run it


@pytest.mark.parametrize("email", ["@@@", "*@*", "a@example.com,b@example.com", "a@example.com\r\nb@example.com",
                                   "a@example.com\x01"])
def test_erase_refuses_anything_but_one_valid_address(env, tmp_path: Path, email: str) -> None:
    config = write_config(tmp_path / "d.json", "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10")
    res = cli(env, "erase", "--config", str(config), "--email", email, "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 2 and res.stdout == ""
    assert "field 'email': an erasure needs exactly one valid email address" in res.stderr
    assert not (tmp_path / "s" / "erasures").exists()  # nothing recorded, nothing looked up

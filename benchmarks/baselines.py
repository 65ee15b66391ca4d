"""The two baselines the engine is measured against, each run in its own child process (clean peak RSS):

- floor: the least any exporter must do: read the CSV partitions with the csv module and encode every row as a JSON
  object with orjson. No mapping, no validation, no network.
- naive: the straightforward script: each partition loaded whole (read() + csv.DictReader over the string into a list
  of dicts), mapped and checked with plain Python, encoded with the standard json module and sent one
  PUT /v3/marketing/contacts per 1,000 contacts, sequentially, to the same sandbox (into a list of its own). It ends
  when the job of its last request is final (jobs finish in order), which is kinder to it than polling every job.

`python -m benchmarks.baselines floor|naive MODEL_JSON` prints one JSON object: the result and the process's peak RSS.
naive reads SENDGRID_API_URL and SENDGRID_API_KEY from the environment.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

NAIVE_BATCH = 1_000
# The same mapping the engine's benchmark destination uses (sandbox.samplegen.demo_destinations).
NAIVE_MAPPING = {"email": "EmailAddress", "first_name": "FirstName", "last_name": "LastName", "country": "Country",
                 "state_province_region": "State", "city": "City", "postal_code": "PostalCode"}
NAIVE_NUMBER_FIELDS = {"lifetime_value": "LifetimeValue"}
NAIVE_DATE_FIELDS = {"signup_date": "SignupDate"}
_SIMPLE_EMAIL = re.compile(r"[^@\s\"(),:;<>\[\]\\]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}")


def export_layout(model_json: Path) -> tuple[list[str], list[Path]]:
    """(columns, partition files) of the single entity of a generated CDM export. Partition URLs are
    <account>/<container>/<path>; the folder holding the instance folder plays the container."""
    model = json.loads(model_json.read_text(encoding="utf-8"))
    entity = model["entities"][0]
    columns = [a["name"] for a in entity["attributes"]]
    root = model_json.parents[2]  # <root>/<instance>/<export folder>/model.json
    files = []
    for part in entity["partitions"]:
        path = unquote(urlsplit(part["location"]).path).lstrip("/").split("/", 1)[1]  # drop the container
        files.append(root / path)
    return columns, files


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def floor(model_json: Path) -> dict[str, Any]:
    """Read every partition with csv.reader and encode each row as a JSON object with orjson; nothing else."""
    import orjson

    start = time.perf_counter()
    columns, files = export_layout(model_json)
    rows = encoded = 0
    dumps = orjson.dumps
    for path in files:
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                encoded += len(dumps(dict(zip(columns, row, strict=False))))
                rows += 1
    return {"rows": rows, "encoded_bytes": encoded, "seconds": time.perf_counter() - start}


def naive_contact(row: dict[str, str], field_ids: dict[str, str]) -> dict[str, Any] | None:
    """A row as a SendGrid contact, or None when its email is missing or malformed."""
    email = (row.get(NAIVE_MAPPING["email"]) or "").strip().lower()
    if not email or not email.isascii() or not _SIMPLE_EMAIL.fullmatch(email):
        return None
    contact: dict[str, Any] = {"email": email}
    for field, column in NAIVE_MAPPING.items():
        value = (row.get(column) or "").strip()
        if field != "email" and value:
            contact[field] = value
    custom: dict[str, Any] = {}
    for field, column in NAIVE_NUMBER_FIELDS.items():
        with contextlib.suppress(KeyError, ValueError):
            custom[field_ids[field]] = float(row[column])
    for field, column in NAIVE_DATE_FIELDS.items():
        with contextlib.suppress(KeyError, ValueError):
            custom[field_ids[field]] = datetime.fromisoformat(row[column]).strftime("%m/%d/%Y")
    if custom:
        contact["custom_fields"] = custom
    return contact


def naive(model_json: Path, base_url: str, api_key: str, poll_timeout: float = 300.0) -> dict[str, Any]:
    """The straightforward exporter (see the module docstring). Raises on any HTTP error: it has no retry logic."""
    import requests

    start = time.perf_counter()
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    answer = session.post(f"{base_url}/v3/marketing/lists", data=json.dumps({"name": f"naive-{os.getpid()}"}))
    answer.raise_for_status()
    list_id = answer.json()["id"]
    answer = session.get(f"{base_url}/v3/marketing/field_definitions")
    answer.raise_for_status()
    field_ids = {f["name"]: f["id"] for f in answer.json()["custom_fields"]}
    columns, files = export_layout(model_json)
    seen: set[str] = set()
    batch: list[dict[str, Any]] = []
    rows = skipped = duplicates = sent = requests_made = body_bytes = 0
    last_job = None

    def put(contacts: list[dict[str, Any]]) -> str:
        body = json.dumps({"list_ids": [list_id], "contacts": contacts})
        resp = session.put(f"{base_url}/v3/marketing/contacts", data=body.encode("utf-8"))
        resp.raise_for_status()
        nonlocal requests_made, body_bytes
        requests_made += 1
        body_bytes += len(body.encode("utf-8"))
        return resp.json()["job_id"]

    for path in files:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
        records = list(csv.DictReader(io.StringIO(text), fieldnames=columns))
        del text
        for row in records:
            rows += 1
            contact = naive_contact(row, field_ids)
            if contact is None:
                skipped += 1
            elif contact["email"] in seen:
                duplicates += 1
            else:
                seen.add(contact["email"])
                batch.append(contact)
                if len(batch) == NAIVE_BATCH:
                    last_job = put(batch)
                    sent += len(batch)
                    batch = []
        del records
    if batch:
        last_job = put(batch)
        sent += len(batch)
    sent_s = time.perf_counter() - start
    status = None
    end = time.monotonic() + poll_timeout
    while last_job and time.monotonic() < end:
        status = session.get(f"{base_url}/v3/marketing/contacts/imports/{last_job}").json()["status"]
        if status in ("completed", "errored", "failed"):
            break
        time.sleep(0.1)
    return {"rows": rows, "sent": sent, "skipped": skipped, "duplicates": duplicates, "requests": requests_made,
            "bytes": body_bytes, "list_id": list_id, "last_job_status": status, "sent_s": sent_s,
            "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("floor", "naive"):
        print("usage: python -m benchmarks.baselines floor|naive MODEL_JSON", file=sys.stderr)
        return 2
    model_json = Path(args[1])
    if args[0] == "floor":
        result = floor(model_json)
    else:
        result = naive(model_json, os.environ["SENDGRID_API_URL"], os.environ["SENDGRID_API_KEY"])
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reproducible Customer Insights exports of any size, for the demo, the tests and the benchmarks.

Writes a CDM folder as Customer Insights does (model.json with attributes and absolute partition URLs, headerless
QuoteAlways CSV partitions under <Segment>/<yyyy>/<MM>/<dd>/<HHmm>/), with realistic field widths, a few percent of
bad rows (missing or malformed emails), case-variant duplicates and the odd quoted multi-line field.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ATTRIBUTES = (
    ("CustomerId", "string"),
    ("EmailAddress", "string"),
    ("FirstName", "string"),
    ("LastName", "string"),
    ("Country", "string"),
    ("State", "string"),
    ("City", "string"),
    ("PostalCode", "string"),
    ("LifetimeValue", "decimal"),
    ("SignupDate", "dateTime"),
    ("Notes", "string"),
)
COLUMNS = tuple(name for name, _ in ATTRIBUTES)

_FIRST = ("Anna", "Ben", "Chloé", "David", "Elif", "Farah", "Günter", "Hana", "Ivan", "José", "Kenji", "Lena", "Mateo",
          "Nora", "Olu", "Priya", "Quentin", "Rosa", "Sven", "Tomás", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoë",
          "Maximilian-Alexander", "Anne-Sophie")
_LAST = ("Andersson", "Bianchi", "Chen", "Dubois", "Eriksen", "Fernández", "García", "Hoffmann", "Ivanova", "Jensen",
         "Kowalski", "López", "Müller", "Nakamura", "O'Brien", "Petrov", "Quispe", "Rossi", "Schmidt", "Tanaka",
         "Van der Berg-Oosterhuis", "Wójcik", "Yilmaz", "Zhang")
_PLACES = (("US", "Washington", "Seattle", "98101"), ("US", "New York", "New York", "10001"),
           ("DE", "Bayern", "München", "80331"), ("FR", "Île-de-France", "Paris", "75001"),
           ("GB", "England", "London", "EC1A 1BB"), ("NL", "Noord-Holland", "Amsterdam", "1012 AB"),
           ("JP", "Tokyo", "Shibuya", "150-0002"), ("BR", "São Paulo", "São Paulo", "01000-000"),
           ("IN", "Karnataka", "Bengaluru", "560001"), ("ES", "Cataluña", "Barcelona", "08001"))
_DOMAINS = ("example.com", "mail.example.org", "contoso.com", "fabrikam.net", "example.co.uk")
_BAD_EMAILS = ("", "not-an-email", "jane.doe@", "@example.com", "john doe@example.com", "x@y")


@dataclass(frozen=True)
class ExportInfo:
    model_key: str  # model.json's key relative to the container root
    segment: str
    rows: int  # data rows written (bad and duplicate rows included)
    valid_distinct: int  # distinct valid emails: what should reach the list
    bad_rows: int
    duplicate_rows: int
    partitions: int


def _q(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def write_cdm_export(
    root: str | Path,
    profiles: int,
    *,
    seed: int = 7,
    segment: str = "HighValueSegment",
    partitions: int = 4,
    bad_fraction: float = 0.02,
    dup_fraction: float = 0.01,
    account_url: str = "https://contosoexports.blob.core.windows.net",
    container: str = "customer-insights",
    instance: str = "CustomerInsights_abcd1234-4312-11f4-93dc-24f72f43e7d5",
    export_folder: str = "BlobExport",
    when: datetime | None = None,
    column_headers: bool = False,
) -> ExportInfo:
    """Write an export of `profiles` rows below root/<instance>/<export_folder>/ (root plays the container).

    Of the rows, about bad_fraction have a missing or invalid email and dup_fraction repeat an earlier email in
    another case; the rest are distinct valid profiles. The same arguments always give the same bytes."""
    rng = random.Random(seed)
    when = when or datetime(2026, 11, 28, 1, 30, tzinfo=UTC)
    base = Path(root) / instance / export_folder
    rel_dir = f"{segment}/{when:%Y/%m/%d/%H%M}"
    (base / rel_dir).mkdir(parents=True, exist_ok=True)
    per_part = -(-profiles // partitions) if profiles else 0
    parts_meta = []
    valid = bad = dups = written = 0
    recent: list[str] = []
    row_no = 0
    for p in range(1, partitions + 1):
        name = f"{segment}_{p}"
        path = base / rel_dir / f"{name}.csv"
        lines: list[str] = []
        with open(path, "w", encoding="utf-8", newline="") as fh:
            if column_headers:
                fh.write(",".join(_q(c) for c in COLUMNS) + "\r\n")
            for _ in range(min(per_part, profiles - written)):
                row_no += 1
                written += 1
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                country, state, city, postal = rng.choice(_PLACES)
                roll = rng.random()
                if roll < bad_fraction:
                    email = rng.choice(_BAD_EMAILS)
                    bad += 1
                elif roll < bad_fraction + dup_fraction and recent:
                    email = rng.choice(recent).upper()
                    dups += 1
                else:
                    email = f"{first.lower()[:3]}.{last.lower()[:4]}.{row_no}@{rng.choice(_DOMAINS)}"
                    email = email.encode("ascii", "ignore").decode().replace("'", "").replace(" ", "")
                    valid += 1
                    if len(recent) < 1000:
                        recent.append(email)
                    elif rng.random() < 0.01:
                        recent[rng.randrange(1000)] = email
                value = f"{rng.uniform(10, 25000):.2f}"
                signup = f"20{rng.randint(10, 26):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T08:15:00Z"
                notes = "" if rng.random() < 0.98 else 'Prefers "weekly" digest,\nno SMS'
                fields = (f"C{row_no:09d}", f"  {email} " if row_no % 50 == 0 else email, first, last, country, state,
                          city, postal, value, signup, notes)
                lines.append(",".join(_q(f) for f in fields))
                if len(lines) >= 5000:
                    fh.write("\r\n".join(lines) + "\r\n")
                    lines.clear()
            if lines:
                fh.write("\r\n".join(lines) + "\r\n")
        parts_meta.append({
            "name": name,
            "location": f"{account_url}/{container}/{instance}/{export_folder}/{rel_dir}/{name}.csv",
            "refreshTime": when.isoformat().replace("+00:00", "Z"),
            "fileFormatSettings": {"$type": "CsvFormatSettings", "columnHeaders": column_headers, "delimiter": ",",
                                   "quoteStyle": "QuoteStyle.Csv", "csvStyle": "CsvStyle.QuoteAlways",
                                   "encoding": "UTF-8"},
        })
    model = {
        "name": export_folder,
        "description": "Segment export (generated sample)",
        "version": "1.0",
        "modifiedTime": when.isoformat().replace("+00:00", "Z"),
        "entities": [{
            "$type": "LocalEntity",
            "name": segment,
            "description": f"Segment {segment}",
            "attributes": [{"name": n, "dataType": t} for n, t in ATTRIBUTES],
            "partitions": parts_meta,
        }],
    }
    (base / "model.json").write_bytes(orjson.dumps(model, option=orjson.OPT_INDENT_2))
    return ExportInfo(f"{instance}/{export_folder}/model.json", segment, written, valid, bad, dups, partitions)


def change_profiles(root: str | Path, info: ExportInfo, count: int) -> int:
    """Change the lifetime value of the first `count` distinct valid profiles of the export's first partition, in
    place (model.json unchanged): what a day's refresh of a segment looks like. Returns how many changed."""
    model = orjson.loads((Path(root) / info.model_key).read_bytes())
    location = model["entities"][0]["partitions"][0]["location"]
    path = Path(root) / info.model_key.rsplit("/", 1)[0] / location.split(info.model_key.rsplit("/", 1)[0] + "/", 1)[1]
    email_at, value_at = COLUMNS.index("EmailAddress"), COLUMNS.index("LifetimeValue")
    seen: set[str] = set()  # emails before the last change: a changed profile is its email's first row
    changed = 0
    temporary = path.with_name(path.name + ".changing")
    with open(path, encoding="utf-8", newline="") as src, open(temporary, "w", encoding="utf-8", newline="") as out:
        for row in csv.reader(src):  # row by row: a 1M-profile export is changed in a few MB
            if changed < count:
                email = row[email_at].strip()
                if email == email.lower() and "@" in email and email not in seen and "." in email:
                    row[value_at] = f"{float(row[value_at]) + 1:.2f}"
                    changed += 1
                seen.add(email.lower())
            out.write(",".join(_q(f) for f in row) + "\r\n")
    os.replace(temporary, path)
    return changed


def demo_destinations(list_id: str, *, max_profiles: int | None = 100_000, mode: str = "upsert",
                      name: str = "vip-newsletter", segment: str = "HighValueSegment") -> dict[str, Any]:
    """A destinations file for a generated export."""
    return {
        "destinations": [{
            "name": name,
            "display_name": "VIP newsletter",
            "enabled": True,
            "consent": True,
            "api_key_secret": "sendgrid-api-key",
            "list_id": list_id,
            "segments": [segment],
            "mapping": {"email": "EmailAddress", "first_name": "FirstName", "last_name": "LastName",
                        "country": "Country", "state_province_region": "State", "city": "City",
                        "postal_code": "PostalCode"},
            "custom_fields": {"lifetime_value": "LifetimeValue", "signup_date": "SignupDate"},
            "mode": mode,
            "max_profiles": max_profiles,
            "region": "global",
        }]
    }

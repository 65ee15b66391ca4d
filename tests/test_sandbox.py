"""The local SendGrid sandbox over real HTTP on loopback: every endpoint's happy path and limits, faults, bulk import,
control API, CLI; plus contract checks of every request body sent and every response received against the official
OpenAPI files in tests/contracts/."""

from __future__ import annotations

import ast
import copy
import csv
import functools
import gzip
import http.client
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sandbox import server as sandbox_module
from sandbox.server import Profile, Sandbox, SandboxServer, main, serve
from shared import limits

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = Path(__file__).resolve().parent / "contracts"
KEY = "SG.sandbox-test-key-0123456789"
OTHER_KEY = "SG.sandbox-other-key-9876543210"
SPEC_FILES = {"contacts": "tsg_mc_contacts_v3.json", "lists": "tsg_mc_lists_v3.json",
              "fields": "tsg_mc_custom_fields_v3.json"}
JOB_WAIT_S = 15.0  # an upper bound for polling, not an assertion

# ------------------------------------------------------------------------------------------------ contract checks

# Where the official files contradict themselves or the live API, the sandbox follows the live API. Each override
# replaces one response schema, with the reason.
ERRORS_OBJECT = {"type": "object", "required": ["errors"],
                 "properties": {"errors": {"type": "array", "minItems": 1,
                                           "items": {"type": "object", "required": ["message"]}}}}
KNOWN_DEVIATIONS: dict[tuple[str, str, str], dict[str, Any]] = {
    # The spec types job_id as an object, yet imports/{id} takes "the job_id from Delete Contacts" as a path id.
    ("delete", "/v3/marketing/contacts", "202"): {
        "type": "object", "required": ["job_id"], "properties": {"job_id": {"type": "string"}}},
    # These two document a bare array / bare error object; every other error in all three files (and the error
    # docs) is {"errors": [...]}, which clients parse. The sandbox answers that shape everywhere.
    ("get", "/v3/marketing/lists/{id}", "404"): ERRORS_OBJECT,
    ("delete", "/v3/marketing/lists/{id}/contacts", "400"): ERRORS_OBJECT,
}
# The shape the sandbox gives statuses a spec does not document (401 on lists, 406, 413, 414, 429, 5xx faults).
SANDBOX_ERROR = {
    "type": "object", "required": ["errors"], "additionalProperties": False,
    "properties": {"errors": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["field", "message"], "additionalProperties": False,
        "properties": {"field": {"type": ["string", "null"]}, "message": {"type": "string", "minLength": 1}}}}},
}

# Every 400 the sandbox sends, whatever its endpoint's documented schema lets through (most are loose: no required
# "errors", any items), has the shape of SendGrid's errors page and of the contracts' ContactsError / Error items:
# {"errors": [{"field": "...", "message": "..."}]}, error_id and parameter optional, nothing else.
SENDGRID_400 = {
    "type": "object", "required": ["errors"], "additionalProperties": False,
    "properties": {"errors": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["field", "message"], "additionalProperties": False,
        "properties": {"field": {"type": "string", "minLength": 1}, "message": {"type": "string", "minLength": 1},
                       "error_id": {"type": "string"}, "parameter": {"type": "string"}}}}},
}


def _openapi_nullable(node: Any) -> Any:
    """These 3.1 files still use 3.0's `nullable: true`, which JSON Schema ignores: honour it as intended."""
    if isinstance(node, dict):
        out = {k: _openapi_nullable(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_openapi_nullable(v) for v in node]
    return node


@functools.cache
def _spec(name: str) -> tuple[dict[str, Any], Registry, str]:
    doc = _openapi_nullable(json.loads((CONTRACTS / SPEC_FILES[name]).read_text(encoding="utf-8")))
    uri = f"urn:sendgrid-oai:{name}"
    return doc, Registry().with_resource(uri, Resource.from_contents(doc, default_specification=DRAFT202012)), uri


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


@functools.cache
def _templates() -> list[tuple[str, str, re.Pattern[str]]]:
    """(spec name, path template, regex), literal paths before parameterised ones."""
    out = []
    for name in SPEC_FILES:
        for template in _spec(name)[0]["paths"]:
            out.append((name, template, re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$")))
    return sorted(out, key=lambda t: t[1].count("{"))


def _find(method: str, path: str) -> tuple[str, str] | None:
    for name, template, regex in _templates():
        if regex.match(path) and method.lower() in _spec(name)[0]["paths"][template]:
            return name, template
    return None


def _validator(name: str, schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, registry=_spec(name)[1])


def request_errors(method: str, path: str, body: Any) -> list[str]:
    """Schema errors of a request body against the spec's requestBody (empty when valid)."""
    found = _find(method, path)
    assert found, f"{method} {path} is not in the contract"
    name, template = found
    doc, _, uri = _spec(name)
    assert "requestBody" in doc["paths"][template][method.lower()], f"{method} {template} takes no body"
    ref = uri + "#" + _pointer("paths", template, method.lower(), "requestBody", "content", "application/json",
                               "schema")
    return [e.message for e in _validator(name, {"$ref": ref}).iter_errors(body)]


def undocumented_fields(method: str, path: str, body: Any) -> list[str]:
    """Fields of a request body that the contract does not name, at the top level and one level down (a contact's
    fields). The schemas allow extra fields, so request_errors passes them; whether SendGrid ignores or refuses one
    is not documented, so the connector sends none."""
    found = _find(method, path)
    assert found, f"{method} {path} is not in the contract"
    name, template = found
    doc = _spec(name)[0]

    def props(schema: dict[str, Any]) -> dict[str, Any]:
        schema = _deref(doc, schema)
        return {k: _deref(doc, v) for k, v in schema.get("properties", {}).items()}

    top = props(doc["paths"][template][method.lower()]["requestBody"]["content"]["application/json"]["schema"])
    extra = [k for k in body if k not in top]
    for key, schema in top.items():
        values = body.get(key)
        inner = props(_deref(doc, schema.get("items", {}))) if schema.get("type") == "array" else props(schema)
        if inner and isinstance(values, list):
            extra += [f"{key}[].{k}" for v in values if isinstance(v, dict) for k in v if k not in inner]
    return sorted(set(extra))


def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_response(method: str, path: str, resp: requests.Response) -> None:
    """Validate one sandbox answer against the contract (or the sandbox error shape for undocumented statuses)."""
    path = path.split("?")[0]
    found = _find(method, path)
    if found is None:
        return
    for header in limits.RATE_LIMIT_HEADERS:
        assert resp.headers.get(header, "").isdigit(), f"{header} missing on {resp.status_code} {method} {path}"
    name, template = found
    doc, _, uri = _spec(name)
    status = str(resp.status_code)
    body = resp.json() if resp.content else None
    override = KNOWN_DEVIATIONS.get((method.lower(), template, status))
    documented = doc["paths"][template][method.lower()]["responses"].get(status)
    if override is not None:
        schema = override
    elif documented is not None:
        target = _pointer("paths", template, method.lower(), "responses", status)
        if "$ref" in documented:
            target = documented["$ref"][1:]
        schema = {"$ref": uri + "#" + target + _pointer("content", "application/json", "schema")}
    else:
        assert resp.status_code >= 400, f"{method} {template} answered undocumented success {status}"
        schema = SANDBOX_ERROR
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(name, schema).iter_errors(body)]
    assert not errors, f"{method} {template} {status} breaks the contract: {errors[:5]}"
    if resp.status_code == 400:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in Draft202012Validator(SENDGRID_400).iter_errors(body)]
        assert not errors, f"{method} {template} 400 is not in SendGrid's error shape: {errors[:5]}"


# ------------------------------------------------------------------------------------------------------ fixtures


class Api:
    """A SendGrid client for tests: every request body and every response is checked against the contract."""

    def __init__(self, url: str, key: str = KEY) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {key}", "Accept": "application/json"})

    def __call__(self, method: str, path: str, body: Any = None, *, valid_request: bool = True,
                 **kwargs: Any) -> requests.Response:
        if body is not None:
            problems = request_errors(method, path, body)
            assert (not problems) == valid_request, problems or "expected the request to break the contract"
            kwargs["data"] = orjson.dumps(body)
            kwargs.setdefault("headers", {})["Content-Type"] = "application/json"
        resp = self.session.request(method, self.url + path, timeout=60, **kwargs)
        check_response(method, path, resp)
        return resp

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self("GET", f"/v3/marketing/contacts/imports/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_job(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + JOB_WAIT_S
        while True:
            job = self("GET", f"/v3/marketing/contacts/imports/{job_id}")
            assert job.status_code == 200
            if job.json()["status"] != "pending" or time.monotonic() > deadline:
                return job.json()
            time.sleep(0.02)

    def upsert(self, contacts: list[dict[str, Any]], list_ids: list[str] | None = None, *,
               valid_request: bool = True) -> requests.Response:
        body: dict[str, Any] = {"contacts": contacts}
        if list_ids is not None:
            body["list_ids"] = list_ids
        return self("PUT", "/v3/marketing/contacts", body, valid_request=valid_request)


@pytest.fixture
def box() -> Sandbox:
    return Sandbox([KEY], job_delay=0.02)


@pytest.fixture
def srv(box: Sandbox) -> Iterator[SandboxServer]:
    with serve(box) as server:
        yield server


@pytest.fixture
def api(srv: SandboxServer) -> Api:
    return Api(srv.url)


def upsert_done(api: Api, contacts: list[dict[str, Any]], list_ids: list[str] | None = None) -> dict[str, Any]:
    resp = api.upsert(contacts, list_ids)
    assert resp.status_code == 202, resp.text
    return api.wait_job(resp.json()["job_id"])


def contacts_of(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [{"email": f"user{i}@example.com", **extra} for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------- the contract helpers


def test_the_connectors_request_bodies_name_only_documented_fields(srv: SandboxServer, box: Sandbox) -> None:
    """What the connector itself sends (its mapper, packer, importer and client, every field mapped), checked on the
    wire against the contract: valid, and no field the contract does not name."""
    from shared import batching, contacts, pipeline
    from shared.bulk import Importer
    from shared.secrets import EnvSecrets
    from shared.sendgrid import SendGridClient

    list_id = box.create_list("contract")
    custom = [contacts.CustomField("ltv", box.create_field("ltv", "Number"), "Number", "V"),
              contacts.CustomField("since", box.create_field("since", "Date"), "Date", "D")]
    mapping = {field: field.upper() for field in sorted(limits.WRITABLE_RESERVED_FIELDS)}
    mapper = contacts.ContactMapper(mapping, custom)
    row = {c: f"{c.lower()}@example.com" if "EMAIL" in c else "x" for c in mapper.columns} | {"V": "1.5",
                                                                                            "D": "2024-01-31"}
    chunk = pipeline.map_rows(mapper, [(2, [row[c] for c in mapper.columns], None)])
    assert len(chunk.emails) == 1 and set(orjson.loads(chunk.contact(0))) == set(mapping) | {"custom_fields"}
    packer = batching.Packer(batching.body_overhead([list_id]))
    assert not list(packer.add(chunk.data, chunk.ends, chunk.emails, [0], 0))
    batch = packer.flush()
    assert batch is not None

    sent: list[requests.PreparedRequest] = []
    session = requests.Session()
    session.hooks["response"].append(lambda resp, *args, **kwargs: sent.append(resp.request))
    client = SendGridClient(srv.url, EnvSecrets({"SENDGRID_API_KEY": KEY}), "sendgrid-api-key", session=session)
    client.upsert(batch.body([list_id]))
    reserved = client.field_definitions()["reserved_fields"]  # it lists no external_id, anonymous_id
    importer = Importer({k: v for k, v in mapping.items() if k in {f["name"] for f in reserved}}, custom, reserved)
    client.start_import([list_id], importer.field_mappings)
    client.search_contacts(chunk.emails)
    client.close()
    bodies = [(r.method or "", requests.utils.urlparse(r.url).path, orjson.loads(r.body or b"")) for r in sent
              if r.body]
    assert [(m, p) for m, p, _ in bodies] == [("PUT", "/v3/marketing/contacts"),
                                             ("PUT", "/v3/marketing/contacts/imports"),
                                             ("POST", "/v3/marketing/contacts/search/emails")]
    for method, path, body in bodies:
        assert request_errors(method, path, body) == [], (method, path)
        assert undocumented_fields(method, path, body) == [], (method, path)


def test_contract_helpers_reject_what_the_spec_forbids() -> None:
    assert request_errors("PUT", "/v3/marketing/contacts", {"contacts": [{"email": "a@example.com"}]}) == []
    assert request_errors("PUT", "/v3/marketing/contacts", {"contacts": []})  # minItems 1
    assert request_errors("PUT", "/v3/marketing/contacts", {"contacts": [{"first_name": "x" * 51}]})
    assert request_errors("POST", "/v3/marketing/field_definitions", {"name": "a", "field_type": "Bool"})
    assert undocumented_fields("PUT", "/v3/marketing/contacts/imports",
                               {"file_type": "csv", "field_mappings": ["_rf1_T"], "is_compressed": True}) == [
        "is_compressed"]
    assert undocumented_fields("PUT", "/v3/marketing/contacts", {"contacts": [{"email": "a@example.com", "x": 1}]}) == [
        "contacts[].x"]
    bad = requests.Response()
    bad.status_code, bad._content = 200, b'{"custom_fields": "nope", "reserved_fields": []}'
    bad.headers.update({h: "1" for h in limits.RATE_LIMIT_HEADERS})
    with pytest.raises(AssertionError, match="breaks the contract"):
        check_response("GET", "/v3/marketing/field_definitions", bad)
    bad.status_code, bad._content = 201, b"{}"
    with pytest.raises(AssertionError, match="undocumented success"):
        check_response("GET", "/v3/marketing/field_definitions", bad)
    for loose in (b'{"errors": [{"field": "x", "message": "m", "help": {}}]}',  # the documented schema allows these
                  b'{"errors": [{"message": "m"}]}', b'{"errors": []}', b'{"error": "m"}'):
        bad.status_code, bad._content = 400, loose
        with pytest.raises(AssertionError, match="SendGrid's error shape"):
            check_response("PUT", "/v3/marketing/contacts", bad)


# ------------------------------------------------------------------------------------ auth, headers, HTTP limits


@pytest.mark.parametrize("auth", [None, "Bearer SG.wrong", f"Basic {KEY}", "Bearer "])
def test_missing_or_wrong_key_is_401(srv: SandboxServer, auth: str | None) -> None:
    headers = {"Accept": "application/json"} | ({"Authorization": auth} if auth else {})
    resp = requests.get(f"{srv.url}/v3/marketing/contacts/count", headers=headers, timeout=10)
    assert resp.status_code == 401
    assert resp.json() == {"errors": [{"field": None, "message": "authorization required"}]}
    check_response("GET", "/v3/marketing/contacts/count", resp)


@pytest.mark.parametrize(("accept", "status"), [
    (None, 406), ("text/html", 406), ("application/json;q=0", 406),
    ("application/json", 200), ("*/*", 200), ("text/html, application/*;q=0.5", 200)])
def test_accept_header_must_allow_json(api: Api, accept: str | None, status: int) -> None:
    resp = api("GET", "/v3/marketing/contacts/count", headers={"Accept": accept})
    assert resp.status_code == status


def test_request_target_over_8192_bytes_is_414_on_any_endpoint(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("L")
    base = f"/v3/marketing/lists/{list_id}/contacts?contact_ids="
    ids = ",".join(str(uuid.uuid4()) for _ in range(300))  # ~11 KB
    assert api("DELETE", base + ids).status_code == 414
    pad = "x" * (8192 - len("/v3/marketing/lists?page_size=10&pad="))
    assert api("GET", "/v3/marketing/lists?page_size=10&pad=" + pad).status_code == 200  # exactly 8,192
    assert api("GET", "/v3/marketing/lists?page_size=10&pad=" + pad + "x").status_code == 414
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200  # a new connection works


def test_keep_alive_serves_several_requests_on_one_connection(srv: SandboxServer) -> None:
    conn = http.client.HTTPConnection(srv.url.removeprefix("http://"), timeout=10)
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json"}
    try:
        for _ in range(3):
            conn.request("GET", "/v3/marketing/contacts/count", headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.version == 11
            assert json.loads(resp.read()) == {"contact_count": 0, "billable_count": 0}
            assert resp.getheader("Connection") != "close"
    finally:
        conn.close()


def test_stop_closes_idle_keep_alive_connections(box: Sandbox) -> None:
    server = serve(box)
    api = Api(server.url)
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200  # leaves a pooled connection open
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        api("GET", "/v3/marketing/contacts/count")


def test_concurrent_clients_are_served_consistently(api: Api, box: Sandbox, srv: SandboxServer) -> None:
    list_id = box.create_list("L")

    def client(n: int) -> list[str]:
        own = Api(srv.url)
        return [own.upsert(contacts_of(50, start=n * 1000 + k * 50), [list_id]).json()["job_id"] for k in range(4)]

    with ThreadPoolExecutor(max_workers=6) as pool:
        job_ids = [job_id for ids in pool.map(client, range(6)) for job_id in ids]
    assert len(set(job_ids)) == 24
    assert all(api.wait_job(job_id)["status"] == "completed" for job_id in job_ids)
    assert len(box.list_emails(list_id)) == 6 * 4 * 50 == box.contact_count()
    assert box.stats["requests"]["PUT /v3/marketing/contacts"] == 24


def test_rate_limit_per_key_per_endpoint_with_headers(srv: SandboxServer) -> None:
    box = srv.sandbox
    box.rate_limit, box.rate_window = 2, 3600.0
    box.rotate_keys([KEY, OTHER_KEY])
    api, other = Api(srv.url), Api(srv.url, OTHER_KEY)
    first = api("GET", "/v3/marketing/lists")
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("2", "1")
    assert api("GET", "/v3/marketing/lists").headers["X-RateLimit-Remaining"] == "0"
    limited = api("GET", "/v3/marketing/lists")
    assert limited.status_code == 429
    assert limited.json() == {"errors": [{"field": None, "message": "too many requests"}]}
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert int(limited.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200  # another endpoint
    assert other("GET", "/v3/marketing/lists").status_code == 200  # another key
    assert box.stats["responses_429"] == 1


# --------------------------------------------------------------------------------------------- PUT contacts


def test_upsert_job_pending_then_completed_and_contacts_stored_lower_case(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("VIP")
    tier = box.create_field("tier", "Text")
    box.job_delay = 3600.0
    resp = api.upsert([{"email": "Ada@Example.COM", "first_name": "Ada", "custom_fields": {tier: "gold"}}], [list_id])
    assert resp.status_code == 202
    job_id = resp.json()["job_id"]
    job = api("GET", f"/v3/marketing/contacts/imports/{job_id}").json()
    assert job["status"] == "pending" and job["job_type"] == "upsert_contacts" and "finished_at" not in job
    assert job["results"]["requested_count"] == 1
    assert box.contact_count() == 0  # not applied before the job completes
    assert box.complete_jobs() == 1
    job = api("GET", f"/v3/marketing/contacts/imports/{job_id}").json()
    assert job["status"] == "completed" and job["finished_at"] >= job["started_at"]
    assert job["results"] | {} == {"requested_count": 1, "created_count": 1, "updated_count": 0, "deleted_count": 0,
                                   "errored_count": 0}
    ada = box.contact("ADA@example.com")
    assert ada is not None
    assert (ada["email"], ada["first_name"], ada["custom_fields"], ada["list_ids"]) == (
        "ada@example.com", "Ada", {tier: "gold"}, [list_id])
    assert box.list_emails(list_id) == ["ada@example.com"]


def test_upsert_job_completes_by_itself_after_the_delay(api: Api, box: Sandbox) -> None:
    job = upsert_done(api, contacts_of(3))
    assert job["status"] == "completed" and job["results"]["created_count"] == 3
    assert box.contact_count() == 3


def test_upsert_merges_fields_adds_lists_and_counts_only_changes(api: Api, box: Sandbox) -> None:
    first_list, second_list = box.create_list("A"), box.create_list("B")
    tier, score = box.create_field("tier", "Text"), box.create_field("score", "Number")
    upsert_done(api, [{"email": "bob@example.com", "first_name": "Bob", "custom_fields": {tier: "a", score: 1}}],
                [first_list])
    job = upsert_done(api, [{"email": "BOB@example.com", "last_name": "B", "custom_fields": {score: 2.5}}],
                      [second_list])
    assert (job["results"]["created_count"], job["results"]["updated_count"]) == (0, 1)
    bob = box.contact("bob@example.com")
    assert bob is not None
    assert (bob["first_name"], bob["last_name"]) == ("Bob", "B")
    assert bob["custom_fields"] == {tier: "a", score: 2.5}
    assert bob["list_ids"] == sorted([first_list, second_list])
    again = upsert_done(api, [{"email": "bob@example.com", "last_name": "B"}], [second_list])
    assert (again["results"]["created_count"], again["results"]["updated_count"]) == (0, 0)  # unchanged
    assert box.contact_count() == 1


def test_body_over_6_000_000_bytes_is_413_and_exactly_6_000_000_is_accepted(api: Api, box: Sandbox) -> None:
    body = orjson.dumps({"contacts": contacts_of(2)})
    exact = body[:-1] + b" " * (limits.MAX_REQUEST_BYTES - len(body)) + b"}"
    assert len(exact) == limits.MAX_REQUEST_BYTES
    headers = {"Content-Type": "application/json"}
    assert api("PUT", "/v3/marketing/contacts", data=exact, headers=headers).status_code == 202
    over = exact[:-1] + b" }"
    resp = api("PUT", "/v3/marketing/contacts", data=over, headers=headers)
    assert resp.status_code == 413
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200  # the connection stays usable
    assert box.stats["max_body_bytes"] == limits.MAX_REQUEST_BYTES + 1


def test_contact_count_limits_0_and_30_001_refused_30_000_accepted(api: Api, box: Sandbox) -> None:
    spec = _spec("contacts")[0]["paths"]["/v3/marketing/contacts"]["put"]["requestBody"]
    contacts_schema = spec["content"]["application/json"]["schema"]["properties"]["contacts"]
    assert (contacts_schema["minItems"], contacts_schema["maxItems"]) == (1, limits.MAX_CONTACTS_PER_REQUEST)
    headers = {"Content-Type": "application/json"}  # big bodies go raw: jsonschema would take seconds on them
    for n in (0, limits.MAX_CONTACTS_PER_REQUEST + 1):
        resp = api("PUT", "/v3/marketing/contacts", data=orjson.dumps({"contacts": contacts_of(n)}), headers=headers)
        assert resp.status_code == 400
        assert resp.json()["errors"][0]["field"] == "contacts"
    full = orjson.dumps({"contacts": contacts_of(limits.MAX_CONTACTS_PER_REQUEST)})
    resp = api("PUT", "/v3/marketing/contacts", data=full, headers=headers)
    assert resp.status_code == 202
    job = api.wait_job(resp.json()["job_id"])
    assert job["results"]["created_count"] == limits.MAX_CONTACTS_PER_REQUEST
    assert box.stats["max_contacts_per_request"] == limits.MAX_CONTACTS_PER_REQUEST


def _too_long(field: str, n: int) -> str:
    if field == "email":
        local = "a" * 64
        return local + "@" + "b" * (n - len(local) - 5) + ".com"
    return "x" * n


@pytest.mark.parametrize("field", sorted(limits.FIELD_MAX_LENGTHS))
def test_field_max_lengths_are_enforced_and_name_the_field(api: Api, box: Sandbox, field: str) -> None:
    limit = limits.FIELD_MAX_LENGTHS[field]
    contact = {"email": "ok@example.com", field: _too_long(field, limit + 1)}
    resp = api.upsert([contact], valid_request=False)  # the spec's maxLength says the same
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["field"] == f"contacts[0].{field}"
    assert str(limit) in resp.json()["errors"][0]["message"]
    at_limit = {"email": "ok@example.com", field: _too_long(field, limit)}
    if field == "email":
        at_limit = {"email": at_limit["email"]}
    assert api.upsert([at_limit]).status_code == 202


def test_custom_fields_must_exist_and_match_their_type(api: Api, box: Sandbox) -> None:
    score, born, note = box.create_field("score", "Number"), box.create_field("born", "Date"), \
        box.create_field("note", "Text")
    resp = api.upsert([{"email": "a@example.com", "custom_fields": {"e99_T": "x"}}])
    assert resp.status_code == 400
    assert {"field": "custom_fields", "message": "invalid custom field ids supplied - e99_T"} in resp.json()["errors"]
    assert api.upsert([{"email": "a@example.com", "custom_fields": {"tier": "x"}}]).status_code == 400  # a name
    for bad in ({score: "42"}, {score: True}, {born: "1990-01-31"}, {born: "02/30/1990"}, {note: 5}):
        resp = api.upsert([{"email": "a@example.com", "custom_fields": bad}])
        assert resp.status_code == 400, bad
        assert resp.json()["errors"][0]["field"] == "contacts[0].custom_fields"
    job = upsert_done(api, [{"email": "a@example.com", "custom_fields": {score: 42, born: "02/29/2024", note: "n"}}])
    assert job["status"] == "completed"


def test_invalid_emails_refuse_the_whole_request_with_one_error_each(api: Api, box: Sandbox) -> None:
    contacts = [{"email": "good@example.com"}, {"email": "not-an-email"}, {"email": "two@@example.com"},
                {"email": "someone@host.invalid"}, {"email": "fine@example.org"}]
    resp = api.upsert(contacts)
    assert resp.status_code == 400
    assert resp.json() == {"errors": [
        {"field": "contacts[1].identifier", "message": "email 'not-an-email' is not valid"},
        {"field": "contacts[2].identifier", "message": "email 'two@@example.com' is not valid"},
        {"field": "contacts[3].identifier", "message": "email 'someone@host.invalid' is not valid"},
    ]}
    assert box.stats["jobs_created"] == 0 and box.contact_count() == 0


def test_custom_invalid_email_pattern() -> None:
    box = Sandbox([KEY], job_delay=0.0, invalid_email_pattern=r"^bounce")
    with serve(box) as server:
        resp = Api(server.url).upsert([{"email": "Bounce1@example.com"}, {"email": "x@a.invalid"}])
    assert resp.status_code == 400
    assert [e["field"] for e in resp.json()["errors"]] == ["contacts[0].identifier"]


def test_same_email_twice_in_one_request_is_refused(api: Api) -> None:
    resp = api.upsert([{"email": "dup@example.com"}, {"email": "x@example.com"}, {"email": "DUP@example.com"}])
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["field"] == "contacts[2].email"
    assert "more than once" in resp.json()["errors"][0]["message"]


def test_identifier_unknown_fields_types_and_list_ids(api: Api, box: Sandbox) -> None:
    resp = api.upsert([{"first_name": "No id"}])
    assert resp.status_code == 400 and resp.json()["errors"][0]["field"] == "contacts[0]"
    assert upsert_done(api, [{"external_id": "ext-1", "first_name": "X"}])["results"]["created_count"] == 1
    resp = api.upsert([{"email": "a@example.com", "phone_number": "+15551234567"}])  # not in ContactRequest
    assert resp.status_code == 400 and resp.json()["errors"][0]["field"] == "contacts[0].phone_number"
    resp = api.upsert([{"email": "a@example.com", "city": 7}], valid_request=False)
    assert resp.status_code == 400 and resp.json()["errors"][0]["field"] == "contacts[0].city"
    resp = api.upsert([{"email": "a@example.com", "alternate_emails": ["b@example.com"] * 6}],
                      valid_request=False)
    assert resp.status_code == 400
    resp = api.upsert([{"email": "a@example.com"}], [str(uuid.uuid4())])
    assert resp.status_code == 404 and resp.json()["errors"][0]["field"] == "list_ids"
    resp = api("PUT", "/v3/marketing/contacts", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400


def test_chunked_request_body_is_accepted(api: Api, box: Sandbox) -> None:
    body = orjson.dumps({"contacts": contacts_of(50)})
    chunks = iter([body[:1000], body[1000:]])
    resp = api("PUT", "/v3/marketing/contacts", data=chunks, headers={"Content-Type": "application/json"})
    assert resp.status_code == 202
    api.wait_job(resp.json()["job_id"])
    assert box.contact_count() == 50


# ------------------------------------------------------------------ large requests (the batch check) and latency

BIG = 2_500  # contacts: several of the sandbox's check blocks (_BLOCK), so a problem can sit in a later one
BAD_AT = 2_100


def big_contacts(number_id: str, date_id: str, n: int = BIG) -> list[dict[str, Any]]:
    """Valid contacts with every usual field; values include non-ASCII text, quotes, "},{" and a newline."""
    names = ("Anna", "Chloé", "O'Brien", 'Say "hi"', "a},{b", "two\nlines", "Zoë", "x" * 50)
    return [{"email": f"Person.{i}@Example{i % 3}.com", "first_name": names[i % len(names)], "last_name": "Müller",
             "country": "DE", "city": "y" * 60 if i % 7 == 0 else "München", "state_province_region": "Bayern",
             "postal_code": "z" * 300 if i % 11 == 0 else "80331",
             "custom_fields": {number_id: i + 0.5 if i % 2 else i, date_id: f"{i % 12 + 1:02d}/{i % 28 + 1:02d}/2020"}}
            for i in range(n)]


def put_raw(api: Api, contacts: list[Any], list_ids: list[str] | None = None) -> requests.Response:
    """An upsert sent without the contract check (jsonschema would take seconds on big bodies)."""
    body: dict[str, Any] = {"contacts": contacts} if list_ids is None else {"contacts": contacts, "list_ids": list_ids}
    return api("PUT", "/v3/marketing/contacts", data=orjson.dumps(body), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("patch", "field", "message"), [
    ({"email": "x..y@example.com"}, "identifier", "email 'x..y@example.com' is not valid"),
    ({"email": "x.@example.com"}, "identifier", "email 'x.@example.com' is not valid"),
    ({"email": "@example.com"}, "identifier", "email '@example.com' is not valid"),
    ({"email": "a" * 65 + "@example.com"}, "identifier", "is not valid"),
    ({"email": "x y@example.com"}, "identifier", "email 'x y@example.com' is not valid"),
    ({"email": "x\x1c@example.com"}, "identifier", "is not valid"),
    ({"email": "x@example"}, "identifier", "email 'x@example' is not valid"),
    ({"email": "x@_example.com"}, "identifier", "email 'x@_example.com' is not valid"),
    ({"email": "ü@exämple.c"}, "identifier", "email 'ü@exämple.c' is not valid"),
    ({"email": "Someone@Host.INVALID"}, "identifier", "email 'Someone@Host.INVALID' is not valid"),
    ({"email": 5}, "email", "email must be a string"),
    ({"first_name": "x" * 51}, "first_name", "first_name must be at most 50 characters"),
    ({"city": "y" * 61}, "city", "city must be at most 60 characters"),
    ({"postal_code": 80331}, "postal_code", "postal_code must be a string"),
    ({"last_name": None}, "last_name", "last_name must be a string"),
    ({"nickname": "x"}, "nickname", "unknown contact field 'nickname'"),
    ({"custom_fields": {"NUMBER": "42"}}, "custom_fields", "is a Number field"),
    ({"custom_fields": {"NUMBER": True}}, "custom_fields", "is a Number field"),
    ({"custom_fields": {"DATE": "02/30/2020"}}, "custom_fields", "is a Date field"),
    ({"custom_fields": {"DATE": ["01/31/2020"]}}, "custom_fields", "is a Date field"),  # was a 500
    ({"custom_fields": []}, "custom_fields", "custom_fields must be an object keyed by custom field id"),
])
def test_one_bad_value_in_a_large_request_refuses_it_and_is_named(api: Api, box: Sandbox, patch: dict[str, Any],
                                                                  field: str, message: str) -> None:
    number_id, date_id = box.create_field("ltv", "Number"), box.create_field("signup", "Date")
    contacts = big_contacts(number_id, date_id)
    if "custom_fields" in patch and isinstance(patch["custom_fields"], dict):
        names = {"NUMBER": number_id, "DATE": date_id}
        patch = {"custom_fields": {**contacts[BAD_AT]["custom_fields"],
                                   **{names[k]: v for k, v in patch["custom_fields"].items()}}}
    contacts[BAD_AT].update(patch)
    resp = put_raw(api, contacts)
    assert resp.status_code == 400
    [error] = resp.json()["errors"]
    assert error["field"] == f"contacts[{BAD_AT}].{field}" and message in error["message"]
    assert box.stats["jobs_created"] == 0


def test_large_request_repeats_unknown_ids_and_non_objects_are_refused(api: Api, box: Sandbox) -> None:
    number_id, date_id = box.create_field("ltv", "Number"), box.create_field("signup", "Date")
    contacts: list[Any] = big_contacts(number_id, date_id)
    contacts[BAD_AT]["email"] = contacts[5]["email"].upper()
    resp = put_raw(api, contacts)
    assert resp.status_code == 400
    assert resp.json()["errors"] == [{"field": f"contacts[{BAD_AT}].email", "message":
                                      f"email '{contacts[5]['email'].lower()}' appears more than once (first at "
                                      "contacts[5])"}]
    contacts = big_contacts(number_id, date_id)
    contacts[BAD_AT]["custom_fields"]["e99_T"] = "x"
    contacts[BAD_AT + 1]["custom_fields"]["e98_N"] = 1
    contacts[BAD_AT + 2]["custom_fields"]["e99_T"] = "again"
    assert put_raw(api, contacts).json()["errors"] == [{"field": "custom_fields",
                                                        "message": "invalid custom field ids supplied - e99_T,e98_N"}]
    contacts = big_contacts(number_id, date_id)
    contacts[BAD_AT] = "not a contact"
    assert put_raw(api, contacts).json()["errors"] == [{"field": f"contacts[{BAD_AT}]",
                                                        "message": "contact must be an object"}]
    contacts = big_contacts(number_id, date_id)
    del contacts[BAD_AT]["email"]
    assert put_raw(api, contacts).json()["errors"][0]["field"] == f"contacts[{BAD_AT}]"  # no identifier
    assert box.stats["jobs_created"] == 0


def test_large_request_is_stored_exactly_and_counts_only_changes(api: Api, box: Sandbox) -> None:
    number_id, date_id = box.create_field("ltv", "Number"), box.create_field("signup", "Date")
    first, second = box.create_list("first"), box.create_list("second")
    contacts = big_contacts(number_id, date_id)
    contacts.append({"email": "bare@example.com"})
    job = api.wait_job(put_raw(api, copy.deepcopy(contacts), [first]).json()["job_id"])
    assert job["results"] | {} == {"requested_count": BIG + 1, "created_count": BIG + 1, "updated_count": 0,
                                   "deleted_count": 0, "errored_count": 0}
    for i in (0, 3, 4, 5, 7, 11, BAD_AT, BIG):
        stored = box.contact(contacts[i]["email"])
        assert stored is not None
        expected = {k: v for k, v in contacts[i].items() if k != "email"}
        assert {k: v for k, v in stored.items() if k not in ("id", "email", "list_ids", "created_at", "updated_at")
                } == {"custom_fields": {}, **expected}
        assert stored["email"] == contacts[i]["email"].lower() and stored["list_ids"] == [first]
    again = api.wait_job(put_raw(api, copy.deepcopy(contacts), [first]).json()["job_id"])
    assert (again["results"]["created_count"], again["results"]["updated_count"]) == (0, 0)  # a re-send
    changed = copy.deepcopy(contacts)
    changed[1]["first_name"] = "Changed"
    changed[2]["custom_fields"] = {number_id: 99}  # merged into the stored custom fields
    joined = api.wait_job(put_raw(api, changed, [second]).json()["job_id"])
    assert (joined["results"]["created_count"], joined["results"]["updated_count"]) == (0, BIG + 1)  # all join
    assert box.contact(contacts[1]["email"])["first_name"] == "Changed"  # type: ignore[index]
    assert box.contact(contacts[2]["email"])["custom_fields"] == {  # type: ignore[index]
        number_id: 99, date_id: contacts[2]["custom_fields"][date_id]}
    assert box.contact_count() == BIG + 1 and len(box.list_emails(second)) == BIG + 1
    found = api("POST", "/v3/marketing/contacts/search/emails", {"emails": [contacts[3]["email"]]})
    view = found.json()["result"][contacts[3]["email"].lower()]["contact"]
    assert (view["first_name"], view["custom_fields"]) == ('Say "hi"', {"ltv": 3.5, "signup": "04/04/2020"})


class SleepRecorder:
    """The time module as the sandbox module sees it, recording when each of its sleeps began and ended."""

    def __init__(self) -> None:
        self.sleeps: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        began = time.monotonic()
        time.sleep(seconds)
        with self._lock:
            self.sleeps.append((began, time.monotonic()))


def test_latency_delays_every_answer_and_concurrent_requests_wait_in_parallel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    latency, clients = 0.4, 4
    clock = SleepRecorder()
    monkeypatch.setattr(sandbox_module, "time", clock)
    box = Sandbox([KEY], job_delay=0.0, latency=latency)
    with serve(box) as server:
        api = Api(server.url)
        sent = time.monotonic()
        resp = api.upsert(contacts_of(3))
        assert time.monotonic() - sent >= latency  # a lower bound: the answer waited
        assert resp.status_code == 202 and api.wait_job(resp.json()["job_id"])["status"] == "completed"
        assert api("GET", "/_sandbox/stats").status_code == 200  # the control API waits too
        requests_so_far = box.stats["requests"]
        assert len(clock.sleeps) == requests_so_far["PUT /v3/marketing/contacts"] + \
            requests_so_far["GET /v3/marketing/contacts/imports/{id}"] + 1
        clock.sleeps.clear()
        start = threading.Barrier(clients)

        def client(_: int) -> requests.Response:
            own = Api(server.url)  # its own connection
            start.wait(timeout=30)
            return own("GET", "/v3/marketing/contacts/count")

        with ThreadPoolExecutor(max_workers=clients) as pool:
            answers = list(pool.map(client, range(clients)))
    assert [a.json()["contact_count"] for a in answers] == [3] * clients
    assert len(clock.sleeps) == clients
    # Every wait began before any ended: the server slept for the requests at the same time, not one after another.
    assert max(began for began, _ in clock.sleeps) < min(ended for _, ended in clock.sleeps)


def test_latency_must_be_a_finite_non_negative_number() -> None:
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="latency"):
            Sandbox([KEY], latency=bad)
    assert Sandbox([KEY]).latency == 0.0


# ----------------------------------------------------------------------------------------------------- faults


def test_fault_429_with_reset_after_and_retry_after_then_normal(api: Api, box: Sandbox) -> None:
    box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "429", "times": 1, "reset_after": 30,
                "retry_after": 7})
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200  # another endpoint is not affected
    resp = api.upsert(contacts_of(1))
    assert resp.status_code == 429
    assert resp.headers["X-RateLimit-Remaining"] == "0" and resp.headers["Retry-After"] == "7"
    assert int(resp.headers["X-RateLimit-Reset"]) >= int(time.time()) + 29
    assert api.upsert(contacts_of(1)).status_code == 202


@pytest.mark.parametrize(("kind", "status", "message"), [
    ("500", 500, "internal server error"), ("503", 503, "service unavailable"),
    ("401", 401, "authorization required"), ("403", 403, "too many bad requests, temporary block")])
def test_fault_status_answers_the_next_n_requests(api: Api, box: Sandbox, kind: str, status: int,
                                                  message: str) -> None:
    box.inject({"endpoint": "*", "kind": kind, "times": 2})
    for _ in range(2):
        resp = api.upsert(contacts_of(1))
        assert resp.status_code == status
        assert resp.json() == {"errors": [{"field": None, "message": message}]}
    assert api.upsert(contacts_of(1)).status_code == 202
    assert box.stats["faults_fired"] == 2


def test_fault_reset_drops_the_connection_without_processing(api: Api, box: Sandbox) -> None:
    box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "reset"})
    with pytest.raises(requests.ConnectionError):
        api.upsert(contacts_of(5))
    assert box.stats["jobs_created"] == 0
    assert api.upsert(contacts_of(5)).status_code == 202


def test_fault_reset_after_processing_stores_the_contacts(api: Api, box: Sandbox) -> None:
    box.inject({"endpoint": "PUT /v3/marketing/contacts", "kind": "reset", "processed": True})
    with pytest.raises(requests.ConnectionError):
        api.upsert(contacts_of(5))
    assert box.complete_jobs() == 1 and box.contact_count() == 5


def test_fault_slow_still_answers(api: Api, box: Sandbox) -> None:
    box.inject({"endpoint": "GET /v3/marketing/contacts/count", "kind": "slow", "delay": 0.05})
    assert api("GET", "/v3/marketing/contacts/count").status_code == 200
    assert box.stats["faults_fired"] == 1


def test_job_fault_errored_lists_k_contacts_and_skips_them(api: Api, box: Sandbox, srv: SandboxServer) -> None:
    list_id = box.create_list("L")
    box.inject({"endpoint": "job", "kind": "errored", "times": 1, "error_count": 2})
    job = upsert_done(api, contacts_of(5), [list_id])
    assert job["status"] == "errored"
    assert job["results"]["errored_count"] == 2 and job["results"]["created_count"] == 3
    errors = requests.get(job["results"]["errors_url"], timeout=10)  # no bearer, like a presigned URL
    assert errors.status_code == 200
    rows = list(csv.DictReader(io.StringIO(errors.text)))
    assert [r["email"] for r in rows] == ["user0@example.com", "user1@example.com"]
    assert box.list_emails(list_id) == [f"user{i}@example.com" for i in range(2, 5)]
    assert upsert_done(api, contacts_of(1, start=9))["status"] == "completed"  # times=1


def test_job_fault_failed_applies_nothing(api: Api, box: Sandbox) -> None:
    box.inject({"endpoint": "job", "kind": "failed"})
    job = upsert_done(api, contacts_of(4))
    assert job["status"] == "failed" and job["results"]["errored_count"] == 4
    assert box.contact_count() == 0


def test_bad_faults_are_refused(box: Sandbox) -> None:
    for fault in ({"endpoint": "*", "kind": "418"}, {"endpoint": "PUT /nope", "kind": "500"},
                  {"endpoint": "job", "kind": "500"}, {"endpoint": "*", "kind": "500", "times": 0}):
        with pytest.raises(ValueError):
            box.inject(fault)


# --------------------------------------------------------------------------------------------- CSV bulk import


def _reserved_ids(api: Api) -> dict[str, str]:
    return {f["name"]: f["id"] for f in api("GET", "/v3/marketing/field_definitions").json()["reserved_fields"]}


def _start_import(api: Api, mappings: list[str | None], list_ids: list[str]) -> dict[str, Any]:
    resp = api("PUT", "/v3/marketing/contacts/imports",
               {"list_ids": list_ids, "file_type": "csv", "field_mappings": mappings})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _upload(start: dict[str, Any], data: Any, extra: dict[str, str] | None = None) -> requests.Response:
    headers = {h["header"]: h["value"] for h in start["upload_headers"]} | (extra or {})
    return requests.put(start["upload_uri"], data=data, headers=headers, timeout=60)


def test_bulk_import_gzip_chunked_upload_with_errored_rows(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("Bulk")
    score = box.create_field("score", "Number")
    rf = _reserved_ids(api)
    start = _start_import(api, [rf["email"], rf["first_name"], None, score], [list_id])
    assert start["upload_uri"].startswith(api.url + "/_sandbox/uploads/")
    text = ("email,first_name,ignored,score\r\n"
            "Ann@Example.com,Ann,x,1\r\n"
            "bad-address,Bad,x,2\r\n"
            'ben@example.com,"Ben, Jr.",x,2.5\r\n'
            "cat@example.com,Cat,x,lots\r\n"
            "dan@example.com,,x,\r\n")
    packed = gzip.compress(text.encode())
    resp = _upload(start, iter([packed[:20], packed[20:]]), {"Content-Encoding": "gzip"})
    assert resp.status_code == 200
    job = api.wait_job(start["job_id"])
    assert (job["status"], job["job_type"]) == ("errored", "import")
    assert job["results"] | {"errors_url": None} == {"requested_count": 5, "created_count": 3, "updated_count": 0,
                                                     "deleted_count": 0, "errored_count": 2, "errors_url": None}
    errors = list(csv.DictReader(io.StringIO(requests.get(job["results"]["errors_url"], timeout=10).text)))
    assert [(r["line"], r["email"]) for r in errors] == [("3", "bad-address"), ("5", "cat@example.com")]
    assert box.list_emails(list_id) == ["ann@example.com", "ben@example.com", "dan@example.com"]
    ben = box.contact("ben@example.com")
    assert ben is not None and ben["first_name"] == "Ben, Jr." and ben["custom_fields"] == {score: 2.5}
    again = _upload(start, b"email\r\n")
    assert again.status_code == 409


def test_bulk_import_plain_csv_completes_and_requires_the_upload_headers(api: Api, box: Sandbox) -> None:
    rf = _reserved_ids(api)
    start = _start_import(api, [rf["email"]], [])
    assert _upload(start, b"email\nx@example.com\n", {"X-Sandbox-Upload-Token": "forged"}).status_code == 403
    resp = _upload(start, b"email\nx@example.com\ny@example.com\n")
    assert resp.status_code == 200
    job = api.wait_job(start["job_id"])
    assert job["status"] == "completed" and job["results"]["created_count"] == 2
    assert "errors_url" not in job["results"]


def test_bulk_import_over_the_row_limit_fails_with_nothing_applied(api: Api, box: Sandbox) -> None:
    box.max_import_rows = 3
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    body = "email\n" + "".join(f"u{i}@example.com\n" for i in range(4))
    assert _upload(start, gzip.compress(body.encode())).status_code == 200  # gzip recognised undeclared
    job = api.wait_job(start["job_id"])
    assert job["status"] == "failed" and box.contact_count() == 0


def test_bulk_import_file_over_the_byte_limit_is_refused_and_the_job_fails(api: Api, box: Sandbox) -> None:
    box.max_import_bytes = 100
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    body = ("email\n" + "".join(f"u{i}@example.com\n" for i in range(20))).encode()
    try:
        resp = _upload(start, body)
        assert resp.status_code == 400
    except requests.ConnectionError:
        pass  # the sandbox closes the connection, as S3 does; the client may see that first
    job = api.wait_job(start["job_id"])
    assert job["status"] == "failed" and box.contact_count() == 0
    assert "larger than 100 bytes" in requests.get(job["results"]["errors_url"], timeout=10).text


def test_bulk_import_request_validation(api: Api, box: Sandbox) -> None:
    email_id = _reserved_ids(api)["email"]
    cases = [
        ({"file_type": "json", "field_mappings": [email_id]}, 400, False),
        ({"file_type": "csv", "field_mappings": []}, 400, False),
        ({"file_type": "csv", "field_mappings": ["e42_T", email_id]}, 400, True),
        ({"file_type": "csv", "field_mappings": ["_rf21_D", email_id]}, 400, True),  # read-only created_at
        ({"file_type": "csv", "field_mappings": [_reserved_ids(api)["first_name"]]}, 400, True),  # no identifier
        ({"file_type": "csv", "field_mappings": [email_id], "list_ids": [str(uuid.uuid4())]}, 404, True),
    ]
    for body, status, schema_valid in cases:
        resp = api("PUT", "/v3/marketing/contacts/imports", body, valid_request=schema_valid)
        assert resp.status_code == status, body
    assert api("GET", f"/v3/marketing/contacts/imports/{uuid.uuid4()}").status_code == 404


# ----------------------------------------------------------------------------------------- field definitions


def test_field_definitions_list_and_create_with_name_rules(api: Api, box: Sandbox) -> None:
    defs = api("GET", "/v3/marketing/field_definitions").json()
    assert defs["custom_fields"] == []
    reserved = {f["name"]: f for f in defs["reserved_fields"]}
    assert reserved["email"]["read_only"] is False and reserved["created_at"]["read_only"] is True
    created = api("POST", "/v3/marketing/field_definitions", {"name": "Loyalty_Tier", "field_type": "Text"})
    assert created.status_code == 200 and created.json()["id"] == "e1_T"
    assert api("POST", "/v3/marketing/field_definitions",
               {"name": "_score2", "field_type": "Number"}).json()["id"] == "e2_N"
    for body in ({"name": "loyalty_tier", "field_type": "Text"}, {"name": "1st", "field_type": "Text"},
                 {"name": "has space", "field_type": "Text"}, {"name": "EMAIL", "field_type": "Text"},
                 {"name": "x" * 101, "field_type": "Text"}):
        assert api("POST", "/v3/marketing/field_definitions", body, valid_request=len(body["name"]) <= 100
                   ).status_code == 400, body
    assert api("POST", "/v3/marketing/field_definitions", {"name": "b", "field_type": "Bool"},
               valid_request=False).status_code == 400
    names = [f["name"] for f in api("GET", "/v3/marketing/field_definitions").json()["custom_fields"]]
    assert names == ["Loyalty_Tier", "_score2"]


def test_field_definitions_cap_of_500(api: Api, box: Sandbox) -> None:
    for i in range(limits.MAX_CUSTOM_FIELDS - 1):
        box.create_field(f"f{i}", "Text")
    assert api("POST", "/v3/marketing/field_definitions", {"name": "last", "field_type": "Date"}).json()["id"] \
        == f"e{limits.MAX_CUSTOM_FIELDS}_D"
    resp = api("POST", "/v3/marketing/field_definitions", {"name": "one_more", "field_type": "Text"})
    assert resp.status_code == 400 and "500" in resp.json()["errors"][0]["message"]


# ------------------------------------------------------------------------------------------------------ lists


def test_lists_create_get_count_and_paginate(api: Api, box: Sandbox) -> None:
    created = api("POST", "/v3/marketing/lists", {"name": "Newsletter"})
    assert created.status_code == 201
    list_id = created.json()["id"]
    upsert_done(api, contacts_of(3), [list_id])
    got = api("GET", f"/v3/marketing/lists/{list_id}").json()
    assert (got["name"], got["contact_count"]) == ("Newsletter", 3)
    assert api("GET", f"/v3/marketing/lists/{list_id}/contacts/count").json()["contact_count"] == 3
    for i in range(4):
        box.create_list(f"extra {i}")
    seen, url = [], "/v3/marketing/lists?page_size=2"
    while url:
        page = api("GET", url).json()
        assert len(page["result"]) <= 2
        seen += [lst["id"] for lst in page["result"]]
        url = page["_metadata"].get("next", "").removeprefix(api.url)
    assert len(seen) == 5 == len(set(seen)) and seen[0] == list_id
    for size in ("0", "1001", "ten"):
        assert api("GET", f"/v3/marketing/lists?page_size={size}").status_code == 400
    assert api("GET", "/v3/marketing/lists?page_size=1000").status_code == 200
    missing = uuid.uuid4()
    assert api("GET", f"/v3/marketing/lists/{missing}").status_code == 404
    assert api("GET", f"/v3/marketing/lists/{missing}/contacts/count").status_code == 404
    assert api("POST", "/v3/marketing/lists", {"name": ""}, valid_request=False).status_code == 400


# ------------------------------------------------------------------------------------- search, remove, delete


def test_search_emails_found_not_found_and_limits(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("L")
    upsert_done(api, [{"email": "ann@example.com", "alternate_emails": ["ann.alt@example.com"]}], [list_id])
    resp = api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["ANN@example.com", "zed@example.com"]})
    assert resp.status_code == 200
    result = resp.json()["result"]
    assert result["zed@example.com"] == {"error": "contact not found"}
    ann = result["ann@example.com"]["contact"]
    assert ann["email"] == "ann@example.com" and ann["list_ids"] == [list_id]
    assert box.contact("ann@example.com")["id"] == ann["id"]  # type: ignore[index]
    by_alt = api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["ann.alt@example.com"]}).json()
    assert by_alt["result"]["ann.alt@example.com"]["contact"]["id"] == ann["id"]
    assert api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["zed@example.com"]}).status_code == 404
    many = {"emails": [f"u{i}@example.com" for i in range(limits.MAX_SEARCH_EMAILS + 1)]}
    assert api("POST", "/v3/marketing/contacts/search/emails", many).status_code == 400
    assert api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["nope"]}).status_code == 400


def _ids(api: Api, emails: list[str]) -> list[str]:
    result = api("POST", "/v3/marketing/contacts/search/emails", {"emails": emails}).json()["result"]
    return [result[e]["contact"]["id"] for e in emails]


def test_remove_from_list_keeps_the_contacts(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("L")
    upsert_done(api, contacts_of(4), [list_id])
    ids = _ids(api, ["user1@example.com", "user2@example.com"])
    resp = api("DELETE", f"/v3/marketing/lists/{list_id}/contacts?contact_ids={','.join(ids)}")
    assert resp.status_code == 202
    job = api.wait_job(resp.json()["job_id"])
    assert job["status"] == "completed" and job["results"]["deleted_count"] == 2
    assert box.list_emails(list_id) == ["user0@example.com", "user3@example.com"]
    assert api("GET", "/v3/marketing/contacts/count").json()["contact_count"] == 4
    assert api("DELETE", f"/v3/marketing/lists/{list_id}/contacts").status_code == 400
    assert api("DELETE", f"/v3/marketing/lists/{uuid.uuid4()}/contacts?contact_ids={ids[0]}").status_code == 404
    assert api("DELETE", f"/v3/marketing/lists/{list_id}/contacts?contact_ids={uuid.uuid4()}").status_code == 404


def test_delete_contacts_removes_them_entirely(api: Api, box: Sandbox) -> None:
    list_id = box.create_list("L")
    upsert_done(api, contacts_of(3), [list_id])
    ids = _ids(api, ["user0@example.com"])
    resp = api("DELETE", f"/v3/marketing/contacts?ids={ids[0]}")
    assert resp.status_code == 202
    assert api.wait_job(resp.json()["job_id"])["results"]["deleted_count"] == 1
    assert api("GET", "/v3/marketing/contacts/count").json()["contact_count"] == 2
    assert box.list_emails(list_id) == ["user1@example.com", "user2@example.com"]
    assert api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["user0@example.com"]}).status_code == 404
    assert upsert_done(api, contacts_of(1))["results"]["created_count"] == 1  # re-adding creates it anew
    assert api("DELETE", "/v3/marketing/contacts").status_code == 400


def test_unknown_paths_and_methods(api: Api) -> None:
    assert api("GET", "/v3/marketing/nope").status_code == 404
    assert api("PATCH", "/v3/marketing/contacts").status_code == 405


# -------------------------------------------------------------------------------------- control API over HTTP


def test_control_api_stats_faults_keys_reset_and_list_emails(api: Api, box: Sandbox, srv: SandboxServer) -> None:
    list_id = box.create_list("L")
    upsert_done(api, contacts_of(2), [list_id])
    control = f"{srv.url}/_sandbox"
    emails = requests.get(f"{control}/lists/{list_id}/emails", timeout=10).json()
    assert emails == {"list_id": list_id, "emails": ["user0@example.com", "user1@example.com"]}
    assert requests.get(f"{control}/lists/{uuid.uuid4()}/emails", timeout=10).status_code == 404
    stats = requests.get(f"{control}/stats", timeout=10).json()
    assert stats["requests"]["PUT /v3/marketing/contacts"] == 1 and stats["upsert_contacts_received"] == 2
    assert stats["bytes_received"] >= stats["max_body_bytes"] > 0
    fault = {"endpoint": "GET /v3/marketing/contacts/count", "kind": "503"}
    assert requests.post(f"{control}/faults", json=fault, timeout=10).status_code == 200
    assert api("GET", "/v3/marketing/contacts/count").status_code == 503
    assert requests.post(f"{control}/faults", json={"kind": "nope"}, timeout=10).status_code == 400
    rotated = requests.post(f"{control}/keys", json={"keys": [OTHER_KEY]}, timeout=10)
    assert rotated.status_code == 200 and OTHER_KEY not in rotated.text
    assert api("GET", "/v3/marketing/contacts/count").status_code == 401
    assert Api(srv.url, OTHER_KEY)("GET", "/v3/marketing/contacts/count").status_code == 200
    assert requests.post(f"{control}/reset", timeout=10).status_code == 200
    assert box.contact_count() == 0 and box.stats["upsert_contacts_received"] == 0


# ---------------------------------------------------------------------------------------------- Python API, CLI


def test_python_api_fields_lists_keys_and_repr() -> None:
    box = Sandbox([KEY])
    assert [box.create_field("a", "Text"), box.create_field("b", "Number"), box.create_field("c", "Date")] == \
        ["e1_T", "e2_N", "e3_D"]
    with pytest.raises(ValueError):
        box.create_field("A", "Text")
    with pytest.raises(ValueError):
        box.create_field("d", "Bool")
    fixed = str(uuid.uuid4())
    assert box.create_list("L", fixed) == fixed
    with pytest.raises(ValueError):
        box.create_list("again", fixed)
    with pytest.raises(ValueError):
        box.rotate_keys([])
    assert KEY not in repr(box) and box.contact("x@example.com") is None
    assert box.list_emails(fixed) == [] and box.contact_count() == 0


def test_main_without_the_key_in_the_environment_fails_clearly(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SANDBOX_TEST_KEY", raising=False)
    assert main(["--api-key-env", "SANDBOX_TEST_KEY"]) == 2
    assert "SANDBOX_TEST_KEY" in capsys.readouterr().err


def test_main_refuses_a_negative_latency(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SANDBOX_TEST_KEY", KEY)
    assert main(["--api-key-env", "SANDBOX_TEST_KEY", "--latency", "-1"]) == 2
    err = capsys.readouterr().err
    assert "latency" in err and KEY not in err


def test_main_serves_until_sigterm_and_never_prints_the_key() -> None:
    list_id = str(uuid.uuid4())
    env = {**os.environ, "SENDGRID_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--list-id", list_id, "--list-name", "Demo",
                             "--field", "tier:Text", "--job-delay", "0", "--latency", "0.05"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        sent = time.monotonic()
        got = Api(url)("GET", f"/v3/marketing/lists/{list_id}")
        assert time.monotonic() - sent >= 0.05  # --latency reached the server (a lower bound)
        assert got.status_code == 200 and got.json()["name"] == "Demo"
        fields = Api(url)("GET", "/v3/marketing/field_definitions").json()["custom_fields"]
        assert fields == [{"id": "e1_T", "name": "tier", "field_type": "Text"}]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert KEY not in out + err


# ---------------------------------------------------------------------------------- contract on all responses


def test_every_documented_answer_the_tests_saw_matches_the_contract(api: Api, box: Sandbox) -> None:
    """A compact walk through the main flow, each answer checked by Api against the spec (see check_response)."""
    list_id = api("POST", "/v3/marketing/lists", {"name": "Flow"}).json()["id"]
    field_id = api("POST", "/v3/marketing/field_definitions", {"name": "ltv", "field_type": "Number"}).json()["id"]
    contacts = [{"email": f"flow{i}@example.com", "first_name": "F", "custom_fields": {field_id: i}} for i in range(3)]
    job = upsert_done(api, copy.deepcopy(contacts), [list_id])
    assert job["status"] == "completed"
    api("GET", "/v3/marketing/lists")
    api("GET", f"/v3/marketing/lists/{list_id}")
    api("GET", f"/v3/marketing/lists/{list_id}/contacts/count")
    api("GET", "/v3/marketing/contacts/count")
    api("GET", "/v3/marketing/field_definitions")
    found = api("POST", "/v3/marketing/contacts/search/emails", {"emails": ["flow0@example.com"]})
    contact = found.json()["result"]["flow0@example.com"]["contact"]
    assert contact["custom_fields"] == {"ltv": 0}  # the API shows custom fields by name
    job_id = api("DELETE", f"/v3/marketing/contacts?ids={contact['id']}").json()["job_id"]
    assert api.wait_job(job_id)["status"] == "completed"


# ---------------------------------------------------------------------------------------------- realistic profile


class FakeClock:
    """The time module as the sandbox module sees it, with time() set by the test: jobs come due when it says."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return self.now


def test_realistic_jobs_take_seeded_random_times_and_apply_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = 10.0, 20.0
    # A seed whose second draw is the shorter: without ordering, the second job would apply before the first.
    seed = next(s for s in range(1000) if (r := random.Random(s)).uniform(low, high) > r.uniform(low, high))
    draws = random.Random(seed)
    first, second = draws.uniform(low, high), draws.uniform(low, high)
    clock = FakeClock()
    monkeypatch.setattr(sandbox_module, "time", clock)
    box = Sandbox([KEY], job_delay=0.0, profile=Profile(job_seconds=(low, high), seed=seed))
    assert box.seed == seed
    with serve(box) as server:
        api = Api(server.url)
        jobs = [api.upsert([{"email": "ann@example.com", "first_name": name}]).json()["job_id"] for name in "AB"]
        clock.now += second + 0.01  # the second job's own time is up, the first one's is not
        assert [api.job(j)["status"] for j in jobs] == ["pending", "pending"]
        assert box.contact("ann@example.com") is None
        clock.now += first - second
        assert [api.job(j)["status"] for j in jobs] == ["completed", "completed"]
        ann = box.contact("ann@example.com")
        assert ann is not None and ann["first_name"] == "B"  # applied in the order they were accepted


def test_realistic_profile_refuses_a_bad_range_and_records_its_seed() -> None:
    for bad in ((2.0, 1.0), (-1.0, 1.0), (0.0, math.inf)):
        with pytest.raises(ValueError, match="job_seconds"):
            Profile(job_seconds=bad)
    unseeded = Sandbox([KEY], profile=Profile(job_seconds=(1.0, 2.0)))
    replay = Sandbox([KEY], profile=Profile(job_seconds=(1.0, 2.0), seed=unseeded.seed))
    assert [unseeded._rng.random() for _ in range(3)] == [replay._rng.random() for _ in range(3)]


def test_realistic_search_lists_and_counts_lag_until_each_job_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upserts, list removals and deletions all stay pending (visible through imports/{id}) and change nothing a
    client can see until they complete: the races of issue 11 (an erasure or a mirror lookup during a pending
    upsert finds nobody)."""
    clock = FakeClock()
    monkeypatch.setattr(sandbox_module, "time", clock)
    box = Sandbox([KEY], profile=Profile(job_seconds=(5.0, 5.0)))
    with serve(box) as server:
        api = Api(server.url)
        list_id = box.create_list("L")
        counts = (f"/v3/marketing/lists/{list_id}/contacts/count", "/v3/marketing/contacts/count")
        upsert = api.upsert(contacts_of(2), [list_id]).json()["job_id"]
        search = {"emails": ["user0@example.com", "user1@example.com"]}
        assert api("POST", "/v3/marketing/contacts/search/emails", search).status_code == 404
        assert [api("GET", path).json()["contact_count"] for path in counts] == [0, 0]
        assert api.job(upsert)["status"] == "pending" and not box.jobs_final()
        clock.now += 5.0
        assert api.job(upsert)["status"] == "completed" and box.jobs_final()
        assert [api("GET", path).json()["contact_count"] for path in counts] == [2, 2]
        kept, deleted = _ids(api, ["user0@example.com", "user1@example.com"])
        removal = api("DELETE", f"/v3/marketing/lists/{list_id}/contacts?contact_ids={kept}").json()["job_id"]
        deletion = api("DELETE", f"/v3/marketing/contacts?ids={deleted}").json()["job_id"]
        assert [api.job(j)["status"] for j in (removal, deletion)] == ["pending", "pending"]
        assert [j["id"] for j in box.pending_jobs()] == [removal, deletion]
        assert requests.get(f"{server.url}/_sandbox/jobs", timeout=10).json()["pending"] == box.pending_jobs()
        assert box.list_emails(list_id) == ["user0@example.com", "user1@example.com"]  # nothing applied yet
        assert api("POST", "/v3/marketing/contacts/search/emails", search).status_code == 200
        clock.now += 5.0
        assert [api.job(j)["results"]["deleted_count"] for j in (removal, deletion)] == [1, 1]
        assert box.list_emails(list_id) == [] and box.contact_count() == 1 and box.jobs_final()


def test_realistic_fixture_jobs_finish_by_themselves_in_order(realistic_sg: Any) -> None:
    box, api = realistic_sg.box, Api(realistic_sg.url, realistic_sg.key)
    list_id = box.create_list("L")
    jobs = [api.upsert([{"email": "ann@example.com", "first_name": name}], [list_id]).json()["job_id"]
            for name in "ABC"]
    box.wait_for_jobs(timeout=30)
    assert box.jobs_final() and [api.job(j)["status"] for j in jobs] == ["completed"] * 3
    finished = [api.job(j)["finished_at"] for j in jobs]
    assert finished == sorted(finished)
    assert box.contact("ann@example.com")["first_name"] == "C"  # type: ignore[index]


def test_realistic_fixture_holds_updates_to_the_identifier_rule(realistic_sg: Any) -> None:
    box, api = realistic_sg.box, Api(realistic_sg.url, realistic_sg.key)
    api.upsert([{"email": "ann@example.com", "external_id": "crm-1"}])
    box.wait_for_jobs(timeout=30)
    job_id = api.upsert([{"email": "ann@example.com", "first_name": "Ann"}]).json()["job_id"]
    box.wait_for_jobs(timeout=30)
    job = api.job(job_id)
    assert job["status"] == "failed" and "external_id" in _error_rows(job)[0]["error"]


def test_wait_for_jobs_names_what_is_still_pending() -> None:
    box = Sandbox([KEY], profile=Profile(job_seconds=(3600.0, 3600.0)))
    with serve(box) as server:
        job_id = Api(server.url).upsert(contacts_of(1)).json()["job_id"]
        with pytest.raises(TimeoutError, match=f"1 job.*{job_id}"):
            box.wait_for_jobs(timeout=0.05)
    assert box.complete_jobs() == 1 and box.jobs_final()


@pytest.mark.parametrize("profile", [Profile(), Profile(job_seconds=(5.0, 5.0))], ids=["default", "job_seconds"])
def test_held_jobs_stay_pending_past_their_time_until_released_or_completed(profile: Profile,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """hold_jobs() lets a test say what a client sees while its jobs are pending, whatever the profile's job times."""
    clock = FakeClock()
    monkeypatch.setattr(sandbox_module, "time", clock)
    box = Sandbox([KEY], job_delay=0.05, profile=profile)
    with serve(box) as server:
        api = Api(server.url)
        box.hold_jobs()
        first = api.upsert(contacts_of(1)).json()["job_id"]
        clock.now += 3600.0
        assert api.job(first)["status"] == "pending" and box.contact_count() == 0 and not box.jobs_final()
        with pytest.raises(RuntimeError, match="held"):
            box.wait_for_jobs(timeout=0.05)
        assert box.complete_jobs() == 1 and api.job(first)["status"] == "completed"  # a forced finish still works
        second = api.upsert(contacts_of(2)).json()["job_id"]
        clock.now += 3600.0
        assert api.job(second)["status"] == "pending"  # still held
        box.release_jobs()
        assert api.job(second)["status"] == "completed" and box.contact_count() == 2 and box.jobs_final()


def _error_rows(job: dict[str, Any]) -> list[dict[str, str]]:
    errors = requests.get(job["results"]["errors_url"], timeout=10)
    assert errors.status_code == 200
    return list(csv.DictReader(io.StringIO(errors.text)))


def test_strict_identifiers_an_update_must_carry_every_existing_identifier() -> None:
    box = Sandbox([KEY], job_delay=0.0, profile=Profile(strict_identifiers=True))
    with serve(box) as server:
        api = Api(server.url)
        upsert_done(api, [{"email": "ann@example.com", "external_id": "ext-1", "first_name": "Ann"},
                          {"email": "bob@example.com"}, {"external_id": "ext-9"}])
        job = upsert_done(api, [{"email": "ann@example.com", "first_name": "Changed"},
                                {"email": "bob@example.com", "first_name": "Bob"}])
        assert (job["status"], job["results"]["errored_count"], job["results"]["updated_count"]) == ("errored", 1, 1)
        [row] = _error_rows(job)
        assert (row["index"], row["email"]) == ("0", "ann@example.com")
        assert "all of its existing identifiers must be present" in row["error"] and "external_id" in row["error"]
        assert box.contact("ann@example.com")["first_name"] == "Ann"  # type: ignore[index]
        assert upsert_done(api, [{"email": "ann@example.com", "external_id": "ext-1", "first_name": "Changed"}]
                           )["results"]["updated_count"] == 1
        only_ext = upsert_done(api, [{"external_id": "ext-1", "first_name": "X"}])
        assert only_ext["status"] == "failed" and "email" in _error_rows(only_ext)[0]["error"]
        two = upsert_done(api, [{"email": "bob@example.com", "external_id": "ext-9"}])
        assert two["status"] == "failed" and "name different contacts" in _error_rows(two)[0]["error"]
        added = upsert_done(api, [{"email": "bob@example.com", "anonymous_id": "anon-2"}])  # a new identifier
        assert added["status"] == "completed" and added["results"]["updated_count"] == 1
        plain = upsert_done(api, [{"email": "ann@example.com"}, {"email": "new@example.com"}])  # the batch path
        assert (plain["status"], plain["results"]["errored_count"], plain["results"]["created_count"]) == (
            "errored", 1, 1)
        start = _start_import(api, [_reserved_ids(api)["email"]], [])
        assert _upload(start, b"email\nann@example.com\ncat@example.com\n").status_code == 200
        imported = api.wait_job(start["job_id"])
        assert (imported["status"], imported["results"]["created_count"]) == ("errored", 1)
        assert [(r["line"], r["email"]) for r in _error_rows(imported)] == [("2", "ann@example.com")]
        assert box.contact("ann@example.com")["first_name"] == "Changed"  # type: ignore[index]


def test_default_profile_still_lets_an_update_leave_out_an_identifier(api: Api, box: Sandbox) -> None:
    upsert_done(api, [{"email": "ann@example.com", "external_id": "ext-1"}])
    assert upsert_done(api, [{"email": "ann@example.com", "first_name": "Ann"}])["status"] == "completed"


def test_contact_limit_fails_the_job_that_would_pass_it_with_sendgrids_message() -> None:
    box = Sandbox([KEY], job_delay=0.0, contact_limit=3)
    with serve(box) as server:
        api = Api(server.url)
        assert upsert_done(api, contacts_of(2))["status"] == "completed"
        at_cap = upsert_done(api, contacts_of(2, start=1))  # one of them exists: 3 stored, the cap itself
        assert (at_cap["status"], at_cap["results"]["created_count"]) == ("completed", 1)
        over = upsert_done(api, [{"email": "user0@example.com", "first_name": "Zero"}, *contacts_of(2, start=3)])
        assert (over["status"], over["results"]["errored_count"], over["results"]["created_count"]) == (
            "failed", 3, 0)
        assert {r["error"] for r in _error_rows(over)} == {sandbox_module.CONTACT_LIMIT_MESSAGE}
        assert box.contact_count() == 3 and "first_name" not in box.contact("user0@example.com")  # type: ignore[operator]
        assert upsert_done(api, [{"email": "user0@example.com", "first_name": "Zero"}])["status"] == "completed"
        start = _start_import(api, [_reserved_ids(api)["email"]], [])
        assert _upload(start, b"email\nuser1@example.com\nuser7@example.com\n").status_code == 200
        imported = api.wait_job(start["job_id"])
        assert (imported["status"], imported["results"]["errored_count"]) == ("failed", 2)
        [gone] = _ids(api, ["user2@example.com"])
        api.wait_job(api("DELETE", f"/v3/marketing/contacts?ids={gone}").json()["job_id"])
        assert upsert_done(api, contacts_of(1, start=9))["status"] == "completed"  # a stored-contact cap: room again
    with pytest.raises(ValueError, match="contact_limit"):
        Sandbox([KEY], contact_limit=-1)



# ------------------------------------------------------------------------------------------- every 400, by census

IMPORTS = "/v3/marketing/contacts/imports"
SEARCH = "/v3/marketing/contacts/search/emails"
# One request per place the Sandbox class answers 400 (test_the_400_census_covers_every_400_site counts them), with
# a piece of the message it must carry. Bodies go raw: several break the request schema on purpose.
CENSUS_400: list[tuple[str, str, Any, str]] = [
    ("PUT", "/v3/marketing/contacts", [], "must be a JSON object"),
    ("PUT", "/v3/marketing/contacts", {"contacts": []}, "contacts must be an array of 1 to 30000"),
    ("PUT", "/v3/marketing/contacts", {"contacts": [{"email": "a@example.com"}], "list_ids": "L"}, "list_ids"),
    ("PUT", "/v3/marketing/contacts", {"contacts": [{"email": "nope"}]}, "email 'nope' is not valid"),
    ("PUT", IMPORTS, 5, "must be a JSON object"),
    ("PUT", IMPORTS, {"file_type": "json", "field_mappings": ["_rf2_T"]}, "file_type must be 'csv'"),
    ("PUT", IMPORTS, {"file_type": "csv", "field_mappings": "_rf2_T"}, "field_mappings must be"),
    ("PUT", IMPORTS, {"file_type": "csv", "field_mappings": ["_rf2_T"], "list_ids": [1]}, "list_ids"),
    ("PUT", IMPORTS, {"file_type": "csv", "field_mappings": ["_rf2_T", "_rf21_D"]}, "'_rf21_D' is not a writable"),
    ("PUT", IMPORTS, {"file_type": "csv", "field_mappings": ["_rf2_T", "_rf2_T"]}, "mapped to one column only"),
    ("PUT", IMPORTS, {"file_type": "csv", "field_mappings": ["_rf0_T"]}, "at least one identifier"),
    ("POST", "/v3/marketing/field_definitions", None, "must be a JSON object"),
    ("POST", "/v3/marketing/field_definitions", {"name": "email", "field_type": "Text"}, "reserved field name"),
    ("GET", "/v3/marketing/lists?page_size=ten", None, "page_size must be a number"),
    ("GET", "/v3/marketing/lists?page_size=1001", None, "page_size must be a number from 1 to 1000"),
    ("POST", "/v3/marketing/lists", [], "must be a JSON object"),
    ("POST", "/v3/marketing/lists", {"name": ""}, "name must be a string of 1 to 100"),
    ("DELETE", "/v3/marketing/lists/{list_id}/contacts", None, "contact_ids is required"),
    ("DELETE", "/v3/marketing/contacts", None, "set either ids"),
    ("POST", SEARCH, {"emails": "a@example.com"}, "emails must be an array"),
    ("POST", SEARCH, {"emails": [f"u{i}@example.com" for i in range(101)]}, "at most 100 emails"),
    ("POST", SEARCH, {"emails": [""]}, "at least one email address"),
    ("POST", SEARCH, {"emails": ["nope"]}, "email 'nope' is not valid"),
]


@pytest.mark.parametrize(("method", "path", "body", "needle"), CENSUS_400)
def test_every_400_the_sandbox_sends_has_sendgrids_error_shape(api: Api, box: Sandbox, method: str, path: str,
                                                               body: Any, needle: str) -> None:
    path = path.format(list_id=box.create_list("L"))
    data = None if body is None else orjson.dumps(body)
    resp = api(method, path, data=data, headers={"Content-Type": "application/json"})  # checks SENDGRID_400 too
    assert resp.status_code == 400, resp.text
    assert any(needle in error["message"] for error in resp.json()["errors"]), resp.text


def test_the_400_census_covers_every_400_site() -> None:
    """A new `return 400, ...` in the Sandbox class must get its row in CENSUS_400 (and so its shape checked)."""
    tree = ast.parse(Path(sandbox_module.__file__).read_text(encoding="utf-8"))
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Sandbox"]
    sites = [node.lineno for node in ast.walk(cls) if isinstance(node, ast.Tuple) and node.elts
             and isinstance(node.elts[0], ast.Constant) and node.elts[0].value == 400]
    assert len(sites) == len(CENSUS_400), f"400 answers at lines {sites}: one CENSUS_400 row each"


def test_main_realistic_options_reach_the_server() -> None:
    env = {**os.environ, "SENDGRID_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--realistic", "--job-seconds", "0.05:0.1",
                             "--seed", "5", "--contact-limit", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "seed 5"
        api = Api(url)
        assert upsert_done(api, [{"email": "ann@example.com", "external_id": "ext-1"}])["status"] == "completed"
        assert upsert_done(api, [{"email": "ann@example.com"}])["status"] == "failed"  # the identifier rule
        assert upsert_done(api, contacts_of(2))["status"] == "failed"  # 3 contacts would pass the limit of 2
        assert requests.get(f"{url}/_sandbox/jobs", timeout=10).json() == {"pending": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


@pytest.mark.parametrize(("args", "needle"), [(["--job-seconds", "3:1"], "job_seconds"),
                                              (["--job-seconds", "fast"], "MIN:MAX"),
                                              (["--contact-limit", "-1"], "contact_limit")])
def test_main_refuses_bad_realistic_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            args: list[str], needle: str) -> None:
    monkeypatch.setenv("SANDBOX_TEST_KEY", KEY)
    try:
        code = main(["--api-key-env", "SANDBOX_TEST_KEY", *args])
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    assert code == 2 and needle in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ network profile


def test_bandwidth_link_books_chunks_first_come_first_served() -> None:
    now = 100.0
    link = sandbox_module._Link(1_000.0, clock=lambda: now)
    assert link.book(500) == 100.5
    assert link.book(500) == 101.0  # a second body at the same moment waits behind the first: one shared link
    now = 200.0
    assert link.book(100) == pytest.approx(200.1)  # an idle link carries at once
    assert link.bytes == 1_100


def test_bandwidth_link_is_shared_by_concurrent_readers_without_double_booking() -> None:
    link = sandbox_module._Link(1_000_000.0, clock=lambda: 0.0)
    start = threading.Barrier(8)

    def reader(_: int) -> list[float]:
        start.wait(timeout=30)
        return [link.book(1_000) for _ in range(125)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ends = [end for booked in pool.map(reader, range(8)) for end in booked]
    # 8 readers x 125 chunks of 1,000 bytes at 1 MB/s: every chunk has its own millisecond, the last ends at 1 s.
    assert sorted(ends) == pytest.approx([(i + 1) / 1_000 for i in range(1_000)])


def test_bandwidth_cap_carries_every_body_byte_over_the_link() -> None:
    """Every body byte (upsert, chunked upload) is booked on the link; how long that takes is the schedule's business
    (above) and the benchmarks' to measure, never asserted here."""
    box = Sandbox([KEY], job_delay=0.0, bandwidth_mbit=80.0)  # 10 MB/s
    assert box.link is not None and box.link.bytes_per_s == 10_000_000
    with serve(box) as server:
        api = Api(server.url)
        assert put_raw(api, contacts_of(2_000)).status_code == 202
        start = _start_import(api, [_reserved_ids(api)["email"]], [])
        body = ("email\n" + "".join(f"u{i}@example.com\n" for i in range(5_000))).encode()
        assert _upload(start, iter([body[:70_000], body[70_000:]])).status_code == 200  # chunked
    assert box.link.bytes == box.stats["bytes_received"] > len(body)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="bandwidth_mbit"):
            Sandbox([KEY], bandwidth_mbit=bad)


# ------------------------------------------------------------------------------------------- upload URL faults

UPLOAD = sandbox_module.UPLOAD_TEMPLATE
CSV_BODY = b"email\nann@example.com\nbob@example.com\n"


@pytest.mark.parametrize(("kind", "status"), [("500", 500), ("503", 503)])
def test_upload_fault_5xx_keeps_nothing_and_the_upload_can_be_sent_again(api: Api, box: Sandbox, kind: str,
                                                                         status: int) -> None:
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    box.inject({"endpoint": UPLOAD, "kind": kind})
    refused = _upload(start, CSV_BODY)
    assert refused.status_code == status and refused.headers["Content-Type"] == "text/plain"
    assert api.job(start["job_id"])["status"] == "pending" and box.stats["import_rows_received"] == 0
    assert _upload(start, CSV_BODY).status_code == 200
    assert api.wait_job(start["job_id"])["results"]["created_count"] == 2
    assert box.stats["faults_fired"] == 1 and box.stats["status_counts"][str(status)] == 1


def test_upload_fault_reset_after_storing_loses_the_answer_and_a_resend_gets_409(api: Api, box: Sandbox) -> None:
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    box.inject({"endpoint": UPLOAD, "kind": "reset", "processed": True})
    with pytest.raises(requests.ConnectionError):
        _upload(start, CSV_BODY)
    assert _upload(start, CSV_BODY).status_code == 409  # the file is there: sending it again is refused
    assert api.wait_job(start["job_id"])["results"]["created_count"] == 2
    assert box.stats["import_rows_received"] == 2


def test_upload_fault_reset_before_reading_keeps_nothing(api: Api, box: Sandbox) -> None:
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    box.inject({"endpoint": UPLOAD, "kind": "reset"})
    with pytest.raises(requests.ConnectionError):
        _upload(start, CSV_BODY * 20_000)  # large enough that the client is still sending when the reset comes
    assert api.job(start["job_id"])["status"] == "pending" and box.stats["import_rows_received"] == 0
    assert _upload(start, CSV_BODY).status_code == 200


def test_upload_faults_are_armed_only_by_name_and_only_with_storage_kinds(api: Api, box: Sandbox) -> None:
    start = _start_import(api, [_reserved_ids(api)["email"]], [])
    box.inject({"endpoint": "*", "kind": "500"})  # every API endpoint; the upload URL is another host
    assert _upload(start, CSV_BODY).status_code == 200
    assert api("GET", "/v3/marketing/contacts/count").status_code == 500  # the fault was still armed
    box.inject({"endpoint": UPLOAD, "kind": "slow", "delay": 0.01})
    assert _upload(start, CSV_BODY).status_code == 409 and box.stats["faults_fired"] == 2
    for bad in ("429", "401", "403"):
        with pytest.raises(ValueError, match="upload fault kind"):
            box.inject({"endpoint": UPLOAD, "kind": bad})

"""The destinations file: what is accepted, the defaults, and errors that name the file, destination and field."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from shared import limits
from shared.config import Config, Destination, load_config, parse_config
from shared.errors import ConfigError

ORIGIN = "destinations.json"

EXAMPLE: dict[str, Any] = {
    "name": "vip-newsletter",
    "display_name": "VIP newsletter",
    "enabled": True,
    "consent": True,
    "api_key_secret": "sendgrid-api-key",
    "list_id": "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10",
    "segments": ["HighValueSegment"],
    "mapping": {"email": "EmailAddress", "first_name": "FirstName", "last_name": "LastName", "country": "Country",
                "state_province_region": "State", "city": "City", "postal_code": "PostalCode"},
    "custom_fields": {"lifetime_value": "LifetimeValue"},
    "mode": "upsert",
    "max_profiles": 100000,
    "region": "global",
}
MINIMAL: dict[str, Any] = {
    "name": "minimal",
    "api_key_secret": "sg-key",
    "list_id": "11111111-2222-3333-4444-555555555555",
    "segments": ["Seg"],
    "mapping": {"email": "Email"},
}


def doc(*destinations: dict[str, Any]) -> str:
    return json.dumps({"destinations": list(destinations)})


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def without(base: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    del out[key]
    return out


def only_error(config: Config, key: str) -> ConfigError:
    assert key not in config.destinations
    assert set(config.errors) == {key}
    return config.errors[key]


# --- valid files -----------------------------------------------------------------------------------------------


def test_example_destination_is_parsed_exactly() -> None:
    config = parse_config(doc(EXAMPLE), ORIGIN)
    assert config.origin == ORIGIN
    assert dict(config.errors) == {}
    d = config.destinations["vip-newsletter"]
    assert d.display_name == "VIP newsletter"
    assert d.enabled is True and d.consent is True
    assert d.api_key_secret == "sendgrid-api-key"
    assert d.list_id == "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"
    assert d.segments == ("HighValueSegment",)
    assert dict(d.mapping) == EXAMPLE["mapping"]
    assert dict(d.custom_fields) == {"lifetime_value": "LifetimeValue"}
    assert (d.mode, d.max_profiles, d.region) == ("upsert", 100000, "global")
    assert d.max_removal_fraction == 0.5
    assert d.bulk_threshold == limits.BULK_THRESHOLD_DEFAULT


def test_defaults_for_optional_fields() -> None:
    d = parse_config(doc(MINIMAL), ORIGIN).destinations["minimal"]
    assert d.display_name == "minimal"
    assert d.enabled is True
    assert d.consent is False  # missing consent is "no consent": the engine refuses to run it
    assert dict(d.custom_fields) == {}
    assert d.mode == "upsert"
    assert d.max_profiles == 100_000
    assert d.region == "global"
    assert d.max_removal_fraction == 0.5
    assert d.bulk_threshold == limits.BULK_THRESHOLD_DEFAULT
    assert d.schedule is None and d.on_new_export is True  # a new export runs it at once; no schedule of its own


def test_explicit_optional_values() -> None:
    raw = with_(MINIMAL, consent=False, enabled=False, mode="mirror", max_profiles=None, region="eu",
                max_removal_fraction=1, bulk_threshold=None, schedule="0  30 6 * * Mon-Fri", on_new_export=False)
    d = parse_config(doc(raw), ORIGIN).destinations["minimal"]
    assert d.consent is False and d.enabled is False  # both valid config; running is the engine's call
    assert d.mode == "mirror" and d.max_profiles is None and d.region == "eu"
    assert d.max_removal_fraction == 1.0 and isinstance(d.max_removal_fraction, float)
    assert d.bulk_threshold is None
    assert d.schedule == "0 30 6 * * Mon-Fri" and d.on_new_export is False  # the expression as the timer reads it


def test_exactly_as_many_custom_fields_as_sendgrid_allows_are_accepted() -> None:
    fields = {f"f{i}": f"Col{i}" for i in range(limits.MAX_CUSTOM_FIELDS)}  # 500: the limit itself is allowed
    d = parse_config(doc(with_(MINIMAL, custom_fields=fields)), ORIGIN).destinations["minimal"]
    assert dict(d.custom_fields) == fields


def test_list_id_is_normalised_to_lower_case() -> None:
    raw = with_(MINIMAL, list_id="0D7F6B1C-2A7E-4C55-9A61-3C1F6E1B2A10")
    assert parse_config(doc(raw), ORIGIN).destinations["minimal"].list_id == "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"


def test_public_settings_are_json_ready_and_complete() -> None:
    d = parse_config(doc(EXAMPLE), ORIGIN).destinations["vip-newsletter"]
    public = d.public()
    assert json.loads(json.dumps(public)) == public
    assert set(public) == {f.name for f in dataclasses.fields(Destination)}
    expected = with_(EXAMPLE, max_removal_fraction=0.5, bulk_threshold=limits.BULK_THRESHOLD_DEFAULT,
                     full_resync_days=7, max_in_flight=2, schedule=None, on_new_export=True, id_column=None)
    assert public == expected


def test_destination_is_immutable() -> None:
    d = parse_config(doc(EXAMPLE), ORIGIN).destinations["vip-newsletter"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.consent = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        d.mapping["email"] = "Other"  # type: ignore[index]
    config = parse_config(doc(EXAMPLE), ORIGIN)
    with pytest.raises(TypeError):
        config.destinations["x"] = d  # type: ignore[index]


def test_bytes_with_bom_and_empty_destination_list() -> None:
    config = parse_config(b"\xef\xbb\xbf" + doc(MINIMAL).encode(), ORIGIN)
    assert list(config.destinations) == ["minimal"]
    empty = parse_config(b'{"destinations": []}', ORIGIN)
    assert dict(empty.destinations) == {} and dict(empty.errors) == {}


def test_load_config_reads_a_real_file(tmp_path) -> None:
    path = tmp_path / "destinations.json"
    path.write_text(doc(EXAMPLE, MINIMAL), encoding="utf-8")
    config = load_config(path)
    assert config.origin == str(path)
    assert list(config.destinations) == ["vip-newsletter", "minimal"]


def test_load_config_missing_file_names_it(tmp_path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_load_config_directory_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.file == str(tmp_path)


# --- file-level problems -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ('{"destinations": [', "not valid JSON"),
        ('{"destinations": []}\n{', "line 2"),
        ("[]", "must be a JSON object"),
        ('{"destinations": {}}', "must be a list"),
        ('{"destinations": null}', "must be a list"),
        ("{}", "must be a list"),
        ('{"destinations": [], "extra": 1}', "unknown top-level key 'extra'"),
        ('{"destinations": [{"name": "a", "name": "b"}]}', "duplicate key 'name'"),
        ('{"destinations": [{"name": "a", "max_removal_fraction": NaN}]}', "NaN"),
        (b'{"destinations": ["\xff"]}', "not UTF-8"),
    ],
)
def test_file_level_problems_raise(data: str | bytes, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, ORIGIN)
    assert info.value.file == ORIGIN
    assert str(info.value).startswith(ORIGIN)
    assert needle in str(info.value)


def test_duplicate_destination_names_are_a_file_level_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(MINIMAL, EXAMPLE, with_(MINIMAL, display_name="again")), ORIGIN)
    err = info.value
    assert (err.file, err.destination, err.field) == (ORIGIN, "minimal", "name")
    assert "#0" in str(err) and "#2" in str(err)


# --- destination-level problems ----------------------------------------------------------------------------------

BAD_FIELDS = [
    # (field, bad value or MISSING, text the message must contain)
    ("display_name", "", "non-empty string"),
    ("display_name", 5, "non-empty string"),
    ("enabled", "yes", "true or false"),
    ("enabled", 1, "true or false"),
    ("consent", "true", "true or false"),
    ("consent", None, "true or false"),
    ("consent", 0, "true or false"),
    ("api_key_secret", "MISSING", "is required"),
    ("api_key_secret", "my_secret", "Key Vault secret name"),
    ("api_key_secret", "x" * 128, "Key Vault secret name"),
    ("api_key_secret", "SG.abc", "looks like an API key"),
    ("list_id", "MISSING", "is required"),
    ("list_id", "12345", "UUID"),
    ("list_id", "0d7f6b1c2a7e4c559a613c1f6e1b2a10", "UUID"),
    ("list_id", 12345, "UUID"),
    ("list_id", "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10\n", "UUID"),
    ("api_key_secret", "sendgrid-api-key\n", "Key Vault secret name"),
    ("segments", "MISSING", "is required"),
    ("segments", [], "non-empty list"),
    ("segments", "HighValueSegment", "non-empty list"),
    ("segments", ["A", ""], "non-empty string"),
    ("segments", ["A", 3], "non-empty string"),
    ("segments", ["A", "A"], "listed twice"),
    ("mapping", "MISSING", "is required"),
    ("mapping", ["email"], "must be an object"),
    ("mapping", {"first_name": "FirstName"}, "'email' is required"),
    ("mapping", {"email": ""}, "source column"),
    ("mapping", {"email": "E", "city": 7}, "source column"),
    ("mapping", {"email": "E", "phone_number": "P"}, "allowed fields are"),
    ("custom_fields", ["x"], "must be an object"),
    ("custom_fields", {"1st": "C"}, "custom field name"),
    ("custom_fields", {"has space": "C"}, "custom field name"),
    ("custom_fields", {"trailing\n": "C"}, "custom field name"),
    ("custom_fields", {"x" * 101: "C"}, "custom field name"),
    ("custom_fields", {"ok": ""}, "source column"),
    ("custom_fields", {"First_Name": "C"}, "reserved"),
    ("custom_fields", {"Score": "A", "score": "B"}, "same SendGrid field"),
    ("custom_fields", {"score": "A", "Score": "B"}, "same SendGrid field"),  # whichever spelling comes first
    ("custom_fields", {f"f{i}": "C" for i in range(limits.MAX_CUSTOM_FIELDS + 1)}, "at most 500"),
    ("mode", "sync", "'upsert', 'mirror'"),
    ("mode", None, "'upsert', 'mirror'"),
    ("mode", ["upsert"], "'upsert', 'mirror'"),
    ("max_profiles", 0, "positive whole number"),
    ("max_profiles", -5, "positive whole number"),
    ("max_profiles", 10.5, "positive whole number"),
    ("max_profiles", True, "positive whole number"),
    ("max_profiles", "100", "positive whole number"),
    ("region", "us", "'global', 'eu'"),
    ("max_removal_fraction", 0, "greater than 0 and at most 1"),
    ("max_removal_fraction", 1.01, "greater than 0 and at most 1"),
    ("max_removal_fraction", True, "greater than 0 and at most 1"),
    ("max_removal_fraction", "0.5", "greater than 0 and at most 1"),
    ("bulk_threshold", 0, "positive whole number"),
    ("bulk_threshold", False, "positive whole number"),
    ("schedule", "0 6 * * *", "six-field NCRONTAB schedule in UTC: '0 6 * * *' has 5 field(s)"),
    ("schedule", "0 0 25 * * *", "hour field: 25 is outside 0-23"),
    ("schedule", "0 0 0 30 2 *", "would never run"),
    ("schedule", "", "has 0 field(s)"),
    ("schedule", 5, "must be a string"),
    ("on_new_export", "false", "true or false"),
    ("on_new_export", None, "true or false"),
    ("surprise", 1, "unknown field 'surprise'; known fields are name, display_name"),
]


@pytest.mark.parametrize(("field", "value", "needle"), BAD_FIELDS,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_FIELDS)])
def test_bad_field_names_file_destination_and_field(field: str, value: Any, needle: str) -> None:
    bad = without(EXAMPLE, field) if value == "MISSING" else with_(EXAMPLE, **{field: value})
    config = parse_config(doc(MINIMAL, bad), ORIGIN)
    err = only_error(config, "vip-newsletter")
    assert (err.file, err.destination, err.field) == (ORIGIN, "vip-newsletter", field)
    assert str(err).startswith(f"{ORIGIN}: destination 'vip-newsletter': field '{field}': ")
    assert needle in str(err)
    assert list(config.destinations) == ["minimal"]  # a bad destination does not stop the others


def test_mapping_error_lists_the_allowed_fields() -> None:
    config = parse_config(doc(with_(MINIMAL, mapping={"email": "E", "phone": "P"})), ORIGIN)
    message = str(only_error(config, "minimal"))
    for field in limits.WRITABLE_RESERVED_FIELDS:
        assert field in message


def test_every_problem_of_a_destination_is_reported() -> None:
    raw = with_(MINIMAL, consent="yes", mode="sync", colour="blue")
    err = only_error(parse_config(doc(raw), ORIGIN), "minimal")
    assert err.field == "colour"  # unknown fields come first
    text = str(err)
    assert "field 'consent'" in text and "field 'mode'" in text and "unknown field 'colour'" in text


@pytest.mark.parametrize("name", ["", "UPPER", "-leading", "has_underscore", "a" * 64, "spa ce", "dot.ted", "ok\n", 7,
                                  None])
def test_invalid_names_are_reported_by_index(name: Any) -> None:
    config = parse_config(doc(MINIMAL, with_(MINIMAL, name=name)), ORIGIN)
    err = only_error(config, "#1")
    assert (err.file, err.destination, err.field) == (ORIGIN, "#1", "name")
    assert "URLs and storage keys" in str(err)
    assert list(config.destinations) == ["minimal"]


def test_valid_name_edges() -> None:
    names = ["a", "0", "a" * 63, "vip-newsletter-2", "9-lives"]
    config = parse_config(doc(*(with_(MINIMAL, name=n) for n in names)), ORIGIN)
    assert list(config.destinations) == names


def test_missing_name_and_non_object_entries() -> None:
    config = parse_config(doc(without(MINIMAL, "name"), "just a string", MINIMAL), ORIGIN)
    assert set(config.errors) == {"#0", "#1"}
    assert config.errors["#0"].field == "name" and "is required" in str(config.errors["#0"])
    assert "must be an object" in str(config.errors["#1"])
    assert config.errors["#1"].file == ORIGIN and config.errors["#1"].destination == "#1"
    assert list(config.destinations) == ["minimal"]


def test_nameless_destination_also_reports_its_other_problems() -> None:
    config = parse_config(doc(with_(without(MINIMAL, "name"), mode="x")), ORIGIN)
    assert "field 'mode'" in str(config.errors["#0"])


def test_invalid_duplicate_names_do_not_count_as_duplicates() -> None:
    config = parse_config(doc(with_(MINIMAL, name="Bad"), with_(MINIMAL, name="Bad")), ORIGIN)
    assert set(config.errors) == {"#0", "#1"}


def test_errors_never_contain_a_secret_value() -> None:
    key = "SG." + "k" * 66
    err = only_error(parse_config(doc(with_(MINIMAL, api_key_secret=key)), ORIGIN), "minimal")
    assert err.field == "api_key_secret" and "looks like an API key" in str(err)
    assert "kkkk" not in str(err) and "kkkk" not in repr(err)
    other = only_error(parse_config(doc(with_(MINIMAL, api_key_secret="not/a name!")), ORIGIN), "minimal")
    assert "not/a name!" not in str(other) and "Key Vault secret name" in str(other)

"""A CDM folder's model.json, read the way Microsoft's CDM SDK reads it, and bounded so a hostile one costs little.

The reference is the SDK's model.json persistence (objectModel/Python/cdm/persistence/modeljson in microsoft/CDM) and
its schema (docs/schema/modeljsonschema.json there):

- Entities: `LocalEntity` (the default when `$type` is absent): `attributes` are the columns in file order,
  `partitions` the files; an entity with no partitions (the key absent or `[]`) is an empty segment.
  `ReferenceEntity`: `source` names an entity of the model.json that `referenceModels[modelId].location` points at;
  it is followed (and further references from there) within the export's storage account and container.
- A partition's CSV settings: `fileFormatSettings` (`$type` CsvFormatSettings, or none), overridden argument by
  argument by a `cdm:traits` entry `is.partition.format.CSV` (the SDK test TestLoadingCsvPartitionTraits).
  `columnHeaders` may be a boolean or the string "true"/"false" (any case); absent means no header row. Defaults:
  delimiter ',', QuoteStyle.Csv, CsvStyle.QuoteAlways, UTF-8.
- `isHidden` (model, entity, partition, attribute) is display metadata: the SDK turns it into an `is.hidden` trait and
  still lists the object. A hidden entity is read when a destination names it, a hidden partition's rows are part
  of its entity, a hidden attribute is still a column of the file (dropping it would shift the later ones).
- Locations: `resolve_location`.
- Caps (`Caps`): what one model.json may hold, checked before and after parsing it.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from .errors import ExportIncomplete, SourceError, StateError
from .partitions import BOM, Partition, json_type, open_version, read_exactly
from .partitions import info as file_info
from .storage import NotFound, ObjectStore, check_key, reads_snapshots

__all__ = ["CAPS", "Caps", "CsvSettings", "Found", "encoding_for", "entity_names", "find", "load_model",
           "resolve_location"]


@dataclass(frozen=True)
class Caps:
    """What one export's model.json files may hold. Real Customer Insights model.json files are a few KB: one entity
    per exported segment, its profile columns (tens, at most a few hundred) and a few partitions. Every number here is
    orders of magnitude above that, yet bounded so reading the worst file the caps admit stays well under 200 MB of
    memory (tests/test_cdm.py measures it in a child process): orjson builds ~30 bytes of Python objects per byte
    of a file made of tiny objects, hence the byte cap and the cap on objects and arrays, counted as '{' and '['
    anywhere in the file (inside strings too: the count can only overstate)."""

    bytes: int = 8 * 1024 * 1024  # one model.json file
    containers: int = 100_000  # objects and arrays in one file
    entities: int = 1_000  # in one file
    attributes_per_entity: int = 5_000  # Dataverse tables stop at 1,024 columns
    attributes: int = 50_000  # in one file
    partitions_per_entity: int = 5_000
    partitions: int = 20_000  # in one file, and in what the export reads across its references
    models: int = 16  # model.json files read for one export: the export's own and the ones it references


CAPS = Caps()

_SNAPSHOT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?Z$")

# Encodings a partition may declare (normalised: lower case, no '-', '_' or spaces) -> Python codec. The names are
# those of .NET (which writes these files) and their common spellings. ASCII is read as UTF-8, its superset.
_ENCODINGS = {
    "utf8": "utf-8", "utf8bom": "utf-8", "utf8sig": "utf-8", "ascii": "utf-8", "usascii": "utf-8",
    "iso88591": "latin-1", "latin1": "latin-1", "l1": "latin-1", "windows1252": "cp1252", "cp1252": "cp1252",
    "iso885915": "iso8859-15", "windows1250": "cp1250", "windows1251": "cp1251", "windows1253": "cp1253",
    "windows1254": "cp1254", "windows1257": "cp1257",
    "utf16": "utf-16-le", "unicode": "utf-16-le", "utf16le": "utf-16-le", "utf16be": "utf-16-be",
    "unicodefffe": "utf-16-be", "bigendianunicode": "utf-16-be",
    "utf32": "utf-32-le", "utf32le": "utf-32-le", "utf32be": "utf-32-be",
}
_CSV_ARGUMENTS = ("columnHeaders", "csvStyle", "delimiter", "quoteStyle", "encoding", "escape", "newline")


def encoding_for(name: str) -> str | None:
    """The Python codec for an encoding name a model.json may give, or None when it is not one this reads."""
    return _ENCODINGS.get(re.sub(r"[-_\s]", "", name.lower()))


@dataclass(frozen=True)
class CsvSettings:
    header: bool = False
    delimiter: str = ","
    quoting: bool = True  # QuoteStyle.Csv; False: QuoteStyle.None, quotes are ordinary characters
    encoding: str = "utf-8"  # a Python codec


@dataclass
class Found:
    """What an export holds for the segments asked for."""

    partitions: list[Partition] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # segments named but not in the export
    empty: list[str] = field(default_factory=list)  # entities with attributes and no partitions
    notes: list[str] = field(default_factory=list)  # warnings for the run's report


# ---------------------------------------------------------------------------------------------------------------
# loading one model.json


def load_model(store: ObjectStore, key: str, snapshot: str | None = None, caps: Caps | None = None) -> dict[str, Any]:
    """A model.json's top-level object, within the byte and container caps. ExportIncomplete when it is empty or
    ends before its JSON does (being written, or cut short); SourceError when it is missing, too big or not JSON."""
    caps = caps or CAPS
    raw = _read_capped(store, key, snapshot, caps)
    data = raw.removeprefix(BOM)
    if not data.strip():
        raise ExportIncomplete("is empty (0 bytes of JSON): the export is incomplete or still being written; it is "
                               "read again when it changes (or re-run the export)", file=key)
    containers = data.count(b"{") + data.count(b"[")
    if containers > caps.containers:
        raise SourceError(f"holds {containers:,} JSON objects and arrays, over the limit of {caps.containers:,} for "
                          "a model.json (real ones hold hundreds); it was not read. Export fewer tables per folder",
                          file=key)
    try:
        model = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if e.pos >= len(data.rstrip()):
            raise ExportIncomplete(f"is not valid JSON: it ends before its JSON does (after {len(raw):,} bytes): the "
                                   "export is incomplete or still being written; it is read again when it changes "
                                   "(or re-run the export)", file=key) from None
        raise SourceError(f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); re-run the export",
                          file=key) from None
    if not isinstance(model, dict):
        raise SourceError(f"is a JSON {json_type(model)}, not an object; point the source at the export's "
                          "model.json", file=key)
    return model


def _read_capped(store: ObjectStore, key: str, snapshot: str | None, caps: Caps) -> bytes:
    too_big = SourceError(f"is larger than {caps.bytes:,} bytes, the limit for a model.json (real ones are a few "
                          "KB); it was not read. Export fewer tables per folder", file=key)
    if snapshot is None:
        info = file_info(store, key)
        if info is None:
            raise SourceError(f"was not found in {store.label}; the export run may not have finished", file=key)
        if info.size > caps.bytes:
            raise too_big
    try:
        with contextlib.closing(open_version(store, key, snapshot)) as fh:
            data = read_exactly(fh, caps.bytes + 1)
    except NotFound:
        raise SourceError(f"was not found in {store.label}", file=key) from None
    if len(data) > caps.bytes:
        raise too_big
    return data


# ---------------------------------------------------------------------------------------------------------------
# locations


def resolve_location(store: ObjectStore, model_key: str, where: str, location: str) -> tuple[str, str | None]:
    """(store key, blob snapshot or None) of a partition's or a referenced model's location, by one rule for every
    store:

    - relative: below the model.json's folder (URL-decoded; './' allowed; '..', a leading '/' or '\\' refused);
    - absolute (http/https, blob or dfs endpoint): it must name the export's own storage account and container;
      the store maps it (store.key_for_url: a Blob container knows its account and container, a folder learns the
      place it copies from the first URL naming one of its files);
    - the query string is ignored (it may hold a SAS token, never shown) except `snapshot=<time>`: that blob
      snapshot is read, not the blob."""
    snapshot = _snapshot(model_key, where, location)
    if "://" in location:
        try:
            key = store.key_for_url(location)
        except StateError:
            key = None
        if key is None:
            try:  # the query string may hold a SAS token: show only the host and the container
                u = urlsplit(location)
                host, container = u.hostname or "?", next((s for s in u.path.split("/") if s), "")
            except ValueError:
                host, container = "?", ""
            raise SourceError(f"{where} points outside {store.label} (to {host}/{container}), or to a file that is "
                              "not there, and was refused; export to the storage account and container this "
                              "connector reads", file=model_key)
        return key, snapshot
    path = location.split("?", 1)[0].split("#", 1)[0]
    rel = unquote(path)
    while rel.startswith("./"):
        rel = rel[2:]
    if rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/"):
        raise SourceError(f"{where} has location {path!r}, which leaves the export folder and was refused; "
                          "locations must be absolute blob URLs or paths below the model.json folder", file=model_key)
    folder = posixpath.dirname(model_key)
    try:
        return check_key(f"{folder}/{rel}" if folder else rel), snapshot
    except StateError:
        raise SourceError(f"{where} has an unusable location {path!r}; re-run the export", file=model_key) from None


def _snapshot(model_key: str, where: str, location: str) -> str | None:
    try:
        values = parse_qs(urlsplit(location).query).get("snapshot")
    except ValueError:
        return None
    if not values:
        return None
    if len(values) > 1 or not _SNAPSHOT.match(values[0]):
        raise SourceError(f"{where} names a blob snapshot that is not one time like 2018-11-14T19:37:51.7526830Z; "
                          "re-run the export", file=model_key)
    return values[0]


# ---------------------------------------------------------------------------------------------------------------
# entities


def find(store: ObjectStore, model_key: str, segments: Sequence[str] | None, caps: Caps | None = None) -> Found:
    """The partitions of the entities named in `segments` (None: every entity, in model.json order), following
    ReferenceEntity entries into the model.json files they name."""
    walk = _Walk(store, caps or CAPS)
    model = walk.load(model_key, None)
    by_name = _entities(model, model_key)
    refs = _reference_models(model, model_key)
    del model  # the parsed file is dropped before any referenced one is read
    names = list(by_name) if segments is None else list(dict.fromkeys(segments))
    found = Found()
    for name in names:
        ent = by_name.get(name)  # exact names, as callers compare
        if ent is None:
            found.missing.append(name)
            continue
        parts = walk.entity(model_key, ent, refs, name, ())
        if parts:
            found.partitions += parts
        else:
            found.empty.append(name)
    found.notes = walk.notes
    return found


def entity_names(store: ObjectStore, model_key: str, caps: Caps | None = None) -> list[str]:
    """The names of a model.json's entities, in its order, within the caps; nothing else is read."""
    return list(_entities(_Walk(store, caps or CAPS).load(model_key, None), model_key))


class _Walk:
    """One discovery: its caps and counts, the model.json files read, notes for the report."""

    def __init__(self, store: ObjectStore, caps: Caps) -> None:
        self.store, self.caps = store, caps
        self.models = 0
        self.partitions = 0
        self.notes: list[str] = []

    def load(self, key: str, snapshot: str | None) -> dict[str, Any]:
        self.models += 1
        if self.models > self.caps.models:
            raise SourceError(f"the export references more than {self.caps.models} model.json files (the limit); "
                              f"{key} was not read", file=key)
        model = load_model(self.store, key, snapshot, self.caps)
        _check_counts(model, key, self.caps)
        return model

    def locate(self, model_key: str, where: str, location: str) -> tuple[str, str | None]:
        key, snapshot = resolve_location(self.store, model_key, where, location)
        if snapshot is not None and not reads_snapshots(self.store):
            self.notes.append(f"{model_key}: {where} names blob snapshot {snapshot}; {self.store.label} keeps one "
                              f"version of each file, so {key} itself was read")
        return key, snapshot

    def entity(self, model_key: str, ent: dict[str, Any], refs: dict[str, str], segment: str,
               seen: tuple[tuple[str, str], ...]) -> list[Partition]:
        kind = ent.get("$type", "LocalEntity")
        if kind == "ReferenceEntity":
            return self.reference(model_key, ent, refs, segment, seen)
        if kind != "LocalEntity":
            raise SourceError(f"entity '{ent['name']}' has $type {str(kind)[:40]!r}; a model.json entity is a "
                              "LocalEntity or a ReferenceEntity", file=model_key)
        return self.local(model_key, ent, segment)

    def local(self, model_key: str, ent: dict[str, Any], segment: str) -> list[Partition]:
        name = ent["name"]
        columns = _columns(ent, model_key)
        parts = ent.get("partitions")
        if parts is None:
            parts = []
        if not isinstance(parts, list):
            raise SourceError(f"entity '{name}': 'partitions' is not a list; re-run the export", file=model_key)
        self.partitions += len(parts)
        if self.partitions > self.caps.partitions:
            raise SourceError(f"the export names more than {self.caps.partitions:,} partitions (the limit); export "
                              "fewer or larger files", file=model_key)
        out = []
        for i, p in enumerate(parts):
            pname = p.get("name") if isinstance(p, dict) and isinstance(p.get("name"), str) else f"#{i + 1}"
            where = f"entity '{name}', partition '{pname}'"
            loc = p.get("location") if isinstance(p, dict) else None
            if not isinstance(loc, str) or not loc.strip():
                raise SourceError(f"{where} has no location; re-run the export", file=model_key)
            key, snapshot = self.locate(model_key, where, loc.strip())
            s = csv_settings(p, model_key, where)
            out.append(Partition(segment=segment, key=key, fmt="csv", compressed=key.lower().endswith(".gz"),
                                 columns=columns, header=s.header, delimiter=s.delimiter, quoting=s.quoting,
                                 encoding=s.encoding, snapshot=snapshot))
        return out

    def reference(self, model_key: str, ent: dict[str, Any], refs: dict[str, str], segment: str,
                  seen: tuple[tuple[str, str], ...]) -> list[Partition]:
        name, source, model_id = ent["name"], ent.get("source"), ent.get("modelId")
        what = f"entity '{name}' (a ReferenceEntity"
        if not isinstance(source, str) or not source or not isinstance(model_id, str) or not model_id:
            raise SourceError(f"{what}) needs a 'source' and a 'modelId'; re-run the export", file=model_key)
        what += f" to entity '{source[:100]}' of model '{model_id[:100]}')"
        location = refs.get(model_id)
        if location is None:
            raise SourceError(f"{what}: no referenceModels entry has id '{model_id[:100]}'; re-run the export",
                              file=model_key)
        key, snapshot = self.locate(model_key, what, location)
        here = (key + (f"?snapshot={snapshot}" if snapshot else ""), source)
        if here in seen:
            raise SourceError(f"{what}: the references go round in a circle ({' -> '.join(s for _, s in seen)} -> "
                              f"{source}); fix the export", file=model_key)
        model = self.load(key, snapshot)
        by_name = _entities(model, key)
        sub_refs = _reference_models(model, key)
        del model
        target = by_name.get(source)
        if target is None:
            raise SourceError(f"{what}: {key} has no entity '{source[:100]}'; re-run the export", file=model_key)
        return self.entity(key, target, sub_refs, segment, (*seen, here))


def _entities(model: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    entities = model.get("entities")
    if not isinstance(entities, list):
        raise SourceError("has no 'entities' list; it is not a CDM model.json from an export", file=key)
    by_name: dict[str, dict[str, Any]] = {}
    for i, ent in enumerate(entities):
        if not isinstance(ent, dict) or not isinstance(ent.get("name"), str) or not ent["name"]:
            raise SourceError(f"entity #{i + 1} is not an object with a 'name'; re-run the export", file=key)
        by_name.setdefault(ent["name"], ent)
    return by_name


def _reference_models(model: dict[str, Any], key: str) -> dict[str, str]:
    refs = model.get("referenceModels") or []
    if not isinstance(refs, list):
        raise SourceError("'referenceModels' is not a list; re-run the export", file=key)
    out: dict[str, str] = {}
    for ref in refs:
        if isinstance(ref, dict) and isinstance(ref.get("id"), str) and isinstance(ref.get("location"), str):
            out.setdefault(ref["id"], ref["location"].strip())
    return out


def _check_counts(model: dict[str, Any], key: str, caps: Caps) -> None:
    """The caps on entities, attributes and partitions of one parsed model.json (whatever the segments asked)."""
    entities = model.get("entities")
    if not isinstance(entities, list):
        return
    if len(entities) > caps.entities:
        raise SourceError(f"holds {len(entities):,} entities, over the limit of {caps.entities:,} for a model.json; "
                          "export fewer tables per folder", file=key)
    attributes = partitions = 0
    for ent in entities:
        if not isinstance(ent, dict):
            continue
        attrs, parts = ent.get("attributes"), ent.get("partitions")
        n_attrs = len(attrs) if isinstance(attrs, list) else 0
        n_parts = len(parts) if isinstance(parts, list) else 0
        name = str(ent.get("name"))[:100]
        if n_attrs > caps.attributes_per_entity:
            raise SourceError(f"entity '{name}' has {n_attrs:,} attributes, over the limit of "
                              f"{caps.attributes_per_entity:,} per entity", file=key)
        if n_parts > caps.partitions_per_entity:
            raise SourceError(f"entity '{name}' has {n_parts:,} partitions, over the limit of "
                              f"{caps.partitions_per_entity:,} per entity; export fewer or larger files", file=key)
        attributes += n_attrs
        partitions += n_parts
    if attributes > caps.attributes:
        raise SourceError(f"holds {attributes:,} attributes, over the limit of {caps.attributes:,} for a model.json; "
                          "export fewer tables per folder", file=key)
    if partitions > caps.partitions:
        raise SourceError(f"holds {partitions:,} partitions, over the limit of {caps.partitions:,} for a model.json; "
                          "export fewer or larger files", file=key)


def _columns(ent: dict[str, Any], key: str) -> tuple[str, ...]:
    name = ent["name"]
    attrs = ent.get("attributes")
    if not isinstance(attrs, list) or not attrs:
        raise SourceError(f"entity '{name}' has no attributes (column names); re-run the export", file=key)
    columns = []
    for i, a in enumerate(attrs):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"]:
            raise SourceError(f"entity '{name}': attribute #{i + 1} has no name; re-run the export", file=key)
        columns.append(a["name"])
    return tuple(columns)


# ---------------------------------------------------------------------------------------------------------------
# CSV settings


def csv_settings(partition: dict[str, Any], key: str, where: str) -> CsvSettings:
    """A partition's CSV settings: fileFormatSettings, each argument overridden by an is.partition.format.CSV trait."""
    args: dict[str, Any] = {}
    ffs = partition.get("fileFormatSettings")
    if isinstance(ffs, dict):
        kind = ffs.get("$type", "CsvFormatSettings")
        if kind != "CsvFormatSettings":
            raise SourceError(f"{where} is in format {str(kind)[:40]!r}; only CSV partitions "
                              "(CsvFormatSettings) can be read", file=key)
        args.update({k: ffs[k] for k in _CSV_ARGUMENTS if ffs.get(k) is not None})
    args.update(_trait_arguments(partition.get("cdm:traits"), key, where))
    header = _boolean(args.get("columnHeaders", False), key, f"{where}: columnHeaders")
    delimiter = args.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
        raise SourceError(f"{where}: unsupported delimiter {str(delimiter)[:20]!r}; use a single character other "
                          "than a quote or a line break", file=key)
    quote = args.get("quoteStyle", "QuoteStyle.Csv")
    if quote not in ("QuoteStyle.Csv", "QuoteStyle.None"):
        raise SourceError(f"{where}: unsupported quoteStyle {str(quote)[:40]!r}; use QuoteStyle.Csv or "
                          "QuoteStyle.None", file=key)
    style = args.get("csvStyle", "CsvStyle.QuoteAlways")
    if style not in ("CsvStyle.QuoteAlways", "CsvStyle.QuoteAfterDelimiter"):
        raise SourceError(f"{where}: unsupported csvStyle {str(style)[:40]!r}; use CsvStyle.QuoteAlways or "
                          "CsvStyle.QuoteAfterDelimiter", file=key)
    escape = args.get("escape", '"')
    if escape != '"':
        raise SourceError(f"{where}: unsupported escape {str(escape)[:20]!r}; quotes inside quoted fields must be "
                          "doubled (escape '\"')", file=key)
    name = args.get("encoding", "UTF-8")
    codec = encoding_for(name) if isinstance(name, str) else None
    if codec is None:
        raise SourceError(f"{where}: unsupported encoding {str(name)[:40]!r}; use UTF-8 (with or without BOM), "
                          "ASCII, ISO-8859-1, Windows-1252 (or another Windows-125x), UTF-16 or UTF-32", file=key)
    return CsvSettings(header, delimiter, quote == "QuoteStyle.Csv", codec)


def _trait_arguments(traits: Any, key: str, where: str) -> dict[str, Any]:
    """The arguments of a `cdm:traits` entry is.partition.format.CSV, by name (named or in the trait's parameter
    order: columnHeaders, csvStyle, delimiter, quoteStyle, encoding, escape, newline)."""
    if not isinstance(traits, list):
        return {}
    out: dict[str, Any] = {}
    for trait in traits:
        if not isinstance(trait, dict):
            continue
        ref = trait.get("traitReference")
        if isinstance(ref, dict):
            ref = ref.get("traitName")
        if ref != "is.partition.format.CSV":
            continue
        arguments = trait.get("arguments") or []
        if not isinstance(arguments, list):
            raise SourceError(f"{where}: the is.partition.format.CSV trait's arguments are not a list", file=key)
        for i, arg in enumerate(arguments):
            if isinstance(arg, dict) and "value" in arg:
                name, value = arg.get("name"), arg["value"]
            else:
                name, value = None, arg
            if name is None and i < len(_CSV_ARGUMENTS):
                name = _CSV_ARGUMENTS[i]
            if isinstance(name, str) and value is not None:
                out[name] = value
    return out


def _boolean(value: Any, key: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SourceError(f"{what} is {str(value)[:20]!r}; use true or false", file=key)

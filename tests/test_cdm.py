"""CDM folders read the way Microsoft's CDM SDK reads them (shared/cdm.py through shared/sources.py).

The model.json files here are written for these tests, modelled on the SDK's own test data and samples in
microsoft/CDM (objectModel/TestData/Persistence/ModelJson/DataPartition/TestLoadingCsvPartitionTraits*,
docs/schema/examples/OrdersProducts*, samples/4-read-local-save-adls): the same shapes, our own names and values.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from azure.storage.blob import ContainerClient

from shared import cdm, sources
from shared.blobstore import BlobContainerStore
from shared.errors import ExportIncomplete, RunRefused, SourceError
from shared.sources import Partition, discover, find, read_rows
from shared.storage import LocalFolderStore

REPO = Path(__file__).resolve().parent.parent
EXPORT = "CustomerInsights_abcd/BlobExport"
HOST = "https://acct.blob.core.windows.net"
URL = f"{HOST}/exports/{EXPORT}"
COLS = ["CustomerId", "EmailAddress", "FirstName", "LastName"]


def put(root: Path, key: str, data: bytes | str) -> str:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return key


def partition(name: str, location: str, settings: dict[str, Any] | None = None,
              traits: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "location": location, **extra}
    if settings is not None:
        p["fileFormatSettings"] = {"$type": "CsvFormatSettings", **settings}
    if traits is not None:
        p["cdm:traits"] = traits
    return p


def csv_trait(**arguments: Any) -> dict[str, Any]:
    return {"traitReference": "is.partition.format.CSV",
            "arguments": [{"name": k, "value": v} for k, v in arguments.items()]}


def entity(name: str, partitions: list[dict[str, Any]] | None, cols: list[str] = COLS, **extra: Any) -> dict[str, Any]:
    ent: dict[str, Any] = {"$type": "LocalEntity", "name": name,
                           "attributes": [{"name": c, "dataType": "string"} for c in cols], **extra}
    if partitions is not None:
        ent["partitions"] = partitions
    return ent


def model(entities: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"name": "BlobExport", "version": "1.0", "entities": entities, **extra})


def read_all(store: Any, part: Partition, wanted: list[str] = COLS[1:]) -> list[tuple[int, Any, Any]]:
    return list(read_rows(store, part, wanted, ("EmailAddress",)))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "exports").mkdir()
    return tmp_path / "exports"


@pytest.fixture
def store(root: Path) -> LocalFolderStore:
    return LocalFolderStore(root)


# ------------------------------------------------------------------------------------------------ traits and settings


def test_csv_trait_overrides_file_format_settings(root: Path, store: LocalFolderStore) -> None:
    """TestLoadingCsvPartitionTraits: fileFormatSettings say no header, ';', QuoteStyle.None, ASCII; the trait says
    header, ',', QuoteStyle.Csv, UTF-8, and wins argument by argument. The file is what the trait describes."""
    put(root, f"{EXPORT}/S/p.csv", 'CustomerId,EmailAddress,FirstName,LastName\r\n'
                                   '1,a@x.com,"Ann, Jr.","Lee ""the"" First"\r\n2,b@x.com,Bo,Ng\r\n')
    settings = {"columnHeaders": "false", "csvStyle": "CsvStyle.QuoteAfterDelimiter", "delimiter": ";",
                "quoteStyle": "QuoteStyle.None", "encoding": "ASCII"}
    trait = csv_trait(columnHeaders="true", csvStyle="CsvStyle.QuoteAlways", delimiter=",",
                      quoteStyle="QuoteStyle.Csv", encoding="UTF-8", newline="\n")
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", "S/p.csv", settings, [trait])])]))
    [part] = discover(store, EXPORT)
    assert (part.header, part.delimiter, part.quoting, part.encoding) == (True, ",", True, "utf-8")
    assert read_all(store, part) == [(2, ["a@x.com", "Ann, Jr.", 'Lee "the" First'], None),
                                     (3, ["b@x.com", "Bo", "Ng"], None)]


def test_file_format_settings_apply_where_the_trait_is_silent(root: Path, store: LocalFolderStore) -> None:
    """TestLoadingCsvPartitionTraitsFromFileFormatSettings: a trait with only `newline` leaves every setting to
    fileFormatSettings: no header ("false" as a string), ';', quotes as data."""
    put(root, f"{EXPORT}/S/p.csv", '1;a@x.com;"Ann";O"Brien\n2;b@x.com;Bo "Bobby;Ng\n3;c@x.com;Cy;Oz\n')
    settings = {"columnHeaders": "false", "csvStyle": "CsvStyle.QuoteAfterDelimiter", "delimiter": ";",
                "quoteStyle": "QuoteStyle.None", "encoding": "ASCII"}
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", "S/p.csv", settings,
                                                                      [csv_trait(newline="\n")])])]))
    [part] = discover(store, EXPORT)
    assert (part.header, part.delimiter, part.quoting) == (False, ";", False)
    assert read_all(store, part) == [(1, ["a@x.com", '"Ann"', 'O"Brien'], None),
                                     (2, ["b@x.com", 'Bo "Bobby', "Ng"], None),  # an odd quote swallows nothing
                                     (3, ["c@x.com", "Cy", "Oz"], None)]


@pytest.mark.parametrize(("value", "header"), [(True, True), ("true", True), ("True", True), ("TRUE", True),
                                               (False, False), ("false", False), ("False", False), (None, False)])
def test_column_headers_as_booleans_or_strings(root: Path, store: LocalFolderStore, value: Any, header: bool) -> None:
    settings = {} if value is None else {"columnHeaders": value}
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", "S/p.csv", settings)])]))
    assert discover(store, EXPORT)[0].header is header


def test_trait_arguments_by_position_and_string_column_headers(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p.csv", "CustomerId|EmailAddress|FirstName|LastName\n1|a@x.com|Ann|Lee\n")
    positional = {"traitReference": {"traitName": "is.partition.format.CSV"},
                  "arguments": ["true", "CsvStyle.QuoteAlways", "|"]}
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", "S/p.csv", {}, [positional])])]))
    [part] = discover(store, EXPORT)
    assert read_all(store, part) == [(2, ["a@x.com", "Ann", "Lee"], None)]


@pytest.mark.parametrize(("settings", "traits", "message"), [
    ({"columnHeaders": "yes"}, None, r"columnHeaders is 'yes'; use true or false"),
    ({"quoteStyle": "QuoteStyle.Smart"}, None, r"unsupported quoteStyle 'QuoteStyle.Smart'"),
    ({"csvStyle": "CsvStyle.Never"}, None, r"unsupported csvStyle"),
    ({"encoding": "EBCDIC-cp-us"}, None, r"unsupported encoding 'EBCDIC-cp-us'; use UTF-8"),
    ({}, [csv_trait(delimiter="||")], r"unsupported delimiter '\|\|'"),
    ({}, [csv_trait(escape="\\")], r"unsupported escape"),
])
def test_unsupported_settings_are_refused_naming_the_partition(root: Path, store: LocalFolderStore,
                                                               settings: dict[str, Any], traits: Any,
                                                               message: str) -> None:
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p1", "S/p.csv", settings, traits)])]))
    with pytest.raises(SourceError, match=rf"model\.json: entity 'S', partition 'p1'.*{message}"):
        discover(store, EXPORT)


def test_a_partition_in_another_format_is_refused(root: Path, store: LocalFolderStore) -> None:
    ent = entity("S", [{"name": "p1", "location": "S/p.parquet",
                        "fileFormatSettings": {"$type": "ParquetFormatSettings"}}])
    put(root, f"{EXPORT}/model.json", model([ent]))
    with pytest.raises(SourceError, match=r"partition 'p1' is in format 'ParquetFormatSettings'; only CSV"):
        discover(store, EXPORT)


# ------------------------------------------------------------------------------------------------ encodings

PEOPLE = [("1", "muller@x.com", "Jürgen", "Müller"), ("2", "jose@x.com", "José", "Núñez"),
          ("3", "zoe@x.com", "Zoë", "O'Brien")]


def people_csv(rows: list[tuple[str, ...]] = PEOPLE) -> str:
    return "".join(",".join(f'"{v}"' for v in r) + "\r\n" for r in rows)


@pytest.mark.parametrize(("declared", "data"), [
    ("UTF-8", people_csv().encode("utf-8")),
    ("UTF-8", b"\xef\xbb\xbf" + people_csv().encode("utf-8")),  # UTF-8 with a byte order mark
    ("utf-8-sig", b"\xef\xbb\xbf" + people_csv().encode("utf-8")),
    ("ISO-8859-1", people_csv().encode("latin-1")),
    ("iso-8859-1", gzip.compress(people_csv().encode("latin-1"), mtime=0)),
    ("Windows-1252", people_csv().encode("cp1252")),
    ("UTF-16", people_csv().encode("utf-16")),  # with a byte order mark (little-endian here)
    ("UTF-16", b"\xfe\xff" + people_csv().encode("utf-16-be")),  # big-endian, by its mark
    ("unicode", people_csv().encode("utf-16-le")),  # .NET's name; no mark: little-endian, as .NET writes it
    ("UTF-16BE", people_csv().encode("utf-16-be")),
    ("UTF-32", people_csv().encode("utf-32")),
    ("UTF-8", people_csv().encode("utf-16")),  # the byte order mark wins over what model.json declares
])
def test_encodings_are_read_exactly(root: Path, store: LocalFolderStore, declared: str, data: bytes) -> None:
    name = "S/p.csv.gz" if data[:2] == b"\x1f\x8b" else "S/p.csv"
    put(root, f"{EXPORT}/{name}", data)
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", name, {"encoding": declared})])]))
    [part] = discover(store, EXPORT)
    assert read_all(store, part) == [(i + 1, list(p[1:]), None) for i, p in enumerate(PEOPLE)]


def test_ascii_is_read_as_utf8_and_a_byte_the_encoding_lacks_rejects_its_row(root: Path,
                                                                              store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/a.csv", '"1","a@x.com","Ann","Lee"\n"2","b@x.com","Bö","Ng"\n'.encode())
    put(root, f"{EXPORT}/S/w.csv", b'"1","c@x.com","Cy","Oz"\n"2","d@x.com","D\x81","Oz"\n"3","e@x.com","E","\x80"\n')
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("a", "S/a.csv", {"encoding": "ASCII"}),
                                                          partition("w", "S/w.csv", {"encoding": "windows-1252"})])]))
    a, w = discover(store, EXPORT)
    assert read_all(store, a) == [(1, ["a@x.com", "Ann", "Lee"], None), (2, ["b@x.com", "Bö", "Ng"], None)]
    got = read_all(store, w)
    assert got[0] == (1, ["c@x.com", "Cy", "Oz"], None) and got[2] == (3, ["e@x.com", "E", "€"], None)
    assert got[1][0] == 2 and got[1][1] is None and "column 'FirstName'" in got[1][2] and "0x81" in got[1][2]


def test_a_plain_csv_file_in_utf16_is_read_by_its_byte_order_mark(root: Path, store: LocalFolderStore) -> None:
    """Excel's "Unicode text" and many Windows tools write UTF-16 with a mark; plain files have no model.json."""
    put(root, "drop/people.csv", ("email,first\r\nmuller@x.com,Jürgen\r\n").encode("utf-16"))
    part = discover(store, "drop/people.csv")[0]
    assert list(read_rows(store, part, ["email", "first"], ("email",))) == [(2, ["muller@x.com", "Jürgen"], None)]


# ------------------------------------------------------------------------------------------------ isHidden


def test_hidden_entities_partitions_and_attributes_are_read(root: Path, store: LocalFolderStore) -> None:
    """isHidden is display metadata (the SDK keeps the object, with an is.hidden trait): a hidden entity named by a
    destination is read, a hidden partition's rows belong to its entity, a hidden attribute is still a column."""
    cols = [{"name": "CustomerId", "dataType": "string", "isHidden": True},
            {"name": "EmailAddress", "dataType": "string"}, {"name": "FirstName", "dataType": "string"},
            {"name": "LastName", "dataType": "string"}]
    put(root, f"{EXPORT}/S/p1.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/S/p2.csv", '"2","b@x.com","Bo","Ng"\n')
    ent = {"$type": "LocalEntity", "name": "S", "isHidden": True, "attributes": cols,
           "partitions": [partition("p1", "S/p1.csv"), partition("p2", "S/p2.csv", isHidden=True)]}
    put(root, f"{EXPORT}/model.json", model([ent], isHidden=True))
    parts = discover(store, EXPORT, ["S"])
    assert [p.key.rsplit("/", 1)[1] for p in parts] == ["p1.csv", "p2.csv"] and parts[0].columns == tuple(COLS)
    assert [read_all(store, p) for p in parts] == [[(1, ["a@x.com", "Ann", "Lee"], None)],
                                                   [(1, ["b@x.com", "Bo", "Ng"], None)]]
    assert [p.segment for p in discover(store, EXPORT)] == ["S", "S"]  # every entity, hidden ones too


# ------------------------------------------------------------------------------------------------ partitionless


def test_an_entity_without_partitions_is_an_empty_segment_not_a_missing_one(root: Path,
                                                                             store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/B/b.csv", '"1","b@x.com","Bo","Ng"\n')
    put(root, f"{EXPORT}/model.json", model([entity("A", []), entity("B", [partition("b", "B/b.csv")]),
                                             entity("C", None)]))
    found = find(store, EXPORT, ["A", "B", "C", "Gone"])
    assert [p.segment for p in found.partitions] == ["B"]
    assert (found.missing, found.empty) == (["Gone"], ["A", "C"])
    assert found.notes == ["segments not in this export: Gone",
                           "segment 'A' is in the export without partitions (an empty segment): no contacts come "
                           "from it",
                           "segment 'C' is in the export without partitions (an empty segment): no contacts come "
                           "from it"]
    only_empty = find(store, EXPORT, ["A"])  # an empty segment alone: no error, nothing to read
    assert only_empty.partitions == [] and only_empty.empty == ["A"] and only_empty.missing == []
    with pytest.raises(SourceError, match=r"none of the segments \(Gone\) is in this export"):
        find(store, EXPORT, ["Gone"])


# ------------------------------------------------------------------------------------------------ model.json incomplete


@pytest.mark.parametrize("content", [b"", b"   \n", b"\xef\xbb\xbf", b'{"name": "BlobExport", "entities": [{"na',
                                     b'{"name": "BlobExport", "entities": []'])
def test_an_empty_or_cut_short_model_json_is_export_incomplete(root: Path, store: LocalFolderStore,
                                                               content: bytes) -> None:
    put(root, f"{EXPORT}/model.json", content)
    with pytest.raises(ExportIncomplete, match=r"model\.json: .*the export is incomplete or still being written"):
        discover(store, EXPORT)


@pytest.mark.parametrize("content", [b'{"name": "x", "entities": [}', b'{"a": 1}}', b"nope"])
def test_a_complete_but_broken_model_json_is_not_export_incomplete(root: Path, store: LocalFolderStore,
                                                                   content: bytes) -> None:
    put(root, f"{EXPORT}/model.json", content)
    with pytest.raises(SourceError, match=r"is not valid JSON \(") as e:
        discover(store, EXPORT)
    assert not isinstance(e.value, ExportIncomplete)


# ------------------------------------------------------------------------------------------------ locations


def test_relative_and_absolute_locations_resolve_alike_in_a_folder(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/2026/p1.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/S/2026/p 2.csv", '"2","b@x.com","Bo","Ng"\n')
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p1", f"{URL}/S/2026/p1.csv?sv=1&sig=SECRET"),
                                                          partition("p2", "S/2026/p%202.csv"),
                                                          partition("p3", f"{URL}/S/2026/p%202.csv")])]))
    keys = [p.key for p in discover(store, EXPORT)]
    assert keys == [f"{EXPORT}/S/2026/p1.csv", f"{EXPORT}/S/2026/p 2.csv", f"{EXPORT}/S/2026/p 2.csv"]


@pytest.mark.parametrize("foreign", [
    "https://evil.blob.core.windows.net/exports/{EXPORT}/S/p2.csv",  # another account, same path
    "https://acct.blob.core.windows.net/other/{EXPORT}/S/p2.csv",  # another container
    "http://acct.blob.core.windows.net/exports/{EXPORT}/S/p2.csv",  # another port
])
def test_a_folder_refuses_what_the_blob_store_refuses(root: Path, store: LocalFolderStore, foreign: str) -> None:
    """The folder learns its origin from the first URL naming one of its files; another account, container or port
    is then refused as BlobContainerStore refuses it, even when a file of that path is in the folder."""
    put(root, f"{EXPORT}/S/p1.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/S/p2.csv", '"2","b@x.com","Bo","Ng"\n')
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p1", f"{URL}/S/p1.csv"),
                                                          partition("p2", foreign.format(EXPORT=EXPORT) + "?sig=X")])]))
    with pytest.raises(SourceError, match=r"entity 'S', partition 'p2' points outside folder .* refused") as e:
        discover(store, EXPORT)
    assert "sig=" not in str(e.value)


def test_a_url_under_the_origin_names_a_missing_file_as_missing(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p1.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p1", f"{URL}/S/p1.csv"),
                                                          partition("p2", f"{URL}/S/gone.csv")])]))
    _, p2 = discover(store, EXPORT)
    assert p2.key == f"{EXPORT}/S/gone.csv"
    with pytest.raises(SourceError, match=r"S/gone\.csv: was not found in folder"):
        read_all(store, p2)


@pytest.mark.azurite
def test_relative_and_absolute_locations_resolve_alike_in_a_blob_container(azurite: Any,
                                                                           blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    base = f"{azurite.blob_url}/{blob_container.container_name}/{EXPORT}"
    blob_container.upload_blob(f"{EXPORT}/S/2026/p1.csv", b'"1","a@x.com","Ann","Lee"\n')
    blob_container.upload_blob(f"{EXPORT}/S/2026/p 2.csv", b'"2","b@x.com","Bo","Ng"\n')
    foreign = f"https://evil.blob.core.windows.net/{blob_container.container_name}/{EXPORT}/S/2026/p1.csv"
    ents = [entity("S", [partition("p1", f"{base}/S/2026/p1.csv?sv=1&sig=SECRET"),
                         partition("p2", "S/2026/p%202.csv"), partition("p3", f"{base}/S/2026/p%202.csv")]),
            entity("Evil", [partition("e", foreign)])]
    blob_container.upload_blob(f"{EXPORT}/model.json", model(ents))
    parts = discover(store, EXPORT, ["S"])
    assert [p.key for p in parts] == [f"{EXPORT}/S/2026/p1.csv", f"{EXPORT}/S/2026/p 2.csv",
                                      f"{EXPORT}/S/2026/p 2.csv"]
    assert read_all(store, parts[1]) == [(1, ["b@x.com", "Bo", "Ng"], None)]
    with pytest.raises(SourceError, match=r"entity 'Evil', partition 'e' points outside container"):
        discover(store, EXPORT, ["Evil"])


@pytest.mark.azurite
def test_a_snapshot_location_reads_that_snapshot(azurite: Any, blob_container: ContainerClient) -> None:
    store = BlobContainerStore(blob_container)
    blob = blob_container.upload_blob(f"{EXPORT}/S/p.csv", b'"1","old@x.com","Old","One"\n')
    snapshot = blob.create_snapshot()["snapshot"]
    blob.upload_blob(b'"1","new@x.com","New","One"\n"2","newer@x.com","New","Two"\n', overwrite=True)
    base = f"{azurite.blob_url}/{blob_container.container_name}/{EXPORT}"
    ents = [entity("Snap", [partition("p", f"{base}/S/p.csv?snapshot={snapshot}&sig=X")]),
            entity("Base", [partition("p", f"{base}/S/p.csv")]),
            entity("Rel", [partition("p", f"S/p.csv?snapshot={snapshot}")])]
    blob_container.upload_blob(f"{EXPORT}/model.json", model(ents))
    found = find(store, EXPORT, ["Snap", "Base", "Rel"])
    snap, now, rel = found.partitions
    assert snap.snapshot == rel.snapshot == snapshot and now.snapshot is None and not found.notes
    assert read_all(store, snap) == read_all(store, rel) == [(1, ["old@x.com", "Old", "One"], None)]
    assert [v for _, v, _ in read_all(store, now)] == [["new@x.com", "New", "One"], ["newer@x.com", "New", "Two"]]


def test_a_folder_reads_the_file_a_snapshot_names_and_says_so(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/model.json", model([entity("S", [
        partition("p", f"{URL}/S/p.csv?snapshot=2018-11-14T19:37:51.7526830Z")])]))
    found = find(store, EXPORT, ["S"])
    assert found.partitions[0].snapshot == "2018-11-14T19:37:51.7526830Z"
    assert len(found.notes) == 1 and "names blob snapshot 2018-11-14T19:37:51.7526830Z" in found.notes[0]
    assert "keeps one version of each file" in found.notes[0]
    assert read_all(store, found.partitions[0]) == [(1, ["a@x.com", "Ann", "Lee"], None)]


def test_a_malformed_snapshot_is_refused(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/model.json", model([entity("S", [partition("p", "S/p.csv?snapshot=yesterday")])]))
    with pytest.raises(SourceError, match=r"partition 'p' names a blob snapshot that is not one time"):
        discover(store, EXPORT)


# ------------------------------------------------------------------------------------------------ referenceModels


def linked_export(root: Path, location: str, *, source: str = "Customers") -> None:
    """OrdersProductsCustomersLinked-like: a ReferenceEntity to an entity of a model.json in a sibling folder."""
    put(root, f"{EXPORT}/Base/Customers/c1.csv", '"1","a@x.com","Ann","Lee"\n')
    put(root, f"{EXPORT}/Base/model.json", model([entity("Customers", [partition("c1", "Customers/c1.csv")])]))
    put(root, f"{EXPORT}/Local/l.csv", '"2","b@x.com","Bo","Ng"\n')
    put(root, f"{EXPORT}/model.json", model(
        [{"$type": "ReferenceEntity", "name": "VIP", "source": source, "modelId": "ws/base",
          "annotations": [{"name": "pbi:EntityTypeDisplayHint", "value": "LinkedEntity"}]},
         entity("Local", [partition("l", "Local/l.csv")])],
        referenceModels=[{"id": "ws/base", "location": location}]))


@pytest.mark.parametrize("location", ["Base/model.json", f"{URL}/Base/model.json?sig=X"])
def test_a_reference_entity_reads_the_referenced_models_partitions(root: Path, store: LocalFolderStore,
                                                                  location: str) -> None:
    linked_export(root, location)
    parts = discover(store, EXPORT, ["VIP", "Local"])
    assert [(p.segment, p.key) for p in parts] == [("VIP", f"{EXPORT}/Base/Customers/c1.csv"),
                                                   ("Local", f"{EXPORT}/Local/l.csv")]
    assert read_all(store, parts[0]) == [(1, ["a@x.com", "Ann", "Lee"], None)]


@pytest.mark.parametrize(("location", "source", "message"), [
    ("https://other.blob.core.windows.net/x/model.json?sig=X",
     "Customers", r"entity 'VIP' \(a ReferenceEntity to entity 'Customers' of model 'ws/base'\) points outside"),
    ("../Elsewhere/model.json", "Customers", r"entity 'VIP' \(a ReferenceEntity .*leaves the export folder"),
    ("Base/model.json", "Nobody", r"entity 'VIP' \(a ReferenceEntity .*Base/model\.json has no entity 'Nobody'"),
    ("Nowhere/model.json", "Customers", r"Nowhere/model\.json: was not found"),
])
def test_a_reference_that_cannot_be_followed_names_the_entity_and_the_reference(
        root: Path, store: LocalFolderStore, location: str, source: str, message: str) -> None:
    linked_export(root, location, source=source)
    with pytest.raises(SourceError, match=message) as e:
        discover(store, EXPORT, ["VIP"])
    assert "sig=" not in str(e.value)
    assert [p.segment for p in discover(store, EXPORT, ["Local"])] == ["Local"]  # other segments are unaffected


def test_segment_names_read_only_the_model_json(root: Path, store: LocalFolderStore) -> None:
    """What a trigger needs to pick destinations: every entity's name, without following a (here broken)
    reference or resolving a partition, so a broken entity cannot stop the destinations that do not name it."""
    linked_export(root, "https://other.blob.core.windows.net/x/model.json")
    assert sources.segment_names(store, EXPORT) == ["VIP", "Local"]
    assert sources.segment_names(store, put(root, "drop/people.csv.gz", gzip.compress(b"email\n"))) == ["people"]


def test_an_unknown_model_id_and_a_reference_loop_are_refused(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/model.json", model([{"$type": "ReferenceEntity", "name": "X", "source": "X",
                                              "modelId": "missing"}]))
    with pytest.raises(SourceError, match=r"entity 'X' \(a ReferenceEntity .*no referenceModels entry has id"):
        discover(store, EXPORT)
    loop = [{"$type": "ReferenceEntity", "name": "X", "source": "X", "modelId": "me"}]
    put(root, f"{EXPORT}/model.json", model(loop, referenceModels=[{"id": "me", "location": "model.json"}]))
    with pytest.raises(SourceError, match=r"go round in a circle"):
        discover(store, EXPORT)


# ------------------------------------------------------------------------------------------------ columns up front


def test_a_mapped_column_in_none_of_the_files_refuses_the_run(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/model.json", model([entity("A", [partition("a", "A/a.csv")]),
                                             entity("B", [partition("b", "B/b.csv")], cols=[*COLS, "Score"])]))
    parts = discover(store, EXPORT)
    sources.check_columns(store, parts, {"mapping email": "emailaddress", "custom field score": "Score"})
    with pytest.raises(RunRefused) as e:
        sources.check_columns(store, parts, {"mapping email": "EmailAddress", "mapping city": "City",
                                             "custom field ltv": "LifetimeValue"})
    msg = str(e.value)
    assert "'City' (mapping city), 'LifetimeValue' (custom field ltv) are in none of the export's files" in msg
    assert "'CustomerId', 'EmailAddress', 'FirstName', 'LastName', 'Score'" in msg and "nothing was sent" in msg


def test_plain_files_are_checked_by_their_header_and_json_lines_not_at_all(root: Path,
                                                                          store: LocalFolderStore) -> None:
    csv_part = discover(store, put(root, "drop/p.csv", "Email;First\na@x.com;Ann\n"))[0]
    with pytest.raises(RunRefused, match=r"'email' \(mapping email\), .* are in none .* columns: 'Email;First'; "
                                         r"the header looks ';'-delimited"):
        sources.check_columns(store, [Partition("p", csv_part.key, "csv", False, None, True, ",")],
                              {"mapping email": "email", "mapping first_name": "First"})
    semi = Partition("p", csv_part.key, "csv", False, None, True, ";")
    sources.check_columns(store, [semi], {"mapping email": "email", "mapping first_name": "first"})
    jsonl = discover(store, put(root, "drop/p.jsonl", '{"x": 1}\n'))[0]
    sources.check_columns(store, [jsonl], {"mapping email": "email"})
    empty = discover(store, put(root, "drop/e.csv", ""))[0]
    sources.check_columns(store, [empty], {"mapping email": "email"})


# ------------------------------------------------------------------------------------------------ caps


@pytest.mark.parametrize(("caps", "entities", "message"), [
    (cdm.Caps(bytes=200), [entity("S", [])], r"is larger than 200 bytes, the limit for a model\.json"),
    (cdm.Caps(containers=5), [entity("S", [])], r"holds \d+ JSON objects and arrays, over the limit of 5"),
    (cdm.Caps(entities=2), [entity(n, []) for n in "ABC"], r"holds 3 entities, over the limit of 2"),
    (cdm.Caps(attributes_per_entity=3), [entity("S", [])], r"entity 'S' has 4 attributes, over the limit of 3"),
    (cdm.Caps(attributes=6), [entity("A", []), entity("B", [])], r"holds 8 attributes, over the limit of 6"),
    (cdm.Caps(partitions_per_entity=1), [entity("S", [partition("a", "a.csv"), partition("b", "b.csv")])],
     r"entity 'S' has 2 partitions, over the limit of 1"),
    (cdm.Caps(partitions=1), [entity("A", [partition("a", "a.csv")]), entity("B", [partition("b", "b.csv")])],
     r"holds 2 partitions, over the limit of 1"),
])
def test_each_cap_refuses_a_model_json_naming_it(root: Path, store: LocalFolderStore, caps: cdm.Caps,
                                                 entities: list[dict[str, Any]], message: str) -> None:
    put(root, f"{EXPORT}/model.json", model(entities))
    with pytest.raises(SourceError, match=rf"^{EXPORT}/model\.json: {message}"):
        cdm.find(store, f"{EXPORT}/model.json", None, caps)


def test_the_referenced_models_cap(root: Path, store: LocalFolderStore) -> None:
    for i in range(4):  # model i references an entity of model i + 1
        ents = ([{"$type": "ReferenceEntity", "name": "S", "source": "S", "modelId": "next"}] if i < 3
                else [entity("S", [partition("p", "p.csv")])])
        refs = [{"id": "next", "location": f"{URL}/m{i + 1}/model.json"}]
        put(root, f"m{i}/model.json", model(ents, referenceModels=refs))
    put(root, "m3/p.csv", '"1","a@x.com","Ann","Lee"\n')
    assert [p.key for p in cdm.find(store, "m0/model.json", ["S"], cdm.Caps(models=4)).partitions] == ["m3/p.csv"]
    with pytest.raises(SourceError, match=r"references more than 3 model\.json files \(the limit\)"):
        cdm.find(store, "m0/model.json", ["S"], cdm.Caps(models=3))


# The child's own peak: VmHWM starts afresh at exec (ru_maxrss would start at the forking test process's).
_PEAK_RSS = """
import sys
from shared import sources
from shared.errors import SourceError
from shared.storage import LocalFolderStore
try:
    parts = sources.discover(LocalFolderStore(sys.argv[1]), "model.json")
    outcome = f"{len(parts)} partitions"
except SourceError as e:
    outcome = "refused: " + str(e)[:200]
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak_kb // 1024, outcome)
"""


def _at_the_caps(kind: str) -> bytes:
    """The largest model.json of one shape that the caps admit."""
    caps = cdm.CAPS
    if kind == "realistic":  # every count at its cap: 1,000 entities, 50,000 attributes, 20,000 partitions
        ents = []
        for e in range(caps.entities):
            ents.append({"$type": "LocalEntity", "name": f"Segment{e}",
                         "attributes": [{"name": f"c{a}", "dataType": "string"}
                                        for a in range(caps.attributes // caps.entities)],
                         "partitions": [{"name": f"p{p}", "location": f"Segment{e}/2026/11/28/0130/p{p}.csv"}
                                        for p in range(caps.partitions // caps.entities)]})
        data = model(ents)
    else:  # as many tiny objects as the container cap admits, the rest of the bytes small numbers
        head = b'{"entities": [' + b'{"a":0},' * (caps.containers - 3)
        data = head + b"1e1," * ((caps.bytes - len(head) - 20) // 4) + b"0]}"
    assert len(data) <= caps.bytes and data.count(b"{") + data.count(b"[") <= caps.containers, kind
    return data


@pytest.mark.parametrize("kind", ["realistic", "tiny objects"])
def test_peak_memory_parsing_the_worst_model_json_the_caps_admit(tmp_path: Path, kind: str) -> None:
    (tmp_path / "model.json").write_bytes(_at_the_caps(kind))
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    peak_mb, outcome = out.stdout.split(" ", 1)
    assert int(peak_mb) < 200, f"{kind}: peak RSS {peak_mb} MB ({outcome.strip()})"
    assert ("partitions" if kind == "realistic" else "refused") in outcome


def test_the_caps_bound_what_the_fault_suite_s_bomb_holds(root: Path, store: LocalFolderStore) -> None:
    """62.9 MB of model.json with 3.2M attributes (issue 12 §6) is refused by its size before it is read."""
    put(root, f"{EXPORT}/model.json", b" " * (cdm.CAPS.bytes + 1))
    with pytest.raises(SourceError, match=r"is larger than 8,388,608 bytes"):
        discover(store, EXPORT)


# ------------------------------------------------------------------------------------------------ end to end


def cdm_export(root: Path) -> Path:
    """A Customer Insights-like export that needs every rule above: a header and ',' only the trait declares, an
    ISO-8859-1 partition, a UTF-16 one, a hidden QuoteStyle.None one, a header-only one, an empty segment and a
    linked (ReferenceEntity) segment in a sibling model.json."""
    base = f"{URL}/HighValue/2026/11/28/0130"
    put(root, f"{EXPORT}/HighValue/2026/11/28/0130/HighValue_1.csv",
        "CustomerId,EmailAddress,FirstName,LastName\r\n1,ann@x.com,\"Ann, Jr.\",Lee\r\n")
    put(root, f"{EXPORT}/HighValue/2026/11/28/0130/HighValue_2.csv",
        '"2","jurgen@x.com","Jürgen","Müller"\r\n"3","not-an-email","X","Y"\r\n'.encode("latin-1"))
    put(root, f"{EXPORT}/HighValue/2026/11/28/0130/HighValue_3.csv",
        '"4","zoe@x.com","Zoë","Núñez"\r\n'.encode("utf-16"))
    put(root, f"{EXPORT}/HighValue/2026/11/28/0130/HighValue_4.csv", '5;obrien@x.com;"Pat";O"Brien\n')
    put(root, f"{EXPORT}/HighValue/2026/11/28/0130/HighValue_5.csv", "CustomerId,EmailAddress,FirstName,LastName\n")
    legacy = {"columnHeaders": False, "delimiter": ";", "quoteStyle": "QuoteStyle.None", "encoding": "ASCII"}
    high = entity("HighValue", [
        partition("HighValue_1", f"{base}/HighValue_1.csv", legacy,
                  [csv_trait(columnHeaders="true", delimiter=",", quoteStyle="QuoteStyle.Csv", encoding="UTF-8")]),
        partition("HighValue_2", f"{base}/HighValue_2.csv", {"columnHeaders": "false", "encoding": "ISO-8859-1"}),
        partition("HighValue_3", f"{base}/HighValue_3.csv", {"encoding": "UTF-16"}),
        partition("HighValue_4", f"{base}/HighValue_4.csv", legacy, isHidden=True),
        partition("HighValue_5", f"{base}/HighValue_5.csv", {"columnHeaders": "true"}),
    ])
    put(root, f"{EXPORT}/Shared/Loyal/l.csv", '"6","loyal@x.com","Lou","Yale"\r\n')
    put(root, f"{EXPORT}/Shared/model.json", model([entity("Loyal", [partition("l", "Loyal/l.csv")])]))
    linked = {"$type": "ReferenceEntity", "name": "Loyalty", "source": "Loyal", "modelId": "shared"}
    put(root, f"{EXPORT}/model.json", model([high, entity("Lapsed", []), linked],
                                            referenceModels=[{"id": "shared", "location": "Shared/model.json"}]))
    return root / EXPORT / "model.json"


def _cli(env: dict[str, str], config: Path, source: Path, state: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared", "export", "--config", str(config), "--destination", "vip",
                           "--source", str(source), "--state-dir", str(state), "--quiet", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _config(path: Path, list_id: str, **mapping: str) -> Path:
    path.write_bytes(orjson.dumps({"destinations": [{
        "name": "vip", "consent": True, "api_key_secret": "sendgrid-api-key", "list_id": list_id,
        "segments": ["HighValue", "Lapsed", "Loyalty", "Gone"], "max_profiles": 1000,
        "mapping": {"email": "EmailAddress", "first_name": "FirstName", "last_name": "LastName", **mapping}}]}))
    return path


def test_a_cdm_export_reaches_the_list_as_the_sdk_reads_it(sandbox: Any, tmp_path: Path) -> None:
    source = cdm_export(tmp_path / "exports")
    list_id = sandbox.box.create_list("VIP")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    env.update(SENDGRID_API_KEY=sandbox.key, SENDGRID_API_URL=sandbox.url)
    report_path = tmp_path / "report.json"
    res = _cli(env, _config(tmp_path / "d.json", list_id), source, tmp_path / "state", "--wait",
               "--report", str(report_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(sandbox.box.list_emails(list_id)) == ["ann@x.com", "jurgen@x.com", "loyal@x.com", "obrien@x.com",
                                                        "zoe@x.com"]
    people = {e: (c["first_name"], c["last_name"]) for e in sandbox.box.list_emails(list_id)
              if (c := sandbox.box.contact(e))}
    assert people["ann@x.com"] == ("Ann, Jr.", "Lee") and people["jurgen@x.com"] == ("Jürgen", "Müller")
    assert people["zoe@x.com"] == ("Zoë", "Núñez") and people["obrien@x.com"] == ('"Pat"', 'O"Brien')
    report = orjson.loads(report_path.read_bytes())
    assert report["status"] == "completed" and report["counts"]["rejected"] == {"invalid_email": 1}
    hv5 = "BlobExport/HighValue/2026/11/28/0130/HighValue_5.csv"  # keys name the export folder (issue 14)
    assert report["warnings"] == ["segments not in this export: Gone",
                                  "segment 'Lapsed' is in the export without partitions (an empty segment): no "
                                  "contacts come from it",
                                  f"0 rows in {hv5}"]  # once, though max_profiles reads the export twice
    assert [s["segment"] for s in report["sources"]] == ["HighValue"] * 5 + ["Loyalty"]


def test_a_mapped_column_no_file_has_refuses_even_a_dry_run(sandbox: Any, tmp_path: Path) -> None:
    source = cdm_export(tmp_path / "exports")
    list_id = sandbox.box.create_list("VIP")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDGRID", "KEY_VAULT"))}
    env.update(SENDGRID_API_KEY=sandbox.key, SENDGRID_API_URL=sandbox.url)
    config = _config(tmp_path / "d.json", list_id, city="City")
    for extra in (["--dry-run"], []):
        res = _cli(env, config, source, tmp_path / "state", *extra)
        assert res.returncode == 1 and "refused" in res.stdout, res.stdout + res.stderr
        assert "'City' (mapping city) are in none of the export's files" in res.stdout
        assert "'CustomerId', 'EmailAddress', 'FirstName', 'LastName'" in res.stdout
    assert sandbox.box.stats["requests"].get("PUT /v3/marketing/contacts", 0) == 0

"""sources: finding an export's partitions (CDM model.json, plain files) and streaming rows, good and bad."""

from __future__ import annotations

import gzip
import io
import random
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared import sources
from shared.errors import SourceError
from shared.sources import Partition, discover, read_rows
from shared.storage import LocalFolderStore

EXPORT = "CustomerInsights_abcd/BlobExport"
URL = "https://acct.blob.core.windows.net/exports/" + EXPORT
COLS = ["CustomerId", "EmailAddress", "FirstName", "LastName", "Country"]


def put(root: Path, key: str, data: bytes | str) -> str:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return key


def entity(name: str, locations: list[str], *, cols: list[str] = COLS, headers: bool = False,
           delimiter: str = ",") -> dict[str, Any]:
    return {
        "$type": "LocalEntity",
        "name": name,
        "attributes": [{"name": c, "dataType": "string"} for c in cols],
        "partitions": [{"name": f"{name}_{i + 1}", "location": loc,
                        "fileFormatSettings": {"$type": "CsvFormatSettings", "columnHeaders": headers,
                                               "delimiter": delimiter, "encoding": "UTF-8"}}
                       for i, loc in enumerate(locations)],
    }


def put_model(root: Path, entities: list[Any], folder: str = EXPORT) -> str:
    return put(root, f"{folder}/model.json", orjson.dumps({"name": "BlobExport", "version": "1.0",
                                                          "entities": entities}))


def run_path(seg: str, n: int) -> str:
    return f"{seg}/2026/11/28/0130/{seg}_{n}.csv"


def rows(store: LocalFolderStore, part: Partition, wanted: list[str], required: tuple[str, ...] = (),
         warnings: list[str] | None = None, **kw: Any) -> list[tuple[int, Any, Any]]:
    return list(read_rows(store, part, wanted, required, warnings, **kw))


def plain(store: LocalFolderStore, key: str) -> Partition:
    [part] = discover(store, key)
    return part


def good(result: list[tuple[int, Any, Any]]) -> list[tuple[int, Any]]:
    return [(ln, v) for ln, v, r in result if r is None]


def bad(result: list[tuple[int, Any, Any]]) -> list[tuple[int, str]]:
    return [(ln, r) for ln, v, r in result if r is not None]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "exports"


@pytest.fixture
def store(root: Path) -> LocalFolderStore:
    root.mkdir()
    return LocalFolderStore(root)


# ------------------------------------------------------------------------------------------------ discover: CDM


def test_cdm_headerless_partitions_by_absolute_url(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/{run_path('HighValue', 1)}", '"1","a@x.com","Ann","Lee","US"\n"2","b@x.com","Bo","Ng","FR"\n')
    put(root, f"{EXPORT}/{run_path('HighValue', 2)}", '"3","c@x.com","Cy","Oz","DE"\n')
    sas = "?sv=2024-01-01&sig=SECRETSIG"
    put_model(root, [entity("HighValue", [f"{URL}/{run_path('HighValue', n)}{sas if n == 1 else ''}" for n in (1, 2)])])

    parts = discover(store, EXPORT)
    assert [p.key for p in parts] == [f"{EXPORT}/{run_path('HighValue', n)}" for n in (1, 2)]
    assert all(p.segment == "HighValue" and p.fmt == "csv" and not p.header and not p.compressed for p in parts)
    assert parts[0].columns == tuple(COLS)
    assert discover(store, f"{EXPORT}/model.json") == parts == discover(store, f"/{EXPORT}/")

    got = [rows(store, p, ["EmailAddress", "FirstName", "Country"], ("EmailAddress",)) for p in parts]
    assert got[0] == [(1, ["a@x.com", "Ann", "US"], None), (2, ["b@x.com", "Bo", "FR"], None)]
    assert got[1] == [(1, ["c@x.com", "Cy", "DE"], None)]


def test_cdm_column_headers_true_skips_and_counts_the_header(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p1.csv", "CustomerId;EmailAddress;FirstName;LastName;Country\n1;a@x.com;Ann;Lee;US\n")
    put_model(root, [entity("S", [f"{URL}/S/p1.csv"], headers=True, delimiter=";")])
    [part] = discover(store, EXPORT)
    assert part.header and part.delimiter == ";"
    warnings: list[str] = []
    assert rows(store, part, ["EmailAddress"], ("EmailAddress",), warnings) == [(2, ["a@x.com"], None)]
    assert warnings == []


def test_cdm_header_differing_from_attributes_is_warned(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p1.csv", "id,mail,first,last,country\n1,a@x.com,Ann,Lee,US\n")
    put_model(root, [entity("S", ["S/p1.csv"], headers=True)])
    warnings: list[str] = []
    assert rows(store, discover(store, EXPORT)[0], ["EmailAddress"], (), warnings) == [(2, ["a@x.com"], None)]
    assert len(warnings) == 1 and "differs from model.json" in warnings[0] and "'mail'" in warnings[0]


def test_segments_filter_and_order(root: Path, store: LocalFolderStore) -> None:
    for seg in ("A", "B", "C"):
        put(root, f"{EXPORT}/{seg}/{seg}_1.csv", "1,a@x.com,,,\n")
    put(root, f"{EXPORT}/C/C_2.csv", "1,a@x.com,,,\n")
    put_model(root, [entity(s, [f"{s}/{s}_1.csv"] + ([f"{s}/{s}_2.csv"] if s == "C" else [])) for s in "ABC"])

    assert [p.key.split("/", 2)[2] for p in discover(store, EXPORT)] == ["A/A_1.csv", "B/B_1.csv", "C/C_1.csv",
                                                                          "C/C_2.csv"]
    picked = discover(store, EXPORT, ["C", "Missing", "a", "A", "C"])
    assert [(p.segment, p.key.rsplit("/", 1)[1]) for p in picked] == [("C", "C_1.csv"), ("C", "C_2.csv"),
                                                                       ("A", "A_1.csv")]
    with pytest.raises(SourceError, match=r"model\.json: none of the segments \(Missing\) is in this export"):
        discover(store, EXPORT, ["Missing"])


def test_partition_url_outside_the_store_is_refused_without_sas(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/S_1.csv", "1,a@x.com,,,\n")
    put_model(root, [entity("S", [f"{URL}/S/S_1.csv",
                                  "https://evil.blob.core.windows.net/other/x/S_2.csv?sv=1&sig=SECRETSIG"])])
    with pytest.raises(SourceError) as e:
        discover(store, EXPORT)
    msg = str(e.value)
    assert f"{EXPORT}/model.json" in msg and "entity 'S'" in msg and "partition 'S_2'" in msg
    assert "evil.blob.core.windows.net/other" in msg and "refused" in msg
    assert "SECRETSIG" not in msg and "sig=" not in msg and "sv=" not in msg


def test_relative_locations_resolve_below_the_model_folder(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/2026/p 1.csv", "1,a@x.com,Ann,,\n")
    put(root, f"{EXPORT}/S/2026/p2.csv.gz", gzip.compress(b"2,b@x.com,Bo,,\n"))
    put_model(root, [entity("S", ["S/2026/p%201.csv", "./S/2026/p2.csv.gz"])])
    p1, p2 = discover(store, EXPORT)
    assert (p1.key, p1.compressed) == (f"{EXPORT}/S/2026/p 1.csv", False)
    assert (p2.key, p2.compressed) == (f"{EXPORT}/S/2026/p2.csv.gz", True)
    assert rows(store, p2, ["EmailAddress", "FirstName"]) == [(1, ["b@x.com", "Bo"], None)]


@pytest.mark.parametrize("location", ["../Other/p.csv", "S/../../p.csv", "/etc/passwd", "\\\\server\\share\\p.csv"])
def test_relative_location_leaving_the_folder_is_refused(root: Path, store: LocalFolderStore, location: str) -> None:
    put_model(root, [entity("S", [location])])
    with pytest.raises(SourceError, match=r"model\.json: entity 'S', partition 'S_1'.*(refused|unusable)"):
        discover(store, EXPORT)


def _model_with(**changes: Any) -> dict[str, Any]:
    ent = entity("S", ["S/p.csv"])
    ent.update(changes)
    return {"name": "x", "entities": [ent]}


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"name": "x", "entities": [}', r"not valid JSON \(.* line 1, column \d+\).*re-run the export"),
    (b"[1, 2]", r"is a JSON array, not an object"),
    (b'{"name": "x"}', r"no 'entities' list"),
    (b'{"entities": [{"attributes": []}]}', r"entity #1 is not an object with a 'name'"),
    (orjson.dumps(_model_with(attributes=[])), r"entity 'S' has no attributes"),
    (orjson.dumps(_model_with(attributes=[{"dataType": "string"}])), r"attribute #1 has no name"),
    (orjson.dumps(_model_with(partitions={})), r"entity 'S': 'partitions' is not a list"),
    (orjson.dumps(_model_with(partitions=[{"name": "p1"}])), r"partition 'p1' has no location"),
    (orjson.dumps(_model_with(partitions=[{"name": "p1", "location": "S/p.csv",
                                           "fileFormatSettings": {"delimiter": ";;"}}])), r"unsupported delimiter"),
])
def test_malformed_model_json(root: Path, store: LocalFolderStore, content: bytes, expected: str) -> None:
    put(root, f"{EXPORT}/model.json", content)
    with pytest.raises(SourceError, match=expected) as e:
        discover(store, EXPORT)
    assert str(e.value).startswith(f"{EXPORT}/model.json: ")


def test_empty_partition_list_returns_nothing_for_that_entity(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/B/b.csv", "1,a@x.com,,,\n")
    put_model(root, [entity("A", []), entity("B", ["B/b.csv"])])
    assert [p.segment for p in discover(store, EXPORT)] == ["B"]


def test_missing_model_json_and_folders(root: Path, store: LocalFolderStore) -> None:
    put(root, "other/readme.txt", "x")
    with pytest.raises(SourceError, match=r"^other: is a folder without a model\.json"):
        discover(store, "other")
    with pytest.raises(SourceError, match=r"^nowhere: was not found in folder"):
        discover(store, "nowhere")
    with pytest.raises(SourceError, match=r"^nowhere/model\.json: was not found"):
        discover(store, "nowhere/model.json")
    with pytest.raises(SourceError, match="invalid storage key"):
        discover(store, "a/../b.csv")


# ------------------------------------------------------------------------------------------------ discover: plain


@pytest.mark.parametrize(("name", "data", "segment", "fmt", "compressed"), [
    ("contacts.csv", b"email\n", "contacts", "csv", False),
    ("my.contacts.CSV.gz", gzip.compress(b"email\n", mtime=0), "my.contacts", "csv", True),
    ("contacts.csv", gzip.compress(b"email\n", mtime=0), "contacts", "csv", True),  # gzip by its magic bytes
    ("c.jsonl", b"{}\n", "c", "jsonl", False),
    ("c.ndjson.gz", gzip.compress(b"{}\n", mtime=0), "c", "jsonl", True),
])
def test_plain_files(root: Path, store: LocalFolderStore, name: str, data: bytes, segment: str, fmt: str,
                     compressed: bool) -> None:
    put(root, f"drop/{name}", data)
    expected = Partition(segment, f"drop/{name}", fmt, compressed, None, fmt == "csv")  # type: ignore[arg-type]
    assert discover(store, f"drop/{name}", ["ignored"]) == [expected]


@pytest.mark.parametrize("name", ["contacts.xlsx", "contacts.csv.zip", "contacts", ".csv"])
def test_unknown_file_type_lists_what_is_accepted(root: Path, store: LocalFolderStore, name: str) -> None:
    put(root, f"drop/{name}", b"email\n")
    with pytest.raises(SourceError, match=r"unknown file type; accepted: \.csv, \.jsonl or \.ndjson.*\.gz"):
        discover(store, f"drop/{name}")


# ------------------------------------------------------------------------------------------------ read_rows: CSV


def test_csv_quoted_multiline_fields_bom_crlf_and_blank_lines(root: Path, store: LocalFolderStore) -> None:
    text = ('\ufeffemail,name,address\r\n'
            'a@x.com,"Lee, Ann","1 Main St\r\nApt 2"\r\n'
            '\r\n'
            'b@x.com,"Say ""hi""","3 Side St\n\nBack"\r\n'
            'c@x.com,Cy,\r\n')
    part = plain(store, put(root, "c.csv", text.encode()))
    assert rows(store, part, ["email", "name", "address"], ("email",)) == [
        (2, ["a@x.com", "Lee, Ann", "1 Main St\r\nApt 2"], None),
        (5, ["b@x.com", 'Say "hi"', "3 Side St\n\nBack"], None),
        (8, ["c@x.com", "Cy", ""], None),
    ]


def test_csv_classic_mac_line_breaks(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "mac.csv", 'email,note\r"a@x.com","two\rlines"\r\rb@x.com,x\r'))
    assert rows(store, part, ["email", "note"]) == [(2, ["a@x.com", "two\rlines"], None), (5, ["b@x.com", "x"], None)]


def test_csv_column_selection_order_and_absent_optional_columns(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "c.csv", " Email ,First,Last,City\na@x.com,Ann,Lee,Oslo\n"))
    warnings: list[str] = []
    got = rows(store, part, ["Last", "email", "Country", "First", "Last"], ("email",), warnings)
    assert got == [(2, ["Lee", "a@x.com", None, "Ann", "Lee"], None)]
    assert len(warnings) == 1 and "'Country' is not in the file" in warnings[0] and "c.csv" in warnings[0]
    assert rows(store, part, ["First", "Country"], (), []) == [(2, ["Ann", None], None)]


def test_csv_gzip(root: Path, store: LocalFolderStore) -> None:
    body = "email,first\n" + "".join(f"u{i}@x.com,N{i}\n" for i in range(5000))
    part = plain(store, put(root, "c.csv.gz", gzip.compress(body.encode())))
    got = rows(store, part, ["email"], ("email",))
    assert len(got) == 5000 and got[0] == (2, ["u0@x.com"], None) and got[-1] == (5001, ["u4999@x.com"], None)


# ------------------------------------------------------------------------------------------------ the bad-input corpus


def test_empty_file_gives_no_rows_and_no_error(root: Path, store: LocalFolderStore) -> None:
    """A 0-byte plain file is an empty segment (the pipeline notes "0 rows in <file>"), not a file error."""
    assert rows(store, plain(store, put(root, "bad/empty.csv", b"")), ["email"], ("email",)) == []
    put(root, f"{EXPORT}/S/p.csv", b"")  # a headerless CDM partition too
    put_model(root, [entity("S", ["S/p.csv"])])
    assert rows(store, discover(store, EXPORT)[0], ["EmailAddress"], ("EmailAddress",)) == []


def test_header_only(root: Path, store: LocalFolderStore) -> None:
    assert rows(store, plain(store, put(root, "h.csv", "email,first\r\n")), ["email"], ("email",)) == []


def test_required_column_absent_lists_the_file_columns(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "bad/noemail.csv", "id,first,last\n1,Ann,Lee\n"))
    with pytest.raises(SourceError) as e:
        rows(store, part, ["email", "first"], ("email",))
    msg = str(e.value)
    assert msg.startswith("bad/noemail.csv, line 1: required column(s) 'email' not found")
    assert "'id', 'first', 'last'" in msg and "Fix the column mapping or the export" in msg
    with pytest.raises(SourceError, match=r"required column\(s\) 'email' not found"):
        rows(store, part, ["first"], ("email",))  # required but not among the wanted columns


def test_wrong_delimiter(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "bad/semi.csv", "email;first\na@x.com;Ann\n"))
    with pytest.raises(SourceError, match=r"bad/semi\.csv, line 1: .*'email;first'.*looks ';'-delimited"):
        rows(store, part, ["email"], ("email",))
    # Headerless CDM partition written with ';' but declared ',': every row is rejected, naming its line.
    put(root, f"{EXPORT}/S/p.csv", "1;a@x.com;Ann;Lee;US\n2;b@x.com;Bo;Ng;FR\n")
    put_model(root, [entity("S", ["S/p.csv"])])
    got = rows(store, discover(store, EXPORT)[0], ["EmailAddress"], ("EmailAddress",))
    assert [ln for ln, _ in bad(got)] == [1, 2] and good(got) == []
    assert "expected 5 fields, found 1; check the delimiter" in got[0][2]


def test_invalid_utf8(root: Path, store: LocalFolderStore) -> None:
    data = b"email,first,notes\na@x.com,Ann,ok\nb@x.com,Ren\xe9,ok\nc@x.com,Cy,caf\xe9\nd@x.com,D\xc3\xa9,ok\n"
    part = plain(store, put(root, "bad/latin1.csv", data))
    got = rows(store, part, ["email", "first"], ("email",))
    assert good(got) == [(2, ["a@x.com", "Ann"]), (4, ["c@x.com", "Cy"]), (5, ["d@x.com", "Dé"])]
    [(line, reason)] = bad(got)
    assert line == 3 and "column 'first'" in reason and "not valid UTF-8 (0xE9" in reason and "UTF-8" in reason


def test_bom_only_before_the_header(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "bad/bom.csv", b"\xef\xbb\xbfemail\r\na@x.com\r\n"))
    assert rows(store, part, ["email"], ("email",)) == [(2, ["a@x.com"], None)]
    jpart = plain(store, put(root, "bad/bom.jsonl", b'\xef\xbb\xbf{"email": "a@x.com"}\n'))
    assert rows(store, jpart, ["email"], ("email",)) == [(1, ["a@x.com"], None)]


def test_nul_bytes(root: Path, store: LocalFolderStore) -> None:
    data = b"email,first\na@x.com,Ann\nb@x\x00.com,Bo\n\x00\x00\x00\nc@x.com,Cy\n"
    got = rows(store, plain(store, put(root, "bad/nul.csv", data)), ["email", "first"], ("email",))
    assert good(got) == [(2, ["a@x.com", "Ann"]), (5, ["c@x.com", "Cy"])]
    assert [ln for ln, _ in bad(got)] == [3, 4]
    assert "column 'email' contains a NUL byte" in bad(got)[0][1]


def until_error(store: LocalFolderStore, part: Partition, wanted: list[str], required: tuple[str, ...] = (),
                **kw: Any) -> tuple[list[tuple[int, Any, Any]], SourceError]:
    """The rows yielded before the SourceError that must end the read, and that error."""
    got: list[tuple[int, Any, Any]] = []
    with pytest.raises(SourceError) as e:
        got.extend(read_rows(store, part, wanted, required, **kw))
    return got, e.value


def test_unterminated_quote_at_the_end_is_a_file_cut_short(root: Path, store: LocalFolderStore) -> None:
    data = 'email,first\na@x.com,Ann\nb@x.com,"Bo\nc@x.com,Cy\nd@x.com,Di\n'
    got, err = until_error(store, plain(store, put(root, "bad/quote.csv", data)), ["email", "first"], ("email",))
    assert got == [(2, ["a@x.com", "Ann"], None)]
    assert str(err).startswith("bad/quote.csv, line 3: the file is cut short: its last record (from line 3) ends "
                               "inside a quoted field") and "rows before it were read" in str(err)


def test_unterminated_quote_in_a_large_file_is_a_file_cut_short(root: Path, store: LocalFolderStore) -> None:
    data = 'email,first\na@x.com,Ann\nb@x.com,"Bo\n' + "".join(f"u{i}@x.com,N{i}\n" for i in range(100_000))
    got, err = until_error(store, plain(store, put(root, "bad/quote.csv", data.encode())), ["email"], ("email",))
    assert got == [(2, ["a@x.com"], None)]
    assert "line 3: the file is cut short" in str(err) and "longer than 1048576 characters" in str(err)


@pytest.mark.parametrize(("tail", "kept"), [
    ("c@x.com,Cy,Lee\n", 3),  # whole
    ("c@x.com,Cy,Lee", 3),  # whole, only without a line break
    ("c@x.com,Cy,", 3),  # the last field empty: still three fields
    ('c@x.com,"Cy",Lee', 3),
])
def test_a_complete_last_line_without_a_line_break_is_a_row(root: Path, store: LocalFolderStore, tail: str,
                                                             kept: int) -> None:
    part = plain(store, put(root, "p.csv", "email,first,last\na@x.com,Ann,Lee\nb@x.com,Bo,Ng\n" + tail))
    got = rows(store, part, ["email", "last"], ("email",))
    assert [ln for ln, _, _ in got] == [2, 3, 4][:kept] and not bad(got)


@pytest.mark.parametrize("tail", ["c@x.com,Cy", "c@x.co", 'c@x.com,"Cy', 'c@x.com,"Cy,\n'])
def test_a_last_record_cut_short_is_a_file_error_after_the_rows_before(root: Path, store: LocalFolderStore,
                                                                        tail: str) -> None:
    part = plain(store, put(root, "p.csv", "email,first,last\na@x.com,Ann,Lee\nb@x.com,Bo,Ng\n" + tail))
    got, err = until_error(store, part, ["email", "last"], ("email",))
    assert got == [(2, ["a@x.com", "Lee"], None), (3, ["b@x.com", "Ng"], None)]
    assert str(err).startswith("p.csv, line 4: the file is cut short: its last record (from line 4)")


def test_a_short_line_in_the_middle_is_only_a_rejected_row(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "p.csv", "email,first,last\na@x.com,Ann\nb@x.com,Bo,Ng"))
    got = rows(store, part, ["email"], ("email",))
    assert good(got) == [(3, ["b@x.com"])] and bad(got)[0][0] == 2 and "expected 3 fields, found 2" in bad(got)[0][1]


def test_a_cut_short_cdm_partition_and_json_lines(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p.csv.gz", gzip.compress(b'"1","a@x.com","Ann","Lee","US"\n"2","b@x.com","Bo"'))
    put_model(root, [entity("S", ["S/p.csv.gz"])])
    got, err = until_error(store, discover(store, EXPORT)[0], ["EmailAddress"], ("EmailAddress",))
    assert got == [(1, ["a@x.com"], None)] and "line 2: the file is cut short" in str(err)
    assert "has 3 of 5 fields and no line break" in str(err)
    part = plain(store, put(root, "j.jsonl", b'{"email": "a@x.com"}\nnot json\n{"email": "b@x.c'))
    got, err = until_error(store, part, ["email"], ("email",))
    assert good(got) == [(1, ["a@x.com"])] and bad(got)[0][0] == 2  # a bad line in the middle stays a rejection
    assert str(err).startswith("j.jsonl, line 3: the file is cut short") and "not complete JSON" in str(err)


def test_malformed_quoting_rejects_the_row_and_goes_on(root: Path, store: LocalFolderStore) -> None:
    data = 'email,first\n"a@x.com"junk,Ann\nb@x.com,Bo\n'
    got = rows(store, plain(store, put(root, "bad/q.csv", data)), ["email"], ("email",))
    assert good(got) == [(3, ["b@x.com"])]
    assert bad(got)[0][0] == 2 and "text follows a closing quote" in bad(got)[0][1]


def _peak(fn: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ten_megabyte_field(root: Path, store: LocalFolderStore) -> None:
    data = b"email,notes\na@x.com,x\nb@x.com," + b"y" * 10_000_000 + b"\nc@x.com,z\n"
    part = plain(store, put(root, "bad/bigfield.csv", data))
    got, peak = _peak(lambda: rows(store, part, ["email", "notes"], ("email",)))
    assert good(got) == [(2, ["a@x.com", "x"]), (4, ["c@x.com", "z"])]
    [(line, reason)] = bad(got)
    assert line == 3 and "line 3 is longer than 4 MiB and was skipped" in reason
    assert peak < 20_000_000


def test_field_over_the_field_cap(root: Path, store: LocalFolderStore) -> None:
    data = b"email,notes\nb@x.com," + b"y" * 2_000_000 + b'\nc@x.com,"' + b"q\n" * 600_000 + b'"\nd@x.com,z\n'
    got = rows(store, plain(store, put(root, "bad/field.csv", data)), ["email"], ("email",))
    assert got[0][0] == 2 and "a field is longer than 1048576 characters" in got[0][2]
    # A quoted field over the cap that spans lines: the whole row is skipped, the reader resumes after it.
    assert got[1:] == [(3, None, "a quoted field in the row on lines 3-600003 is longer than 1048576 characters (the "
                                 "limit); the row was skipped: shorten the value or fix the quoting"),
                       (600_004, ["d@x.com"], None)]
    assert rows(store, plain(store, put(root, "bad/small.csv", b"a,b\n1,22222\n")), ["a"], (), max_field=4)[0][2]


def test_a_line_of_a_million_columns(root: Path, store: LocalFolderStore) -> None:
    data = b"email,first\na@x.com,Ann\n" + b",".join([b"x"] * 1_000_000) + b"\nc@x.com,Cy\n"
    part = plain(store, put(root, "bad/wide.csv", data))
    got, peak = _peak(lambda: rows(store, part, ["email"], ("email",)))
    assert good(got) == [(2, ["a@x.com"]), (4, ["c@x.com"])]
    assert bad(got) == [(3, "expected 2 fields, found 1000000; check the delimiter and quoting of this row in the "
                            "export")]
    assert peak < 40_000_000


def test_a_file_without_line_breaks_is_not_read_into_memory(root: Path, store: LocalFolderStore) -> None:
    put(root, f"{EXPORT}/S/p.csv", b"1,a@x.com,Ann,Lee,US\n" + b"z" * 30_000_000)
    put_model(root, [entity("S", ["S/p.csv"])])
    got, peak = _peak(lambda: rows(store, discover(store, EXPORT)[0], ["EmailAddress"], ("EmailAddress",)))
    assert good(got) == [(1, ["a@x.com"])] and [ln for ln, _ in bad(got)] == [2]
    assert peak < 20_000_000
    header_part = plain(store, put(root, "bad/oneline.csv", b"e" * 5_000_000))
    with pytest.raises(SourceError, match=r"bad/oneline\.csv, line 1: the header row is longer than 4 MiB"):
        rows(store, header_part, ["email"], ("email",))


def test_every_row_invalid(root: Path, store: LocalFolderStore) -> None:
    data = "email,first\n" + "".join(f"row{i}\n" for i in range(100))
    got = rows(store, plain(store, put(root, "bad/allbad.csv", data)), ["email"], ("email",))
    assert good(got) == [] and [ln for ln, _ in bad(got)] == list(range(2, 102))


def test_truncated_gzip_yields_the_good_rows_then_raises(root: Path, store: LocalFolderStore) -> None:
    body = "email,n\n" + "".join(f"u{i}@x.com,{i}\n" for i in range(20000))
    packed = gzip.compress(body.encode())
    part = plain(store, put(root, "bad/cut.csv.gz", packed[: len(packed) // 2]))
    seen: list[int] = []
    with pytest.raises(SourceError) as e:
        for line, values, reason in read_rows(store, part, ["email"], ("email",)):
            assert reason is None and values == [f"u{line - 2}@x.com"]
            seen.append(line)
    assert seen and seen == list(range(2, seen[-1] + 1))
    assert str(e.value).startswith(f"bad/cut.csv.gz, line {seen[-1] + 1}: the file is truncated or corrupt")


def test_corrupt_gzip_raises_naming_file_and_line(root: Path, store: LocalFolderStore) -> None:
    packed = bytearray(gzip.compress(("email\n" + "a@x.com\n" * 1000).encode()))
    packed[len(packed) // 2: len(packed) // 2 + 8] = b"\xff" * 8
    part = plain(store, put(root, "bad/corrupt.csv.gz", bytes(packed)))
    with pytest.raises(SourceError, match=r"^bad/corrupt\.csv\.gz, line \d+: the file is truncated or corrupt"):
        rows(store, part, ["email"], ("email",))


def test_partition_deleted_before_reading(root: Path, store: LocalFolderStore) -> None:
    part = plain(store, put(root, "gone.csv", "email\n"))
    (root / "gone.csv").unlink()
    with pytest.raises(SourceError, match=r"^gone\.csv: was not found"):
        rows(store, part, ["email"])


# ------------------------------------------------------------------------------------------------ JSON Lines


def test_jsonl_values_and_bad_lines(root: Path, store: LocalFolderStore) -> None:
    lines = [
        b'{"email": "a@x.com", "n": 12, "f": 1.5, "ok": true, "no": false, "z": null, "tags": ["a", "b"], '
        b'"o": {"k": 1}}',
        b"",
        b'{"email": "b@x.com", broken',
        b'["not", "an", "object"]',
        b'{"email": "c\\u0000@x.com"}',
        b'{"first": "NoEmail"}',
        b'{"email": "d@x.com", "n": "7"}',
        b'{"email": "caf\xe9@x.com"}',
        b"   ",
        b'{"email": "e@x.com"}',
    ]
    part = plain(store, put(root, "bad/c.jsonl", b"\n".join(lines)))
    warnings: list[str] = []
    got = rows(store, part, ["email", "n", "f", "ok", "no", "z", "tags", "o", "missing"], ("email",), warnings)
    assert good(got) == [
        (1, ["a@x.com", "12", "1.5", "true", "false", None, '["a","b"]', '{"k":1}', None]),
        (7, ["d@x.com", "7", None, None, None, None, None, None, None]),
        (10, ["e@x.com", None, None, None, None, None, None, None, None]),
    ]
    reasons = dict(bad(got))
    assert sorted(reasons) == [3, 4, 5, 6, 8]
    assert reasons[3].startswith("not valid JSON (") and "column" in reasons[3]
    assert "a JSON array, not an object" in reasons[4]
    assert "NUL character" in reasons[5]
    assert "no 'email' key" in reasons[6] and "'first'" in reasons[6]
    assert "not valid JSON" in reasons[8]
    assert warnings == ["bad/c.jsonl: no object has the key 'missing'; its value is empty in every row"]


def test_jsonl_gzip_and_long_line(root: Path, store: LocalFolderStore) -> None:
    body = b'{"email": "a@x.com"}\n{"email": "' + b"x" * (17 * 1024 * 1024) + b'"}\n{"email": "c@x.com"}\n'
    part = plain(store, put(root, "bad/long.ndjson.gz", gzip.compress(body, compresslevel=1)))
    got, peak = _peak(lambda: rows(store, part, ["email"], ("email",)))
    assert good(got) == [(1, ["a@x.com"]), (3, ["c@x.com"])]
    assert bad(got)[0][0] == 2 and "line 2 is longer than 16 MiB" in bad(got)[0][1]
    assert peak < 40_000_000


def test_jsonl_truncated_gzip(root: Path, store: LocalFolderStore) -> None:
    packed = gzip.compress(b"".join(b'{"email": "u%d@x.com"}\n' % i for i in range(20000)))
    part = plain(store, put(root, "bad/cut.jsonl.gz", packed[:-20]))
    with pytest.raises(SourceError, match=r"^bad/cut\.jsonl\.gz, line \d+: the file is truncated or corrupt"):
        rows(store, part, ["email"])


# ------------------------------------------------------------------------------------------------ the line guard


@pytest.mark.parametrize("seed", range(30))
def test_line_guard_replaces_exactly_the_over_long_lines(seed: int) -> None:
    rnd = random.Random(seed)
    data = bytes(rnd.choice(b"ab\r\n") if rnd.random() < 0.3 else 97 for _ in range(rnd.randint(0, 400)))
    cap = rnd.randint(1, 12)
    cr = rnd.random() < 0.5
    # Reference: split at every line-break byte; any piece longer than cap becomes the marker.
    breaks = b"\r\n" if cr else b"\n"
    expected, piece = bytearray(), bytearray()
    for byte in data:
        if byte in breaks:
            expected += (sources._MARKER if len(piece) > cap else piece) + bytes([byte])
            piece.clear()
        else:
            piece.append(byte)
    expected += sources._MARKER if len(piece) > cap else piece
    guard = sources._LineGuard(io.BytesIO(data), cap, breaks)
    assert io.BufferedReader(guard, 7).read() == bytes(expected)  # type: ignore[arg-type]
    guard = sources._LineGuard(io.BytesIO(data), cap, breaks)
    assert b"".join(iter(lambda: guard.read1(rnd.randint(1, 9)), b"")) == bytes(expected)

"""The run-history page as HTML (shared/page.py): what each page holds, escaped, for records with and without the
fields issue 14 adds. The pages served by the Functions app and seen in a real browser: tests/test_page_browser.py."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from shared import cli, page
from shared.state import StateStore, parse_iso
from shared.storage import LocalFolderStore

HOSTILE_FILE = '<img src=x onerror="alert(1)">&amp;.csv'
HOSTILE_REASON = "invalid email '</td><script>alert(2)</script>'"
LINKS = page.Links(home="ui", run=lambda run_id: f"ui/runs/{run_id}",
                   rejections=lambda destination, run_id: f"runs/{run_id}/rejections")


class Parsed(HTMLParser):
    """Elements (tag, attributes), the text of each table row's cells and the page's text (style and title aside),
    as a browser's parser sees them; pieces of text are joined with one space."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self.pieces: list[str] = []
        self._cell: list[str] | None = None
        self._hidden = False
        self.feed(text)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.pieces).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._hidden = tag in ("style", "title")
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        self._hidden = False
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        self.pieces.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.elements if tag == name]


def record(n: int, status: str = "completed", **extra: Any) -> dict[str, Any]:
    """A run record as the engine stores it (counts, jobs, a rejection sample), without issue 14's fields."""
    return {"run_id": f"20300101T0{n:05d}Z-0a1b2c3d", "destination": "vip", "display_name": "VIP", "trigger": "blob",
            "status": status, "dry_run": False, "source": "vip/export.csv",
            "started_at": f"2030-01-01T0{n % 10}:00:00Z",
            "finished_at": f"2030-01-01T0{n % 10}:01:05Z", "counts": {"read": 110 * n, "valid": 100 * n,
            "rejected": {"invalid_email": 10 * n}, "rejected_total": 10 * n, "duplicates": 0, "sent": 100 * n},
            "requests": {"count": 1, "bytes": 2048}, "jobs": [], "warnings": [], "file_errors": [],
            "rejections": [], "timings": {"seconds": 65.0}} | extra


def view(runs: list[dict[str, Any]], **fields: Any) -> page.DestinationView:
    return page.DestinationView(**({"name": "vip", "display_name": "VIP", "runs": runs, "enabled": True,
                                    "mode": "upsert"} | fields))


def test_a_hostile_file_name_and_reason_stay_text() -> None:
    hostile = record(1, rejections=[{"file": HOSTILE_FILE, "line": 7, "reason": HOSTILE_REASON}],
                     warnings=[f"0 rows in {HOSTILE_FILE}"], file_errors=[f"{HOSTILE_FILE}: cut short"],
                     source=HOSTILE_FILE, rejections_file="runs/vip/x.rejections.csv",
                     jobs=[{"id": "j1", "contacts": 5, "status": "errored", "errors": [HOSTILE_REASON]}])
    for html in (page.run_page(hostile, LINKS),
                 page.overview([view([hostile], display_name='<b onmouseover="x">VIP</b>')], 0.0, LINKS)):
        parsed = Parsed(html)
        assert not parsed.tags("img") and not parsed.tags("script") and not parsed.tags("b")
        assert not any(k.startswith("on") for _, attrs in parsed.elements for k in attrs)
    text = Parsed(page.run_page(hostile, LINKS)).text
    assert HOSTILE_FILE in text and HOSTILE_REASON in text  # shown as what it is, every character
    assert [HOSTILE_FILE, "7", HOSTILE_REASON] in Parsed(page.run_page(hostile, LINKS)).rows


def test_the_runs_table_shows_changes_when_a_record_has_them_and_a_dash_when_not() -> None:
    changes = {"new": 3, "changed": 2, "unchanged": 95, "removed": 0, "rejected": 4, "not_applied": 1}
    newer = record(2, changes=changes, trigger="schedule")
    older = record(1)  # written before runs counted changes
    rows = Parsed(page.overview([view([newer, older])], 0.0, LINKS)).rows
    head = ["Started", "Trigger", "Status", "New", "Changed", "Unchanged", "Removed", "Rejected", "Not applied",
            "Sent", "Duration"]
    assert head in rows
    runs = rows[rows.index(head) + 1:]
    assert runs == [
        ["2030-01-01 02:00:00", "schedule", "completed", "3", "2", "95", "0", "4", "1", "200", "1 min 05 s"],
        ["2030-01-01 01:00:00", "blob", "completed", "—", "—", "—", "—", "10", "—", "100", "1 min 05 s"]]


def test_the_overview_names_each_destination_its_schedule_next_due_and_last_run() -> None:
    views = [view([record(1, status="failed")], schedule="0 0 6 * * *", next_due="2030-01-02T06:00:00Z",
                  list_id="0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10"),
             page.DestinationView("off", "Off", [], enabled=False, blocked="destination 'off' is disabled"),
             page.DestinationView("#2", "#2", [], error="destinations.json: destination '#2': field 'name': required")]
    parsed = Parsed(page.overview(views, 0.0, LINKS))
    summary = parsed.rows[1:4]
    assert summary[0] == ["VIP vip", "yes", "upsert", "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10", "0 0 6 * * * UTC",
                          "2030-01-02 06:00:00", "failed 2030-01-01 01:00:00"]
    assert summary[1][:2] == ["Off off", "no destination 'off' is disabled"] and summary[1][-1] == "no run yet"
    assert summary[2][1] == "invalid" and "field 'name': required" in parsed.text
    due_now = Parsed(page.overview([view([], schedule="0 0 6 * * *", next_due="2030-01-01T06:00:00Z")],
                                   parse_iso("2030-01-01T06:02:00Z") or 0.0, LINKS)).rows
    assert due_now[1][5] == "due now (since 2030-01-01 06:00:00; the next timer tick runs it)"


@pytest.mark.parametrize("status,colour", [("completed", "ok"), ("completed_with_errors", "warn"), ("failed", "bad"),
                                           ("refused", "bad"), ("submitted", "busy"), ("dry_run", "dry"),
                                           ("skipped", "idle"), ("something new", "idle")])
def test_each_status_has_its_colour_and_its_word(status: str, colour: str) -> None:
    parsed = Parsed(page.overview([view([record(1, status=status)])], 0.0, LINKS))
    badges = [attrs for attrs in parsed.tags("span") if "badge" in str(attrs.get("class"))]
    assert badges and all(attrs["class"] == f"badge st-{colour}" for attrs in badges)
    assert status.replace("_", " ") in parsed.text


def test_the_chart_has_a_bar_per_run_scaled_to_the_largest() -> None:
    runs = [record(n) for n in (3, 2, 1)] + [record(4, counts={"sent": 0, "rejected_total": 0})]
    svg = Parsed(page.chart(runs))
    sent = [attrs for attrs in svg.tags("rect") if attrs["class"] == "bar-sent"]
    rejected = [attrs for attrs in svg.tags("rect") if attrs["class"] == "bar-rejected"]
    assert len(sent) == len(rejected) == 3  # the run that sent nothing has no bar
    heights = [float(str(a["height"])) for a in sent]
    assert heights[2] == pytest.approx(3 * heights[0], rel=0.01)  # oldest first: 100, 200, 300 sent
    xs = [float(str(a["x"])) for a in sent]
    assert xs == sorted(xs)
    assert "highest 300" in svg.text and page.chart([]) == ""


def test_a_run_page_holds_its_counts_jobs_warnings_file_errors_and_first_rejections() -> None:
    rejections = [{"file": "vip/a.csv", "line": i, "reason": "missing email"} for i in range(2, 102)]
    run = record(1, status="completed_with_errors", rejections=rejections, rejections_file="runs/vip/r.csv",
                 counts={"read": 500, "valid": 300, "rejected": {"missing_email": 150}, "rejected_total": 150,
                         "sent": 300},
                 jobs=[{"id": "job-1", "contacts": 300, "status": "errored",
                        "results": {"requested_count": 300, "errored_count": 2}, "errors": ["a@x,bad"]}],
                 warnings=["0 rows in vip/b.csv"], file_errors=["vip/c.csv: cut short at line 9"],
                 sync={"kind": "delta", "why": "fingerprints match the mapping"})
    parsed = Parsed(page.run_page(run, LINKS))
    text = parsed.text
    for expected in ("completed with errors", "delta: fingerprints match the mapping", "missing_email: 150",
                     "0 rows in vip/b.csv", "vip/c.csv: cut short at line 9", "Rejections (150)",
                     "requested_count: 300, errored_count: 2", "a@x,bad"):
        assert expected in text
    assert ["job-1", "upsert", "300", "errored", "requested_count: 300, errored_count: 2", "a@x,bad"] in parsed.rows
    assert sum(1 for row in parsed.rows if row[:1] == ["vip/a.csv"]) == page.REJECTIONS_SHOWN
    (download,) = [a for a in parsed.tags("a") if a.get("href") == f"runs/{run['run_id']}/rejections"]
    assert "download" in download


def test_a_dry_run_page_shows_the_plan_and_who_would_be_removed() -> None:
    plan = {"changes": {"new": 1, "removed": 2}, "to_remove": 2, "guard_rail": "allowed",
            "removals_file": "runs/vip/x.removals.csv"}
    dry = record(1, status="dry_run", dry_run=True, plan=plan)
    text = Parsed(page.run_page(dry, LINKS, ["a@example.com", "b@example.com"])).text
    assert "What a real run would do changes new: 1, removed: 2 to remove 2 guard rail allowed" in text
    assert "Would be removed from the list (the first 2): a@example.com b@example.com" in text
    assert "no longer in the state store" in Parsed(page.run_page(dry, LINKS, None)).text
    assert "What a real run would do" not in Parsed(page.run_page(record(1), LINKS)).text


def test_the_page_loads_nothing_and_its_policy_allows_nothing_external() -> None:
    for html in (page.overview([view([record(1)])], 0.0, LINKS), page.run_page(record(1), LINKS),
                 page.error_page(404, "no run with that id", LINKS)):
        parsed = Parsed(html)
        assert not parsed.tags("script") and not parsed.tags("link") and not parsed.tags("img")
        for _, attrs in parsed.elements:
            for name in ("href", "src", "action"):
                value = str(attrs.get(name) or "")
                assert "://" not in value and not value.startswith("//"), value
        style = re.search(r"<style>(.*?)</style>", html, re.S)
        assert style is not None and "url(" not in style.group(1) and "@import" not in style.group(1)
        digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
        expected = f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
        assert expected == page.CSP
        (meta,) = [a for a in parsed.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
        assert meta["content"] == page.CSP


def test_a_purge_and_a_queued_run_render_without_the_fields_they_lack() -> None:
    purge = {"run_id": "20300101T000000Z-0a1b2c3d", "destination": "vip", "status": "completed", "trigger": "http",
             "kind": "purge", "purge": "list", "counts": {"requested": 10, "removed": 9, "not_found": 1}}
    queued = {"run_id": "20300101T000001Z-0a1b2c3d", "destination": "vip", "status": "queued", "trigger": "http",
              "queued_at": "2030-01-01T00:00:01Z", "started_at": None, "finished_at": None}
    text = Parsed(page.run_page(purge, LINKS)).text
    assert "removed" in text and "not found" in text
    rows = Parsed(page.overview([view([queued, purge])], 0.0, LINKS)).rows
    assert rows[-2][:3] == ["2030-01-01 00:00:01", "http", "queued"] and rows[-2][-1] == "—"


# ------------------------------------------------------------------------------------------------- the command line
def _state_with_runs(root: Path) -> StateStore:
    state = StateStore(LocalFolderStore(root))
    for n, status in ((1, "completed"), (2, "failed")):
        run = record(n, status=status, destination="vip-newsletter", rejections_file=None)
        if n == 1:
            run["rejections_file"] = state.rejections_key("vip-newsletter", run["run_id"])
            state.store.write_bytes(run["rejections_file"], b"file,line,reason\r\nvip/a.csv,2,missing email\r\n")
            run["rejections"] = [{"file": HOSTILE_FILE, "line": 2, "reason": "missing email"}]
        state.save_run(run)
    return state


def test_the_command_line_writes_the_same_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_with_runs(tmp_path / "state")
    config = tmp_path / "destinations.json"
    config.write_text(json.dumps({"destinations": [{
        "name": "vip-newsletter", "api_key_secret": "k", "list_id": "0d7f6b1c-2a7e-4c55-9a61-3c1f6e1b2a10",
        "segments": ["S"], "mapping": {"email": "Email"}, "schedule": "0 0 6 * * *", "consent": True}]}))
    out = tmp_path / "site" / "history.html"
    (tmp_path / "site").mkdir()
    assert cli.main(["ui", "--state-dir", str(tmp_path / "state"), "--out", str(out), "--config", str(config)]) == 0
    assert "wrote" in capsys.readouterr().out
    overview = Parsed(out.read_text(encoding="utf-8"))
    assert "0 0 6 * * * UTC" in overview.text  # the destinations file's settings
    runs = sorted(a["href"] for a in overview.tags("a") if "history-runs/" in str(a["href"]))
    records = state.list_runs("vip-newsletter")
    assert set(runs) == {f"history-runs/{r['run_id']}.html" for r in records}
    completed = next(r for r in records if r["status"] == "completed")
    run_page = Parsed((out.parent / f"history-runs/{completed['run_id']}.html").read_text(encoding="utf-8"))
    assert HOSTILE_FILE in run_page.text and not run_page.tags("img")
    (download,) = [a["href"] for a in run_page.tags("a") if "download" in a]
    csv_file = (out.parent / "history-runs" / urllib.parse.unquote(str(download))).resolve()
    assert csv_file == (tmp_path / "state" / str(completed["rejections_file"])).resolve() and csv_file.is_file()
    assert run_page.tags("a")[0]["href"] == "../history.html"
    # the page the HTTP door serves for this run, from the same function: only the links differ
    again = page.run_page(completed, page.Links(home="../history.html", run=lambda r: f"{r}.html",
                                                 rejections=lambda d, r: str(download)))
    assert again == (out.parent / f"history-runs/{completed['run_id']}.html").read_text(encoding="utf-8")


def test_without_a_destinations_file_the_state_folder_names_the_destinations(tmp_path: Path) -> None:
    _state_with_runs(tmp_path / "state")
    out = tmp_path / "h.html"
    assert cli.main(["ui", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    parsed = Parsed(out.read_text(encoding="utf-8"))
    assert parsed.rows[1][:2] == ["VIP vip-newsletter", "not in the destinations file"]
    assert len(list((tmp_path / "h-runs").glob("*.html"))) == 2


def test_a_state_folder_that_is_not_there_is_a_usage_error(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ui", "--state-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "h.html")]) == 2
    assert "--state-dir" in capsys.readouterr().err and not (tmp_path / "h.html").exists()

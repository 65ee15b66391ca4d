"""The run-history page: pure functions from destinations and run records to one self-contained HTML page.

The HTTP door (`GET /api/ui`, `GET /api/ui/runs/{run_id}`) and the command line (`python -m shared ui`) both render
with these functions; only their `Links` differ. A page loads nothing: its one style sheet is inline and allowed by
its hash in the Content-Security-Policy (`CSP`, also in a meta tag, so a page saved to disk keeps it), the charts
are inline SVG, and there is no script. Every value is HTML-escaped (`_e`): file names, rejection reasons and
SendGrid's messages come from outside and can hold markup. Records written before a field existed (`changes`,
`sync`, `plan`) are shown without it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .runlog import duration_seconds
from .state import parse_iso

RUNS_SHOWN = 30  # runs per destination on the overview
REJECTIONS_SHOWN = 100  # rejections on a run's page (the record keeps this many; the CSV has them all)
CHANGES = ("new", "changed", "unchanged", "removed", "rejected", "not_applied")  # issue 14's `changes`
STATUS_GROUPS = {  # status -> the colour it is shown in (the word is always written too)
    "completed": "ok", "completed_with_errors": "warn", "failed": "bad", "refused": "bad", "dry_run": "dry",
    "queued": "busy", "running": "busy", "waiting": "busy", "interrupted": "busy", "submitted": "busy",
    "superseded": "idle", "skipped": "idle",
}
STYLE = """
:root{color-scheme:light;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--busy:#0969da;--dry:#8250df;--idle:#6e7781;
--line:#d0d7de;--soft:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328}
main{max-width:75rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .4rem}h3{font-size:1rem;margin:1.2rem 0 .3rem}
p,dl{margin:.3rem 0}.muted{color:#59636e}.small{font-size:.85rem}
a{color:#0969da}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);border-radius:6px;margin:.4rem 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .45rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top;white-space:nowrap}
th{background:var(--soft);font-weight:600}tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right}td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:8rem}
.badge{display:inline-block;white-space:nowrap;padding:.05rem .5rem;border-radius:1rem;color:#fff;font-size:.82rem;
font-weight:600}
.st-ok{background:var(--ok)}.st-warn{background:var(--warn)}.st-bad{background:var(--bad)}
.st-busy{background:var(--busy)}.st-dry{background:var(--dry)}.st-idle{background:var(--idle)}
.chart{max-width:40rem;margin:.4rem 0}.chart svg{width:100%;height:auto;display:block}
.bar-sent{fill:var(--busy)}.bar-rejected{fill:var(--bad)}.axis{stroke:var(--line)}
.key{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin:0 .3rem 0 .6rem;vertical-align:-.1rem}
.key-sent{background:var(--busy)}.key-rejected{background:var(--bad)}.legend{margin:.2rem 0;color:#59636e}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem}
dl.facts dt{color:#59636e}dl.facts dd{margin:0;overflow-wrap:anywhere}
ul.lines{padding-left:1.2rem;margin:.3rem 0}ul.lines li{overflow-wrap:anywhere}
.error{color:var(--bad)}
@media (max-width:40rem){main{padding:.6rem}dl.facts{grid-template-columns:1fr}dl.facts dd{margin-bottom:.3rem}
.scroll{border:0;overflow:visible}thead{display:none}
tbody tr{display:block;border:1px solid var(--line);border-radius:6px;margin:0 0 .5rem}
td,td.num,td.wrap{display:flex;justify-content:space-between;gap:1rem;white-space:normal;text-align:right;
border-bottom:1px solid var(--soft);min-width:0;overflow-wrap:anywhere}
td::before{content:attr(data-label);font-weight:600;color:#59636e;text-align:left;white-space:nowrap}}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# Nothing from anywhere: no scripts, fonts, images, frames, forms or connections; the one inline style sheet by hash.
CSP = f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'"
HEADERS = {"Content-Security-Policy": CSP + "; frame-ancestors 'none'", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class Links:
    """Where a page's links go: `run(run_id)` a run's page, `rejections(destination, run_id)` its rejections CSV,
    `home` the overview."""

    home: str
    run: Callable[[str], str]
    rejections: Callable[[str, str], str]


@dataclass(frozen=True)
class DestinationView:
    """One destination as the overview shows it: its settings (None when the destinations file does not name it),
    whether it runs, its schedule and its newest runs (newest first)."""

    name: str
    display_name: str
    runs: Sequence[Mapping[str, Any]]
    error: str | None = None  # its entry in the destinations file is invalid
    enabled: bool | None = None  # None: not in the destinations file
    blocked: str | None = None  # why a run would be refused now (disabled, no consent)
    mode: str | None = None
    list_id: str | None = None
    schedule: str | None = None
    on_new_export: bool = True
    next_due: str | None = None


# ------------------------------------------------------------------------------------------------------ values
def _e(value: Any) -> str:
    """Any value as escaped text; None as a dash."""
    return "—" if value is None or value == "" else html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _time(stamp: Any) -> str:
    """A record's ISO time as 'YYYY-MM-DD HH:MM:SS' (UTC), escaped."""
    return _e(stamp.replace("T", " ").rstrip("Z")) if isinstance(stamp, str) and stamp else "—"


def _duration(record: Mapping[str, Any]) -> str:
    seconds = duration_seconds(record)
    if seconds is None or not record.get("finished_at"):
        return "—"
    whole = round(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _badge(status: Any) -> str:
    group = STATUS_GROUPS.get(str(status), "idle")
    return f'<span class="badge st-{group}">{_e(str(status).replace("_", " ") if status else None)}</span>'


def _started(record: Mapping[str, Any]) -> Any:
    return record.get("started_at") or record.get("queued_at")


def _counts(record: Mapping[str, Any]) -> Mapping[str, Any]:
    counts = record.get("counts")
    return counts if isinstance(counts, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _rejected(record: Mapping[str, Any]) -> int:
    changes = record.get("changes")
    if isinstance(changes, Mapping) and isinstance(changes.get("rejected"), int):
        return _int(changes["rejected"])
    return _int(_counts(record).get("rejected_total"))


def _text(value: Any) -> str:
    """A nested value (SendGrid's job results, a mirror part) as one line of escaped text."""
    if isinstance(value, Mapping):
        return ", ".join(f"{_e(k)}: {_text(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value) or "—"
    return _num(value)


# ------------------------------------------------------------------------------------------------------ blocks
def _document(title: str, body: Iterable[str]) -> str:
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>",
        *body,
        "</main></body></html>\n",
    ])


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: frozenset[int] = frozenset(),
           wrap: frozenset[int] = frozenset()) -> str:
    """Cells are HTML already (escaped by the caller); `numeric` columns are right-aligned, `wrap` ones wrap."""
    def cell(tag: str, i: int, text: str) -> str:
        cls = "num" if i in numeric else "wrap" if i in wrap else ""
        attrs = (f' class="{cls}"' if cls else "") + (f' data-label="{_e(head[i])}"' if tag == "td" else "")
        return f"<{tag}{attrs}><span>{text}</span></{tag}>"  # data-label: a phone shows each row as a card

    head_html = "".join(cell("th", i, _e(h)) for i, h in enumerate(head))
    body_html = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head_html}</tr></thead><tbody>{body_html}</tbody></table></div>'


def _facts(pairs: Iterable[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _lines(title: str, items: Sequence[Any]) -> str:
    if not items:
        return ""
    shown = "".join(f"<li>{_text(item)}</li>" for item in items)
    return f'<h3>{_e(title)} ({len(items):,})</h3><ul class="lines">{shown}</ul>'


def chart(runs: Sequence[Mapping[str, Any]]) -> str:
    """Contacts sent (bars up) and rows rejected (bars down) per run, oldest on the left, one slot per run of the
    RUNS_SHOWN a page shows; each half scaled to its own largest value, which the legend names. Each bar's <title>
    names its run and value."""
    ordered = list(reversed(runs))[-RUNS_SHOWN:]
    if not ordered:
        return ""
    width, half, gap = 600, 50, 3
    slot = width / max(len(ordered), RUNS_SHOWN)
    bar = max(1.0, slot - gap)
    sent = [_int(_counts(r).get("sent")) for r in ordered]
    rejected = [_rejected(r) for r in ordered]
    if not any(sent) and not any(rejected):
        return ""  # nothing to draw: runs refused, queued or reading nothing
    top_max, bottom_max = max(sent) or 1, max(rejected) or 1
    parts = [f'<svg viewBox="0 0 {width} {2 * half + 1}" role="img" '
             'aria-label="contacts sent and rows rejected per run, oldest first">',
             f'<line class="axis" x1="0" y1="{half}" x2="{width}" y2="{half}"/>']
    for i, (record, up, down) in enumerate(zip(ordered, sent, rejected, strict=True)):
        x = i * slot + gap / 2
        label = f"{_e(record.get('run_id'))} ({_e(record.get('status'))})"
        if up:
            h = max(1.0, up / top_max * (half - 1))
            parts.append(f'<rect class="bar-sent" x="{x:.1f}" y="{half - h:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                         f"<title>{label}: {up:,} sent</title></rect>")
        if down:
            h = max(1.0, down / bottom_max * (half - 1))
            parts.append(f'<rect class="bar-rejected" x="{x:.1f}" y="{half + 1}" width="{bar:.1f}" height="{h:.1f}">'
                         f"<title>{label}: {down:,} rejected</title></rect>")
    parts.append("</svg>")
    legend = (f'<p class="legend small"><span class="key key-sent"></span>contacts sent (highest {max(sent):,}) '
              f'<span class="key key-rejected"></span>rows rejected (highest {max(rejected):,})</p>')
    return '<figure class="chart">' + "".join(parts) + legend + "</figure>"


# ------------------------------------------------------------------------------------------------------ overview
def _next_due(view: DestinationView, now: float) -> str:
    if view.next_due is None:
        return "—" if view.schedule is None else "not while disabled"
    due = parse_iso(view.next_due)
    if due is not None and due <= now:
        return f'due now <span class="small muted">(since {_time(view.next_due)}; the next timer tick runs it)</span>'
    return _time(view.next_due)


def _enabled(view: DestinationView) -> str:
    if view.error is not None:
        return '<span class="error">invalid</span>'
    if view.enabled is None:
        return "not in the destinations file"
    if view.blocked:
        return f'<span class="error">no</span> <span class="small muted">{_e(view.blocked)}</span>'
    return "yes"


def _last_run(view: DestinationView, links: Links) -> str:
    if not view.runs:
        return "no run yet"
    last = view.runs[0]
    return f'{_badge(last.get("status"))} <a href="{_e(links.run(str(last.get("run_id"))))}">' \
           f"{_time(_started(last))}</a>"


def _summary(views: Sequence[DestinationView], now: float, links: Links) -> str:
    rows = [[f'<a href="#{_e(v.name)}">{_e(v.display_name)}</a><br><span class="small muted">{_e(v.name)}</span>',
             _enabled(v), _e(v.mode), f'<span class="small">{_e(v.list_id)}</span>', _schedule(v), _next_due(v, now),
             _last_run(v, links)] for v in views]
    return _table(("Destination", "Enabled", "Mode", "List", "Schedule", "Next due", "Last run"), rows,
                  wrap=frozenset({1, 3, 5, 6}))


def _schedule(view: DestinationView) -> str:
    text = f"<code>{_e(view.schedule)}</code> UTC" if view.schedule else "—"
    return text + ("" if view.on_new_export else '<br><span class="small muted">not on new exports</span>')


def _run_row(record: Mapping[str, Any], links: Links) -> list[str]:
    changes = record.get("changes")
    changes = changes if isinstance(changes, Mapping) else {}
    run_id = str(record.get("run_id") or "")
    started = _time(_started(record))
    link = f'<a href="{_e(links.run(run_id))}">{started}</a>' if run_id else started
    dry = record.get("dry_run") and record.get("status") != "dry_run"  # a dry run not finished yet
    cells = [link, _e(record.get("trigger")), _badge(record.get("status")) + (" dry run" if dry else "")]
    cells += [_num(changes.get(name)) if name != "rejected" or changes else _num(_rejected(record))
              for name in CHANGES]
    return [*cells, _num(_counts(record).get("sent")), _duration(record)]


def _destination(view: DestinationView, links: Links) -> str:
    out = f'<section id="{_e(view.name)}"><h2>{_e(view.display_name)} <span class="small muted">{_e(view.name)}' \
          "</span></h2>"
    if view.error is not None:
        out += f'<p class="error">{_e(view.error)}</p>'
    if not view.runs:
        return out + '<p class="muted">No run yet.</p></section>'
    head = ("Started", "Trigger", "Status", "New", "Changed", "Unchanged", "Removed", "Rejected", "Not applied",
            "Sent", "Duration")
    rows = [_run_row(r, links) for r in view.runs]
    shown = f'<p class="small muted">The last {len(view.runs)} run(s), newest first; contacts sent and rows ' \
            "rejected per run, oldest first:</p>"
    return out + shown + chart(view.runs) + _table(head, rows, numeric=frozenset(range(3, 10))) + "</section>"


def overview(views: Sequence[DestinationView], now: float, links: Links) -> str:
    """The overview: every destination with its settings and last run, then each one's last runs and chart."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    body = ["<h1>SendGrid connector: run history</h1>",
            f'<p class="small muted">Generated {generated} UTC. Every time on this page is UTC. '
            "“—” in the change counts: a run recorded before runs counted them.</p>",
            _summary(views, now, links) if views else '<p class="muted">No destinations.</p>',
            *(_destination(v, links) for v in views)]
    return _document("Run history", body)


# ------------------------------------------------------------------------------------------------------ one run
def _jobs(record: Mapping[str, Any]) -> str:
    jobs = [j for j in record.get("jobs") or [] if isinstance(j, Mapping)]
    if not jobs:
        return ""
    rows = [[_e(j.get("id")), _e(j.get("kind") or "upsert"), _num(j.get("contacts")), _badge(j.get("status")),
             f'<span class="small">{_text(j.get("results") or {})}</span>',
             "<br>".join(_e(line) for line in j.get("errors") or []) or "—"] for j in jobs]
    return f"<h3>SendGrid jobs ({len(jobs):,})</h3>" + _table(
        ("Job", "Kind", "Contacts", "Status", "SendGrid's counts", "Errors file (first lines)"), rows,
        numeric=frozenset({2}), wrap=frozenset({4, 5}))


def _rejections(record: Mapping[str, Any], links: Links) -> str:
    sample = [r for r in record.get("rejections") or [] if isinstance(r, Mapping)][:REJECTIONS_SHOWN]
    total = _rejected(record)
    if not sample and not total:
        return ""
    out = f"<h3>Rejections ({total:,})</h3>"
    if record.get("rejections_file") and record.get("destination") and record.get("run_id"):
        href = links.rejections(str(record["destination"]), str(record["run_id"]))
        out += f'<p><a href="{_e(href)}" download>Download every rejection (CSV)</a></p>'
    if sample:
        out += f'<p class="small muted">The first {len(sample)}:</p>' + _table(
            ("File", "Line", "Reason"),
            ([_e(r.get("file")), _num(r.get("line")), _e(r.get("reason"))] for r in sample), numeric=frozenset({1}),
            wrap=frozenset({0, 2}))
    return out


def _plan(record: Mapping[str, Any], removals: Sequence[str] | None) -> str:
    plan = record.get("plan")
    if not isinstance(plan, Mapping):
        return ""
    out = "<h3>What a real run would do</h3>" + _facts(
        [(k.replace("_", " "), _text(v)) for k, v in plan.items() if k != "removals_file"])
    if removals is not None:
        shown = "".join(f"<li>{_e(email)}</li>" for email in removals)
        out += (f'<p class="small muted">Would be removed from the list (the first {len(removals):,}):</p>'
                f'<ul class="lines">{shown}</ul>' if removals else '<p class="muted">Nobody would be removed.</p>')
    elif plan.get("removals_file"):
        out += '<p class="muted">The removals file is no longer in the state store.</p>'
    return out


def _facts_of_run(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    sync = record.get("sync") if isinstance(record.get("sync"), Mapping) else None
    dry = record.get("dry_run") and record.get("status") != "dry_run"
    pairs = [("Status", _badge(record.get("status")) + (" (dry run)" if dry else "")),
             ("Destination", _e(record.get("display_name") or record.get("destination"))),
             ("Trigger", _e(record.get("trigger"))), ("Source", _e(record.get("source"))),
             ("Queued", _time(record.get("queued_at"))), ("Started", _time(record.get("started_at"))),
             ("Finished", _time(record.get("finished_at"))), ("Duration", _duration(record)),
             ("Sync", f"{_e(sync.get('kind'))}: {_e(sync.get('why'))}" if sync else "—")]
    for name in ("error", "note"):
        if record.get(name):
            pairs.append((name.title(), f'<span class="{name}">{_e(record[name])}</span>'))
    return pairs


def run_page(record: Mapping[str, Any], links: Links, removals: Sequence[str] | None = None) -> str:
    """One run: what it was, its counts, SendGrid's jobs, warnings and file errors, its first rejections (and the
    link to all of them), and for a dry run what a real run would do (`removals`: the first emails it would remove,
    None when unknown)."""
    run_id = str(record.get("run_id") or "")
    changes = record.get("changes")
    counts = {k: v for k, v in _counts(record).items() if k not in ("rejected_total",)}
    body = [f'<p class="small"><a href="{_e(links.home)}">← Run history</a></p>',
            f"<h1>Run {_e(run_id)}</h1>", _facts(_facts_of_run(record))]
    if isinstance(changes, Mapping):
        body.append("<h3>What changed</h3>" + _facts((k.replace("_", " "), _num(v)) for k, v in changes.items()))
    body.append("<h3>Counts</h3>" + _facts((k.replace("_", " "), _text(v)) for k, v in counts.items()))
    requests = record.get("requests")
    if isinstance(requests, Mapping) and requests.get("count"):
        body.append("<h3>Requests to SendGrid</h3>" + _facts((k.replace("_", " "), _num(v))
                                                               for k, v in requests.items()))
    if isinstance(record.get("mirror"), Mapping):
        body.append("<h3>Mirror</h3>" + _facts((k.replace("_", " "), _text(v)) for k, v in record["mirror"].items()))
    body += [_plan(record, removals), _jobs(record), _lines("Warnings", record.get("warnings") or []),
             _lines("File errors", record.get("file_errors") or []),
             _lines("Not read completely", record.get("incomplete") or []), _rejections(record, links)]
    return _document(f"Run {run_id}", body)


def error_page(status: int, message: str, links: Links | None = None) -> str:
    """A page for an answer other than success: the reason, escaped."""
    back = f'<p class="small"><a href="{_e(links.home)}">← Run history</a></p>' if links else ""
    return _document(f"Error {status}", [back, f"<h1>{status}</h1>", f'<p class="error">{_e(message)}</p>'])


__all__ = ["CSP", "HEADERS", "DestinationView", "Links", "chart", "error_page", "overview", "run_page"]

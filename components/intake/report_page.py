"""The validation report as one HTML page a reviewer can open anywhere: ``report.html`` beside ``report.json``.

Great Expectations' Data Docs take their styles and scripts from CDNs (bootstrap, jQuery, bootstrap-table,
vega), and the site's index draws its table with those scripts, so offline it shows an empty page; GX 1.x has
no setting that makes the site self-contained (its template overrides need a file-backed context's plugins
folder, and the libraries themselves would still have to come from somewhere). This page needs nothing: the
styles are inline, there is no script, and every fact is in the HTML itself. It is rendered from the report's
JSON form (``Report.to_dict``), so it says exactly what ``report.json`` says; the Data Docs stay beside it and
are linked for a reader who is online.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from components.support import storage

PAGE_NAME = "report.html"

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; width: 100%; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .3em .5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.pass { color: #17643a; } .fail { color: #a51d1d; font-weight: bold; } .skip { color: #7a5b00; }
.meta td:first-child { width: 12em; color: #555; }
code { font-size: .95em; }
"""


def _cell(value: Any) -> str:
    return "" if value is None else escape(str(value))


def _verdict(rule: dict[str, Any]) -> str:
    if rule.get("skipped"):
        return f'<span class="skip">skipped: {_cell(rule["skipped"])}</span>'
    if rule["success"]:
        warned = f' <span class="skip">(warning: {_cell(rule["warning"])})</span>' if rule.get("warning") else ""
        return f'<span class="pass">passed</span>{warned}'
    return f'<span class="fail">FAILED: {rule["count"]:,} problem(s)</span>'


def render(report: dict[str, Any], data_docs: str | None = None) -> str:
    """The page for ``report`` (``Report.to_dict()``); ``data_docs``: a relative link to GX's site, if any."""
    task = _cell(report["task_id"])
    failed = [r for r in report["rules"] if not r["success"]]
    verdict = "valid" if report["success"] else "INVALID"
    headline = (
        f"every one of {len(report['rules'])} rules passed"
        if report["success"]
        else f"{len(failed)} of {len(report['rules'])} rules failed"
    )
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Validation report: task {task} ({verdict})</title>",
        f"<style>{STYLE}</style></head><body>",
        f'<h1>Task {task}: <span class="{"pass" if report["success"] else "fail"}">{verdict}</span> ({headline})</h1>',
        '<table class="meta">',
        f"<tr><td>source</td><td><code>{_cell(report.get('source'))}</code></td></tr>",
        f"<tr><td>checked at</td><td>{_cell(report.get('checked_at'))}</td></tr>",
        f"<tr><td>content digest</td><td><code>{_cell(report.get('content_digest'))}</code></td></tr>",
        *(f"<tr><td>{_cell(k)}</td><td>{_cell(v)}</td></tr>" for k, v in (report.get("stats") or {}).items()),
        "</table>",
        "<h2>Rules</h2>",
        "<table><tr><th>rule</th><th>what it checks</th><th>result</th></tr>",
        *(
            f"<tr><td><code>{_cell(r['rule'])}</code></td><td>{_cell(r['description'])}</td><td>{_verdict(r)}</td></tr>"
            for r in report["rules"]
        ),
        "</table>",
    ]
    if failed:
        out.append("<h2>Problems</h2>")
    for rule in failed:
        out.append(f"<h3><code>{_cell(rule['rule'])}</code>: {_cell(rule['description'])}</h3>")
        out.append("<table><tr><th>line</th><th>path</th><th>problem</th></tr>")
        out.extend(
            f"<tr><td>{_cell(f.get('line'))}</td><td><code>{_cell(f.get('path'))}</code></td>"
            f"<td>{_cell(f['message'])}</td></tr>"
            for f in rule["failures"]
        )
        out.append("</table>")
        if rule["count"] > len(rule["failures"]):
            out.append(f"<p>… and {rule['count'] - len(rule['failures']):,} more, counted but not listed.</p>")
    out.extend(_doubts(report.get("label_doubt")))
    if report.get("expectations"):
        out.append("<h2>Great Expectations results</h2>")
        out.append("<table><tr><th>rule</th><th>expectation</th><th>column</th><th>result</th><th>unexpected</th></tr>")
        for e in report["expectations"]:
            result = '<span class="pass">passed</span>' if e.get("success") else '<span class="fail">failed</span>'
            if e.get("error"):
                result += f" ({_cell(e['error'])})"
            out.append(
                f"<tr><td><code>{_cell(e.get('rule'))}</code></td><td><code>{_cell(e.get('type'))}</code></td>"
                f"<td>{_cell(e.get('column'))}</td><td>{result}</td><td>{_cell(e.get('unexpected_count'))}</td></tr>"
            )
        out.append("</table>")
    if data_docs:
        out.append(
            f'<p>The same checks in Great Expectations\' Data Docs: <a href="{escape(data_docs)}">'
            f"{escape(data_docs)}</a> (their styles and scripts come from the network; offline they show blank).</p>"
        )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _doubts(section: dict[str, Any] | None) -> list[str]:
    """The label-doubt section (components/intake/label_doubt.py): the rows whose label the model contradicts."""
    if not section:
        return []
    out = ["<h2>Labels the model doubts</h2>"]
    if section.get("not_checked"):
        return [*out, f"<p>Not checked: {_cell(section['not_checked'])}.</p>"]
    doubts = section.get("doubts") or []
    out.append(
        f"<p>{len(doubts):,} of {section.get('scored', 0):,} scored training rows, by {_cell(section.get('model'))} "
        f"(at least {section.get('min_confidence', 0):.0%} sure of another class).</p>"
    )
    if doubts:
        out.append(
            "<table><tr><th>line</th><th>path</th><th>label</th><th>the model says</th><th>its confidence</th>"
            "<th>of the label</th></tr>"
        )
        out.extend(
            f"<tr><td>{_cell(d.get('line'))}</td><td><code>{_cell(d.get('path'))}</code></td>"
            f"<td>{_cell(d.get('label'))}</td><td>{_cell(d.get('suggested'))}</td>"
            f"<td>{d.get('confidence', 0):.0%}</td><td>{d.get('label_probability', 0):.0%}</td></tr>"
            for d in doubts
        )
        out.append("</table>")
    return out


def write_page(report: dict[str, Any], path: Path) -> Path:
    """``report.html`` at ``path``, linking the Data Docs site beside it when there is one."""
    docs = "data_docs/index.html" if (path.parent / "data_docs" / "index.html").is_file() else None
    storage.atomic_write_text(path, render(report, docs))
    return path

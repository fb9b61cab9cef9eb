"""The table validation report: DIR/report.json (everything), DIR/report.html and a rich summary (the same,
readable). Personal data is never copied into the report: rows are named by number, examples are masked."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPORT = "report.json"
SHOW = 20  # rows of each list on the terminal
STYLE = (
    "body{font-family:sans-serif;max-width:80em;margin:2em auto}code{font-size:90%}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
)


def write_report(report: dict[str, Any], out: Path) -> None:
    """DIR/report.html, then DIR/report.json last and whole: its presence means validation finished."""
    (out / "report.html").write_text(_html(report))
    tmp = out / (REPORT + ".writing")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(out / REPORT)


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The headline numbers, for the terminal and the page."""
    lines = [
        f"{r['rows']} rows x {r['columns']} columns, {r['missing_cells']} missing cells; dataset_id {r['dataset_id']}",
        f"splits {r['split_counts']}" + (f" (from column {r['split_column']!r})" if r["split_column"] else ""),
        f"{r['duplicate_rows']} duplicate rows ({len(r['duplicate_groups'])} groups), {r['near_duplicate_rows']} "
        f"near-duplicate rows, {r['leak_count']} leaks between splits, "
        f"{len(r['constant_columns'])} constant columns, {len(r['outlier_columns'])} columns with outliers, "
        f"{len({p['column'] for p in r['personal_data']})} columns with likely personal data",
    ]
    if r["heldout"]:
        h = r["heldout"]
        lines.append(f"held-out table {h['source']}: {h['rows']} rows, {h['leak_count']} also in the table (leaks)")
    return lines


def column_notes(c: dict[str, Any]) -> str:
    """What a column's checks found, in a few words."""
    notes = []
    if c["missing"]:
        notes.append(f"{c['missing']} missing ({100 * c['missing_share']:.1f} %)")
    if c["constant"]:
        notes.append("constant")
    if c.get("outliers", {}).get("count"):
        notes.append(f"{c['outliers']['count']} outliers")
    if c.get("infinite"):
        notes.append(f"{c['infinite']} infinite")
    for p in c.get("personal_data", []):
        notes.append(f"{p['count']} {p['kind']} ({100 * p['share']:.1f} %)")
    return ", ".join(notes)


def print_summary(r: dict[str, Any], console: Console, out: Path) -> None:
    console.print(f"[bold]{r['source']}[/] ({r['format']})", highlight=False)
    for line in summary_lines(r):
        console.print(line, highlight=False)
    table = Table(title_justify="left")
    for name in ("column", "type", "why", "distinct", "findings"):
        table.add_column(name, overflow="fold")
    for c in r["schema"]:
        table.add_row(c["name"], c["type"], c["reason"], str(c["distinct"]), column_notes(c))
    console.print(table)
    lists = (
        ("likely personal data", [f"{p['column']}: {p['count']} {p['kind']}, rows {_rows(p['rows'])}"
                                  for p in r["personal_data"]]),
        ("duplicate rows", [f"rows {_rows(g)}" for g in r["duplicate_groups"]]),
        ("near-duplicate rows", [f"rows {_rows(g)}" for g in r["near_duplicate_groups"]]),
        ("leaks", [_leak(x) for x in r["leaks"]]),
        ("held-out leaks", [_heldout_leak(x) for x in (r["heldout"] or {}).get("leaks", [])]),
    )  # fmt: skip
    for title, rows in lists:
        if rows:
            console.print(f"{title}: " + "; ".join(rows[:SHOW]) + (" ..." if len(rows) > SHOW else ""), highlight=False)
    console.print(f"manifest: {out / 'manifest.parquet'}  report: {out / 'report.html'}", highlight=False)


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:SHOW])) + (" ..." if len(rows) > SHOW else "")


def _leak(x: dict[str, Any]) -> str:
    return f"{x['split']} row {x['row']} = {x['same_as_split']} row {x['same_as']}"


def _heldout_leak(x: dict[str, Any]) -> str:
    return f"held-out row {x['heldout_row']} = {x['split']} row {x['row']}"


def _list(title: str, items: list[str], total: int | None = None) -> str:
    n = len(items) if total is None else total
    if not n:
        return f"<h2>{html.escape(title)} (0)</h2>"
    more = f"<p>... {n - len(items[:1000])} more in report.json</p>" if n > len(items[:1000]) else ""
    body = "".join(f"<li>{html.escape(i)}</li>" for i in items[:1000])
    return f"<h2>{html.escape(title)} ({n})</h2><ul>{body}</ul>{more}"


def _columns_html(r: dict[str, Any]) -> str:
    e = html.escape
    head = "<tr><th>column</th><th>type</th><th>why</th><th>stored as</th><th>distinct</th><th>findings</th></tr>"
    rows = "".join(
        f"<tr><td><code>{e(c['name'])}</code></td><td>{e(c['type'])}</td><td>{e(c['reason'])}</td>"
        f"<td>{e(c['storage'])}</td><td>{c['distinct']}</td><td>{e(column_notes(c))}</td></tr>"
        for c in r["schema"]
    )
    return f"<h2>Columns ({len(r['schema'])})</h2><table>{head}{rows}</table>"


def _outliers_html(r: dict[str, Any]) -> str:
    e = html.escape
    parts = []
    for c in r["schema"]:
        o = c.get("outliers")
        if o and o["count"]:
            shown = ", ".join(f"row {x['row']}: {x['value']:g}" for x in o["rows"])
            parts.append(
                f"<li><code>{e(c['name'])}</code>: {o['count']} outside [{o['low']:.6g}, {o['high']:.6g}] "
                f"({e(o['rule'])}); {e(shown)}{' ...' if o['count'] > len(o['rows']) else ''}</li>"
                if o.get("low") is not None
                else f"<li><code>{e(c['name'])}</code>: {o['count']} infinite values; {e(shown)}</li>"
            )
    return f"<h2>Outliers ({len(parts)} columns)</h2><ul>{''.join(parts)}</ul>"


def _html(r: dict[str, Any]) -> str:
    e = html.escape
    pii = [
        f"{p['column']}: {p['count']} cells with {p['kind']} ({100 * p['share']:.1f} %), rows {_rows(p['rows'])}; "
        f"e.g. {', '.join(p['examples'])}"
        for p in r["personal_data"]
    ]
    held = r["heldout"] or {}
    sections = [
        f"<h1>Table validation: {e(r['source'])} ({e(r['format'])})</h1>",
        f"<p>query: <code>{e(r['query'])}</code></p>" if r["query"] else "",
        "".join(f"<p>{e(line)}</p>" for line in summary_lines(r)),
        _columns_html(r),
        f"<p>constant columns: {e(', '.join(r['constant_columns']) or 'none')}</p>",
        _outliers_html(r),
        _list("Likely personal data", pii),
        _list("Duplicate rows (every value equal)", [f"rows {_rows(g)}" for g in r["duplicate_groups"]],
              len(r["duplicate_groups"])),
        _list(f"Near-duplicate rows (equal after normalisation, numbers to {r['near_digits']} digits, ids left out)",
              [f"rows {_rows(g)}" for g in r["near_duplicate_groups"]], len(r["near_duplicate_groups"])),
        _list("Leaks between splits", [_leak(x) for x in r["leaks"]], r["leak_count"]),
        _list("Held-out rows also in the table", [_heldout_leak(x) for x in held.get("leaks", [])],
              held.get("leak_count", 0)) if held else "",
        f"<p>{r['seconds']} s, {r['rows_per_s']:.0f} rows/s</p>",
    ]  # fmt: skip
    head = f"<!doctype html><meta charset='utf-8'><title>sdpipe table</title><style>{STYLE}</style>"
    return head + "".join(sections) + "\n"

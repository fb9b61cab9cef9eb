"""The validation report: DIR/report.json (everything), DIR/report.html and a rich summary (the same, readable)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sdpipe.data.manifest import REPORT

SHOW = 20  # rows of each list on the terminal


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.html").write_text(_html(report))
    tmp = out / (REPORT + ".writing")  # report.json last and whole: its presence means validation finished
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out / REPORT)


def _counts_line(r: dict[str, Any]) -> str:
    return (
        f"{r['files_seen']} seen = {r['accepted']} accepted + {len(r['quarantined'])} quarantined "
        f"+ {len(r['skipped'])} skipped"
    )


def print_summary(r: dict[str, Any], console: Console, out: Path) -> None:
    console.print(f"[bold]{r['source']}[/] ({r['kind']}): {_counts_line(r)}", highlight=False)
    console.print(
        f"dataset_id {r['dataset_id']}  splits {r['split_counts']}  {r['converted_total']} converted, "
        f"{len(r['duplicate_groups'])} duplicate groups, {len(r['leaks'])} leaks, "
        f"{len(r['near_duplicate_groups'])} near-duplicate groups  ({r['files_per_s']:.0f} files/s)",
        highlight=False,
    )
    if r["class_counts"]:
        console.print("classes: " + ", ".join(f"{k} {v}" for k, v in r["class_counts"].items()), highlight=False)
    for title, rows, key in (("quarantined", r["quarantined"], "reason"), ("skipped", r["skipped"], "reason")):
        if rows:
            table = Table(title=f"{title} ({len(rows)})", title_justify="left")
            table.add_column("path", overflow="fold")
            table.add_column(key, overflow="fold")
            for row in rows[:SHOW]:
                table.add_row(row["path"], row[key])
            if len(rows) > SHOW:
                table.add_row(f"... {len(rows) - SHOW} more in report.json", "")
            console.print(table)
    if r.get("captions"):
        _print_captions(r["captions"], console)
    console.print(f"manifest: {out / 'manifest.parquet'}  report: {out / 'report.html'}", highlight=False)


def caption_lines(c: dict[str, Any]) -> list[str]:
    """The captions section in a few plain lines (console and HTML)."""
    t, w = c["tokens"], c["words"]
    lines = [
        f"{c['captioned']} captioned, {c['missing']} missing, {c['empty']} empty, {c['undecodable']} undecodable",
        f"{c['distinct']} distinct captions; {c['sharing']} images share a caption with another",
    ]
    if t and w:
        lines.insert(
            1,
            f"tokens min {t['min']} / median {t['median']:g} / p95 {t['p95']:g} / max {t['max']} "
            f"(window {c['max_tokens']}, {c['tokenizer']}); words median {w['median']:g}, max {w['max']}; "
            f"{c['over_long']} over-long, {c['tokens_cut']} tokens cut",
        )
    return lines


def _print_captions(c: dict[str, Any], console: Console) -> None:
    console.print("captions: " + "\n  ".join(caption_lines(c)), highlight=False)
    tables = (
        ("caption files not read", [(p["path"], p["reason"]) for p in c["problems"]], "reason", len(c["problems"])),
        ("over-long captions", [(p["path"], f"{p['tokens']} tokens, {p['cut']} cut") for p in c["over_long_paths"]],
         "tokens", c["over_long"]),
        ("most repeated captions", [(p["caption"], str(p["count"])) for p in c["most_repeated"]], "images",
         len(c["most_repeated"])),
    )  # fmt: skip
    for title, rows, key, total in tables:
        if rows:
            table = Table(title=f"{title} ({total})", title_justify="left")
            table.add_column("caption" if key == "images" else "path", overflow="fold")
            table.add_column(key, overflow="fold")
            for row in rows[:SHOW]:
                table.add_row(*row)
            if total > SHOW:
                table.add_row(f"... {total - SHOW} more in report.json", "")
            console.print(table)


def _list(title: str, rows: list[Any], render: Any, total: int | None = None) -> str:
    """An HTML list of the first 1000 `rows`; `total`: how many there are when `rows` is capped already."""
    n = len(rows) if total is None else total
    if not n:
        return f"<h2>{title} (0)</h2>"
    items = "".join(f"<li>{render(r)}</li>" for r in rows[:1000])
    where = " in report.json" if len(rows) > 1000 else ""
    more = f"<p>... {n - min(len(rows), 1000)} more{where}</p>" if n > min(len(rows), 1000) else ""
    return f"<h2>{title} ({n})</h2><ul>{items}</ul>{more}"


def _html(r: dict[str, Any]) -> str:
    e = html.escape
    reason = lambda x: f"<code>{e(x['path'])}</code>: {e(x['reason'])}"  # noqa: E731
    group = lambda g: ", ".join(f"<code>{e(p)}</code>" for p in g)  # noqa: E731
    sections = [
        f"<h1>Data validation: {e(r['source'])} ({e(r['kind'])})</h1>",
        f"<p>{e(_counts_line(r))}</p>",
        f"<p>dataset_id <code>{e(r['dataset_id'])}</code>; splits {e(json.dumps(r['split_counts']))}; "
        f"{r['files_per_s']:.0f} files/s</p>",
        f"<p>classes: {e(json.dumps(r['class_counts']))}</p>",
        _list("Quarantined", r["quarantined"], reason),
        _list("Skipped", r["skipped"], reason),
        f"<p>conversions: {e(json.dumps(r['conversions']))}</p>",
        _list("Converted", r["converted"], lambda x: f"<code>{e(x['path'])}</code>: {e('; '.join(x['notes']))}"),
        _list("Duplicate groups (identical pixels)", r["duplicate_groups"], group),
        _list("Leaks (same pixels in two splits)", r["leaks"], lambda x: group([x["path"], x["same_as"]])),
        _list("Near-duplicate groups", r["near_duplicate_groups"], group),
        f"<h2>Image modes</h2><p>{e(json.dumps(r['modes']))}</p><h2>Sizes</h2><p>{e(json.dumps(r['sizes']))}</p>",
        _captions_html(r.get("captions")),
    ]
    style = "body{font-family:sans-serif;max-width:70em;margin:2em auto}code{font-size:90%}"
    return f"<!doctype html><meta charset='utf-8'><title>sdpipe data</title><style>{style}</style>{''.join(sections)}\n"


def _captions_html(c: dict[str, Any] | None) -> str:
    if not c:
        return "<h2>Captions</h2><p>none in this source</p>"
    e = html.escape
    code = lambda p: f"<code>{e(p)}</code>"  # noqa: E731
    short = lambda t: e(t if len(t) <= 200 else t[:200] + "...")  # noqa: E731
    repeat = lambda p: f"{p['count']} images: {short(p['caption'])}"  # noqa: E731
    return "".join(
        [
            "<h2>Captions</h2>",
            "".join(f"<p>{e(line)}</p>" for line in caption_lines(c)),
            _list("Caption files not read", c["problems"], lambda p: f"{code(p['path'])}: {e(p['reason'])}"),
            _list("Missing captions", c["missing_paths"], code, c["missing"]),
            _list("Empty captions", c["empty_paths"], code, c["empty"]),
            _list(
                f"Over-long captions (more than {c['max_tokens']} tokens, longest first)",
                c["over_long_paths"],
                lambda p: f"{code(p['path'])}: {p['tokens']} tokens, {p['cut']} cut",
                c["over_long"],
            ),
            _list("Most repeated captions", c["most_repeated"], repeat),
            _list("Images sharing a caption", c["sharing_paths"], code, c["sharing"]),
        ]
    )

"""The report and the terminal lines of a text-to-image evaluation (`sdpipe.evaluate.text2img`)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from sdpipe.evaluate.intervals import fmt
from sdpipe.evaluate.report import _write_html

MAX_EMBEDDED = 16 << 20  # grid bytes embedded in the page; larger runs link OUT/grids/ instead


def _iv(iv: dict | None, digits: int = 2, percent: bool = False) -> str:
    """'mean (low-high)', the mean alone for one set, '-' when not measured."""
    if iv is None:
        return "-"
    scale, unit = (100.0, " %") if percent else (1.0, "")
    if len(iv["values"]) < 2:
        return f"{iv['mean'] * scale:.{digits}f}{unit}"
    if iv["low"] >= 0:
        return fmt(iv, digits, percent)
    m, lo, hi = (iv[k] * scale for k in ("mean", "low", "high"))  # '-0.02 (-0.05 to 0.01)' reads unambiguously
    return f"{m:.{digits}f}{unit} ({lo:.{digits}f} to {hi:.{digits}f})"


def summary_lines(metrics: dict) -> list[str]:
    """What the terminal prints after a text-to-image evaluation: one line per figure, 80 columns or so."""
    s = metrics["settings"]
    lines = [
        f"{len(metrics['prompts'])} prompts x {s['images_per_prompt']} images, {s['sample_sets']} sets "
        f"({s['sampler']} x{s['steps']}, guidance {s['guidance']:g}, {s['width']}x{s['height']}); "
        f"{_iv(metrics['images_per_s'], 3)} images/s"
    ]
    c = metrics.get("clip")
    if c:
        lines.append(f"CLIP score {_iv(c['clip_score'])}; with the other prompts {_iv(c['clip_score_mismatched'])}")
        if c["prompt_accuracy"] is not None:
            lines.append(
                f"own prompt scores highest for {_iv(c['prompt_accuracy'], 1, True)} of images "
                f"(chance {c['prompt_accuracy_chance']:.0%})"
            )
    r = metrics.get("reference")
    if r:
        lines.append(
            f"FID {_iv(r['fid'])}, floor (reference vs itself) {_iv(r['floor_fid'])}, ratio {_iv(r['fid_ratio'])}"
        )
        lines.append(f"KID {_iv(r['kid_mean'], 4)}, floor {_iv(r['floor_kid_mean'], 4)}")
        lines.append(
            f"in features {r['features']['name']}, {r['compared_per_set']} images a side against "
            f"{r['heldout_images']} held-out reference images"
        )
    lines.append(f"mean (95 % interval) over {s['sample_sets']} sample sets")
    return lines


def _picture(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _row(cells: list[str], head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _clip_part(c: dict) -> list[str]:
    rows = [_row(["prompt", "CLIP score"], head=True)]
    rows += [_row([html.escape(p["prompt"]), _iv(p["clip_score"])]) for p in c["per_prompt"]]
    acc = c["prompt_accuracy"]
    return [
        "<h2>CLIP score</h2>",
        f"<p>{html.escape(c['what'])}. CLIP model {html.escape(c['model']['name'])}.</p>",
        "<table>",
        _row(["all prompts", _iv(c["clip_score"])]),
        _row(["the same images with the other prompts (no prompt adherence)", _iv(c["clip_score_mismatched"])]),
        _row(
            [
                "images whose own prompt scores highest",
                "-" if acc is None else f"{_iv(acc, 1, True)} (chance {c['prompt_accuracy_chance']:.0%})",
            ]
        ),
        "</table><h3>Per prompt</h3><table>",
        *rows,
        "</table>",
    ]


def _reference_part(r: dict) -> list[str]:
    per_set = [_row(["set", "FID", "floor FID", "ratio", "KID", "floor KID"], head=True)]
    for k, row in enumerate(r["per_set"]):
        ratio = "-" if row["fid_ratio"] is None else f"{row['fid_ratio']:.3f}"
        cells = [f"{row['fid']:.4g}", f"{row['floor_fid']:.4g}", ratio, f"{row['kid_mean']:.4g}"]
        per_set.append(_row([str(k), *cells, f"{row['floor_kid_mean']:.4g}"]))
    return [
        "<h2>FID and KID against the reference images</h2>",
        f"<p><b>Features: {html.escape(r['features']['name'])}</b>. {html.escape(r['features']['description'])}</p>",
        f"<p>{r['images']} distinct images in {html.escape(r['folder'])}, split by content hash: "
        f"{r['heldout_images']} held out (every figure compares with them), {r['floor_images']} scored against them "
        f"for scale (the floor: what real images of this kind score). {r['compared_per_set']} images a side; KID "
        f"on subsets of {r['kid_subset_size']}.</p>",
        "<table>",
        _row(["", "generated", "floor (reference vs itself)"], head=True),
        _row(["FID", _iv(r["fid"], 4), _iv(r["floor_fid"], 4)]),
        _row(["KID", _iv(r["kid_mean"], 4), _iv(r["floor_kid_mean"], 4)]),
        _row(["FID / floor FID (1.0 = as close as real images)", _iv(r["fid_ratio"], 3), ""]),
        "</table><h3>Per sample set</h3><table>",
        *per_set,
        "</table>",
    ]


def write_t2i_report(path: Path, metrics: dict, out: Path) -> Path:
    """An HTML page: settings, CLIP score, FID/KID with the floor, a grid per prompt (embedded up to 16 MiB of
    grids, so small runs give a self-contained page; linked beyond), warnings, timings."""
    s = metrics["settings"]
    title = f"sdpipe evaluate: {Path(metrics['model']['path']).name} on {len(metrics['prompts'])} prompts"
    embed = sum((out / g["file"]).stat().st_size for g in metrics["grids"]) <= MAX_EMBEDDED
    grids = [] if embed else [f"<p>the grids (over {MAX_EMBEDDED >> 20} MiB) are linked, not embedded</p>"]
    for g in metrics["grids"]:
        src = _picture(out / g["file"]) if embed else html.escape(g["file"])
        grids.append(
            f"<figure><img alt='grid' src='{src}' style='image-rendering:pixelated;"
            f"min-width:{min(4 * s['width'], 256)}px'><figcaption>{html.escape(g['prompt'])} "
            f"<small>({html.escape(g['file'])})</small></figcaption></figure>"
        )
    settings = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in s.items())
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>model {html.escape(metrics['model']['hash'])} ({html.escape(metrics['model']['kind'])}); "
        f"{html.escape(metrics['intervals'])}; images/s {_iv(metrics['images_per_s'], 3)}.</p>",
        *(f"<p><b>warning:</b> {html.escape(w)}</p>" for w in metrics.get("warnings", [])),
        *(_clip_part(metrics["clip"]) if "clip" in metrics else ["<p>no CLIP score (give --clip DIR)</p>"]),
        *(_reference_part(metrics["reference"]) if "reference" in metrics else ["<p>no FID (give --reference)</p>"]),
        "<h2>Images (a row per sample set)</h2>",
        *grids,
        f"<h2>Settings</h2><ul>{settings}</ul>",
        "<h2>Timings (seconds)</h2><table>",
        *(_row([html.escape(k), f"{v:.1f}"]) for k, v in metrics["timings_s"].items()),
        "</table>",
    ]
    return _write_html(path, title, parts)

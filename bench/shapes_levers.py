"""The shapes demo's levers, one at a time: what each setting does to the judge's scores, on the same components.

    .venv/bin/python bench/shapes_levers.py prepare --out DIR [--seed 0]
    .venv/bin/python bench/shapes_levers.py run --out DIR --name NAME [--seed 0] [--set key=value ...]
    .venv/bin/python bench/shapes_levers.py lora --out DIR --base NAME --name NAME2 [--text-encoder]
    .venv/bin/python bench/shapes_levers.py table --out DIR

`prepare` renders the demo's data (`sdpipe.data.shapes`, the demo's sizes) and trains the demo's own components
once (its VAE and its random CLIP text encoder, in DIR/base/components). `run` trains the demo's UNet
(`sdpipe.demo_shapes.unet_config`) on those components with the `--set` overrides and `train.seed=--seed`,
samples the judge's prompts and prints and writes the judge's scores (DIR/NAME/scores.json). So two runs
differ only in the lever and the seed, never in the VAE. The demo's own settings are the default: since the
text encoder trains with the UNet by default, the frozen-encoder baseline is `--set train.train_text_encoder=false`.
`lora` runs `sdpipe demo shapes-lora` on run NAME's model into DIR/NAME2 (`--text-encoder`: a LoRA on the text
encoder too) and keeps its judge's before/after figures. `table` prints every run's scores side by side.

Runs are meant to go two at a time on 2 cores (each uses one torch thread, the demo's default), each with its
own latent cache. Figures: the share of samples the judge reads as right per caption kind, with 95 % intervals
over 4 sample sets (`ShapesJudge.score`), and the seconds each phase took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdpipe.demo_shapes import ShapesBudget, judge, sample_judge_prompts, unet_config


def prepare(out: Path, seed: int) -> None:
    from sdpipe.data import open_split
    from sdpipe.data.shapes import write_folder
    from sdpipe.data.validate import validate
    from sdpipe.train.components import make_components, start_own_components

    b = ShapesBudget(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    print(write_folder(out / "data", b.n_train, b.n_test, b.seed))
    cfg = unet_config(out, b)
    validate(str(out / "data"), out / "validated", cfg.data)
    t = time.perf_counter()
    start_own_components(cfg, out / "base", resume=False)
    make_components(cfg, open_split(cfg.data, "train"), out / "base")
    print(f"components in {time.perf_counter() - t:.0f} s: {out / 'base' / 'components'}")


def run(out: Path, name: str, seed: int, sets: list[str]) -> dict:
    from sdpipe.pipeline_t2i import train_t2i_model

    b = ShapesBudget(seed=seed)
    own = [f"model.pretrained={out / 'base' / 'components'}", f"train.cache_dir={out / name / 'cache'}"]
    cfg = unet_config(out, b, [*own, *sets])
    t = time.perf_counter()
    trained = train_t2i_model(cfg, out / name / "run", show_progress=False)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    images, captions = sample_judge_prompts(trained.model.path, b, show_progress=False)
    scores = {
        "name": name, "seed": seed, "sets": sets, "train_s": round(train_s, 1),
        "sample_s": round(time.perf_counter() - t, 1), "final_loss": trained.result.outcome.history[-1]["loss"],
        "judge": judge(images, captions, seed),
    }  # fmt: skip
    (out / name / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores, indent=2))
    return scores


def lora(out: Path, base: str, name: str, text_encoder: bool) -> dict:
    from dataclasses import replace

    from sdpipe.demo_shapes_lora import LoraBudget, run_shapes_lora_demo

    t = time.perf_counter()
    metrics = run_shapes_lora_demo(out / base, out / name, replace(LoraBudget(), text_encoder=text_encoder), False)
    print(json.dumps({"name": name, "seconds": round(time.perf_counter() - t), **metrics}, indent=2, default=str))
    return metrics


def table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/scores.json"))]
    for r in rows:
        cells = []
        for group, s in r["judge"].items():
            if s.get("share"):
                i = s["share"]
                cells.append(f"{group} {100 * i['mean']:.0f} ({100 * i['low']:.0f}-{100 * i['high']:.0f})")
        print(f"{r['name']:>16} seed {r['seed']}  {r['train_s']:>6.0f} s  " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepare", "run", "lora", "table"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="te", help="lora: the run whose model the LoRA fine-tunes")
    ap.add_argument("--text-encoder", action="store_true", help="lora: a LoRA on the text encoder too")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a config override, key=value")
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(a.out, a.seed)
    elif a.what == "run":
        run(a.out, a.name, a.seed, a.sets)
    elif a.what == "lora":
        lora(a.out, a.base, a.name, a.text_encoder)
    else:
        table(a.out)


if __name__ == "__main__":
    main()

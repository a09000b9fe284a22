"""Training recipes compared: pooled learning curves of one task under several run configurations.

On the synthetic consortium (3 sites × N studies of every image task, the learning test's data), train the task's
default network pooled over the sites for E epochs under each recipe given (flat run-config keys, as
``--set`` takes them), and print per recipe the validation AUROC after every epoch (Dice for a
segmentation task), the final validation and test figure and the training time. Training is repeatable: a
recipe run twice gives the same curve, so a difference between recipes is the recipe's (and the
``threads`` key shows what the number of CPU threads alone does to a slow learner).

Prints a markdown table and writes ``OUT/bench-recipe.json``.

Example::

    .venv/bin/python scripts/bench_recipe.py --out bench-output/recipe --task colorectal-ct --epochs 15 \\
        --recipe batch-size=16 --recipe batch-size=8 --recipe batch-size=4 --recipe batch-size=4,seed=1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from fl_client.local_run import run_local
from imaging.synth import ingested_consortium
from models.config import from_flat

IMAGE_TASKS = ["lung-ct", "breast-mg", "prostate-mr", "colorectal-ct"]



def parse_recipe(text: str) -> dict[str, str]:
    """``key=value,key=value`` as a flat run configuration (``threads`` included)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--recipe {text!r}: give key=value pairs separated by commas, e.g. batch-size=4,seed=1")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/recipe"))
    parser.add_argument("--task", default="colorectal-ct")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site")
    parser.add_argument("--seed", type=int, default=0, help="the consortium's seed (the recipe's is its own key)")
    parser.add_argument("--recipe", action="append", default=[],
                        help="key=value[,key=value...] run-config values of one recipe (repeat for more)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    recipes = [parse_recipe(r) for r in args.recipe] or [{}]
    args.out.mkdir(parents=True, exist_ok=True)
    # The learning test's consortium: every image task generated, so a task's studies are the test's.
    ws = ingested_consortium(args.out / "consortium", sites=3, studies_per_task=args.studies,
                             seed=args.seed, tasks=IMAGE_TASKS)
    sites = sorted(p for p in ws.iterdir() if p.is_dir())
    rows: list[dict[str, Any]] = []
    import torch

    default_threads = torch.get_num_threads()
    with Progress(console=console) as progress:
        for i, recipe in enumerate(recipes):
            flat = {"task": args.task, **recipe}
            threads = int(flat.get("threads", 0) or 0)
            name = ",".join(f"{k}={v}" for k, v in recipe.items()) or "defaults"
            bar = progress.add_task(name, total=args.epochs)
            curve: list[float | None] = []

            def on_epoch(epoch: int, loss: float, score: float | None, bar: Any = bar,
                         curve: list[float | None] = curve) -> None:
                curve.append(score)
                progress.advance(bar)

            torch.set_num_threads(threads or default_threads)  # a recipe's threads key must not carry over
            t0 = time.perf_counter()
            doc = run_local(sites, from_flat(flat), args.out / f"run-{i}", epochs=args.epochs, on_epoch=on_epoch)
            val, test = doc["splits"].get("val", {}), doc["splits"].get("test", {})  # a split may be empty
            head = "dice" if "dice" in val else "auroc"
            rows.append({"recipe": name, "val": val.get(head), "test": test.get(head),
                         "seconds": time.perf_counter() - t0, "curve": curve, "metric": head})
            (args.out / "bench-recipe.json").write_text(json.dumps({"task": args.task, "epochs": args.epochs,
                                                                     "rows": rows}, indent=1))

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    console.print(f"\n{args.task}, 3 sites × {args.studies} studies pooled, {args.epochs} epochs\n")
    console.print("| recipe | validation | test | validation by epoch | seconds |")
    console.print("|---|---|---|---|---|")
    for r in rows:
        console.print(f"| {r['recipe']} | {f(r['val'])} | {f(r['test'])} | {' '.join(f(v) for v in r['curve'])} | "
                      f"{r['seconds']:.0f} |", soft_wrap=True)
    console.print(f"\nwrote {args.out / 'bench-recipe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lesion segmentation benchmark: Dice of federated vs pooled vs each site alone, with DP-SGD, and CPU times.

On one synthetic consortium (3 sites, ``--studies`` per task per site, annotations as DICOM SEG ingested like
a hospital's), per segmentation task and at equal training compute (R rounds of one local epoch, or R epochs):

- each federated recipe of ``--strategies`` after R rounds, through Flower (FedAvg, FedAvg stepping three times
  along the mean update, FedProx, FedAvgM (server momentum 0.9), FedProx with server momentum 0.9 or 0.5,
  FedAdam), and FedAvg with DP-SGD at ε = ``--epsilon`` per site over the run;
- the pooled (centralised) baseline: all sites' training studies together, R epochs;
- each site alone, R epochs;

every model scored on a held-out consortium: the same sites' scanners, other patients (seed + 1000), every study
of it (3 × ``--holdout-studies`` per task, about half with a lesion): Dice (mean over the studies with a lesion),
lesion-wise sensitivity, false-positive lesions per study, HD95 (mean over the studies with a lesion and a
prediction). A benchmark may pool studies because it runs on synthetic
data on one machine. Also: CPU seconds per training epoch (pooled run) and sliding-window inference seconds per
study. ``--set KEY=VALUE`` sets a run-config key of every run (learning-rate, batch-size, ...). Prints markdown
tables; writes ``OUT/bench-seg.json``.

Example::

    .venv/bin/python scripts/bench_seg.py --out bench-output/seg --tasks lung-ct-seg,prostate-mr-seg --rounds 20
    .venv/bin/python scripts/bench_seg.py --out bench-output/seg --strategies fedavg,fedavg-step3 --skip-dp \\
        --set learning-rate=3e-3
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from fl_client.local_run import run_local
from fl_server.flower_ops import simulate
from fl_server.strategies import RECIPES
from imaging.presets import get_preset
from imaging.synth import ingested_consortium
from models.config import from_flat
from models.tasks import TASK_ROUNDS


def score(model_path: Path, holdout: list[Path], task: str) -> dict[str, Any]:
    """Segmentation figures of a saved model on every study of the held-out sites, and the inference time."""
    import torch

    from fl_client.metrics import merge_segmentation
    from fl_client.train import evaluate_local
    from imaging.sitedata import load_site_data
    from models.nets import build_model
    from models.weights import load_checkpoint

    arrays, run_config, _ = load_checkpoint(model_path)
    model = build_model(from_flat(run_config).model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    results = [result for ws in holdout for split in ("train", "val", "test")
               if (result := evaluate_local(model, load_site_data([ws], task), split)) is not None]
    merged = merge_segmentation([r.metrics for r in results])
    if merged is None:
        return {}
    images = sum(r.images for r in results)
    return {**merged.as_dict(), "seconds_per_study": sum(r.seconds for r in results) / max(images, 1)}


def federated(sites: Path, run_dir: Path, config: dict[str, Any]) -> float:
    """Run a simulation; return its wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    outcome = simulate(sites, run_dir, config)
    if not outcome.finished:
        raise RuntimeError(f"run {run_dir} did not finish:\n{outcome.output[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/seg"))
    parser.add_argument("--tasks", default="lung-ct-seg,breast-mg-seg,colorectal-ct-seg,prostate-mr-seg")
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site")
    parser.add_argument("--rounds", type=int, default=0,
                        help="federated rounds = epochs of the local baselines (0: the task's count of rounds)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD ε per site over the run")
    parser.add_argument("--holdout-studies", type=int, default=48,
                        help="studies per task per site of the held-out consortium every model is scored on")
    parser.add_argument("--strategies", default="fedavg", help=f"federated recipes, of {', '.join(RECIPES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value of every run (learning-rate, batch-size, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--again", action="store_true", help="redo tasks already in OUT/bench-seg.json")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if unknown := [s for s in strategies if s not in RECIPES]:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key.strip() in {"task", "num-rounds", "strategy", "dp", "dp-epsilon"}:
            parser.error(f"--set {item!r}: give KEY=VALUE of the recipe (rounds, strategies and DP have their own "
                         "options), e.g. --set learning-rate=3e-3")
        overrides[key.strip()] = value.strip()
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "bench-seg.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    image_tasks = sorted({get_preset(t).image_task for t in tasks})
    sites = ingested_consortium(args.out / "data", sites=3, studies_per_task=args.studies,
                                seed=args.seed, tasks=image_tasks)
    held = ingested_consortium(args.out / "holdout", sites=3, studies_per_task=args.holdout_studies,
                               seed=args.seed + 1000, tasks=image_tasks)
    site_dirs = sorted(p for p in sites.iterdir() if p.is_dir())
    holdout = sorted(p for p in held.iterdir() if p.is_dir())
    for task in tasks:
        rounds = args.rounds or TASK_ROUNDS[task]
        # Rows are kept per task and recipe: a run with other --set values or rounds gets a row of its own.
        label = f"{task} {rounds} rounds" + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))
        row: dict[str, Any] = dict(results.get(label, {})) if not args.again else {}
        common = {"task": task, "threads": 0, "seed": args.seed, "num-rounds": rounds, **overrides}
        runs = [(name, RECIPES[name]) for name in strategies]
        if not args.skip_dp:
            for ws in site_dirs:
                from fl_client.privacy import PrivacyLedger

                ledger = PrivacyLedger(ws)
                if ledger.budget() is None:
                    ledger.set_budget(1000.0)
            runs.append(("fedavg-dp", {"strategy": "fedavg", "dp": True, "dp-epsilon": args.epsilon}))
        for name, extra in runs:
            if name in row:
                console.print(f"{task} {name}: done before, kept (--again redoes it)")
                continue
            run_dir = args.out / "runs" / f"{task}-{name}"
            seconds = federated(sites, run_dir, {**common, **extra})
            row[name] = {**score(run_dir / "model.pt", holdout, task), "run_seconds": seconds}
            console.print(f"{task} {name}: held-out Dice {row[name].get('dice')}")
            out_json.write_text(json.dumps({**results, label: row}, indent=1))
        config = from_flat({k: v for k, v in common.items() if k != "num-rounds"})
        if "pooled" not in row:
            out = args.out / "runs" / f"{task}-pooled"
            doc = run_local(site_dirs, config, out, epochs=rounds)
            row["pooled"] = {**score(out / "model.pt", holdout, task),
                             "seconds_per_epoch": doc["train_seconds"] / rounds, "rounds": rounds,
                             "training_samples": doc["training_samples"]}
        for ws in site_dirs:
            if f"single-{ws.name}" in row:
                continue
            out = args.out / "runs" / f"{task}-{ws.name}"
            try:
                run_local([ws], config, out, epochs=rounds)
                row[f"single-{ws.name}"] = score(out / "model.pt", holdout, task)
            except Exception as exc:  # a site without an annotated lesion cannot train alone
                row[f"single-{ws.name}"] = {}
                console.print(f"{task} {ws.name} alone: {exc}")
        results[label] = row
        console.print(f"{task}: held-out Dice " + ", ".join(f"{k} {v.get('dice')}" for k, v in row.items()))
        out_json.write_text(json.dumps(results, indent=1))

    def f(v: Any, digits: int = 3) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    names = [p.name for p in site_dirs]
    done = [n for n in [*RECIPES, "fedavg-dp"] if any(n in row for row in results.values())]
    console.print("\n| task | " + " | ".join(done) + " | pooled | " + " | ".join(f"{n} alone" for n in names)
                  + " | best federated / pooled | best federated − best site | s/epoch (pooled, CPU) | "
                  "inference s/study | held-out studies (with a lesion) |")
    console.print("|---|" + "---|" * (len(done) + len(names) + 6))
    for task, row in results.items():
        pooled = row.get("pooled", {}).get("dice")
        feds = [row[n]["dice"] for n in RECIPES if row.get(n, {}).get("dice") is not None]
        singles = [row[f"single-{n}"]["dice"] for n in names if row.get(f"single-{n}", {}).get("dice") is not None]
        best = max(feds) if feds else None
        ratio = best / pooled if best is not None and pooled else None
        margin = best - max(singles) if best is not None and singles else None
        console.print(f"| {task} | " + " | ".join(f(row.get(n, {}).get("dice")) for n in done)
                      + f" | {f(pooled)} | " + " | ".join(f(row.get(f"single-{n}", {}).get("dice")) for n in names)
                      + f" | {f(ratio, 2)} | {f(margin)} | {f(row.get('pooled', {}).get('seconds_per_epoch'), 1)} | "
                      f"{f(row.get('pooled', {}).get('seconds_per_study'), 3)} | "
                      f"{row.get('pooled', {}).get('studies', '—')} ({row.get('pooled', {}).get('positives', '—')}) |")
    console.print("\nLesion-wise: " + "; ".join(
        f"{t} {n}: sensitivity {f(r[n].get('lesion_sensitivity'), 2)}, FP/study {f(r[n].get('fp_lesions'), 2)}, "
        f"HD95 {f(r[n].get('hd95'), 1)} mm"
        for t, r in results.items() for n in r if n in done or n == "pooled"))
    console.print(f"\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lesion segmentation benchmark: Dice of federated vs pooled vs each site alone, with DP-SGD, and CPU times.

On one synthetic consortium (3 sites, ``--studies`` per task per site, annotations as DICOM SEG ingested like
a hospital's), per segmentation task and at equal training compute (R rounds of one local epoch, or R epochs):

- FedAvg after R rounds, and FedAvg with DP-SGD at ε = ``--epsilon`` per site over the whole run;
- the pooled (centralised) baseline: all sites' training studies together, R epochs;
- each site alone, R epochs;

every model scored on the test studies of all sites pooled (per-study Dice over the studies with a lesion,
lesion-wise sensitivity, false-positive lesions per study; a benchmark may pool test studies because it runs
on synthetic data on one machine). Also: CPU seconds per training epoch (pooled run) and sliding-window
inference seconds per study. Prints a markdown table; writes ``OUT/bench-seg.json``.

Example::

    .venv/bin/python scripts/bench_seg.py --out bench-output/seg --tasks lung-ct-seg,prostate-mr-seg --rounds 10
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
from imaging.presets import get_preset
from imaging.synth import ingested_consortium
from models.config import from_flat


def score(model_path: Path, site_dirs: list[Path], task: str) -> dict[str, Any]:
    """Segmentation figures of a saved model on the test studies of all sites pooled, and the inference time."""
    import torch

    from fl_client.train import evaluate_local
    from imaging.sitedata import load_site_data
    from models.nets import build_model
    from models.weights import load_checkpoint

    arrays, run_config, _ = load_checkpoint(model_path)
    model = build_model(from_flat(run_config).model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    result = evaluate_local(model, load_site_data(site_dirs, task), "test")
    if result is None:
        return {}
    return {**result.metrics.as_dict(), "seconds_per_study": result.seconds / max(result.images, 1)}


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
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds = epochs of the local baselines")
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD ε per site over the run")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of every run")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size of every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--again", action="store_true", help="redo tasks already in OUT/bench-seg.json")
    args = parser.parse_args(argv)
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
    site_dirs = sorted(p for p in sites.iterdir() if p.is_dir())
    for task in tasks:
        if task in results and not args.again:
            console.print(f"{task}: done before, kept (--again redoes it)")
            continue
        row: dict[str, Any] = {}
        common = {"task": task, "threads": 0, "seed": args.seed, "learning-rate": args.lr,
                  "batch-size": args.batch_size}
        runs = [("fedavg", {})]
        if not args.skip_dp:
            for ws in site_dirs:
                from fl_client.privacy import PrivacyLedger

                ledger = PrivacyLedger(ws)
                if ledger.budget() is None:
                    ledger.set_budget(1000.0)
            runs.append(("fedavg-dp", {"dp": True, "dp-epsilon": args.epsilon}))
        for name, extra in runs:
            run_dir = args.out / "runs" / f"{task}-{name}"
            seconds = federated(sites, run_dir, {**common, "strategy": "fedavg", "num-rounds": args.rounds, **extra})
            row[name] = {**score(run_dir / "model.pt", site_dirs, task), "run_seconds": seconds}
            console.print(f"{task} {name}: Dice {row[name].get('dice')}")
        config = from_flat(common)
        out = args.out / "runs" / f"{task}-pooled"
        doc = run_local(site_dirs, config, out, epochs=args.rounds)
        row["pooled"] = {**score(out / "model.pt", site_dirs, task),
                         "seconds_per_epoch": doc["train_seconds"] / args.rounds,
                         "training_samples": doc["training_samples"]}
        for ws in site_dirs:
            out = args.out / "runs" / f"{task}-{ws.name}"
            try:
                run_local([ws], config, out, epochs=args.rounds)
                row[f"single-{ws.name}"] = score(out / "model.pt", site_dirs, task)
            except Exception as exc:  # a site without an annotated lesion cannot train alone
                row[f"single-{ws.name}"] = {}
                console.print(f"{task} {ws.name} alone: {exc}")
        results[task] = row
        console.print(f"{task}: {row}")
        out_json.write_text(json.dumps(results, indent=1))

    def f(v: Any, digits: int = 3) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    names = [p.name for p in site_dirs]
    console.print(f"\n| task | FedAvg | FedAvg DP ε={args.epsilon:g} | pooled | "
                  + " | ".join(f"{n} alone" for n in names) + " | FedAvg / pooled | s/epoch (pooled, CPU) | "
                  "inference s/study |")
    console.print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for task, row in results.items():
        fed, pooled = row.get("fedavg", {}).get("dice"), row.get("pooled", {}).get("dice")
        ratio = fed / pooled if fed is not None and pooled else None
        console.print(f"| {task} | {f(fed)} | {f(row.get('fedavg-dp', {}).get('dice'))} | {f(pooled)} | "
                      + " | ".join(f(row.get(f"single-{n}", {}).get("dice")) for n in names)
                      + f" | {f(ratio, 2)} | {f(row['pooled'].get('seconds_per_epoch'), 1)} | "
                      f"{f(row['pooled'].get('seconds_per_study'), 2)} |")
    console.print("\nLesion-wise (FedAvg): " + "; ".join(
        f"{t}: sensitivity {f(r.get('fedavg', {}).get('lesion_sensitivity'), 2)}, FP/study "
        f"{f(r.get('fedavg', {}).get('fp_lesions'), 2)}, HD95 {f(r.get('fedavg', {}).get('hd95'), 1)} mm"
        for t, r in results.items()))
    console.print(f"\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

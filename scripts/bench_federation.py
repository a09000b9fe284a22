"""Federation benchmarks: framework overhead per round, and federated vs centralised vs single-site AUROC.

1. Overhead: for N simulated sites, per round ``(wall time - slowest site's train+eval time) / wall``,
   median over the rounds after the first (the first also starts Flower's workers and fills caches).
2. Quality: on the same synthetic consortium and the same number of passes over the data, the AUROC
   on the test studies of all sites pooled of: FedAvg and FedProx after R rounds of one local epoch,
   the centralised baseline (all sites' data pooled, R epochs), and each single site alone (R epochs).
   (A benchmark may pool the test studies because it runs on synthetic data on one machine; in a
   real consortium each site evaluates on its own and only the figures travel.)
3. DP (``--dp-epsilons``): FedAvg without DP and under DP-SGD at each ε per site, same rounds, test AUROC and
   its change against the run without DP.

Prints markdown tables and writes ``OUT/bench-federation.json``.

Example::

    .venv/bin/python scripts/bench_federation.py --out bench-output/fed --tasks lung-ct,breast-mg --rounds 10
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed --overhead-only --sites 2,4
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed-dp --studies 96 --dp-epsilons 1,3,8 --dp-only
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from fl_client.local_run import run_local
from fl_server.flower_ops import simulate
from imaging.synth import ingested_consortium
from models.config import from_flat


def federated(sites: Path, run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    outcome = simulate(sites, run_dir, config)
    if not outcome.finished:
        raise RuntimeError(f"run {run_dir} did not finish:\n{outcome.output[-3000:]}")
    history = json.loads((run_dir / "history.json").read_text())
    history["total_seconds"] = time.perf_counter() - t0
    return dict(history)


def overhead(history: dict[str, Any]) -> dict[str, float]:
    rounds = [r for r in history["rounds"] if r.get("seconds")]
    later = rounds[1:] or rounds
    return {"round_seconds": statistics.median(r["seconds"] for r in later),
            "slowest_site_seconds": statistics.median(r["slowest_site_seconds"] for r in later),
            "overhead": statistics.median(r["overhead"] for r in later),
            "first_round_seconds": rounds[0]["seconds"], "total_seconds": history["total_seconds"]}


def test_auroc(model_path: Path, site_dirs: list[Path], task: str) -> float | None:
    """AUROC of a saved model on the test studies of all sites pooled (the same yardstick for every model)."""
    import torch

    from fl_client.train import evaluate_local
    from imaging.sitedata import load_site_data
    from models.nets import build_model
    from models.weights import load_checkpoint

    arrays, run_config, _ = load_checkpoint(model_path)
    model = build_model(from_flat(run_config).model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    result = evaluate_local(model, load_site_data(site_dirs, task), "test")
    return None if result is None else result.metrics.auroc


def dp_runs(args: argparse.Namespace, sites: Path, site_dirs: list[Path], tasks: list[str], epsilons: list[float],
            results: dict[str, Any], out_json: Path, console: Console) -> None:
    """FedAvg without DP and under DP-SGD at each ε per site, on the same consortium and rounds: AUROC on every
    site's test studies. Each site gets a budget that covers all the runs (a benchmark spends it freely)."""
    from fl_client.privacy import PrivacyLedger

    for ws in site_dirs:
        ledger = PrivacyLedger(ws)
        if ledger.budget() is None:
            ledger.set_budget(1000.0, 1e-5)
    for task in tasks:
        row: dict[str, Any] = dict(results["dp"].get(task, {}))
        common = {"task": task, "threads": 0, "seed": args.seed, "num-rounds": args.rounds}
        dp = {"dp": True, "learning-rate": args.dp_learning_rate}
        runs: list[tuple[str, dict[str, Any]]] = [("plain", {})]
        runs += [(f"{e:g}", {**dp, "dp-epsilon": e}) for e in epsilons]
        for name, extra in runs:
            if name in row and not args.again:
                continue
            run_dir = args.out / "quality" / f"{task}-dp-{name}"
            h = federated(sites, run_dir, {**common, **extra})
            row[name] = test_auroc(run_dir / "model.pt", site_dirs, task)
            row[f"{name}_seconds"] = h["total_seconds"]
            console.print(f"{task} {'no DP' if name == 'plain' else f'DP ε={name}'}: AUROC {row[name]}")
            results["dp"][task] = row
            out_json.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/federation"))
    parser.add_argument("--tasks", default="lung-ct,breast-mg,prostate-mr,colorectal-ct")
    parser.add_argument("--sites", default="2,4", help="site counts for the overhead measurement")
    parser.add_argument("--overhead-task", default="lung-ct")
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site (quality runs)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-only", action="store_true")
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--again", action="store_true", help="redo tasks already in OUT/bench-federation.json")
    parser.add_argument("--dp-epsilons", default="",
                        help="also FedAvg under DP-SGD at each of these ε per site (e.g. 1,3,8); quality runs only")
    parser.add_argument("--dp-learning-rate", type=float, default=3e-3,
                        help="the DP runs' learning rate (DP-SGD wants larger steps than plain training)")
    parser.add_argument("--dp-only", action="store_true", help="only the DP runs (with --dp-epsilons)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"overhead": {}, "quality": {}, "dp": {}}
    out_json = args.out / "bench-federation.json"
    if out_json.exists():
        results = {**results, **json.loads(out_json.read_text())}

    if not args.quality_only:
        for n in [int(s) for s in args.sites.split(",")]:
            sites = ingested_consortium(args.out / f"overhead-{n}", sites=n, studies_per_task=16, seed=args.seed,
                                        tasks=[args.overhead_task])
            history = federated(sites, args.out / f"overhead-{n}" / "run",
                                {"task": args.overhead_task, "num-rounds": 4, "threads": 1, "min-sites": n})
            results["overhead"][str(n)] = overhead(history)
            console.print(f"overhead, {n} sites: {results['overhead'][str(n)]}")
            out_json.write_text(json.dumps(results, indent=1))
        console.print("\n| sites | round wall s (median) | slowest site train+eval s | overhead | first round s |")
        console.print("|---|---|---|---|---|")
        for n, o in results["overhead"].items():
            console.print(f"| {n} | {o['round_seconds']:.2f} | {o['slowest_site_seconds']:.2f} | "
                          f"{100 * o['overhead']:.0f} % | {o['first_round_seconds']:.1f} |")

    if not args.overhead_only:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        sites = ingested_consortium(args.out / "quality", sites=3, studies_per_task=args.studies,
                                    seed=args.seed, tasks=tasks)
        site_dirs = sorted(p for p in sites.iterdir() if p.is_dir())
        epsilons = [float(e) for e in args.dp_epsilons.split(",") if e.strip()]
        if epsilons:
            dp_runs(args, sites, site_dirs, tasks, epsilons, results, out_json, console)
        for task in [] if args.dp_only else tasks:
            if task in results["quality"] and not args.again:
                console.print(f"{task}: done before, kept (--again redoes it)")
                continue
            row: dict[str, Any] = {}
            common = {"task": task, "threads": 0, "seed": args.seed}
            for strategy, extra in (("fedavg", {}), ("fedprox", {"proximal-mu": 0.01})):
                h = federated(sites, args.out / "quality" / f"{task}-{strategy}",
                              {**common, "strategy": strategy, "num-rounds": args.rounds, **extra})
                run_dir = args.out / "quality" / f"{task}-{strategy}"
                row[strategy] = test_auroc(run_dir / "model.pt", site_dirs, task)
                row[f"{strategy}_seconds"] = h["total_seconds"]
            config = from_flat(common)
            out = args.out / "quality" / f"{task}-pooled"
            run_local(site_dirs, config, out, epochs=args.rounds)
            row["pooled"] = test_auroc(out / "model.pt", site_dirs, task)
            for ws in site_dirs:
                try:
                    out = args.out / "quality" / f"{task}-{ws.name}"
                    run_local([ws], config, out, epochs=args.rounds)
                    row[f"single-{ws.name}"] = test_auroc(out / "model.pt", site_dirs, task)
                except Exception as exc:  # a site without both classes in training cannot train alone
                    row[f"single-{ws.name}"] = None
                    console.print(f"{task} {ws.name} alone: {exc}")
            results["quality"][task] = row
            console.print(f"{task}: {row}")
            out_json.write_text(json.dumps(results, indent=1))
        console.print(f"\n| task | FedAvg | FedProx | pooled | {' | '.join(p.name + ' alone' for p in site_dirs)} |")
        console.print("|---|---|---|---|" + "---|" * len(site_dirs))

        def f(v: Any) -> str:
            return "—" if v is None else f"{v:.3f}"

        for task, row in results["quality"].items():
            console.print(f"| {task} | {f(row['fedavg'])} | {f(row['fedprox'])} | {f(row['pooled'])} | "
                          + " | ".join(f(row.get(f"single-{p.name}")) for p in site_dirs) + " |")
        if results["dp"]:
            eps = sorted({float(e) for row in results["dp"].values() for e in row if e != "plain"})
            console.print("\n| task | FedAvg | " + " | ".join(f"DP ε = {e:g}" for e in eps) + " |")
            console.print("|---|---|" + "---|" * len(eps))
            for task, row in results["dp"].items():
                plain = row.get("plain")
                cells = []
                for e in eps:
                    v = row.get(f"{e:g}")
                    drop = "" if v is None or not plain else f" ({100 * (v - plain) / plain:+.0f} %)"
                    cells.append(f(v) + drop)
                console.print(f"| {task} | {f(plain)} | " + " | ".join(cells) + " |")
    console.print(f"\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

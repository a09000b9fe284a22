"""Federation benchmarks: framework overhead per round, and federated vs centralised vs single-site AUROC.

1. Overhead: for N simulated sites, per round ``(wall time - slowest site's train+eval time) / wall``,
   median over the rounds after the first (the first also starts Flower's workers and fills caches).
2. Quality: on the same synthetic consortium and the same number of passes over the data (equal training
   compute), the AUROC with its DeLong 95 % interval of: the federated recipes (``--strategies``: FedAvg, FedAvg
   stepping three times along the mean update, FedProx, FedAvgM (server momentum 0.9), FedProx with server
   momentum 0.9 or 0.5, FedAdam) after R rounds of one local epoch (R: the task's count of rounds unless ``--rounds``),
   the centralised baseline (all sites' data pooled, R epochs), and each single site alone (R epochs). Every
   model is scored on a held-out consortium: the same sites' scanners, other patients (seed + 1000), every
   study of it (3 × 48 per task by default, against about 20 in the sites' own test splits). A benchmark may
   score on pooled studies because it runs on synthetic data on one machine; in a real consortium each site
   evaluates on its own and only the figures travel. ``--unlike-site`` runs the non-IID variant, where one
   site's scanners are unlike the others' (and scores that site's held-out studies on their own too).
3. DP (``--dp-epsilons``): the default strategy without DP and under DP-SGD at each ε per site, same rounds,
   held-out AUROC and its change against the run without DP; ``--dp-set KEY=VALUE`` sets a run-config key of the
   DP runs (e.g. ``augmentation-multiplicity=4``), and such runs are stored under their own name.

Prints markdown tables and writes ``OUT/bench-federation.json``.

Example::

    .venv/bin/python scripts/bench_federation.py --out bench-output/fed --quality-only
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed --tasks colorectal-ct --unlike-site site-c
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed --overhead-only --sites 2,4
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed-dp --studies 96 --dp-epsilons 1,3,8 --dp-only
    .venv/bin/python scripts/bench_federation.py --out bench-output/fed-dp --studies 96 --dp-epsilons 8 --dp-only \\
        --tasks lung-ct --dp-set augmentation-multiplicity=4
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

import numpy as np
from rich.console import Console

from fl_client.local_run import run_local
from fl_server.flower_ops import simulate
from fl_server.strategies import RECIPES
from imaging.synth import ingested_consortium
from models.config import from_flat
from models.tasks import TASK_ROUNDS, task_rounds


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


def _model(model_path: Path) -> tuple[Any, Any]:
    """The network of a ``model.pt`` and its scoring, from one read of the file."""
    import torch

    from models.nets import build_model
    from models.weights import read_model

    held = read_model(model_path)
    model = build_model(from_flat(held.run_config).model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in held.arrays.items()})
    return model, held.scoring


def holdout_auroc(model_path: Path, holdout: list[Path], task: str, *, unlike: str | None = None) -> dict[str, Any]:
    """AUROC (DeLong 95 % interval) of a saved model on every study of a held-out consortium: the same sites'
    scanners, other patients, never trained or validated on (one yardstick for every model, and ten times the
    studies of the sites' own test splits). With ``unlike``, also the AUROC on that site's held-out studies. Also
    the expected calibration error of the network's scores and, where the ``model.pt`` carries its run's
    recalibration (a federated global model or a local run's model, where the closed test adopted one), of the
    scores its sites show."""
    from fl_client.train import evaluate_local
    from imaging.sitedata import load_site_data
    from models.evaluation import auroc_ci, ece

    model, scoring = _model(model_path)
    labels: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    for ws in holdout:
        data = load_site_data([ws], task)
        for split in ("train", "val", "test"):
            result = evaluate_local(model, data, split)
            if result is not None and result.labels is not None and result.scores is not None:
                labels.setdefault(ws.name, []).extend(int(v) for v in result.labels)
                scores.setdefault(ws.name, []).extend(float(v) for v in result.scores)
    every = auroc_ci(sum(labels.values(), []), sum(scores.values(), []))
    out: dict[str, Any] = {"auroc": None if every is None else every.auroc,
                           "low": None if every is None else every.low, "high": None if every is None else every.high,
                           "studies": sum(len(v) for v in labels.values())}
    y, p = np.asarray(sum(labels.values(), []), int), np.asarray(sum(scores.values(), []), float)
    out["ece"] = ece(y, p)
    calibration = scoring.calibration
    if calibration is not None:
        out["ece_recalibrated"] = ece(y, calibration.of_scores(p))
        out["calibration"] = {"slope": calibration.slope, "intercept": calibration.intercept}
    if unlike is not None and unlike in labels:
        site = auroc_ci(labels[unlike], scores[unlike])
        out["unlike_auroc"] = None if site is None else site.auroc
    return out


def dp_runs(args: argparse.Namespace, sites: Path, site_dirs: list[Path], holdout: list[Path], tasks: list[str],
            epsilons: list[float], results: dict[str, Any], out_json: Path, console: Console, *, tag: str = "") -> None:
    """The default strategy without DP and under DP-SGD at each ε per site, same consortium and rounds: AUROC on the
    held-out studies. Each site gets a budget that covers all the runs (a benchmark spends it freely)."""
    from fl_client.privacy import PrivacyLedger

    for ws in site_dirs:
        ledger = PrivacyLedger(ws)
        if ledger.budget() is None:
            ledger.set_budget(1000.0, 1e-5)
    extra_dp = dict(item.split("=", 1) for item in args.dp_set)
    base_tag, tag = tag, tag + "".join(f" {k}={v}" for k, v in sorted(extra_dp.items()))
    folder = "quality" + tag.replace(" ", "-").replace("=", "")
    for task in tasks:
        row: dict[str, Any] = dict(results["dp"].get(f"{task}{tag}", {}))
        base = results["dp"].get(f"{task}{base_tag}", {})
        if "plain" not in row and "plain" in base:  # the DP settings do not change the run without DP
            row.update(plain=base["plain"], plain_seconds=base.get("plain_seconds"))
        rounds = args.rounds or task_rounds(task, dp=True)  # the plain twin runs as many rounds as the DP runs
        norm = from_flat({"task": task, "dp": True}).model.norm.value  # and the DP runs' network (no BatchNorm)
        common = {"task": task, "threads": 0, "seed": args.seed, "num-rounds": rounds, "norm": norm}
        dp = {"dp": True, "learning-rate": args.dp_learning_rate, **extra_dp}
        runs: list[tuple[str, dict[str, Any]]] = [("plain", {})]
        runs += [(f"{e:g}", {**dp, "dp-epsilon": e}) for e in epsilons]
        for name, extra in runs:
            if name in row and not args.again:
                continue
            run_dir = args.out / folder / f"{task}-dp-{name}"
            h = federated(sites, run_dir, {**common, **extra})
            row[name] = holdout_auroc(run_dir / "model.pt", holdout, task)["auroc"]
            row[f"{name}_seconds"] = h["total_seconds"]
            console.print(f"{task} {'no DP' if name == 'plain' else f'DP ε={name}'}: AUROC {row[name]}")
            results["dp"][f"{task}{tag}"] = row
            out_json.write_text(json.dumps(results, indent=1))


def _cell(result: Any) -> str:
    if not isinstance(result, dict) or result.get("auroc") is None:
        return "—"
    return f"{result['auroc']:.3f} ({result['low']:.2f}–{result['high']:.2f})"


def quality_table(quality: dict[str, Any], site_names: list[str], console: Console) -> None:
    """The markdown table: per task, each federated recipe, pooled and each site alone, with the default recipe's
    (or else FedAvg's) ratio to pooled and its margin over the best single site."""
    names = [n for n in RECIPES if any(n in row for row in quality.values())]
    console.print("\n| task | rounds | " + " | ".join(names) + " | pooled | "
                  + " | ".join(f"{n} alone" for n in site_names) + " | federated / pooled | federated − best site |")
    console.print("|---|---|" + "---|" * (len(names) + 1 + len(site_names) + 2))
    for key, row in quality.items():
        if "rounds" not in row:  # an earlier format
            continue
        fed = (row.get("default") or row.get("fedavg") or {}).get("auroc")
        pooled = (row.get("pooled") or {}).get("auroc")
        singles = [r["auroc"] for n in site_names if (r := row.get(f"single-{n}")) and r.get("auroc") is not None]
        ratio = "—" if fed is None or not pooled else f"{fed / pooled:.2f}"
        margin = "—" if fed is None or not singles else f"{fed - max(singles):+.3f}"
        console.print(f"| {key} | {row['rounds']} | " + " | ".join(_cell(row.get(n)) for n in names)
                      + f" | {_cell(row.get('pooled'))} | "
                      + " | ".join(_cell(row.get(f"single-{n}")) for n in site_names) + f" | {ratio} | {margin} |")
        if row.get("unlike"):
            parts = [f"{n} {r['unlike_auroc']:.3f}" for n in [*names, "pooled", *(f"single-{s}" for s in site_names)]
                     if isinstance(r := row.get(n), dict) and r.get("unlike_auroc") is not None]
            console.print(f"|  | on {row['unlike']}'s held-out studies: {', '.join(parts)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/federation"))
    parser.add_argument("--tasks", default="lung-ct,breast-mg,prostate-mr,colorectal-ct")
    parser.add_argument("--sites", default="2,4", help="site counts for the overhead measurement")
    parser.add_argument("--overhead-task", default="lung-ct")
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site (quality runs)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="federated rounds = epochs of the pooled and single-site models (0: each task's count, "
                             "models.tasks.TASK_ROUNDS; the DP runs and their plain twin: task_rounds under DP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-only", action="store_true")
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--again", action="store_true", help="redo tasks already in OUT/bench-federation.json")
    parser.add_argument("--dp-epsilons", default="",
                        help="also the default strategy under DP-SGD at each of these ε per site (e.g. 1,3,8); quality "
                             "runs only")
    parser.add_argument("--dp-learning-rate", type=float, default=3e-3,
                        help="the DP runs' learning rate (DP-SGD wants larger steps than plain training)")
    parser.add_argument("--dp-only", action="store_true", help="only the DP runs (with --dp-epsilons)")
    parser.add_argument("--dp-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key of the DP runs only (repeatable), e.g. augmentation-multiplicity=4")
    parser.add_argument("--strategies", default="fedavg,fedprox,fedadam",
                        help=f"federated recipes to compare, of {', '.join(RECIPES)}")
    parser.add_argument("--unlike-site", default=None, metavar="SITE",
                        help="the non-IID variant: this site's scanners are unlike the others' (e.g. site-c)")
    parser.add_argument("--holdout-studies", type=int, default=48,
                        help="studies per task per site of the held-out consortium every model is scored on")
    args = parser.parse_args(argv)
    if bad := [item for item in args.dp_set if "=" not in item]:
        parser.error(f"--dp-set {bad[0]!r}: give KEY=VALUE, e.g. augmentation-multiplicity=4")
    if fixed := [item for item in args.dp_set if item.split("=", 1)[0].strip() in ("dp", "dp-epsilon")]:
        parser.error(f"--dp-set {fixed[0]!r}: the DP runs set dp and dp-epsilon themselves (--dp-epsilons)")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if unknown := [s for s in strategies if s not in RECIPES]:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(RECIPES)}")
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
        tag = f"-unlike-{args.unlike_site}" if args.unlike_site else ""
        sites = ingested_consortium(args.out / f"quality{tag}", sites=3, studies_per_task=args.studies,
                                    seed=args.seed, tasks=tasks, unlike=args.unlike_site)
        site_dirs = sorted(p for p in sites.iterdir() if p.is_dir())
        held = ingested_consortium(args.out / f"holdout{tag}", sites=3, studies_per_task=args.holdout_studies,
                                   seed=args.seed + 1000, tasks=tasks, unlike=args.unlike_site)
        holdout = sorted(p for p in held.iterdir() if p.is_dir())
        epsilons = [float(e) for e in args.dp_epsilons.split(",") if e.strip()]
        if epsilons:
            dp_runs(args, sites, site_dirs, holdout, tasks, epsilons, results, out_json, console, tag=tag)
        for task in [] if args.dp_only else tasks:
            key = f"{task}{tag}"
            if key in results["quality"] and not args.again:
                console.print(f"{key}: done before, kept (--again redoes it)")
                continue
            rounds = args.rounds or TASK_ROUNDS[task]
            row: dict[str, Any] = {"rounds": rounds, "unlike": args.unlike_site}
            common = {"task": task, "threads": 0, "seed": args.seed}

            def score(model_path: Path, task: str = task) -> dict[str, Any]:
                return holdout_auroc(model_path, holdout, task, unlike=args.unlike_site)

            for name in strategies:
                run_dir = args.out / f"quality{tag}" / f"{task}-{name}"
                h = federated(sites, run_dir, {**common, **RECIPES[name], "num-rounds": rounds})
                row[name] = score(run_dir / "model.pt")
                row[f"{name}_seconds"] = h["total_seconds"]
                console.print(f"{key} {name}: {row[name]}")
            config = from_flat(common)
            out = args.out / f"quality{tag}" / f"{task}-pooled"
            run_local(site_dirs, config, out, epochs=rounds)
            row["pooled"] = score(out / "model.pt")
            for ws in site_dirs:
                try:
                    out = args.out / f"quality{tag}" / f"{task}-{ws.name}"
                    run_local([ws], config, out, epochs=rounds)
                    row[f"single-{ws.name}"] = score(out / "model.pt")
                except Exception as exc:  # a site without both classes in training cannot train alone
                    row[f"single-{ws.name}"] = None
                    console.print(f"{task} {ws.name} alone: {exc}")
            results["quality"][key] = row
            console.print(f"{key}: {row}")
            out_json.write_text(json.dumps(results, indent=1))
        quality_table(results["quality"], [p.name for p in site_dirs], console)
        if results["dp"]:
            def f(v: Any) -> str:
                return "—" if v is None else f"{v:.3f}"

            eps = sorted({float(e) for row in results["dp"].values() for e in row
                          if e.replace(".", "", 1).isdigit()})
            console.print("\n| task | no DP | " + " | ".join(f"DP ε = {e:g}" for e in eps) + " |")
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

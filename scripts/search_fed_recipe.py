"""Federated recipe search: many FedAvg-family recipes quickly, in one process, scored on held-out studies.

Classification tasks are scored by AUROC, segmentation tasks (``lung-ct-seg``, ...) by Dice (the mean over the
held-out studies with a lesion), with lesion-wise sensitivity and false-positive lesions per study beside it.

A real federated run (``bench_federation.py``) spends about 20 s starting Flower and a second or more per round on
messages; a recipe search needs dozens of runs. This script runs the same arithmetic in one process: each round,
every site of the synthetic consortium trains the global model for its local epochs with oncofed's own
``train_local`` (the same seeds per site and round as a site uses), the updates are averaged weighted by training
studies, and the server steps as Flower's strategies do:

- ``avg``: ``global + step × (mean − global)`` (FedAvg at step 1; ``--schedule cos`` decays the step from its value
  to 1 over the rounds along a half cosine);
- ``avgm``: Flower's FedAvgM (server momentum on the pseudo-gradient); a run whose configuration has server momentum
  (``--set server-momentum=0.9``, or a segmentation task's default) runs ``avgm`` with it;
- ``adam``: Flower's FedAdam (β 0.9 / 0.99, τ 1e-3, bias-corrected step).

``--pooled`` and ``--single SITE`` train the centralised and one-site baselines for ``rounds × local-epochs``
epochs (equal training compute). ``--set dp=true`` trains every site under DP-SGD as a site does: its own noise
calibrated for the run's ε over all the steps it plans (``plan_dp``), each session written ahead to a ledger of its
own under ``OUT/ledgers`` (a benchmark's budget of 1000). ``--unlike-site`` runs the non-IID variant of the
consortium (and of the held-out one). Every model is scored by its AUROC on all the studies of a held-out consortium
(the same sites' scanners, other patients: seed + 1000, 3 × 48 studies per task by default). One JSON line per run
is appended to ``OUT/search.jsonl``, with the calibration of a classifier (the server's Platt scaling on the sites'
pooled validation histograms, judged on the held-out studies: :func:`calibration_figures`); the figures a recipe
earns here are to be confirmed by ``bench_federation.py`` through Flower.

Example::

    .venv/bin/python scripts/search_fed_recipe.py --out bench-output/search --task colorectal-ct --rounds 10 \\
        --server avg --step 3
    .venv/bin/python scripts/search_fed_recipe.py --out bench-output/search --task prostate-mr --rounds 30 --pooled
    .venv/bin/python scripts/search_fed_recipe.py --out bench-output/search --task colorectal-ct --rounds 20 \\
        --set proximal-mu=0.1 --set seed=1
    .venv/bin/python scripts/search_fed_recipe.py --out bench-output/search-dp --studies 96 --task breast-mg \\
        --set dp=true --set dp-epsilon=8 --set learning-rate=3e-3 --set augmentation-multiplicity=4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from imaging.synth import ingested_consortium

IMAGE_TASKS = ["lung-ct", "breast-mg", "prostate-mr", "colorectal-ct"]
SEG_TASKS = [f"{t}-seg" for t in IMAGE_TASKS]


def study_scores(model: Any, datas: list[Any], splits: tuple[str, ...] = ("train", "val", "test")
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of ``model`` on the studies of ``splits`` of each site's data."""
    from fl_client.train import evaluate_local

    labels: list[int] = []
    scores: list[float] = []
    for data in datas:
        for split in splits:
            result = evaluate_local(model, data, split)
            if result is not None and result.labels is not None and result.scores is not None:
                labels.extend(int(v) for v in result.labels)
                scores.extend(float(v) for v in result.scores)
    return np.asarray(labels, int), np.asarray(scores, float)


def holdout_auroc(model: Any, holdout: list[Any]) -> tuple[float | None, int]:
    """AUROC of ``model`` on every study (all splits) of the held-out sites' data, and the study count."""
    from models.evaluation import auroc_ci

    labels, scores = study_scores(model, holdout)
    ci = auroc_ci(labels, scores)
    return (None if ci is None else ci.auroc), len(labels)


def calibration_figures(model: Any, sites: list[Any], holdout: list[Any]) -> dict[str, Any]:
    """The run's recalibration as the server fits it (Platt scaling on the sites' pooled validation histograms) and
    the per-case fit it stands for, judged on the held-out studies: expected calibration error before and after,
    and the spread of the scores (5th to 95th percentile)."""
    from models.evaluation import ece, fit_platt, fit_platt_histograms, score_histogram

    vy, vs = study_scores(model, sites, ("val",))
    hy, hs = study_scores(model, holdout)
    clipped = np.clip(vs, 1e-7, 1 - 1e-7)
    fit = fit_platt_histograms(*score_histogram(vy, vs))
    per_case = fit_platt(vy, np.log(clipped) - np.log1p(-clipped))

    def spread(scores: np.ndarray) -> list[float]:
        return [round(float(v), 3) for v in np.percentile(scores, [5, 95])] if len(scores) else []

    def brier(scores: np.ndarray) -> float:
        return float(np.mean((scores - hy) ** 2))

    def log_loss(scores: np.ndarray) -> float:
        q = np.clip(scores, 1e-7, 1 - 1e-7)
        return float(-np.mean(hy * np.log(q) + (1 - hy) * np.log(1 - q)))

    out: dict[str, Any] = {"val_studies": int(len(vy)), "val_positives": int(vy.sum()), "ece": ece(hy, hs),
                           "brier": brier(hs), "log_loss": log_loss(hs), "spread": spread(hs),
                           "fitted": fit is not None,
                           "scores": {"val": [vy.tolist(), vs.round(5).tolist()],
                                      "holdout": [hy.tolist(), hs.round(5).tolist()]}}
    if fit is not None:
        out.update(slope=fit.slope, intercept=fit.intercept, update=fit.update, statistic=fit.statistic,
                   ece_recalibrated=ece(hy, fit.of_scores(hs)),
                   brier_recalibrated=brier(fit.of_scores(hs)), log_loss_recalibrated=log_loss(fit.of_scores(hs)),
                   spread_recalibrated=spread(fit.of_scores(hs)))
    if per_case is not None:
        out.update(slope_per_case=per_case.slope, intercept_per_case=per_case.intercept,
                   ece_per_case_fit=ece(hy, per_case.of_scores(hs)))
    return out


def holdout_segmentation(model: Any, holdout: list[Any]) -> dict[str, Any]:
    """Segmentation figures of ``model`` on every study (all splits) of the held-out sites' data: Dice (mean over
    the studies with a lesion), lesion-wise sensitivity, false-positive lesions per study, HD95 (mm, mean over the
    studies with a lesion and a prediction), and the counts."""
    from fl_client.metrics import merge_segmentation
    from fl_client.train import evaluate_local

    parts = [result.metrics for data in holdout for split in ("train", "val", "test")
             if (result := evaluate_local(model, data, split)) is not None]
    merged = merge_segmentation(parts)
    if merged is None:
        return {"dice": None, "studies": 0, "positives": 0, "lesion_sensitivity": None, "fp_lesions": None,
                "hd95": None}
    return {"dice": merged.dice, "studies": merged.studies, "positives": merged.positives,
            "lesion_sensitivity": merged.lesion_sensitivity, "fp_lesions": merged.fp_lesions, "hd95": merged.hd95}


def holdout_score(model: Any, holdout: list[Any], segmentation: bool) -> tuple[float | None, int, dict[str, Any]]:
    """The headline figure on the held-out studies (Dice for segmentation, else AUROC), the study count, and the
    segmentation figures (empty for classification)."""
    if segmentation:
        figures = holdout_segmentation(model, holdout)
        return figures["dice"], figures["studies"], figures
    auroc, studies = holdout_auroc(model, holdout)
    return auroc, studies, {}


def server_update(kind: str, glob: dict[str, Any], mean: dict[str, Any], state: dict[str, Any], *, step: float,
                  momentum: float, eta: float, rnd: int) -> dict[str, Any]:
    """The new global weights after a round, as Flower's FedAvg (with a server step), FedAvgM or FedAdam."""
    delta = {k: mean[k] - glob[k] for k in glob}
    if kind == "avg":
        return {k: glob[k] + step * delta[k] for k in glob}
    if kind == "avgm":  # Flower's FedAvgM: momentum on the pseudo-gradient (old - new)
        state["m"] = delta if "m" not in state else {k: momentum * state["m"][k] + delta[k] for k in glob}
        return {k: glob[k] + step * state["m"][k] for k in glob}
    b1, b2, tau = 0.9, 0.99, 1e-3  # Flower's FedAdam defaults
    m = state.setdefault("m", {k: 0 * v for k, v in glob.items()})
    v = state.setdefault("v", {k: 0 * v for k, v in glob.items()})
    state["m"] = m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in glob}
    state["v"] = v = {k: b2 * v[k] + (1 - b2) * delta[k] ** 2 for k in glob}
    eta_norm = eta * np.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
    return {k: glob[k] + eta_norm * m[k] / (v[k].sqrt() + tau) for k in glob}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/search"))
    parser.add_argument("--task", default="colorectal-ct", choices=IMAGE_TASKS + SEG_TASKS)
    parser.add_argument("--rounds", type=int, default=10, help="rounds (= epochs of --pooled / --single)")
    parser.add_argument("--server", default="avg", choices=["avg", "avgm", "adam"])
    parser.add_argument("--step", type=float, default=None,
                        help="the server step of avg and avgm (default: the run's, the task's for FedAvg, FedProx)")
    parser.add_argument("--schedule", default="", choices=["", "cos"], help="cos: decay the step to 1 over the rounds")
    parser.add_argument("--momentum", type=float, default=0.9, help="avgm's server momentum")
    parser.add_argument("--eta", type=float, default=0.01, help="adam's server step")
    parser.add_argument("--pooled", action="store_true", help="train on all sites' data pooled instead")
    parser.add_argument("--single", default="", metavar="SITE", help="train on this site's data alone instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config values of the local training (learning-rate, local-epochs, seed, ...)")
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site (training consortium)")
    parser.add_argument("--holdout-studies", type=int, default=48, help="studies per task per held-out site")
    parser.add_argument("--seed", type=int, default=0, help="the consortium's seed")
    parser.add_argument("--holdout-seed", type=int, default=None, help="the held-out consortium's seed (seed + 1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--consortium-tasks", default=",".join(IMAGE_TASKS), metavar="TASKS",
                        help="the tasks the synthetic consortia are generated with (the order changes the patients)")
    parser.add_argument("--unlike-site", default=None, metavar="SITE",
                        help="the non-IID variant: this site's scanners are unlike the others' (e.g. site-c)")
    parser.add_argument("--name", default="", help="a name for the run's JSON line")
    parser.add_argument("--init", type=Path, default=None, metavar="MODEL",
                        help="start from this model.pt's weights (e.g. one trained on a public archive) instead of "
                             "fresh ones; --rounds 0 scores it as it is")
    parser.add_argument("--save", type=Path, default=None, metavar="MODEL",
                        help="write the final model here (a model.pt that --init reads)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    import torch

    from fl_client.federated import steps_per_round
    from fl_client.privacy import PrivacyLedger
    from fl_client.train import plan_dp, train_local
    from imaging.sitedata import load_site_data
    from models.config import (
        ConfigError,
        Norm,
        from_flat,
        proximal_mu_of,
        resolve_batch,
        resolved_grad_sample_mode,
        server_step,
    )
    from models.nets import build_model
    from models.weights import WeightsError, check_arrays, load_arrays, load_checkpoint, save_checkpoint, state_arrays

    console = Console()
    flat: dict[str, str] = {"task": args.task}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            console.print(f"[red]--set {item!r}: give KEY=VALUE, e.g. --set learning-rate=3e-3[/]")
            return 2
        flat[key.strip()] = value.strip()
    if args.init is not None:  # the run's start, as a run of oncofed-server names it (fine-tune needs it)
        flat.setdefault("initial-model", str(args.init))
    try:
        config = from_flat(flat)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    if config.privacy.enabled and (args.pooled or args.single):
        console.print("[red]--set dp=true runs the federation only: the site's DP plan is per site and round[/]")
        return 2
    torch.set_num_threads(args.threads)
    if args.step is None:  # the run's step: the task's default for FedAvg / FedProx (models.tasks.task_server_step)
        args.step = server_step(config.federation) if args.server in ("avg", "avgm") else 1.0
    if args.server == "avg" and config.federation.server_momentum > 0:  # the run's own (a segmentation default)
        args.server, args.momentum = "avgm", config.federation.server_momentum
    federated = not (args.pooled or args.single)
    if federated and config.model.norm == Norm.BATCH and (args.server != "avg" or args.step != 1 or args.schedule):
        # The server step here moves BatchNorm's running statistics too (models.config.batch_norm_fits).
        if flat.get("norm", "auto") != "auto":
            console.print("[red]norm=batch takes the plain mean only: --server avg --step 1, no --schedule[/]")
            return 2
        config = from_flat({**flat, "norm": "instance"})
    generated = [t.strip() for t in args.consortium_tasks.split(",") if t.strip()]
    image_task = args.task.removesuffix("-seg")
    segmentation = args.task in SEG_TASKS
    if image_task not in generated or any(t not in IMAGE_TASKS for t in generated):
        console.print(f"[red]--consortium-tasks {args.consortium_tasks!r}: tasks of {', '.join(IMAGE_TASKS)}, "
                      f"{image_task} among them[/]")
        return 2
    # Each consortium in its own folder, named by what it is made of (reused as it is when it exists).
    tag = ("" if generated == IMAGE_TASKS else "-" + "-".join(generated)) + (
        f"-unlike-{args.unlike_site}" if args.unlike_site else "")
    held_seed = args.seed + 1000 if args.holdout_seed is None else args.holdout_seed
    sites_root = ingested_consortium(args.out / f"consortium-seed{args.seed}-{args.studies}{tag}", sites=3,
                                     studies_per_task=args.studies, seed=args.seed, tasks=generated,
                                     unlike=args.unlike_site)
    held_root = ingested_consortium(args.out / f"holdout-seed{held_seed}-{args.holdout_studies}{tag}", sites=3,
                                    studies_per_task=args.holdout_studies, seed=held_seed, tasks=generated,
                                    unlike=args.unlike_site)
    sites = sorted(p for p in sites_root.iterdir() if p.is_dir())
    if args.single and args.single not in {p.name for p in sites}:
        console.print(f"[red]--single {args.single!r}: not one of {', '.join(p.name for p in sites)}[/]")
        return 2
    holdout = [load_site_data([p], args.task) for p in sorted(held_root.iterdir()) if p.is_dir()]
    spec = replace(config.training, proximal_mu=proximal_mu_of(config))
    torch.manual_seed(spec.seed)
    model = build_model(config.model)
    if args.init is not None:
        try:
            arrays, init_config, _ = load_checkpoint(args.init)
            if str(init_config.get("task", "")) != args.task:
                raise WeightsError(f"{args.init} is a {init_config.get('task')!r} model, this run trains {args.task}")
            check_arrays(state_arrays(model), arrays)
        except WeightsError as exc:
            console.print(f"[red]--init: {exc}[/]")
            return 2
        load_arrays(model, arrays)
    t0 = time.perf_counter()
    curve: list[tuple[int, float | None]] = []
    plans: list[Any] = []
    if args.pooled or args.single:
        chosen = sites if args.pooled else [p for p in sites if p.name == args.single]
        data = load_site_data(chosen, args.task)
        epochs = args.rounds * spec.local_epochs
        with Progress(console=console) as bar:
            job = bar.add_task(f"{'pooled' if args.pooled else args.single}: {epochs} epochs", total=epochs)
            train_local(model, data.dataset("train", train=spec.augment, seed=spec.seed), spec=spec,
                        labels=data.labels("train"), epochs=epochs, on_epoch=lambda e, _loss: bar.advance(job),
                        segmentation=segmentation)
    else:
        datas = [load_site_data([p], args.task) for p in sites]
        plans = [None] * len(datas)
        ledgers: list[Any] = [None] * len(datas)
        if config.privacy.enabled:
            run = f"{args.name or 'search'}-{time.strftime('%Y%m%d-%H%M%S')}"
            for i, (site, data) in enumerate(zip(sites, datas, strict=True)):
                ledgers[i] = PrivacyLedger(args.out / "ledgers" / run / site.name)
                ledgers[i].set_budget(1000.0, 1e-5)
                samples = data.count_patients("train")  # the plan a site makes (fl_client.federated), for args.rounds
                plans[i] = plan_dp(config.privacy, samples=samples, batch_size=resolve_batch(spec.batch_size, dp=True),
                                   steps_per_round=steps_per_round(config, samples), rounds=args.rounds,
                                   ledger=ledgers[i], grad_sample_mode=resolved_grad_sample_mode(config))
            console.print("DP noise multipliers: " + ", ".join(f"{p.noise_multiplier:.2f}" for p in plans))
        glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state: dict[str, Any] = {}
        with Progress(console=console) as bar:
            job = bar.add_task(f"{args.server} step {args.step:g}{' ' + args.schedule if args.schedule else ''}: "
                               f"{args.rounds} rounds", total=args.rounds)
            for rnd in range(1, args.rounds + 1):
                updates, counts = [], []
                for i, data in enumerate(datas):
                    model.load_state_dict(glob)
                    torch.manual_seed(spec.seed + rnd)
                    params = ({k: p.detach().clone() for k, p in model.named_parameters()}
                              if spec.proximal_mu else None)
                    train_local(model, data.dataset("train", train=spec.augment, seed=spec.seed + 7919 * rnd),
                                spec=spec, labels=data.labels("train"), round_number=rnd, global_params=params,
                                dp=plans[i], ledger=ledgers[i], run_id="search", task=args.task,
                                segmentation=segmentation, patients=data.patients("train"))
                    updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                    counts.append(data.count("train"))
                weights = np.asarray(counts, float) / sum(counts)
                mean = {k: sum(float(w) * u[k] for w, u in zip(weights, updates, strict=True)) for k in glob}
                step = args.step
                if args.schedule == "cos":
                    step = 1 + (args.step - 1) * 0.5 * (1 + np.cos(np.pi * (rnd - 1) / max(1, args.rounds - 1)))
                glob = server_update(args.server, glob, mean, state, step=float(step), momentum=args.momentum,
                                     eta=args.eta, rnd=rnd)
                model.load_state_dict(glob)
                if rnd % max(1, args.rounds // 5) == 0 or rnd == args.rounds:
                    curve.append((rnd, holdout_score(model, holdout, segmentation)[0]))
                bar.advance(job)
    value, studies, seg_figures = holdout_score(model, holdout, segmentation)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(args.save, state_arrays(model), {**config.to_flat(), **flat, "norm": config.model.norm.value},
                        round_number=args.rounds)
    calibration = {} if segmentation else calibration_figures(model, [load_site_data([p], args.task) for p in sites],
                                                              holdout)
    metric = "dice" if segmentation else "auroc"
    line = {"name": args.name, "task": args.task, "rounds": args.rounds, "server": args.server, "step": args.step,
            "schedule": args.schedule, "momentum": args.momentum, "eta": args.eta, "pooled": args.pooled,
            "single": args.single, "unlike": args.unlike_site, "set": flat,
            "init": str(args.init) if args.init else "", "norm": config.model.norm.value,
            f"holdout_{metric}": value,
            "holdout_studies": studies, **{f"holdout_{k}": v for k, v in seg_figures.items() if k != "dice"},
            "studies": args.studies, "consortium_seed": args.seed, "holdout_seed": held_seed,
            "noise_multipliers": [p.noise_multiplier for p in plans if p is not None],
            "seconds": round(time.perf_counter() - t0, 1), "curve": curve, "calibration": calibration}
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "search.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    what = "pooled" if args.pooled else (f"{args.single} alone" if args.single else
                                         f"{args.server} step {args.step:g} {args.schedule}".strip())
    extra = (f", lesion sensitivity {seg_figures['lesion_sensitivity'] or 0:.2f}, false-positive lesions a study "
             f"{seg_figures['fp_lesions'] or 0:.2f}, {seg_figures['positives']} with a lesion" if segmentation else "")
    console.print(f"{args.task} · {what} · {args.rounds} rounds: held-out {'Dice' if segmentation else 'AUROC'} "
                  f"{'—' if value is None else f'{value:.3f}'} on {studies} studies{extra} ({line['seconds']:.0f} s)")
    if calibration.get("fitted"):
        c = calibration
        console.print(f"calibration on the held-out studies: ECE {c['ece']:.3f} → {c['ece_recalibrated']:.3f} "
                      f"({c['update']} update on {c['val_studies']} validation studies' histograms, χ² "
                      f"{c['statistic']:.1f}, slope {c['slope']:.2f}; per-case fit "
                      f"{c.get('slope_per_case', float('nan')):.2f}, ECE "
                      f"{c.get('ece_per_case_fit', float('nan')):.3f}); scores 5–95 % {c['spread']} → "
                      f"{c['spread_recalibrated']}")
    elif calibration:
        console.print(f"calibration: ECE {calibration['ece']:.3f}; no recalibration adopted "
                      f"({calibration['val_studies']} validation studies, {calibration['val_positives']} positive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

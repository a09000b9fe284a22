"""Saliency sanity checks and cost, per task and method, on the synthetic consortium where lesions are known.

For each task: train the default network pooled over the sites (the learning test's recipe), then on
every lesion-positive image of the validation and test splits compute each method's map and
- the pointing game: is the map's peak inside the lesion mask (dilated by one voxel)? Over every lesion image,
  and over those the model called positive (at the run's operating point, chosen on the validation split as a
  run chooses it): a map explains the model's call, so on a lesion
  the model missed it shows the weaker evidence the model did see, and a miss there is a miss of the detector;
- the energy inside the lesion: the share of the map's total inside the mask;
- the model-randomisation test (Adebayo et al. 2018): the same for a network with fresh random
  weights, and the rank correlation between the trained and the random model's maps (low = the map
  depends on what the model learned);
- the cost: seconds per map against one inference.

Prints a markdown table and writes ``OUT/bench-saliency.json``.

Example::

    .venv/bin/python scripts/bench_saliency.py --out bench-output/saliency
    .venv/bin/python scripts/bench_saliency.py --out bench-output/saliency --tasks lung-ct --methods gradcam
    .venv/bin/python scripts/bench_saliency.py --out bench-output/saliency --tasks prostate-mr --methods occlusion \\
        --mask-size 4
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fl_client.local_run import run_local
from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.presets import PRESETS
from imaging.sitedata import load_site_data
from imaging.synth import generate_consortium
from imaging.transforms import mask_to_network_grid
from models.config import from_flat
from models.nets import build_model
from models.saliency import (
    Method,
    energy_inside,
    layer_grid,
    method_layer,
    pointing_game,
    rank_correlation,
    saliency,
)
from models.tasks import TASK_ROUNDS

# Epochs of the pooled model: lung and breast learn in a few; prostate and colorectal train as many epochs as the
# rounds of their federation (models.tasks.TASK_ROUNDS), so the maps are those of the model a consortium gets.
EPOCHS = {"lung-ct": 8, "breast-mg": 12, "prostate-mr": TASK_ROUNDS["prostate-mr"],
          "colorectal-ct": TASK_ROUNDS["colorectal-ct"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/saliency"))
    parser.add_argument("--tasks", default="lung-ct,breast-mg,prostate-mr,colorectal-ct")
    parser.add_argument("--methods", default="gradcam,gradcampp,hirescam,occlusion")
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-size", type=int, default=None,
                        help="occlusion patch edge in voxels (default: 1/8 of each axis in 2D, 1/4 in 3D, at least 4)")
    args = parser.parse_args(argv)
    if args.mask_size is not None and args.mask_size < 1:
        parser.error(f"--mask-size {args.mask_size}: give a patch edge of 1 voxel or more")
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [Method(m.strip()) for m in args.methods.split(",") if m.strip()]
    data_dir, ws_dir = args.out / "data", args.out / "ws"
    if not ws_dir.is_dir():
        generate_consortium(data_dir, sites=3, studies_per_task=args.studies, seed=args.seed, tasks=tasks)
        for site in sorted(p for p in data_dir.iterdir() if (p / "dicom").is_dir()):
            with Catalog.open(ws_dir / site.name) as catalog:
                ingest_folder(catalog, site / "dicom")
                load_labels(catalog, site / "labels.csv")
    sites = sorted(p for p in ws_dir.iterdir() if p.is_dir())
    lesions: dict[str, tuple[Path, dict[str, Any]]] = {}
    for site in sites:
        for r in json.loads((data_dir / site.name / "lesions.json").read_text()):
            lesions[r["sop_instance_uid"] or r["series_instance_uid"]] = (data_dir / site.name, r)
    results: dict[str, Any] = {}
    for task in tasks:
        config = from_flat({"task": task, "seed": args.seed})
        out = args.out / f"model-{task}"
        doc = run_local(sites, config, out, epochs=EPOCHS.get(task, 10))
        threshold = float((doc.get("operating_point") or {}).get("threshold", 0.5))  # the run's, as a site uses it
        model = build_model(config.model)
        arrays = torch.load(out / "model.pt", weights_only=True)["arrays"]
        model.load_state_dict(arrays)
        model.eval()
        torch.manual_seed(12345)
        random_model = build_model(config.model).eval()
        data = load_site_data(sites, task)
        rows: dict[str, dict[str, list[float]]] = {m.value: {} for m in methods}
        infer: list[float] = []
        layers: dict[Method, tuple[str, tuple[tuple[float, float], ...]]] = {}
        for split in ("val", "test"):
            dataset = data.dataset(split, train=False)
            for i, (_, item) in enumerate(data.items.get(split, [])):
                if item.label != 1 or item.plan.key not in lesions:
                    continue
                folder, record = lesions[item.plan.key]
                mask = mask_to_network_grid(np.load(folder / record["mask"])["mask"], item.plan, PRESETS[task])
                if not mask.any():
                    continue
                image, _ = dataset[i]
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(image.unsqueeze(0))
                infer.append(time.perf_counter() - t0)
                for method in methods:
                    layer, grid = None, None
                    if method != Method.OCCLUSION:  # once per task: the layer and where its units sit on the input
                        if method not in layers:
                            name = method_layer(model, method, tuple(image.shape))
                            assert name is not None
                            layers[method] = (name, layer_grid(model, name, tuple(image.shape)))
                        layer, grid = layers[method]
                    trained = saliency(model, image, method, layer=layer, grid=grid, mask_size=args.mask_size)
                    rand = saliency(random_model, image, method, layer=layer, grid=grid, mask_size=args.mask_size)
                    r = rows[method.value]
                    r.setdefault("hit", []).append(float(pointing_game(trained.map, mask, margin=1)))
                    r.setdefault("detected", []).append(float(trained.probability >= threshold))
                    r.setdefault("energy", []).append(energy_inside(trained.map, mask))
                    r.setdefault("random_hit", []).append(float(pointing_game(rand.map, mask, margin=1)))
                    r.setdefault("random_energy", []).append(energy_inside(rand.map, mask))
                    r.setdefault("rank_corr", []).append(rank_correlation(trained.map, rand.map))
                    r.setdefault("seconds", []).append(trained.seconds)
                    r.setdefault("lesion_share", []).append(float(mask.mean()))
        inference = statistics.median(infer) if infer else float("nan")
        results[task] = {"val_auroc": doc["splits"]["val"]["auroc"], "test_auroc": doc["splits"]["test"]["auroc"],
                         "operating_threshold": threshold,
                         "lesion_images": len(infer), "inference_seconds": inference, "methods": {}}
        for name, r in rows.items():
            if not r:
                continue
            results[task]["methods"][name] = {
                "layer": layers[Method(name)][0] if Method(name) in layers else None,
                "pointing_game": float(np.mean(r["hit"])), "energy_inside": float(np.mean(r["energy"])),
                "detected": int(sum(r["detected"])),
                "pointing_game_detected": (float(np.mean([h for h, d in zip(r["hit"], r["detected"], strict=True)
                                                          if d])) if any(r["detected"]) else None),
                "random_pointing_game": float(np.mean(r["random_hit"])),
                "random_energy_inside": float(np.mean(r["random_energy"])),
                "rank_correlation_trained_vs_random": float(np.median(r["rank_corr"])),
                "lesion_share_of_image": float(np.mean(r["lesion_share"])),
                "seconds_per_map": statistics.median(r["seconds"]),
                "map_over_inference": statistics.median(r["seconds"]) / inference if inference else None}
        console.print(task, results[task])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench-saliency.json").write_text(json.dumps(results, indent=1))
    console.print("\n| task (val AUROC) | method | pointing game | on the lesions called positive | energy in lesion "
                  "(lesion share) | random model: pointing / energy | rank corr. trained vs random | s per map | "
                  "× inference |")
    console.print("|---|---|---|---|---|---|---|---|---|")
    for task, t in results.items():
        for method, m in t["methods"].items():
            console.print(f"| {task} ({t['val_auroc']:.2f}, {t['lesion_images']} images) | {method} | "
                          f"{100 * m['pointing_game']:.0f} % | "
                          + ("—" if m["pointing_game_detected"] is None else
                             f"{100 * m['pointing_game_detected']:.0f} % of {m['detected']}")
                          + f" | {m['energy_inside']:.2f} "
                          f"({m['lesion_share_of_image']:.3f}) | "
                          f"{100 * m['random_pointing_game']:.0f} % / {m['random_energy_inside']:.2f} | "
                          f"{m['rank_correlation_trained_vs_random']:.2f} | {m['seconds_per_map']:.3f} | "
                          f"{m['map_over_inference']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the task presets' anatomy steps keep and remove, on the synthetic consortium where lesions are known.

1. Lung field (``lung-ct``): for every nodule, the share of its voxels on the network grid that the lung-field
   step sets to air (the same pipeline with and without the step); and the soft tissue the step keeps outside
   the nodules (voxels above about −370 HU), per volume.
2. Pectoral muscle (``breast-mg``): on every MLO view, the share of the muscle the phantom drew that is found,
   and the share of the rest of the image taken with it; on every CC view, whether anything is found; per
   lesion-bearing view, whether a lesion pixel denser than the lesion's median is taken; and the time per image.
3. CT calibration and bright-structure suppression (``colorectal-ct``), per site of the non-IID consortium
   (``--unlike-site``: that site's CT is 35 HU off, with twice the noise): the scan's fat peak (HU) before
   calibration, the tumours' median HU before and after, and the share of tumour voxels the bright-structure
   step erases, by the old pipeline (no calibration, a raw threshold) and by today's (fat calibration, the
   threshold read through a median).

Prints the figures and writes ``OUT/bench-preprocessing.json``.

Example::

    .venv/bin/python scripts/bench_preprocessing.py --out bench-output/preprocessing
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

import numpy as np
import pydicom
from monai.transforms import Compose, Spacingd
from rich.console import Console
from rich.progress import track

import imaging.transforms as T
from imaging.catalog import Catalog
from imaging.dataset import sample_dicts
from imaging.pectoral import find_pectoral, pectoral_mask
from imaging.presets import get_preset
from imaging.synth import ingested_consortium


def lung_field(ws: Path) -> dict[str, Any]:
    """Per nodule, the share of its voxels the lung field removes; and soft tissue kept outside nodules."""
    steps = T.deterministic_transforms(get_preset("lung-ct-seg"))
    with_field = Compose(steps)
    without = Compose([s for s in steps if not isinstance(s, T.LungFieldd)])
    items = []
    for site in sorted(p for p in ws.iterdir() if p.is_dir()):
        with Catalog.open(site, create=False) as catalog:
            items += [i for i in catalog.items("lung-ct-seg", labelled_only=False) if i.mask]
    removed, tissue = [], []
    for item in track(items, description="lung field"):
        sample = sample_dicts([item], masks=True)[0]
        a, b = with_field(dict(sample)), without(dict(sample))
        nodule = a["mask"][0].numpy() > 0
        changed = a["image"][0].numpy() != b["image"][0].numpy()
        removed.append(float((changed & nodule).sum() / max(1, nodule.sum())))
        tissue.append(int((~changed & ~nodule & (b["image"][0].numpy() > 0.45)).sum()))
    r = np.array(removed)
    return {"nodules": len(r), "any_voxel_removed": int((r > 0).sum()), "more_than_half_removed": int((r > 0.5).sum()),
            "mean_share_removed": float(r.mean()) if len(r) else None,
            "soft_tissue_voxels_kept_per_volume": float(np.mean(tissue)) if tissue else None}


def _phantom_muscle(ds: pydicom.Dataset) -> np.ndarray:
    """The muscle the breast phantom draws (imaging/synth/phantoms/breast_mg.py), ``(columns, rows)``."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    x = np.arange(cols, dtype=float)[:, None]
    y = np.arange(rows, dtype=float)[None, :]
    from_wall = (cols - 1 - x) if ds.ImageLaterality == "R" else x
    return np.asarray(from_wall / (0.35 * cols) + y / (0.45 * rows) < 1.0)


def pectoral(data: Path) -> dict[str, Any]:
    """The pectoral search against the muscle the phantom drew."""
    masks: dict[str, np.ndarray] = {}
    for site in sorted(data.glob("site-*")):
        for lesion in json.loads((site / "lesions.json").read_text()):
            if lesion.get("sop_instance_uid"):
                with np.load(site / lesion["mask"]) as npz:
                    masks[lesion["sop_instance_uid"]] = np.asarray(npz["mask"]).T > 0
    views = [ds for ds in (pydicom.dcmread(p) for p in sorted(data.glob("site-*/dicom/*/*/*/*.dcm")))
             if ds.Modality == "MG"]
    coverage, extra, cc_found, lesions_hit, lesions, seconds = [], [], 0, 0, 0, []
    for ds in track(views, description="pectoral muscle"):
        image = ds.pixel_array.astype(np.float32).T
        t0 = time.perf_counter()
        line = find_pectoral(image)
        seconds.append(time.perf_counter() - t0)
        if ds.ViewPosition != "MLO":
            cc_found += line is not None
            continue
        truth = _phantom_muscle(ds)
        found = pectoral_mask(image, line) if line is not None else np.zeros_like(truth)
        coverage.append(float((found & truth).sum() / truth.sum()))
        extra.append(float((found & ~truth).sum() / (~truth).sum()))
        if ds.SOPInstanceUID in masks:
            lesion = masks[ds.SOPInstanceUID]
            lesions += 1
            lesions_hit += bool((found & lesion & (image > np.median(image[lesion]))).any())
    return {"mlo_views": len(coverage), "found": int(sum(c > 0 for c in coverage)),
            "muscle_found_min": min(coverage), "muscle_found_median": float(np.median(coverage)),
            "rest_taken_max": max(extra), "rest_taken_median": float(np.median(extra)),
            "cc_views": len(views) - len(coverage), "cc_views_with_a_muscle_found": cc_found,
            "lesion_views": lesions, "lesion_cores_taken": lesions_hit,
            "ms_per_image": 1000 * float(np.mean(seconds))}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def colorectal(ws: Path) -> dict[str, Any]:
    """Per site: fat peaks, tumour HU and the tumour share erased, by the old and today's colorectal pipeline."""
    steps = T.deterministic_transforms(get_preset("colorectal-ct-seg"))
    resample = next(i for i, step in enumerate(steps) if isinstance(step, Spacingd))
    load = Compose(steps[:resample + 1])
    calibrate = T.CalibrateHUd(["image"], reference=-100.0)
    old = T.SuppressBrightd(["image"], threshold=160.0, median=1)
    new = T.SuppressBrightd(["image"], threshold=160.0)
    out: dict[str, Any] = {}
    for site in sorted(p for p in ws.iterdir() if p.is_dir()):
        with Catalog.open(site, create=False) as catalog:
            items = list(catalog.items("colorectal-ct-seg", labelled_only=False))
        peaks, before, after, erased_old, erased_new = [], [], [], [], []
        for sample in track(sample_dicts(items, masks=True), description=f"colorectal CT, {site.name}"):
            d = load(sample)
            peak = T.fat_peak_hu(d["image"][0].numpy())
            if peak is not None:
                peaks.append(peak)
            tumour = np.asarray(d["mask"][0]) > 0.5
            if not tumour.any():
                continue
            c = calibrate(d)
            before.append(float(np.median(d["image"][0].numpy()[tumour])))
            after.append(float(np.median(c["image"][0].numpy()[tumour])))
            erased_old.append(float((old(d)["image"][0].numpy()[tumour] == -100.0).mean()))
            erased_new.append(float((new(c)["image"][0].numpy()[tumour] == -100.0).mean()))
        out[site.name] = {"scans": len(items), "fat_peak_hu_median": _median(peaks),
                          "scans_without_a_fat_peak": len(items) - len(peaks), "tumours": len(before),
                          "tumour_hu_before": _median(before), "tumour_hu_after": _median(after),
                          "tumour_erased_old": float(np.mean(erased_old)) if erased_old else None,
                          "tumour_erased_now": float(np.mean(erased_new)) if erased_new else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/preprocessing"))
    parser.add_argument("--studies", type=int, default=48, help="studies per task per site")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlike-site", default="site-c", metavar="SITE",
                        help="the site whose CT is unlike the others' in the colorectal figures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    # The learning test's consortium (every image task generated, seed 0): its lung and breast studies.
    ws = ingested_consortium(args.out / "consortium", sites=3, studies_per_task=args.studies, seed=args.seed,
                             tasks=["lung-ct", "breast-mg", "prostate-mr", "colorectal-ct"])
    unlike = ingested_consortium(args.out / f"consortium-unlike-{args.unlike_site}", sites=3,
                                 studies_per_task=args.studies, seed=args.seed, tasks=["colorectal-ct"],
                                 unlike=args.unlike_site)
    results = {"lung_field": lung_field(ws), "pectoral": pectoral(args.out / "consortium" / "data"),
               "colorectal": colorectal(unlike)}
    for name, figures in results.items():
        console.print(f"[bold]{name}[/]")
        for key, value in figures.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    (args.out / "bench-preprocessing.json").write_text(json.dumps(results, indent=1))
    console.print(f"\nwrote {args.out / 'bench-preprocessing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The oncofed demo: a synthetic consortium of hospitals, each ingesting its own DICOM studies.

Run by ``make demo``. Everything goes under ``--out`` (default ``demo-output/``):

- ``consortium/<site>/dicom``: each site's DICOM files (written by the synthetic generator);
- ``workspaces/<site>``: each site's workspace (catalog, cache);
- ``preview.png``: a lesion-positive study per site and task, lesion outlined, as the site reads it.
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

import numpy as np
from rich.console import Console
from rich.table import Table

from imaging.catalog import Catalog
from imaging.dicom import read_image
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.presets import PRESETS
from imaging.summary import site_status
from imaging.synth import generate_consortium


def _preview(out: Path, sites: list[tuple[Path, Path]], tasks: list[str]) -> Path:
    """A PNG: per site (rows) and task (columns), a lesion-positive study as that site reads it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sites), len(tasks), figsize=(3.0 * len(tasks), 3.2 * len(sites)), squeeze=False)
    for row, (site_dir, workspace) in enumerate(sites):
        records = json.loads((site_dir / "lesions.json").read_text())
        # A 2D lesion belongs to one image (SOP instance), a 3D lesion to a volume (series).
        lesions = {r["sop_instance_uid"] or r["series_instance_uid"]: r for r in records}
        with Catalog.open(workspace) as catalog:
            for col, task in enumerate(tasks):
                ax = axes[row][col]
                ax.axis("off")
                item = next((i for i in catalog.items(task) if i.label == 1 and i.plan.key in lesions), None)
                if item is None:
                    continue
                lesion = lesions[item.plan.key]
                image = read_image(item.plan).array
                mask = np.load(site_dir / lesion["mask"])["mask"]
                if image.ndim == 3:
                    k = lesion["center_voxel"]["slice"]
                    image, mask = image[k], mask[k]
                preset = PRESETS[task]
                vmin, vmax = preset.window if preset.window else np.percentile(image, [1, 99.5])
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
                ax.set_title(f"{site_dir.name} {task}\n{lesion['kind']}, r {lesion['radius_mm']:.0f} mm", fontsize=8)
    fig.suptitle("Lesion-positive studies as each site reads them (red: the recorded lesion mask)", fontsize=10)
    fig.tight_layout()
    path = out / "preview.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="oncofed demo: generate a synthetic consortium and ingest every site.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  make demo\n  .venv/bin/python scripts/demo.py --out demo-output --sites 3 "
        "--studies-per-task 24 --tasks lung-ct,breast-mg",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-task", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(PRESETS), help="comma-separated tasks")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in PRESETS]
    if unknown:
        console.print(f"[red]error:[/] unknown task(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
        return 2

    marker = args.out / ".oncofed-demo"
    if args.out.exists() and any(args.out.iterdir()):
        if not marker.exists():
            console.print(f"[red]error:[/] {args.out} exists and was not made by the demo; give another --out")
            return 2
        shutil.rmtree(args.out)  # a fresh demo every time
    args.out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    t0 = time.perf_counter()
    data = args.out / "consortium"
    console.rule("1. Synthetic consortium: each hospital's DICOM studies")
    generate_consortium(data, sites=args.sites, studies_per_task=args.studies_per_task, seed=args.seed,
                        tasks=tasks)
    console.print(f"generated in {time.perf_counter() - t0:.1f} s under {data}")

    sites = sorted(p for p in data.iterdir() if p.is_dir())
    summary = Table(title="What each site ingested: images without / with a lesion per split (MG: 2 views a study)")
    for col in ("site", "task", "train 0/1", "val 0/1", "test 0/1", "rejected"):
        summary.add_column(col, justify="left" if col in ("site", "task") else "right")
    workspaces = args.out / "workspaces"
    for site in sites:
        console.rule(f"2. {site.name}: ingest {site / 'dicom'}")
        ws = workspaces / site.name
        with Catalog.open(ws) as catalog:
            report = ingest_folder(catalog, site / "dicom")
            labels = load_labels(catalog, site / "labels.csv")
            status = site_status(catalog)
        console.print(
            f"{report.files_seen} files, {report.series_ok} series accepted, {report.series_rejected} rejected, "
            f"{labels.stored} labels, {status['patients']} patients, {report.seconds:.1f} s"
        )
        for i, task in enumerate(tasks):
            splits = status["tasks"][task]["splits"]
            cells = [f"{splits.get(s, {}).get('0', 0)}/{splits.get(s, {}).get('1', 0)}"
                     for s in ("train", "val", "test")]
            summary.add_row(site.name if i == 0 else "", task, *cells,
                            str(report.series_rejected) if i == 0 else "", end_section=i == len(tasks) - 1)
    console.rule("3. Consortium summary")
    console.print(summary)
    preview = _preview(args.out, [(site, workspaces / site.name) for site in sites], tasks)
    console.print(f"\nDone in {time.perf_counter() - t0:.0f} s. Where to look:")
    console.print(f"  {preview}  (a lesion-positive study per site and task, lesion outlined)")
    console.print(f"  oncofed-site status --workspace {workspaces / sites[0].name}")
    console.print(f"  oncofed-site series --workspace {workspaces / sites[0].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

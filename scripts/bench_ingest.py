"""Benchmark: ingest speed, re-ingest speed-up and the preprocessing cache (epoch 1 vs epoch 2).

Prints a table and writes the figures as JSON. The figures in BENCHMARKS.md come from:

    .venv/bin/python scripts/bench_ingest.py --out bench-output/ingest
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

import pydicom
import torch
from monai.data import DataLoader
from rich.console import Console
from rich.table import Table

from imaging.catalog import Catalog
from imaging.dataset import cache_folder, cached_dataset
from imaging.ingest import ingest_folder, walk_files
from imaging.labels import load_labels
from imaging.presets import PRESETS
from imaging.synth import generate_consortium


def _bare_header_loop(folder: Path) -> tuple[int, float]:
    files = [p for p, _ in walk_files(folder)]
    t0 = time.perf_counter()
    for p in files:
        pydicom.dcmread(p, stop_before_pixels=True)
    return len(files), time.perf_counter() - t0


def _epoch_seconds(ds: object, batch_size: int) -> float:
    t0 = time.perf_counter()
    for _ in DataLoader(ds, batch_size=batch_size, num_workers=0):  # type: ignore[arg-type]
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python scripts/bench_ingest.py --out bench-output/ingest --studies-per-task 24",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-output/ingest"))
    parser.add_argument("--studies-per-task", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    console = Console()

    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "consortium"
    t0 = time.perf_counter()
    generated = generate_consortium(data, sites=3, studies_per_task=args.studies_per_task, seed=args.seed)
    gen_s = time.perf_counter() - t0
    site = data / "site-a"
    dicom = site / "dicom"

    # Warm the OS file cache so both loops read from memory, then time the bare header loop.
    _bare_header_loop(dicom)
    n_files, bare_s = _bare_header_loop(dicom)

    ws = args.out / "ws"
    phases: dict[str, float] = {}
    marks: dict[str, float] = {}

    def tick(phase: str, done: int, total: int) -> None:
        marks.setdefault(phase, time.perf_counter())
        if done == total:
            phases[phase] = time.perf_counter() - marks[phase]

    with Catalog.open(ws) as catalog:
        first = ingest_folder(catalog, dicom, progress=tick)
        second = ingest_folder(catalog, dicom)
        load_labels(catalog, site / "labels.csv")
        items = {task: catalog.items(task) for task in PRESETS}

    cache_rows = []
    for task, task_items in items.items():
        preset = PRESETS[task]
        shutil.rmtree(cache_folder(ws, preset), ignore_errors=True)
        ds = cached_dataset(task_items, preset, workspace=ws, train=False)
        e1 = _epoch_seconds(ds, args.batch_size)
        e2 = _epoch_seconds(ds, args.batch_size)
        cache_rows.append({"task": task, "samples": len(task_items), "epoch1_s": e1, "epoch2_s": e2,
                           "speedup": e1 / e2})

    figures = {
        "files": n_files,
        "generate_s": gen_s,
        "generate_files": generated.files,
        "generate_studies": sum(s.studies for s in generated.sites),
        "bare_header_loop_files_per_s": n_files / bare_s,
        "ingest_s": first.seconds,
        "ingest_files_per_s": n_files / first.seconds,
        "ingest_header_phase_files_per_s": n_files / phases.get("headers", first.seconds),
        "ingest_series_phase_s": phases.get("series", 0.0),
        "images_decoded": first.images_decoded,
        "reingest_s": second.seconds,
        "reingest_speedup": first.seconds / second.seconds,
        "cache": cache_rows,
        "threads": torch.get_num_threads(),
    }
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))

    table = Table(title=f"Ingest of one site: {n_files} DICOM files, {first.images_decoded} images")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"generate 3 sites x 4 tasks x {args.studies_per_task} studies",
                  f"{gen_s:.1f} s ({figures['generate_studies']} studies, {generated.files} files)")
    table.add_row("bare dcmread(stop_before_pixels) loop", f"{figures['bare_header_loop_files_per_s']:.0f} files/s")
    table.add_row("ingest, header phase", f"{figures['ingest_header_phase_files_per_s']:.0f} files/s")
    table.add_row("ingest, whole (headers + geometry + decode check)", f"{figures['ingest_files_per_s']:.0f} files/s")
    table.add_row("re-ingest of the unchanged folder", f"{second.seconds:.3f} s")
    table.add_row("re-ingest speed-up", f"{figures['reingest_speedup']:.0f}x")
    console.print(table)
    cache = Table(title="Preprocessing cache: epoch 1 (decode + transforms) vs epoch 2 (cached tensors)")
    for col in ("task", "samples", "epoch 1 s", "epoch 2 s", "speed-up"):
        cache.add_column(col, justify="right")
    for row in cache_rows:
        cache.add_row(str(row["task"]), str(row["samples"]), f"{row['epoch1_s']:.2f}", f"{row['epoch2_s']:.2f}",
                      f"{row['speedup']:.1f}x")
    console.print(cache)
    console.print(f"figures: {args.out / 'figures.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

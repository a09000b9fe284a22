"""Device benchmarks: where a site's models run, how fast, in how much memory.

1. Per task and resolution profile (``cpu``, ``diagnostic``): training images/s without and with DP-SGD,
   inference images/s, the peak memory of the process (CUDA: ``max_memory_allocated``; CPU: peak RSS), and the
   data loader's share of the step (time waiting for the next batch / step time) with the preprocessed images
   cached. Each measurement runs in a process of its own, so its peak memory is its own.
2. Preprocessing: one 512 x 512 x 300 CT study (written here), decoded and preprocessed once at each profile,
   then read from the cache.

The figures name the device (the GPU's model on a GPU). Prints markdown tables and writes
``OUT/bench-device.json``.

Example::

    .venv/bin/python scripts/bench_device.py --out bench-output/device
    .venv/bin/python scripts/bench_device.py --out bench-output/device --device cuda --steps 20 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TASKS = ("lung-ct", "breast-mg", "colorectal-ct", "prostate-mr")


def _workspace(out: Path, *, studies: int, scale: int, seed: int, tasks: list[str]) -> Path:
    """One synthetic site with every task, ingested (made once, then reused)."""
    from imaging.catalog import Catalog
    from imaging.ingest import ingest_folder
    from imaging.labels import load_labels
    from imaging.synth import generate_consortium

    ws = out / "ws" / "site-a"
    made = out / "ws" / "tasks.json"
    if (ws / "catalog.sqlite").is_file() and made.is_file() and set(json.loads(made.read_text())) >= set(tasks):
        return ws
    shutil.rmtree(out / "ws", ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    generate_consortium(out / "data", sites=1, studies_per_task=studies, seed=seed, tasks=tasks, scale=scale)
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, out / "data" / "site-a" / "dicom")
        load_labels(catalog, out / "data" / "site-a" / "labels.csv")
    made.write_text(json.dumps(sorted(tasks)))
    return ws


def _peak_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ws: Path, task: str, profile: str, mode: str, *, device: str, precision: str, steps: int,
            batch_size: int, threads: int) -> dict[str, Any]:
    """One measurement (run in a child process): ``mode`` is ``train``, ``dp`` or ``infer``."""
    import torch
    from torch.utils.data import DataLoader

    from fl_client.train import loader_options
    from imaging.sitedata import load_site_data
    from models.config import from_flat, resolved_grad_sample_mode
    from models.device import autocast, place
    from models.nets import build_model, parameter_count

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    config = from_flat({"task": task, "resolution": profile, "batch-size": batch_size,
                        **({"dp": True} if mode == "dp" else {})})
    data = load_site_data([ws], task, resolution=profile)
    dataset = data.dataset("train", train=mode != "infer")
    t0 = time.perf_counter()
    for i in range(len(dataset)):  # fill the cache (the first pass decodes and preprocesses)
        dataset[i]
    prep = (time.perf_counter() - t0) / max(1, len(dataset))
    dp_mode = resolved_grad_sample_mode(config).value if mode == "dp" else None
    placement = place(device, precision, dp_mode=dp_mode)
    dev = placement.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = build_model(config.model).to(dev)
    loader: Any = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=False,
                             **loader_options(dev))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.BCEWithLogitsLoss()
    trained = model
    if mode == "dp":
        from opacus import PrivacyEngine

        trained, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode=dp_mode)
    wait = work = 0.0
    images = 0
    done = 0
    warm = 1  # the first step (cuDNN autotuning, allocator) is not counted
    while done < steps + warm:
        it = iter(loader)
        while done < steps + warm:
            t_wait = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            t_step = time.perf_counter()
            if len(x) == 0:
                continue
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if mode == "infer":
                with torch.no_grad(), autocast(placement):
                    trained.eval()(x)
            else:
                optimizer.zero_grad(set_to_none=True)
                with autocast(placement):
                    logits = trained(x)
                criterion(logits.float(), y).backward()
                optimizer.step()
            _sync(dev)
            t_end = time.perf_counter()
            if done >= warm:
                wait += t_step - t_wait
                work += t_end - t_step
                images += len(x)
            done += 1
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"task": task, "profile": profile, "mode": mode, "device": name, "precision": placement.describe(),
            "network": str(config.model.network), "parameters": parameter_count(model),
            "input": list(dataset[0][0].shape), "batch_size": batch_size, "steps": done - warm,
            "images_per_s": images / max(wait + work, 1e-9), "loader_share": wait / max(wait + work, 1e-9),
            "peak_gib": _peak_bytes(dev) / 2**30, "preprocess_s_per_image": prep}


def _write_ct(folder: Path, *, rows: int = 512, slices: int = 300) -> Path:
    """A 512 x 512 x 300 CT series (0.7 mm pixels, 1 mm slices) of a body-shaped phantom, as a scanner writes it."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.dcm"))) == slices:
        return folder
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:rows, :rows]
    body = ((xx - rows / 2) / (rows * 0.42)) ** 2 + ((yy - rows / 2) / (rows * 0.30)) ** 2 < 1
    lungs = (((np.abs(xx - rows / 2) - rows * 0.17) / (rows * 0.12)) ** 2 + ((yy - rows / 2) / (rows * 0.2)) ** 2) < 1
    rng = np.random.default_rng(0)
    for k in range(slices):
        hu = np.full((rows, rows), -1000.0)
        hu[body] = 40.0
        hu[lungs & body] = -850.0
        hu += rng.normal(0, 15, hu.shape)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.Modality, ds.BodyPartExamined, ds.InstanceNumber = "BENCH", "CT", "CHEST", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.2, -179.2, -float(k)]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.clip(hu, -1024, 3000).astype(np.int16).tobytes()
        pydicom.dcmwrite(folder / f"{k:04d}.dcm", ds, enforce_file_format=True)
    return folder


def preprocessing(out: Path) -> list[dict[str, Any]]:
    """Decode and preprocess one 512 x 512 x 300 CT study at each profile, then read it back from the cache."""
    from imaging.catalog import Catalog
    from imaging.dataset import cached_dataset
    from imaging.ingest import ingest_folder
    from imaging.presets import get_preset

    folder = _write_ct(out / "big-ct")
    ws = out / "ws-big"
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, folder)
        (item,) = catalog.items("lung-ct", labelled_only=False)
    rows = []
    for profile in ("cpu", "diagnostic"):
        dataset = cached_dataset([item], get_preset("lung-ct", profile), workspace=ws, train=False)
        t0 = time.perf_counter()
        shape = tuple(dataset[0]["image"].shape)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset[0]
        cached = time.perf_counter() - t0
        rows.append({"profile": profile, "study": "512x512x300 CT", "network_input": list(shape),
                     "first_s": first, "cached_s": cached})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the device benchmarks; print the tables and write ``OUT/bench-device.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/device"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--profiles", default="cpu,diagnostic")
    parser.add_argument("--modes", default="train,dp,infer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--studies", type=int, default=6, help="studies per task of the synthetic site")
    parser.add_argument("--scale", type=int, default=2, help="matrix multiplier of the synthetic images")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-preprocessing", action="store_true", help="skip the 512x512x300 CT timing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        task, profile, mode = args.child.split(":")
        row = measure(args.out / "ws" / "site-a", task, profile, mode, device=args.device, precision=args.precision,
                      steps=args.steps, batch_size=args.batch_size, threads=args.threads)
        print(json.dumps(row))
        return 0
    console = Console()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    with console.status("writing and ingesting the synthetic site"):
        _workspace(args.out, studies=args.studies, scale=args.scale, seed=0, tasks=tasks)
    rows = []
    combos = [(t, p, m) for t in tasks for p in args.profiles.split(",") for m in args.modes.split(",")]
    for n, (task, profile, mode) in enumerate(combos, 1):
        console.print(f"[{n}/{len(combos)}] {task} {profile} {mode}", highlight=False)
        cmd = [sys.executable, __file__, "--out", str(args.out), "--child", f"{task}:{profile}:{mode}",
               "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            console.print(f"  failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(title="Training and inference by task and resolution profile")
    for col in ("task", "profile", "mode", "network", "input", "device", "img/s", "loader share", "peak GiB"):
        table.add_column(col, justify="left" if col in ("task", "profile", "mode", "network", "device") else "right")
    for r in rows:
        table.add_row(r["task"], r["profile"], r["mode"], r["network"], "x".join(map(str, r["input"][1:])),
                      f"{r['device']} {r['precision'].split()[-1]}", f"{r['images_per_s']:.2f}",
                      f"{100 * r['loader_share']:.0f} %", f"{r['peak_gib']:.2f}")
    console.print(table)
    print("\n| task | profile | mode | network | input | device | images/s | loader share | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = "×".join(map(str, r["input"][1:]))
        print(f"| {r['task']} | {r['profile']} | {r['mode']} | {r['network']} | {size} | {r['device']} "
              f"{r['precision'].split()[-1]} | {r['images_per_s']:.2f} | {100 * r['loader_share']:.0f} % "
              f"| {r['peak_gib']:.2f} |")
    prep = [] if args.no_preprocessing else preprocessing(args.out)
    if prep:
        ptable = Table(title="Preprocessing one 512 x 512 x 300 CT study (lung-ct preset)")
        for col in ("profile", "network input", "first (decode + preprocess) s", "from the cache s"):
            ptable.add_column(col)
        for r in prep:
            ptable.add_row(r["profile"], "x".join(map(str, r["network_input"][1:])), f"{r['first_s']:.1f}",
                           f"{r['cached_s']:.2f}")
        console.print(ptable)
        for r in prep:
            print(f"| {r['profile']} | {'×'.join(map(str, r['network_input'][1:]))} | {r['first_s']:.1f} s | "
                  f"{r['cached_s']:.2f} s |")
    (args.out / "bench-device.json").write_text(json.dumps({"measurements": rows, "preprocessing": prep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

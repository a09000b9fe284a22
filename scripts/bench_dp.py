"""Benchmark: training images/s of each task's default network, plain vs DP-SGD in each Opacus mode.

Each configuration runs in its own process; its training memory is the peak resident size during
the timed steps minus the resident size just before them (imports and data excluded). Prints a
table and writes the figures as JSON. The figures in BENCHMARKS.md come from:

    .venv/bin/python scripts/bench_dp.py --out bench-output/dp
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

SIZES = {"lung-ct": (64, 64, 32), "breast-mg": (128, 160), "colorectal-ct": (64, 64, 32), "prostate-mr": (48, 48, 16)}
MODES = ("plain", "hooks", "functorch", "ew", "ghost")


def _measure(task: str, mode: str, arch: str, batch: int, steps: int, threads: int) -> dict[str, float | str]:
    """Run in a child process: time ``steps`` training steps after two warm-up steps."""
    from dataclasses import replace

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from models.config import Arch, ModelSpec, resolve_norm
    from models.nets import build_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    size = SIZES[task]
    spec = ModelSpec(task=task, arch=Arch(arch), spatial_dims=len(size))
    # Every mode trains the network a DP run has (InstanceNorm for colorectal CT, not its BatchNorm without DP).
    model = build_model(replace(spec, norm=resolve_norm(spec, batch_ok=False)))
    n = batch * (steps + 2)
    data = TensorDataset(torch.randn(n, 1, *size), torch.randint(0, 2, (n, 1)).float())
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    if mode != "plain":
        from opacus import PrivacyEngine

        engine = PrivacyEngine()
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, optimizer, criterion, loader = engine.make_private(criterion=criterion, **kwargs)
        else:
            model, optimizer, loader = engine.make_private(**kwargs)
    model.train()
    baseline_mb = _rss_mb()
    times = []
    for i, (x, y) in enumerate(loader):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    return {"task": task, "mode": mode, "arch": arch, "step_s": step, "images_per_s": batch / step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb}


def _rss_mb() -> float:
    """Current resident memory of this process (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python scripts/bench_dp.py --out bench-output/dp --batch-size 16 --steps 6",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-output/dp"))
    parser.add_argument("--arch", default="compact-cnn")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(SIZES))
    parser.add_argument("--child", nargs=2, metavar=("TASK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            row = _measure(args.child[0], args.child[1], args.arch, args.batch_size, args.steps, args.threads)
        except Exception as exc:  # noqa: BLE001 - a mode that fails is a result to report
            row = {"task": args.child[0], "mode": args.child[1], "arch": args.arch,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        print(json.dumps(row))
        return 0
    console = Console()
    rows = []
    for task in args.tasks.split(","):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", task, mode, "--arch", args.arch, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"task": task, "mode": mode, "error": done.stderr[-300:]}
            rows.append(row)
            console.print(row)
    table = Table(title=f"{args.arch}, batch {args.batch_size}, {args.threads} threads: DP-SGD cost by Opacus mode")
    for col in ("task", "mode", "images/s", "step vs plain", "training memory MB", "memory vs plain"):
        table.add_column(col, justify="right")
    for task in args.tasks.split(","):
        plain = next(r for r in rows if r["task"] == task and r["mode"] == "plain")
        for r in (r for r in rows if r["task"] == task):
            if "error" in r:
                table.add_row(task, str(r["mode"]), "fails", str(r["error"])[:60], "", "")
                continue
            r["step_ratio"] = float(r["step_s"]) / float(plain["step_s"])
            r["memory_ratio"] = float(r["train_mb"]) / max(float(plain["train_mb"]), 1.0)
            table.add_row(task, str(r["mode"]), f"{float(r['images_per_s']):.1f}", f"{r['step_ratio']:.2f}x",
                          f"{float(r['train_mb']):.0f}", f"{r['memory_ratio']:.2f}x")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(json.dumps(rows, indent=1))
    console.print(f"figures: {args.out / 'figures.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many sites on one machine: a Flower simulation of N small site workspaces (20 and 50 by default).

For each N it prints the median round time (rounds after the first), the time per site per round, and the peak
memory of the whole run: the sum of the resident memory of every process the run starts (SuperLink, ServerApp,
Ray and its workers), sampled from ``/proc`` every 0.25 s, so what a machine must hold for N virtual sites.
Writes ``OUT/bench-sites.json``.

Example::

    .venv/bin/python scripts/bench_sites.py --out bench-output/sites --sites 20,50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console


def _rss_by_pid() -> dict[int, int]:
    """Resident bytes of every process of this user, from ``/proc``."""
    out = {}
    uid = os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/statm") as fh:
                out[int(entry.name)] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return out


class Sampler:
    """The peak of the summed resident memory of the processes that were not running when it started."""

    def __init__(self, period: float = 0.25) -> None:
        self.before = set(_rss_by_pid())
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        own = os.getpid()
        while not self._stop.is_set():
            rss = _rss_by_pid()
            total = sum(v for pid, v in rss.items() if pid not in self.before or pid == own)
            self.peak = max(self.peak, total)
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def make_sites(root: Path, n: int, *, studies: int, task: str) -> Path:
    """``n`` ingested site workspaces under ``root/ws-N`` (generated in consortia of at most 26 sites)."""
    from imaging.catalog import Catalog
    from imaging.ingest import ingest_folder
    from imaging.labels import load_labels
    from imaging.synth import generate_consortium

    ws = root / f"ws-{n}"
    if ws.is_dir() and len([p for p in ws.iterdir() if p.is_dir()]) == n:
        return ws
    shutil.rmtree(ws, ignore_errors=True)
    made = 0
    batch = 0
    while made < n:
        count = min(25, n - made)
        data = root / f"data-{n}-{batch}"
        if not data.is_dir():
            generate_consortium(data, sites=count, studies_per_task=studies, seed=100 + batch, tasks=[task])
        for site in sorted(p for p in data.iterdir() if (p / "dicom").is_dir())[:count]:
            made += 1
            with Catalog.open(ws / f"s{made:03d}") as catalog:
                ingest_folder(catalog, site / "dicom")
                load_labels(catalog, site / "labels.csv")
        batch += 1
    return ws


def run(sites: Path, run_dir: Path, *, rounds: int, task: str) -> dict[str, Any]:
    """One simulation; its round times and peak memory."""
    from fl_server.flower_ops import simulate

    n = len([p for p in sites.iterdir() if p.is_dir()])
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {"task": task, "num-rounds": rounds, "min-sites": n, "local-epochs": 1, "final-evaluation": False,
              "threads": 1}
    t0 = time.perf_counter()
    with Sampler() as sampler:
        outcome = simulate(sites, run_dir, config, timeout=7200.0)
    wall = time.perf_counter() - t0
    if not outcome.finished:
        raise RuntimeError(f"the {n}-site run did not finish:\n{outcome.output[-3000:]}")
    history = json.loads((run_dir / "history.json").read_text())
    rounds_done = [r for r in history["rounds"] if r["round"] >= 1]
    seconds = [float(r["seconds"]) for r in rounds_done if r.get("seconds") is not None]
    later = seconds[1:] or seconds
    median = statistics.median(later)
    aggregated = [int(r.get("aggregated_sites", 0)) for r in rounds_done]
    return {"sites": n, "rounds": len(rounds_done), "aggregated_per_round": aggregated,
            "round_seconds": seconds, "median_round_s": median, "per_site_round_s": median / n,
            "peak_gib": sampler.peak / 2**30, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    """Run the many-site simulations; print a table and write ``OUT/bench-sites.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/sites"))
    parser.add_argument("--sites", default="20,50", help="comma-separated site counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--studies", type=int, default=8, help="studies per synthetic site (small workspaces)")
    parser.add_argument("--task", default="lung-ct")
    args = parser.parse_args(argv)
    console = Console()
    results = []
    for n in (int(v) for v in args.sites.split(",")):
        with console.status(f"making {n} site workspaces"):
            ws = make_sites(args.out, n, studies=args.studies, task=args.task)
        with console.status(f"simulating {n} sites, {args.rounds} rounds"):
            row = run(ws, args.out / f"run-{n}", rounds=args.rounds, task=args.task)
        console.print(f"{n} sites: round {row['median_round_s']:.1f} s (median after the first), "
                      f"{row['per_site_round_s']:.2f} s per site per round, peak memory {row['peak_gib']:.2f} GiB, "
                      f"aggregated {row['aggregated_per_round']}", highlight=False)
        results.append(row)
    print("\n| sites | median round s | s per site per round | peak memory of the run GiB | sites aggregated |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sites']} | {r['median_round_s']:.1f} | {r['per_site_round_s']:.2f} | {r['peak_gib']:.2f} | "
              f"{min(r['aggregated_per_round'])}–{max(r['aggregated_per_round'])} |")
    (args.out / "bench-sites.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

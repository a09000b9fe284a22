"""Framework overhead of a real loopback deployment: provisioned consortium, TLS SuperLink with site
authentication, N sites joined as in ``oncofed-site join`` (SuperNode with ``--isolation process`` and the
site's warm executor), R rounds; per round ``(wall - slowest site's work) / wall``.

Also the per-message start cost at a site: the executor's time per task (from acquiring it to its reply
and status pushed) minus the site's own work in it (training and evaluation seconds in the egress log),
and what a fresh interpreter would pay per message instead (importing torch, MONAI and our client code).
Prints markdown tables and writes ``OUT/bench-deploy.json``.

Example::

    .venv/bin/python scripts/bench_deploy.py --out bench-output/deploy --sites 2,4 --rounds 4
    .venv/bin/python scripts/bench_deploy.py --out bench-output/deploy --sites 2 --set evaluate-in-train=false
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fl_client.egress import EgressLog
from fl_client.join import SiteKit, SuperNode
from fl_server.deploy import ServerKit, run, start
from fl_server.flower_ops import free_port
from fl_server.provision import provision
from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.synth import generate_consortium


def import_seconds(module: str) -> float:
    """Wall time of a fresh interpreter importing ``module`` (median of 3)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_TASK = re.compile(r"oncofed-executor: task \d+ \(\w+, run (\d+)\): done in ([\d.]+) s \(input pulled in ([\d.]+) s")


def start_costs(workspaces: list[Path], run_id: str) -> dict[str, Any]:
    """Per message at the sites: executor time minus the site's own work, and the time to pull the input."""
    done = pulled = work = 0.0
    messages = 0
    for ws in workspaces:
        for task_run, seconds, pull in _TASK.findall((ws / "supernode" / "supernode.log").read_text()):
            if task_run == run_id:
                done, pulled, messages = done + float(seconds), pulled + float(pull), messages + 1
        for record in EgressLog(ws).records():
            if record.run == run_id:
                work += record.metrics.get("train-seconds", 0.0) + record.metrics.get("eval-seconds", 0.0)
    return {"messages": messages, "start_cost_s": (done - work) / max(messages, 1),
            "input_pull_s": pulled / max(messages, 1), "task_s": done / max(messages, 1)}


def deployment(root: Path, sites: int, rounds: int, task: str, extra: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(root, ignore_errors=True)
    ids = [chr(ord("a") + i) for i in range(sites)]
    generate_consortium(root / "data", sites=sites, studies_per_task=12, seed=0, tasks=[task])
    for i, folder in enumerate(sorted(p for p in (root / "data").iterdir() if (p / "dicom").is_dir())):
        with Catalog.open(root / "ws" / ids[i]) as catalog:
            ingest_folder(catalog, folder / "dicom")
            load_labels(catalog, folder / "labels.csv")
    provision(root / "consortium", ids)
    kit = ServerKit.load(root / "consortium" / "server")
    port = free_port()
    dep = start(kit, state=root / "superlink", port=port)
    nodes = []
    try:
        for site in ids:
            nodes.append(SuperNode(SiteKit.load(root / "consortium" / "sites" / site), root / "ws" / site,
                                   superlink=f"127.0.0.1:{port}").start())
        for node in nodes:
            node.wait_connected(timeout=90)
        t0 = time.perf_counter()
        outcome = run(kit.folder, {"task": task, "num-rounds": rounds, "min-sites": sites, "threads": 1,
                                   "run-dir": str(root / "run"), **extra}, state=root / "superlink")
        total = time.perf_counter() - t0
    finally:
        for node in nodes:
            node.stop()
        dep.stop()
    if not outcome.finished:
        raise RuntimeError(outcome.output[-3000:])
    history = json.loads((root / "run" / "history.json").read_text())
    rounds_ = [r for r in history["rounds"] if r.get("seconds")]
    later = rounds_[1:] or rounds_
    costs = start_costs([root / "ws" / site for site in ids], str(history["run_id"]))
    keys = ("round", "seconds", "slowest_site_seconds", "overhead")
    return {"sites": sites, **costs, "rounds": [{k: r[k] for k in keys} for r in rounds_],
            "round_seconds": statistics.median(r["seconds"] for r in later),
            "slowest_site_seconds": statistics.median(r["slowest_site_seconds"] for r in later),
            "overhead": statistics.median(r["overhead"] for r in later), "total_seconds": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/deploy"))
    parser.add_argument("--sites", default="2,4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--task", default="breast-mg")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the ServerApp and the SuperNodes run in folders of their own
    console = Console()
    extra: dict[str, Any] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        extra[key] = {"true": True, "false": False}.get(value.lower(), value)
    results: dict[str, Any] = {"config": extra, "imports": {}, "deployments": {}}
    for module in ("flwr.clientapp", "torch", "monai", "fl_client.federated"):
        results["imports"][module] = import_seconds(module)
        console.print(f"fresh interpreter importing {module}: {results['imports'][module]:.2f} s")
    for n in [int(s) for s in args.sites.split(",")]:
        results["deployments"][str(n)] = deployment(args.out / f"sites-{n}", n, args.rounds, args.task, extra)
        console.print(f"{n} sites: {results['deployments'][str(n)]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-deploy.json").write_text(json.dumps(results, indent=1))
    console.print("\n| sites | round wall s (median) | slowest site work s | overhead | rounds | "
                  "per-message start cost at a site | of which input pull |")
    console.print("|---|---|---|---|---|---|---|")
    for n, d in results["deployments"].items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in d["rounds"])
        console.print(f"| {n} | {d['round_seconds']:.1f} | {d['slowest_site_seconds']:.2f} | "
                      f"{100 * d['overhead']:.0f} % | {each} | {d['start_cost_s']:.2f} s | {d['input_pull_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

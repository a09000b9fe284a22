"""The oncofed demo: a synthetic consortium of hospitals ingests its DICOM studies, then trains one task
federated under Flower (DP-SGD at one site), and writes the run report.

Run by ``make demo``. Everything goes under ``--out`` (default ``demo-output/``):

- ``consortium/<site>/dicom``: each site's DICOM files (written by the synthetic generator);
- ``workspaces/<site>``: each site's workspace (catalog, cache, privacy ledger, egress log);
- ``preview.png``: a lesion-positive study per site and task, lesion outlined, as the site reads it;
- ``run/``: the federated run (checkpoints per round, history.json, model.pt, plots, TensorBoard events);
- ``report.html``: the run report.
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
from typing import Any

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


def _round_table(history: dict[str, Any], sites: list[str]) -> Table:
    dp_sites = sorted({s for r in history["rounds"] for s, m in r["train"].items() if m.get("epsilon")})
    table = Table(title="Global model after each round: validation AUROC per site; ε spent by DP sites")
    for col in ("round", "s", "train loss", *sites, "all (weighted)", *(f"ε {s}" for s in dp_sites)):
        table.add_column(col, justify="right")

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    for r in history["rounds"]:
        if "seconds" not in r:
            continue
        table.add_row(str(r["round"]), f"{r['seconds']:.1f}", f(r["aggregated_train"].get("train-loss")),
                      *[f(r["evaluate"].get(s, {}).get("auroc")) for s in sites],
                      f(r["aggregated_evaluate"].get("auroc")),
                      *[f"{r['train'].get(s, {}).get('epsilon', 0):.2f}" for s in dp_sites])
    return table


def _federate(console: Console, args: argparse.Namespace, workspaces: Path) -> Path | None:
    """Train ``args.task`` federated over the site workspaces; show a live table per round; write the report."""
    from dataclasses import replace

    from rich.live import Live

    from fl_client.policy import RunBook
    from fl_client.privacy import PrivacyLedger
    from fl_server.flower_ops import simulate
    from fl_server.report import write_report

    sites = sorted(p.name for p in workspaces.iterdir() if p.is_dir())
    console.rule(f"4. Federated training of {args.task}: {len(sites)} sites, {args.rounds} rounds (Flower simulation)")
    if args.dp_site:
        if args.dp_site not in sites:
            console.print(f"[red]error:[/] --dp-site {args.dp_site} is not one of {', '.join(sites)}")
            return None
        PrivacyLedger(workspaces / args.dp_site).set_budget(8.0, 1e-5, require_dp=True)
        console.print(f"{args.dp_site} set its privacy budget (ε ≤ 8, δ = 1e-5) and trains only with DP-SGD; "
                      "the run asks for ε = 4 over its rounds")
    for site in sites:  # a demo's test splits hold 3-6 studies: below a hospital's default minimum of 5
        RunBook(workspaces / site).set_policy(replace(RunBook(workspaces / site).policy(), min_count=1), who="demo")
    console.print("The demo's sites let counts of one leave them (policy min-count 1), so their score histograms "
                  "make the consortium's AUROC and operating point; a hospital's default is 5 (oncofed-site policy).")
    run_dir = args.out / "run"
    log_path = args.out / "run.log"
    history_path = run_dir / "history.json"
    t0 = time.perf_counter()
    with open(log_path, "w") as log, Live(Table(title="starting Flower ..."), console=console,
                                          refresh_per_second=2) as live:
        def on_line(line: str) -> None:
            log.write(line + "\n")
            if "oncofed: round" in line and history_path.exists():
                live.update(_round_table(json.loads(history_path.read_text()), sites))

        outcome = simulate(workspaces, run_dir, {"task": args.task, "num-rounds": args.rounds, "threads": 1,
                                                 "dp-epsilon": 4.0, "seed": args.seed}, on_line=on_line)
    console.print()
    if not outcome.finished:
        console.print(f"[red]The federated run did not finish[/]; see {log_path}")
        return None
    history = json.loads(history_path.read_text())
    final = history.get("final") or {}
    table = Table(title=f"Final global model on each site's test split ({time.perf_counter() - t0:.0f} s in all)")
    for col in ("site", "studies", "AUROC", "sensitivity", "specificity"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, m in sorted(final.get("sites", {}).items()):
        table.add_row(site, str(int(m.get("studies", 0))), *(f"{m[k]:.3f}" if k in m else "—"
                                                            for k in ("auroc", "sensitivity", "specificity")))
    console.print(table)
    return write_report(run_dir, page_path=args.out / "report.html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="oncofed demo: a synthetic consortium ingests its DICOM, then trains one task federated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  make demo\n"
        "  .venv/bin/python scripts/demo.py --out demo-output --task breast-mg --rounds 8\n"
        "  .venv/bin/python scripts/demo.py --out demo-output --sites 4 --studies-per-task 24 --tasks lung-ct "
        "--task lung-ct",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-task", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(PRESETS), help="comma-separated tasks to generate and ingest")
    parser.add_argument("--task", default="lung-ct", help="the task trained federated (default lung-ct)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--dp-site", default="site-a", help="the site that trains with DP-SGD ('' for none)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.task not in tasks:
        tasks.append(args.task)
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
    page = _federate(console, args, workspaces)
    console.print(f"\nDone in {time.perf_counter() - t0:.0f} s. Where to look:")
    if page is not None:
        console.print(f"  {page}  (the federated run: per-round AUROC and loss per site, ε, final test table)")
        console.print(f"  {args.out / 'run' / 'model.pt'}  (the global model)")
        if args.dp_site:
            console.print(f"  oncofed-site privacy --workspace {workspaces / args.dp_site}  (that site's ledger)")
    console.print(f"  {preview}  (a lesion-positive study per site and task, lesion outlined)")
    console.print(f"  oncofed-site status --workspace {workspaces / sites[0].name}")
    console.print(f"  oncofed-site series --workspace {workspaces / sites[0].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``oncofed-synth``: write a synthetic consortium of hospitals' DICOM studies for trials and tests."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imaging.presets import PRESETS
from imaging.synth import ALL_TASKS, generate_consortium, site_profiles, validate_tasks

__all__ = ["build_parser", "main"]


def _epilog() -> str:
    """The help's closing text; the tasks come from the presets that have a synthetic phantom."""
    width = max(len(task) for task in ALL_TASKS)
    tasks = "\n".join(f"  {task:<{width}}  {PRESETS[task].title}" for task in ALL_TASKS)
    return f"""examples:
  oncofed-synth --out /tmp/consortium --sites 3 --studies-per-task 24 --seed 0
  oncofed-synth --out /tmp/consortium --sites 2 --studies-per-task 12 --tasks lung-ct,prostate-mr
  oncofed-synth --out /tmp/non-iid --sites 3 --studies-per-task 24 --unlike-site site-c

Writes DIR/<site>/dicom/... (DICOM files), DIR/<site>/labels.csv (study_instance_uid,task,label),
DIR/<site>/lesions.json (lesion centre in patient mm and voxel indices, radius, mask file) and
DIR/consortium.json. The same seed gives the same files.

tasks (imaging.presets):
{tasks}"""


def build_parser() -> argparse.ArgumentParser:
    """The ``oncofed-synth`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="oncofed-synth",
        description="Write a synthetic multi-site consortium of DICOM studies for the cancer tasks.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (empty, or an earlier consortium)")
    parser.add_argument("--sites", type=int, default=3, help="number of hospitals, 1-26 (default 3)")
    parser.add_argument("--studies-per-task", type=int, default=24,
                        help="studies per task at a site of average size (default 24; sites vary by ±25%%)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS),
                        help=f"comma-separated tasks (default: all {len(ALL_TASKS)}, listed below)")
    parser.add_argument("--scale", type=int, default=1,
                        help="in-plane matrix multiplier (default 1: 64×64 CT/MR, 160×128 MG; 8: 512×512 CT)")
    parser.add_argument("--force", action="store_true", help="replace an earlier consortium in --out")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--unlike-site", default=None, metavar="SITE",
                        help="the non-IID variant: this site's scanners (CT, MR, mammography) are unlike the others' "
                             "(an older low-dose CT, a noisy 1.5 T MR, a steeper mammography detector), e.g. site-c")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oncofed-synth``."""
    args = build_parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True, soft_wrap=True)
    try:
        tasks = validate_tasks(args.tasks.split(","))
        if args.out.exists() and any(args.out.iterdir()) and not args.force:
            raise FileExistsError(f"{args.out} is not empty; choose an empty folder, or --force to replace an "
                                  "earlier consortium there")
        with Progress(TextColumn("[bold]writing studies"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console) as bar:
            task = bar.add_task("", total=None)

            def progress(done: int, total: int, site: str) -> None:
                bar.update(task, completed=done, total=total, description=site)

            result = generate_consortium(args.out, sites=args.sites, studies_per_task=args.studies_per_task,
                                         seed=args.seed, tasks=tasks, scale=args.scale, overwrite=args.force,
                                         progress=progress, workers=args.workers, unlike=args.unlike_site)
    except (ValueError, FileExistsError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    profiles = {p.name: p for p in site_profiles(args.sites, args.seed, unlike=args.unlike_site)}
    table = Table(title=f"Synthetic consortium in {result.out} ({result.seconds:.1f} s)")
    for col in ("site", "studies", "with lesion", "patients", "files", "CT", "MR", "MG"):
        table.add_column(col, justify="right" if col in ("studies", "with lesion", "patients", "files") else "left")
    for site in result.sites:
        p = profiles[site.name]
        mr = p.vendors["MR"][1] + (" enhanced" if p.mr_enhanced else "") + (
            f" oblique {p.mr_oblique_deg:g}°" if p.mr_oblique_deg else "")
        table.add_row(site.name, str(site.studies), f"{site.positives} ({site.positives / site.studies:.0%})",
                      str(site.patients), str(site.files), f"{p.vendors['CT'][1]} {p.ct_thickness:g} mm", mr,
                      p.vendors["MG"][1] + (" MONOCHROME1" if p.mg_monochrome1 else ""))
    console.print(table)
    first = result.sites[0]
    console.print(f"Next: oncofed-site ingest --workspace ws/{first.name} --source {first.dicom_dir} "
                  f"--labels {first.labels_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

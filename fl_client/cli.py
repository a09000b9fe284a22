"""``oncofed-site``: the hospital site's command line.

Everything here runs at the site and reads only the site's own workspace and DICOM files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imaging.catalog import Catalog
from imaging.ingest import IngestReport, ingest_folder
from imaging.labels import LabelFileError, LabelReport, load_labels
from imaging.summary import series_listing, site_status

EPILOG_INGEST = """example:
  oncofed-site ingest --workspace ws/site-a --source /data/dicom --labels /data/labels.csv

Re-running on an unchanged folder only checks sizes and modification times.
The labels CSV needs the columns study_instance_uid,task,label (label 0 or 1)."""

EPILOG_STATUS = """example:
  oncofed-site status --workspace ws/site-a
  oncofed-site status --workspace ws/site-a --json > status.json

--json prints counts and reason codes only (no patient data, UIDs or paths), schema
oncofed.site-status/1, documented in the README."""

EPILOG_SERIES = """example:
  oncofed-site series --workspace ws/site-a
  oncofed-site series --workspace ws/site-a --json | jq '.series[] | select(.status=="rejected")'

--json prints schema oncofed.series/1 (documented in the README). It lists UIDs: keep it at the site."""


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def _quiet_pydicom() -> None:
    """pydicom warns about every odd value it meets; the catalog records what matters."""
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _print_ingest(console: Console, report: IngestReport) -> None:
    table = Table(title=f"Ingest of {report.source}", show_header=False)
    table.add_row("files found", str(report.files_seen))
    table.add_row("files read (new or changed)", str(report.files_read))
    table.add_row("files unchanged (skipped)", str(report.files_unchanged))
    table.add_row("files removed since last ingest", str(report.files_removed))
    table.add_row("series checked", str(report.series_checked))
    table.add_row("images decoded", str(report.images_decoded))
    table.add_row("series accepted / rejected", f"{report.series_ok} / {report.series_rejected}")
    table.add_row("usable images", str(report.images_ok))
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)
    if report.rejected:
        rejects = Table(title="Rejected (run 'oncofed-site series' for each one's reason)")
        rejects.add_column("level")
        rejects.add_column("reason")
        rejects.add_column("count", justify="right")
        for key, n in sorted(report.rejected.items()):
            level, reason = key.split(":", 1)
            rejects.add_row(level, reason, str(n))
        console.print(rejects)


def _print_labels(console: Console, report: LabelReport) -> None:
    console.print(
        f"labels: {report.rows} rows read, {report.stored} stored, {len(report.invalid)} invalid, "
        f"{report.newly_split_patients} patients newly assigned to a split"
    )
    for line, message in report.invalid[:20]:
        console.print(f"  [yellow]line {line}[/]: {message}")
    if len(report.invalid) > 20:
        console.print(f"  ... and {len(report.invalid) - 20} more invalid rows")
    if report.unknown_studies:
        console.print(
            f"  [yellow]{len(report.unknown_studies)} labelled studies are not in the catalog[/] "
            f"(e.g. {report.unknown_studies[0]}); ingest their DICOM files or fix the UIDs"
        )
    if report.without_image:
        study, task = report.without_image[0]
        console.print(
            f"  [yellow]{len(report.without_image)} labelled studies have no usable image for their task[/] "
            f"(e.g. {study} for {task}); see 'oncofed-site series'"
        )


def cmd_ingest(args: argparse.Namespace, console: Console) -> int:
    if args.source is None and args.labels is None:
        raise UserError("give --source DIR (DICOM folder) and/or --labels CSV")
    with Catalog.open(args.workspace) as catalog:
        if args.source is not None:
            if not args.source.is_dir():
                raise UserError(f"--source {args.source} is not a folder; give the folder that holds the DICOM files")
            with _progress(console) as bar:
                tasks: dict[str, Any] = {}

                def tick(phase: str, done: int, total: int) -> None:
                    if phase not in tasks:
                        label = "reading headers" if phase == "headers" else "checking series"
                        tasks[phase] = bar.add_task(label, total=total)
                    bar.update(tasks[phase], completed=done, total=total)

                report = ingest_folder(catalog, args.source, progress=tick)
            _print_ingest(console, report)
        if args.labels is not None:
            try:
                _print_labels(console, load_labels(catalog, args.labels))
            except LabelFileError as exc:
                raise UserError(str(exc)) from exc
    console.print(f"\nNext: oncofed-site status --workspace {args.workspace}")
    return 0


def _print_status(console: Console, status: dict[str, Any]) -> None:
    top = Table(title="Site catalog", show_header=False)
    for key in ("files", "series", "images"):
        top.add_row(key, ", ".join(f"{k} {v}" for k, v in sorted(status[key].items())) or "0")
    top.add_row("studies / patients", f"{status['studies']} / {status['patients']}")
    top.add_row("modalities (usable series)", ", ".join(f"{k} {v}" for k, v in status["modalities"].items()))
    top.add_row("manufacturers", ", ".join(f"{k or '?'} {v}" for k, v in status["manufacturers"].items()))
    top.add_row("unlabelled studies", str(status["unlabelled_studies"]))
    top.add_row("labels for unknown studies", str(status["labels_for_unknown_studies"]))
    top.add_row("labelled, no usable image", str(status["labelled_studies_without_usable_image"]))
    top.add_row("patients per split", ", ".join(f"{k} {v}" for k, v in status["split_patients"].items()))
    console.print(top)
    tasks = Table(title="Tasks (samples by split, label 0/1)")
    for col in ("task", "modality", "usable studies", "labelled", "label 0/1", "train", "val", "test"):
        tasks.add_column(col)
    for name, t in status["tasks"].items():
        def cell(split: str, t: dict[str, Any] = t) -> str:
            c = t["splits"].get(split, {})
            return f"{c.get('0', 0)}/{c.get('1', 0)}"

        tasks.add_row(
            name, t["modality"], str(t["studies_with_usable_images"]), str(t["labelled_studies"]),
            f"{t['labels'].get('0', 0)}/{t['labels'].get('1', 0)}", cell("train"), cell("val"), cell("test"),
        )
    console.print(tasks)
    if status["rejects"]:
        rejects = Table(title="Rejects by reason")
        for col in ("level", "reason", "count"):
            rejects.add_column(col)
        for r in status["rejects"]:
            rejects.add_row(r["level"], r["reason"], str(r["count"]))
        console.print(rejects)


def _open_existing(workspace: Path) -> Catalog:
    try:
        return Catalog.open(workspace, create=False)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    with _open_existing(args.workspace) as catalog:
        status = site_status(catalog)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(console, status)
    return 0


def cmd_series(args: argparse.Namespace, console: Console) -> int:
    with _open_existing(args.workspace) as catalog:
        listing = series_listing(catalog)
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    table = Table(title="Series")
    for col in ("study", "series", "mod", "tasks", "files", "frames", "shape", "spacing mm", "status", "reason"):
        table.add_column(col, overflow="fold")
    for s in listing["series"]:
        table.add_row(
            "…" + s["study_instance_uid"][-8:], "…" + s["series_instance_uid"][-8:], s["modality"],
            ",".join(s["tasks"]), str(s["files"]), str(s["frames"]),
            "x".join(map(str, s["shape"])) if s["shape"] else "",
            "x".join(f"{v:g}" for v in s["spacing_mm"]) if s["spacing_mm"] else "",
            s["status"], (s["message"] or "") if s["status"] != "ok" else "",
        )
    console.print(table)
    if listing["rejected_files"]:
        files = Table(title="Files not in any series")
        for col in ("file", "reason", "message"):
            files.add_column(col, overflow="fold")
        for f in listing["rejected_files"]:
            files.add_row(f["path"], f["reason"], f["message"])
        console.print(files)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``oncofed-site`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="oncofed-site",
        description="oncofed at a hospital site: ingest DICOM, check the catalog, train, review.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  oncofed-site ingest --workspace ws/site-a --source /data/dicom --labels labels.csv\n"
        "  oncofed-site status --workspace ws/site-a\n\nRun 'oncofed-site COMMAND --help' for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, epilog: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--workspace", type=Path, required=True, help="the site workspace folder")
        p.set_defaults(func=func)
        return p

    p = add("ingest", "Build or update the site catalog from a DICOM folder and a label CSV.", EPILOG_INGEST,
            cmd_ingest)
    p.add_argument("--source", type=Path, help="folder of DICOM files (any names, nested, DICOMDIR sets)")
    p.add_argument("--labels", type=Path, help="CSV with columns study_instance_uid,task,label")
    p = add("status", "Counts per task, modality, manufacturer, label and split; rejects by reason.",
            EPILOG_STATUS, cmd_status)
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.site-status/1)")
    p = add("series", "List every series with its shape, spacing, status and reason.", EPILOG_SERIES,
            cmd_series)
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.series/1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oncofed-site``."""
    _quiet_pydicom()
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return int(args.func(args, console))
    except UserError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imaging.catalog import Catalog
from imaging.ingest import IngestReport, ingest_folder
from imaging.labels import LabelFileError, LabelReport, load_labels
from imaging.presets import TASKS
from imaging.summary import series_listing, site_status

if TYPE_CHECKING:
    from models.methods import Method

__all__ = [
    "UserError",
    "build_parser",
    "cmd_explain",
    "cmd_ingest",
    "cmd_join",
    "cmd_predict",
    "cmd_privacy",
    "cmd_review",
    "cmd_series",
    "cmd_status",
    "cmd_train_local",
    "main",
]

EPILOG_INGEST = """examples:
  oncofed-site ingest --workspace ws/site-a --source /data/dicom --labels /data/labels.csv
  oncofed-site ingest --workspace ws/site-a --dicomweb https://pacs.local/dicom-web \\
      --query "Modality=CT&StudyDate=20200101-20211231" --dry-run   # how many studies, fetch nothing
  oncofed-site ingest --workspace ws/site-a --dicomweb https://pacs.local/dicom-web \\
      --query "Modality=CT&StudyDate=20200101-20211231" --labels /data/labels.csv
  oncofed-site ingest --workspace ws/site-a --dicomweb https://pacs.local/dicom-web \\
      --study 1.2.840.1 --study 1.2.840.2 --credentials /etc/oncofed/pacs.cred

Re-running on an unchanged folder only checks sizes and modification times; re-running a DICOMweb
ingest fetches only the instances not fetched before. Studies from the PACS go through the same
validation as a folder. PACS credentials: ONCOFED_PACS_USER and ONCOFED_PACS_PASSWORD (or
ONCOFED_PACS_TOKEN) in the environment, or --credentials FILE holding 'user:password' or 'Bearer
TOKEN' (chmod 600); never in the URL.
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


EPILOG_TRAIN = """examples:
  oncofed-site train-local --workspace ws/site-a --task lung-ct --out runs/lung-a --epochs 20
  oncofed-site train-local --workspace ws/site-a --task lung-ct --out runs/lung-a-dp --dp-epsilon 4
  oncofed-site train-local --workspace ws/site-a --workspace ws/site-b --task breast-mg --out runs/pooled
  oncofed-site train-local --workspace ws/site-a --task lung-ct-seg --out runs/lung-seg-a --epochs 30
  oncofed-site train-local --workspace ws/public --task colorectal-ct --norm instance --out public/crc
      # a start for a DP-SGD run: oncofed-server simulate ... --initial-model public/crc/model.pt

Writes OUT/model.pt, OUT/metrics.json (per split: AUROC, sensitivity and specificity at the
threshold, balanced accuracy, Brier score, with the number of studies; for a *-seg task Dice,
lesion-wise sensitivity, false-positive lesions per study and HD95) and OUT/curves.png.
Several --workspace pool the sites (the centralised baseline; no DP). With --dp-epsilon the
site's privacy ledger is checked first and written after: see 'oncofed-site privacy'."""

EPILOG_PRIVACY = """examples:
  oncofed-site privacy --workspace ws/site-a
  oncofed-site privacy --workspace ws/site-a --set-budget 8 --delta 1e-5
  oncofed-site privacy --workspace ws/site-a --set-budget 8 --require-dp
  oncofed-site privacy --workspace ws/site-a --json

The budget is this site's decision: nothing from the network can change it. Every DP training
session on this site's data is in the ledger; ε is cumulative over all of them."""


EPILOG_EXPLAIN = """examples:
  oncofed-site explain --workspace ws/site-a --model runs/lung/model.pt --out explain/lung
  oncofed-site explain --workspace ws/site-a --model runs/fed-1/model.pt --out explain/one --study 1.2.826.0.1.3
  oncofed-site explain --workspace ws/site-a --model runs/lung/model.pt --out explain/lung --method gradcam,occlusion
  oncofed-site explain --workspace ws/site-a --model runs/lung/model.pt --out explain/lung \\
      --store-to https://pacs.local/dicom-web

Writes per study OUT/<study uid>/<method>.npy (the map, float32 in [0, 1]) and <method>.png (the
overlay; volumes: three planes through the map's peak and a strip of axial slices), and
OUT/explain.json (probability, label, peak, seconds), and the DICOM objects a viewer or PACS takes
(OUT/<study uid>/dicom/: a Parametric Map of the map on the series' own grid for CT and MR, and RGB
key images of the slices where the map is strongest; marked RESEARCH USE ONLY). Occlusion is slow (it
re-runs the model once per hidden patch): it is restricted to the image's region and opt-in. Nothing
leaves the site, unless --store-to sends the DICOM objects to the site's own PACS (STOW-RS; credentials
as for 'oncofed-site ingest --dicomweb'), which the catalog records."""


EPILOG_REVIEW = """examples:
  oncofed-site review --workspace ws/site-a --model runs/fed-1/model.pt
  oncofed-site review --workspace ws/site-a --model runs/lung/model.pt --model runs/breast/model.pt --port 8800
  oncofed-site review --workspace ws/site-a --export-csv verdicts.csv
  oncofed-site review --workspace ws/site-a --model runs/lung-seg/model.pt     # a segmentation model

Serves the review page on http://127.0.0.1:PORT/ (this machine only): the worklist of the site's
studies with the model's score (sortable, filters for task, split, label and review state), and per
image the slices with window/level presets, the saliency overlay (opacity, method) and the verdict
form (agree / disagree / unsure, comment, initials). For a segmentation model (a *-seg task) the
score is the predicted lesion volume and the slices show its outline, with the reference
annotation's outline in another colour where the study has one. Verdicts are kept in the site catalog with the
time and the model file's SHA-256; --export-csv writes them all. One --model per task. Ctrl-C stops."""


EPILOG_MODEL = """examples:
  oncofed-site model runs/fed-1/model.pt
  oncofed-site model runs/fed-1/model.pt --json

What a model file holds, before the site uses it: its task, network and resolution profile, the round it
came from, how its run trained (strategy, DP), its SHA-256 (the identity the review verdicts record), and
how its scores are read: the recalibration its run adopted (or none: the network's own sigmoid) and the
operating point with the rule that chose it. Reads the file only; nothing is run."""


EPILOG_PREDICT = """examples:
  oncofed-site predict --workspace ws/site-a --model runs/lung-seg-a/model.pt --out predict/lung
  oncofed-site predict --workspace ws/site-a --model runs/fed-seg/model.pt --out predict/all --split all
  oncofed-site predict --workspace ws/site-a --model runs/lung-seg-a/model.pt --out predict/one --study 1.2.826.0.1.3
  oncofed-site predict --workspace ws/site-a --model runs/lung-seg-a/model.pt --out predict/lung \\
      --store-to https://pacs.local/dicom-web

For a lesion segmentation model (a *-seg task): per image the lesion probabilities by sliding window,
carried back onto the image's own DICOM grid and cut at 0.5. Writes per study OUT/study-<hash>/
(a hash of the study, no UID in a name): seg-<hash>.dcm, the mask as a DICOM Segmentation on the source
series (marked RESEARCH USE ONLY; written also when no lesion is found, saying so) and overlay-<hash>.png
(the slices with the most lesion, the predicted outline in orange, the reference annotation's in cyan
where the study has one); and OUT/predictions.json (per image: voxels, lesions, volume in ml or area in
cm2, and the Dice against the reference annotation on the DICOM grid). Writing again gives the same
UIDs, so the PACS replaces rather than duplicates. --split all includes studies without a split yet.
Nothing leaves the site, unless --store-to sends the SEG objects to the site's own PACS (STOW-RS;
credentials as for 'oncofed-site ingest --dicomweb'), which the catalog records."""


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def _listing(names: Sequence[str], *, last: str = "or") -> str:
    """``"a, b or c"``: names for a help text or an error."""
    return f"{', '.join(names[:-1])} {last} {names[-1]}" if len(names) > 1 else "".join(names)


def _placement_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision``: where this site runs the model (its own choice)."""
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (default: the first CUDA GPU, else the CPU), cpu, cuda, "
                             "cuda:N")
    parser.add_argument("--precision", default="auto",
                        help="auto (default: bf16 or fp16 mixed precision on a GPU, fp32 on the CPU), fp32, bf16, "
                             "fp16 (GPU only)")


def _placement(args: argparse.Namespace) -> Any:
    """The checked :class:`models.device.Placement` of ``--device``/``--precision``.

    Raises:
        UserError: A device this machine does not have, or a precision it cannot run (one line).
    """
    from models.device import DeviceError, place

    try:
        return place(args.device, args.precision)
    except DeviceError as exc:
        raise UserError(f"--device/--precision: {exc}") from None


def _saliency_methods(option: str) -> list[Method]:
    """The saliency methods a comma-separated ``--method`` names."""
    from models.methods import Method

    try:
        return list(dict.fromkeys(Method(m.strip()) for m in option.split(",") if m.strip()))
    except ValueError:
        raise UserError(f"--method {option}: expected {_listing(list(Method), last='and/or')}") from None


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
    if report.annotations_ok or report.annotations_rejected:
        table.add_row("lesion annotations matched / rejected",
                      f"{report.annotations_ok} / {report.annotations_rejected}")
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


def _ingest_dicomweb(args: argparse.Namespace, catalog: Catalog, console: Console) -> int:
    from fl_client.pacs_transfer import FetchStatus, connect, fetch_and_record, find_cohort
    from fl_client.workspace import Workspace
    from imaging.pacs import PacsError, parse_query

    if not args.study and args.query is None:
        raise UserError("with --dicomweb give the cohort: --study UID (repeatable) and/or --query "
                        "'Modality=CT&StudyDate=20200101-20211231'")
    try:
        # A malformed query, or a key the PACS could ignore, is named before anything is asked of the PACS.
        filters = None if args.query is None else parse_query(args.query)
        pacs = connect(args.dicomweb, credentials=args.credentials)
        studies = find_cohort(pacs, studies=args.study or (), filters=filters, retries=args.retries)
    except PacsError as exc:
        raise UserError(str(exc)) from None
    if not studies:
        raise UserError(f"the query {args.query!r} found no studies on {args.dicomweb}")
    if args.dry_run:
        console.print(f"PACS {pacs.url}: the cohort holds {len(studies)} studies; nothing was fetched "
                      "(run again without --dry-run to fetch them)", highlight=False)
        return 0
    with _progress(console) as bar:
        task = bar.add_task("fetching studies", total=len(studies))

        def done(n: int, total: int, result: Any) -> None:
            bar.update(task, completed=n, total=total)

        results = fetch_and_record(pacs, catalog, args.workspace, studies, retries=args.retries, on_study=done)
    counts = {s: sum(r.status == s for r in results) for s in FetchStatus}
    console.print(f"PACS {pacs.url}: {len(results)} studies: {counts[FetchStatus.FETCHED]} fetched "
                  f"({sum(r.fetched for r in results)} instances), {counts[FetchStatus.UP_TO_DATE]} already here, "
                  f"{counts[FetchStatus.FAILED]} failed", highlight=False)
    for r in [r for r in results if r.status == FetchStatus.FAILED][:20]:
        console.print(f"  [red]failed[/] {r.study_uid}: {r.reason}", highlight=False)
    store = Workspace.of(args.workspace).pacs_store
    if store.is_dir():
        _ingest_with_progress(catalog, store, console)
    return 1 if counts[FetchStatus.FAILED] else 0


def _ingest_with_progress(catalog: Catalog, folder: Path, console: Console) -> None:
    """Folder ingest with a progress bar per phase, then its report."""
    with _progress(console) as bar:
        tasks: dict[str, Any] = {}

        def tick(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = {"headers": "reading headers", "annotations": "matching annotations"}.get(phase,
                                                                                                  "checking series")
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        report = ingest_folder(catalog, folder, progress=tick)
    _print_ingest(console, report)


def cmd_ingest(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site ingest``: catalog a DICOM folder or a PACS cohort (DICOMweb), and/or a label CSV.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0, or 1 when some PACS studies could not be fetched.

    Raises:
        UserError: No source given, both a folder and a PACS, a missing folder, a bad label file, or a PACS
            problem (one line that says what to do).
    """
    if args.source is None and args.labels is None and args.dicomweb is None:
        raise UserError("give --source DIR (DICOM folder) or --dicomweb URL, and/or --labels CSV")
    if args.source is not None and args.dicomweb is not None:
        raise UserError("give --source or --dicomweb, not both: run ingest once for each")
    code = 0
    with Catalog.open(args.workspace) as catalog:
        if args.dicomweb is not None:
            code = _ingest_dicomweb(args, catalog, console)
        if args.source is not None:
            if not args.source.is_dir():
                raise UserError(f"--source {args.source} is not a folder; give the folder that holds the DICOM files")
            _ingest_with_progress(catalog, args.source, console)
        if args.labels is not None:
            try:
                _print_labels(console, load_labels(catalog, args.labels))
            except LabelFileError as exc:
                raise UserError(str(exc)) from exc
    console.print(f"\nNext: oncofed-site status --workspace {args.workspace}")
    if code:
        console.print("Some studies could not be fetched (reasons above); run the same command again to retry them.")
    return code


def _print_status(console: Console, status: dict[str, Any]) -> None:
    top = Table(title="Site catalog", show_header=False)
    for key in ("files", "series", "images"):
        top.add_row(key, ", ".join(f"{k} {v}" for k, v in sorted(status[key].items())) or "0")
    top.add_row("lesion annotations", ", ".join(f"{k} {v}" for k, v in sorted(status["annotations"].items())) or "0")
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
    """``oncofed-site status``: the catalog's counts, as a table or JSON (no patient data).

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: The workspace has no catalog.
    """
    with _open_existing(args.workspace) as catalog:
        status = site_status(catalog)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(console, status)
    return 0


def cmd_series(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site series``: every series with its status and reason, as a table or JSON.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: The workspace has no catalog.
    """
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
    rejected = [a for a in listing["annotations"] if a["status"] != "ok"]
    if rejected:
        annotations = Table(title="Lesion annotations not used")
        for col in ("file", "kind", "reason", "message"):
            annotations.add_column(col, overflow="fold")
        for a in rejected:
            annotations.add_row(a["path"], a["kind"], a["reason"], a["message"])
        console.print(annotations)
    if listing["rejected_files"]:
        files = Table(title="Files not in any series")
        for col in ("file", "reason", "message"):
            files.add_column(col, overflow="fold")
        for f in listing["rejected_files"]:
            files.add_row(f["path"], f["reason"], f["message"])
        console.print(files)
    return 0


def cmd_train_local(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site train-local``: train and evaluate on this site's data (or several sites pooled).

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: A bad option, or training or the privacy budget refused (with the reason).
    """
    from fl_client.local_run import run_local
    from fl_client.privacy import PrivacyError
    from fl_client.train import TrainingError
    from imaging.sitedata import NoSiteData
    from models.config import ConfigError, from_flat
    from models.device import DeviceError

    args.out.mkdir(parents=True, exist_ok=True)  # an unusable --out is said before training, not after
    _placement(args)  # a device this machine lacks is said before training, not after
    flat: dict[str, Any] = {"task": args.task, "model": args.model, "resolution": args.resolution, "norm": args.norm,
                            "batch-size": args.batch_size, "operating-point": args.operating_point,
                            "learning-rate": args.lr, "seed": args.seed, "threads": args.threads}
    if args.dp_epsilon is not None:
        flat.update({"dp": True, "dp-epsilon": args.dp_epsilon, "dp-max-grad-norm": args.dp_max_grad_norm,
                     "dp-grad-sample-mode": args.dp_grad_sample_mode})
        if args.dp_delta is not None:
            flat["dp-delta"] = args.dp_delta
    try:
        config = from_flat(flat)
    except ConfigError as exc:
        raise UserError(str(exc).replace("run-config key", "option").replace("'dp-", "'--dp-")
                        .replace("'norm'", "'--norm'").replace("norm=", "--norm ")) from None
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    segmenting = config.model.network == "unet"
    table = Table(title=f"{args.task}: training on {', '.join(str(w) for w in args.workspace)}")
    for col in ("epoch", "train loss", "val Dice" if segmenting else "val AUROC"):
        table.add_column(col, justify="right")
    with _progress(console) as bar:
        task = bar.add_task("epochs", total=args.epochs)

        def on_epoch(epoch: int, loss: float, auc: float | None) -> None:
            table.add_row(str(epoch + 1), f"{loss:.3f}", "-" if auc is None else f"{auc:.3f}")
            bar.update(task, advance=1)

        try:
            doc = run_local(args.workspace, config, args.out, epochs=args.epochs, on_epoch=on_epoch,
                            device=args.device, precision=args.precision,
                            on_warning=lambda text: console.print(f"[yellow]warning:[/] {text}"))
        except (TrainingError, NoSiteData, PrivacyError, DeviceError) as exc:
            raise UserError(str(exc)) from None
    console.print(table)

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    if segmenting:
        result = Table(title="Lesion segmentation per study (voxels above 0.5; network grid)")
        for col in ("split", "studies", "with lesion", "Dice", "lesions", "lesion sens. (IoU≥0.1)",
                    "FP lesions/study", "HD95 mm"):
            result.add_column(col, justify="right")
        for split, m in doc["splits"].items():
            result.add_row(split, str(m["studies"]), str(m["positives"]), f(m["dice"]), str(m["lesions"]),
                           f(m["lesion_sensitivity"]), f(m["fp_lesions"]),
                           "-" if m["hd95"] is None else f"{m['hd95']:.1f}")
    else:
        op = doc["operating_point"]
        result = Table(title=f"Study-level metrics at threshold {op['threshold']:.3f} ({op['rule_text']}); "
                             "AUROC with DeLong 95 % CI")
        for col in ("split", "studies", "pos/neg", "AUROC (95 % CI)", "sensitivity", "specificity", "bal. acc.",
                    "Brier", "ECE"):
            result.add_column(col, justify="right")
        for split, m in doc["splits"].items():
            auc = f(m["auroc"]) + (f" ({m['auroc_low']:.2f}-{m['auroc_high']:.2f})" if m["auroc_low"] is not None
                                   else "")
            small = " ⚠" if min(m["positives"], m["negatives"]) < 10 else ""
            result.add_row(split + small, str(m["studies"]), f"{m['positives']}/{m['negatives']}", auc,
                           f(m["sensitivity"]), f(m["specificity"]), f(m["balanced_accuracy"]), f(m["brier"]),
                           f(m["ece"]))
    console.print(result)
    if doc.get("subgroups_test"):
        groups = Table(title="Test split by subgroup (the series each study was scored on)")
        for col in ("subgroup", "studies", "pos/neg", "AUROC (95 % CI)"):
            groups.add_column(col, justify="right")
        for name, g in doc["subgroups_test"].items():
            auc = f(g["auroc"]) + (f" ({g['auroc-low']:.2f}-{g['auroc-high']:.2f})" if g["auroc-low"] is not None
                                   else "")
            groups.add_row(name, str(g["studies"]), f"{g['positives']}/{g['negatives']}", auc)
        console.print(groups)
    if not segmenting and any(min(m["positives"], m["negatives"]) < 10 for m in doc["splits"].values()):
        console.print("⚠ fewer than 10 positive or negative studies: too few to judge the split's figures")
    if doc["privacy"]:
        p = doc["privacy"]
        console.print(f"DP-SGD: noise multiplier {p['noise_multiplier']:.3f}, clipping {p['max_grad_norm']:g}, "
                      f"sample rate {p['sample_rate']:.3f}; this site's cumulative ε is now "
                      f"{p['epsilon_site_cumulative']:.3f} (δ={p['delta']:g})")
    console.print(f"{doc['samples_per_second']:.1f} training images/s. Wrote {args.out / 'model.pt'}, "
                  f"{args.out / 'metrics.json'}, {args.out / 'curves.png'}")
    return 0


def cmd_privacy(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site privacy``: show the site's privacy ledger, or set its budget.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: No workspace, or a budget the ledger refuses.
    """
    from fl_client.privacy import PrivacyError, PrivacyLedger

    if not args.workspace.is_dir():
        raise UserError(f"workspace {args.workspace} does not exist; run oncofed-site ingest first")
    ledger = PrivacyLedger(args.workspace)
    try:
        if args.set_budget is not None:
            budget = ledger.set_budget(args.set_budget, args.delta if args.delta is not None else 1e-5,
                                       require_dp=args.require_dp)
            console.print(f"budget set: ε ≤ {budget.epsilon_max:g} at δ={budget.delta:g}"
                          + ("; this site trains only with DP-SGD in federated runs" if budget.require_dp else ""))
        elif args.require_dp:
            raise UserError("--require-dp goes with --set-budget EPS (the ceiling DP training counts against)")
        summary = ledger.summary()
    except PrivacyError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    budget = summary["budget"]
    if budget is None:
        console.print("No privacy budget set: DP training is refused until the site sets one "
                      f"(oncofed-site privacy --workspace {args.workspace} --set-budget EPSILON).")
    else:
        console.print(f"Budget ε ≤ {budget['epsilon_max']:g} at δ={budget['delta']:g}; spent "
                      f"{summary['epsilon_spent']:.3f}; remaining {summary['epsilon_remaining']:.3f}")
    if summary["sessions"]:
        table = Table(title="Privacy ledger (every DP session on this site's data)")
        for col in ("time", "run", "round", "task", "steps", "sample rate", "noise", "clip", "ε cumulative"):
            table.add_column(col, justify="right")
        for s in summary["sessions"]:
            table.add_row(s["time"], s["run_id"], str(s["round"]), s["task"], str(s["steps"]),
                          f"{s['sample_rate']:.4f}", f"{s['noise_multiplier']:.3f}", f"{s['max_grad_norm']:g}",
                          f"{s['epsilon_cumulative']:.3f}")
        console.print(table)
    return 0


EPILOG_JOIN = """examples:
  oncofed-site join --kit kit-a --workspace ws/site-a
  oncofed-site join --kit kit-a --workspace ws/site-a --superlink fl.lead-hospital.org:9092

KIT is the start-up kit folder the consortium lead sent (ca.crt, site.key, site.json). Starts this
site's Flower SuperNode with TLS (the SuperLink must present the consortium's certificate) and the
site's key (the SuperLink accepts only provisioned sites), pointed at the workspace. It stays in the
foreground and trains when the lead starts a run; Ctrl-C leaves the consortium. Images never leave
the site: see the egress log in the workspace. The SuperNode's log is WORKSPACE/supernode/.

Every message is run by the oncofed installed here, never by code the lead sends: a run built for
another oncofed version is refused, and each run is checked against this site's policy and approval
first (oncofed-site policy / runs / approve / refuse)."""


def cmd_join(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site join``: run this site's SuperNode in the consortium until Ctrl-C.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: The SuperNode's exit code.

    Raises:
        UserError: The kit or the connection is unusable (with the reason).
    """
    from fl_client.join import JoinError, join

    try:
        return join(args.kit, args.workspace, superlink=args.superlink, connect_timeout=args.connect_timeout,
                    device=args.device, precision=args.precision,
                    say=lambda line: console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True))
    except JoinError as exc:
        raise UserError(str(exc)) from None


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site explain``: saliency maps of a model on the site's studies; with ``--store-to``, the
    DICOM objects stored to the PACS and recorded in the catalog.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: A bad ``--method``, no workspace, an unusable model, or a PACS problem.
    """
    from fl_client.explain import ExplainError, explain
    from models.weights import WeightsError

    methods = _saliency_methods(args.method)
    if not args.workspace.is_dir():
        raise UserError(f"workspace {args.workspace} does not exist; run oncofed-site ingest first")
    placement = _placement(args)
    with _progress(console) as bar:
        task = bar.add_task("saliency maps", total=None)

        def step(done: int, total: int, uid: str) -> None:
            bar.update(task, completed=done, total=total)

        try:
            doc = explain(args.workspace, args.model, args.out, split=args.split, study=args.study, methods=methods,
                          dicom=not args.no_dicom, on_study=step, placement=placement)
        except (ExplainError, WeightsError) as exc:
            raise UserError(str(exc)) from None
    scoring = doc["scoring"]
    how = ("calibrated probability" if scoring["calibrated"] else "probability") + (
        f"; ● at or above the operating point {scoring['threshold']:.3f} ({scoring['rule']})"
        if scoring["threshold"] is not None else "")
    table = Table(title=f"{doc['task']}: {len(doc['images'])} image(s), maps in {args.out} ({how})")
    for col in ("study", "label", "probability", *doc["methods"]):
        table.add_column(col, overflow="fold")
    for entry in doc["images"][:30]:
        table.add_row(entry["study_uid"][-24:], str(entry["label"]),
                      f"{entry['probability']:.3f}" + (" ●" if entry.get("call") else ""),
                      *[f"{entry['maps'][m]['seconds']:.2f} s" for m in doc["methods"]])
    console.print(table)
    console.print(f"Overlays: {args.out}/<study uid>/*.png; DICOM: {args.out}/<study uid>/dicom/; "
                  f"index: {args.out / 'explain.json'}")
    if args.store_to:
        from fl_client.pacs_transfer import connect, store_and_record
        from imaging.pacs import PacsError

        files = [args.out / f for entry in doc["images"] for m in entry["maps"].values() for f in m.get("dicom", [])]
        if not files:
            raise UserError("nothing to store: the DICOM objects were not written (drop --no-dicom)")
        try:
            pacs = connect(args.store_to, credentials=args.credentials)
            with Catalog.open(args.workspace) as catalog:
                stored = store_and_record(pacs, catalog, files)
        except PacsError as exc:
            raise UserError(str(exc)) from None
        console.print(f"Stored {len(stored)} DICOM object(s) of {len({s.study_uid for s in stored})} study(ies) "
                      f"to {pacs.url} (recorded in the site catalog)", highlight=False)
    return 0


def cmd_model(args: argparse.Namespace, console: Console) -> int:
    """``model``: what a model file holds and how its scores are read."""
    import json

    from models.config import ConfigError, from_flat
    from models.nets import build_model, parameter_count
    from models.weights import WeightsError, read_model

    try:
        held = read_model(args.model)  # one read: the digest shown is that of the tables shown
        round_number, scoring, tested = held.round, held.scoring, held.tested
        config = from_flat(held.run_config)
    except (WeightsError, ConfigError) as exc:
        raise UserError(str(exc)) from None
    spec = config.model
    c = scoring.calibration
    doc = {"file": str(args.model), "sha256": held.sha256, "task": spec.task,
           "network": str(spec.network), "norm": str(spec.norm), "parameters": parameter_count(
               build_model(spec)), "resolution": spec.resolution, "round": round_number,
           "strategy": str(config.federation.strategy) if round_number else "local run",
           "dp": bool(config.privacy.enabled), "dp_epsilon": config.privacy.epsilon if config.privacy.enabled else None,
           "calibration": c.to_dict() if c is not None else None,
           "operating_point": None if scoring.threshold is None else {
               "threshold": scoring.threshold, "shown_threshold": scoring.shown_threshold, "rule": scoring.rule},
           "tested": None if tested is None else tested.to_dict()}
    if args.json:
        console.print_json(json.dumps(doc))
        return 0
    table = Table(title=f"{args.model}", show_header=False)
    table.add_row("task", f"{spec.task} ({spec.resolution} resolution profile)")
    table.add_row("network", f"{doc['network']}, norm {doc['norm']}, {doc['parameters']:,} parameters")
    table.add_row("from", f"round {round_number} of a federated run ({doc['strategy']})" if round_number else
                  "a local run (train-local)")
    table.add_row("DP-SGD", f"yes, ε {doc['dp_epsilon']:g} per site" if doc["dp"] else "no")
    table.add_row("SHA-256", doc["sha256"])
    if c is None:
        table.add_row("scores", "the network's own sigmoid (no recalibration carried)")
    else:
        what = "slope and intercept" if c.update == "logistic" else "intercept alone"
        table.add_row("scores", f"recalibrated ({what}): sigmoid({c.slope:.3f} × logit {c.intercept:+.3f}), fitted "
                                f"on the {c.fitted_on or 'validation studies'} ({c.positives}/{c.negatives} studies)")
    if scoring.threshold is None:
        table.add_row("operating point", "none carried: no study is marked")
    else:
        table.add_row("operating point", f"{scoring.shown_threshold:.4f} on the scores shown (network's own "
                                         f"{scoring.threshold:.4f}): {scoring.rule}")
    table.add_row("tested", tested.describe() if tested is not None else
                  "none carried (a federated run's model, a segmentation model, or one written before 0.3.9)")
    console.print(table)
    return 0


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site predict``: lesion masks of a segmentation model on the site's studies, as DICOM SEG, PNG
    overlays and ``predictions.json``; with ``--store-to``, the SEG objects stored to the PACS and recorded.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0, or 1 when some images could not be predicted (their reasons are printed).

    Raises:
        UserError: No workspace, a classification model, an unusable model, no image to predict, or a PACS problem.
    """
    from fl_client.predict import PredictError, predict, store
    from imaging.pacs import PacsError
    from models.weights import WeightsError

    if not args.workspace.is_dir():
        raise UserError(f"workspace {args.workspace} does not exist; run oncofed-site ingest first")
    placement = _placement(args)
    with _progress(console) as bar:
        task = bar.add_task("lesion masks", total=None)

        def step(done: int, total: int, uid: str) -> None:
            bar.update(task, completed=done, total=total)

        try:
            doc = predict(args.workspace, args.model, args.out, split=args.split, study=args.study, on_study=step,
                          placement=placement)
        except (PredictError, WeightsError) as exc:
            raise UserError(str(exc)) from None
    images = doc["images"]
    done = [e for e in images if "error" not in e]
    table = Table(title=f"{doc['task']}: {len(done)} image(s) outlined, in {args.out}")
    for col in ("folder", "split", "voxels", "lesions", "size", "Dice"):
        table.add_column(col, overflow="fold")
    for e in done[:30]:
        size = f"{e['volume_ml']:.2f} ml" if e["volume_ml"] is not None else f"{e['area_cm2']:.2f} cm²"
        table.add_row(e["folder"] + (f" {e['view']}" if "view" in e else ""), e["split"], str(e["voxels"]),
                      str(e["lesions"]), size, "-" if e["dice"] is None else f"{e['dice']:.3f}")
    console.print(table)
    if len(done) > 30:
        console.print(f"... and {len(done) - 30} more in {args.out / 'predictions.json'}")
    for e in [e for e in images if "error" in e][:20]:
        console.print(f"  [red]not predicted[/] {e['folder']}: {e['error']}", highlight=False, markup=False)
    console.print(f"SEG and overlays: {args.out}/study-<hash>/; index: {args.out / 'predictions.json'}",
                  highlight=False)
    if args.store_to:
        files = [args.out / e["seg"] for e in done]
        if not files:
            raise UserError("nothing to store: no image could be predicted (reasons above)")
        try:
            stored = store(args.workspace, files, url=args.store_to, credentials=args.credentials)
        except PacsError as exc:
            raise UserError(str(exc)) from None
        console.print(f"Stored {len(stored)} SEG object(s) of {len({s.study_uid for s in stored})} study(ies) to "
                      f"{args.store_to} (recorded in the site catalog)", highlight=False)
    return 1 if len(done) < len(images) else 0


def cmd_review(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site review``: serve the review page (or export the verdicts) until Ctrl-C.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: No model, a non-loopback address, a bad ``--method`` or an unusable model.
    """
    from fl_client.review import ReviewError, ReviewSession, VerdictStore, check_address, load_models, serve
    from models.methods import REVIEW_METHODS

    if not args.workspace.is_dir():
        raise UserError(f"workspace {args.workspace} does not exist; run oncofed-site ingest first")
    if args.export_csv:
        try:
            store = VerdictStore(args.workspace)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
        text = store.csv_text()
        args.export_csv.write_text(text)
        console.print(f"{text.count(chr(10)) - 1} verdict(s) written to {args.export_csv}")
        return 0
    if not args.model:
        raise UserError("give the model to review with --model model.pt (or --export-csv FILE)")
    try:
        check_address(args.host, args.port)
    except ReviewError as exc:
        raise UserError(str(exc)) from None
    methods = _saliency_methods(args.method) or list(REVIEW_METHODS)
    try:
        models = load_models(args.model, placement=_placement(args))
        with _progress(console) as bar:
            task = bar.add_task("scoring the worklist", total=None)
            session = ReviewSession(args.workspace, models, methods=methods,
                                    on_progress=lambda done, total: bar.update(task, completed=done, total=total))

        def ready(url: str) -> None:
            console.print(f"Review page: {url}  ({len(session.cases)} images; Ctrl-C stops)", highlight=False)
            sys.stdout.flush()

        serve(session, host=args.host, port=args.port, on_ready=ready)
    except ReviewError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``oncofed-site`` argument parser.

    Returns:
        The parser; tasks and saliency methods in its help come from the presets and ``models.saliency``.
    """
    from models.methods import DEFAULT_METHOD, REVIEW_METHODS, TASK_METHOD, Method

    parser = argparse.ArgumentParser(
        prog="oncofed-site",
        description="oncofed at a hospital site: ingest DICOM, check the catalog, train, review.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  oncofed-site ingest --workspace ws/site-a --source /data/dicom --labels labels.csv\n"
        "  oncofed-site status --workspace ws/site-a\n\nRun 'oncofed-site COMMAND --help' for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, epilog: str, func: Callable[..., int], *,
            many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if many:
            p.add_argument("--workspace", type=Path, required=True, action="append",
                           help="a site workspace folder (repeat to pool several sites)")
        else:
            p.add_argument("--workspace", type=Path, required=True, help="the site workspace folder")
        p.set_defaults(func=func)
        return p

    p = add("ingest", "Build or update the site catalog from a DICOM folder or a PACS (DICOMweb), and a label CSV.",
            EPILOG_INGEST,
            cmd_ingest)
    p.add_argument("--source", type=Path, help="folder of DICOM files (any names, nested, DICOMDIR sets)")
    p.add_argument("--labels", type=Path, help="CSV with columns study_instance_uid,task,label")
    p.add_argument("--dicomweb", metavar="URL", help="pull studies from the PACS's DICOMweb service at URL")
    p.add_argument("--study", action="append", metavar="UID", help="with --dicomweb: a StudyInstanceUID (repeatable)")
    p.add_argument("--query", help="with --dicomweb: study search, e.g. 'Modality=CT&StudyDate=20200101-20211231'")
    p.add_argument("--credentials", type=Path, metavar="FILE",
                   help="PACS credentials file ('user:password' or 'Bearer TOKEN', chmod 600)")
    p.add_argument("--retries", type=int, default=3, help="retries per request on network errors (default 3)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --dicomweb: say how many studies the cohort holds, fetch nothing")
    p = add("status", "Counts per task, modality, manufacturer, label and split; rejects by reason.",
            EPILOG_STATUS, cmd_status)
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.site-status/1)")
    p = add("series", "List every series with its shape, spacing, status and reason.", EPILOG_SERIES,
            cmd_series)
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.series/1)")
    p = add("train-local", "Train and evaluate a model on this site's data (or several sites pooled).",
            EPILOG_TRAIN, cmd_train_local, many=True)
    p.add_argument("--task", required=True, help=_listing(list(TASKS)))
    p.add_argument("--out", type=Path, required=True, help="output folder for model.pt, metrics.json, curves.png")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training split (default 20)")
    p.add_argument("--model", default="auto",
                   help="auto (default: compact-cnn at the cpu profile, densenet-small at diagnostic, unet for a "
                        "*-seg task), compact-cnn, densenet-small, densenet121 or unet")
    p.add_argument("--resolution", default="cpu",
                   help="cpu (default: coarse voxels, for CPUs) or diagnostic (radiological voxel sizes, for GPUs)")
    p.add_argument("--norm", default="auto",
                   help="auto (default: the task's; BatchNorm for colorectal CT without DP-SGD), instance, group, "
                        "batch or none; instance for a colorectal model that is to start a DP-SGD run "
                        "(oncofed-server --initial-model)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per step; 0 (default): 4, or an expected 16 patients under DP-SGD (one image each)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="learning rate; 0 (default): 1e-3, or 3e-3 for a *-seg task or under DP-SGD (--dp-epsilon)")
    p.add_argument("--operating-point", default="youden",
                   help="how the threshold is chosen on the validation split: youden (default), sensitivity>=0.9, "
                        "specificity>=0.9 or fixed:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dp-epsilon", type=float, help="train with DP-SGD spending at most this ε in this run")
    p.add_argument("--dp-delta", type=float, help="δ (default: the site budget's δ)")
    p.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-sample clipping norm (default 1)")
    p.add_argument("--dp-grad-sample-mode", default="auto",
                   help="Opacus mode: auto (default: ew for compact-cnn, hooks otherwise), hooks, functorch, ew, ghost")
    _placement_options(p)
    p = add("privacy", "Show this site's privacy ledger and remaining budget, or set the budget.", EPILOG_PRIVACY,
            cmd_privacy)
    p.add_argument("--set-budget", type=float, metavar="EPS", help="set the site's ceiling on cumulative ε")
    p.add_argument("--delta", type=float, help="δ of the ceiling (default 1e-5)")
    p.add_argument("--require-dp", action="store_true",
                   help="with --set-budget: train only with DP-SGD in federated runs, even if the run does not ask")
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.privacy/1)")
    p = add("explain", "Saliency maps of a model on this site's studies (PNG overlays and NumPy maps).",
            EPILOG_EXPLAIN, cmd_explain)
    p.add_argument("--model", type=Path, required=True, help="a model.pt (train-local, or a federated run's)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="studies to explain (default test)")
    p.add_argument("--study", help="one StudyInstanceUID instead of a split")
    own = ", ".join(f"{m} for {t}" for t, m in TASK_METHOD.items())
    p.add_argument("--method", default="",
                   help=f"{', '.join(Method)}; comma-separated (default: the task's own, {own}, {DEFAULT_METHOD} for "
                   "the others)")
    p.add_argument("--no-dicom", action="store_true", help="skip the DICOM objects (PNG and NumPy maps only)")
    _placement_options(p)
    p.add_argument("--store-to", metavar="URL",
                   help="store the DICOM objects to the PACS at this DICOMweb URL (STOW-RS)")
    p.add_argument("--credentials", type=Path, metavar="FILE",
                   help="PACS credentials file for --store-to ('user:password' or 'Bearer TOKEN', chmod 600)")
    p = add("predict", "Lesion masks of a segmentation model on this site's studies: DICOM SEG, PNG overlays.",
            EPILOG_PREDICT, cmd_predict)
    p.add_argument("--model", type=Path, required=True, help="a model.pt of a *-seg task (train-local or federated)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "unassigned", "all"),
                   help="studies to outline (default test; unassigned: studies without a split; all: every study)")
    p.add_argument("--study", help="one StudyInstanceUID instead of a split")
    _placement_options(p)
    p.add_argument("--store-to", metavar="URL",
                   help="store the SEG objects to the PACS at this DICOMweb URL (STOW-RS)")
    p.add_argument("--credentials", type=Path, metavar="FILE",
                   help="PACS credentials file for --store-to ('user:password' or 'Bearer TOKEN', chmod 600)")
    p = add("review", "Serve the radiologists' review page: scores, saliency overlays, verdicts.", EPILOG_REVIEW,
            cmd_review)
    p.add_argument("--model", type=Path, action="append", help="a model.pt to review (one per task; repeatable)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 takes a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to listen on: 127.0.0.1 (default), localhost or ::1; the page has no login, "
                        "so it is never served to the network (use an SSH tunnel from another machine)")
    p.add_argument("--method", default=",".join(REVIEW_METHODS),
                   help=f"saliency methods offered, of {', '.join(Method)}, each task's own first where offered "
                   f"(default {','.join(REVIEW_METHODS)}; "
                   f"{Method.OCCLUSION} is slow)")
    p.add_argument("--export-csv", type=Path, metavar="FILE", help="write every verdict to FILE as CSV and exit")
    _placement_options(p)
    help_ = "What a model file holds: task, network, round, DP, SHA-256, its calibration and operating point."
    p = sub.add_parser("model", help=help_, description=help_, epilog=EPILOG_MODEL,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a model.pt: a federated global model or checkpoint, or a local run's")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_model)
    p = add("join", "Join the consortium: run this site's Flower SuperNode until Ctrl-C.", EPILOG_JOIN, cmd_join)
    p.add_argument("--kit", type=Path, required=True, help="this site's start-up kit folder from the lead")
    p.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink's address (default: the kit's)")
    p.add_argument("--connect-timeout", type=float, default=0.0,
                   help="give up if not accepted after this many seconds (default 0: keep trying)")
    _placement_options(p)
    from fl_client.policy_cli import add_commands

    add_commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oncofed-site``.

    Args:
        argv: The arguments (default: the process's).

    Returns:
        The exit code: 0 on success, 2 for a mistake in what was asked (said in one line on stderr), else
        the command's own.
    """
    _quiet_pydicom()
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    from fl_client.policy import PolicyError

    try:
        return int(args.func(args, console))
    except (UserError, PolicyError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except OSError as exc:  # a path that cannot be read or written: the user's to fix, said in one line
        where = f" {exc.filename}" if exc.filename else ""
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] cannot use{where}: {exc.strerror or exc}; check that the path exists and that you "
            "may write there", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Hand a finished run's model over: a MONAI bundle and a model card (``oncofed-server export``).

Written under ``OUT``::

    configs/metadata.json    MONAI bundle metadata (versions, input and output format, intended use)
    configs/inference.json   the task preset's preprocessing and the network, for ``python -m monai.bundle run``
    models/model.pt          the network's state dict (torch.save)
    models/model.ts          the network as TorchScript
    docs/README.md           how to run the bundle
    docs/model-card.md/json  intended use, task and resolution profile, network, sites, DP ε, metrics with 95 % CIs
    SHA256SUMS               SHA-256 of every file above (the model card lists all but its own two files)

The preprocessing (the bundle's transforms and the card's resolution profile) is data given by the caller, made
by :mod:`imaging.bundle`: this module reads the run with :mod:`models` only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_server.report import start_text
from fl_server.rounds import RoundRecord
from models.config import ConfigError, RunKey, from_flat
from models.evaluation import Scoring, wilson
from models.nets import build_model, parameter_count
from models.protocol import Metric
from models.torchscript import trace_network
from models.weights import ModelFile, WeightsError, load_arrays, load_scoring, read_model

__all__ = ["ExportError", "Exported", "export_run", "hanley_mcneil", "model_card", "render_card", "wilson"]

RESEARCH_ONLY = "Research use only — not for clinical decisions."
Z95 = 1.959963984540054


class ExportError(Exception):
    """A run that cannot be exported, or an output folder that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote.

    Attributes:
        out: The bundle folder.
        files: SHA-256 of every file written, by path relative to ``out``.
        max_logit_difference: TorchScript against the eager network on a random input.
    """

    out: Path
    files: dict[str, str]
    max_logit_difference: float


def hanley_mcneil(auroc: float, positives: int, negatives: int) -> tuple[float, float] | None:
    """The 95 % confidence interval of an AUROC by Hanley and McNeil (1982), clipped to [0, 1].

    Returns:
        ``(low, high)``, or None without a positive and a negative.
    """
    if positives < 1 or negatives < 1:
        return None
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    half = Z95 * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


def _metrics_with_ci(m: Mapping[str, float]) -> dict[str, Any]:
    pos, neg = int(m.get(Metric.POSITIVES, 0)), int(m.get(Metric.NEGATIVES, 0))
    out: dict[str, Any] = {"studies": int(m.get(Metric.STUDIES, pos + neg)), "positives": pos, "negatives": neg}

    def auroc_ci(v: float) -> tuple[float, float] | None:
        # The site's own DeLong interval on its studies' scores when it sent one, else Hanley & McNeil.
        if m.get(Metric.AUROC_LOW) is not None and m.get(Metric.AUROC_HIGH) is not None:
            return float(m[Metric.AUROC_LOW]), float(m[Metric.AUROC_HIGH])
        return hanley_mcneil(v, pos, neg)

    for key, ci in ((Metric.AUROC, auroc_ci),
                    (Metric.SENSITIVITY, lambda v: wilson(v, pos)), (Metric.SPECIFICITY, lambda v: wilson(v, neg))):
        if key in m:
            interval = ci(float(m[key]))
            out[str(key)] = {"value": float(m[key]), "ci95": list(interval) if interval else None}
    return out


def _pooled(sites: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Pooled over sites: sensitivity and specificity exactly (true positives over positives, etc.), AUROC as
    the mean of the sites' AUROCs weighted by their studies (the pooled ROC needs the scores, which never left
    the sites)."""
    usable = [m for m in sites.values() if Metric.AUROC in m and m.get(Metric.STUDIES, 0) > 0]
    pos = int(sum(m.get(Metric.POSITIVES, 0) for m in sites.values()))
    neg = int(sum(m.get(Metric.NEGATIVES, 0) for m in sites.values()))
    pooled: dict[str, float] = {Metric.STUDIES: pos + neg, Metric.POSITIVES: pos, Metric.NEGATIVES: neg}
    if usable:
        pooled[Metric.AUROC] = sum(m[Metric.AUROC] * m[Metric.STUDIES] for m in usable) / sum(
            m[Metric.STUDIES] for m in usable)
    if pos:
        pooled[Metric.SENSITIVITY] = sum(m.get(Metric.SENSITIVITY, 0) * m.get(Metric.POSITIVES, 0)
                                         for m in sites.values()) / pos
    if neg:
        pooled[Metric.SPECIFICITY] = sum(m.get(Metric.SPECIFICITY, 0) * m.get(Metric.NEGATIVES, 0)
                                         for m in sites.values()) / neg
    return _metrics_with_ci(pooled)


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not run_dir.is_dir():
        raise ExportError(f"no run directory {run_dir}: pass the --run-dir of a finished 'oncofed-server simulate' "
                          "or 'run'")
    for name in ("config.json", "history.json", "model.pt"):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir} is not a run directory (no {name}); pass the --run-dir of a finished run")
    history = json.loads((run_dir / "history.json").read_text())
    if not history.get("finished"):
        raise ExportError(f"the run in {run_dir} has not finished (history.json has no 'finished'); let it end, "
                          "or resume it with --resume, then export")
    return json.loads((run_dir / "config.json").read_text()), history


def model_card(run_dir: Path, *, preprocessing: Mapping[str, Any], parameters: int,
               files: Mapping[str, str], scoring: Scoring | None = None) -> dict[str, Any]:
    """The model card of a finished run, as a JSON-ready dict.

    Args:
        run_dir: The run directory.
        preprocessing: The task's resolution profile and preprocessing (:func:`imaging.bundle.preprocessing_summary`).
        parameters: The network's trainable parameters.
        files: SHA-256 of the files written, by relative path.
        scoring: The run's ``model.pt``'s scoring, where the caller read the file already (so the card describes the
            weights it exported); read from ``run_dir`` when None.

    Returns:
        The card: intended use, task, network, sites, DP ε per site, configuration, metrics with 95 % CIs, code
        version and file hashes.

    Raises:
        ExportError: ``run_dir`` holds no finished run.
    """
    config, history = _read_run(Path(run_dir))
    run_config = dict(config.get("run_config") or {})
    rounds = [RoundRecord.from_dict(r) for r in history.get("rounds") or []]
    trained = sorted({s for r in rounds for s in r.train if r.took_part(s)})
    epsilon: dict[str, dict[str, float]] = {}
    for r in rounds:
        for site, m in r.train.items():
            if m.get(Metric.EPSILON):
                epsilon[site] = {"epsilon": float(m[Metric.EPSILON]),
                                 "epsilon_max": float(m.get(Metric.EPSILON_MAX, 0.0))}
    final = history.get("final") or {}
    if final.get("sites"):
        split, sites_metrics = str(final.get("split", "test")), dict(final["sites"])
    else:  # no final evaluation: the last round's validation
        last = next((r for r in reversed(rounds) if r.evaluate), None)
        split, sites_metrics = "validation (last round)", dict(last.evaluate if last else {})
    figures = final.get("consortium") or {}
    consortium = figures.get("auroc")
    pooled = _pooled(sites_metrics)
    if consortium:  # all sites' studies together, from their score histograms (no per-study score left a site)
        pooled["auroc"] = {"value": consortium["auroc"], "ci95": [consortium["low"], consortium["high"]],
                           "max_binning_error": consortium["max_error"]}
    op = figures.get("operating_point")
    operating = None
    if op:
        c = op["consortium"]
        operating = {"rule": op["rule"], "rule_text": op["rule_text"], "threshold": op["threshold"],
                     "chosen_on": op["chosen_on"],
                     "sensitivity": {"value": c["sensitivity"], "ci95": c["sensitivity_ci95"]},
                     "specificity": {"value": c["specificity"], "ci95": c["specificity_ci95"]},
                     "calibration_ece": (figures.get("calibration") or {}).get("ece")}
    # What the sites and the bundle apply: the model.pt's own calibration (the report's figures of it where they
    # belong to the same fit).
    model = Path(run_dir) / "model.pt"
    try:
        if scoring is None:
            scoring = load_scoring(model) if model.is_file() else Scoring()
    except WeightsError as exc:
        raise ExportError(str(exc)) from None
    calibration = scoring.calibration
    recal = (figures.get("calibration") or {}).get("recalibrated") or {}
    output = "one logit; probability = sigmoid(logit)"
    card_calibration: dict[str, Any] | None = None
    if calibration is not None:
        output = (f"one logit; probability = sigmoid({calibration.slope:.4f} × logit {calibration.intercept:+.4f}) "
                  f"(recalibrated on the {calibration.fitted_on or 'validation studies'}, {calibration.positives}/"
                  f"{calibration.negatives} studies; the bundle's probabilities.json and the sites apply it, "
                  "models/model.ts outputs the logit)")
        same = bool(recal.get("fitted")) and recal.get("slope") == calibration.slope \
            and recal.get("intercept") == calibration.intercept
        card_calibration = {**calibration.to_dict(), "test_ece": recal.get("ece") if same else None}
        if operating is not None:
            operating.update(calibrated_threshold=scoring.shown_threshold,
                             recalibrated_ece=recal.get("ece") if same else None)
    spec = from_flat(run_config).model
    return {
        "intended_use": ("Research: detection of a lesion in one study of the task below (one probability per "
                         "image), on images prepared as the preprocessing describes. " + RESEARCH_ONLY),
        "research_use_only": True,
        "task": preprocessing.get("task", spec.task),
        "preprocessing": dict(preprocessing),
        "network": {"architecture": str(spec.network), "spatial_dims": spec.spatial_dims,
                    "in_channels": spec.in_channels, "norm": str(spec.norm), "parameters": parameters,
                    "output": output, "calibration": card_calibration},
        "run": {"run_id": history.get("run_id"), "strategy": history.get("strategy"), "rounds": len(rounds),
                "finished": history.get("finished"),
                "configuration": _without_folders(run_config),
                "initial_model": _start(history.get("initial_model"))},
        "sites": {"trained": trained, "evaluated": sorted(sites_metrics),
                  "studies": {s: int(m.get(Metric.STUDIES, 0)) for s, m in sorted(sites_metrics.items())}},
        "privacy": {"dp": bool(run_config.get("dp")), "epsilon_per_site": epsilon,
                    "note": "ε is cumulative over every round and run on the site's data, as the site reported it"},
        "metrics": {"split": split, "threshold": next((float(m["threshold"]) for m in sites_metrics.values()
                                                       if "threshold" in m), None),
                    "ci_methods": {"auroc": "DeLong, 95 %, computed at each site on its studies' scores (Hanley & "
                                            "McNeil where a site sent no interval)",
                                   "sensitivity": "Wilson score, 95 %", "specificity": "Wilson score, 95 %",
                                   "pooled_auroc": ("all sites' studies together from their score histograms on "
                                                    f"fixed bins, DeLong 95 % (within {consortium['max_error']:.4f} "
                                                    "of the exact pooled AUROC)") if consortium else
                                                   "mean of site AUROCs weighted by studies; CI by Hanley & McNeil "
                                                   "on the pooled counts (approximate)"},
                    "operating_point": operating,
                    "per_site": {s: _metrics_with_ci(m) for s, m in sorted(sites_metrics.items())},
                    "pooled": pooled},
        "code_version": {"oncofed": importlib.metadata.version("oncofed"), "torch": torch.__version__},
        "files_sha256": dict(files),
    }


def _fmt(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "—"
    ci = entry.get("ci95")
    return f"{entry['value']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _start(record: Any) -> dict[str, Any] | None:
    """The model a run started from (``initial-model``) as the card tells it: its file's name and digest, its task,
    round, DP setting and how it scored on its own test studies (not the lead's folders); None for fresh weights."""
    if not isinstance(record, dict):
        return None
    return {"file": Path(str(record.get("file", ""))).name, "sha256": record.get("sha256"),
            "task": record.get("task"), "round": record.get("round"), "dp": bool(record.get("dp")),
            "tested": record.get("tested")}


def _without_folders(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run configuration for the card: the initial model by its file name (the card names it by its digest),
    not the lead's folders."""
    out = dict(run_config)
    if out.get(RunKey.INITIAL_MODEL):
        out[RunKey.INITIAL_MODEL] = Path(str(out[RunKey.INITIAL_MODEL])).name
    return out


def _start_line(start: Mapping[str, Any] | None) -> str:
    if not start:
        return "- started from fresh weights (the run's seed)"
    return f"- started from `{start['file']}` (SHA-256 {start['sha256']}), {start_text(start)}"


def render_card(card: Mapping[str, Any]) -> str:
    """The model card as Markdown."""
    p, net, m = card["preprocessing"], card["network"], card["metrics"]
    lines = [f"# Model card: {p.get('title', card['task'])}", "", f"**{RESEARCH_ONLY}**", "",
             "## Intended use", "", card["intended_use"], "",
             "## Task and preprocessing", "",
             f"- task `{card['task']}`, modality {p.get('modality')}, resolution profile `{p.get('resolution')}`",
             f"- voxel size {p.get('voxel_size_mm')} mm, input {p.get('input_size')} voxels, field of view "
             f"{p.get('field_of_view_mm')} mm",
             f"- intensity `{p.get('intensity')}`, window {p.get('window_hu')} HU, percentiles {p.get('percentiles')}",
             f"- oncofed transforms in the bundle: {', '.join(p.get('oncofed_transforms') or []) or 'none'}", "",
             "## Network", "", f"- {net['architecture']} ({net['spatial_dims']}D, norm {net['norm']}), "
             f"{net['parameters']:,} parameters; {net['output']}", "",
             "## Sites", "", f"- trained: {', '.join(card['sites']['trained']) or '—'}",
             f"- evaluated: {', '.join(card['sites']['evaluated']) or '—'}", ""]
    eps = card["privacy"]["epsilon_per_site"]
    lines += ["## Differential privacy", "", f"- DP requested: {card['privacy']['dp']}"]
    lines += [f"- {s}: ε = {e['epsilon']:.2f} of {e['epsilon_max']:.2f}" for s, e in sorted(eps.items())] or [
        "- no site reported ε (trained without DP)"]
    lines += ["", f"## Metrics ({m['split']}, threshold {m['threshold']}; 95 % CI)", "",
              "| site | studies (pos/neg) | AUROC | sensitivity | specificity |", "|---|---|---|---|---|"]
    for name, row in [*sorted(m["per_site"].items()), ("pooled", m["pooled"])]:
        lines.append(f"| {name} | {row['studies']} ({row['positives']}/{row['negatives']}) | {_fmt(row.get('auroc'))} "
                     f"| {_fmt(row.get('sensitivity'))} | {_fmt(row.get('specificity'))} |")
    op = m.get("operating_point")
    if op:
        lines += ["", f"Operating point: threshold {op['threshold']:.4f} ({op['rule_text']}; chosen on "
                      f"{op['chosen_on']}): consortium sensitivity {_fmt(op['sensitivity'])}, specificity "
                      f"{_fmt(op['specificity'])} on the test split"
                      + (f"; expected calibration error {op['calibration_ece']:.3f}"
                         if op.get("calibration_ece") is not None else "")
                      + (f"; recalibrated: threshold {op['calibrated_threshold']:.4f}"
                         + (f", expected calibration error {op['recalibrated_ece']:.3f}"
                            if op.get("recalibrated_ece") is not None else "")
                         if op.get("calibrated_threshold") is not None else "") + "."]
    lines += ["", "CI methods: " + "; ".join(f"{k}: {v}" for k, v in m["ci_methods"].items()) + ".", "",
              "## Run", "", f"- run {card['run']['run_id']}, strategy {card['run']['strategy']}, "
              f"{card['run']['rounds']} rounds; configuration in model-card.json",
              _start_line(card["run"].get("initial_model")),
              f"- code: oncofed {card['code_version']['oncofed']}, torch {card['code_version']['torch']}", "",
              "## Files (SHA-256)", ""]
    lines += [f"- `{path}` {digest}" for path, digest in sorted(card["files_sha256"].items())]
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readme(task: str, spatial_dims: int) -> str:
    if spatial_dims == 2:
        what, given, entry = ("every DICOM image under a folder (a mammography study's views), one score each",
                              "/path/to/study", "<image file>")
        study = ("\nA study's score is its most suspicious view's (the maximum), as oncofed scores it. Each image "
                 "is read by oncofed's\n`LoadDicomImaged` (pixel spacing, laterality) and mirrored to one side "
                 "before resampling.\n")
    else:
        what, given, entry = "one DICOM series folder", "/path/to/series", "<series folder>"
        study = ""
    return f"""# oncofed bundle: {task}

{RESEARCH_ONLY}

Run on {what} (from this folder's parent, or pass the absolute bundle path):

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json \\
        --bundle_root BUNDLE --input_dir {given} --output_dir /path/to/out

It writes `out/probabilities.json`: `[{{"image": {entry}, "probability": <0..1>}}]`: the probability the run's sites
show, `sigmoid(calibration_slope × logit + calibration_intercept)` with the run's recalibration in
`configs/inference.json` (1 and 0 where the run fitted none; see the model card). `models/model.ts` alone outputs the
logit.
{study}
The preprocessing in `configs/inference.json` is MONAI's (reader, orientation, resampling, window,
crop/pad) except the steps MONAI has no equivalent for, which name oncofed's own transforms by `_target_`
(`imaging.transforms.*`, listed in `model-card.md`): install the same oncofed version (see the model card) where
the bundle runs. `models/model.ts` is TorchScript (no oncofed code needed for the network);
`models/model.pt` is the state dict of `models.nets.build_model` for the run's configuration.
"""


def export_run(run_dir: Path, out: Path, *, inference: Mapping[str, Any], preprocessing: Mapping[str, Any],
               force: bool = False, model: ModelFile | None = None) -> Exported:
    """Write the MONAI bundle and model card of a finished run.

    Args:
        run_dir: The run directory.
        out: The bundle folder (created; must be empty unless ``force``).
        inference: The bundle's ``inference.json`` (:func:`imaging.bundle.inference_config`).
        preprocessing: The task's preprocessing summary (:func:`imaging.bundle.preprocessing_summary`).
        force: Replace what ``out`` holds.
        model: The run's ``model.pt`` as the caller read it (:func:`models.weights.read_model`), when ``inference``
            carries its calibration: the bundle's weights and card are then that same read's. Read here when None.

    Returns:
        What was written.

    Raises:
        ExportError: No finished run in ``run_dir``, a model that does not load, or ``out`` not empty.
    """
    run_dir, out = Path(run_dir), Path(out)
    _read_run(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ExportError(f"{out} is not empty: choose another --out or pass --force to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    try:
        held = model or read_model(run_dir / "model.pt")  # one read: the card's scoring is the weights' own
        spec = from_flat(held.run_config).model
        net = build_model(spec)
        load_arrays(net, held.arrays)
    except (WeightsError, ConfigError) as exc:
        raise ExportError(f"{run_dir / 'model.pt'}: {exc}") from None
    shape = (spec.in_channels, *preprocessing["input_size"])
    traced = trace_network(net, shape)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "models" / "model.pt")
    traced.module.save(str(out / "models" / "model.ts"))
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    meta = _metadata(spec.task, preprocessing, shape)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    (out / "docs" / "README.md").write_text(_readme(spec.task, spec.spatial_dims))
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    card = model_card(run_dir, preprocessing=preprocessing, parameters=parameter_count(net), files=files,
                      scoring=held.scoring)
    (out / "docs" / "model-card.json").write_text(json.dumps(card, indent=1))
    (out / "docs" / "model-card.md").write_text(render_card(card))
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "SHA256SUMS").write_text("".join(f"{d}  {p}\n" for p, d in sorted(files.items())))
    return Exported(out, files, traced.max_logit_difference)


def _metadata(task: str, preprocessing: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    import monai
    import numpy

    versions = {}
    for name in ("oncofed", "pydicom", "scipy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported from an oncofed federated run"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__, "optional_packages_version": versions,
        "name": f"oncofed {task}", "task": f"{preprocessing.get('title', task)}: lesion present (binary)",
        "description": f"Federated model for {task}. {RESEARCH_ONLY}",
        "authors": "oncofed consortium", "copyright": "oncofed consortium",
        "intended_use": RESEARCH_ONLY,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": preprocessing.get("modality"),
                                 "num_channels": shape[0], "spatial_shape": list(shape[1:]), "dtype": "float32",
                                 "value_range": [0, 1] if preprocessing.get("window_hu") else [],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 1,
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "lesion"}}},
        },
    }

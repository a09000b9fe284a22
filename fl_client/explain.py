"""Saliency maps of a model on the site's own studies, written into a folder at the site.

Per study (``OUT/<study uid>/``): ``<method>.npy`` (the map at the network's input grid, float32 in
[0, 1]), ``<method>.png`` (the overlay on the image's own DICOM grid, oriented as stored, like the key
images and the review viewer: for volumes the three planes through the map's peak and a strip of
slices; each edge named by the patient direction it faces; the map weighted by the model's probability
on a fixed colour scale with its colour bar), and one line in ``OUT/explain.json`` (schema
``oncofed.explain/1``: study, series, split, label, the model's probability (calibrated when the model carries
its run's calibration) and its call at the run's operating point, per method the map file, the PNG, its peak voxel
and the seconds it took; the document's ``scoring`` says how the probability was read). Nothing leaves the site.

With ``dicom=True`` (the CLI's default) each map is also carried back onto the source series' own grid
and written as DICOM under ``OUT/<study uid>/dicom/``: a Parametric Map for a volume and RGB key images
(:mod:`imaging.saliency_dicom`), listed in ``explain.json`` with their series UIDs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_client.explainer import Explainer
from imaging.dicom import read_image
from imaging.saliency_dicom import write_saliency_objects
from imaging.sitedata import NoSiteData, load_site_data
from models.device import Placement
from models.evaluation import Scoring
from models.methods import default_method
from models.saliency import Method

__all__ = ["ExplainError", "Plane", "explain", "overlay_planes"]

SCHEMA = "oncofed.explain/1"


class ExplainError(Exception):
    """Nothing to explain, or a bad request; the message says what to do."""


@dataclass(frozen=True)
class Plane:
    """One view of an overlay, as a radiologist reads it.

    Attributes:
        label: What the view is.
        image: Modality values, rows top to bottom as displayed.
        heat: The map on the same grid (already weighted by the probability).
        edges: Patient-direction letters at the left, right, top and bottom edges ("" if unknown).
        aspect: A pixel's height over its width in mm, so anatomy keeps its shape.
    """

    label: str
    image: np.ndarray
    heat: np.ndarray
    edges: tuple[str, str, str, str]
    aspect: float = 1.0


def _letter(direction: np.ndarray) -> tuple[str, str]:
    """The patient-direction letter a DICOM (LPS) direction points to, and its opposite."""
    axis = int(np.argmax(np.abs(direction)))
    towards, away = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return (towards, away) if direction[axis] > 0 else (away, towards)


def overlay_planes(source: np.ndarray, heat: np.ndarray, plan: Any, *, probability: float = 1.0,
                   strip: int = 8) -> list[Plane]:
    """The views of an overlay on the image's own DICOM grid, oriented as stored (the radiological convention of
    the series: for an axial CT, the patient's right on the viewer's left), each edge named by the patient
    direction it faces. Volumes: the axial, coronal and sagittal planes through the map's peak, then a strip
    of ``strip`` axial slices; a 2D image: the image and its overlay.

    Args:
        source: The image on its DICOM grid, ``(slices, rows, cols)`` or ``(rows, cols)``.
        heat: The map on the same grid, in [0, 1].
        plan: The image plan (its ImageOrientationPatient names the edges).
        probability: The model's probability: the map is weighted by it, so that on the overlay's fixed colour
            scale a study the model calls negative does not glow like a finding.
    """
    heat = heat * probability
    if plan.orientation is None:
        edges: tuple[str, str, str, str] = ("", "", "", "")
        normal: tuple[str, str] = ("", "")
    else:
        row, col = np.asarray(plan.orientation[:3], float), np.asarray(plan.orientation[3:], float)
        (r_to, r_from), (c_to, c_from) = _letter(row), _letter(col)
        edges, normal = (r_from, r_to, c_from, c_to), _letter(np.cross(row, col))
    if source.ndim == 2:
        flat = plan.spacing[0] / plan.spacing[1]
        return [Plane("image", source, np.zeros_like(heat), edges, flat), Plane("saliency", source, heat, edges, flat)]
    step, pr, pc = plan.spacing
    k, j, i = (int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
    # Reformats: slices run along the normal, shown with its positive end up (head up for an axial series).
    up, down = normal
    planes = [Plane(f"slice {k} (peak)", source[k], heat[k], edges, pr / pc),
              Plane(f"through row {j}", source[::-1, j, :], heat[::-1, j, :], (edges[0], edges[1], up, down),
                    step / pc),
              Plane(f"through column {i}", source[::-1, :, i], heat[::-1, :, i], (edges[2], edges[3], up, down),
                    step / pr)]
    for z in np.linspace(0, source.shape[0] - 1, strip).round().astype(int):
        planes.append(Plane(f"slice {z}", source[z], heat[z], edges, pr / pc))
    return planes


def _scoring_doc(scoring: Scoring) -> dict[str, Any]:
    """How the probabilities of an explain.json were read: calibrated or not, the operating point on their scale."""
    c = scoring.calibration
    return {"calibrated": c is not None, "calibration": c.to_dict() if c is not None else None,
            "threshold": scoring.shown_threshold, "rule": scoring.rule}


def _overlay(path: Path, planes: Sequence[Plane], title: str, window: tuple[float, float] | None) -> None:
    """Write the overlay PNG: each plane with its edge letters, and one colour bar for the map's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 if len(planes) <= 2 else 2
    cols = len(planes) if rows == 1 else len(planes) - 3
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols if rows == 1 else 2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    slots = list(axes[0][: len(planes)]) if rows == 1 else [*axes[0][:3], *axes[1]]
    shown = None
    for ax, plane in zip(slots, planes, strict=False):
        lo, hi = window if window is not None else tuple(np.percentile(plane.image, (1, 99)))
        ax.imshow(plane.image, cmap="gray", vmin=lo, vmax=hi, origin="upper", aspect=plane.aspect)
        shown = ax.imshow(np.ma.masked_less(plane.heat, 0.2), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                          origin="upper", aspect=plane.aspect)
        ax.set_title(plane.label, fontsize=8)
        for text, xy, align in zip(plane.edges, ((0.01, 0.5), (0.99, 0.5), (0.5, 0.99), (0.5, 0.01)),
                                   (("left", "center"), ("right", "center"), ("center", "top"),
                                    ("center", "bottom")), strict=True):
            if text:
                ax.text(*xy, text, transform=ax.transAxes, ha=align[0], va=align[1], color="yellow", fontsize=9,
                        fontweight="bold")
    if shown is not None:
        bar = fig.colorbar(shown, ax=list(axes.flat), fraction=0.02, pad=0.01)
        bar.set_label("saliency × probability (below 0.2 not shown)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def explain(workspace: Path, model_path: Path, out: Path, *, split: str | None = "test", study: str | None = None,
            methods: Sequence[Method] = (), dicom: bool = False,
            on_study: Callable[[int, int, str], None] | None = None,
            placement: Placement | None = None) -> dict[str, Any]:
    """Write saliency maps of ``model_path`` for a split's studies (or one study) of the site's task.

    Args:
        workspace: The site workspace.
        model_path: A ``model.pt`` (local run, federated checkpoint or global model).
        out: Output folder.
        split: ``train``, ``val`` or ``test`` (ignored when ``study`` is given).
        study: One StudyInstanceUID.
        methods: Saliency methods (none: the task's own, :func:`models.methods.default_method`).
        dicom: Also write each map as DICOM on the source grid (Parametric Map of a volume, key images).
        on_study: Called as ``on_study(done, total, study uid)`` after each image.
        placement: Where the model runs (default the CPU).

    Raises:
        ExplainError: The model file, the task's data or the study is missing, or the model is a segmentation model.
        WeightsError: The model file is not an oncofed model.
    """
    explainer = Explainer.load(model_path, placement=placement)
    model_sha256, task = explainer.sha256, explainer.task
    methods = tuple(methods) or (default_method(task),)
    if explainer.segmentation:
        raise ExplainError(f"{model_path} is a {task} lesion segmentation model: 'oncofed-site explain' draws a "
                           "classifier's saliency maps; for this model's lesion masks (DICOM SEG) use "
                           "'oncofed-site predict'")
    try:
        data = load_site_data([workspace], task, resolution=explainer.resolution)
    except NoSiteData as exc:
        raise ExplainError(str(exc)) from None
    splits = [s for s in ("train", "val", "test", "unassigned") if data.count(s)]
    chosen: list[tuple[str, int]] = []  # (split, index in that split's dataset)
    for s in splits:
        for i, uid in enumerate(data.study_uids(s)):
            if (study is not None and uid == study) or (study is None and s == split):
                chosen.append((s, i))
    if not chosen:
        what = f"study {study}" if study else f"the {split} split"
        raise ExplainError(f"no labelled image of {what} for task {task} in {workspace}: "
                           "see 'oncofed-site status' for what the site holds")
    out.mkdir(parents=True, exist_ok=True)
    datasets = {s: data.dataset(s, train=False) for s in {s for s, _ in chosen}}
    images_of = Counter(data.items[s][i][1].study_uid for s, i in chosen)
    records = []
    preset = explainer.preset
    for n, (s, i) in enumerate(chosen, start=1):
        _, item = data.items[s][i]
        image, _ = datasets[s][i]
        folder = out / item.study_uid
        folder.mkdir(exist_ok=True)
        entry: dict[str, Any] = {"study_uid": item.study_uid, "series_uid": item.plan.series_uid,
                                 "image": item.plan.key, "split": s, "label": item.label, "task": task, "maps": {}}
        source = read_image(item.plan).array
        for method in methods:
            explained = explainer.explain(image, method, plan=item.plan)
            result, on_source = explained.result, explained.on_source
            assert on_source is not None  # a plan was given
            # A mammography study has two views: their files are told apart by the image's key.
            stem = f"{method.value}-{item.plan.key[-12:]}" if images_of[item.study_uid] > 1 else method.value
            np.save(folder / f"{stem}.npy", result.map)
            png = folder / f"{stem}.png"
            side = f" · {item.plan.laterality} {item.plan.view}" if item.plan.laterality else ""
            _overlay(png, overlay_planes(source, on_source, item.plan, probability=result.probability),
                     f"{task} · {method.value} · p = {result.probability:.2f} · label {item.label}{side}",
                     preset.window)
            entry["probability"] = result.probability
            calls = explainer.scoring.calls([result.logit])
            entry["call"] = None if calls is None else calls[0]
            entry["maps"][method.value] = {"map": str((folder / f"{stem}.npy").relative_to(out)),
                                           "png": str(png.relative_to(out)),
                                           "peak": [int(v) for v in np.unravel_index(int(np.argmax(result.map)),
                                                                                     result.map.shape)],
                                           "layer": result.layer, "seconds": result.seconds}
            if dicom:
                objects = write_saliency_objects(
                    item.plan, on_source, source, folder / "dicom",
                    method=method.value, probability=result.probability, model_sha256=model_sha256, task=task,
                    window=preset.window)
                entry["maps"][method.value]["dicom"] = [str(p.relative_to(out)) for p in objects.paths]
                entry["maps"][method.value]["dicom_series"] = list(objects.series_uids)
        records.append(entry)
        if on_study is not None:
            on_study(n, len(chosen), item.study_uid)
    doc = {"schema": SCHEMA, "model": str(model_path), "model_sha256": model_sha256, "task": task,
           "created": time.time(), "scoring": _scoring_doc(explainer.scoring),
           "methods": [m.value for m in methods], "images": records}
    (out / "explain.json").write_text(json.dumps(doc, indent=1))
    return doc

"""Lesion masks of a segmentation model on the site's own studies, back to the radiologist as DICOM SEG.

For each image of a ``*-seg`` task (a split's, all of them, or one study's): the network input as in training,
MONAI's sliding-window lesion probabilities (:meth:`fl_client.explainer.Explainer.lesion_probabilities`), carried
back onto the image's own DICOM grid and thresholded at 0.5 (:func:`imaging.seg_dicom.predicted_mask`), without the
lesions smaller than the task's smallest reported lesion (``min_lesion_mm`` of its preset, e.g. 10 mm for colorectal
CT: :func:`fl_client.metrics.without_small_lesions`), then written into ``OUT/study-<hash>/`` (a hash of the
StudyInstanceUID: no UID or patient data in a file or folder name):

- ``seg-<hash>.dcm``: the mask as a DICOM Segmentation on the source series (:mod:`imaging.seg_dicom`); an image
  without a predicted lesion still gets one, which says so;
- ``overlay-<hash>.png``: the slices with the most lesion (the image of a mammogram), the predicted outline in
  orange and, where the study has a reference annotation, its outline in cyan, with a legend;

and one entry per image in ``OUT/predictions.json`` (schema ``oncofed.predict/1``): study, series and split, the
predicted lesion's voxels, connected lesions (18-connected in a volume, 8 in a 2D image, as in evaluation) and size
(``volume_ml`` of a volume, ``area_cm2`` of a 2D image), the highest voxel probability, and where a reference
annotation exists its voxels, lesions and the Dice of the prediction against it on the DICOM grid (none when the
reference holds no lesion); the SEG's file and UIDs, the PNG and the seconds it took. Nothing leaves the site,
unless :func:`store` sends the SEG objects to the site's own PACS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_client.explainer import Explainer
from fl_client.metrics import without_small_lesions
from imaging.catalog import Catalog, Item
from imaging.dicom import ImagePlan, read_image
from imaging.errors import DicomError
from imaging.pacs import StoredObject
from imaging.presets import TaskPreset
from imaging.seg_dicom import SegDicomError, predicted_mask, short_hash, write_lesion_segmentation
from models.device import Placement

__all__ = [
    "PREDICTED_COLOUR",
    "REFERENCE_COLOUR",
    "SPLITS",
    "LesionSummary",
    "PredictError",
    "contour_overlay",
    "dice",
    "lesion_slices",
    "lesion_summary",
    "predict",
    "reference_mask",
    "reported_mask",
    "store",
    "study_folder",
]

SCHEMA = "oncofed.predict/1"
THRESHOLD = 0.5
SPLITS = ("train", "val", "test", "unassigned", "all")
PREDICTED_COLOUR = "#ff9f1c"  # orange: the model's outline (the review page uses the same colours)
REFERENCE_COLOUR = "#2ec4ff"  # cyan: the reference annotation's outline


class PredictError(Exception):
    """Nothing to predict, or a bad request; the message says what to do."""


@dataclass(frozen=True)
class LesionSummary:
    """How much lesion a mask holds, on its image's DICOM grid.

    Attributes:
        voxels: Lesion voxels (pixels of a 2D image).
        lesions: Connected lesions (18-connected in a volume, 8-connected in a 2D image).
        size: The lesion's volume in ml (a volume) or its area in cm² (a 2D image).
        unit: ``ml`` or ``cm²``.
    """

    voxels: int
    lesions: int
    size: float
    unit: str

    @property
    def text(self) -> str:
        """The size in words, e.g. ``1.25 ml``."""
        return f"{self.size:.2f} {self.unit}"


def reported_mask(probabilities: np.ndarray, plan: ImagePlan, preset: TaskPreset) -> np.ndarray:
    """The lesions a site reports for an image: the probabilities on its DICOM grid cut at :data:`THRESHOLD`
    (:func:`imaging.seg_dicom.predicted_mask`), without those below the task's smallest lesion
    (:func:`fl_client.metrics.without_small_lesions`). What ``predict`` writes and the review page outlines."""
    return without_small_lesions(predicted_mask(probabilities, plan, preset, threshold=THRESHOLD),
                                 spacing=plan.spacing, min_diameter_mm=preset.min_lesion_mm)


def lesion_summary(mask: np.ndarray, plan: ImagePlan) -> LesionSummary:
    """The voxels, connected lesions and size (ml, or cm² for a 2D image) of a mask on ``plan``'s grid."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    voxels = int(mask.sum())
    lesions = int(ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 2))[1]) if voxels else 0
    cell = float(np.prod(plan.spacing))
    if plan.spatial_dims == 3:
        return LesionSummary(voxels, lesions, voxels * cell / 1000.0, "ml")
    return LesionSummary(voxels, lesions, voxels * cell / 100.0, "cm²")


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """The Dice coefficient of two masks of one grid; None when the reference holds no lesion."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not ref.any():
        return None
    return float(2.0 * np.count_nonzero(pred & ref) / (np.count_nonzero(pred) + np.count_nonzero(ref)))


def reference_mask(item: Item) -> np.ndarray | None:
    """An image's reference annotation on its DICOM grid: its mask file; an empty mask for a study labelled 0
    without annotation; None when unknown.

    Raises:
        PredictError: The mask file does not fit its image (the message names it and says to re-ingest).
    """
    if item.mask is None:
        return np.zeros(item.plan.shape, bool) if item.label == 0 else None
    with np.load(item.mask) as npz:
        mask = np.asarray(npz["mask"]) > 0
    if mask.shape != tuple(item.plan.shape):
        raise PredictError(f"lesion mask {item.mask} is {mask.shape}, its image {tuple(item.plan.shape)}: re-ingest "
                           "the annotation (oncofed-site ingest)")
    return mask


def study_folder(out: Path, study_uid: str) -> Path:
    """Where an image's outputs go: ``OUT/study-<hash of the StudyInstanceUID>``."""
    return out / f"study-{short_hash(study_uid)}"


def lesion_slices(pred: np.ndarray, ref: np.ndarray | None, count: int) -> list[int]:
    """The ``count`` slices (first axis) with the most predicted lesion, then with the most reference annotation, in
    slice order; evenly spaced inner slices (the middle one for ``count=1``) when neither mask holds any.

    Args:
        pred: The predicted mask, ``(slices, rows, cols)``.
        ref: The reference mask, same shape, or None.
        count: How many slices.

    Returns:
        Slice indices, ascending.
    """
    weight = pred.reshape(pred.shape[0], -1).sum(1).astype(np.float64)
    if ref is not None:  # reference voxels only break ties and fill up slices without prediction
        weight += ref.reshape(ref.shape[0], -1).sum(1) / (1.0 + ref.size) * 0.5
    if not weight.any():
        inner = np.linspace(0, pred.shape[0] - 1, min(count, pred.shape[0]) + 2)[1:-1]
        return sorted({int(k) for k in inner.round()})
    return sorted(int(k) for k in np.argsort(-weight, kind="stable")[:count] if weight[k] > 0)


def contour_overlay(path: Path, image: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, plan: ImagePlan, *,
                    title: str, window: tuple[float, float] | None, count: int = 4) -> list[int]:
    """Write a PNG of the slices with the most lesion: the predicted outline and, when given and not empty, the
    reference annotation's outline, in their colours, with a legend.

    Args:
        path: The PNG to write.
        image: Modality values on the DICOM grid, ``(slices, rows, cols)`` or ``(rows, cols)``.
        pred: The predicted mask, same shape.
        ref: The reference mask, same shape, or None.
        plan: The image (its spacing keeps the anatomy's shape).
        title: The figure's title (no UID or patient data).
        window: Grey window (CT HU) or None for the 1st-99th percentile.
        count: Slices of a volume to show.

    Returns:
        The slices shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    image3, pred3 = (image[None], pred[None]) if image.ndim == 2 else (image, pred)
    ref3 = None if ref is None or not np.any(ref) else (ref[None] if ref.ndim == 2 else ref)
    shown = lesion_slices(pred3, ref3, count)
    lo, hi = window if window is not None else tuple(np.percentile(image3[shown], (1, 99)))
    aspect = plan.spacing[-2] / plan.spacing[-1]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.9), squeeze=False)
    for ax, k in zip(axes[0], shown, strict=True):
        ax.imshow(image3[k], cmap="gray", vmin=lo, vmax=hi, origin="upper", aspect=aspect)
        for mask, colour in ((ref3, REFERENCE_COLOUR), (pred3, PREDICTED_COLOUR)):
            if mask is not None and mask[k].any():
                ax.contour(mask[k].astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title("image" if image.ndim == 2 else f"slice {k + 1} of {image3.shape[0]}", fontsize=8)
        ax.axis("off")
    handles = [Line2D([], [], color=PREDICTED_COLOUR, label="predicted lesion (model)")]
    if ref3 is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOUR, label="reference annotation"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return shown


def _items(workspace: Path, task: str, *, split: str, study: str | None) -> list[Item]:
    try:
        catalog = Catalog.open(workspace, create=False)
    except FileNotFoundError as exc:
        raise PredictError(str(exc)) from None
    with catalog:
        items = catalog.items(task, labelled_only=False)
    if study is not None:
        chosen = [i for i in items if i.study_uid == study]
    else:
        chosen = [i for i in items if split == "all" or (i.split or "unassigned") == split]
    if not chosen:
        what = f"study {study}" if study else "any split" if split == "all" else f"the {split} split"
        raise PredictError(f"no usable image of {what} for task {task} in {workspace}: see 'oncofed-site status' "
                           "for what the site holds")
    return chosen


def predict(workspace: Path, model_path: Path, out: Path, *, split: str = "test", study: str | None = None,
            on_study: Callable[[int, int, str], None] | None = None, placement: Placement | None = None,
            slices: int = 4) -> dict[str, Any]:
    """Write the lesion masks a segmentation model predicts for the site's images (see the module's docstring).

    Args:
        workspace: The site workspace.
        model_path: A ``model.pt`` of a ``*-seg`` task (local run, federated checkpoint or global model).
        out: Output folder.
        split: ``train``, ``val``, ``test``, ``unassigned`` (studies without a split: not labelled yet) or ``all``
            (ignored when ``study`` is given).
        study: One StudyInstanceUID.
        on_study: Called as ``on_study(done, total, study uid)`` after each image.
        placement: Where the model runs (default the CPU).
        slices: Slices of a volume in its overlay PNG.

    Returns:
        The document written to ``OUT/predictions.json``.

    Raises:
        PredictError: A classification model, an unknown split, no catalog, or no image to predict.
        WeightsError: The model file is not an oncofed model.
    """
    if split not in SPLITS:
        raise PredictError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    explainer = Explainer.load(model_path, placement=placement)
    task, preset = explainer.task, explainer.preset
    if not explainer.segmentation:
        raise PredictError(f"{model_path} is a {task} classifier: 'oncofed-site predict' outlines lesions with a "
                           "*-seg model; for this model's saliency maps use 'oncofed-site explain'")
    items = _items(workspace, task, split=split, study=study)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, item in enumerate(items, start=1):
        t0 = time.perf_counter()
        folder = study_folder(out, item.study_uid)
        entry: dict[str, Any] = {"study_uid": item.study_uid, "series_uid": item.plan.series_uid,
                                 "image": item.plan.key, "split": item.split or "unassigned", "label": item.label,
                                 "folder": folder.name}
        if item.plan.laterality:
            entry["view"] = f"{item.plan.laterality} {item.plan.view}".strip()
        try:
            probabilities = explainer.lesion_probabilities(explainer.network_input(item, workspace=workspace))
            mask = reported_mask(probabilities, item.plan, preset)
            ref = reference_mask(item)
            seg = write_lesion_segmentation(item.plan, mask, folder, model_sha256=explainer.sha256, task=task,
                                            threshold=THRESHOLD)
            source = read_image(item.plan).array
        except (DicomError, SegDicomError, PredictError) as exc:  # one bad image never stops the others
            entry["error"] = str(exc)
            records.append(entry)
            if on_study is not None:
                on_study(n, len(items), item.study_uid)
            continue
        found = lesion_summary(mask, item.plan)
        score = dice(mask, ref) if ref is not None else None
        title = f"{task} · predicted {found.text if found.voxels else 'no lesion'}" + (
            f" · Dice {score:.2f}" if score is not None else "") + (f" · {entry['view']}" if "view" in entry else "")
        png = folder / f"overlay-{short_hash(item.plan.key)}.png"
        shown = contour_overlay(png, source, mask, ref, item.plan, title=title, window=preset.window, count=slices)
        entry.update({
            "voxels": found.voxels, "lesions": found.lesions,
            "volume_ml": round(found.size, 4) if found.unit == "ml" else None,
            "area_cm2": round(found.size, 4) if found.unit != "ml" else None,
            "max_probability": round(float(probabilities.max()), 4),
            "reference": None if ref is None else {"voxels": int(ref.sum()), **(
                {"lesions": lesion_summary(ref, item.plan).lesions} if ref.any() else {"lesions": 0})},
            "dice": None if score is None else round(score, 4),
            "seg": str(seg.path.relative_to(out)), "seg_series_uid": seg.series_uid,
            "seg_sop_instance_uid": seg.sop_instance_uid, "png": str(png.relative_to(out)),
            "png_slices": shown, "seconds": round(time.perf_counter() - t0, 3)})
        records.append(entry)
        if on_study is not None:
            on_study(n, len(items), item.study_uid)
    doc = {"schema": SCHEMA, "model": str(model_path), "model_sha256": explainer.sha256, "task": task,
           "threshold": THRESHOLD, "created": time.time(), "images": records}
    (out / "predictions.json").write_text(json.dumps(doc, indent=1))
    return doc


def store(workspace: Path, files: Sequence[Path], *, url: str, credentials: Path | None = None) -> list[StoredObject]:
    """Send SEG objects to the site's PACS (STOW-RS) and record them in the site catalog, as ``explain`` does.

    Args:
        workspace: The site workspace (its catalog records what the PACS accepted).
        files: The DICOM files.
        url: The PACS's DICOMweb URL.
        credentials: A credentials file (else the environment's ``ONCOFED_PACS_*``).

    Returns:
        The objects the PACS accepted.

    Raises:
        PacsError: The PACS is unreachable, refuses the credentials or an object.
    """
    from fl_client.pacs_transfer import connect, store_and_record

    pacs = connect(url, credentials=credentials)
    with Catalog.open(workspace) as catalog:
        return store_and_record(pacs, catalog, files)

"""Metrics clinicians read, computed per study with the number of studies behind each figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from models.evaluation import auroc_ci, ece

__all__ = ["LESION_IOU", "BinaryMetrics", "SegMetrics", "StudySegmentation", "auroc", "binary_metrics",
           "merge_segmentation", "segmentation_metrics", "study_scores", "study_segmentation", "without_small_lesions"]

LESION_IOU = 0.1
"""A reference lesion is found when the predicted lesions touching it cover it at this intersection over union
(the overlap criterion of lesion-wise detection metrics; a fixed, stated value)."""


@dataclass(frozen=True)
class BinaryMetrics:
    """Study-level metrics of a binary classifier at a stated threshold.

    ``auroc`` is None when the studies hold only one class (it is undefined then).
    """

    studies: int
    positives: int
    negatives: int
    threshold: float
    auroc: float | None
    sensitivity: float | None
    specificity: float | None
    balanced_accuracy: float | None
    brier: float | None
    loss: float | None = None
    auroc_low: float | None = None  # DeLong 95 % interval
    auroc_high: float | None = None
    ece: float | None = None  # expected calibration error, 10 bins

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics as a plain dict, one entry per field."""
        return asdict(self)


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); None with one class only."""
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def study_scores(study_uids: Sequence[str], labels: Sequence[int], probs: Sequence[float]
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One score per study: the highest image probability (a lesion seen on any view counts)."""
    best: dict[str, float] = {}
    label: dict[str, int] = {}
    for uid, y, p in zip(study_uids, labels, probs, strict=True):
        best[uid] = max(best.get(uid, -1.0), float(p))
        label[uid] = int(y)
    uids = sorted(best)
    return uids, np.array([label[u] for u in uids], int), np.array([best[u] for u in uids], float)


def binary_metrics(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, *,
                   threshold: float = 0.5, loss: float | None = None) -> BinaryMetrics:
    """Metrics of study-level labels and probabilities."""
    y = np.asarray(labels, int)
    p = np.asarray(probs, float)
    pred = p >= threshold
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    sens = float((pred & (y == 1)).sum() / pos) if pos else None
    spec = float((~pred & (y == 0)).sum() / neg) if neg else None
    balanced = (sens + spec) / 2 if sens is not None and spec is not None else None
    ci = auroc_ci(y, p)
    return BinaryMetrics(
        studies=len(y), positives=pos, negatives=neg, threshold=threshold, auroc=auroc(y, p),
        sensitivity=sens, specificity=spec, balanced_accuracy=balanced,
        brier=float(np.mean((p - y) ** 2)) if len(y) else None, loss=loss,
        auroc_low=ci.low if ci else None, auroc_high=ci.high if ci else None, ece=ece(y, p),
    )


@dataclass(frozen=True)
class StudySegmentation:
    """One study's segmentation figures (on the network's grid, voxel size ``spacing``).

    ``dice`` is None for a study without a lesion (judged by its false-positive lesions instead); ``hd95`` is None
    unless both the reference and the prediction have a voxel.
    """

    dice: float | None
    hd95: float | None
    lesions: int
    found: int
    false_positives: int


def without_small_lesions(mask: np.ndarray, *, spacing: Sequence[float], min_diameter_mm: float) -> np.ndarray:
    """``mask`` without its connected components (face and edge neighbours, as :func:`study_segmentation` counts
    lesions) smaller than a sphere (3D) or disk (2D) of ``min_diameter_mm``; voxel size ``spacing`` in mm.

    Returns:
        A new boolean mask (``mask`` itself, as booleans, when ``min_diameter_mm`` is 0).
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if min_diameter_mm <= 0 or not mask.any():
        return mask
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} for a {mask.ndim}D mask")
    d = float(min_diameter_mm)
    smallest = np.pi * d ** 3 / 6 if mask.ndim == 3 else np.pi * d ** 2 / 4
    voxels = smallest / float(np.prod(spacing))
    labels, n = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 2))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= voxels
    keep[0] = False
    return keep[labels]


def study_segmentation(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float]) -> StudySegmentation:
    """Compare a predicted mask with the reference of one study (boolean arrays of one shape, 2D or 3D).

    Lesions are connected components (face and edge neighbours). A reference lesion is found when the predicted
    components touching it have an IoU of at least :data:`LESION_IOU` with it; a predicted component touching
    no reference lesion is a false positive. HD95 is the 95th percentile of the symmetric surface distance in mm.
    """
    from scipy import ndimage

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    structure = ndimage.generate_binary_structure(ref.ndim, 2)
    ref_labels, n_ref = ndimage.label(ref, structure)
    pred_labels, n_pred = ndimage.label(pred, structure)
    found = 0
    for k in range(1, n_ref + 1):
        lesion = ref_labels == k
        touching = np.setdiff1d(np.unique(pred_labels[lesion]), [0])
        if len(touching):
            covered = np.isin(pred_labels, touching)
            iou = (covered & lesion).sum() / (covered | lesion).sum()
            found += int(iou >= LESION_IOU)
    fp = sum(1 for k in range(1, n_pred + 1) if not ref[pred_labels == k].any())
    dice = None
    if n_ref:
        dice = float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    hd95 = None
    if n_ref and pred.any():
        import torch
        from monai.metrics import compute_hausdorff_distance

        hd = compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None]),
                                        include_background=True, percentile=95, spacing=list(spacing))
        hd95 = float(hd.reshape(-1)[0])
    return StudySegmentation(dice, hd95, n_ref, found, fp)


@dataclass(frozen=True)
class SegMetrics:
    """Lesion segmentation metrics of a split, with the counts behind each.

    Attributes:
        studies: Studies evaluated.
        positives: Studies with a reference lesion (the ``dice`` and ``hd95`` means run over these).
        negatives: Studies without one.
        dice: Mean Dice over ``positives`` (None without one).
        lesions: Reference lesions.
        lesion_sensitivity: Lesions found / ``lesions`` (None without a lesion).
        fp_lesions: False-positive lesions per study.
        hd95: Mean HD95 (mm) over the positive studies with a prediction (None if there is none).
        loss: The segmentation loss on the split.
        threshold: The probability above which a voxel is lesion.
        hd95_studies: The studies ``hd95`` averages (a local count: it makes merging exact, and is not sent).
    """

    studies: int
    positives: int
    negatives: int
    dice: float | None
    lesions: int
    lesion_sensitivity: float | None
    fp_lesions: float | None
    hd95: float | None
    loss: float | None = None
    threshold: float = 0.5
    hd95_studies: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics as a plain dict, one entry per field."""
        return asdict(self)


def segmentation_metrics(studies: Sequence[StudySegmentation], *, loss: float | None = None,
                         threshold: float = 0.5) -> SegMetrics:
    """Aggregate per-study figures of one split."""
    positive = [s for s in studies if s.lesions > 0]
    dice = [s.dice for s in positive if s.dice is not None]
    hd = [s.hd95 for s in positive if s.hd95 is not None and np.isfinite(s.hd95)]
    lesions = sum(s.lesions for s in studies)
    return SegMetrics(
        studies=len(studies), positives=len(positive), negatives=len(studies) - len(positive),
        dice=float(np.mean(dice)) if dice else None, lesions=lesions,
        lesion_sensitivity=sum(s.found for s in studies) / lesions if lesions else None,
        fp_lesions=sum(s.false_positives for s in studies) / len(studies) if studies else None,
        hd95=float(np.mean(hd)) if hd else None, loss=loss, threshold=threshold, hd95_studies=len(hd))


def merge_segmentation(parts: Sequence[SegMetrics]) -> SegMetrics | None:
    """The metrics of several disjoint sets of studies (splits, sites) together, as :func:`segmentation_metrics` gives
    them on all the studies at once: Dice weighted by positive studies, sensitivity by lesions, false positives by
    studies, HD95 by the studies each part averaged it over (``hd95_studies``; a part that does not say, such as one
    rebuilt from a site's metrics, keeps HD95 only when it is the only part with one). The loss is kept only when a
    single part has it (a part does not say how many images it averaged it over), else None. None for no parts; the
    parts must share their threshold."""
    if not parts:
        return None
    if len({p.threshold for p in parts}) != 1:
        raise ValueError("merge_segmentation: the parts were scored at different thresholds")
    studies = sum(p.studies for p in parts)
    positives = sum(p.positives for p in parts)
    lesions = sum(p.lesions for p in parts)
    with_dice = [p for p in parts if p.dice is not None]
    with_hd = [p for p in parts if p.hd95 is not None]
    hd_weight = sum(p.hd95_studies for p in with_hd)
    hd95: float | None = None
    if len(with_hd) == 1:
        hd95 = with_hd[0].hd95
    elif with_hd and all(p.hd95_studies > 0 for p in with_hd):
        hd95 = sum(p.hd95 * p.hd95_studies for p in with_hd) / hd_weight  # type: ignore[operator]
    with_loss = [p.loss for p in parts if p.loss is not None]
    weight = sum(p.positives for p in with_dice)
    return SegMetrics(
        studies=studies, positives=positives, negatives=studies - positives,
        dice=sum(p.dice * p.positives for p in with_dice) / weight if weight else None,  # type: ignore[operator]
        lesions=lesions,
        lesion_sensitivity=(sum((p.lesion_sensitivity or 0.0) * p.lesions for p in parts) / lesions
                            if lesions else None),
        fp_lesions=sum((p.fp_lesions or 0.0) * p.studies for p in parts) / studies if studies else None,
        hd95=hd95, loss=with_loss[0] if len(with_loss) == 1 else None,
        threshold=parts[0].threshold, hd95_studies=hd_weight if hd95 is not None else 0)

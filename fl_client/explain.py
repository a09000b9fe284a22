"""Saliency maps of a model on the site's own studies, written into a folder at the site.

Per study (``OUT/<study uid>/``): ``<method>.npy`` (the map at the network's input grid, float32 in
[0, 1]), ``<method>.png`` (the overlay: the image and the map; for volumes the three planes through
the map's peak and a strip of axial slices), and one line in ``OUT/explain.json`` (schema
``oncofed.explain/1``: study, series, split, label, the model's probability, per method the map
file, the PNG, its peak voxel and the seconds it took). Nothing leaves the site.

With ``dicom=True`` (the CLI's default) each map is also carried back onto the source series' own grid
and written as DICOM under ``OUT/<study uid>/dicom/``: a Parametric Map for a volume and RGB key images
(:mod:`imaging.saliency_dicom`), listed in ``explain.json`` with their series UIDs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.train import TrainingError, load_site_data
from imaging.dicom import read_image
from imaging.presets import get_preset
from imaging.saliency_dicom import write_saliency_objects
from imaging.transforms import network_to_source
from models.config import from_flat
from models.nets import build_model
from models.saliency import Method, layer_grid, saliency, target_layer
from models.weights import load_arrays, load_checkpoint

SCHEMA = "oncofed.explain/1"


class ExplainError(Exception):
    """Nothing to explain, or a bad request; the message says what to do."""


def _overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(ax: Any, img: np.ndarray, hm: np.ndarray, label: str) -> None:
        ax.imshow(img.T, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_less(hm.T, 0.2), cmap="jet", alpha=0.45, vmin=0, vmax=1, origin="lower")
        ax.set_title(label, fontsize=8)
        ax.axis("off")

    if image.ndim == 2:
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        axes[0].imshow(image.T, cmap="gray", origin="lower")
        axes[0].set_title("image", fontsize=8)
        axes[0].axis("off")
        show(axes[1], image, heat, "saliency")
    else:
        i, j, k = np.unravel_index(int(np.argmax(heat)), heat.shape)
        strip = np.linspace(0, image.shape[2] - 1, 8).round().astype(int)
        fig, axes = plt.subplots(2, 8, figsize=(16, 4.6))
        for ax in axes[0][3:]:
            ax.axis("off")
        show(axes[0][0], image[:, :, k], heat[:, :, k], f"axial {k} (peak)")
        show(axes[0][1], image[:, j, :], heat[:, j, :], f"coronal {j} (peak)")
        show(axes[0][2], image[i, :, :], heat[i, :, :], f"sagittal {i} (peak)")
        for ax, z in zip(axes[1], strip, strict=True):
            show(ax, image[:, :, z], heat[:, :, z], f"axial {z}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def explain(workspace: Path, model_path: Path, out: Path, *, split: str | None = "test", study: str | None = None,
            methods: Sequence[Method] = (Method.GRADCAM,), dicom: bool = False,
            on_study: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Write saliency maps of ``model_path`` for a split's studies (or one study) of the site's task.

    Args:
        workspace: The site workspace.
        model_path: A ``model.pt`` (local run, federated checkpoint or global model).
        out: Output folder.
        split: ``train``, ``val`` or ``test`` (ignored when ``study`` is given).
        study: One StudyInstanceUID.
        methods: Saliency methods.
        dicom: Also write each map as DICOM on the source grid (Parametric Map of a volume, key images).
        on_study: Called as ``on_study(done, total, study uid)`` after each image.

    Raises:
        ExplainError: The model file, the task's data or the study is missing.
        WeightsError: The model file is not an oncofed model.
    """
    arrays, run_config, _ = load_checkpoint(model_path)
    model_sha256 = file_sha256(model_path)
    config = from_flat(run_config)
    task = config.model.task
    model = build_model(config.model)
    load_arrays(model, arrays)
    model.eval()
    try:
        data = load_site_data([workspace], task)
    except TrainingError as exc:
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
    layer: str | None = None
    grid: tuple[tuple[float, float], ...] | None = None
    preset = get_preset(task)
    for n, (s, i) in enumerate(chosen, start=1):
        _, item = data.items[s][i]
        image, _ = datasets[s][i]
        folder = out / item.study_uid
        folder.mkdir(exist_ok=True)
        entry: dict[str, Any] = {"study_uid": item.study_uid, "series_uid": item.plan.series_uid,
                                 "image": item.plan.key, "split": s, "label": item.label, "task": task, "maps": {}}
        source = read_image(item.plan).array if dicom else None
        for method in methods:
            if layer is None and method != Method.OCCLUSION:
                layer = target_layer(model, tuple(image.shape))  # once per run, not per image
                grid = layer_grid(model, layer, tuple(image.shape))
            with torch.enable_grad():
                result = saliency(model, image, method, layer=layer, grid=grid)
            # A mammography study has two views: their files are told apart by the image's key.
            stem = f"{method.value}-{item.plan.key[-12:]}" if images_of[item.study_uid] > 1 else method.value
            np.save(folder / f"{stem}.npy", result.map)
            png = folder / f"{stem}.png"
            _overlay(png, image[0].numpy(), result.map,
                     f"{task} · {method.value} · p = {result.probability:.2f} · label {item.label}")
            entry["probability"] = result.probability
            entry["maps"][method.value] = {"map": str((folder / f"{stem}.npy").relative_to(out)),
                                           "png": str(png.relative_to(out)),
                                           "peak": [int(v) for v in np.unravel_index(int(np.argmax(result.map)),
                                                                                     result.map.shape)],
                                           "layer": result.layer, "seconds": result.seconds}
            if source is not None:
                objects = write_saliency_objects(
                    item.plan, network_to_source(result.map, item.plan, preset), source, folder / "dicom",
                    method=method.value, probability=result.probability, model_sha256=model_sha256, task=task,
                    window=preset.window)
                entry["maps"][method.value]["dicom"] = [str(p.relative_to(out)) for p in objects.paths]
                entry["maps"][method.value]["dicom_series"] = list(objects.series_uids)
        records.append(entry)
        if on_study is not None:
            on_study(n, len(chosen), item.study_uid)
    doc = {"schema": SCHEMA, "model": str(model_path), "model_sha256": model_sha256, "task": task,
           "created": time.time(),
           "methods": [m.value for m in methods], "images": records}
    (out / "explain.json").write_text(json.dumps(doc, indent=1))
    return doc



def file_sha256(path: Path) -> str:
    """SHA-256 of a file (the model's identity in outputs and review verdicts)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

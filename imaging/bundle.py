"""A task preset's preprocessing as a MONAI bundle: the ``inference.json`` that MONAI's own runner executes.

The config reproduces :func:`imaging.transforms.deterministic_transforms` with MONAI transforms where MONAI has
the step (``LoadImaged`` with ``PydicomReader`` on a series folder, ``EnsureChannelFirstd``, ``Orientationd``,
``Spacingd``, ``ScaleIntensityRanged``, ``ResizeWithPadOrCropd``, ``EnsureTyped``) and references oncofed's own
transforms by ``_target_`` where it has not (``LungFieldd``, ``FindPectorald``/``RemovePectorald``, ``CalibrateHUd``,
``SuppressBrightd``, ``RobustScaled``, ``EnhanceCalcificationsd``): a hospital
running such a bundle needs oncofed installed.

MONAI's ``PydicomReader`` returns a series as ``(cols, rows, slices)`` with a RAS affine, the same array and
affine as :func:`imaging.transforms.to_meta_tensor` makes from oncofed's reader; after ``Orientationd`` both
pipelines hold the same voxels (a test compares them).

Mammography (2D) is read by oncofed's ``LoadDicomImaged`` instead, one image per file of the input folder:
MONAI's reader gives a mammogram no pixel spacing (it has no patient position or orientation) and reads every
image of a folder as one volume. The image's laterality goes to ``FlipToLateralityd`` (oncofed's mirror to the
preset's canonical side) before resampling, as in training.
"""

from __future__ import annotations

from typing import Any

from imaging.presets import (
    BONE_HU,
    BRIGHT_MEDIAN,
    FAT_MAX_SHIFT_HU,
    SUPPRESS_FILL_HU,
    Intensity,
    TaskPreset,
    get_preset,
)

__all__ = ["BundleError", "inference_config", "preprocessing_summary"]

_ONCOFED_TRANSFORMS = {"load_2d": "imaging.transforms.LoadDicomImaged",
                       "laterality": "imaging.transforms.FlipToLateralityd",
                       "lung_field": "imaging.transforms.LungFieldd",
                       "find_pectoral": "imaging.transforms.FindPectorald",
                       "remove_pectoral": "imaging.transforms.RemovePectorald",
                       "calcifications": "imaging.transforms.EnhanceCalcificationsd",
                       "calibrate": "imaging.transforms.CalibrateHUd",
                       "suppress": "imaging.transforms.SuppressBrightd",
                       "robust": "imaging.transforms.RobustScaled"}


class BundleError(ValueError):
    """A task whose preprocessing cannot be written as a bundle config; the message says why."""


def _preset(task: str, resolution: str) -> TaskPreset:
    preset = get_preset(task, resolution)
    if preset.segmentation:
        raise BundleError(f"task {task}: segmentation models are not exported as MONAI bundles yet; use the run's "
                          "model.pt with 'oncofed-site predict' at the site, which writes DICOM SEG")
    if preset.spatial_dims == 3 and preset.canonical_laterality:
        raise BundleError(f"task {task}: a laterality mirror on volumes has no bundle form yet")
    return preset


def _preprocessing(preset: TaskPreset) -> list[dict[str, Any]]:
    """The bundle's preprocessing transforms, in the order of :func:`imaging.transforms.deterministic_transforms`."""
    keys = ["image"]
    steps: list[dict[str, Any]]
    if preset.spatial_dims == 3:
        steps = [{"_target_": "monai.transforms.LoadImaged", "keys": keys, "reader": "PydicomReader",
                  "image_only": True},
                 {"_target_": "monai.transforms.EnsureChannelFirstd", "keys": keys},
                 {"_target_": "monai.transforms.Orientationd", "keys": keys, "axcodes": "RAS", "labels": None}]
    else:
        steps = [{"_target_": _ONCOFED_TRANSFORMS["load_2d"], "keys": keys}]
    if preset.canonical_laterality:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["laterality"], "keys": keys,
                      "canonical": preset.canonical_laterality})
    steps.append({"_target_": "monai.transforms.Spacingd", "keys": keys, "pixdim": list(preset.target_spacing),
                  "mode": "bilinear", "padding_mode": "border"})
    if preset.lung_field:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["lung_field"], "keys": keys})
    if preset.remove_pectoral:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["find_pectoral"], "keys": keys})
    # The steps' other settings are written out too, so the bundle runs as trained whatever oncofed's defaults become.
    if preset.fat_reference_hu is not None:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["calibrate"], "keys": keys,
                      "reference": preset.fat_reference_hu, "max_shift": FAT_MAX_SHIFT_HU})
    if preset.suppress_above_hu is not None:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["suppress"], "keys": keys,
                      "threshold": preset.suppress_above_hu, "fill": SUPPRESS_FILL_HU, "dilate": 1,
                      "median": BRIGHT_MEDIAN, "bone": BONE_HU})
    if preset.intensity is Intensity.CT_WINDOW:
        if preset.window is None:
            raise BundleError(f"preset {preset.name}: a CT window is required for {preset.intensity}")
        lo, hi = preset.window
        steps.append({"_target_": "monai.transforms.ScaleIntensityRanged", "keys": keys, "a_min": lo, "a_max": hi,
                      "b_min": 0.0, "b_max": 1.0, "clip": True})
    else:
        mode = "zscore" if preset.intensity is Intensity.MR_ZSCORE else "range"
        steps.append({"_target_": _ONCOFED_TRANSFORMS["robust"], "keys": keys, "lower": preset.percentiles[0],
                      "upper": preset.percentiles[1], "mode": mode})
    if preset.remove_pectoral:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["remove_pectoral"], "keys": keys})
    if preset.calcification_gain:
        steps.append({"_target_": _ONCOFED_TRANSFORMS["calcifications"], "keys": keys,
                      "gain": preset.calcification_gain, "size": preset.calcification_size})
    steps.append({"_target_": "monai.transforms.ResizeWithPadOrCropd", "keys": keys,
                  "spatial_size": list(preset.spatial_size), "mode": "constant"})
    steps.append({"_target_": "monai.transforms.EnsureTyped", "keys": keys, "dtype": "$torch.float32",
                  "track_meta": False})
    return steps


def inference_config(task: str, resolution: str = "cpu", *,
                     calibration: tuple[float, float] | None = None) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``: read one DICOM series folder (volume tasks) or every DICOM file
    under a folder, one image each (2D tasks: the views of a mammography study), preprocess as the task's preset
    does, run ``models/model.ts`` and write ``probabilities.json`` (``[{"image", "probability"}]``, one entry per
    series or image) to ``output_dir``. The probability is ``sigmoid(calibration_slope × logit +
    calibration_intercept)`` (1 and 0 without a calibration), as the run's sites show it.

    Args:
        task: The task preset's name.
        resolution: The resolution profile the network was trained at (``cpu`` or ``diagnostic``).
        calibration: The run's recalibration of the logit, ``(slope, intercept)``, or None.

    Returns:
        The config as a JSON-ready dict (``input_dir`` is empty: pass ``--input_dir`` to the runner).

    Raises:
        BundleError: A task whose preprocessing has no bundle form.
        KeyError: An unknown task.
        ValueError: An unknown resolution profile.
    """
    preset = _preset(task, resolution)
    write = ("$json.dump([{'image': str(d['image']), 'probability': float(torch.sigmoid(@calibration_slope * "
             "@network(s['image'][None].to(@device)).float() + @calibration_intercept).reshape(-1)[0])} "
             "for d, s in zip(@datalist, @dataset)], open(os.path.join(@output_dir, 'probabilities.json'), 'w'), "
             "indent=1)")
    slope, intercept = calibration if calibration is not None else (1.0, 0.0)
    return {
        "imports": ["$import os", "$import json", "$import pathlib", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "save_execute_config": False,
        "calibration_slope": float(slope),
        "calibration_intercept": float(intercept),
        "datalist": [{"image": "@input_dir"}] if preset.spatial_dims == 3 else
        "$[{'image': str(p)} for p in sorted(pathlib.Path(@input_dir).rglob('*')) if p.is_file() and "
        "p.name != 'DICOMDIR'] if os.path.isdir(@input_dir) else [{'image': @input_dir}]",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device).eval()",
        "preprocessing": {"_target_": "monai.transforms.Compose", "transforms": _preprocessing(preset)},
        "dataset": {"_target_": "monai.data.Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "initialize": ["$torch.set_grad_enabled(False)", "$os.makedirs(@output_dir, exist_ok=True)"],
        "run": [write],
        "finalize": [],
    }


def preprocessing_summary(task: str, resolution: str = "cpu") -> dict[str, Any]:
    """What the model card says about a task's preprocessing: modality, voxel size, input size, field of view,
    intensity normalisation and the oncofed transforms the bundle references.

    Args:
        task: The task preset's name.
        resolution: The resolution profile.

    Returns:
        A JSON-ready dict.

    Raises:
        BundleError: A task that cannot be exported yet.
    """
    preset = _preset(task, resolution)
    oncofed = [s["_target_"] for s in _preprocessing(preset) if not s["_target_"].startswith("monai.")]
    return {
        "task": preset.name, "title": preset.title, "modality": preset.modality, "spatial_dims": preset.spatial_dims,
        "resolution": resolution, "voxel_size_mm": list(preset.target_spacing),
        "input_size": list(preset.spatial_size),
        "field_of_view_mm": [round(s * n, 1) for s, n in zip(preset.target_spacing, preset.spatial_size, strict=True)],
        "intensity": str(preset.intensity), "window_hu": list(preset.window) if preset.window else None,
        "percentiles": list(preset.percentiles) if preset.intensity is not Intensity.CT_WINDOW else None,
        "lung_field": preset.lung_field, "remove_pectoral": preset.remove_pectoral,
        "calcification_enhancement": {"gain": preset.calcification_gain, "disk_mm": preset.calcification_mm}
        if preset.calcification_gain else None,
        "fat_reference_hu": preset.fat_reference_hu, "suppress_above_hu": preset.suppress_above_hu,
        "oncofed_transforms": oncofed,
    }

"""A trained model at the site and the one per-image saliency pipeline: ``explain``, the review page and the
saliency benchmark all go through :class:`Explainer`; so do ``predict`` and the review page for a lesion segmentation
model (:meth:`Explainer.lesion_probabilities`).

For one image: the network input as the model saw it in training (the task preset's transforms, from the site's
cache), the model's probability (calibrated when the model carries its run's calibration:
:class:`models.evaluation.Scoring`), a saliency map by one of :class:`models.saliency.Method` (the target layer and
its grid chosen once per input shape), and the map carried back onto the image's own DICOM grid
(:func:`imaging.transforms.network_to_source`). Adding a saliency method is a change to :mod:`models.saliency`
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imaging.catalog import Item
from imaging.dataset import cached_dataset
from imaging.dicom import ImagePlan
from imaging.presets import TaskPreset, get_preset
from imaging.transforms import network_to_source
from models.config import from_flat
from models.device import Placement, autocast
from models.evaluation import Scoring
from models.nets import build_model
from models.saliency import Method, Saliency, layer_grid, method_layer, saliency
from models.weights import load_arrays, read_model

__all__ = ["Explainer", "Explanation"]


@dataclass(frozen=True)
class Explanation:
    """One saliency map of one image.

    Attributes:
        result: The map on the network's input grid, the probability, the layer and the time it took.
        on_source: The map on the image's DICOM grid (``(slices, rows, cols)`` or ``(rows, cols)``), in [0, 1];
            None when no image plan was given.
    """

    result: Saliency
    on_source: np.ndarray | None


class Explainer:
    """One task's trained network, ready to score and explain the site's images.

    Args:
        net: The network (put in eval mode here, and on ``placement``'s device).
        task: The task it was trained for.
        path: The ``model.pt`` it came from (None for a network built in memory).
        sha256: That file's SHA-256 ("" if none).
        placement: Where the network runs (default the CPU in fp32). Scores use its mixed precision; saliency
            maps are computed in fp32 (gradients of a bf16 forward pass are too coarse for a map).
        resolution: The resolution profile the network was trained at (its images are preprocessed so).
        scoring: How its scores are read: the calibration and operating point its run chose on validation (default:
            the network's own sigmoid, no operating point).
    """

    def __init__(self, net: nn.Module, task: str, *, path: Path | None = None, sha256: str = "",
                 placement: Placement | None = None, resolution: str = "cpu", scoring: Scoring | None = None) -> None:
        self.placement = placement or Placement(torch.device("cpu"))
        self.net = net.eval().to(self.placement.device)
        self.task = task
        self.path = path
        self.sha256 = sha256
        self.resolution = resolution
        self.scoring = scoring or Scoring()
        self.preset: TaskPreset = get_preset(task, resolution)
        self._layers: dict[tuple[tuple[int, ...], Method], tuple[str, tuple[tuple[float, float], ...]]] = {}

    @classmethod
    def load(cls, path: Path | str, *, placement: Placement | None = None) -> Explainer:
        """The model of a ``model.pt`` (a local run's, a federated checkpoint or global model).

        Raises:
            WeightsError: The file is missing, not an oncofed model, or does not fit its own network.
            ConfigError: Its run configuration is not valid.
        """
        path = Path(path)
        held = read_model(path)  # one read: the digest verdicts and overlays carry is that of the weights run
        config = from_flat(held.run_config)
        net = build_model(config.model)
        load_arrays(net, held.arrays)
        return cls(net, config.model.task, path=path, sha256=held.sha256, placement=placement,
                   resolution=config.model.resolution, scoring=held.scoring)

    def network_input(self, item: Item, *, workspace: Path) -> torch.Tensor:
        """An image as the network takes it (the preset's transforms; read from the site's cache when there)."""
        sample = cached_dataset([item], self.preset, workspace=workspace, train=False)[0]["image"]
        return _tensor(sample)

    @property
    def segmentation(self) -> bool:
        """Whether the model outlines lesions (a ``*-seg`` task's UNet) rather than scoring images."""
        return self.preset.segmentation

    def lesion_probabilities(self, image: torch.Tensor) -> np.ndarray:
        """A segmentation model's lesion probability per voxel of one network input, as evaluation computes it
        (:func:`fl_client.train.predict_masks`: MONAI's sliding window of the preset's patch size, a quarter
        overlap, Gaussian-weighted), without a data loader (no worker processes in the review page's server).

        Args:
            image: The network input, ``(channels, *spatial)`` (:meth:`network_input`).

        Returns:
            Float32 probabilities on the network's grid, ``(x, y[, z])``.

        Raises:
            ValueError: The model is a classifier.
        """
        from monai.inferers import sliding_window_inference

        if not self.segmentation:
            raise ValueError(f"the {self.task} model scores images; lesion probabilities need a *-seg model")
        x = _tensor(image).float()[None].to(self.placement.device)
        with torch.no_grad(), autocast(self.placement):
            logits = sliding_window_inference(x, roi_size=tuple(self.preset.patch_size), sw_batch_size=4,
                                              predictor=self.net, overlap=0.25, mode="gaussian")
        return np.ascontiguousarray(torch.sigmoid(torch.as_tensor(logits).float())[0, 0].cpu().numpy())

    def logits(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """The network's logit for each image (one batch, no gradients)."""
        batch = torch.stack([_tensor(x) for x in images]).float().to(self.placement.device)
        with torch.no_grad(), autocast(self.placement):
            logits = self.net(batch)
        return logits.float().reshape(-1).cpu().numpy().astype(np.float64)

    def probabilities(self, images: Sequence[torch.Tensor]) -> list[float]:
        """The model's probability of a finding for each image (one batch, no gradients): calibrated when the model
        carries a calibration (:attr:`scoring`; its calls at the operating point: ``scoring.calls(logits)``)."""
        return [float(p) for p in self.scoring.probabilities(self.logits(images))]

    def explain(self, image: torch.Tensor, method: Method, *, plan: ImagePlan | None = None) -> Explanation:
        """A saliency map of ``image`` by ``method``, and on ``plan``'s DICOM grid if given."""
        x = _tensor(image).float()
        layer, grid = None, None
        if method != Method.OCCLUSION:
            key = (tuple(x.shape), method)  # each method's layer for one input shape: once, not per image
            if key not in self._layers:
                name = method_layer(self.net, method, key[0])
                assert name is not None
                self._layers[key] = (name, layer_grid(self.net, name, key[0]))
            layer, grid = self._layers[key]
        with torch.enable_grad():
            result = saliency(self.net, x, method, layer=layer, grid=grid)
        if self.scoring.calibration is not None:  # the probability shown, as :meth:`probabilities` gives it
            result = replace(result, probability=float(self.scoring.calibration.of_logits([result.logit])[0]))
        on_source = network_to_source(result.map, plan, self.preset) if plan is not None else None
        return Explanation(result, on_source)


def _tensor(sample: object) -> torch.Tensor:
    as_tensor = getattr(sample, "as_tensor", None)  # a MONAI MetaTensor: its plain tensor
    return as_tensor() if callable(as_tensor) else torch.as_tensor(sample)

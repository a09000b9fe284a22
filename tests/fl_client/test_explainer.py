"""One per-image saliency pipeline (``fl_client.explainer``), as ``explain``, the review page and the saliency
benchmark use it: a ``model.pt`` loaded and checked, the network input from the site's cache, probabilities,
and a map on the network grid carried back onto the image's own DICOM grid."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from consortium import make_workspaces

from fl_client.explainer import Explainer
from imaging.catalog import Catalog
from models.config import from_flat
from models.evaluation import Calibration, Scoring
from models.nets import build_model
from models.saliency import Method
from models.weights import WeightsError, load_checkpoint, save_checkpoint, state_arrays


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("explainer")
    ws = make_workspaces(root, sites=1, studies_per_task=4, seed=3, tasks=["lung-ct"]) / "site-a"
    torch.manual_seed(0)
    flat = {"task": "lung-ct", "model-width": 8}
    model = root / "model.pt"
    save_checkpoint(model, state_arrays(build_model(from_flat(flat).model)), flat, round_number=2)
    return ws, model


def test_the_digest_a_review_records_is_that_of_the_weights_the_explainer_runs(
        site: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model file is read once: replaced the moment after (a newer global model copied over it), the explainer
    still names by its SHA-256 the weights it runs, so a verdict is never filed against another model."""
    import models.weights as weights

    _, model_path = site
    path, newer = tmp_path / "model.pt", tmp_path / "newer.pt"
    flat = {"task": "lung-ct", "model-width": 8}
    scoring = Scoring(Calibration(2.0, -0.5, 10, 12, "validation histograms, all sites pooled"), 0.4, "Youden")
    save_checkpoint(path, load_checkpoint(model_path)[0], flat, round_number=2, scoring=scoring)
    torch.manual_seed(1)
    save_checkpoint(newer, state_arrays(build_model(from_flat(flat).model)), flat, round_number=3)
    read, expected = weights._read_bytes, load_checkpoint(path)[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def read_then_replace(p: Path) -> bytes:
        data = read(p)
        if newer.exists():  # replaced once, after the first read
            newer.replace(p)
        return data

    monkeypatch.setattr(weights, "_read_bytes", read_then_replace)
    explainer = Explainer.load(path)
    assert explainer.sha256 == digest != hashlib.sha256(path.read_bytes()).hexdigest() and explainer.scoring == scoring
    ran = explainer.net.state_dict()
    assert all(np.array_equal(ran[k].numpy(), v) for k, v in expected.items())


def test_a_model_explains_an_image_on_its_own_dicom_grid(site: tuple[Path, Path]) -> None:
    ws, model_path = site
    explainer = Explainer.load(model_path)
    assert explainer.task == "lung-ct" and not explainer.net.training
    assert explainer.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    with Catalog.open(ws, create=False) as catalog:
        items = catalog.items("lung-ct")[:2]
    images = [explainer.network_input(item, workspace=ws) for item in items]
    probabilities = explainer.probabilities(images)
    assert len(probabilities) == 2 and all(0.0 < p < 1.0 for p in probabilities)
    first = explainer.explain(images[0], Method.GRADCAM, plan=items[0].plan)
    assert first.on_source is not None and first.on_source.shape == items[0].plan.shape
    assert float(first.on_source.min()) >= 0.0 and float(first.on_source.max()) <= 1.0 + 1e-6
    assert first.result.probability == pytest.approx(probabilities[0], abs=1e-5)
    explainer.explain(images[1], Method.GRADCAMPP)
    explainer.explain(images[1], Method.GRADCAM)
    assert len(explainer._layers) == 2  # each method's layer is chosen once per input shape, not per image
    assert explainer.explain(images[1], Method.HIRESCAM).result.layer == "features.0"
    assert sorted(name for name, _ in explainer._layers.values()) == ["features", "features", "features.0"]
    occlusion = explainer.explain(images[0], Method.OCCLUSION)
    assert occlusion.on_source is None and np.isfinite(occlusion.result.map).all()


def test_a_file_that_is_not_a_model_is_a_weights_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not an oncofed model file"):
        Explainer.load(bad)


def test_a_global_model_shows_its_runs_calibrated_scores_and_calls(site: tuple[Path, Path]) -> None:
    ws, model_path = site
    arrays, flat, _ = load_checkpoint(model_path)
    calibration = Calibration(3.0, 0.5, 20, 30, "validation histograms, all sites pooled")
    path = model_path.with_name("calibrated.pt")
    save_checkpoint(path, arrays, flat, round_number=2, scoring=Scoring(calibration, 0.5, "Youden"))
    plain, calibrated = Explainer.load(model_path), Explainer.load(path)
    with Catalog.open(ws, create=False) as catalog:
        items = catalog.items("lung-ct")[:3]
    images = [plain.network_input(item, workspace=ws) for item in items]
    raw, shown = plain.probabilities(images), calibrated.probabilities(images)
    assert shown == pytest.approx(list(calibration.of_scores(raw)), abs=1e-6) and shown != pytest.approx(raw)
    # The map's probability (what the overlay is weighted by and explain.json records) is the one shown.
    assert calibrated.explain(images[0], Method.GRADCAM).result.probability == pytest.approx(shown[0], abs=1e-5)
    logits = calibrated.logits(images)
    assert calibrated.scoring.calls(logits) == [p >= 0.5 for p in raw]  # the run's calls
    assert plain.scoring.calls(logits) is None  # a model without an operating point calls nothing

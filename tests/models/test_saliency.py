"""Saliency maps: the layer is found per network, 2D and 3D share one path, maps point at what drives the score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.config import from_flat
from models.methods import DEFAULT_METHOD, REVIEW_METHODS, default_method, methods_for
from models.nets import build_model
from models.saliency import (
    Method,
    SaliencyError,
    detail_layer,
    energy_inside,
    layer_grid,
    method_layer,
    pointing_game,
    rank_correlation,
    region_box,
    saliency,
    target_layer,
    unit_contributions,
)


class BlobNet(nn.Module):
    """A network whose logit is the brightness inside a fixed window: what should a map point at? The window."""

    def __init__(self, spatial: tuple[int, ...], window: tuple[slice, ...]) -> None:
        super().__init__()
        conv = nn.Conv2d if len(spatial) == 2 else nn.Conv3d
        self.features = nn.Sequential(conv(1, 1, 1), nn.ReLU())
        nn.init.ones_(self.features[0].weight)
        nn.init.zeros_(self.features[0].bias)
        mask = torch.zeros(spatial)
        mask[window] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x)[:, 0] * self.mask).flatten(1).sum(1, keepdim=True) / 10.0


@pytest.mark.parametrize(("task", "arch", "shape", "deepest", "finest"), [
    ("breast-mg", "compact-cnn", (1, 128, 160), "features", "features.0"),
    ("lung-ct", "compact-cnn", (1, 64, 64, 32), "features", "features.0"),
    ("prostate-mr", "compact-cnn", (1, 48, 48, 16), "features", "features.0"),
    ("lung-ct", "densenet-small", (1, 64, 64, 32), "features.transition2.conv", "features.relu0"),
])
def test_grad_cam_reads_the_deepest_useful_map_and_hirescam_the_finest_grid(
        task: str, arch: str, shape: tuple[int, ...], deepest: str, finest: str) -> None:
    model = build_model(from_flat({"task": task, "model": arch}).model)
    assert target_layer(model, shape) == deepest
    assert detail_layer(model, shape) == finest
    assert method_layer(model, Method.GRADCAM, shape) == method_layer(model, Method.GRADCAMPP, shape) == deepest
    assert method_layer(model, Method.HIRESCAM, shape) == finest
    assert method_layer(model, Method.OCCLUSION, shape) is None
    if arch == "compact-cnn":  # at the input's own grid: unit i on voxel i
        assert layer_grid(model, finest, shape) == tuple((1.0, 0.0) for _ in shape[1:])


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_hirescam_at_the_pooled_layer_sums_to_the_logit_less_the_bias(norm: str) -> None:
    """Euler: the generalised mean is homogeneous of degree one, so the activations times the gradient, summed over
    the map the pooling reads, give back what the head added to its bias."""
    torch.manual_seed(0)
    model = build_model(from_flat({"task": "prostate-mr", "norm": norm}).model).eval()
    x = torch.randn(1, 1, 24, 24, 8)
    units, logit = unit_contributions(model, x, "features")
    assert units.shape == (6, 6, 2)
    assert float(units.sum()) + float(model.head.bias.detach()) == pytest.approx(logit, rel=1e-4, abs=1e-5)


def test_a_network_without_a_spatial_map_is_named() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with pytest.raises(SaliencyError, match="no layer of Sequential"):
        target_layer(model, (1, 8, 8))


@pytest.mark.parametrize("spatial", [(32, 40), (24, 24, 16)])
@pytest.mark.parametrize("method", list(Method))
def test_every_method_points_at_what_drives_the_score(spatial: tuple[int, ...], method: Method) -> None:
    window = tuple(slice(s // 2, s // 2 + 6) for s in spatial)
    model = BlobNet(spatial, window)
    image = torch.full((1, *spatial), 0.1)
    image[(0, *window)] = 1.0  # the bright region the score reads
    far = tuple(slice(1, 5) for _ in spatial)
    image[(0, *far)] = 1.0  # equally bright, but the score ignores it
    result = saliency(model, image, method, mask_size=4)
    assert result.map.shape == spatial and result.map.dtype == np.float32
    assert result.map.min() >= 0.0 and result.map.max() == pytest.approx(1.0)
    lesion = np.zeros(spatial, bool)
    lesion[window] = True
    if method in (Method.OCCLUSION, Method.HIRESCAM):  # they see that the far blob does not matter
        assert pointing_game(result.map, lesion, margin=2)
        assert energy_inside(result.map, lesion) > 0.5
        if method == Method.HIRESCAM:  # element by element: the far blob's gradient is 0, so is its map
            assert result.map[far].max() == 0.0
    else:  # Grad-CAM weighs the layer's activations: both blobs light up, the window among them
        assert result.map[window].mean() > 0.9
        assert result.map[far].mean() > 0.9
    assert 0.0 < result.probability < 1.0 and result.seconds >= 0


def test_compact_cnn_maps_in_2d_and_3d_have_the_input_size() -> None:
    for task, shape in (("breast-mg", (1, 128, 160)), ("prostate-mr", (1, 48, 48, 16))):
        model = build_model(from_flat({"task": task}).model)
        for method, layer in ((Method.GRADCAM, "features"), (Method.GRADCAMPP, "features"),
                              (Method.HIRESCAM, "features.0")):
            result = saliency(model, torch.rand(shape), method)
            assert result.map.shape == shape[1:] and result.layer == layer
            assert result.map.max() == pytest.approx(1.0)


def test_maps_leave_no_hooks_on_the_model() -> None:
    """A review page draws many maps with one model: each must leave it as it found it."""
    model = build_model(from_flat({"task": "breast-mg"}).model)
    image = torch.rand(1, 128, 160)
    first = saliency(model, image, Method.GRADCAM)
    for method in (Method.GRADCAM, Method.GRADCAMPP, Method.HIRESCAM, Method.GRADCAM):
        saliency(model, image, method)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    np.testing.assert_allclose(saliency(model, image, Method.GRADCAM).map, first.map, atol=1e-6)


def test_hirescam_on_a_densenet_reads_its_first_stage_at_half_the_grid() -> None:
    """DenseNet's first convolution has stride 2: its units sit on every other voxel, and the map is brought back to
    the input's size."""
    model = build_model(from_flat({"task": "lung-ct", "model": "densenet-small"}).model)
    shape = (1, 64, 64, 32)
    assert layer_grid(model, "features.relu0", shape) == ((2.0, 0.0), (2.0, 0.0), (2.0, 0.0))
    result = saliency(model, torch.rand(shape), Method.HIRESCAM)
    assert result.layer == "features.relu0" and result.map.shape == shape[1:]


class TwiceNet(nn.Module):
    """One ReLU run twice, at two grids: no one map of it to read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.down(self.act(self.conv(x)))).mean(dim=(2, 3)))


def test_a_module_run_twice_is_not_read() -> None:
    model = TwiceNet().eval()
    assert detail_layer(model, (1, 16, 16)) == "conv"  # not the ReLU, whose first run is on the finest grid
    with pytest.raises(SaliencyError, match="ran 2 times"):
        unit_contributions(model, torch.rand(1, 1, 16, 16), "act")


def test_each_task_shows_its_own_method_first() -> None:
    assert default_method("prostate-mr") == default_method("colorectal-ct") == Method.HIRESCAM
    assert default_method("lung-ct") == default_method("breast-mg") == Method.GRADCAM == DEFAULT_METHOD
    assert methods_for("prostate-mr", REVIEW_METHODS)[0] == Method.HIRESCAM
    assert set(methods_for("prostate-mr", REVIEW_METHODS)) == set(REVIEW_METHODS)
    assert methods_for("lung-ct", REVIEW_METHODS) == REVIEW_METHODS
    assert methods_for("prostate-mr", (Method.GRADCAMPP, Method.GRADCAM)) == (Method.GRADCAMPP, Method.GRADCAM)


@pytest.mark.parametrize(("norm", "shape"), [("instance", (1, 64, 64, 32)), ("batch", (1, 64, 64, 32)),
                                             ("group", (1, 128, 160))])
def test_layer_units_sit_at_their_receptive_field_centres(norm: str, shape: tuple[int, ...]) -> None:
    """Two stride-2 convolutions with padding 1: unit i looks at input voxel 4i, whatever the norm."""
    task = "lung-ct" if len(shape) == 4 else "breast-mg"
    model = build_model(from_flat({"task": task, "norm": norm}).model)
    assert layer_grid(model, "features", shape) == ((4.0, 0.0),) * (len(shape) - 1)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(2, 2, 3, padding=1))
    assert layer_grid(pooled, "2", (1, 32, 32)) == ((2.0, 0.5), (2.0, 0.5))  # pooling: unit i covers 2i, 2i+1


class StridedSpot(nn.Module):
    """Two stride-2 convolutions; the logit reads one unit of the last map, so the truth is input voxel 4·unit."""

    def __init__(self, unit: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.weight, 0.1)
                nn.init.zeros_(m.bias)
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[:, :, self.unit[0], self.unit[1]].sum(1, keepdim=True)


def test_grad_cam_peaks_where_the_unit_looks_not_half_a_cell_beside_it() -> None:
    """Plain interpolation puts unit i at 4i + 1.5: the peak would land 1-2 voxels off a small lesion."""
    model = StridedSpot((5, 3))
    image = torch.zeros(1, 48, 40)
    image[0, 20, 12] = 1.0  # a one-voxel lesion where unit (5, 3) looks: its activation is the map's peak
    for method in (Method.GRADCAM, Method.GRADCAMPP):
        result = saliency(model, image, method, layer="features")
        assert np.unravel_index(int(np.argmax(result.map)), result.map.shape) == (20, 12)


def test_occlusion_stays_inside_the_image_region() -> None:
    image = torch.zeros(1, 32, 32)
    image[0, 8:20, 10:30] = torch.rand(12, 20) + 0.1
    assert region_box(image) == [(8, 20), (10, 30)]
    model = build_model(from_flat({"task": "breast-mg"}).model)
    result = saliency(model, image, Method.OCCLUSION, mask_size=4)
    outside = np.ones((32, 32), bool)
    outside[8:20, 10:30] = False
    assert (result.map[outside] == 0).all()


def test_sanity_figures() -> None:
    a = np.random.default_rng(0).random((8, 8))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    lesion = np.zeros((8, 8), bool)
    lesion[2:4, 2:4] = True
    peak = np.zeros((8, 8))
    peak[3, 3] = 1.0
    assert pointing_game(peak, lesion, margin=0) and energy_inside(peak, lesion) == 1.0
    peak = np.zeros((8, 8))
    peak[7, 7] = 1.0
    assert not pointing_game(peak, lesion, margin=1) and energy_inside(peak, lesion) == 0.0

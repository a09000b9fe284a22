"""Preset pipelines and the on-disk cache, on real DICOM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import write_mammogram, write_series
from monai.transforms import Compose

import imaging.transforms as transforms
from imaging.catalog import Item
from imaging.dataset import cache_folder, cached_dataset
from imaging.dicom import plan_images, read_header, read_image
from imaging.presets import PRESETS, get_preset
from imaging.transforms import LoadPlanImaged, deterministic_transforms, pipeline


def _volume_item(tmp_path: Path, **kwargs) -> Item:
    paths, _, _ = write_series(tmp_path, **kwargs)
    (plan,) = plan_images([read_header(p) for p in paths])
    return Item(study_uid=plan.study_uid, task="lung-ct", label=1, split="train", patient_pseudonym="p-x", plan=plan)


def test_loaded_tensor_matches_dicom_geometry(tmp_path: Path) -> None:
    item = _volume_item(tmp_path, n=20, rows=8, cols=6)
    out = LoadPlanImaged("image")({"image": item.plan})["image"]
    array = read_image(item.plan).array  # (slices, rows, cols)
    assert tuple(out.shape) == (1, 6, 8, 20)  # (channel, x=col, y=row, z=slice)
    assert float(out[0, 4, 3, 7]) == float(array[7, 3, 4])
    # RAS affine: x grows to the patient's left in LPS = negative in RAS.
    voxel = torch.tensor([4.0, 3.0, 7.0, 1.0], dtype=torch.float64)
    world_ras = out.affine @ voxel
    origin = np.array(item.plan.origin)
    lps = origin + np.array([4 * 0.7, 3 * 0.8, 7 * 2.5])
    np.testing.assert_allclose(world_ras[:3].numpy(), [-lps[0], -lps[1], lps[2]], atol=1e-6)


@pytest.mark.parametrize("task", ["lung-ct", "colorectal-ct", "prostate-mr"])
def test_volume_presets_give_their_size_and_range(tmp_path: Path, task: str) -> None:
    preset = get_preset(task)
    modality = preset.modality
    item = _volume_item(tmp_path, n=24, rows=40, cols=36, spacing=3.0, pixel_spacing=(2.0, 2.0),
                        modality=modality, intercept=-1024.0 if modality == "CT" else 0.0)
    out = Compose(deterministic_transforms(preset))({"image": item.plan, "label": 1})["image"]
    assert tuple(out.shape) == (1, *preset.spatial_size) and out.dtype == torch.float32
    if preset.intensity == "ct-window":
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    else:
        assert torch.isfinite(out).all()


def test_mammograms_are_flipped_to_one_side(tmp_path: Path) -> None:
    preset = PRESETS["breast-mg"]
    left, _ = write_mammogram(tmp_path / "l", laterality="L")
    right, _ = write_mammogram(tmp_path / "r", laterality="R")
    (pl,) = plan_images([read_header(left)])
    (pr,) = plan_images([read_header(right)])
    load = Compose([LoadPlanImaged("image"), transforms.FlipToLateralityd("image", "R")])
    out_l = load({"image": pl, "laterality": "L"})["image"]
    out_r = load({"image": pr, "laterality": "R"})["image"]
    torch.testing.assert_close(out_l, torch.flip(out_r, dims=(1,)))  # same pixels, mirrored
    full = Compose(deterministic_transforms(preset))({"image": pl, "laterality": "L"})["image"]
    assert tuple(full.shape) == (1, *preset.spatial_size)


def test_second_epoch_reads_the_cache_not_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [_volume_item(tmp_path / f"s{i}", n=20, rows=16, cols=16, seed=i, patient_id=f"P{i}")
             for i in range(3)]
    preset = get_preset("lung-ct")
    calls = []
    real = transforms.read_image
    monkeypatch.setattr(transforms, "read_image", lambda plan: calls.append(plan.key) or real(plan))
    ds = cached_dataset(items, preset, workspace=tmp_path / "ws", train=True)
    first = [ds[i]["image"] for i in range(len(ds))]
    assert len(calls) == 3
    second = [ds[i]["image"] for i in range(len(ds))]
    assert len(calls) == 3, "epoch 2 must not decode DICOM again"
    assert all(a.shape == b.shape == (1, *preset.spatial_size) for a, b in zip(first, second, strict=True))
    assert len(list(cache_folder(tmp_path / "ws", preset).glob("*.pt"))) == 3
    # A fresh dataset object (the next round or run) reads the same cache.
    again = cached_dataset(items, preset, workspace=tmp_path / "ws", train=False)
    _ = [again[i] for i in range(3)]
    assert len(calls) == 3


def test_eval_pipeline_is_deterministic(tmp_path: Path) -> None:
    item = _volume_item(tmp_path, n=20, rows=16, cols=16)
    preset = get_preset("lung-ct")
    a = pipeline(preset, train=False)({"image": item.plan})["image"]
    b = pipeline(preset, train=False)({"image": item.plan})["image"]
    torch.testing.assert_close(a, b)


def test_lung_field_keeps_lungs_and_nodules_and_blanks_the_rest() -> None:
    from monai.data import MetaTensor

    from imaging.transforms import LungFieldd

    x, y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    body = ((x - 32) / 30) ** 2 + ((y - 32) / 22) ** 2 < 1
    lung_l = ((x - 20) / 9) ** 2 + ((y - 30) / 14) ** 2 < 1
    lung_r = ((x - 44) / 9) ** 2 + ((y - 30) / 14) ** 2 < 1
    nodule = (x - 44) ** 2 + (y - 30) ** 2 < 9
    slice_ = np.full((64, 64), -1000.0)
    slice_[body] = 40.0
    slice_[lung_l | lung_r] = -850.0
    slice_[nodule] = 30.0
    volume = MetaTensor(torch.as_tensor(np.repeat(slice_[None, :, :, None], 8, axis=3), dtype=torch.float32),
                        affine=torch.diag(torch.tensor([5.5, 5.5, 5.0, 1.0], dtype=torch.float64)))
    out = LungFieldd(["image"])({"image": volume})["image"][0, :, :, 4].numpy()
    assert (out[nodule] == 30.0).all()  # the nodule inside the lung is kept
    assert (out[lung_l | lung_r] != -1000.0).all()
    chest_wall = body & ~(lung_l | lung_r)
    # Chest wall, heart, spine become air; where the lungs come closer than the rolling ball (22 mm, 4 voxels
    # here) the tissue between them stays.
    outer = chest_wall & ((x < 10) | (x > 54) | (y < 15) | (y > 45))
    assert (out[outer] == -1000.0).all() and (out[chest_wall] == -1000.0).mean() > 0.9


def test_lung_field_keeps_a_nodule_on_the_pleura_and_a_lung_behind_a_leaky_chest_wall() -> None:
    """The two ways the lung field lost nodules on the synthetic consortium (7 of 73 more than half cut at 5.5 mm):
    a nodule fused with the chest wall (a dent in the air mask), and a chest wall thinned by partial volume in
    one slice, which joined a whole lung to the air around the patient."""
    from monai.data import MetaTensor

    from imaging.transforms import LUNG_BALL_MM, LungFieldd

    x, y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    body = ((x - 32) / 31) ** 2 + ((y - 32) / 30) ** 2 < 1
    lung_l = ((x - 18) / 11) ** 4 + ((y - 30) / 14) ** 4 < 1  # flat-sided lungs: the pleura at x = 8 and 35
    lung_r = ((x - 46) / 11) ** 4 + ((y - 30) / 14) ** 4 < 1
    nodule = (x - 9) ** 2 + (y - 30) ** 2 < 5  # 12 mm across, on the left lung's pleura, fused with the chest wall
    slices = []
    for k in range(8):
        slice_ = np.full((64, 64), -1000.0)
        slice_[body] = 40.0
        slice_[lung_l | lung_r] = -850.0
        slice_[nodule] = 30.0
        if k == 4:  # a one-voxel gap through the chest wall from the right lung to the outside
            slice_[56:, 30] = -900.0
        slices.append(slice_)
    volume = MetaTensor(torch.as_tensor(np.stack(slices, -1)[None], dtype=torch.float32),
                        affine=torch.diag(torch.tensor([5.5, 5.5, 5.0, 1.0], dtype=torch.float64)))
    out = LungFieldd(["image"])({"image": volume})["image"][0].numpy()
    for k in range(8):
        # The nodule, but for the voxels at the pleural line a rolling ball leaves, in every slice.
        kept = float((out[..., k][nodule & lung_l] == 30.0).mean())
        assert out[9, 30, k] == 30.0 and kept >= 0.6, (k, kept)
        assert (out[..., k][lung_l | lung_r] != -1000.0).all(), k  # both lungs, the leaky slice too
    # Chest wall, heart and spine still go, away from the nodule's dent.
    far = body & ~(lung_l | lung_r) & (np.hypot(x - 9, y - 30) > LUNG_BALL_MM / 5.5 + 3)
    assert (out[..., 2][far] == -1000.0).mean() > 0.97


def test_bright_structure_suppression_keeps_the_enhancing_tumour() -> None:
    from imaging.transforms import SuppressBrightd

    x, y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    body = ((x - 32) / 30) ** 2 + ((y - 32) / 22) ** 2 < 1
    spine = (x - 32) ** 2 + (y - 48) ** 2 < 16
    kidney = (x - 14) ** 2 + (y - 40) ** 2 < 25
    tumour = (x - 44) ** 2 + (y - 24) ** 2 < 25
    slice_ = np.full((64, 64), -1000.0)
    slice_[body] = 45.0
    slice_[spine] = 700.0
    slice_[kidney] = 185.0
    slice_[tumour] = 110.0
    volume = torch.as_tensor(np.repeat(slice_[None, :, :, None], 6, axis=3), dtype=torch.float32)
    out = SuppressBrightd(["image"], threshold=160.0, fill=-100.0, dilate=1)({"image": volume})["image"]
    mid = out[0, :, :, 3].numpy()
    assert (mid[spine | kidney] == -100.0).all()  # bone and enhancing kidney become fat
    rim = (x - 32) ** 2 + (y - 48) ** 2 == 16  # the partial-volume rim just outside the spine
    assert (mid[rim] == -100.0).all()
    assert (mid[tumour] == 110.0).all() and mid.max() == 110.0  # the tumour is now the brightest thing
    assert (mid[body & ~spine & ~kidney & ~tumour & ~rim] <= 110.0).all()


def test_bright_structure_suppression_reads_through_noise() -> None:
    from scipy import ndimage

    from imaging.transforms import SuppressBrightd

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(np.arange(48), np.arange(48), np.arange(12), indexing="ij")
    spine = (x - 24) ** 2 + (y - 36) ** 2 < 16
    kidney = (x - 10) ** 2 + (y - 28) ** 2 < 25
    tumour = ((x - 34) ** 2 + (y - 14) ** 2 < 16) & (abs(z - 6) < 4)
    rib = (x == 40) & (y > 30) & (y < 44)  # bone one voxel thick: a median alone would read it away
    volume = np.full(x.shape, 45.0)
    volume[spine], volume[kidney], volume[tumour], volume[rib] = 700.0, 185.0, 130.0, 650.0
    # Correlated noise of 40 HU, a low-dose scanner's: the raw threshold would punch holes into the tumour.
    noise = ndimage.gaussian_filter(rng.standard_normal(x.shape), (0.7, 0.7, 0.3))
    volume = volume + 40.0 * noise / noise.std()
    out = SuppressBrightd(["image"], threshold=160.0)({"image": torch.as_tensor(volume[None], dtype=torch.float32)})
    kept = out["image"][0].numpy() != -100.0
    raw = SuppressBrightd(["image"], threshold=160.0, median=1)({"image": torch.as_tensor(volume[None])})
    assert (raw["image"][0].numpy()[tumour] == -100.0).mean() > 0.5  # what the median is for
    assert kept[tumour].all()
    # Bone goes whole; a kidney 25 HU over the threshold, under 40 HU of noise, nearly whole.
    assert not kept[spine].any() and not kept[rib].any() and kept[kidney].mean() < 0.03


def test_fat_calibration_moves_the_fat_peak_and_leaves_unreadable_scans() -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from imaging.synth.geometry import Grid
    from imaging.synth.phantoms.colorectal_ct import draw_abdomen
    from imaging.transforms import CalibrateHUd, fat_peak_hu

    # A real scan this project did not write: its fat reads about -91 HU, and a drift moves the peak with it.
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    real = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    peak = fat_peak_hu(real)
    assert peak is not None and -110.0 <= peak <= -80.0
    for drift in (-40.0, 25.0):
        assert fat_peak_hu(real + drift) == pytest.approx(peak + drift, abs=2.0)
    # The synthetic abdomen scanned twice, the second time +35 HU off: calibrated, both read the same numbers.
    rng = np.random.default_rng(1)
    grid = Grid.centred((0.0, 0.0, -250.0), (24, 64, 64), (5.0, 5.5, 5.5))
    hu, _ = draw_abdomen(rng, grid, 1, 1.0)
    scan = hu + 40.0 * rng.standard_normal(hu.shape)
    calibrated = [CalibrateHUd(["image"])({"image": torch.as_tensor(v[None], dtype=torch.float32)})["image"][0].numpy()
                  for v in (scan, scan + 35.0)]
    assert fat_peak_hu(calibrated[1]) == pytest.approx(-100.0, abs=4.0)
    assert abs(float((calibrated[1] - calibrated[0]).mean())) <= 4.0  # the drift taken out, to the peak's bins
    # A smaller peak below the fat (fluid and fat mixed, say) does not stand in for it.
    mixed = np.concatenate([rng.normal(-60.0, 15.0, 6000), rng.normal(-200.0, 10.0, 2500),
                            rng.normal(45.0, 15.0, 12000)])
    assert fat_peak_hu(mixed) == pytest.approx(-60.0, abs=4.0)
    # No fat to read (a phantom of water and air), or fat further off than the largest shift: left as it is.
    water = np.where(np.arange(4096).reshape(64, 64) % 2, 0.0, -1000.0)[None].astype(np.float32)
    assert fat_peak_hu(water) is None
    assert torch.equal(CalibrateHUd(["image"])({"image": torch.as_tensor(water)})["image"], torch.as_tensor(water))
    far = np.concatenate([rng.normal(-190.0, 15.0, 6000), rng.normal(45.0, 15.0, 12000)]).astype(np.float32)
    far = far.reshape(1, 60, 300)
    assert fat_peak_hu(far, window=(-250.0, -40.0)) == pytest.approx(-190.0, abs=4.0)  # readable, but 90 HU off
    assert torch.equal(CalibrateHUd(["image"])({"image": torch.as_tensor(far)})["image"], torch.as_tensor(far))


def test_lesion_masks_land_on_the_lesion_in_the_network_grid(tmp_path: Path) -> None:
    import json
    from dataclasses import replace

    from consortium import make_workspaces

    from imaging.catalog import Catalog
    from imaging.dataset import sample_dicts
    from imaging.transforms import mask_to_network_grid, pipeline

    ws = make_workspaces(tmp_path, sites=1, studies_per_task=6, seed=3, tasks=["lung-ct", "breast-mg"]) / "site-a"
    records = {r["sop_instance_uid"] or r["series_instance_uid"]: r
               for r in json.loads((tmp_path / "data" / "site-a" / "lesions.json").read_text())}
    checked = 0
    with Catalog.open(ws) as catalog:
        for task in ("lung-ct", "breast-mg"):
            # Without the lung-field step, which may cut a nodule touching the chest wall (its known limit).
            preset = replace(PRESETS[task], lung_field=False)
            items = [i for i in catalog.items(task) if i.label == 1 and i.plan.key in records]
            for item, sample in zip(items, sample_dicts(items), strict=True):
                raw = np.load(tmp_path / "data" / "site-a" / records[item.plan.key]["mask"])["mask"]
                mask = mask_to_network_grid(raw, item.plan, preset)
                image = np.asarray(pipeline(preset, train=False)(sample)["image"])[0]
                assert mask.shape == image.shape and mask.any()
                # Nodules and masses are brighter than what surrounds them in these windows.
                assert image[mask].mean() > image[~mask].mean() + 0.1, (task, item.plan.key)
                checked += 1
    assert checked >= 2


def test_calcification_enhancement_lifts_specks_out_of_dense_tissue_and_leaves_masses() -> None:
    from imaging.transforms import EnhanceCalcificationsd

    r, c = np.mgrid[:64, :64].astype(np.float32)
    tissue = 0.6 + 0.3 * np.exp(-((r - 32) ** 2 + (c - 32) ** 2) / (2 * 15.0 ** 2))  # smooth, dense in the middle
    img = tissue.copy()
    d = np.sqrt((r - 14) ** 2 + (c - 46) ** 2)
    mass = d <= 8
    img = np.maximum(img, 0.97 / (1 + np.exp(d - 6)))  # a mass, 12 pixels across, its edge soft as a mass's is
    for y, x in ((30, 30), (30, 31), (36, 24)):  # two specks of calcium in the densest tissue
        img[y, x] = 1.0
    out = EnhanceCalcificationsd(["image"], gain=2.0, size=4)({"image": torch.as_tensor(img)[None]})["image"][0]
    lift = (out - torch.as_tensor(img)).numpy()
    assert lift[30, 30] > 0.15 and lift[36, 24] > 0.15  # each speck keeps its height above the tissue, twice
    assert np.unravel_index(int(out.argmax()), out.shape) in ((30, 30), (30, 31), (36, 24))
    assert lift[mass].max() < 0.5 * min(lift[30, 30], lift[36, 24])  # wider than the disk: a mass far less
    near_speck = np.minimum(np.hypot(r - 30, c - 30.5), np.hypot(r - 36, c - 24)) <= 3
    assert np.abs(lift[~near_speck & (d > 10)]).max() < 0.01  # smooth tissue stays as it is
    from_numpy = EnhanceCalcificationsd(["image"], gain=2.0, size=4)({"image": img[None]})["image"]
    torch.testing.assert_close(from_numpy[0], out)  # a plain array in, the same values out
    with pytest.raises(ValueError, match="2D images"):
        EnhanceCalcificationsd(["image"], gain=2.0, size=4)({"image": torch.zeros(1, 8, 8, 8)})
    assert get_preset("breast-mg").calcification_size == 4
    assert get_preset("breast-mg", "diagnostic").calcification_size == 16
    steps = {type(s).__name__ for s in deterministic_transforms(get_preset("breast-mg"))}
    assert "EnhanceCalcificationsd" in steps
    assert "EnhanceCalcificationsd" not in {type(s).__name__ for s in deterministic_transforms(get_preset("lung-ct"))}

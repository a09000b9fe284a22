"""Saliency overlays as a radiologist reads them: on the series' own grid, oriented as stored (for an axial CT the
patient's right on the viewer's left), each edge named by the patient direction it faces, and a map weighted by
the probability so that a negative study does not glow like a finding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_factory import write_series

from fl_client.explain import _overlay, overlay_planes
from imaging.dicom import plan_images, read_header, read_image


def test_axial_ct_planes_follow_the_radiological_convention(tmp_path: Path) -> None:
    paths, _, _ = write_series(tmp_path / "ct", n=20, rows=16, cols=12)
    (plan,) = plan_images([read_header(p) for p in paths])
    source = read_image(plan).array
    heat = np.zeros_like(source)
    heat[5, 4, 2] = 1.0  # column 2: near the patient's right (columns run towards the patient's left)
    planes = overlay_planes(source, heat, plan, strip=4)
    axial, row_reformat, column_reformat = planes[:3]
    assert axial.edges == ("R", "L", "A", "P")
    np.testing.assert_array_equal(axial.image, source[5])  # as stored, not mirrored
    assert np.unravel_index(int(np.argmax(axial.heat)), axial.heat.shape) == (4, 2)  # the viewer's left half
    assert row_reformat.edges == ("R", "L", "H", "F") and column_reformat.edges == ("A", "P", "H", "F")
    # Head up: the top row of a reformat is the last slice (furthest along the normal, towards the head).
    np.testing.assert_array_equal(row_reformat.image[0], source[-1, 4, :])
    assert [p.label for p in planes[3:]] == ["slice 0", "slice 6", "slice 13", "slice 19"]
    assert axial.aspect == plan.spacing[1] / plan.spacing[2]
    assert row_reformat.aspect == plan.spacing[0] / plan.spacing[2]
    out = tmp_path / "overlay.png"
    _overlay(out, planes, "lung-ct · gradcam · p = 0.35", (-1000.0, 400.0))
    assert out.stat().st_size > 10_000


def test_a_negative_study_is_drawn_cool_and_a_2d_image_has_two_panels(tmp_path: Path) -> None:
    from dicom_factory import write_mammogram

    folder = tmp_path / "mg"
    write_mammogram(folder)
    (plan,) = plan_images([read_header(p) for p in sorted(folder.iterdir())])
    source = read_image(plan).array
    heat = np.zeros_like(source)
    heat[2:5, 2:5] = 1.0  # a map at full strength, as every map is normalised to a peak of 1
    planes = overlay_planes(source, heat, plan, probability=0.35)
    assert [p.label for p in planes] == ["image", "saliency"] and planes[0].heat.max() == 0
    # On the fixed 0-1 colour scale the study the model gives p = 0.35 peaks at 0.35: cool, not red.
    assert planes[1].heat.max() == np.float32(0.35)

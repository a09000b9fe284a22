"""The site's data summary for the consortium: what it holds, before any training, with nothing that identifies.

Per task: usable and labelled studies, label balance per split (studies, not images: a mammography study has
several views), training patients (DP-SGD's unit of privacy, so the lead can foresee a site's noise), the series'
vendors (a fixed list, never the Manufacturer tag's text), slice thickness, pixel spacing and MR field strength on
fixed bins, and a histogram of the preprocessed images' values on fixed bins (what the network sees). Every key is
one of :func:`models.protocol.summary_keys`; every count above 0 and below the site's minimum (policy
``min_count``, default 5) is replaced by :data:`models.protocol.SUPPRESSED`. The reply passes the egress guard and is
logged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from imaging.catalog import Catalog
from imaging.dataset import cached_dataset
from imaging.presets import PRESETS, Intensity
from models.protocol import (
    INTENSITY_BINS,
    SUPPRESSED,
    Split,
    field_bin,
    model_family_of,
    pixel_bin,
    slice_bin,
    vendor_of,
)

__all__ = ["INTENSITY_SAMPLE", "site_summary"]

INTENSITY_SAMPLE = 24  # training images read for the intensity histogram (from the cache after the first time)


def _intensity_edges(intensity: Intensity) -> np.ndarray:
    """Fixed bin edges of a preset's normalised values: [0, 1] for windowed CT and scaled MG (a mammogram's enhanced
    calcifications, above 1, count in the top bin with the brightest tissue), ±4 for z-scored MR."""
    low, high = (-4.0, 4.0) if intensity is Intensity.MR_ZSCORE else (0.0, 1.0)
    return np.linspace(low, high, INTENSITY_BINS + 1)


def site_summary(workspace: Path, *, min_count: int = 5) -> dict[str, float]:
    """The site's summary, every key from :func:`models.protocol.summary_keys`.

    Args:
        workspace: The site workspace.
        min_count: Counts from 1 to ``min_count - 1`` are sent as :data:`models.protocol.SUPPRESSED`.

    Raises:
        FileNotFoundError: The workspace holds no catalog.
    """
    out: dict[str, float] = {}
    suppressed: Counter[str] = Counter()

    def put(key: str, task: str, count: int) -> None:
        if 0 < count < min_count:
            out[key] = SUPPRESSED
            suppressed[task] += 1
        else:
            out[key] = float(count)

    with Catalog.open(workspace, create=False) as catalog:
        for name, preset in PRESETS.items():
            items = catalog.items(name)
            series = catalog.db.execute(
                "SELECT manufacturer, slice_thickness, field_strength, pixel_spacing, model FROM series "
                "WHERE status='ok' AND modality=? AND (',' || tasks || ',') LIKE ('%,' || ? || ',%')",
                (preset.modality, name)).fetchall()
            studies = catalog.db.execute(
                "SELECT COUNT(DISTINCT study_uid) FROM series WHERE status='ok' AND modality=? "
                "AND (',' || tasks || ',') LIKE ('%,' || ? || ',%')", (preset.modality, name)).fetchone()[0]
            put(f"{name}:studies", name, int(studies))
            put(f"{name}:labelled", name, len({i.study_uid for i in items}))
            for split in Split:
                per_study: dict[str, int] = {}  # a study's label: its images' highest (one image's lesion is its)
                for i in items:
                    if i.split == split:
                        per_study[i.study_uid] = max(per_study.get(i.study_uid, 0), i.label)
                labels = Counter(per_study.values())
                put(f"{name}:{split}:pos", name, labels[1])
                put(f"{name}:{split}:neg", name, labels[0])
            put(f"{name}:train:patients", name, len({i.patient_pseudonym for i in items if i.split == Split.TRAIN}))
            vendors = Counter(vendor_of(str(r[0] or "")) for r in series)
            models = Counter(model_family_of(str(r[4] or "")) for r in series)
            slices = Counter(slice_bin(float(r[1])) for r in series if r[1])
            pixels = Counter(pixel_bin(float(json.loads(r[3])[0])) for r in series if r[3])
            fields = Counter(field_bin(float(r[2])) for r in series if r[2] and preset.modality == "MR")
            for prefix, counts in ((f"{name}:vendor:", vendors), (f"{name}:model:", models),
                                   (f"{name}:slice-mm:", slices),
                                   (f"{name}:pixel-mm:", pixels), (f"{name}:field-t:", fields)):
                for key, count in counts.items():
                    put(prefix + key, name, count)
            train = [i for i in items if i.split == Split.TRAIN][:INTENSITY_SAMPLE]
            if len({i.patient_pseudonym for i in train}) >= min_count:  # fewer patients' images could describe one
                edges = _intensity_edges(preset.intensity)
                hist = np.zeros(INTENSITY_BINS)
                dataset = cached_dataset(train, preset, workspace=workspace, train=False)
                for k in range(len(train)):
                    values = np.asarray(dataset[k]["image"], dtype=np.float64).ravel()
                    hist += np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
                hist /= max(hist.sum(), 1.0)
                for b, share in enumerate(hist):
                    out[f"{name}:intensity:{b}"] = float(round(share, 6))
            out[f"{name}:suppressed"] = float(suppressed[name])
    return out

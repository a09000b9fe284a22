"""A classifier's figures per subgroup of studies the site can tell apart from its own catalog.

Subgroups are the scanner vendor (``Manufacturer`` mapped to a fixed list), the slice thickness band and, for MR,
the field strength band of the series each study was scored on (``models.protocol.SUBGROUP_KINDS``). Per
subgroup: studies, positives, negatives and the AUROC with its DeLong interval. A subgroup with fewer studies
than the site's minimum count (its data-summary threshold, default 5) is left out, so that no figure describes a
handful of patients; what is sent uses the fixed vocabularies only, never a tag's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from imaging.catalog import Catalog
from imaging.sitedata import SiteData
from models.evaluation import auroc_ci
from models.protocol import SUBGROUP, field_bin, slice_bin, vendor_of

__all__ = ["study_subgroups", "subgroup_figures", "subgroup_metrics"]


def study_subgroups(data: SiteData, split: str) -> dict[str, dict[str, str]]:
    """Each study's subgroups (``kind -> value``) from the catalog row of the series it was scored on."""
    by_ws: dict[Path, list[tuple[str, str]]] = {}
    for ws, item in data.items.get(split, []):
        by_ws.setdefault(ws, []).append((item.study_uid, item.plan.series_uid))
    out: dict[str, dict[str, str]] = {}
    for ws, pairs in by_ws.items():
        with Catalog.open(ws, create=False) as catalog:
            for study, series in pairs:
                row = catalog.db.execute("SELECT manufacturer, slice_thickness, field_strength, modality FROM series "
                                         "WHERE series_uid=?", (series,)).fetchone()
                if row is None or study in out:
                    continue
                groups = {"vendor": vendor_of(str(row[0] or ""))}
                if row[1]:
                    groups["slice-mm"] = slice_bin(float(row[1]))
                if row[2] and row[3] == "MR":
                    groups["field-t"] = field_bin(float(row[2]))
                out[study] = groups
    return out


def subgroup_figures(groups: Mapping[str, Mapping[str, str]], study_uids: Sequence[str],
                     labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, *,
                     min_count: int) -> dict[str, dict[str, float | int | None]]:
    """Figures per subgroup (``"vendor:siemens"`` -> ``studies``, ``positives``, ``negatives``, ``auroc``,
    ``auroc-low``, ``auroc-high``) of the studies' scores; subgroups of fewer than ``min_count`` studies are left
    out."""
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    members: dict[str, list[int]] = {}
    for i, uid in enumerate(study_uids):
        for kind, value in groups.get(uid, {}).items():
            members.setdefault(f"{kind}:{value}", []).append(i)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, index in sorted(members.items()):
        if len(index) < max(min_count, 1):
            continue
        yy, ss = y[index], s[index]
        ci = auroc_ci(yy, ss)
        out[name] = {"studies": len(index), "positives": int(yy.sum()), "negatives": int(len(yy) - yy.sum()),
                     "auroc": ci.auroc if ci else None, "auroc-low": ci.low if ci else None,
                     "auroc-high": ci.high if ci else None}
    return out


def subgroup_metrics(figures: Mapping[str, Mapping[str, float | int | None]]) -> dict[str, float]:
    """The metric entries of :func:`subgroup_figures` (``subgroup:<kind>:<value>:<stat>``; undefined AUROCs left
    out)."""
    return {f"{SUBGROUP}{name}:{stat}": float(value) for name, stats in figures.items()
            for stat, value in stats.items() if value is not None}

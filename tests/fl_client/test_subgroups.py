"""Figures per subgroup a site can tell apart: vendor, slice thickness band, MR field strength; fixed
vocabularies only, small subgroups left out, and the wire form read back by the server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from consortium import make_workspaces

from fl_client.egress import check_reply
from fl_client.subgroups import study_subgroups, subgroup_figures, subgroup_metrics
from imaging.sitedata import load_site_data
from models.evaluation import auroc_ci
from models.protocol import SUBGROUP_KEYS, split_subgroups


def test_subgroups_from_the_catalog_and_their_figures(tmp_path: Path) -> None:
    ws = make_workspaces(tmp_path, sites=2, studies_per_task=10, seed=4, tasks=["prostate-mr"])
    data = load_site_data([ws / "site-a", ws / "site-b"], "prostate-mr")
    groups = study_subgroups(data, "train")
    uids = sorted(groups)
    assert uids == sorted(set(data.study_uids("train")))
    # Site a scans on SIEMENS, site b on GE (the synthetic profiles); every MR has a field strength band.
    assert {g["vendor"] for g in groups.values()} == {"siemens", "ge"}
    assert all("field-t" in g and "slice-mm" in g for g in groups.values())
    rng = np.random.default_rng(0)
    labels = np.array([1, 0] * (len(uids) // 2) + [1] * (len(uids) % 2))
    scores = rng.random(len(uids)) * 0.5 + 0.4 * labels
    figures = subgroup_figures(groups, uids, labels, scores, min_count=1)
    siemens = [i for i, u in enumerate(uids) if groups[u]["vendor"] == "siemens"]
    ci = auroc_ci(labels[siemens], scores[siemens])
    assert ci is not None and figures["vendor:siemens"]["auroc"] == pytest.approx(ci.auroc)
    assert figures["vendor:siemens"]["studies"] == len(siemens)
    # A subgroup smaller than the site's minimum is not sent.
    small = subgroup_figures(groups, uids, labels, scores, min_count=len(siemens) + 1)
    assert "vendor:siemens" not in small
    metrics = subgroup_metrics(figures)
    assert set(metrics) <= SUBGROUP_KEYS
    check_reply({}, metrics, reference=None, strings={})  # the egress guard lets them through
    rest, back = split_subgroups({**metrics, "auroc": 0.7})
    assert rest == {"auroc": 0.7} and back["vendor:siemens"]["studies"] == len(siemens)

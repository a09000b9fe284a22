"""The consortium's figures from the sites' score histograms, against a direct computation on the same studies'
scores pooled: AUROC and interval, operating point, rates at it, calibration; and the report that shows them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_server.evaluation import consortium_auroc, consortium_figures, scoring_of, too_small
from fl_server.report import write_report
from models.evaluation import Calibration, auroc_ci, choose_threshold, ece, fit_platt, parse_rule, score_histogram
from models.protocol import Metric


def _sites(seed: int, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        y = (rng.random(n) < 0.4).astype(int)
        y[:2] = [0, 1]
        s = 1 / (1 + np.exp(-rng.normal(1.8 * y - 0.8, 1.0)))
        out.append((y, s))
    return out


def _hists(sites: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    out = {}
    for i, (y, s) in enumerate(sites):
        pos, neg = score_histogram(y, s)
        out[f"site-{'abc'[i]}"] = {"pos": pos.tolist(), "neg": neg.tolist()}
    return out


def test_consortium_figures_match_the_pooled_studies() -> None:
    val, test = _sites(1, (60, 30, 90)), _sites(2, (50, 40, 70))
    doc = consortium_figures(_hists(test), _hists(val), rule="sensitivity>=0.9")
    assert doc is not None
    y = np.concatenate([t[0] for t in test])
    s = np.concatenate([t[1] for t in test])
    exact = auroc_ci(y, s)
    auc = doc["auroc"]
    assert exact is not None and abs(auc["auroc"] - exact.auroc) < 0.01
    assert abs(auc["auroc"] - exact.auroc) <= auc["max_error"] < 0.03  # the stated bound holds (and is loose)
    assert auc["low"] < exact.auroc < auc["high"]
    assert (auc["positives"], auc["negatives"]) == (y.sum(), len(y) - y.sum())
    # The threshold is chosen on the pooled validation scores; at it, the test rates are the studies' exact rates.
    op = doc["operating_point"]
    vy, vs = np.concatenate([v[0] for v in val]), np.concatenate([v[1] for v in val])
    assert (vs[vy == 1] >= op["threshold"]).mean() >= 0.9
    direct = choose_threshold(vy, vs, parse_rule("sensitivity>=0.9"))
    assert op["threshold"] <= direct + 1e-9  # a bin edge at or below the exact choice: never less sensitive
    c = op["consortium"]
    assert c["sensitivity"] == pytest.approx((s[y == 1] >= op["threshold"]).mean())
    assert c["specificity"] == pytest.approx((s[y == 0] < op["threshold"]).mean())
    assert c["sensitivity_ci95"][0] <= c["sensitivity"] <= c["sensitivity_ci95"][1]
    ty, ts = test[1]
    assert op["sites"]["site-b"]["sensitivity"] == pytest.approx((ts[ty == 1] >= op["threshold"]).mean())
    assert doc["calibration"]["ece"] == pytest.approx(ece(y, s), abs=0.03)
    assert doc["roc"]["consortium"][0] == pytest.approx((1.0, 1.0)) and doc["roc"]["consortium"][-1] == (0.0, 0.0)
    fixed = consortium_figures(_hists(test), _hists(val), rule="fixed:0.5")
    assert fixed is not None and fixed["operating_point"]["exact"]  # 0.5 is a bin edge
    assert fixed["operating_point"]["consortium"]["specificity"] == pytest.approx((s[y == 0] < 0.5).mean())
    assert consortium_auroc({}) is None and consortium_figures({}, {}, rule="youden") is None
    assert too_small({Metric.POSITIVES: 3, Metric.NEGATIVES: 40}) and not too_small({Metric.POSITIVES: 12,
                                                                                      Metric.NEGATIVES: 10})


def test_the_report_shows_intervals_the_operating_point_and_the_curves(tmp_path: Path) -> None:
    val, test = _sites(3, (40, 40)), _sites(4, (30, 8))
    hists = _hists(test)
    sites = {}
    for name, (y, s) in zip(hists, test, strict=True):
        ci = auroc_ci(y, s)
        assert ci is not None
        sites[name] = {Metric.STUDIES: len(y), Metric.POSITIVES: int(y.sum()), Metric.NEGATIVES: int(len(y) - y.sum()),
                       Metric.AUROC: ci.auroc, Metric.AUROC_LOW: ci.low, Metric.AUROC_HIGH: ci.high}
    final = {"split": "test", "sites": sites, "weighted": {}, "consortium": consortium_figures(hists, _hists(val),
                                                                                                rule="youden"),
             "too_small": sorted(s for s, m in sites.items() if too_small(m)),
             "subgroups": {"site-a": {"vendor:siemens": {"studies": 30, "positives": 12, "negatives": 18,
                                                         "auroc": 0.81, "auroc-low": 0.66, "auroc-high": 0.96}}}}
    history = {"run_id": "7", "task": "lung-ct", "strategy": "fedavg", "final": final,
               "rounds": [{"round": 1, "train": {}, "evaluate": {}, "aggregated_evaluate": {},
                           "consortium": final["consortium"]["auroc"]}]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "7", "started": 1.79e9, "run_config": {
        "task": "lung-ct", "dp": True, "dp-epsilon": 8.0, "operating-point": "youden"}}))
    page = write_report(tmp_path).read_text()
    assert "consortium (all studies, from histograms)" in page and "Operating point" in page
    assert "Youden" in page and "too few to judge" in page  # site-b has 8 studies
    low, high = sites["site-a"][Metric.AUROC_LOW], sites["site-a"][Metric.AUROC_HIGH]
    assert f"({low:.3f}–{high:.3f})" in page
    # What a clinician files: the run, its date, its settings (DP included) and the software versions.
    assert "Research use only" in page and "2026-" in page and "DP ε per site (run)" in page
    assert "torch " in page and "monai " in page
    assert "Subgroups (test split)" in page and "0.810 (0.66–0.96)" in page
    assert (tmp_path / "plots" / "roc.png").is_file() and (tmp_path / "plots" / "reliability.png").is_file()


def _timid_sites(seed: int, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scores of a federated model that all sit near 0.5 (logits of spread 0.3) but rank well."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        z = rng.normal(0.0, 0.3, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-(6 * z - 0.4)))).astype(int)
        out.append((y, 1 / (1 + np.exp(-z))))
    return out


def test_the_global_model_is_recalibrated_on_validation_and_judged_on_test(tmp_path: Path) -> None:
    val, test = _timid_sites(5, (80, 60, 100)), _timid_sites(6, (70, 50, 90))
    doc = consortium_figures(_hists(test), _hists(val), rule="youden")
    assert doc is not None
    recal = doc["calibration"]["recalibrated"]
    vy, vs = np.concatenate([v[0] for v in val]), np.concatenate([v[1] for v in val])
    exact = fit_platt(vy, np.log(vs / (1 - vs)))
    assert recal["fitted"] and exact is not None
    assert recal["slope"] == pytest.approx(exact.slope, rel=0.1)  # from histograms, against the per-case fit
    assert (recal["positives"], recal["negatives"]) == (int(vy.sum()), int(len(vy) - vy.sum()))
    # On the test studies the recalibrated scores are far better calibrated than the network's own.
    ty, ts = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
    calibration = Calibration.from_dict(recal)
    assert ece(ty, ts) > 0.12 and ece(ty, calibration.of_scores(ts)) < 0.08
    assert recal["ece"] == pytest.approx(ece(ty, calibration.of_scores(ts)), abs=0.04)
    assert doc["calibration"]["ece"] > 2 * recal["ece"]
    # The threshold on the calibrated scale calls the same studies positive.
    threshold = doc["operating_point"]["threshold"]
    assert ((calibration.of_scores(ts) >= recal["threshold"] - 1e-9) == (ts >= threshold)).all()
    # What the global model's model.pt carries.
    scoring = scoring_of(doc)
    assert scoring is not None and scoring.calibration == calibration and scoring.threshold == threshold
    assert scoring.rule.startswith("Youden") and scoring_of(None) is None
    # Too few validation studies of a class: not fitted, and the report says why.
    few = consortium_figures(_hists(test), _hists(_timid_sites(7, (12,))), rule="youden")
    assert few is not None and not few["calibration"]["recalibrated"]["fitted"]
    assert "fewer than 10 of a class" in few["calibration"]["recalibrated"]["reason"]
    assert scoring_of(few) is not None and scoring_of(few).calibration is None  # type: ignore[union-attr]
    # A network whose own scores are calibrated keeps them: the closed test finds nothing to fix.
    rng = np.random.default_rng(8)
    z = rng.normal(0.0, 1.5, 300)
    honest = [((rng.random(300) < 1 / (1 + np.exp(-z))).astype(int), 1 / (1 + np.exp(-z)))]
    kept = consortium_figures(_hists(honest), _hists(honest), rule="youden")
    assert kept is not None and not kept["calibration"]["recalibrated"]["fitted"]
    assert "closed test" in kept["calibration"]["recalibrated"]["reason"]
    # The report shows the fit, its error on test and both reliability curves.
    final = {"split": "test", "sites": {}, "weighted": {}, "consortium": doc, "too_small": []}
    (tmp_path / "history.json").write_text(json.dumps({"run_id": "8", "task": "colorectal-ct", "final": final,
                                                        "rounds": []}))
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "8", "started": 1.79e9, "run_config": {
        "task": "colorectal-ct", "operating-point": "youden"}}))
    page = write_report(tmp_path).read_text()
    assert f"sigmoid({recal['slope']:.3f} × logit" in page and f"<b>{recal['ece']:.3f}</b>" in page
    assert "Platt scaling (slope and intercept)" in page and "closed test" in page
    assert (tmp_path / "plots" / "reliability.png").is_file()

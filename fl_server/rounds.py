"""One round's record in the run's history, written by one recorder and read back as one typed record.

Both ways the server runs a round (Flower's strategies in :mod:`fl_server.strategies`, SecAgg+ in
:mod:`fl_server.secure`) record through :class:`RoundRecorder`; the live log line, ``oncofed-server``'s exit
check and the report read :class:`RoundRecord`. The stored form is the ``rounds[]`` entry of
``history.json`` (schema ``oncofed.run/1``)::

    {"round": 3, "started": ..., "asked_train": 3, "aggregated_sites": 2,
     "train": {"a": {metrics}, ...}, "evaluate": {"a": {metrics}, ...},
     "aggregated_train": {...}, "aggregated_evaluate": {...},
     "dropped": [{"site", "reason"}], "refused": [{"site", "code", "reason", ...}],
     "failed": [{"site", "stage", "reason"}],
     "site_seconds": ..., "seconds": ..., "slowest_site_seconds": ..., "overhead": ..., "checkpoint": ...}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fl_server.evaluation import consortium_auroc
from models.protocol import EVAL_AGGREGATED, HEADLINE_METRICS, Metric, split_histograms

__all__ = ["RoundRecord", "RoundRecorder", "new_round", "warned_sites", "weighted_by_studies"]


def new_round(round_number: int) -> dict[str, Any]:
    """A fresh history entry for a round."""
    return {"round": round_number, "started": time.time(), "train": {}, "evaluate": {}, "dropped": [],
            "refused": [], "failed": [], "aggregated_train": {}, "aggregated_evaluate": {}}


def warned_sites(history: Mapping[str, Any]) -> set[str]:
    """The sites a run's history has warned of already (a resumed run does not warn of them again)."""
    return {str(w.get("site")) for r in history.get("rounds", []) for w in r.get("warnings") or ()}


def weighted_by_studies(per_site: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Evaluation metrics over sites, each site weighted by its studies (sites without an AUROC, i.e. with
    one class only or no studies, and segmenters without a study with a lesion, are left out)."""
    usable = [m for m in per_site if m.get(Metric.STUDIES, 0) > 0 and any(k in m for k in HEADLINE_METRICS)]
    out: dict[str, float] = {}
    for key in EVAL_AGGREGATED:
        have = [(m[key], m[Metric.STUDIES]) for m in usable if key in m]
        if have:
            out[str(key)] = sum(v * n for v, n in have) / sum(n for _, n in have)
    return out


class RoundRecorder:
    """Writes one round's entry of the history (the dict the run store keeps and saves).

    Args:
        record: The round's history entry (from :meth:`fl_server.runstore.RunStore.round_record`).
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    @property
    def round(self) -> int:
        """The round number."""
        return int(self.record["round"])

    def asked(self, sites: int) -> None:
        """How many sites were asked to train."""
        self.record["asked_train"] = sites

    def trained(self, site: str, metrics: Mapping[str, float]) -> None:
        """A site's training reply (a refusal's figures too: its ε and ceiling)."""
        self.record["train"][site] = {str(k): float(v) for k, v in metrics.items()}

    def update_norm(self, site: str, norm: float) -> None:
        """The norm of a site's update, as the server's validation measured it."""
        self.record["train"].setdefault(site, {})["update-norm"] = norm

    def evaluated(self, site: str, metrics: Mapping[str, float]) -> None:
        """A site's validation metrics of the global model (its score histograms kept apart, under
        ``histograms``)."""
        rest, pos, neg = split_histograms(metrics)
        self.record["evaluate"][site] = rest
        if pos is not None and neg is not None:
            self.record.setdefault("histograms", {})[site] = {"pos": pos, "neg": neg}

    def refused(self, site: str, refusal: Mapping[str, Any], *, stage: str = "train",
                metrics: Mapping[str, float] | None = None) -> None:
        """A site that did not take part, with its code and sentence (and, for a budget, its ε figures)."""
        entry: dict[str, Any] = {"site": site, **refusal}
        if stage != "train":
            entry["stage"] = stage
        elif metrics is not None:
            entry.update(epsilon=metrics.get(Metric.EPSILON), epsilon_max=metrics.get(Metric.EPSILON_MAX))
        self.record["refused"].append(entry)

    def failed(self, site: str, reason: str, *, stage: str) -> None:
        """A site whose reply was an error (recorded once per site, stage and reason)."""
        entry = {"site": site, "stage": stage, "reason": reason}
        if entry not in self.record["failed"]:
            self.record["failed"].append(entry)

    def dropped(self, site: str, reason: str) -> None:
        """A reply the server's validation kept out of the aggregate."""
        self.record["dropped"].append({"site": site, "reason": reason})

    def warn_momentum_under_dp(self, momentum: float, dp_sites: Iterable[str],
                               warned: set[str], *, step: float = 1.0) -> list[dict[str, str]]:
        """Warn of sites whose update was aggregated under DP-SGD (the run's, or their own policy's) while the server
        steps with momentum, or further than the mean update (``step`` above 1: breast's default in a run that did
        not ask for DP-SGD): once per site and run (``warned``, updated, holds the sites warned of before; see
        :func:`warned_sites`).

        Momentum adds up the noise of successive rounds along with their signal: under DP-SGD at ε = 8 it cost
        3–9 % AUROC against the same DP run without it (BENCHMARKS.md), which is why a run's automatic momentum is 0
        under DP; a longer step multiplies the noise with the signal (breast at step 2 under DP-SGD, ε = 8: 0.76
        against 0.81–0.83 at step 1), which is why a run with ``dp=true`` steps 1. Neither changes a site's ε: they
        work on updates that have left the sites.

        Returns:
            The warnings recorded now."""
        if momentum <= 0 and step <= 1:
            return []
        what = (f"with momentum {momentum:g}: momentum adds up the noise of successive rounds with their signal (it "
                "cost 3-9 % AUROC at epsilon 8 in the benchmarks); start such a run with --set server-momentum=0"
                if momentum > 0 else
                f"{step:g} times along the mean update, which multiplies the sites' noise with their signal (breast "
                "at step 2 under DP-SGD, epsilon 8: AUROC 0.76 against 0.81-0.83 at step 1 in the benchmarks); start "
                "such a run with --set dp=true, which steps 1")
        new = [{"site": site, "reason": f"the site trains under DP-SGD and the server steps {what}"}
               for site in sorted(set(dp_sites) - warned)]
        self.record.setdefault("warnings", []).extend(new)
        warned.update(w["site"] for w in new)
        return new

    def aggregated(self, sites: int, train: Mapping[str, float] | None = None) -> None:
        """How many updates were aggregated, and the aggregated training metrics."""
        self.record["aggregated_sites"] = sites
        if train is not None:
            self.record["aggregated_train"] = {str(k): float(v) for k, v in train.items()}

    def aggregated_evaluation(self, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        """Store the aggregated validation metrics (default: the sites' weighted by their studies)."""
        aggregated = dict(metrics) if metrics is not None else weighted_by_studies(self.record["evaluate"].values())
        if aggregated:
            self.record["aggregated_evaluate"] = {str(k): float(v) for k, v in aggregated.items()}
        pooled = consortium_auroc(self.record.get("histograms") or {})
        if pooled is not None:
            self.record["consortium"] = pooled
        return aggregated

    def site_seconds(self, seconds: float) -> None:
        """The slowest site's work in the training message."""
        self.record["site_seconds"] = seconds

    def timed(self, wall: float, *, separate_evaluation: bool) -> None:
        """Close the round's timing: wall time, the slowest site's work and the framework's share.

        Args:
            wall: Seconds from the round's first message to its end.
            separate_evaluation: Evaluation ran in messages of its own (its slowest site adds to the work).
        """
        work = self.record.get("site_seconds")
        if work is None:
            work = max((m.get(Metric.TRAIN_SECONDS, 0.0) for m in self.record["train"].values()), default=0.0)
        evals = [m.get(Metric.EVAL_SECONDS, 0.0) for m in self.record["evaluate"].values()]
        slowest = float(work) + (max(evals) if evals and separate_evaluation else 0.0)
        self.record.update(seconds=wall, slowest_site_seconds=slowest,
                           overhead=(wall - slowest) / wall if wall > 0 else None)

    def checkpointed(self, relative_path: str) -> None:
        """The round's checkpoint, relative to the run directory."""
        self.record["checkpoint"] = relative_path


@dataclass(frozen=True)
class RoundRecord:
    """A round as the history stores it, typed (see the module docstring for the stored form)."""

    round: int
    asked_train: int = 0
    aggregated_sites: int = 0
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregated_train: dict[str, float] = field(default_factory=dict)
    aggregated_evaluate: dict[str, float] = field(default_factory=dict)
    dropped: tuple[dict[str, Any], ...] = ()
    refused: tuple[dict[str, Any], ...] = ()
    failed: tuple[dict[str, Any], ...] = ()
    seconds: float | None = None
    slowest_site_seconds: float | None = None
    overhead: float | None = None
    checkpoint: str | None = None
    secure_aggregation: bool = False
    consortium: dict[str, Any] = field(default_factory=dict)  # AUROC of all sites' studies, from histograms
    warnings: tuple[dict[str, Any], ...] = ()  # what may hurt the model, per site (the round it was first seen)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RoundRecord:
        """Read a stored round (keys it does not know are ignored; missing ones take their defaults)."""
        return cls(round=int(doc["round"]), asked_train=int(doc.get("asked_train", 0) or 0),
                   aggregated_sites=int(doc.get("aggregated_sites", 0) or 0), train=dict(doc.get("train") or {}),
                   evaluate=dict(doc.get("evaluate") or {}), aggregated_train=dict(doc.get("aggregated_train") or {}),
                   aggregated_evaluate=dict(doc.get("aggregated_evaluate") or {}),
                   dropped=tuple(doc.get("dropped") or ()), refused=tuple(doc.get("refused") or ()),
                   failed=tuple(doc.get("failed") or ()), seconds=doc.get("seconds"),
                   slowest_site_seconds=doc.get("slowest_site_seconds"), overhead=doc.get("overhead"),
                   checkpoint=doc.get("checkpoint"), secure_aggregation=bool(doc.get("secure_aggregation", False)),
                   consortium=dict(doc.get("consortium") or {}), warnings=tuple(doc.get("warnings") or ()))

    def sites(self) -> list[str]:
        """Every site that answered in this round, sorted."""
        return sorted({*self.train, *self.evaluate})

    def took_part(self, site: str) -> bool:
        """The site trained and its update was aggregated (not refused, not dropped)."""
        return (site in self.train and not self.train[site].get(Metric.REFUSED)
                and not any(d.get("site") == site for d in self.dropped))

    @property
    def headline(self) -> Metric:
        """The figure the round is judged by: Dice when the sites sent one (segmentation), else AUROC."""
        seen = [self.aggregated_evaluate, *self.evaluate.values()]
        return Metric.DICE if any(Metric.DICE in m for m in seen) else Metric.AUROC

    def progress_line(self) -> str:
        """One line for the live log: aggregated validation AUROC (Dice for segmentation), per site, ε, dropped,
        refused, failed."""
        def fmt(value: Any, spec: str = ".3f") -> str:
            return "—" if value is None else format(value, spec)

        head = self.headline
        sites = " ".join(f"{s}={fmt(m.get(head), '.2f')}" for s, m in sorted(self.evaluate.items()))
        eps = " ".join(f"{s}:ε={m[Metric.EPSILON]:.2f}" for s, m in sorted(self.train.items())
                       if m.get(Metric.EPSILON))
        parts = [f"round {self.round:>3}", f"{self.seconds or 0:6.1f}s",
                 f"train loss {fmt(self.aggregated_train.get(Metric.TRAIN_LOSS))}",
                 f"val {'Dice' if head == Metric.DICE else 'AUROC'} {fmt(self.aggregated_evaluate.get(head))} "
                 f"[{sites}]"]
        if self.consortium:
            c = self.consortium
            parts.append(f"consortium AUROC {c['auroc']:.3f} ({c['low']:.2f}-{c['high']:.2f}, "
                         f"{c['positives']}+/{c['negatives']}-)")
        if eps:
            parts.append(eps)
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{d['site']} ({d['reason']})" for d in self.dropped))
        if self.refused:
            parts.append("refused " + ", ".join(f"{d['site']} ({d['reason']})" for d in self.refused))
        if self.failed:
            parts.append("failed " + ", ".join(sorted({d["site"] for d in self.failed})))
        return " | ".join(parts)

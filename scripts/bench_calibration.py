"""Recalibration benchmark: what the server's recalibration does to held-out scores, by validation size.

A network's scores are drawn from a known truth (logits ``z`` of a given spread; labels from
``sigmoid(slope * z + intercept)``), so that the best possible calibration is known. For each validation size the
server's fit (:func:`models.evaluation.fit_platt_histograms` on the validation studies' histograms: Platt scaling
adopted by the closed test) is compared with the network's own scores and with Platt scaling adopted always, on
20 000 held-out studies of the same network: expected calibration error (10 bins), Brier score, log loss, and how
often the result is worse than the network's own scores (log loss). NumPy only; about half a minute.

Example::

    .venv/bin/python scripts/bench_calibration.py
    .venv/bin/python scripts/bench_calibration.py --sizes 24,48,96,192 --repeats 400
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from rich.console import Console
from rich.progress import track

from models.evaluation import fit_platt_histograms, recalibrate_histograms, score_histogram

# (name, spread of the network's logits, true slope, true intercept)
NETWORKS = [
    ("timid (scores 0.44-0.56, as federated colorectal models)", 0.25, 6.0, -0.3),
    ("somewhat timid", 0.25, 3.0, -0.3),
    ("calibrated", 1.5, 1.0, 0.0),
    ("calibrated, other prevalence", 1.5, 1.0, -1.0),
    ("overconfident", 2.0, 0.5, 0.0),
]


def _draw(rng: np.random.Generator, n: int, spread: float, slope: float, intercept: float
          ) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0.0, spread, n)
    return (rng.random(n) < 1 / (1 + np.exp(-(slope * z + intercept)))).astype(int), z


def _figures(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    from models.evaluation import ece

    q = np.clip(p, 1e-7, 1 - 1e-7)
    return (float(ece(y, p) or 0.0), float(np.mean((p - y) ** 2)),
            float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example:\n  .venv/bin/python scripts/bench_calibration.py\n"
                                            "  .venv/bin/python scripts/bench_calibration.py --sizes 24,48,96 "
                                            "--repeats 400",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="24,48,96,192,384", help="validation studies (half positive on average)")
    parser.add_argument("--repeats", type=int, default=200, help="validation draws per network and size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give whole numbers separated by commas, e.g. 24,48,96")
    console = Console()
    rng = np.random.default_rng(args.seed)
    console.print("| network | validation studies | own scores: ECE / Brier / log loss | closed test (server): adopted "
                  "/ ECE / Brier / log loss / worse than own | Platt always: ECE / Brier / log loss / worse than own |")
    console.print("|---|---|---|---|---|")
    for name, spread, slope, intercept in NETWORKS:
        hy, hz = _draw(rng, 20000, spread, slope, intercept)
        own = _figures(hy, 1 / (1 + np.exp(-hz)))
        for n in sizes:
            test: list[tuple[float, float, float]] = []
            always: list[tuple[float, float, float]] = []
            adopted = 0
            for _ in track(range(args.repeats), description=f"{name[:24]}, {n}", console=console, transient=True):
                vy, vz = _draw(rng, n, spread, slope, intercept)
                pos, neg = score_histogram(vy, 1 / (1 + np.exp(-vz)))
                fit = fit_platt_histograms(pos, neg)
                adopted += fit is not None
                test.append(own if fit is None else _figures(hy, fit.of_logits(hz)))
                plain = recalibrate_histograms(pos, neg, closed_test=False)[0]  # Platt always
                always.append(own if plain is None else _figures(hy, plain.of_logits(hz)))
            t, a = np.array(test), np.array(always)
            console.print(
                f"| {name} | {n} | {own[0]:.3f} / {own[1]:.4f} / {own[2]:.4f} | {adopted / args.repeats:.0%} / "
                f"{t[:, 0].mean():.3f} / {t[:, 1].mean():.4f} / {t[:, 2].mean():.4f} / "
                f"{np.mean(t[:, 2] > own[2] + 1e-12):.0%} | {a[:, 0].mean():.3f} / {a[:, 1].mean():.4f} / "
                f"{a[:, 2].mean():.4f} / {np.mean(a[:, 2] > own[2] + 1e-12):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

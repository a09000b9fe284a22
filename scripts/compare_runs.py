"""Is a federated model better than the pooled one, or than a site alone? DeLong's paired test on held-out studies.

``search_fed_recipe.py`` appends one JSON line per run to ``OUT/search.jsonl``, with every held-out study's label and
score. Runs on the same consortium (task, seed, studies per site, rounds, non-IID variant, ``--set`` values) are
scored on the same held-out studies, so two of them can be compared case by case: the difference of their AUROCs,
its 95 % interval and a two-sided p-value by DeLong's paired test (:func:`models.evaluation.compare_aurocs`), which
counts the covariance of two models scored on the same studies. On 144 held-out studies one AUROC's interval is
about ±0.05; the paired interval of a difference is narrower. It is the uncertainty of the held-out sample, with
both models fixed: how much another training seed or draw of patients moves a model is not in it (run more draws
for that), and comparing one model with four baselines makes one chance "significant" result likelier than 5 %.

For each federated run (neither ``--pooled`` nor ``--single``) the script prints its AUROC, then the pooled run's and
each site's alone on the same consortium with the paired difference. "Best site" is the site that scored highest on
these same held-out studies: picking the best of three on the data that judges them flatters it (the winner's
curse), so a federated model that ties it is doing as well as a site can be shown to do.

Example::

    .venv/bin/python scripts/compare_runs.py --out bench-output/search-br-th4 --task breast-mg
    .venv/bin/python scripts/compare_runs.py --out bench-output/search-br-th4 --task breast-mg --rounds 20 --json
    .venv/bin/python scripts/compare_runs.py --out bench-output/search-br-th4 --task breast-mg --any-settings
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.evaluation import compare_aurocs  # noqa: E402


def _consortium(line: dict[str, Any], *, settings: bool = True) -> tuple[Any, ...]:
    """What makes two runs comparable: the same training consortium, rounds, local training settings (unless
    ``settings`` is false) and held-out studies (a pooled run of another learning rate is another recipe, not the
    federated run's baseline)."""
    return (line.get("task"), line.get("consortium_seed"), line.get("holdout_seed"), line.get("holdout_studies"),
            line.get("studies"), line.get("rounds"), line.get("unlike"),
            json.dumps(line.get("set") or {}, sort_keys=True) if settings else None)


def _holdout(line: dict[str, Any]) -> tuple[list[int], list[float]] | None:
    scores = (line.get("calibration") or {}).get("scores", {}).get("holdout")
    return (list(scores[0]), list(scores[1])) if scores else None


def _kind(line: dict[str, Any]) -> str:
    return "pooled" if line.get("pooled") else (line.get("single") or "federated")


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of ``search.jsonl`` that carry held-out scores (a later line of the same name and kind, federated,
    pooled or one site alone, replaces an earlier: a re-run)."""
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            raise SystemExit(f"{path}, line {number}: not JSON; remove the line or re-run that search") from None
        if _holdout(line) is not None:
            name = line.get("name") or f"line {number}"
            runs[(name, _kind(line))] = {**line, "name": name}
    return list(runs.values())


def comparisons(runs: Iterable[dict[str, Any]], *, same_settings: bool = True) -> list[dict[str, Any]]:
    """For each federated run, its paired comparison with the pooled run and each single-site run of its consortium
    (trained with the same ``--set`` values, unless ``same_settings`` is false)."""
    runs = list(runs)
    out = []
    for fed in (r for r in runs if _kind(r) == "federated"):
        labels, scores = _holdout(fed)
        row: dict[str, Any] = {"name": fed["name"], "task": fed["task"], "seed": fed.get("consortium_seed"),
                               "rounds": fed.get("rounds"), "auroc": fed.get("holdout_auroc"), "against": []}
        for other in sorted((r for r in runs if _kind(r) != "federated"
                                and _consortium(r, settings=same_settings) == _consortium(fed, settings=same_settings)),
                            key=_kind):
            other_labels, other_scores = _holdout(other)
            if other_labels != labels:  # e.g. the held-out consortium was written with other --consortium-tasks
                print(f"note: {other['name']} and {fed['name']} were scored on different held-out studies; not "
                      "compared (re-run one with the other's --consortium-tasks, --holdout-seed and "
                      "--holdout-studies)", file=sys.stderr)
                continue
            d = compare_aurocs(labels, scores, other_scores)
            if d is not None:
                row["against"].append({"run": other["name"], "kind": _kind(other), "auroc": d.second,
                                       "difference": d.difference, "low": d.low, "high": d.high, "p": d.p_value})
        sites = [a for a in row["against"] if a["kind"] not in ("pooled",)]
        if sites:
            row["best_site"] = max(sites, key=lambda a: a["auroc"])["kind"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the folder of a search (holds search.jsonl)")
    parser.add_argument("--task", default=None, help="only this task's runs")
    parser.add_argument("--rounds", type=int, default=None, help="only runs of this many rounds")
    parser.add_argument("--any-settings", action="store_true",
                        help="compare federated runs of any --set values (a new recipe) with the baselines of the "
                             "same consortium, whatever theirs")
    parser.add_argument("--json", action="store_true", help="print one JSON line per federated run instead")
    args = parser.parse_args(argv)
    path = args.out / "search.jsonl"
    if not path.is_file():
        print(f"error: {path} does not exist: run scripts/search_fed_recipe.py --out {args.out} first", file=sys.stderr)
        return 2
    runs = [r for r in read_runs(path) if (args.task is None or r.get("task") == args.task)
            and (args.rounds is None or r.get("rounds") == args.rounds)]
    rows = comparisons(runs, same_settings=not args.any_settings)
    if not rows:
        print(f"no federated run with held-out scores in {path}" + (f" for {args.task}" if args.task else ""),
              file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Federated against pooled and single sites, paired DeLong on held-out studies ({path})")
    for column in ("federated run", "seed", "rounds", "AUROC", "against", "its AUROC", "federated − it (95 % CI)",
                   "p"):
        table.add_column(column)
    for row in rows:
        first = True
        for a in row["against"] or [None]:
            head = ([row["name"], str(row["seed"]), str(row["rounds"]), f"{row['auroc']:.3f}"] if first
                    else ["", "", "", ""])
            first = False
            if a is None:
                table.add_row(*head, "(no pooled or single-site run)", "", "", "")
                continue
            kind = f"{a['kind']}{' (best site)' if a['kind'] == row.get('best_site') else ''}: {a['run']}"
            table.add_row(*head, kind, f"{a['auroc']:.3f}",
                          f"{a['difference']:+.3f} ({a['low']:+.3f} to {a['high']:+.3f})", f"{a['p']:.3f}")
        table.add_section()
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

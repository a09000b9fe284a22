"""The run report: an HTML page with PNG plots, and TensorBoard event files, from a run directory.

``write_report(RUN_DIR)`` reads ``history.json`` and writes ``RUN_DIR/report.html``,
``RUN_DIR/plots/*.png`` and ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any


def _load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "history.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no history.json): pass the folder the "
                                "server wrote (its run-dir)")
    return dict(json.loads(path.read_text()))


def _series(history: dict[str, Any], stage: str, key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in history["rounds"]:
        for site, metrics in record.get(stage, {}).items():
            if key in metrics:
                out.setdefault(site, []).append((record["round"], float(metrics[key])))
    return out


def _aggregated(history: dict[str, Any], stage: str, key: str) -> list[tuple[int, float]]:
    return [(r["round"], float(r[stage][key])) for r in history["rounds"] if key in r.get(stage, {})]


def _plots(history: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    panels = [("val-auroc.png", "Validation AUROC (studies)", "evaluate", "auroc", "aggregated_evaluate", (0, 1)),
              ("val-loss.png", "Validation loss", "evaluate", "eval-loss", "aggregated_evaluate", None),
              ("train-loss.png", "Training loss", "train", "train-loss", "aggregated_train", None),
              ("epsilon.png", "Cumulative ε per site (DP)", "train", "epsilon", None, None)]
    for name, title, stage, key, agg, ylim in panels:
        series = _series(history, stage, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for site, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
        if agg:
            points = _aggregated(history, agg, key)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], color="black", linewidth=2.5,
                        label="all sites (weighted)")
        if key == "auroc":
            ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel("round")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made.append((name, title))
    return made


def _tensorboard(history: dict[str, Any], out: Path) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional for the page itself
        return False
    writer = SummaryWriter(log_dir=str(out))
    try:
        for record in history["rounds"]:
            rnd = record["round"]
            for stage in ("train", "evaluate"):
                for site, metrics in record.get(stage, {}).items():
                    for key, value in metrics.items():
                        writer.add_scalar(f"{stage}/{key}/{site}", float(value), rnd)
            for stage in ("aggregated_train", "aggregated_evaluate"):
                for key, value in record.get(stage, {}).items():
                    writer.add_scalar(f"{stage}/{key}", float(value), rnd)
            if record.get("seconds") is not None:
                writer.add_scalar("timing/round_seconds", float(record["seconds"]), rnd)
    finally:
        writer.close()
    return True


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def write_report(run_dir: Path, *, page_path: Path | None = None) -> Path:
    """Write the HTML report (and plots, TensorBoard events) of a run; return the page's path.

    Args:
        run_dir: The run directory.
        page_path: Where the page goes (default ``RUN_DIR/report.html``); plots stay in the run directory.

    Raises:
        FileNotFoundError: ``run_dir`` holds no run.
    """
    run_dir = Path(run_dir)
    history = _load(run_dir)
    plots = _plots(history, run_dir / "plots")
    has_tb = _tensorboard(history, run_dir / "tensorboard")
    rounds = history["rounds"]
    sites = sorted({s for r in rounds for s in (*r.get("train", {}), *r.get("evaluate", {}))})
    round_rows = []
    for r in rounds:
        if r["round"] < 1:
            continue
        round_rows.append([r["round"], _f(r.get("seconds"), 1), _f(r.get("slowest_site_seconds"), 1),
                           f"{100 * r['overhead']:.0f} %" if r.get("overhead") is not None else "—",
                           f"{r.get('aggregated_sites', 0)}/{r.get('asked_train', 0)}",
                           _f(r.get("aggregated_train", {}).get("train-loss")),
                           _f(r.get("aggregated_evaluate", {}).get("auroc"))])
    events = []
    for r in rounds:
        for kind in ("dropped", "refused", "failed"):
            for e in r.get(kind, []):
                events.append([r["round"], e.get("site", "?"), kind, e.get("reason", "")])
    for kind in ("refused", "failed"):
        for e in (history.get("final") or {}).get(kind, []):
            events.append(["final", e.get("site", e.get("node", "?")), kind, e.get("reason", "")])
    site_rows = []
    for site in sites:
        last_eval: dict[str, Any] = next((r["evaluate"][site] for r in reversed(rounds)
                                          if site in r.get("evaluate", {})), {})
        eps = next((r["train"][site].get("epsilon") for r in reversed(rounds)
                    if site in r.get("train", {}) and r["train"][site].get("epsilon") is not None), None)
        eps_max = next((r["train"][site].get("epsilon-max") for r in reversed(rounds)
                        if site in r.get("train", {}) and r["train"][site].get("epsilon-max") is not None), None)
        took = sum(1 for r in rounds if site in r.get("train", {}) and not r["train"][site].get("refused")
                   and not any(d["site"] == site for d in r.get("dropped", [])))
        site_rows.append([site, took, _f(last_eval.get("auroc")), int(last_eval.get("studies", 0)),
                          "off" if eps is None else f"{eps:.2f} of {_f(eps_max, 2)}"])
    final = history.get("final") or {}
    final_rows = []
    for site, m in sorted((final.get("sites") or {}).items()):
        final_rows.append([site, int(m.get("studies", 0)), f"{int(m.get('positives', 0))}/{int(m.get('negatives', 0))}",
                           _f(m.get("auroc")), _f(m.get("sensitivity")), _f(m.get("specificity")),
                           _f(m.get("balanced-accuracy")), _f(m.get("brier"))])
    weighted = final.get("weighted") or {}
    if final_rows:
        final_rows.append(["all sites (weighted)", sum(int(r[1]) for r in final_rows), "", _f(weighted.get("auroc")),
                           _f(weighted.get("sensitivity")), _f(weighted.get("specificity")),
                           _f(weighted.get("balanced-accuracy")), _f(weighted.get("brier"))])
    page_path = Path(page_path or run_dir / "report.html")
    rel = Path(os.path.relpath(run_dir / "plots", page_path.parent)).as_posix()
    imgs = "".join(f'<figure><img src="{rel}/{n}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption>'
                   f"</figure>" for n, t in plots)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>oncofed run {html.escape(str(history.get('run_id')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f0f3f7; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} img {{ max-width: 560px; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Federated run {html.escape(str(history.get('run_id')))}</h1>
<p>Task <b>{html.escape(str(history.get('task')))}</b>, strategy <b>{html.escape(str(history.get('strategy')))}</b>,
{sum(1 for r in rounds if r["round"] >= 1)} round(s), sites: {html.escape(', '.join(sites) or 'none')}.
Global model: <code>{html.escape(str(run_dir / 'model.pt'))}</code>.</p>
{'<p><b>Secure aggregation (SecAgg+)</b>: the server saw only the sum of the sites&#39; updates, so single '
 'updates could not be validated; each site clipped its values before masking.</p>'
 if any(r.get('secure_aggregation') for r in rounds) else ''}
<h2>Final evaluation on each site's test split</h2>
{_table(['site', 'studies', 'pos/neg', 'AUROC', 'sensitivity', 'specificity', 'bal. acc.', 'Brier'], final_rows)
 if final_rows else '<p class="note">No final evaluation in this run.</p>'}
<p class="note">Study-level metrics at threshold 0.5, computed at each site on its own data; only the figures left the
site.</p>
<h2>Sites</h2>
{_table(['site', 'rounds aggregated', 'last val AUROC', 'val studies', 'ε spent (DP)'], site_rows)}
<h2>Rounds</h2>
{_table(['round', 'wall s', 'slowest site s', 'framework overhead', 'aggregated/asked', 'train loss',
         'val AUROC (weighted)'], round_rows)}
<h2>Dropped, refused and failed replies</h2>
{_table(['round', 'site', 'what', 'why'], events) if events else '<p>None: every site took part in every round.</p>'}
<h2>Plots</h2>
{imgs}
<p class="note">{'TensorBoard: <code>tensorboard --logdir ' + html.escape(str(run_dir / 'tensorboard')) + '</code>'
                  if has_tb else 'TensorBoard is not installed: no event files written.'}</p>
</body></html>
"""
    page_path.write_text(page)
    return page_path

"""The run report: an HTML page with PNG plots, and TensorBoard event files, from a run directory.

``write_report(RUN_DIR)`` reads ``history.json`` and writes ``RUN_DIR/report.html``,
``RUN_DIR/plots/*.png`` and ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_server.evaluation import MIN_CASES
from fl_server.rounds import RoundRecord
from models.config import resolve_batch, stored_server_step
from models.evaluation import SCORE_BINS, HeldOutFigures
from models.protocol import Metric, headline_metric, report_metrics
from models.tasks import TASK_ROUNDS

__all__ = ["start_text", "write_report"]


def _load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "history.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no history.json): pass the folder the "
                                "server wrote (its run-dir)")
    return dict(json.loads(path.read_text()))


_SETTINGS = (("task", "task"), ("resolution", "resolution profile"), ("model", "network"),
             ("strategy", "strategy"), ("num-rounds", "rounds"), ("local-epochs", "local epochs"),
             ("batch-size", "batch size"), ("learning-rate", "learning rate"), ("optimizer", "optimizer"),
             ("proximal-mu", "FedProx μ"), ("server-learning-rate", "server learning rate"),
             ("server-momentum", "server momentum"), ("dp", "DP-SGD"), ("dp-epsilon", "DP ε per site (run)"),
             ("dp-delta", "DP δ (0: the site's)"),
             ("dp-max-grad-norm", "DP clipping norm"), ("dp-accountant", "DP accountant"),
             ("secure-aggregation", "secure aggregation"), ("operating-point", "operating point rule"),
             ("seed", "seed"))
_PACKAGES = ("oncofed", "flwr", "torch", "monai", "opacus", "pydicom", "highdicom", "numpy")


def _utc(seconds: Any) -> str:
    import datetime

    if not seconds:
        return "—"
    return datetime.datetime.fromtimestamp(float(seconds), tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def start_text(start: Mapping[str, Any]) -> str:
    """What a start is, in words: a local run's model (round 0) or a federated run's of its round."""
    kind = "a local run's" if not start.get("round") else f"a federated run's (round {start.get('round')})"
    try:
        tested = HeldOutFigures.from_dict(start.get("tested"))
    except ValueError:  # the history is the server's own; an edited one shows the start without its figure
        tested = None
    return (f"{kind} {start.get('task')} model{' trained under DP-SGD' if start.get('dp') else ''}"
            + (f"; {tested.describe()}" if tested is not None else ""))


def _run_html(run_dir: Path, history: Mapping[str, Any]) -> str:
    """What a clinician files with the figures: the run, its dates, its settings and the software that made it."""
    import importlib.metadata

    config = {}
    if (run_dir / "config.json").is_file():
        doc = json.loads((run_dir / "config.json").read_text())
        config = dict(doc.get("run_config") or {})
        started = doc.get("started")
    else:
        started = None
    rows = [[label, str(config[key])] for key, label in _SETTINGS if key in config]
    # Runs stored before the count was written out resolved (they ran TASK_ROUNDS, DP or not).
    if str(config.get("num-rounds", "")) == "0" and str(config.get("task", "")) in TASK_ROUNDS:
        rows = [[label, f"{TASK_ROUNDS[str(config['task'])]} (the task's count)" if label == "rounds" else value]
                for label, value in rows]
    if str(config.get("server-learning-rate", "")) in ("0", "0.0"):  # stored unresolved: before 0.3.5
        step = "1 (the mean itself)" if stored_server_step(config) == 1.0 else "the strategy's default"
        rows = [[label, step if label == "server learning rate" else value] for label, value in rows]
    if str(config.get("batch-size", "")) == "0":  # the default: say what it means
        dp = str(config.get("dp", "")).lower() == "true"
        rows = [[label, f"{resolve_batch(0, dp=dp)} (default{', DP-SGD' if dp else ''})" if label == "batch size"
                 else value] for label, value in rows]
    start = history.get("initial_model")
    if isinstance(start, dict):  # the model the run started from, by its digest (the path is the lead's)
        rows.append(["initial model", f"{Path(str(start.get('file', ''))).name}, sha256 {str(start.get('sha256'))[:16]}"
                     f"…, {start_text(start)}"])
    else:
        rows.append(["initial model", "fresh weights (seed)"])
    versions = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return (f"<h2>Run</h2><p>Run <b>{html.escape(str(history.get('run_id')))}</b>, started "
            f"{_utc(started or history.get('started'))}, finished {_utc(history.get('finished'))}. Research use only: "
            "not for clinical decisions.</p>" + (_table(["setting", "value"], rows) if rows else "")
            + f"<p class='note'>Software (the lead's machine, when this page was written): "
              f"{html.escape(', '.join(versions))}.</p>")


def _series(rounds: list[RoundRecord], stage: str, key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in rounds:
        for site, metrics in getattr(record, stage).items():
            if key in metrics:
                out.setdefault(site, []).append((record.round, float(metrics[key])))
    return out


def _aggregated(rounds: list[RoundRecord], stage: str, key: str) -> list[tuple[int, float]]:
    return [(r.round, float(getattr(r, stage)[key])) for r in rounds if key in getattr(r, stage)]


def _plots(rounds: list[RoundRecord], out: Path, headline: Metric) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    title = "Validation AUROC (studies)" if headline == Metric.AUROC else "Validation Dice (studies with a lesion)"
    panels = [(f"val-{headline}.png", title, "evaluate", headline, "aggregated_evaluate", (0, 1)),
              ("val-loss.png", "Validation loss", "evaluate", Metric.EVAL_LOSS, "aggregated_evaluate", None),
              ("train-loss.png", "Training loss", "train", Metric.TRAIN_LOSS, "aggregated_train", None),
              ("epsilon.png", "Cumulative ε per site (DP)", "train", Metric.EPSILON, None, None)]
    for name, title, stage, key, agg, ylim in panels:
        series = _series(rounds, stage, key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for site, points in sorted(series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
        if agg:
            points = _aggregated(rounds, agg, key)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], color="black", linewidth=2.5,
                        label="all sites (weighted)")
        if key == Metric.AUROC:
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


def _tensorboard(rounds: list[RoundRecord], out: Path) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional for the page itself
        return False
    writer = SummaryWriter(log_dir=str(out))
    try:
        for record in rounds:
            for stage in ("train", "evaluate"):
                for site, metrics in getattr(record, stage).items():
                    for key, value in metrics.items():
                        writer.add_scalar(f"{stage}/{key}/{site}", float(value), record.round)
            for stage in ("aggregated_train", "aggregated_evaluate"):
                for key, value in getattr(record, stage).items():
                    writer.add_scalar(f"{stage}/{key}", float(value), record.round)
            if record.seconds is not None:
                writer.add_scalar("timing/round_seconds", float(record.seconds), record.round)
    finally:
        writer.close()
    return True


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def _with_ci(m: Mapping[str, Any], key: Metric) -> str:
    """A figure, with its 95 % interval when the site sent one (AUROC: DeLong)."""
    if key == Metric.AUROC and m.get(Metric.AUROC_LOW) is not None and m.get(key) is not None:
        return f"{m[key]:.3f} ({m[Metric.AUROC_LOW]:.3f}–{m[Metric.AUROC_HIGH]:.3f})"
    return _f(m.get(key))


def _operating_point_html(consortium: Mapping[str, Any]) -> str:
    """The operating point section: the rule, the threshold and the test rates at it, pooled and per site."""
    op = consortium.get("operating_point")
    if not op:
        return ""

    def rate(r: Mapping[str, Any], key: str) -> str:
        value, ci = r.get(key), r.get(f"{key}_ci95")
        return "—" if value is None else f"{value:.3f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")

    rows = [[site, f"{r['positives']}/{r['negatives']}", rate(r, "sensitivity"), rate(r, "specificity")]
            for site, r in op["sites"].items()]
    c = op["consortium"]
    rows.append(["consortium", f"{c['positives']}/{c['negatives']}", rate(c, "sensitivity"), rate(c, "specificity")])
    auc = consortium.get("auroc") or {}
    cal = consortium.get("calibration") or {}
    return (f"<h2>Operating point</h2><p>Rule: <b>{html.escape(op['rule_text'])}</b> (run-config "
            f"<code>operating-point={html.escape(op['rule'])}</code>), chosen on {html.escape(op['chosen_on'])}: "
            f"threshold <b>{op['threshold']:.4f}</b>. Test split at that threshold (95 % Wilson intervals):</p>"
            + _table(["site", "pos/neg", "sensitivity", "specificity"], rows)
            + (f"<p class='note'>Consortium AUROC {auc['auroc']:.3f} (95 % CI {auc['low']:.3f}–{auc['high']:.3f}, "
               f"{html.escape(auc['method'])}) from the sites' score histograms on {SCORE_BINS} fixed bins: it "
               f"differs from the AUROC of all studies pooled by at most {auc['max_error']:.4f}. No per-study score "
               "left a site.</p>" if auc else "")
            + (f"<p class='note'>Calibration: expected calibration error {cal['ece']:.3f} (10 bins, from the "
               "histograms).</p>" if cal.get("ece") is not None else "")
            + _recalibration_html(cal.get("recalibrated"), op))


def _recalibration_html(recal: Mapping[str, Any] | None, op: Mapping[str, Any]) -> str:
    """The Platt scaling the global model carries: its fit, its error on test, the threshold on its scale."""
    if not recal:
        return ""
    if not recal.get("fitted"):
        return f"<p class='note'>Recalibration: not fitted ({html.escape(str(recal.get('reason', '')))}).</p>"
    ece = recal.get("ece")
    what = ("Platt scaling (slope and intercept)" if recal.get("update", "logistic") == "logistic" else
            "recalibration in the large (the intercept alone)")
    test = (f" and adopted by a closed test against the network's own scores (likelihood-ratio χ² "
            f"{recal['statistic']:.1f})" if "statistic" in recal else "")
    return (f"<p>Recalibration carried by the global model (sites show these probabilities): {what}, fitted on "
            f"the {html.escape(str(recal['fitted_on']))} ({recal['positives']}/{recal['negatives']} studies)"
            f"{test}: "
            f"probability = sigmoid({recal['slope']:.3f} × logit {recal['intercept']:+.3f}). On the test split its "
            "expected calibration error is " + ("—" if ece is None else f"<b>{ece:.3f}</b>")
            + f"; the operating point {op['threshold']:.4f} reads {recal['threshold']:.4f} on the calibrated scale "
            "(the same calls: the recalibration keeps the order of the scores, and so the AUROC).</p>")


def _subgroups_html(subgroups: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Per site, the test figures per scanner vendor, slice thickness band and MR field strength band."""
    rows = []
    for site, groups in sorted(subgroups.items()):
        for name, g in sorted(groups.items()):
            kind, value = name.split(":", 1)
            unit = {"slice-mm": " mm", "field-t": " T"}.get(kind, "")
            auc = ("—" if g.get("auroc") is None else f"{g['auroc']:.3f}"
                   + (f" ({g['auroc-low']:.2f}–{g['auroc-high']:.2f})" if g.get("auroc-low") is not None else ""))
            rows.append([site, kind, value + unit, int(g.get("studies", 0)),
                         f"{int(g.get('positives', 0))}/{int(g.get('negatives', 0))}", auc])
    if not rows:
        return ""
    return ("<h2>Subgroups (test split)</h2>" + _table(["site", "subgroup", "value", "studies", "pos/neg",
                                                       "AUROC (95 % CI)"], rows)
            + "<p class='note'>Each site's studies by the series they were scored on; a subgroup of fewer studies "
              "than the site's minimum count is not sent.</p>")


def _consortium_plots(consortium: Mapping[str, Any], out: Path) -> list[tuple[str, str]]:
    """ROC curves (pooled and per site) and the reliability diagram of the final model on the test split."""
    if not consortium.get("roc"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, points in consortium["roc"].items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=2.5 if name == "consortium" else 1.2,
                    color="black" if name == "consortium" else None, label=name)
    op = consortium.get("operating_point") or {}
    c = op.get("consortium") or {}
    if c.get("sensitivity") is not None and c.get("specificity") is not None:
        ax.plot([1 - c["specificity"]], [c["sensitivity"]], "r*", markersize=12,
                label=f"operating point {op['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on the test split (from histograms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)
    made = [("roc.png", "ROC on the test split")]
    curve = (consortium.get("calibration") or {}).get("curve") or []
    if curve:
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        ax.plot([c["predicted"] for c in curve], [c["observed"] for c in curve], marker="o", color="tab:blue",
                label="consortium, the network's scores")
        recal = (consortium.get("calibration") or {}).get("recalibrated") or {}
        if recal.get("fitted") and recal.get("curve"):
            ax.plot([c["predicted"] for c in recal["curve"]], [c["observed"] for c in recal["curve"]], marker="s",
                    color="tab:orange", label="consortium, recalibrated (fitted on validation)")
        for c in curve:
            ax.annotate(str(c["studies"]), (c["predicted"], c["observed"]), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed share of positive studies")
        ax.set_title("Reliability (test split; studies per bin)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "reliability.png", dpi=90)
        plt.close(fig)
        made.append(("reliability.png", "Reliability diagram (calibration)"))
    return made


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
    rounds = [RoundRecord.from_dict(r) for r in history["rounds"]]
    task = str(history.get("task") or "")
    headline, shown = headline_metric(task), report_metrics(task)
    name = dict((m, t) for t, m in shown)[headline]
    plots = _plots(rounds, run_dir / "plots", headline)
    has_tb = _tensorboard(rounds, run_dir / "tensorboard")
    sites = sorted({s for r in rounds for s in r.sites()})
    round_rows = []
    for r in rounds:
        if r.round < 1:
            continue
        round_rows.append([r.round, _f(r.seconds, 1), _f(r.slowest_site_seconds, 1),
                           f"{100 * r.overhead:.0f} %" if r.overhead is not None else "—",
                           f"{r.aggregated_sites}/{r.asked_train}", _f(r.aggregated_train.get(Metric.TRAIN_LOSS)),
                           _f(r.aggregated_evaluate.get(headline)),
                           (f"{r.consortium['auroc']:.3f} ({r.consortium['low']:.2f}–{r.consortium['high']:.2f})"
                            if r.consortium else "—")])
    events = []
    for r in rounds:
        for kind, entries in (("dropped", r.dropped), ("refused", r.refused), ("failed", r.failed),
                              ("warning", r.warnings)):
            for e in entries:
                events.append([r.round, e.get("site", "?"), kind, e.get("reason", "")])
    for kind in ("refused", "failed"):
        for e in (history.get("final") or {}).get(kind, []):
            events.append(["final", e.get("site", e.get("node", "?")), kind, e.get("reason", "")])
    site_rows = []
    for site in sites:
        last_eval: dict[str, Any] = next((r.evaluate[site] for r in reversed(rounds) if site in r.evaluate), {})
        eps = next((r.train[site][Metric.EPSILON] for r in reversed(rounds)
                    if r.train.get(site, {}).get(Metric.EPSILON) is not None), None)
        eps_max = next((r.train[site][Metric.EPSILON_MAX] for r in reversed(rounds)
                        if r.train.get(site, {}).get(Metric.EPSILON_MAX) is not None), None)
        took = sum(1 for r in rounds if r.took_part(site))
        site_rows.append([site, took, _f(last_eval.get(headline)), int(last_eval.get(Metric.STUDIES, 0)),
                          "off" if eps is None else f"{eps:.2f} of {_f(eps_max, 2)}"])
    final = history.get("final") or {}
    small = set(final.get("too_small") or [])
    final_rows = []
    for site, m in sorted((final.get("sites") or {}).items()):
        final_rows.append([site + (" ⚠ too few to judge" if site in small else ""), int(m.get(Metric.STUDIES, 0)),
                           f"{int(m.get(Metric.POSITIVES, 0))}/{int(m.get(Metric.NEGATIVES, 0))}",
                           *(_with_ci(m, k) for _, k in shown)])
    weighted = final.get("weighted") or {}
    consortium = final.get("consortium") or {}
    if final_rows:
        final_rows.append(["mean of sites (weighted by studies)", sum(int(r[1]) for r in final_rows), "",
                           *(_f(weighted.get(k)) for _, k in shown)])
    auc = consortium.get("auroc")
    if auc:
        final_rows.append(["consortium (all studies, from histograms)", auc["positives"] + auc["negatives"],
                           f"{auc['positives']}/{auc['negatives']}",
                           f"{auc['auroc']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})",
                           *(["—"] * (len(shown) - 1))])
    operating_html = _operating_point_html(consortium) + _subgroups_html(final.get("subgroups") or {})
    if final.get("without_histograms"):
        operating_html += ("<p class='note'>Not in the consortium figures: "
                           + ", ".join(html.escape(s) for s in final["without_histograms"])
                           + " (a test class smaller than the site's minimum count, so the site sent no score "
                             "histogram).</p>")
    plots += _consortium_plots(consortium, run_dir / "plots")
    cross = history.get("cross_site") or {}
    cross_models = cross.get("models") or {}
    cross_sites = sorted({s for per in cross_models.values() for s in per})
    cross_rows = [[model, *[(f"{per[s][headline]:.3f} ({int(per[s].get(Metric.STUDIES, 0))})"
                             if headline in per.get(s, {}) else "—") for s in cross_sites]]
                  for model, per in cross_models.items()]
    cross_html = ("<h2>Cross-site evaluation (test split)</h2>"
                  + _table(["model \\ evaluated at", *cross_sites], cross_rows)
                  + f"<p class='note'>{html.escape(name)} (studies). {html.escape(str(cross.get('note', '')))}. "
                    "Sending a site's local model to the others shows them a model trained on that site alone.</p>"
                  if cross_rows else "")
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
{sum(1 for r in rounds if r.round >= 1)} round(s), sites: {html.escape(', '.join(sites) or 'none')}.
Global model: <code>{html.escape(str(run_dir / 'model.pt'))}</code>.</p>
{'<p><b>Secure aggregation (SecAgg+)</b>: the server saw only the sum of the sites&#39; updates, so single '
 'updates could not be validated; each site clipped its values before masking.</p>'
 if any(r.secure_aggregation for r in rounds) else ''}
<h2>Final evaluation on each site's test split</h2>
{_table(['site', 'studies', 'with/without lesion' if headline == Metric.DICE else 'pos/neg', *(t for t, _ in shown)],
        final_rows) if final_rows else '<p class="note">No final evaluation in this run.</p>'}
<p class="note">{'Per study, voxels above 0.5 on the network grid: Dice over the studies with a lesion; a lesion is '
 'found when the predicted lesions touching it reach an IoU of 0.1; HD95 over the studies with a lesion and a '
 'prediction' if headline == Metric.DICE else 'Study-level metrics at threshold 0.5'}, computed at each site on its
own data; only the figures left the site. AUROC intervals: DeLong, 95 %. ⚠: fewer than {MIN_CASES} positive or
negative test studies, too few to judge.</p>
{operating_html}
{cross_html}
<h2>Sites</h2>
{_table(['site', 'rounds aggregated', f'last val {name}', 'val studies', 'ε spent (DP)'], site_rows)}
<h2>Rounds</h2>
{_table(['round', 'wall s', 'slowest site s', 'framework overhead', 'aggregated/asked', 'train loss',
         f'val {name} (weighted)', 'val AUROC, consortium (95 % CI)'], round_rows)}
{_run_html(run_dir, history)}
<h2>Dropped, refused and failed replies, and warnings</h2>
{_table(['round', 'site', 'what', 'why'], events) if events else '<p>None: every site took part in every round.</p>'}
<h2>Plots</h2>
{imgs}
<p class="note">{'TensorBoard: <code>tensorboard --logdir ' + html.escape(str(run_dir / 'tensorboard')) + '</code>'
                  if has_tb else 'TensorBoard is not installed: no event files written.'}</p>
</body></html>
"""
    page_path.write_text(page)
    return page_path

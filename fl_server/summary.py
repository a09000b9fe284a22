"""The consortium's data summary before training: each site's answer to a query message, one table per task
across sites, plots, and plain-words warnings of what will hurt a federated model.

Each site answers with its own summary (``fl_client.summary``: counts and distributions on fixed vocabularies,
small counts suppressed, passed through its egress guard) or refuses; the ServerApp asks before round 1 of every
run and for ``oncofed-server summary``. Written to ``RUN_DIR/summary/``: ``summary.json`` (schema
``oncofed.data-summary/1``), ``summary.html`` and PNG plots.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.config import DP_NOISE_PER_BATCH
from models.protocol import (
    FIELD_T_BINS,
    INTENSITY_BINS,
    MODEL_FAMILIES,
    PIXEL_MM_BINS,
    SLICE_MM_BINS,
    SUPPRESSED,
    VENDORS,
    Record,
    RoundKey,
    Split,
)
from models.tasks import TASK_DIMS

__all__ = ["SCHEMA", "build_summary", "dp_noise", "query_sites", "warnings_of", "write_summary"]

SCHEMA = "oncofed.data-summary/1"
NOISE_PER_BATCH = DP_NOISE_PER_BATCH  # see models.config.DP_NOISE_PER_BATCH
INTENSITY_FAR = 0.35  # total-variation distance of a site's intensity histogram from the others' mean


def query_sites(grid: Any, *, run_id: str, timeout: float) -> list[dict[str, Any]]:
    """Send the data-summary query to every connected site; per site its summary (``values``), refusal
    (``refused``) or failure (``failed``)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fl_server.strategies import refusal_of, registered_names, site_of

    messages = [Message(content=RecordDict({Record.CONFIG: ConfigRecord({RoundKey.RUN_ID: run_id})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    names = registered_names(grid)
    out: list[dict[str, Any]] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = site_of(reply, names, grid)
        if reply.has_error():
            out.append({"site": site, "failed": reply.error.reason})
        elif (refusal := refusal_of(reply)) is not None:
            out.append({"site": site, "refused": refusal})
        elif Record.SUMMARY in reply.content:
            values = {str(k): float(v) for k, v in reply.content[Record.SUMMARY].items()}  # type: ignore[arg-type]
            out.append({"site": site, "values": values})
        else:
            out.append({"site": site, "failed": "the reply held no summary"})
    return sorted(out, key=lambda r: r["site"])


def _count(values: Mapping[str, float], key: str) -> float | None:
    """A count (None when the site suppressed it: fewer than its minimum)."""
    value = values.get(key, 0.0)
    return None if value == SUPPRESSED else value


def _shown(value: float | None) -> str:
    return "<min" if value is None else f"{value:g}"


def build_summary(replies: Iterable[Mapping[str, Any]], *, run_config: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The consortium's summary document: per task, one row per site, and the warnings.

    Args:
        replies: :func:`query_sites`' result.
        run_config: The run's flat configuration (its DP request feeds the warnings).
    """
    replies = list(replies)
    tasks: dict[str, Any] = {}
    for task in TASK_DIMS:
        rows = []
        for r in replies:
            if "values" not in r:
                continue
            v = r["values"]
            row: dict[str, Any] = {"site": r["site"], "studies": _count(v, f"{task}:studies"),
                                   "labelled": _count(v, f"{task}:labelled"),
                                   "suppressed": int(v.get(f"{task}:suppressed", 0))}
            for split in Split:
                row[f"{split}_pos"] = _count(v, f"{task}:{split}:pos")
                row[f"{split}_neg"] = _count(v, f"{task}:{split}:neg")
            row["train_patients"] = _count(v, f"{task}:train:patients") if f"{task}:train:patients" in v else None
            row["train_patients_few"] = v.get(f"{task}:train:patients") == SUPPRESSED  # fewer than the site's minimum
            for prefix, names in (("vendor", VENDORS), ("model", MODEL_FAMILIES),
                                  ("slice-mm", SLICE_MM_BINS), ("pixel-mm", PIXEL_MM_BINS),
                                  ("field-t", FIELD_T_BINS)):
                row[prefix] = {n: _count(v, f"{task}:{prefix}:{n}") for n in names if v.get(f"{task}:{prefix}:{n}")}
            hist = [v.get(f"{task}:intensity:{i}", 0.0) for i in range(INTENSITY_BINS)]
            row["intensity"] = hist if any(hist) else None
            rows.append(row)
        tasks[task] = {"sites": rows}
    doc = {"schema": SCHEMA, "created": time.time(), "tasks": tasks,
           "refused": [{"site": r["site"], **r["refused"]} for r in replies if "refused" in r],
           "failed": [{"site": r["site"], "reason": r["failed"]} for r in replies if "failed" in r]}
    doc["warnings"] = warnings_of(doc, run_config or {})
    return doc


def dp_noise(samples: int, run_config: Mapping[str, Any]) -> tuple[float, float]:
    """The DP-SGD noise multiplier a site of ``samples`` training patients (DP-SGD's unit of privacy) needs for the
    run's ε over all its steps, and its expected batch (Poisson rate and steps as the sites count them; δ = 1/(10 n)
    when the run sets none)."""
    import math

    from opacus.accountants.utils import get_noise_multiplier

    from models.config import batch_size_of, from_flat

    config = from_flat({k: v for k, v in run_config.items() if k not in ("sim-sites",)})
    rate = 1.0 / max(1, math.ceil(samples / batch_size_of(config)))
    steps = config.training.local_epochs * max(1, int(1 / rate)) * config.federation.num_rounds
    delta = config.privacy.delta or 1.0 / (10 * samples)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' note on the range of RDP orders
            sigma = float(get_noise_multiplier(target_epsilon=config.privacy.epsilon, target_delta=delta,
                                               sample_rate=rate, steps=steps,
                                               accountant=config.privacy.accountant.value))
    except ValueError:  # no noise reaches the target
        sigma = float("inf")
    return sigma, rate * samples


def warnings_of(doc: Mapping[str, Any], run_config: Mapping[str, Any]) -> list[str]:
    """Plain-words warnings of what will hurt a federated model, for the tasks the sites hold data of."""
    out: list[str] = []
    dp = str(run_config.get("dp", "false")).lower() in ("true", "1")
    task_of_run = str(run_config.get("task", ""))
    for task, entry in doc["tasks"].items():
        rows = [r for r in entry["sites"] if (r["labelled"] or 0) > 0 or r["labelled"] is None]
        if not rows:
            continue
        for r in rows:
            for split in (Split.VAL, Split.TEST):
                pos, neg = r[f"{split}_pos"], r[f"{split}_neg"]
                if pos == 0 and (neg or 0) != 0:
                    out.append(f"{task}: site {r['site']} has no positive study in its {split} split: its AUROC "
                               "cannot be computed there")
                if neg == 0 and (pos or 0) != 0:
                    out.append(f"{task}: site {r['site']} has no negative study in its {split} split")
            # DP-SGD samples patients: their count where the site sent it (a site before 0.3.5 did not, and its
            # training studies are then the nearest figure: at least as many as its patients).
            patients = r.get("train_patients")
            train = int(patients) if patients else int((r["train_pos"] or 0) + (r["train_neg"] or 0))
            unit = "training patients" if patients else "training studies"
            if dp and task == task_of_run and r.get("train_patients_few"):
                out.append(f"{task}: site {r['site']} has fewer training patients than its minimum count (sent "
                           "suppressed): DP-SGD cannot learn from so few; leave the site out of a DP run")
            elif dp and task == task_of_run and train > 0:
                sigma, batch = dp_noise(train, run_config)
                if sigma / batch > NOISE_PER_BATCH:
                    out.append(f"{task}: site {r['site']} has about {train} {unit}; DP-SGD at the run's "
                               f"ε over all its rounds needs a noise multiplier of {sigma:.1f} on batches of about "
                               f"{batch:.0f} ({sigma / batch:.2f} of the clipping norm on each averaged gradient, "
                               f"above {NOISE_PER_BATCH:g}): learning is unlikely; fewer rounds or a larger ε help")
        if len(rows) >= 2:
            for prefix, what in (("vendor", "scanner vendor"), ("model", "scanner line"),
                                 ("slice-mm", "slice thickness of"),
                                 ("field-t", "field strength of")):
                holders: dict[str, list[str]] = {}
                for r in rows:
                    for name in r[prefix]:
                        holders.setdefault(name, []).append(r["site"])
                for name, sites in sorted(holders.items()):
                    if len(sites) == 1:
                        unit = {"slice-mm": " mm", "field-t": " T"}.get(prefix, "")
                        out.append(f"{task}: only site {sites[0]} has a {what} {name}{unit}: the others' data cannot "
                                   "teach the model about it")
            hists = [(r["site"], r["intensity"]) for r in rows if r["intensity"]]
            for site, hist in hists:
                others = [h for s, h in hists if s != site]
                if not others:
                    continue
                mean = [sum(col) / len(others) for col in zip(*others, strict=True)]
                distance = 0.5 * sum(abs(a - b) for a, b in zip(hist, mean, strict=True))
                if distance > INTENSITY_FAR:
                    out.append(f"{task}: site {site}'s preprocessed intensities are far from the others' (total "
                               f"variation {distance:.2f}): check its scanner calibration or protocol")
    return out


def write_summary(run_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/summary/`` (JSON, HTML, plots); return the HTML page."""
    folder = Path(run_dir) / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(doc, indent=1))
    plots = _plots(doc, folder)
    parts = [f"<h1>Data summary of the consortium</h1><p>{len(doc.get('refused', []))} site(s) refused, "
             f"{len(doc.get('failed', []))} failed. Counts below a site's minimum are shown as &lt;min.</p>"]
    if doc.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in doc["warnings"])
                     + "</ul>")
    for task, entry in doc["tasks"].items():
        rows = entry["sites"]
        if not any((r["labelled"] or 0) > 0 or r["labelled"] is None for r in rows):
            continue
        head = ["site", "studies", "labelled", *[f"{s} pos/neg" for s in Split], "vendors", "scanner lines",
                "slice mm", "pixel mm"]
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                r["site"], _shown(r["studies"]), _shown(r["labelled"]),
                *[f"{_shown(r[f'{s}_pos'])}/{_shown(r[f'{s}_neg'])}" for s in Split],
                ", ".join(f"{k} {_shown(v)}" for k, v in r["vendor"].items()),
                ", ".join(f"{k} {_shown(v)}" for k, v in r["model"].items()),
                ", ".join(f"{k} {_shown(v)}" for k, v in r["slice-mm"].items()),
                ", ".join(f"{k} {_shown(v)}" for k, v in r["pixel-mm"].items()))) + "</tr>" for r in rows)
        parts.append(f"<h2>{html.escape(task)}</h2><table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>"
                     f"{body}</table>")
        for name in plots.get(task, []):
            parts.append(f'<img src="{name}" alt="{html.escape(task)}">')
    for kind in ("refused", "failed"):
        for e in doc.get(kind, []):
            parts.append(f"<p>site {html.escape(str(e['site']))} {kind}: {html.escape(str(e.get('reason', '')))}</p>")
    page = folder / "summary.html"
    page.write_text("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>oncofed data summary</title>"
                    "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
                    "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>" + "".join(parts)
                    + "</body></html>")
    return page


def _plots(doc: Mapping[str, Any], folder: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {}
    for task, entry in doc["tasks"].items():
        rows = [r for r in entry["sites"] if (r["labelled"] or 0) > 0]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        sites = [r["site"] for r in rows]
        for i, split in enumerate(Split):
            pos = [r[f"{split}_pos"] or 0 for r in rows]
            neg = [r[f"{split}_neg"] or 0 for r in rows]
            x = [k + i * 0.27 for k in range(len(rows))]
            axes[0].bar(x, neg, width=0.25, color=f"C{i}", alpha=0.45)
            axes[0].bar(x, pos, width=0.25, bottom=neg, color=f"C{i}", label=f"{split} (dark: positives)")
        axes[0].set_xticks([k + 0.27 for k in range(len(rows))], sites)
        axes[0].set_ylabel("studies")
        axes[0].set_title(f"{task}: label balance per split")
        axes[0].legend(fontsize=7)
        for r in rows:
            if r["intensity"]:
                axes[1].plot(range(INTENSITY_BINS), r["intensity"], marker=".", label=r["site"])
        axes[1].set_title("preprocessed intensity (share per bin)")
        axes[1].set_xlabel("bin of the network's input range")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        name = f"{task}.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        made[task] = [name]
    return made

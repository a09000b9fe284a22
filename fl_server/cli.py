"""``oncofed-server``: the consortium lead's command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from models.config import RunKey

__all__ = [
    "UserError",
    "app_defaults",
    "build_parser",
    "cmd_export",
    "cmd_provision",
    "cmd_report",
    "cmd_run",
    "cmd_simulate",
    "cmd_start",
    "cmd_status",
    "cmd_stop",
    "cmd_summary",
    "main",
    "nothing_trained",
    "parse_sets",
]

EPILOG_SIMULATE = """examples:
  oncofed-server simulate --sites ws --run-dir runs/lung-sim --set task=lung-ct --set num-rounds=5
  oncofed-server simulate --sites ws --run-dir runs/mg --set task=breast-mg --set strategy=fedprox \\
      --set proximal-mu=0.01
  oncofed-server simulate --sites ws --run-dir runs/lung-sim --resume   # continue after a stop
  oncofed-server simulate --sites ws --run-dir runs/mg-dp --set task=breast-mg --set dp=true \\
      --set num-rounds=5 --set learning-rate=3e-3 --initial-model public/breast-model.pt
      # a short DP-SGD run from a model trained on public data

Every folder under --sites is one simulated hospital (a workspace made by 'oncofed-site ingest').
Starts a private Flower SuperLink on 127.0.0.1, runs 'flwr run' of this project's apps, prints one
line per round, writes RUN_DIR (checkpoints, history.json, model.pt, report.html) and stops it.
--set takes any key of [tool.flwr.app.config] in pyproject.toml (the README lists them)."""

EPILOG_REPORT = """example:
  oncofed-server report runs/lung-sim
  # then open runs/lung-sim/report.html; tensorboard --logdir runs/lung-sim/tensorboard

Writes RUN_DIR/report.html with PNG plots (per-round loss and AUROC per site and aggregated, ε per
site), the sites that took part, were dropped or refused (and why), and the final test table."""


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def app_defaults() -> dict[str, Any]:
    """Every run-config key with its default value, from the typed configuration (the one source of defaults;
    ``[tool.flwr.app.config]`` in ``pyproject.toml`` must equal it, which a test checks)."""
    from models.config import RunConfig

    return RunConfig().to_flat()


def parse_sets(values: Sequence[str], context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs into typed run-config values, parsed and checked by the typed configuration, together
    with ``context`` (settings given otherwise: ``--initial-model``, or a resumed run's stored ones).

    Raises:
        UserError: A pair without ``=``, an unknown key (with the closest known one), a bad value or combination.
    """
    from models.config import ConfigError, from_flat

    raw: dict[str, str] = {}
    for item in values:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set task=lung-ct")
        key, value = (s.strip() for s in item.split("=", 1))
        raw[key] = value
    try:
        flat = from_flat({**(context or {}), **raw}).to_flat()
    except ConfigError as exc:
        raise UserError(f"--set: {exc}") from None
    # A value that means "the task's default" stays as given: it is resolved once the run's task is known (on a
    # resume, the stored task), not against the default task here.
    return {key: raw[key] if _is_sentinel(key, raw[key]) else flat[key] for key in raw}


_SENTINELS = {RunKey.NUM_ROUNDS: 0.0, RunKey.LEARNING_RATE: 0.0, RunKey.SERVER_MOMENTUM: -1.0,
              RunKey.PROXIMAL_MU: -1.0, RunKey.SERVER_LEARNING_RATE: 0.0}


def _is_sentinel(key: str, value: str) -> bool:
    """Whether ``value`` means "the task's default" for ``key`` (``norm=auto`` too)."""
    return _SENTINELS.get(key) == _number(value) or (key == RunKey.NORM and value.strip().lower() == "auto")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


SET_HELP = ("a run-config value (repeat); keys: " + ", ".join(RunKey) +
            " (defaults and meaning: README, 'Run federated training')")

_ROUND = re.compile(r"oncofed: (round .*)$")


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config from --set, with --resume checked against the run directory, and the run's count of rounds
    always written out: every site then reads the count the server runs, not its own version's default. A resumed
    run keeps every setting it was started with (its count of rounds, strategy, server momentum, ...) unless --set
    says otherwise."""
    from models.config import KEYS, ConfigError, from_flat, stored_server_step

    initial = getattr(args, "initial_model", None)
    started = args.run_dir / "config.json"
    stored: dict[str, Any] = {}
    if args.resume and started.is_file():
        stored = {key: value for key, value in (json.loads(started.read_text()).get("run_config") or {}).items()
                  if key in KEYS and key not in (RunKey.RESUME, RunKey.RUN_DIR)}
    run_config = parse_sets(args.set, {**stored, **({RunKey.INITIAL_MODEL: str(initial)} if initial else {})})
    if args.resume and (initial is not None or run_config.get(RunKey.INITIAL_MODEL)):
        raise UserError("--initial-model starts a new run, and a resumed run continues from its own checkpoint: "
                        "drop one of the two")
    if args.resume:
        if not (args.run_dir / "history.json").exists():
            raise UserError(f"--resume: {args.run_dir} holds no run to continue")
        run_config["resume"] = str(args.run_dir.resolve())
        if started.is_file():
            asked = set(run_config)
            for key, value in stored.items():
                if key not in run_config:
                    run_config[key] = value
            # A run started before 0.3.5 stored its server step unresolved (0), and stepped the mean itself under an
            # averaging strategy; today's 0 would be the task's step (breast: 2), so the resume keeps the 1 it ran.
            if RunKey.SERVER_LEARNING_RATE not in asked:
                run_config[RunKey.SERVER_LEARNING_RATE] = stored_server_step(stored)
    elif (args.run_dir / "history.json").exists():
        raise UserError(f"{args.run_dir} already holds a run: add --resume to continue it, or pick a new --run-dir")
    if initial is not None:
        run_config[RunKey.INITIAL_MODEL] = str(initial)
    if run_config.get(RunKey.INITIAL_MODEL) and not args.resume:  # the ServerApp runs elsewhere: an absolute path
        run_config[RunKey.INITIAL_MODEL] = str(Path(str(run_config[RunKey.INITIAL_MODEL])).expanduser().resolve())
    try:
        config = from_flat(run_config)
    except ConfigError as exc:
        raise UserError(f"--set: {exc}") from None
    run_config[RunKey.NUM_ROUNDS] = config.federation.num_rounds
    if config.server.initial_model and not args.resume:
        _check_initial(config)
    return run_config


def _check_initial(config: Any) -> None:
    """Check the run's initial model here, so a wrong file is said before Flower starts (the server checks it
    again: ``fl_server.initial``)."""
    import torch

    from fl_server.initial import load_initial
    from models.nets import build_model
    from models.weights import WeightsError, state_arrays

    torch.manual_seed(config.training.seed)
    try:
        start = load_initial(config.server.initial_model, config, state_arrays(build_model(config.model)))
    except WeightsError as exc:
        raise UserError(f"--initial-model: {exc}") from None
    caution = start.caution(config.privacy.enabled)
    if caution:  # said before Flower starts, so the lead can stop here
        Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {escape(caution)}", highlight=False)


def _on_superlink(args: argparse.Namespace, run_config: dict[str, Any]) -> Callable[[Callable[[str], None]], Any]:
    """A launcher of ``run_config`` on the SuperLink of ``--kit``/``--state``, checked to be running first.

    Raises:
        UserError: No SuperLink runs for the kit.
    """
    from fl_server.deploy import DeployError, connection_home, run

    try:
        connection_home(args.kit, args.state)
    except DeployError as exc:
        raise UserError(str(exc)) from None

    def launch(on_line: Callable[[str], None]) -> Any:
        try:
            return run(args.kit, run_config, state=args.state, on_line=on_line)
        except DeployError as exc:
            raise UserError(str(exc)) from None

    return launch


def _in_simulation(sites: Path, run_dir: Path, run_config: dict[str, Any], *,
                   cpus_per_site: int = 1) -> Callable[[Callable[[str], None]], Any]:
    """A launcher of ``run_config`` as a Flower simulation of the workspaces under ``sites``.

    Raises:
        UserError: ``sites`` holds no workspace folder.
    """
    from fl_server.flower_ops import FlowerError, simulate

    if not sites.is_dir() or not any(p.is_dir() for p in sites.iterdir()):
        raise UserError(f"--sites {sites}: expected a folder with one workspace folder per site")

    def launch(on_line: Callable[[str], None]) -> Any:
        try:
            return simulate(sites, run_dir, run_config, cpus_per_site=cpus_per_site, on_line=on_line)
        except FlowerError as exc:
            raise UserError(str(exc)) from None

    return launch


def _launch(console: Console, run_dir: Path, what: str, launch: Callable[[Callable[[str], None]], Any], *,
            trains: bool = True) -> None:
    """Run a federation, streaming its log to RUN_DIR.log and one line per round to the console (``trains``:
    a run in which no site trained is an error)."""
    log_path = run_dir.resolve().with_name(run_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"{what}; full log in {log_path}")
    with open(log_path, "w") as log:
        def on_line(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            m = _ROUND.search(line)
            if m:
                console.print(m.group(1), highlight=False, markup=False)
            elif "ERROR" in line or "Traceback" in line:
                console.print(f"[red]{line}[/]", highlight=False)

        outcome = launch(on_line)
    if not outcome.finished:
        tail = "\n".join(outcome.output.splitlines()[-15:])
        raise UserError(f"the run did not finish (exit code {outcome.returncode}); last lines:\n{tail}\n"
                        f"full log: {log_path}")
    why = nothing_trained(run_dir) if trains else None
    if why is not None:
        raise UserError(f"the run finished but no site trained in any round, so the global model is the initial "
                        f"one: {why}; see {run_dir / 'report.html'}")


def nothing_trained(run_dir: Path) -> str | None:
    """Why no site trained in a finished run (the refusals and failures of its rounds), or None if one did."""
    import json

    from fl_server.rounds import RoundRecord

    history = json.loads((run_dir / "history.json").read_text())
    rounds = [RoundRecord.from_dict(r) for r in history.get("rounds", []) if r.get("round", 0) >= 1]
    if any(r.aggregated_sites > 0 for r in rounds):
        return None
    seen: dict[str, str] = {}
    for r in rounds:
        for kind, entries in (("refused", r.refused), ("failed", r.failed), ("dropped", r.dropped)):
            for e in entries:
                seen.setdefault(str(e.get("site", "?")), f"{kind}: {e.get('reason', '')}")
    return "; ".join(f"site {site} {what}" for site, what in sorted(seen.items())) or "no site answered"


def cmd_summary(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server summary``: every site's data summary, before any training — in a simulation of the
    workspaces under ``--sites`` or on the SuperLink of ``--kit`` — as tables, plots and warnings in ``--out``.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: Neither or both of ``--sites``/``--kit``, a bad ``--set``, an ``--out`` that holds a run, or the
            run did not finish.
    """
    import json

    if bool(args.sites) == bool(args.kit):
        raise UserError("give --sites WS_ROOT (a simulation of local workspaces) or --kit DIR (the consortium)")
    if (args.out / "history.json").exists():
        raise UserError(f"{args.out} already holds a run: pick a new --out")
    run_config = {**parse_sets(args.set), "summary-only": True, "run-dir": str(args.out.resolve())}
    launch = (_in_simulation(args.sites, args.out, run_config) if args.sites
              else _on_superlink(args, run_config))
    _launch(console, args.out, "Asking every site for its data summary", launch, trains=False)
    doc = json.loads((args.out / "summary" / "summary.json").read_text())
    for task, entry in doc["tasks"].items():
        rows = [r for r in entry["sites"] if r["labelled"] != 0]
        if not rows:
            continue
        table = Table(title=f"{task}: studies per site (train/val/test positives/negatives; <min: suppressed)")
        for col in ("site", "studies", "labelled", "train", "val", "test", "vendors"):
            table.add_column(col)
        for r in rows:
            def shown(v: Any) -> str:
                return "<min" if v is None else f"{v:g}"

            table.add_row(r["site"], shown(r["studies"]), shown(r["labelled"]),
                          *[f"{shown(r[f'{s}_pos'])}/{shown(r[f'{s}_neg'])}" for s in ("train", "val", "test")],
                          ", ".join(r["vendor"]))
        console.print(table)
    for kind in ("refused", "failed"):
        for e in doc[kind]:
            console.print(f"site {e['site']} {kind}: {e.get('reason', '')}", highlight=False)
    for warning in doc["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"Summary: {args.out / 'summary' / 'summary.html'}")
    return 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server status``: sites registered and connected, runs and their state, and where the current run
    stands (with ``--run-dir``), from Flower's own API.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: No SuperLink runs for the kit, or Flower refused the query.
    """
    import json

    from fl_server.deploy import DeployError
    from fl_server.status import consortium_status

    try:
        doc = consortium_status(args.kit, state=args.state, run_dir=args.run_dir)
    except DeployError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    table = Table(title="Sites")
    for col in ("site", "status", "online since", "offline since"):
        table.add_column(col)
    for s in doc["sites"]:
        table.add_row(s["site"], str(s["status"]), str(s["online_since"] or "—"), str(s["offline_since"] or "—"))
    console.print(table)
    runs = Table(title="Runs")
    for col in ("run", "status", "app", "elapsed", "started"):
        runs.add_column(col)
    for r in doc["runs"]:
        runs.add_row(str(r["run"]), str(r["status"]), r["app"], str(r["elapsed"]), str(r["started"] or "—"))
    console.print(runs)
    current = doc.get("current")
    if current:
        console.print(f"Run {current['run_id']} ({current['task']}): {current['rounds_done']} round(s) done"
                      + (", finished" if current["finished"] else ""), highlight=False)
        if "line" in current:
            console.print(current["line"], highlight=False, markup=False)
        for w in current.get("warnings", []):
            console.print(f"[yellow]warning:[/] round {w['round']}, site {escape(str(w['site']))}: "
                          f"{escape(str(w['reason']))}", highlight=False)
    return 0


def cmd_stop(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server stop``: stop a run on the SuperLink; its last checkpoint stays and ``run --resume``
    continues it.

    Args:
        args: The parsed command line.
        console: Where the messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: No SuperLink runs for the kit, or Flower refused (an unknown or finished run).
    """
    from fl_server.deploy import DeployError
    from fl_server.status import stop_run

    try:
        stop_run(args.kit, args.run, state=args.state)
    except DeployError as exc:
        raise UserError(str(exc)) from None
    console.print(f"run {args.run} stopped; continue it with 'oncofed-server run --kit {args.kit} --run-dir "
                  "RUN_DIR --resume'", highlight=False)
    return 0


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server simulate``: a federated training of the workspaces under ``--sites`` as a Flower
    simulation on this machine, then its report and the final test table.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: ``--sites`` holds no workspace, a bad ``--set``, a run directory that holds a run without
            ``--resume`` (or none with it), Flower could not start, or the run did not finish or trained nothing.
    """
    from fl_server.report import write_report

    sites = args.sites
    run_config = _run_config(args)
    launch = _in_simulation(sites, args.run_dir, run_config, cpus_per_site=args.cpus_per_site)
    n = sum(1 for p in sites.iterdir() if p.is_dir())
    _launch(console, args.run_dir, f"Simulating {n} sites from {sites}", launch)
    page = write_report(args.run_dir)
    _print_final(console, args.run_dir)
    console.print(f"Global model: {args.run_dir / 'model.pt'}\nReport: {page}")
    return 0


def _print_final(console: Console, run_dir: Path) -> None:
    import json

    history = json.loads((run_dir / "history.json").read_text())
    final = history.get("final") or {}
    if not final.get("sites"):
        return
    from models.protocol import Metric, report_metrics

    columns = report_metrics(str(history.get("task") or ""))
    table = Table(title="Final global model on each site's test split")
    for col in ("site", "studies", *(t for t, _ in columns)):
        table.add_column(col, justify="right" if col != "site" else "left")

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    shown = tuple(k for _, k in columns)
    for site, m in sorted(final["sites"].items()):
        cells = [f(m.get(k)) for k in shown]
        if Metric.AUROC in shown and m.get(Metric.AUROC_LOW) is not None:
            cells[shown.index(Metric.AUROC)] += f" ({m[Metric.AUROC_LOW]:.2f}-{m[Metric.AUROC_HIGH]:.2f})"
        flag = " (too few to judge)" if site in (final.get("too_small") or []) else ""
        table.add_row(site + flag, str(int(m.get(Metric.STUDIES, 0))), *cells)
    w = final.get("weighted") or {}
    table.add_row("mean of sites (weighted)", "", *(f(w.get(k)) for k in shown))
    consortium = final.get("consortium") or {}
    auc = consortium.get("auroc")
    if auc:
        table.add_row("consortium (histograms)", str(auc["positives"] + auc["negatives"]),
                      f"{auc['auroc']:.3f} ({auc['low']:.2f}-{auc['high']:.2f})", *([""] * (len(shown) - 1)))
    console.print(table)
    op = consortium.get("operating_point")
    if op:
        c = op["consortium"]
        console.print(f"Operating point ({op['rule_text']}): threshold {op['threshold']:.4f}; consortium test "
                      f"sensitivity {f(c['sensitivity'])}, specificity {f(c['specificity'])}"
                      + (f"; AUROC within {auc['max_error']:.4f} of the pooled studies' exact value" if auc else ""))


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server report``: write the HTML report (plots, tables, TensorBoard events) of a run directory.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: The folder holds no run.
    """
    from fl_server.report import write_report

    try:
        page = write_report(args.run_dir)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    console.print(f"Report: {page}")
    return 0


EPILOG_STATUS = """examples:
  oncofed-server status --kit consortium/server
  oncofed-server status --kit consortium/server --run-dir runs/fed-1 --json

Sites are named by their site id (the SuperNode ids Flower gave them at 'start'), with online/offline since;
runs with Flower's state; with --run-dir, the current run's latest round: who answered, refused or failed and
why, and its aggregated metrics, then the run's warnings (a site training under DP-SGD while the server uses
momentum).
"""

EPILOG_STOP = """example:
  oncofed-server stop 4213 --kit consortium/server

The run ends cleanly; its last checkpoint stays in its run directory and
'oncofed-server run --kit KIT --run-dir RUN_DIR --resume' continues it.
"""

EPILOG_SUMMARY = """examples:
  oncofed-server summary --sites ws --out runs/summary                 # a simulation of local workspaces
  oncofed-server summary --kit consortium/server --out runs/summary --set task=lung-ct --set dp=true

Each site answers with counts and distributions on fixed bins (usable and labelled studies, label balance per
split, scanner vendors, slice thickness, pixel spacing, MR field strength, an intensity histogram of its
preprocessed images), with counts below its own minimum suppressed, or refuses (its policy decides). Writes
OUT/summary/summary.json, summary.html and plots, and prints the warnings (a site without positives in val, a
scanner or slice thickness no other site has, intensities far from the others, too few studies for DP).
Every run does the same before round 1 (RUN_DIR/summary/; --set data-summary=false turns it off).
"""

EPILOG_PROVISION = """examples:
  oncofed-server provision --out consortium --sites a,b,c
  oncofed-server provision --out consortium --sites charite,umc --names fl.lead-hospital.org,10.0.0.5
  oncofed-server provision --out consortium --add d     # a new site; existing kits stay as they are

Makes the consortium CA (consortium/ca/, keep ca.key offline), the SuperLink's TLS certificate
(valid for localhost, 127.0.0.1 and --names) and one P-384 key pair per site. Hand each site its
folder consortium/sites/<site>/ (README.txt, join.sh) over a trusted channel; the lead keeps
consortium/server/. Private keys are written with mode 0600 and never printed."""

EPILOG_START = """examples:
  oncofed-server start --kit consortium/server                    # sites on this host only
  oncofed-server start --kit consortium/server --host 0.0.0.0     # sites on other hosts too

Runs Flower's SuperLink with TLS and SuperNode authentication, registers the public keys in
KIT/site-keys/ (only those sites can connect; delete a key and restart to revoke a site), writes the
lead's Flower connection and stays in the foreground until Ctrl-C. Its log and state are in
KIT/superlink/ (or --state). Then start runs with 'oncofed-server run' from another terminal."""

EPILOG_RUN = """examples:
  oncofed-server run --kit consortium/server --run-dir runs/fed-1 --set task=breast-mg --set num-rounds=5
  oncofed-server run --kit consortium/server --run-dir runs/fed-1 --resume   # continue after a stop
  oncofed-server run --kit consortium/server --run-dir runs/fed-2 --set task=breast-mg \\
      --initial-model runs/fed-1/model.pt   # start from an earlier run's global model

Needs a SuperLink started with 'oncofed-server start --kit ...' and the sites joined with
'oncofed-site join'. Prints one line per round and writes RUN_DIR (checkpoints, history.json,
model.pt, report.html) on the SuperLink's host. --set takes any key of [tool.flwr.app.config]."""


def cmd_provision(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server provision``: make a consortium (CA, SuperLink certificate, one kit per site), or add
    sites to one with ``--add``; prints each new kit with its key fingerprint.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: ``--add`` together with ``--sites`` or ``--names``, neither given, a bad site id, or any other
            provisioning problem (with the reason).
    """
    from fl_server.provision import ProvisionError, add_sites, parse_site_ids, provision

    try:
        if args.add:
            if args.sites or args.names:
                raise UserError("--add adds sites to an existing consortium: give it without --sites and --names")
            done = add_sites(args.out, parse_site_ids(args.add))
        else:
            if not args.sites:
                raise UserError("give --sites a,b,c (a new consortium) or --add d (add sites to one)")
            names = [n for n in (args.names or "").split(",") if n.strip()]
            done = provision(args.out, parse_site_ids(args.sites), names=names, port=args.port, address=args.address)
    except ProvisionError as exc:
        raise UserError(str(exc)) from None
    table = Table(title=f"Site kits in {done.root / 'sites'}")
    for col in ("site", "kit", "site key fingerprint"):
        table.add_column(col, overflow="fold")
    for kit in done.new_sites:
        table.add_row(kit.site_id, kit.folder.name, kit.fingerprint)  # the title names the folder they are in
    console.print(table)
    console.print(f"Consortium CA SHA-256: {done.ca_fingerprint}\nSuperLink address in the kits: {done.address}\n"
                  f"Lead's kit: {done.server_kit} (start it with: oncofed-server start --kit {done.server_kit})\n"
                  "Send each site its kit folder over a trusted channel; they join with "
                  "'oncofed-site join --kit KIT --workspace WS'.", highlight=False, markup=False, emoji=False,
                  soft_wrap=True)  # paths stay whole, to be copied
    if args.add:
        console.print("A running SuperLink learns the new sites when restarted (oncofed-server start).")
    return 0


def cmd_start(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server start``: run the consortium's SuperLink (TLS, only provisioned sites) until Ctrl-C.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0 once stopped.

    Raises:
        UserError: The kit is unusable, or the SuperLink did not start or stopped on its own.
    """
    from fl_server.deploy import DeployError, serve

    try:
        return serve(args.kit, state=args.state, host=args.host, port=args.port,
                     say=lambda line: console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True))
    except DeployError as exc:
        raise UserError(str(exc)) from None


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-server run``: a federated training on the SuperLink that ``start`` runs, one line per round,
    then the final test table.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        UserError: A bad ``--set``, a run directory that holds a run without ``--resume`` (or none with it), no
            SuperLink running for the kit, or the run did not finish or trained nothing.
    """
    run_config = _run_config(args)
    run_config["run-dir"] = str(args.run_dir.resolve())
    _launch(console, args.run_dir, f"Running on the SuperLink of {args.kit}", _on_superlink(args, run_config))
    _print_final(console, args.run_dir)
    console.print(f"Global model: {args.run_dir / 'model.pt'}\nReport: {args.run_dir / 'report.html'}")
    return 0


EPILOG_EXPORT = """example:
  oncofed-server export runs/lung-sim --out handoff/lung-ct
  python -m monai.bundle run --config_file handoff/lung-ct/configs/inference.json \\
      --meta_file handoff/lung-ct/configs/metadata.json --bundle_root handoff/lung-ct \\
      --input_dir /data/study/series --output_dir out   # out/probabilities.json

Writes a MONAI bundle (configs/, models/model.pt and model.ts, docs/README.md) and a model card
(docs/model-card.md and .json: intended use, preprocessing, network, sites, DP epsilon, metrics with
95 % CIs, code version, SHA-256 of every file) from a finished run directory."""


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    """``export``: the MONAI bundle and model card of a finished run."""
    import json

    from fl_server.export import ExportError, export_run
    from models.config import ConfigError, from_flat

    try:
        config = json.loads((args.run_dir / "config.json").read_text()) if (args.run_dir / "config.json").is_file() \
            else {}
        spec = from_flat(config.get("run_config") or {}).model
    except (ConfigError, ValueError) as exc:
        raise UserError(f"{args.run_dir / 'config.json'}: {exc}") from None
    # The one place the lead's code reads imaging: the task preset's preprocessing, as data for the bundle.
    from imaging.bundle import BundleError, inference_config, preprocessing_summary
    from models.weights import WeightsError, read_model

    path = args.run_dir / "model.pt"
    try:  # one read: the bundle's calibration, weights and card are one file's
        model = read_model(path) if path.is_file() else None
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    # The bundle's probabilities are the run's calibrated ones, as its sites show them.
    calibration = model.scoring.calibration if model is not None else None
    try:
        exported = export_run(args.run_dir, args.out, inference=inference_config(
                                  spec.task, spec.resolution, calibration=None if calibration is None else
                                  (calibration.slope, calibration.intercept)),
                              preprocessing=preprocessing_summary(spec.task, spec.resolution), force=args.force,
                              model=model)
    except (ExportError, BundleError) as exc:
        raise UserError(str(exc)) from None
    card = exported.out / "docs" / "model-card.md"
    console.print(f"Bundle and model card: {exported.out} ({len(exported.files)} files; TorchScript within "
                  f"{exported.max_logit_difference:.1e} of the network)\nModel card: {card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``oncofed-server`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="oncofed-server",
        description="oncofed for the consortium lead: provision, run and report federated training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  oncofed-server simulate --sites ws --run-dir runs/sim --set task=lung-ct\n"
        "  oncofed-server report runs/sim\n\nRun 'oncofed-server COMMAND --help' for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, epilog: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("simulate", "Run a federated training as a Flower simulation of the sites on this machine.",
            EPILOG_SIMULATE, cmd_simulate)
    p.add_argument("--sites", type=Path, required=True, help="folder with one site workspace per sub-folder")
    p.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, history and report go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--initial-model", type=Path, metavar="MODEL",
                   help="a model.pt to start from instead of fresh weights: one trained on a public archive, or an "
                        "earlier run's (the same task and network; checked before the run starts)")
    p.add_argument("--cpus-per-site", type=int, default=1,
                   help="CPUs Flower reserves per simulated site (default 1: sites train side by side)")
    p = add("report", "Write the HTML report (plots, tables, TensorBoard events) of a run directory.",
            EPILOG_REPORT, cmd_report)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by the server")
    p = add("provision", "Make the consortium CA, the SuperLink certificate and a start-up kit per site.",
            EPILOG_PROVISION, cmd_provision)
    p.add_argument("--out", type=Path, required=True, help="the consortium folder to create (or to add sites to)")
    p.add_argument("--sites", help="comma-separated site ids for a new consortium, e.g. a,b,c")
    p.add_argument("--add", metavar="SITES", help="comma-separated site ids to add to the consortium in --out")
    p.add_argument("--names", help="comma-separated DNS names or IP addresses of the SuperLink host "
                   "(localhost and 127.0.0.1 are always in the certificate)")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink port written into the kits (default 9092)")
    p.add_argument("--address", help="HOST:PORT the sites connect to (default: the first --names, else localhost)")
    p = add("start", "Run the consortium's SuperLink (TLS, only provisioned sites) until Ctrl-C.", EPILOG_START,
            cmd_start)
    p.add_argument("--kit", type=Path, required=True, help="the lead's kit folder (DIR/server from provision)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: the kit's)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--state", type=Path, help="folder for the SuperLink's log and state (default KIT/superlink)")
    p = add("summary", "Ask every site for its data summary before training: tables, plots, warnings.",
            EPILOG_SUMMARY, cmd_summary)
    p.add_argument("--sites", type=Path, help="a simulation: folder with one site workspace per sub-folder")
    p.add_argument("--kit", type=Path, help="the consortium: the lead's kit folder given to 'start'")
    p.add_argument("--out", type=Path, required=True, help="where the summary (JSON, HTML, plots) goes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--state", type=Path, help="with --kit: the --state folder given to 'start'")
    p = add("status", "Sites connected, runs and where the current run stands (Flower's own API).", EPILOG_STATUS,
            cmd_status)
    p.add_argument("--kit", type=Path, required=True, help="the lead's kit folder given to 'start'")
    p.add_argument("--run-dir", type=Path, help="the current run's directory (its latest round)")
    p.add_argument("--state", type=Path, help="the --state folder given to 'start' (default KIT/superlink)")
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.consortium-status/1)")
    p = add("stop", "Stop a run on the SuperLink (its last checkpoint stays; run --resume continues it).",
            EPILOG_STOP, cmd_stop)
    p.add_argument("run", metavar="RUN", help="the run id ('oncofed-server status' lists them)")
    p.add_argument("--kit", type=Path, required=True, help="the lead's kit folder given to 'start'")
    p.add_argument("--state", type=Path, help="the --state folder given to 'start' (default KIT/superlink)")
    p = add("run", "Run a federated training on the SuperLink started with 'start'.", EPILOG_RUN, cmd_run)
    p.add_argument("--kit", type=Path, required=True, help="the lead's kit folder given to 'start'")
    p.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, history and report go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--initial-model", type=Path, metavar="MODEL",
                   help="a model.pt to start from instead of fresh weights: one trained on a public archive, or an "
                        "earlier run's (the same task and network; checked before the run starts)")
    p.add_argument("--state", type=Path, help="the --state folder given to 'start' (default KIT/superlink)")
    p = add("export", "Write a finished run's model as a MONAI bundle with a model card.", EPILOG_EXPORT, cmd_export)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory written by the server")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write (must be empty)")
    p.add_argument("--force", action="store_true", help="replace what --out holds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oncofed-server``."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return int(args.func(args, console))
    except UserError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except OSError as exc:  # a path that cannot be read or written: the user's to fix, said in one line
        where = f" {exc.filename}" if exc.filename else ""
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] cannot use{where}: {exc.strerror or exc}; check that the path exists and that you "
            "may write there", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

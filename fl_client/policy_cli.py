"""``oncofed-site policy``, ``runs``, ``approve`` and ``refuse``: the hospital decides which runs use its data.

Everything here reads and writes the site's own workspace (``WS/policy/``, see :mod:`fl_client.policy`).
Errors are :class:`fl_client.policy.PolicyError`: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fl_client.policy import PolicyError, RunBook, RunRecord, RunState, operator_name
from imaging.presets import PRESETS
from models.config import Arch, Resolution

__all__ = ["add_commands", "cmd_approve", "cmd_policy", "cmd_refuse", "cmd_runs"]

EPILOG_POLICY = """examples:
  oncofed-site policy --workspace ws/site-a
  oncofed-site policy --workspace ws/site-a --tasks lung-ct,prostate-mr --max-rounds 50 --approval required
  oncofed-site policy --workspace ws/site-a --networks compact-cnn --max-local-epochs 5 --max-epsilon 4
  oncofed-site policy --workspace ws/site-a --tasks all --max-rounds none --approval automatic

Only the options given change; 'all', 'any' or 'none' lift a limit. The site's code checks every message
of every run against this policy before any training: a run outside it is refused, and the lead sees
the reason. --max-epsilon caps the ε one run may spend here (the privacy budget, 'oncofed-site
privacy', caps all runs together; --require-dp there makes the site train only with DP-SGD). With
--approval required each new run waits as pending until 'oncofed-site approve'. Every change is in
the audit log WS/policy/audit.jsonl."""

EPILOG_RUNS = """examples:
  oncofed-site runs --workspace ws/site-a
  oncofed-site runs --workspace ws/site-a --run 4213  # one run's manifest and its audit trail
  oncofed-site runs --workspace ws/site-a --json

Lists every run the consortium asked this site to take part in: its state (pending, approved,
refused, finished), what it asks (task, rounds, network and parameter count, DP, the metrics that leave
the site, the app bundle's version and hash) and who decided."""

EPILOG_APPROVE = """example:
  oncofed-site approve 4213 --workspace ws/site-a --by "Dr. A. Weber, DPO"

Shows the run's manifest and approves it: the site takes part from the run's next message. The
decision, who took it and what was shown are appended to WS/policy/audit.jsonl."""

EPILOG_REFUSE = """example:
  oncofed-site refuse 4213 --workspace ws/site-a --why "not covered by our ethics approval"

Every later message of the run gets a refusal (no weights, no figures); the lead sees "the site refused
run 4213" per round. The reason you give stays in the site's audit log: it is not sent."""


def _book(workspace: Path) -> RunBook:
    if not Path(workspace).is_dir():
        raise PolicyError(f"workspace {workspace} does not exist; run oncofed-site ingest first")
    return RunBook(workspace)


def _names(text: str, known: tuple[str, ...], option: str, lift: str) -> tuple[str, ...]:
    if text.strip().lower() == lift:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise PolicyError(f"{option} {text!r}: expected a comma-separated list of {', '.join(known)}, or {lift}")
    return names


def _limit(text: str, option: str, kind: Callable[[str], Any]) -> Any:
    if text.strip().lower() == "none":
        return None
    try:
        value = kind(text)
    except ValueError:
        raise PolicyError(f"{option} {text!r}: expected a number, or none to lift the limit") from None
    return value


def cmd_policy(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site policy``: show the site's policy, or change the limits given (an audited change).

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        PolicyError: No workspace, a list or limit that cannot be read, a policy out of range, or a damaged
            policy file.
    """
    from models.config import Arch, Resolution
    from models.tasks import TASK_DIMS

    book = _book(args.workspace)
    policy = book.policy()
    changes: dict[str, Any] = {}
    if args.tasks is not None:
        changes["tasks"] = _names(args.tasks, tuple(TASK_DIMS), "--tasks", "all")
    if args.networks is not None:
        changes["networks"] = _names(args.networks, tuple(a.value for a in Arch if a != Arch.AUTO), "--networks",
                                     "any")
    if args.resolutions is not None:
        changes["resolutions"] = _names(args.resolutions, tuple(r.value for r in Resolution), "--resolutions", "any")
    if args.max_rounds is not None:
        changes["max_rounds"] = _limit(args.max_rounds, "--max-rounds", int)
    if args.max_local_epochs is not None:
        changes["max_local_epochs"] = _limit(args.max_local_epochs, "--max-local-epochs", int)
    if args.max_epsilon is not None:
        changes["max_epsilon_per_run"] = _limit(args.max_epsilon, "--max-epsilon", float)
    if args.approval is not None:
        changes["require_approval"] = args.approval == "required"
    if args.share_summary is not None:
        changes["share_summary"] = args.share_summary == "yes"
    if args.min_count is not None:
        changes["min_count"] = args.min_count
    if changes:
        policy = book.set_policy(replace(policy, **changes), who=operator_name(args.by))
        console.print(f"policy set by {policy.set_by} at {policy.set_at}")
    if args.json:
        print(json.dumps({"schema": "oncofed.site-policy/1", **asdict(policy)}, indent=1))
        return 0
    for line in policy.lines():
        console.print(f"  {line}", highlight=False)
    if not changes and not policy.set_at:
        console.print("(the default: no policy was set at this site)")
    return 0


def _record_doc(record: RunRecord) -> dict[str, Any]:
    return {**asdict(record), "state": str(record.state)}


def cmd_runs(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site runs``: every run that asked this site to take part, or one run with its audit trail.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        PolicyError: No workspace, or ``--run`` is not a run id or names a run this site has not seen.
    """
    book = _book(args.workspace)
    if args.run:
        record = book.get(args.run)
        if record is None:
            raise PolicyError(f"this site has not seen run {args.run}")
        trail = [e for e in book.audit() if e.get("run") == args.run]
        if args.json:
            print(json.dumps({"schema": "oncofed.site-run/1", **_record_doc(record), "audit": trail}, indent=1))
            return 0
        console.print(f"run {record.run}: {record.state}" + (f" by {record.decided_by} at {record.decided_at}"
                                                             if record.decided_by else ""), highlight=False)
        for line in record.manifest.lines():
            console.print(f"  {line}", highlight=False)
        console.print(f"  messages answered {record.messages.get('answered', 0)}, refused "
                      f"{record.messages.get('refused', 0)}", highlight=False)
        for entry in trail:
            console.print(f"  {entry['time']}  {entry['who']}: {entry['action']}"
                          + (f" — {entry['why']}" if entry.get("why") else ""), highlight=False)
        return 0
    records = book.runs()
    if args.json:
        print(json.dumps({"schema": "oncofed.site-runs/1", "runs": [_record_doc(r) for r in records]}, indent=1))
        return 0
    if not records:
        console.print("No run has asked this site to take part yet.")
        return 0
    table = Table(title=f"Runs at {args.workspace}")
    for col in ("run", "state", "asks", "decided by", "answered / refused"):
        table.add_column(col, overflow="fold")
    for r in records:
        m = r.manifest
        dp = f"DP ε≤{m.dp_epsilon:g}" if m.dp else "no DP"
        table.add_row(r.run, str(r.state), f"{m.task}, {m.rounds} rounds, {m.network}, {dp}; {m.app}",
                      r.decided_by or "—", f"{r.messages.get('answered', 0)} / {r.messages.get('refused', 0)}")
    console.print(table)
    for r in records:
        if r.state == RunState.PENDING:
            console.print(f"\nrun {r.run} waits for your decision:", highlight=False)
            for line in r.manifest.lines():
                console.print(f"  {line}", highlight=False)
            console.print(f"  oncofed-site approve {r.run} --workspace {args.workspace}\n"
                          f"  oncofed-site refuse {r.run} --workspace {args.workspace} --why TEXT", highlight=False)
    return 0


def _decide(args: argparse.Namespace, console: Console, state: RunState) -> int:
    book = _book(args.workspace)
    record = book.decide(str(args.run), state, who=operator_name(args.by), why=getattr(args, "why", "") or "")
    console.print(f"run {record.run} {record.state} by {record.decided_by} at {record.decided_at}; it asks:",
                  highlight=False)
    for line in record.manifest.lines():
        console.print(f"  {line}", highlight=False)
    return 0


def cmd_approve(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site approve``: approve a run and show what it asks; the decision goes to the audit log.

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        PolicyError: No workspace, a run id this site has not seen, or a run that has finished.
    """
    return _decide(args, console, RunState.APPROVED)


def cmd_refuse(args: argparse.Namespace, console: Console) -> int:
    """``oncofed-site refuse``: refuse a run, keeping the reason in the site's audit log (it is not sent).

    Args:
        args: The parsed command line.
        console: Where the tables and messages go.

    Returns:
        The exit code: 0.

    Raises:
        PolicyError: An empty ``--why``, no workspace, a run id this site has not seen, or a run that has
            finished.
    """
    if not args.why.strip():
        raise PolicyError("--why must say why (it is kept in the site's audit log)")
    return _decide(args, console, RunState.REFUSED)


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register the four commands with ``oncofed-site``'s ``add(name, help, epilog, func)``."""
    p = add("policy", "Show or set which runs this site takes part in (tasks, rounds, networks, ε, approval).",
            EPILOG_POLICY, cmd_policy)
    p.add_argument("--tasks", metavar="T1,T2|all", help=f"tasks the site takes part in ({', '.join(PRESETS)})")
    p.add_argument("--networks", metavar="N1,N2|any",
                   help=f"networks allowed ({', '.join(a for a in Arch if a != Arch.AUTO)})")
    p.add_argument("--share-summary", choices=("yes", "no"),
                   help="answer the lead's data-summary query (counts and distributions, no identifiers)")
    p.add_argument("--min-count", type=int, metavar="N",
                   help="the least count that leaves the site (default 5): in the data summary, counts from 1 to "
                        "N-1 are sent as 'fewer than N'; score histograms and subgroup figures of smaller groups "
                        "are not sent")
    p.add_argument("--resolutions", metavar="R1,R2|any",
                   help=f"resolution profiles allowed ({', '.join(Resolution)}; a site without a GPU keeps to cpu)")
    p.add_argument("--max-rounds", metavar="N|none", help="the most rounds per run")
    p.add_argument("--max-local-epochs", metavar="N|none",
                   help="the most local epochs per round (a run drawing each sample k times counts k times)")
    p.add_argument("--max-epsilon", metavar="EPS|none", help="the most ε one run may spend at this site")
    p.add_argument("--approval", choices=("required", "automatic"), help="does each new run wait for approval?")
    p.add_argument("--by", metavar="NAME", help="who decides (default: your login name)")
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.site-policy/1)")
    p = add("runs", "List the runs the consortium asked this site to take part in, with their manifests.",
            EPILOG_RUNS, cmd_runs)
    p.add_argument("--run", metavar="RUN", help="one run: its manifest and audit trail")
    p.add_argument("--json", action="store_true", help="print JSON (schema oncofed.site-runs/1)")
    for name, help_, epilog, func in (("approve", "Approve a pending run: this site takes part from its next "
                                       "message.", EPILOG_APPROVE, cmd_approve),
                                      ("refuse", "Refuse a run: every later message of it gets a refusal.",
                                       EPILOG_REFUSE, cmd_refuse)):
        p = add(name, help_, epilog, func)
        p.add_argument("run", metavar="RUN", help="the run id 'oncofed-site runs' shows")
        p.add_argument("--by", metavar="NAME", help="who decides (default: your login name)")
        if name == "refuse":
            p.add_argument("--why", required=True, help="the reason, kept in the site's audit log (not sent)")

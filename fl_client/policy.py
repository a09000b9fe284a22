"""The site's policy: which runs the hospital lets its data take part in, and its record of each run.

Everything here lives in the site workspace and is decided by the site alone; nothing the lead sends
(run config, app bundle, model) can change it. Three pieces:

- :class:`SitePolicy` (``WS/policy/policy.json``, set with ``oncofed-site policy``): the tasks the site
  takes part in, the most rounds and local epochs per run, the networks allowed, the most ε one run
  may spend, and whether each new run waits for the site's explicit approval. DP required or not is
  the privacy budget's own flag (``oncofed-site privacy --set-budget E --require-dp``): a DP-only site
  trains with DP-SGD in every run, whatever the run asks.
- :class:`RunManifest`: what a run asks of the site, in plain words (task, rounds, strategy, network and
  its parameter count, DP request, the metrics that will leave the site, the lead's run id, the app
  bundle's id, version and hash). It is what the site approves.
- :class:`RunBook` (``WS/policy/runs/<run>.json`` and the append-only ``WS/policy/audit.jsonl``): each
  run the site has seen, its state (``pending``, ``approved``, ``refused``, ``finished``) and who decided,
  when, and on what manifest.

:func:`admit` is the one decision, taken by the site's own code before any training or evaluation of
every message: the policy first (a run outside it is refused with the reason), then approval.
Records are written atomically (temporary file, fsync, rename) under a lock, so a ``kill -9`` at any
point leaves either the old record or the new one, and ``approve`` from a terminal cannot race the
site's executor.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from fl_client.egress import append_line
from fl_client.workspace import Workspace
from models.protocol import Refusal
from models.tasks import is_segmentation

__all__ = [
    "Admission",
    "PolicyError",
    "RunBook",
    "RunManifest",
    "RunRecord",
    "RunState",
    "SitePolicy",
    "operator_name",
]

SITE_POLICY = "site policy"  # the "who" of automatic decisions


class PolicyError(ValueError):
    """A policy value or a run decision is not valid; the message names it and says what to do."""


class RunState(StrEnum):
    """Where a run stands at this site."""

    PENDING = "pending"  # seen, waiting for the site's approval: every message gets a refusal
    APPROVED = "approved"  # the site trains and evaluates for it
    REFUSED = "refused"  # by the site (operator or policy): every message gets a refusal
    FINISHED = "finished"  # the site answered the run's final evaluation


@dataclass(frozen=True)
class SitePolicy:
    """What the site allows. Empty tuples and None mean "no limit".

    Attributes:
        tasks: Tasks the site takes part in.
        max_rounds: The most rounds one run may have.
        max_local_epochs: The most local epochs per round.
        networks: Networks (``model`` run-config values) allowed.
        resolutions: Resolution profiles allowed (``cpu``, ``diagnostic``): a site without a GPU may keep to cpu.
        max_epsilon_per_run: The most ε one run may spend at the site (a cap on the run's own DP target;
            the privacy budget still caps all runs together).
        require_approval: Every new run waits as pending until the site approves it.
        share_summary: Answer the lead's data-summary query (counts and distributions, no identifiers).
        min_count: The least count that leaves the site: in the summary, counts from 1 to this minus one are
            sent as "fewer than this"; score histograms of a split with a class below it, and subgroup figures
            of fewer studies, are not sent.
        set_at: When the policy was last set.
        set_by: Who set it.
    """

    tasks: tuple[str, ...] = ()
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    networks: tuple[str, ...] = ()
    resolutions: tuple[str, ...] = ()
    max_epsilon_per_run: float | None = None
    require_approval: bool = False
    share_summary: bool = True
    min_count: int = 5
    set_at: str = ""
    set_by: str = ""

    def check(self) -> SitePolicy:
        """This policy, if every value is sane.

        Raises:
            PolicyError: Naming the value.
        """
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise PolicyError(f"min-count must be a whole number of at least 1, got {self.min_count!r}")
        for name in ("max_rounds", "max_local_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PolicyError(f"{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
        eps = self.max_epsilon_per_run
        if eps is not None and not (isinstance(eps, int | float) and 0 < eps < float("inf")):
            raise PolicyError(f"max-epsilon must be a positive finite number, got {eps!r}")
        return self

    def lines(self) -> list[str]:
        """The policy in plain words, one line per rule."""
        def limit(value: object, unit: str = "") -> str:
            return "no limit" if value is None or value == () else f"{value}{unit}"

        return [f"tasks: {', '.join(self.tasks) if self.tasks else 'all four'}",
                f"rounds per run: at most {limit(self.max_rounds)}",
                f"local epochs per round: at most {limit(self.max_local_epochs)}",
                f"networks: {', '.join(self.networks) if self.networks else 'any'}",
                f"resolution profiles: {', '.join(self.resolutions) if self.resolutions else 'any'}",
                f"ε per run: at most {limit(self.max_epsilon_per_run)}",
                "new runs: " + ("wait for the site's approval (oncofed-site approve)" if self.require_approval
                                else "take part at once if within this policy"),
                "data summary: " + (f"shared, counts below {self.min_count} suppressed" if self.share_summary
                                    else "not shared")]


@dataclass(frozen=True)
class RunManifest:
    """What a run asks of the site, as the site's code reads it from the run config and the app bundle.

    Attributes:
        run: The run's id on the SuperLink (``flwr ls`` shows the same).
        lead_run_id: The run id the lead's server records (differs from ``run`` for a resumed run).
        task: The task.
        rounds: Rounds the run plans.
        local_epochs: Local epochs per round.
        augmentation_multiplicity: Draws of each sample per step (each a forward and backward pass): a round's
            compute is ``local_epochs`` × this many passes, and the site's cap on local epochs counts it so.
        strategy: The aggregation strategy.
        network: The network.
        parameters: The network's parameter count.
        trained: How many of them the sites train: fewer under ``fine-tune`` (0: all, as before 0.3.8).
        fine_tune: The run's ``fine-tune`` scope (``all``, ``norm-head``, ``head``).
        resolution: The resolution profile the run preprocesses images at (``cpu`` or ``diagnostic``).
        dp: Whether the run asks for DP-SGD.
        dp_epsilon: The run's ε target (when it asks for DP).
        secure_aggregation: Whether updates are masked (SecAgg+).
        metrics: The metric keys that may leave the site in this run.
        app: The app bundle's id and version (``publisher/name==version``), or ``simulation``.
        app_hash: The app bundle's SHA-256 (empty in a simulation).
    """

    run: str
    lead_run_id: str
    task: str
    rounds: int
    local_epochs: int
    strategy: str
    network: str
    parameters: int
    dp: bool
    dp_epsilon: float
    secure_aggregation: bool
    metrics: tuple[str, ...]
    app: str
    app_hash: str
    resolution: str = "cpu"
    augmentation_multiplicity: int = 1
    trained: int = 0
    fine_tune: str = "all"

    @classmethod
    def foreign(cls, run: str, app: str, app_hash: str, run_config: Mapping[str, Any]) -> RunManifest:
        """What can be said of a run built for another app or version (its config is not read further)."""
        return cls(run=run, lead_run_id="", task=str(run_config.get("task", "?"))[:64], rounds=0, local_epochs=0,
                   strategy="?", network=str(run_config.get("model", "?"))[:64], parameters=0, dp=False,
                   dp_epsilon=0.0, secure_aggregation=False, metrics=(), app=app, app_hash=app_hash,
                   resolution=str(run_config.get("resolution", "?"))[:64])

    def lines(self) -> list[str]:
        """The manifest in plain words, as the site's operator sees it before approving."""
        dp = f"DP-SGD asked, ε ≤ {self.dp_epsilon:g} for the run" if self.dp else "no DP-SGD asked"
        draws = f", each sample drawn {self.augmentation_multiplicity} times" if self.augmentation_multiplicity > 1 \
            else ""
        return [f"task {self.task}; {self.rounds} round(s) of {self.local_epochs} local epoch(s){draws}; "
                f"strategy {self.strategy}" + ("; secure aggregation" if self.secure_aggregation else ""),
                f"network {self.network} ({self.parameters:,} parameters"
                + (f"; it trains {self.trained:,}, fine-tune {self.fine_tune}, from the lead's start"
                   if self.fine_tune != "all" else "") + f") at the {self.resolution} resolution profile",
                dp,
                f"leaves the site: the model's weights and the metrics {', '.join(self.metrics)}"
                + ("" if is_segmentation(self.task) else
                   "; the studies' scores as per-class counts on 64 fixed bins (no per-study score); test "
                   "figures per scanner vendor, slice band and field strength with at least the site's minimum "
                   "count of studies"),
                f"lead's run id {self.lead_run_id}; app {self.app}"
                + (f" (sha256 {self.app_hash[:16]}…)" if self.app_hash else "")]


@dataclass(frozen=True)
class RunRecord:
    """One run as the site has recorded it."""

    run: str
    state: RunState
    manifest: RunManifest
    first_seen: str
    decided_at: str = ""
    decided_by: str = ""
    why: str = ""
    messages: dict[str, int] = field(default_factory=dict)  # answered / refused, counted per message


@dataclass(frozen=True)
class Admission:
    """The site's decision on one message: go on, or refuse with a code and a PHI-free sentence."""

    allowed: bool
    code: str = ""
    detail: str = ""
    epsilon_cap: float | None = None  # the policy's per-run ε cap (None: no cap)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def operator_name(given: str | None = None) -> str:
    """Who is deciding at this terminal: ``given`` or the login name."""
    if given:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _manifest_from(doc: Mapping[str, Any]) -> RunManifest:
    return RunManifest(**{**doc, "metrics": tuple(doc.get("metrics", ()))})


class RunBook:
    """The site's policy, its record of runs and the audit log, in ``WS/policy/``.

    Args:
        workspace: The site workspace.
    """

    def __init__(self, workspace: Path | str) -> None:
        self.workspace = Workspace.of(workspace)
        self.root = self.workspace.policy
        self.audit_path = self.workspace.audit

    # -- the policy ---------------------------------------------------------------------------------
    def policy(self) -> SitePolicy:
        """The site's policy (the default when none was set: every task, no limits, no approval).

        Raises:
            PolicyError: The policy file is damaged (nothing is allowed until it is set again).
        """
        path = self.workspace.policy_file
        if not path.exists():
            return SitePolicy()
        try:
            doc = json.loads(path.read_text())
            return SitePolicy(**{**doc, "tasks": tuple(doc.get("tasks", ())),
                                 "networks": tuple(doc.get("networks", ())),
                                 "resolutions": tuple(doc.get("resolutions", ()))}).check()
        except (OSError, ValueError, TypeError) as exc:
            raise PolicyError(f"{path} is damaged ({type(exc).__name__}): set the policy again with "
                              "oncofed-site policy --workspace WS ...") from None

    def set_policy(self, policy: SitePolicy, *, who: str) -> SitePolicy:
        """Store ``policy`` (checked) and audit it."""
        policy = replace(policy.check(), set_at=_now(), set_by=who)
        with self._locked():
            _write_atomic(self.workspace.policy_file, json.dumps(asdict(policy), indent=1, sort_keys=True) + "\n")
            self._audit(who=who, action="policy-set", run="", shown=policy.lines())
        return policy

    # -- runs ---------------------------------------------------------------------------------------
    def _run_path(self, run: str) -> Path:
        if not run or not run.isdigit():
            raise PolicyError(f"run {run!r} is not a run id: use the number 'oncofed-site runs' shows")
        return self.workspace.runs / f"{run}.json"

    def get(self, run: str) -> RunRecord | None:
        """The site's record of ``run``, or None if the site has never seen it."""
        path = self._run_path(run)
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        return RunRecord(**{**doc, "state": RunState(doc["state"]), "manifest": _manifest_from(doc["manifest"])})

    def runs(self) -> list[RunRecord]:
        """Every run the site has seen, oldest first."""
        folder = self.workspace.runs
        found = [self.get(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()] if folder.is_dir() else []
        return sorted((r for r in found if r is not None), key=lambda r: (r.first_seen, int(r.run)))

    def _put(self, record: RunRecord) -> None:
        doc = asdict(record)
        _write_atomic(self._run_path(record.run), json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def decide(self, run: str, state: RunState, *, who: str, why: str = "") -> RunRecord:
        """Approve or refuse a run the site has seen (``oncofed-site approve`` / ``refuse``).

        Raises:
            PolicyError: The site has never seen the run, or it has finished.
        """
        if state not in (RunState.APPROVED, RunState.REFUSED):
            raise PolicyError(f"a run can be approved or refused, not set to {state}")
        with self._locked():
            record = self.get(run)
            if record is None:
                raise PolicyError(f"this site has not seen run {run}: 'oncofed-site runs --workspace WS' lists the "
                                  "runs it was asked to take part in")
            if record.state == RunState.FINISHED:
                raise PolicyError(f"run {run} has finished at this site: nothing to decide")
            record = replace(record, state=state, decided_at=_now(), decided_by=who, why=why)
            self._put(record)
            self._audit(who=who, action=str(state), run=run, shown=record.manifest.lines(), why=why)
        return record

    def admit(self, manifest: RunManifest, *, final: bool = False) -> Admission:
        """The site's decision for one message of the run ``manifest`` describes.

        A run is checked against the policy at every message (a policy tightened mid-run applies from
        the next message). The first time a run is seen it is recorded: ``refused`` if outside the
        policy, else ``pending`` when the site approves runs by hand, else ``approved``. Every new record
        and every refusal is in the audit log.

        Args:
            manifest: What the run asks.
            final: The message is the run's final evaluation: an approved run is marked finished after it.
        """
        policy = self.policy()
        code, detail = _outside(policy, manifest)
        with self._locked():
            record = self.get(manifest.run)
            if record is None:
                if code:
                    state, who, why = RunState.REFUSED, SITE_POLICY, detail
                elif policy.require_approval:
                    state, who, why = RunState.PENDING, "", ""
                else:
                    state, who, why = RunState.APPROVED, SITE_POLICY, "within the site's policy; no approval required"
                record = RunRecord(manifest.run, state, manifest, first_seen=_now(),
                                   decided_at=_now() if who else "", decided_by=who, why=why)
                self._audit(who=who or SITE_POLICY, action=f"run-seen ({state})", run=manifest.run,
                            shown=manifest.lines(), why=why)
            if code:
                decision = Admission(False, code, detail)
            elif record.state == RunState.PENDING:
                decision = Admission(False, Refusal.PENDING,
                                     f"run {manifest.run} waits for the site's approval")
            elif record.state == RunState.REFUSED:
                # The operator's reason stays in the site's audit log: free text never leaves the site.
                decision = Admission(False, Refusal.REFUSED, f"the site refused run {manifest.run}")
            else:
                decision = Admission(True, epsilon_cap=policy.max_epsilon_per_run)
            key = "answered" if decision.allowed else "refused"
            counts = {**record.messages, key: record.messages.get(key, 0) + 1}
            state = RunState.FINISHED if decision.allowed and final else record.state
            self._put(replace(record, messages=counts, state=state))
        return decision

    def refuse_unseen(self, run: str, manifest: RunManifest, *, code: str, detail: str) -> None:
        """Record a refusal decided before the policy could be read (a run built for another version)."""
        with self._locked():
            record = self.get(run) or RunRecord(run, RunState.REFUSED, manifest, first_seen=_now(), decided_at=_now(),
                                                decided_by=SITE_POLICY, why=detail)
            if not record.messages:
                self._audit(who=SITE_POLICY, action=f"run-seen ({RunState.REFUSED})", run=run,
                            shown=manifest.lines(), why=f"{code}: {detail}")
            self._put(replace(record, messages={**record.messages, "refused": record.messages.get("refused", 0) + 1}))

    # -- audit --------------------------------------------------------------------------------------
    def audit(self) -> list[dict[str, Any]]:
        """Every audit entry, oldest first."""
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def _audit(self, *, who: str, action: str, run: str, shown: list[str], why: str = "") -> None:
        append_line(self.audit_path, json.dumps({"time": _now(), "who": who, "action": action, "run": run,
                                                 "shown": shown, "why": why}, ensure_ascii=False))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _outside(policy: SitePolicy, manifest: RunManifest) -> tuple[str, str]:
    """The refusal code and sentence if the run is outside the policy, else empty strings."""
    if policy.tasks and manifest.task not in policy.tasks:
        return Refusal.TASK, f"this site takes part in {', '.join(policy.tasks)} only, not {manifest.task}"
    if policy.max_rounds is not None and manifest.rounds > policy.max_rounds:
        return Refusal.ROUNDS, f"this site allows at most {policy.max_rounds} rounds per run; the run has " \
                               f"{manifest.rounds}"
    passes = manifest.local_epochs * manifest.augmentation_multiplicity
    if policy.max_local_epochs is not None and passes > policy.max_local_epochs:
        k = manifest.augmentation_multiplicity
        asks = str(manifest.local_epochs) if k == 1 else \
            f"{manifest.local_epochs} with each sample drawn {k} times ({passes} passes)"
        return Refusal.LOCAL_EPOCHS, f"this site allows at most {policy.max_local_epochs} local epochs per round; " \
                                     f"the run asks {asks}"
    if policy.networks and manifest.network not in policy.networks:
        return Refusal.NETWORK, f"this site allows the networks {', '.join(policy.networks)} only, not " \
                                f"{manifest.network}"
    if policy.resolutions and manifest.resolution not in policy.resolutions:
        return Refusal.RESOLUTION, f"this site trains at the {', '.join(policy.resolutions)} resolution profile " \
                                   f"only, not {manifest.resolution}"
    return "", ""

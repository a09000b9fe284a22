"""The site's privacy budget and its append-only ledger of every DP-SGD session on the site's data.

The site owns its budget: the ceiling (ε_max, δ) is set by the site's own user in the workspace
(``oncofed-site privacy --set-budget``), never by a run configuration or anything from the network.
Every DP training session is written ahead of its first step: :meth:`PrivacyLedger.reserve` appends the
session with all the steps it plans (run, round, steps, sample rate, noise multiplier, clipping norm, δ
and the cumulative ε), fsynced, before training starts; :meth:`PrivacyLedger.settle` appends the same
session again with the steps actually taken once training stops. The last line of a session counts, so
a process killed at any point (``kill -9``, out of memory, power loss) leaves its whole planned spend in
the ledger: the site can only over-count, never forget. The cumulative ε is computed by the Opacus
accountant over the *whole* history of the site - across rounds and across runs - so it never
forgets a session the way a fresh ``PrivacyEngine`` per round would. A session that would push the
cumulative ε past the ceiling is refused before any training, and nothing is sent.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_client.workspace import Workspace

if TYPE_CHECKING:  # Opacus is imported only when privacy is computed: a ClientApp process pays for it then
    from opacus.accountants import PRVAccountant, RDPAccountant

__all__ = [
    "Budget",
    "BudgetExceeded",
    "NoBudget",
    "PrivacyError",
    "PrivacyLedger",
    "Session",
    "default_delta",
    "epsilon_of",
    "noise_for",
]

LEDGER_SCHEMA = "oncofed.privacy-ledger/1"


class PrivacyError(Exception):
    """A privacy rule stops training; the message says which and what the site can do."""


class BudgetExceeded(PrivacyError):
    """Training would push the site's cumulative ε past its ceiling."""


class NoBudget(PrivacyError):
    """DP training was asked for but the site has not set its ceiling."""


@dataclass(frozen=True)
class Budget:
    """The site's ceiling: cumulative ε may not exceed ``epsilon_max`` at ``delta``."""

    epsilon_max: float
    delta: float
    set_at: str
    require_dp: bool = False  # the site trains only with DP-SGD in federated runs, whatever the run asks


@dataclass(frozen=True)
class Session:
    """One DP-SGD training session (one round of one run, or one local run).

    ``status`` is ``planned`` while it trains (``steps`` then counts every step it may take) and ``done``
    once settled with the steps taken; ``id`` ties the two lines of one session together. ``samples`` counts the
    session's units of privacy, which ``unit`` names: ``patient`` (``fl_client.train.ByPatient``), or ``image`` in a
    line written before 0.3.5, whose ε holds for one image of a patient.
    """

    time: str
    run_id: str
    round: int
    task: str
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_cumulative: float
    samples: int
    id: str = ""
    status: str = "done"
    unit: str = "image"  # lines written before 0.3.5 have none: they sampled images


def _accountant(kind: str) -> RDPAccountant | PRVAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "prv":
        return PRVAccountant()
    return RDPAccountant()


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of a history of ``(noise_multiplier, sample_rate, steps)`` sessions."""
    if not history:
        return 0.0
    acc = _accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def default_delta(samples: int) -> float:
    """A δ below 1/samples: 1/(10 × samples), rounded down to one significant figure, at most 1e-5."""
    raw = min(1e-5, 1.0 / (10.0 * max(samples, 1)))
    exponent = math.floor(math.log10(raw))
    return math.floor(raw / 10**exponent) * 10**exponent


def noise_for(*, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``epsilon`` at ``delta`` over ``steps`` steps at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


class PrivacyLedger:
    """The privacy state of one site workspace.

    Args:
        workspace: The site workspace folder.
    """

    def __init__(self, workspace: Path | str) -> None:
        ws = Workspace.of(workspace)
        self.folder = ws.privacy
        self.budget_path = ws.budget
        self.ledger_path = ws.ledger

    # The ceiling -----------------------------------------------------------------------------------

    def budget(self) -> Budget | None:
        """The site's ceiling, or None if never set."""
        if not self.budget_path.exists():
            return None
        data = json.loads(self.budget_path.read_text())
        return Budget(float(data["epsilon_max"]), float(data["delta"]), str(data["set_at"]),
                      bool(data.get("require_dp", False)))

    def set_budget(self, epsilon_max: float, delta: float = 1e-5, *, require_dp: bool = False) -> Budget:
        """Set the ceiling (the site user's decision), and whether the site trains only with DP-SGD.

        Raises:
            PrivacyError: Bad values, or a ceiling below what the site has already spent, or a δ
                different from the one the ledger already counts at.
        """
        if not (epsilon_max > 0 and math.isfinite(epsilon_max)):
            raise PrivacyError(f"the budget must be a positive ε, got {epsilon_max}")
        if not 0 < delta < 1e-2:
            raise PrivacyError(f"δ must be in (0, 0.01), e.g. 1e-5, got {delta}")
        old = self.budget()
        if old is not None and self.sessions() and delta != old.delta:
            raise PrivacyError(
                f"the ledger already counts ε at δ={old.delta:g}; keep that δ (changing it would make the "
                "recorded history incomparable)"
            )
        spent = self.spent(delta)
        if spent > epsilon_max:
            raise PrivacyError(f"this site has already spent ε={spent:.3f}; a ceiling of {epsilon_max:g} is below it")
        budget = Budget(float(epsilon_max), float(delta), time.strftime("%Y-%m-%dT%H:%M:%S%z"), bool(require_dp))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.budget_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(budget), indent=1))
        os.replace(tmp, self.budget_path)
        return budget

    # The history -------------------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """Every recorded session, oldest first.

        Raises:
            PrivacyError: The ledger file is damaged (names the line).
        """
        if not self.ledger_path.exists():
            return []
        out: dict[str, Session] = {}  # a session's last line counts (planned, then done)
        for number, line in enumerate(self.ledger_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                data.pop("schema", None)
                session = Session(**data)
            except (json.JSONDecodeError, TypeError) as exc:
                raise PrivacyError(f"{self.ledger_path} line {number} is damaged ({exc}); restore it from a backup"
                                   ) from None
            out[session.id or f"line-{number}"] = session
        return [s for s in out.values() if s.steps > 0]

    @staticmethod
    def _epsilon(sessions: list[Session], delta: float, extra: tuple[float, float, int, str] | None = None) -> float:
        """ε at ``delta`` of ``sessions`` plus an optional ``(noise, rate, steps, accountant)`` session.

        The PRV accountant is used only if every session asked for it; RDP composes any mix.
        """
        history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in sessions]
        kinds = {s.accountant for s in sessions}
        if extra is not None:
            history.append(extra[:3])
            kinds.add(extra[3])
        return epsilon_of(history, delta, "prv" if kinds == {"prv"} else "rdp")

    def spent(self, delta: float | None = None) -> float:
        """Cumulative ε over all history at ``delta`` (default: the budget's δ, else 1e-5)."""
        budget = self.budget()
        d = delta if delta is not None else (budget.delta if budget else 1e-5)
        return self._epsilon(self.sessions(), d)

    def spent_outside(self, run_id: str, delta: float) -> float:
        """Cumulative ε at ``delta`` of every session that is not part of run ``run_id`` (0 if none)."""
        others = [s for s in self.sessions() if s.run_id != run_id]
        return self._epsilon(others, delta) if others else 0.0

    def require_budget(self) -> Budget:
        """The site's privacy budget (its ε ceiling and δ).

        Raises:
            NoBudget: The site has set no budget yet; the message gives the command that sets one.
        """
        budget = self.budget()
        if budget is None:
            raise NoBudget(
                f"this site has no privacy budget yet (workspace {self.folder.parent}); the site decides it: "
                f"oncofed-site privacy --workspace {self.folder.parent} --set-budget EPSILON [--delta D]"
            )
        return budget

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
        """The cumulative ε after such a session; refuses if it passes the ceiling.

        Raises:
            NoBudget: No ceiling set.
            BudgetExceeded: The session would pass the ceiling (nothing is trained or sent).
        """
        budget = self.require_budget()
        sessions = self.sessions()
        after = self._epsilon(sessions, budget.delta, (noise_multiplier, sample_rate, steps, accountant))
        if after > budget.epsilon_max + 1e-9:
            raise BudgetExceeded(
                f"privacy budget of this site would be exceeded: ε spent {self._epsilon(sessions, budget.delta):.3f}, "
                f"this session would bring it to {after:.3f}, the ceiling is {budget.epsilon_max:g} "
                f"(δ={budget.delta:g}). Nothing was trained or sent. The site may raise its ceiling "
                "(oncofed-site privacy --set-budget) or stop taking part in DP runs."
            )
        return after

    def record(self, *, run_id: str, round: int, task: str, steps: int, sample_rate: float, noise_multiplier: float,
               max_grad_norm: float, samples: int, accountant: str = "rdp") -> Session:
        """Append a finished session (flushed and synced to disk before returning); ``samples`` are patients."""
        return self._append(run_id=run_id, round=round, task=task, steps=steps, sample_rate=sample_rate,
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, samples=samples,
                            accountant=accountant, id=uuid.uuid4().hex, status="done", unit="patient")

    def reserve(self, *, run_id: str, round: int, task: str, steps: int, sample_rate: float, noise_multiplier: float,
                max_grad_norm: float, samples: int, accountant: str = "rdp") -> Session:
        """Check a session against the ceiling and write it ahead with every step it plans, before its first step.

        Raises:
            NoBudget: No ceiling set.
            BudgetExceeded: The session would pass the ceiling (nothing is written, trained or sent).
        """
        self.check(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, accountant=accountant)
        return self._append(run_id=run_id, round=round, task=task, steps=steps, sample_rate=sample_rate,
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, samples=samples,
                            accountant=accountant, id=uuid.uuid4().hex, status="planned", unit="patient")

    def settle(self, planned: Session, *, steps: int) -> Session:
        """Close a reserved session with the steps it took (at most those planned; 0 if it never stepped)."""
        taken = max(0, min(int(steps), planned.steps))
        kept = {k: v for k, v in asdict(planned).items() if k not in ("time", "epsilon_cumulative", "delta", "steps",
                                                                       "status")}
        return self._append(**kept, steps=taken, status="done")

    def _append(self, *, id: str, status: str, steps: int, noise_multiplier: float, sample_rate: float,
                accountant: str, **fields: Any) -> Session:
        budget = self.require_budget()
        others = [s for s in self.sessions() if s.id != id]
        extra = (noise_multiplier, sample_rate, steps, accountant) if steps > 0 else None
        cumulative = self._epsilon(others, budget.delta, extra) if others or extra else 0.0
        session = Session(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), steps=steps, noise_multiplier=noise_multiplier,
                          sample_rate=sample_rate, accountant=accountant, delta=budget.delta,
                          epsilon_cumulative=cumulative, id=id, status=status, **fields)
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"schema": LEDGER_SCHEMA, **asdict(session)}, separators=(",", ":"))
        with self.ledger_path.open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return session

    def summary(self) -> dict[str, Any]:
        """The budget, spent and remaining ε, and the sessions (schema ``oncofed.privacy/1``)."""
        budget = self.budget()
        sessions = self.sessions()
        spent = self._epsilon(sessions, budget.delta if budget else 1e-5)
        return {
            "schema": "oncofed.privacy/1",
            "budget": asdict(budget) if budget else None,
            "epsilon_spent": spent,
            "epsilon_remaining": (budget.epsilon_max - spent) if budget else None,
            "sessions": [asdict(s) for s in sessions],
        }

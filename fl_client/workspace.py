"""The site workspace: one folder per site holds everything the site keeps, and this type knows its layout.

::

    WS/catalog.sqlite        the catalog: studies, series, reasons, labels, splits, review verdicts (imaging)
    WS/cache/                preprocessed images, rebuilt when deleted (imaging)
    WS/privacy/budget.json   the site's privacy ceiling, set by its DPO
    WS/privacy/ledger.jsonl  every DP session, written ahead (append-only)
    WS/policy/policy.json    what the site allows; WS/policy/runs/ one record per run; WS/policy/audit.jsonl
    WS/egress.jsonl          everything that left the site (append-only)
    WS/site-errors.log       the details of failures (their codes and sentences left the site)
    WS/supernode/            the SuperNode's and the executor's state while the site is joined
    WS/pacs/store/           studies fetched from the PACS (ingested like any DICOM folder)
    WS/pacs/partial/         a study being fetched (moved to the store only when complete)

Every module that reads or writes one of these takes its path from :class:`Workspace`; nothing else joins a
workspace path with a file name. Deleting ``cache/`` loses nothing that cannot be rebuilt; the ledger, the
audit trail and the egress log are never deleted by oncofed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imaging.layout import CACHE_DIR, CATALOG_FILE

__all__ = ["Workspace"]


@dataclass(frozen=True)
class Workspace:
    """A site's workspace folder.

    Args:
        root: The folder (``oncofed-site ingest --workspace``).
    """

    root: Path

    @classmethod
    def of(cls, path: Path | str | Workspace) -> Workspace:
        """The workspace at ``path`` (``~`` expanded); a :class:`Workspace` is returned as it is."""
        return path if isinstance(path, Workspace) else cls(Path(path).expanduser())

    @property
    def catalog(self) -> Path:
        """The catalog database."""
        return self.root / CATALOG_FILE

    @property
    def cache(self) -> Path:
        """The preprocessing cache."""
        return self.root / CACHE_DIR

    @property
    def privacy(self) -> Path:
        """The folder of the privacy budget and ledger."""
        return self.root / "privacy"

    @property
    def budget(self) -> Path:
        """The site's privacy ceiling."""
        return self.privacy / "budget.json"

    @property
    def ledger(self) -> Path:
        """The privacy ledger."""
        return self.privacy / "ledger.jsonl"

    @property
    def policy(self) -> Path:
        """The folder of the site's policy, run records and audit trail."""
        return self.root / "policy"

    @property
    def policy_file(self) -> Path:
        """What the site allows."""
        return self.policy / "policy.json"

    @property
    def audit(self) -> Path:
        """Every policy and approval decision."""
        return self.policy / "audit.jsonl"

    @property
    def runs(self) -> Path:
        """One record per run the site has seen."""
        return self.policy / "runs"

    @property
    def egress_log(self) -> Path:
        """Everything that left the site."""
        return self.root / "egress.jsonl"

    @property
    def error_log(self) -> Path:
        """The details of the site's failures."""
        return self.root / "site-errors.log"

    @property
    def supernode(self) -> Path:
        """The SuperNode's and the executor's state while the site is joined."""
        return self.root / "supernode"

    @property
    def pacs_store(self) -> Path:
        """Studies fetched from the PACS, complete (ingested like any DICOM folder)."""
        return self.root / "pacs" / "store"

    @property
    def pacs_partial(self) -> Path:
        """Studies being fetched from the PACS (moved to the store only when complete)."""
        return self.root / "pacs" / "partial"

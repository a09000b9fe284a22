"""The site workspace's layout is known in one place (``fl_client.workspace``): every store of the site writes
where :class:`Workspace` says, and the layout is the one the README documents."""

from __future__ import annotations

from pathlib import Path

from fl_client.egress import EgressLog
from fl_client.failures import Failure, record_failure
from fl_client.policy import RunBook, SitePolicy
from fl_client.privacy import PrivacyLedger
from fl_client.workspace import Workspace
from imaging.catalog import Catalog
from models.protocol import FailureCode


def test_every_store_writes_where_the_workspace_type_says(tmp_path: Path) -> None:
    ws = Workspace.of(tmp_path / "ws")
    with Catalog.open(ws.root):
        pass
    PrivacyLedger(ws.root).set_budget(8.0, 1e-5)
    RunBook(ws.root).set_policy(SitePolicy(), who="dpo")
    EgressLog(ws.root).append(run="r", round_number=1, kind="train", arrays={}, metrics={"num-examples": 1})
    record_failure(ws.root, Failure(FailureCode.IO_ERROR, "an input/output error at the site"), run="r",
                   round_number=1)
    for path in (ws.catalog, ws.budget, ws.policy_file, ws.audit, ws.egress_log, ws.error_log):
        assert path.is_file(), path
    written = {p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*") if p.is_file()}
    assert {"catalog.sqlite", "privacy/budget.json", "policy/policy.json", "policy/audit.jsonl", "egress.jsonl",
            "site-errors.log"} <= written
    assert Workspace.of(ws) is ws and Workspace.of("~/x").root == Path.home() / "x"

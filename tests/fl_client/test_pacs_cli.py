"""Site IT connects the site to its PACS from the command line: ingest over DICOMweb, saliency back to it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models.config import from_flat
from models.nets import build_model
from models.weights import state_arrays


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ONCOFED_PACS_")}
    return subprocess.run([sys.executable, "-m", "fl_client.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**clean, "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    from consortium import make_workspaces
    from orthanc import orthanc

    root = tmp_path_factory.mktemp("pacs-cli")
    with orthanc(root / "orthanc") as server:
        make_workspaces(root / "synth", sites=1, studies_per_task=6, seed=9, tasks=["lung-ct"])
        data = root / "synth" / "data" / "site-a"
        server.upload(sorted(p for p in (data / "dicom").rglob("*") if p.is_file()))
        yield server, data


@pytest.mark.slow
def test_ingest_from_the_pacs_then_store_saliency_back(site: tuple[Any, Path], tmp_path: Path) -> None:
    server, data = site
    ws = tmp_path / "ws"
    cred = tmp_path / "pacs.cred"
    cred.write_text(f"{server.user}:{server.password}\n")
    cred.chmod(0o600)
    pacs = ["--dicomweb", server.dicomweb, "--credentials", str(cred)]
    dry = run("ingest", "--workspace", str(ws), *pacs, "--query", "Modality=CT", "--dry-run")
    assert dry.returncode == 0 and "the cohort holds 6 studies; nothing was fetched" in dry.stdout, dry.stderr
    assert not (ws / "pacs").exists()
    first = run("ingest", "--workspace", str(ws), *pacs, "--query", "Modality=CT", "--labels", str(data / "labels.csv"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "6 studies: 6 fetched" in first.stdout and server.password not in first.stdout + first.stderr
    again = run("ingest", "--workspace", str(ws), *pacs, "--query", "Modality=CT")
    assert again.returncode == 0 and "0 fetched (0 instances), 6 already here" in again.stdout
    with sqlite3.connect(ws / "catalog.sqlite") as db:
        fetches = db.execute("SELECT status, COUNT(*) FROM pacs_fetches GROUP BY status").fetchall()
        labelled = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    assert fetches == [("up-to-date", 6)] and labelled == 6

    # Saliency of a model on the site's studies, stored back to the PACS with STOW-RS.
    flat = {"task": "lung-ct", "model-width": 8}
    model = tmp_path / "model.pt"
    torch.save({"arrays": {k: torch.from_numpy(v) for k, v in state_arrays(build_model(from_flat(flat).model)).items()},
                "run_config": flat, "round": 0}, model)
    before = int(server.statistics()["CountInstances"])
    env = {"ONCOFED_PACS_USER": server.user, "ONCOFED_PACS_PASSWORD": server.password}
    out = run("explain", "--workspace", str(ws), "--model", str(model), "--out", str(tmp_path / "explain"),
              "--split", "train", "--store-to", server.dicomweb, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    with sqlite3.connect(ws / "catalog.sqlite") as db:
        stored = db.execute("SELECT url, COUNT(*), COUNT(DISTINCT study_uid) FROM pacs_stored").fetchone()
    assert stored[0] == server.dicomweb and stored[1] == int(server.statistics()["CountInstances"]) - before > 0
    assert f"Stored {stored[1]} DICOM object(s)" in out.stdout


def test_pacs_mistakes_get_one_line_that_says_what_to_do(site: tuple[Any, Path], tmp_path: Path) -> None:
    server, _ = site
    ws = str(tmp_path / "ws")
    loose = tmp_path / "loose.cred"
    loose.write_text(f"{server.user}:{server.password}\n")
    loose.chmod(0o644)
    wrong = {"ONCOFED_PACS_USER": server.user, "ONCOFED_PACS_PASSWORD": "wrong"}
    for args, env, needle in [
        (["--dicomweb", server.dicomweb, "--query", ""], wrong, "refused the credentials (HTTP 401)"),
        (["--dicomweb", server.dicomweb, "--query", "", "--credentials", str(loose)], None, "chmod 600"),
        (["--dicomweb", server.dicomweb.replace("http://", f"http://{server.user}:x@"), "--query", ""], None,
         "no credentials in the DICOMweb URL"),
        (["--dicomweb", "http://127.0.0.1:1/dicom-web", "--study", "1.2.3"], None, "cannot connect"),
        (["--dicomweb", server.dicomweb], None, "give the cohort"),
        (["--dicomweb", server.dicomweb, "--query", "Modality"], wrong, "KEY=VALUE"),
        # A misspelt key is refused before the PACS is asked (it could answer with every study it holds).
        (["--dicomweb", server.dicomweb, "--query", "Modlity=MR"], wrong, "did you mean 'Modality'"),
        (["--dicomweb", server.dicomweb, "--query", "BodyPart=CHEST"], wrong, "is not a study search key"),
    ]:
        result = run("ingest", "--workspace", ws, *args, env=env)
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and server.password not in result.stdout + result.stderr

"""Synthetic site workspaces for tests: real DICOM written by the generator, ingested per site."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.synth import generate_consortium


def _ingest_site(site_dir: Path, ws: Path) -> None:
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, site_dir / "dicom")
        load_labels(catalog, site_dir / "labels.csv")


def make_workspaces(root: Path, *, sites: int, studies_per_task: int, seed: int, tasks: Sequence[str]) -> Path:
    """Generate a consortium under ``root/data`` and ingest each site into ``root/ws/<site>``; return ``root/ws``.
    The sites are ingested side by side (two processes), as hospitals would."""
    generate_consortium(root / "data", sites=sites, studies_per_task=studies_per_task, seed=seed, tasks=list(tasks))
    site_dirs = sorted(p for p in (root / "data").iterdir() if p.is_dir() and (p / "dicom").is_dir())
    if len(site_dirs) == 1:
        _ingest_site(site_dirs[0], root / "ws" / site_dirs[0].name)
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads forked
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            for done in [pool.submit(_ingest_site, d, root / "ws" / d.name) for d in site_dirs]:
                done.result()
    return root / "ws"


def run_side_by_side(commands: Sequence[Sequence[str]], *,
                     timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Run command lines at once and wait for all: for checks of one-line errors, which spend their time starting
    the interpreter, not working."""
    env = {**os.environ, "COLUMNS": "200"}
    procs = [(list(c), subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
             for c in commands]
    out = []
    for argv, proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return out

"""Ingest is crash-safe: ``kill -9`` at any point of a real ingest process, then a re-run, ends with the same
catalog as an uninterrupted ingest (no series lost, none left half-checked), and a re-run of an unchanged
folder checks and decodes nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dicom_factory import write_series

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder

# The ingest process prints each progress step; at the chosen step it stops (as a slow series would) until
# it is killed, so the kill lands exactly there.
CHILD = textwrap.dedent("""
    import sys, time
    from imaging.catalog import Catalog
    from imaging.ingest import ingest_folder
    ws, src, phase, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def tick(p, done, total):
        print(p, done, flush=True)
        if p == phase and done == at:
            print("stopped", flush=True)
            time.sleep(600)
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, src, progress=tick)
""")


def _state(ws: Path) -> tuple[list[tuple], list[tuple], list[tuple]]:
    with Catalog.open(ws) as catalog:
        db = catalog.db
        files = db.execute("SELECT path, status, reason, series_uid FROM files ORDER BY path").fetchall()
        series = db.execute("SELECT series_uid, status, reason, n_files FROM series ORDER BY series_uid").fetchall()
        images = db.execute("SELECT image_key, status, reason, shape FROM images ORDER BY image_key").fetchall()
    return [tuple(r) for r in files], [tuple(r) for r in series], [tuple(r) for r in images]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    root = tmp_path_factory.mktemp("crash")
    src = root / "dicom"
    for i in range(12):
        write_series(src / f"s{i:02d}", n=20, patient_id=f"P{i}", seed=i)
    paths, _, _ = write_series(src / "gap", n=20, patient_id="GAP", seed=50)
    paths[4].unlink()  # one rejected series among them
    with Catalog.open(root / "reference") as catalog:
        ingest_folder(catalog, src)
    return src, _state(root / "reference")


@pytest.mark.parametrize(("phase", "at"), [("headers", 0), ("headers", 120), ("series", 0), ("series", 6),
                                           ("series", 12)])
def test_kill_9_at_any_point_then_a_rerun_ends_as_if_uninterrupted(source: tuple[Path, tuple], tmp_path: Path,
                                                                    phase: str, at: int) -> None:
    src, reference = source
    ws = tmp_path / "ws"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ws), str(src), phase, str(at)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "stopped":
                break
        else:
            pytest.fail(f"the ingest never reached {phase} {at}")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    with Catalog.open(ws) as catalog:
        report = ingest_folder(catalog, src)
    assert _state(ws) == reference
    assert report.series_ok == 12 and report.series_rejected == 1
    with Catalog.open(ws) as catalog:
        again = ingest_folder(catalog, src)
        pending = catalog.db.execute("SELECT COUNT(*) FROM pending_series").fetchone()[0]
    assert (again.files_read, again.series_checked, again.images_decoded, pending) == (0, 0, 0, 0)

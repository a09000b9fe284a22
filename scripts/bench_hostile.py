"""Hostile inputs against ingest: every variant of ``imaging.hostile`` (and a deflate bomb) beside a good series,
each ingested by a fresh process. Prints, per input and in total: clean rejects with the expected reason,
tracebacks, peak memory of the ingest process, and data lost (the good series not kept).

Goal: 0 tracebacks, 0 lost series, peak RSS under 1 GiB for any input file under 10 MB.

Example::

    .venv/bin/python scripts/bench_hostile.py --out bench-output/hostile
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from imaging.catalog import Catalog
from imaging.hostile import VARIANTS, apply, write_deflate_bomb
from imaging.ingest import ingest_folder
from imaging.synth import generate_consortium

CHILD = """
import json, resource, sys
from pathlib import Path
from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.summary import series_listing
with Catalog.open(sys.argv[1]) as catalog:
    report = ingest_folder(catalog, sys.argv[2])
    listing = series_listing(catalog)
print(json.dumps({"series_ok": report.series_ok, "rejected": dict(report.rejected),
                  "reasons": sorted({r["reason"] for r in listing["rejected_files"]}
                                    | {s["reason"] for s in listing["series"] if s["reason"]}),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def series_files(root: Path) -> list[list[Path]]:
    """The files of each CT series of a synthetic site, by series."""
    with Catalog.open(root / "probe-ws") as catalog:
        ingest_folder(catalog, root / "data" / "site-a" / "dicom")
        rows = catalog.db.execute("SELECT f.path, f.series_uid FROM files f JOIN series s ON s.series_uid = "
                                  "f.series_uid WHERE s.modality='CT' AND s.status='ok' ORDER BY f.path").fetchall()
    out: dict[str, list[Path]] = {}
    for path, series in rows:
        out.setdefault(series, []).append(Path(path))
    return list(out.values())


def run_one(folder: Path, ws: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(ws), str(folder)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        return {"traceback": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-output/hostile"))
    args = parser.parse_args(argv)
    console = Console()
    root = args.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    generate_consortium(root / "data", sites=1, studies_per_task=4, seed=0, tasks=["lung-ct"])
    good, victim = series_files(root)[:2]
    cases: list[dict[str, Any]] = []
    for variant in VARIANTS:
        folder = root / "inputs" / variant.name
        for name, files in (("good", good), ("bad", victim)):
            (folder / name).mkdir(parents=True)
            for f in files:
                shutil.copy(f, folder / name / f.name)
        target = sorted((folder / "bad").iterdir())[len(victim) // 2]
        apply(variant, target)
        cases.append({"input": variant.name, "bytes": target.stat().st_size, "expected": str(variant.reason),
                      **run_one(folder, root / "ws" / variant.name)})
    bomb_folder = root / "inputs" / "deflate-bomb-2gib"
    (bomb_folder / "good").mkdir(parents=True)
    for f in good:
        shutil.copy(f, bomb_folder / "good" / f.name)
    write_deflate_bomb(bomb_folder / "bomb.dcm", 2 << 30)
    cases.append({"input": "deflate-bomb-2gib", "bytes": (bomb_folder / "bomb.dcm").stat().st_size,
                  "expected": "implausible-size", **run_one(bomb_folder, root / "ws" / "bomb")})

    table = Table(title="Hostile inputs beside a good series, each ingested by a fresh process")
    for col in ("input", "file KiB", "expected reason", "got it", "traceback", "good series kept", "peak RSS MiB"):
        table.add_column(col)
    for c in cases:
        c["clean"] = "traceback" not in c and c["expected"] in c.get("reasons", [])
        c["lost"] = "traceback" in c or c.get("series_ok", 0) < 1
        table.add_row(c["input"], f"{c['bytes'] / 1024:.0f}", c["expected"], "yes" if c["clean"] else "NO",
                      c.get("traceback", "—"), "no" if c["lost"] else "yes", f"{c.get('peak_rss_mib', 0):.0f}")
    console.print(table)
    summary = {"inputs": len(cases), "clean_rejects": sum(c["clean"] for c in cases),
               "tracebacks": sum("traceback" in c for c in cases), "lost": sum(c["lost"] for c in cases),
               "max_peak_rss_mib": max(c.get("peak_rss_mib", 0) for c in cases),
               "largest_input_kib": max(c["bytes"] for c in cases) / 1024}
    console.print(summary)
    (root / "bench-hostile.json").write_text(json.dumps({"summary": summary, "cases": cases}, indent=1))
    return 0 if summary["tracebacks"] == 0 and summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

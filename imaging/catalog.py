"""The site catalog: an SQLite index of a site's DICOM files, series, images, labels and split.

It lives in the site workspace (``<workspace>/catalog.sqlite``) and never leaves the site. It is the
only place that holds PatientID and other identifying tags; anything meant to leave the site uses
:meth:`Catalog.pseudonym`, a salted one-way HMAC of the PatientID whose salt is created with the
catalog and stays in it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from imaging.dicom import Frame, ImagePlan, InstanceHeader, SliceRef
from imaging.layout import CATALOG_FILE

__all__ = [
    "Catalog",
    "Item",
    "Split",
    "Status",
    "header_from_json",
    "header_to_json",
    "plan_from_json",
    "plan_to_json",
    "row_dict",
]

SCHEMA_VERSION = 1


class Status(StrEnum):
    """Status of a file, series or image row."""

    OK = "ok"
    REJECTED = "rejected"
    INDEX = "index"  # a DICOMDIR: used to find files, holds no image


class Split(StrEnum):
    """Patient-level data splits."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    message TEXT,
    sop_instance_uid TEXT,
    series_uid TEXT,
    study_uid TEXT,
    header TEXT
);
CREATE INDEX IF NOT EXISTS files_series ON files(series_uid);
CREATE INDEX IF NOT EXISTS files_source ON files(source);
-- Series whose files changed and that have not been checked since: written with the files, removed with the
-- series' own check, so an ingest killed in between checks them on its next run.
CREATE TABLE IF NOT EXISTS pending_series (series_uid TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    patient_name TEXT,
    patient_pseudonym TEXT NOT NULL,
    accession TEXT,
    study_date TEXT
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    body_part TEXT,
    manufacturer TEXT,
    model TEXT,
    slice_thickness REAL,
    kvp REAL,
    field_strength REAL,
    rows INTEGER,
    cols INTEGER,
    pixel_spacing TEXT,
    n_files INTEGER NOT NULL,
    n_frames INTEGER NOT NULL,
    tasks TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS images (
    image_key TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    dims INTEGER NOT NULL,
    shape TEXT NOT NULL,
    spacing TEXT NOT NULL,
    laterality TEXT,
    view TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    message TEXT,
    plan TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_study ON images(study_uid);
CREATE TABLE IF NOT EXISTS labels (
    study_uid TEXT NOT NULL,
    task TEXT NOT NULL,
    label INTEGER NOT NULL,
    source TEXT,
    PRIMARY KEY (study_uid, task)
);
CREATE TABLE IF NOT EXISTS splits (
    patient_pseudonym TEXT PRIMARY KEY,
    split TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pacs_fetches (
    study_uid TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    instances INTEGER NOT NULL,
    fetched INTEGER NOT NULL,
    reason TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (study_uid, url)
);
CREATE TABLE IF NOT EXISTS pacs_stored (
    sop_instance_uid TEXT NOT NULL,
    url TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    file TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, url)
);
"""


def header_to_json(header: InstanceHeader) -> str:
    """Serialise a header for the catalog."""
    d = asdict(header)
    d["path"] = str(header.path)
    return json.dumps(d, separators=(",", ":"))


def header_from_json(text: str) -> InstanceHeader:
    """Inverse of :func:`header_to_json`."""
    d = json.loads(text)
    d["path"] = Path(d["path"])
    d["pixel_spacing"] = tuple(d["pixel_spacing"]) if d["pixel_spacing"] else None
    d["frames"] = tuple(
        Frame(
            index=f["index"],
            position=tuple(f["position"]) if f["position"] else None,
            orientation=tuple(f["orientation"]) if f["orientation"] else None,
            slope=f["slope"],
            intercept=f["intercept"],
        )
        for f in d["frames"]
    )
    return InstanceHeader(**d)


def plan_to_json(plan: ImagePlan) -> str:
    """Serialise an image plan for the catalog."""
    d = asdict(plan)
    d["slices"] = [[str(s.path), s.frame, s.slope, s.intercept] for s in plan.slices]
    return json.dumps(d, separators=(",", ":"))


def plan_from_json(text: str) -> ImagePlan:
    """Inverse of :func:`plan_to_json`."""
    d = json.loads(text)
    d["slices"] = tuple(SliceRef(Path(p), f, s, i) for p, f, s, i in d["slices"])
    for key in ("shape", "spacing", "origin", "orientation"):
        if d[key] is not None:
            d[key] = tuple(d[key])
    return ImagePlan(**d)


@dataclass(frozen=True)
class Item:
    """One labelled training/evaluation sample: an image of a study for a task."""

    study_uid: str
    task: str
    label: int
    split: str | None
    patient_pseudonym: str
    plan: ImagePlan


class Catalog:
    """The site's SQLite catalog. Open with :meth:`open`; use as a context manager to close it.

    Args:
        connection: An open SQLite connection with the schema in place.
        path: The database file.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.db = connection
        self.path = path

    @classmethod
    def open(cls, workspace: Path | str, *, create: bool = True) -> Catalog:
        """Open (and create if asked) the catalog of a site workspace.

        Args:
            workspace: The site workspace folder.
            create: Create the folder and database if missing.

        Raises:
            FileNotFoundError: ``create`` is False and the workspace has no catalog (message says
                to run ingest first).
        """
        workspace = Path(workspace)
        path = workspace / CATALOG_FILE
        if not path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no site catalog in {workspace} (expected {path}); "
                    f"run 'oncofed-site ingest --workspace {workspace} --source DIR' first"
                )
            workspace.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        catalog = cls(db, path)
        version = catalog.get_meta("schema")
        if version is None:
            catalog.set_meta("schema", str(SCHEMA_VERSION))
            catalog.set_meta("salt", secrets.token_hex(32))
            db.commit()
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} has catalog schema {version}, this oncofed reads {SCHEMA_VERSION}; "
                "re-ingest into a new workspace"
            )
        return catalog

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction: committed on success, rolled back on error."""
        with self.db:
            yield self.db

    # -- meta and pseudonyms -------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A value of the meta table."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the meta table (not committed)."""
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def pseudonym(self, patient_id: str) -> str:
        """The site's salted one-way pseudonym of a PatientID (stable within this catalog)."""
        salt = bytes.fromhex(self.get_meta("salt") or "")
        return "p-" + hmac.new(salt, patient_id.encode(), hashlib.sha256).hexdigest()[:16]

    # -- files ---------------------------------------------------------------------------------

    def file_rows(self, source: str) -> dict[str, sqlite3.Row]:
        """Rows of the files found under ``source``, by path."""
        rows = self.db.execute("SELECT * FROM files WHERE source=?", (source,)).fetchall()
        return {r["path"]: r for r in rows}

    def headers_of_series(self, series_uid: str) -> list[InstanceHeader]:
        """Stored headers of the accepted files of a series."""
        rows = self.db.execute(
            "SELECT header FROM files WHERE series_uid=? AND status=? AND header IS NOT NULL",
            (series_uid, Status.OK),
        ).fetchall()
        return [header_from_json(r[0]) for r in rows]

    # -- queries for people and tools ----------------------------------------------------------

    def series_rows(self) -> list[sqlite3.Row]:
        """Every series row, with its images' shapes and spacings, ordered by study and series."""
        return self.db.execute(
            """
            SELECT s.*, COUNT(i.image_key) AS n_images,
                   SUM(i.status = 'ok') AS n_images_ok,
                   MIN(i.shape) AS shape, MIN(i.spacing) AS spacing,
                   MIN(CASE WHEN i.status != 'ok' THEN i.reason END) AS image_reason,
                   MIN(CASE WHEN i.status != 'ok' THEN i.message END) AS image_message
            FROM series s LEFT JOIN images i ON i.series_uid = s.series_uid
            GROUP BY s.series_uid ORDER BY s.study_uid, s.series_uid
            """
        ).fetchall()

    def rejected_files(self) -> list[sqlite3.Row]:
        """Files rejected before they could join a series."""
        return self.db.execute(
            "SELECT path, reason, message FROM files WHERE status=? ORDER BY path", (Status.REJECTED,)
        ).fetchall()

    # -- the PACS: what was fetched from it and stored to it -------------------------------------

    def record_fetch(self, url: str, study_uid: str, *, status: str, instances: int, fetched: int,
                     reason: str) -> None:
        """Record the last fetch of a study from a DICOMweb PACS (not committed)."""
        self.db.execute("INSERT OR REPLACE INTO pacs_fetches VALUES (?,?,?,?,?,?,?)",
                        (study_uid, url, status, instances, fetched, reason or None, time.time()))

    def record_stored(self, url: str, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """Record ``(sop_instance_uid, study_uid, series_uid, file)`` objects stored to a PACS (not committed)."""
        now = time.time()
        values = [(sop, url, study, series, file, now) for sop, study, series, file in rows]
        self.db.executemany("INSERT OR REPLACE INTO pacs_stored VALUES (?,?,?,?,?,?)", values)
        return len(values)

    def stored_rows(self) -> list[sqlite3.Row]:
        """Everything stored to a PACS, oldest first."""
        return self.db.execute("SELECT * FROM pacs_stored ORDER BY at, sop_instance_uid").fetchall()

    # -- labels and splits ---------------------------------------------------------------------

    def set_labels(self, rows: Iterable[tuple[str, str, int]], *, source: str) -> int:
        """Insert or replace ``(study_uid, task, label)`` rows (not committed). Returns the count."""
        n = 0
        for study_uid, task, label in rows:
            self.db.execute(
                "INSERT OR REPLACE INTO labels(study_uid, task, label, source) VALUES (?, ?, ?, ?)",
                (study_uid, task, int(label), source),
            )
            n += 1
        return n

    def items(self, task: str, *, split: str | None = None, labelled_only: bool = True) -> list[Item]:
        """The samples of a task: for each labelled study, its usable images of the task's kind.

        A volume task takes the study's volume with the most slices (ties: the most recent series UID
        order); a 2D task takes every usable image of the study.

        Args:
            task: The task name.
            split: Only this split (train/val/test), or all.
            labelled_only: Skip studies without a label for the task.

        Returns:
            The items, ordered by study UID then image key.
        """
        from imaging.presets import get_preset

        preset = get_preset(task)
        rows = self.db.execute(
            """
            SELECT i.study_uid, i.image_key, i.plan, i.shape, l.label, sp.split, st.patient_pseudonym
            FROM images i
            JOIN studies st ON st.study_uid = i.study_uid
            JOIN series se ON se.series_uid = i.series_uid
            LEFT JOIN labels l ON l.study_uid = i.study_uid AND l.task = ?
            LEFT JOIN splits sp ON sp.patient_pseudonym = st.patient_pseudonym
            WHERE i.status = 'ok' AND i.modality = ? AND i.dims = ?
              AND (',' || se.tasks || ',') LIKE ('%,' || ? || ',%')
            ORDER BY i.study_uid, i.image_key
            """,
            (task, preset.modality, preset.spatial_dims, task),
        ).fetchall()
        chosen: dict[str, list[sqlite3.Row]] = {}
        for r in rows:
            if labelled_only and r["label"] is None:
                continue
            if split is not None and r["split"] != split:
                continue
            chosen.setdefault(r["study_uid"], []).append(r)
        items: list[Item] = []
        for study_rows in chosen.values():
            if preset.spatial_dims == 3:
                study_rows = [max(study_rows, key=lambda r: (json.loads(r["shape"])[0], r["image_key"]))]
            for r in study_rows:
                items.append(
                    Item(
                        study_uid=r["study_uid"],
                        task=task,
                        label=-1 if r["label"] is None else int(r["label"]),
                        split=r["split"],
                        patient_pseudonym=r["patient_pseudonym"],
                        plan=plan_from_json(r["plan"]),
                    )
                )
        return items

    def assign_splits(
        self, *, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: str = "oncofed-split-v1"
    ) -> int:
        """Give every labelled patient without a split one, deterministically and for good.

        Patients are stratified by task and label (a patient with several studies by a positive one
        first, then by task name) and, within each stratum, taken in the order of a keyed hash of
        their PatientID; each goes to the split furthest below its target share of that stratum.
        Assignments already stored never change, so a patient can never move between splits as new
        studies arrive. The result is
        deterministic for a given history of label loads (the same manifests in the same order give
        the same split on any machine); loading them in another order may balance them differently.

        Args:
            fractions: Target shares of train, val and test.
            seed: Key of the ordering hash (the same seed gives the same split on another machine).

        Returns:
            The number of patients newly assigned (not committed).
        """
        if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
            raise ValueError(f"split fractions must be three non-negative shares summing to 1, got {fractions}")
        rows = self.db.execute(
            """
            SELECT st.patient_pseudonym, st.patient_id, l.task, l.label
            FROM studies st JOIN labels l ON l.study_uid = st.study_uid
            """
        ).fetchall()
        strata: dict[str, set[tuple[str, int]]] = {}
        ids: dict[str, str] = {}
        for r in rows:
            strata.setdefault(r["patient_pseudonym"], set()).add((r["task"], int(r["label"])))
            ids[r["patient_pseudonym"]] = r["patient_id"]
        existing = {r[0]: r[1] for r in self.db.execute("SELECT patient_pseudonym, split FROM splits")}
        splits = list(Split)
        counts: dict[str, list[int]] = {}
        def stratum(pairs: set[tuple[str, int]]) -> str:
            # One (task, label) per patient, positives first: a patient with several studies joins a
            # main stratum instead of forming a tiny one of its own (tiny strata all fall to train).
            task, label = min(pairs, key=lambda p: (-p[1], p[0]))
            return f"{task}:{label}"

        for pseudo, pairs in strata.items():
            if pseudo in existing:
                counts.setdefault(stratum(pairs), [0, 0, 0])[splits.index(Split(existing[pseudo]))] += 1

        def order(pseudo: str) -> str:
            return hmac.new(seed.encode(), ids[pseudo].encode(), hashlib.sha256).hexdigest()

        new = 0
        for pseudo in sorted((p for p in strata if p not in existing), key=order):
            c = counts.setdefault(stratum(strata[pseudo]), [0, 0, 0])
            total = sum(c) + 1
            deficits = [fractions[k] * total - c[k] for k in range(3)]
            k = max(range(3), key=lambda j: (deficits[j], -j))
            c[k] += 1
            self.db.execute(
                "INSERT INTO splits(patient_pseudonym, split) VALUES (?, ?)", (pseudo, splits[k].value)
            )
            new += 1
        return new


def row_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A row as a plain dict."""
    return {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row has no items()

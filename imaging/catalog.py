"""The site catalog: an SQLite index of a site's DICOM files, series, images, lesion annotations, labels and split.

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
-- Lesion annotations (DICOM SEG, RT Structure Sets), one row per annotation object: the image it marks (matched by
-- referenced series for a volume, by referenced SOP instance for a 2D image), or why it was rejected. series_uid is
-- the image series it references (also while that series is not here), so its arrival matches it. The mask of an
-- image (all its ok annotations united) is one file in the workspace, mask_file, relative to the workspace.
CREATE TABLE IF NOT EXISTS annotations (
    sop_instance_uid TEXT PRIMARY KEY,
    annotation_series_uid TEXT NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    image_key TEXT,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    mask_file TEXT,
    voxels INTEGER,
    lesions INTEGER,
    status TEXT NOT NULL,
    reason TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS annotations_image ON annotations(image_key);
CREATE INDEX IF NOT EXISTS annotations_series ON annotations(series_uid);
CREATE INDEX IF NOT EXISTS annotations_own_series ON annotations(annotation_series_uid);
-- Annotations to match again: written with the check of a series they belong to or reference, removed with the
-- annotation's own match, so an ingest killed in between matches them on its next run.
CREATE TABLE IF NOT EXISTS pending_annotations (sop_instance_uid TEXT PRIMARY KEY);
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
    """One labelled training/evaluation sample: an image of a study for a task.

    Args:
        study_uid: StudyInstanceUID.
        task: The task name.
        label: 1 (lesion), 0 (none) or -1 (unknown; only with ``labelled_only=False``).
        split: train, val, test, or None if the patient has none yet.
        patient_pseudonym: The site's pseudonym of the patient.
        plan: The image.
        mask: Segmentation tasks only: the absolute path of the image's lesion mask (a ``.npz`` whose uint8 array
            ``mask`` has the layout of ``read_image(plan).array``), the union of its annotations. None for a
            segmentation item means an empty mask (a study the CSV labels 0, without annotation) or, with label
            -1, an unknown one. Always None for image tasks.
    """

    study_uid: str
    task: str
    label: int
    split: str | None
    patient_pseudonym: str
    plan: ImagePlan
    mask: Path | None = None


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

    def annotation_rows(self) -> list[sqlite3.Row]:
        """Every annotation row (see the ``annotations`` table), ordered by status, study and SOP instance."""
        return self.db.execute(
            "SELECT * FROM annotations ORDER BY status, study_uid, sop_instance_uid"
        ).fetchall()

    def mask_path(self, image_key: str) -> Path | None:
        """The absolute path of an image's lesion mask (its ok annotations united), or None if it has none."""
        row = self.db.execute(
            "SELECT MIN(mask_file) FROM annotations WHERE image_key=? AND status='ok'", (image_key,)
        ).fetchone()
        return None if row is None or row[0] is None else self.path.parent / row[0]

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

    def _task_images(self, image_task: str) -> list[dict[str, Any]]:
        """The usable images of an image task, with their study's CSV label, split, pseudonym and annotation.

        ``annotated`` is None for an image without an ok annotation that counts for the task, else whether its
        mask has a voxel. An annotation counts for every task its image's series is routed to when that is one
        task; for a series routed to several (a chest-abdomen-pelvis CT), only for the tasks the CSV labels the
        study for, since a mask does not say which task's lesion it marks.
        """
        from imaging.presets import get_preset

        preset = get_preset(image_task)
        rows = self.db.execute(
            """
            SELECT i.study_uid, i.image_key, i.plan, i.shape, se.tasks, l.label, sp.split, st.patient_pseudonym,
                   a.voxels AS ann_voxels, a.mask_file
            FROM images i
            JOIN studies st ON st.study_uid = i.study_uid
            JOIN series se ON se.series_uid = i.series_uid
            LEFT JOIN labels l ON l.study_uid = i.study_uid AND l.task = ?
            LEFT JOIN splits sp ON sp.patient_pseudonym = st.patient_pseudonym
            LEFT JOIN (SELECT image_key, MAX(voxels) AS voxels, MIN(mask_file) AS mask_file FROM annotations
                       WHERE status = 'ok' GROUP BY image_key) a ON a.image_key = i.image_key
            WHERE i.status = 'ok' AND i.modality = ? AND i.dims = ?
              AND (',' || se.tasks || ',') LIKE ('%,' || ? || ',%')
            ORDER BY i.study_uid, i.image_key
            """,
            (image_task, preset.modality, preset.spatial_dims, image_task),
        ).fetchall()
        out = []
        for r in rows:
            d = row_dict(r)
            routed = [t for t in (r["tasks"] or "").split(",") if t]
            counts = r["mask_file"] is not None and (len(routed) == 1 or r["label"] is not None)
            d["annotated"] = (int(r["ann_voxels"] or 0) > 0) if counts else None
            d["slices"] = json.loads(r["shape"])[0]
            out.append(d)
        return out

    @staticmethod
    def _derived_labels(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
        """Study -> label its annotations give (1 if any counted annotation has a voxel), for studies with one."""
        derived: dict[str, int] = {}
        for r in rows:
            if r["annotated"] is not None:
                derived[r["study_uid"]] = max(derived.get(r["study_uid"], 0), int(r["annotated"]))
        return derived

    def annotation_labels(self) -> list[tuple[str, str, int]]:
        """``(study_uid, image task, label)`` that annotations give studies the CSV does not label for that task."""
        from imaging.presets import PRESETS

        out = []
        for task in PRESETS:
            rows = self._task_images(task)
            csv = {r["study_uid"] for r in rows if r["label"] is not None}
            out += [(study, task, label) for study, label in sorted(self._derived_labels(rows).items())
                    if study not in csv]
        return out

    def items(self, task: str, *, split: str | None = None, labelled_only: bool = True) -> list[Item]:
        """The samples of a task: for each labelled study, its usable images of the task's kind.

        A volume task takes the study's volume with the most slices (ties: the last series UID in sort order); a
        2D task takes every usable image of the study.

        Image task ``X``: a study's label is its CSV label for ``X``; without one, the label its annotations give
        (1 if a mask of one of its images has a voxel, else 0), so the CSV is optional where annotations exist.

        Segmentation task ``X-seg``: the images of ``X`` (same routing, split and volume rule) that have an ok
        annotation (label 1 if the mask has a voxel, else 0; ``mask`` set), and the images without annotation of
        studies the CSV labels 0 for ``X`` (label 0, ``mask`` None: an empty mask). A volume task prefers an
        annotated volume, then the one with the most slices.

        Args:
            task: The task name.
            split: Only this split (train/val/test), or all.
            labelled_only: Skip studies (segmentation: images) whose label (mask) is unknown; with False they come
                with label -1 (and no mask).

        Returns:
            The items, ordered by study UID then image key.
        """
        from imaging.presets import get_preset

        preset = get_preset(task)
        rows = self._task_images(preset.image_task)
        derived = self._derived_labels(rows)
        chosen: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if preset.segmentation:
                if r["annotated"] is not None:
                    r["item_label"], r["item_mask"] = int(r["annotated"]), self.path.parent / r["mask_file"]
                elif r["label"] is not None and int(r["label"]) == 0:
                    r["item_label"], r["item_mask"] = 0, None
                else:
                    r["item_label"], r["item_mask"] = -1, None
            else:
                label = r["label"] if r["label"] is not None else derived.get(r["study_uid"])
                r["item_label"], r["item_mask"] = (-1 if label is None else int(label)), None
            if labelled_only and r["item_label"] == -1:
                continue
            if split is not None and r["split"] != split:
                continue
            chosen.setdefault(r["study_uid"], []).append(r)
        items: list[Item] = []
        for study_rows in chosen.values():
            if preset.spatial_dims == 3:
                if preset.segmentation:
                    study_rows = [max(study_rows, key=lambda r: (r["item_mask"] is not None, r["slices"],
                                                                 r["image_key"]))]
                else:
                    study_rows = [max(study_rows, key=lambda r: (r["slices"], r["image_key"]))]
            for r in study_rows:
                items.append(
                    Item(
                        study_uid=r["study_uid"],
                        task=task,
                        label=r["item_label"],
                        split=r["split"],
                        patient_pseudonym=r["patient_pseudonym"],
                        plan=plan_from_json(r["plan"]),
                        mask=r["item_mask"],
                    )
                )
        return items

    def assign_splits(
        self, *, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: str = "oncofed-split-v1"
    ) -> int:
        """Give every labelled patient without a split one, deterministically and for good (labels from the CSV and,
        for studies it does not label, from their lesion annotations).

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
        labelled = [(r["patient_pseudonym"], r["patient_id"], r["task"], int(r["label"])) for r in rows]
        derived = self.annotation_labels()
        if derived:
            patients = {r[0]: (r[1], r[2]) for r in self.db.execute(
                "SELECT study_uid, patient_pseudonym, patient_id FROM studies")}
            labelled += [(*patients[study], task, label) for study, task, label in derived if study in patients]
        strata: dict[str, set[tuple[str, int]]] = {}
        ids: dict[str, str] = {}
        for pseudo, patient_id, task, label in labelled:
            strata.setdefault(pseudo, set()).add((task, label))
            ids[pseudo] = patient_id
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

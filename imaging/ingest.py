"""Ingest a folder of DICOM files into the site catalog.

The folder may hold files of any name in nested folders and DICOMDIR sets. Ingest:

1. walks the folder and reads the header of every new or changed file (unchanged files, by size and
   modification time, are not opened again);
2. rejects files that are not DICOM, unreadable, duplicates of another file's SOPInstanceUID, or
   not images; DICOMDIR files are read for the files they reference, and missing ones are reported;
3. groups the rest by study and series and, for each series that gained, lost or changed a file,
   plans its images (slice order, geometry checks) and decodes the pixels once to prove they decode;
4. records every file, series and image with its status and reason. One bad file or series never
   stops the others;
5. matches lesion annotations (DICOM SEG and RT Structure Sets, Modality SEG/RTSTRUCT) to the catalog's images
   (see :mod:`imaging.annotations`): by referenced series for a volume, by referenced SOP instance for a 2D
   image. Each image's ok annotations, united, are one mask file in the workspace
   (``annotations/<hash of the image key>.npz``, uint8 array ``mask``, written atomically) and each annotation is
   a row of the ``annotations`` table with its status and reason. An annotation whose image is not here yet is
   rejected as ``annotation-unreferenced`` and matched again as soon as that series is checked (in the same or a
   later ingest, from any folder); one whose image series changes is matched again with it.

Ingest is crash-safe: the files found and the series they make dirty are written in one transaction
(``pending_series``), and each series' check replaces its rows and clears its mark in another. A run
killed at any point (``kill -9``, power loss) leaves either the old state or a marked series, and the
next run checks every marked series even though its files are unchanged: it ends with the same catalog
as an uninterrupted run. Annotations are marked the same way (``pending_annotations``: written with the check of a
series they belong to or reference, cleared with their match, in the transaction that records the image's rows
after its mask file is in place).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from imaging.annotations import (
    ANNOTATION_MODALITIES,
    ANNOTATIONS_DIR,
    mask_file_name,
    read_annotation,
    read_annotation_ref,
    write_mask,
)
from imaging.catalog import Catalog, Status, header_from_json, header_to_json, plan_from_json, plan_to_json
from imaging.dicom import InstanceHeader, plan_images, read_header, read_image
from imaging.errors import DicomError, Reason
from imaging.presets import read_policy, tasks_for_series

__all__ = ["IngestReport", "Progress", "ingest_folder", "walk_files"]

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: called as ingest advances."""


@dataclass
class IngestReport:
    """What one ingest run did."""

    source: str
    files_seen: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    series_checked: int = 0
    images_decoded: int = 0
    seconds: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)
    series_ok: int = 0
    series_rejected: int = 0
    images_ok: int = 0
    annotations_checked: int = 0
    annotations_ok: int = 0
    annotations_rejected: int = 0


def walk_files(root: Path, skipped: list[tuple[Path, Reason, str]] | None = None
               ) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file under ``root`` (recursively, symlinks not followed), in a stable order.

    Args:
        root: The folder.
        skipped: Receives ``(path, reason, message)`` for each folder that cannot be read and each symbolic
            link (not followed: it may point outside the source), so that nothing is left out unsaid.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if skipped is not None:
                skipped.append((folder, Reason.UNREADABLE,
                                f"folder cannot be read ({exc.strerror}); its files were not ingested: check its "
                                "permissions"))
            continue
        subdirs = []
        for entry in entries:
            if entry.is_symlink():
                if skipped is not None:
                    skipped.append((Path(entry.path), Reason.SYMLINK,
                                    "a symbolic link: not followed (it may point outside the source); copy the files "
                                    "it points to into the folder instead"))
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path), entry.stat(follow_symlinks=False)
        stack.extend(reversed(subdirs))


def _dicomdir_references(path: Path) -> list[Path]:
    """Files a DICOMDIR references (resolved relative to its folder)."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:  # noqa: BLE001 - a broken DICOMDIR is only an index
        return []
    out = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        out.append(path.parent.joinpath(*parts))
    return out


def ingest_folder(
    catalog: Catalog, source: Path | str, *, progress: Progress | None = None
) -> IngestReport:
    """Build or update the catalog from the DICOM files under ``source``.

    Args:
        catalog: The site catalog.
        source: The folder to ingest.
        progress: Optional callback ``(phase, done, total)``.

    Returns:
        What was read, skipped, rejected, decoded and matched.

    Raises:
        FileNotFoundError: ``source`` is not a folder.
    """
    t0 = time.perf_counter()
    root = Path(source).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM source {root} is not a folder; give the folder that holds the studies")
    report = IngestReport(source=str(root))
    tick = progress or (lambda phase, done, total: None)

    known = catalog.file_rows(str(root))
    skipped: list[tuple[Path, Reason, str]] = []
    files = list(walk_files(root, skipped))
    # Series an earlier run marked but did not finish checking (it was killed): checked again now.
    interrupted = {r[0] for r in catalog.db.execute(
        "SELECT series_uid FROM pending_series WHERE series_uid IN (SELECT series_uid FROM files WHERE source=?)",
        (str(root),))}
    report.files_seen = len(files)
    on_disk = {str(p) for p, _ in files} | {str(p) for p, _, _ in skipped}

    dirty_series: set[str] = set(interrupted)
    # Annotation series a catalog written before annotations were read holds as rejected series: checked again.
    dirty_series |= {r[0] for r in catalog.db.execute(
        f"SELECT series_uid FROM series WHERE modality IN ({','.join('?' * len(ANNOTATION_MODALITIES))}) "
        "AND series_uid IN (SELECT series_uid FROM files WHERE source=?)", (*sorted(ANNOTATION_MODALITIES), str(root)))}
    new_headers: dict[str, InstanceHeader] = {}
    # rows to write for new or changed files, and for what the walk could not enter (recorded every run)
    file_rows: list[tuple] = [(str(p), str(root), 0, 0, Status.REJECTED, reason, message, None, None, None, None)
                              for p, reason, message in skipped]
    dicomdirs: list[Path] = []

    for i, (path, st) in enumerate(files):
        tick("headers", i, len(files))
        row = known.get(str(path))
        if row is not None and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns:
            report.files_unchanged += 1
            continue
        if row is not None and row["series_uid"]:
            dirty_series.add(row["series_uid"])
        report.files_read += 1
        try:
            header = read_header(path, stat=st)
        except DicomError as err:
            status = Status.INDEX if err.reason is Reason.DICOMDIR else Status.REJECTED
            if status is Status.INDEX:
                dicomdirs.append(path)
            file_rows.append(
                (str(path), str(root), st.st_size, st.st_mtime_ns, status, err.reason, err.message,
                 None, None, None, None)
            )
            continue
        new_headers[str(path)] = header
        dirty_series.add(header.series_uid)
    tick("headers", len(files), len(files))

    removed = [p for p in known if p not in on_disk]
    report.files_removed = len(removed)
    for p in removed:
        if known[p]["series_uid"]:
            dirty_series.add(known[p]["series_uid"])

    with catalog.transaction() as db:
        db.executemany("DELETE FROM files WHERE path=?", [(p,) for p in removed])
        db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)", file_rows)
        # Stage the new headers as accepted; duplicates and series checks may still reject them.
        db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (p, str(root), h.size, h.mtime_ns, Status.OK, None, None, h.sop_instance_uid,
                 h.series_uid, h.study_uid, header_to_json(h))
                for p, h in new_headers.items()
            ],
        )
        # Files referenced by a DICOMDIR that are not there.
        for dicomdir in dicomdirs:
            for ref in _dicomdir_references(dicomdir):
                if not ref.exists():
                    db.execute(
                        "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (str(ref), str(root), 0, 0, Status.REJECTED, Reason.MISSING_FILE,
                         f"listed in {dicomdir} but not on disk; copy the complete media", None, None,
                         None, None),
                    )
        _reject_duplicates(db, dirty_series)
        db.executemany("INSERT OR IGNORE INTO pending_series VALUES (?)", [(u,) for u in dirty_series])

    series_list = sorted(dirty_series)
    for i, series_uid in enumerate(series_list):
        tick("series", i, len(series_list))
        with catalog.transaction() as db:
            decoded = _check_series(catalog, series_uid)
            db.execute("DELETE FROM pending_series WHERE series_uid=?", (series_uid,))
        report.series_checked += 1
        report.images_decoded += decoded
    tick("series", len(series_list), len(series_list))

    report.annotations_checked = _match_annotations(catalog, tick)

    with catalog.transaction() as db:
        db.execute("DELETE FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM series)")
    _summarise(catalog, report, root)
    report.seconds = time.perf_counter() - t0
    return report


def _reject_duplicates(db: sqlite3.Connection, dirty_series: set[str]) -> None:
    """Keep one file of each SOPInstanceUID held by several: the first by path, unless a copy in the same
    transfer syntax is longer (the shorter one was cut short). A shorter copy in the same transfer syntax is
    rejected as ``truncated-pixel-data``; any other copy (another path, or a twin in another syntax) as a
    duplicate."""
    rows = db.execute(
        """
        SELECT path, sop_instance_uid, series_uid, status, size, header FROM files
        WHERE sop_instance_uid IN (
            SELECT sop_instance_uid FROM files
            WHERE sop_instance_uid IS NOT NULL AND (status = 'ok' OR reason IN (?, ?))
            GROUP BY sop_instance_uid HAVING COUNT(*) > 1)
        AND (status = 'ok' OR reason IN (?, ?))
        ORDER BY sop_instance_uid, path
        """,
        (Reason.DUPLICATE_INSTANCE, Reason.TRUNCATED_PIXEL_DATA) * 2,
    ).fetchall()
    groups: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        groups.setdefault(row["sop_instance_uid"], []).append(row)

    def syntax(row: sqlite3.Row) -> str:
        return str(json.loads(row["header"]).get("transfer_syntax", "")) if row["header"] else ""

    for group in groups.values():
        first = group[0]
        twins = [r for r in group if syntax(r) == syntax(first)]
        keep = max(twins, key=lambda r: r["size"])  # the first of the longest (max keeps the first of equals)
        for row in group:
            if row is keep:
                if row["status"] != Status.OK:  # it takes the place of a copy: its series changes
                    db.execute("UPDATE files SET status='ok', reason=NULL, message=NULL WHERE path=?", (row["path"],))
                    dirty_series.add(row["series_uid"])
                continue
            if row["status"] != Status.OK:
                continue  # already a copy: its series is unchanged
            if row in twins and row["size"] < keep["size"]:
                reason, message = (Reason.TRUNCATED_PIXEL_DATA,
                                   f"a shorter copy of {keep['path']} ({row['size']:,} of {keep['size']:,} bytes): "
                                   "cut short; the complete file is used")
            else:
                reason, message = (Reason.DUPLICATE_INSTANCE,
                                   f"same SOPInstanceUID as {keep['path']}; a copy of that file (only one is used)")
            db.execute("UPDATE files SET status=?, reason=?, message=? WHERE path=?",
                       (Status.REJECTED, reason, message, row["path"]))
            dirty_series.add(row["series_uid"])


def _check_series(catalog: Catalog, series_uid: str) -> int:
    """Plan and decode one series, replacing its series and image rows. Returns images decoded.

    An annotation series (every file SEG or RTSTRUCT) gets no series row: its annotations are marked for
    matching. Annotations referencing the series, or belonging to it, are marked too (its images may have changed).
    """
    db = catalog.db
    db.execute("DELETE FROM images WHERE series_uid=?", (series_uid,))
    db.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
    db.execute(
        "INSERT OR IGNORE INTO pending_annotations SELECT sop_instance_uid FROM annotations "
        "WHERE series_uid=? OR annotation_series_uid=?", (series_uid, series_uid))
    rows = db.execute(
        "SELECT path, header FROM files WHERE series_uid=? AND status='ok' AND header IS NOT NULL",
        (series_uid,),
    ).fetchall()
    headers = [header_from_json(r["header"]) for r in rows]
    if not headers:
        return 0
    if all(h.modality in ANNOTATION_MODALITIES for h in headers):
        db.executemany("INSERT OR IGNORE INTO pending_annotations VALUES (?)", [(h.sop_instance_uid,) for h in headers])
        return 0
    # The series' attributes come from one instance chosen by its content, not its file name, so the same
    # files give the same row wherever they were stored (a folder, or the PACS store).
    first = min(headers, key=lambda h: (h.instance_number is None, h.instance_number or 0, h.sop_instance_uid))
    _upsert_study(catalog, first)
    status, reason, message = Status.OK, None, None
    decoded = 0
    try:
        plans = plan_images(headers, policy=read_policy())
    except DicomError as err:
        plans = []
        status, reason, message = Status.REJECTED, err.reason, f"{err.path.name}: {err.message}"
    images_ok = 0
    for plan in plans:
        img_status, img_reason, img_message = Status.OK, None, None
        try:
            read_image(plan)
            images_ok += 1
        except DicomError as err:
            img_status, img_reason, img_message = Status.REJECTED, err.reason, f"{err.path}: {err.message}"
        decoded += 1
        db.execute(
            "INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (plan.key, plan.series_uid, plan.study_uid, plan.modality, plan.spatial_dims,
             str(list(plan.shape)), str([round(s, 4) for s in plan.spacing]), plan.laterality, plan.view,
             img_status, img_reason, img_message, plan_to_json(plan)),
        )
    if plans and images_ok == 0:
        rejected = db.execute(
            "SELECT reason, message FROM images WHERE series_uid=? LIMIT 1", (series_uid,)
        ).fetchone()
        status, reason, message = Status.REJECTED, rejected["reason"], rejected["message"]
    db.execute(
        "INSERT OR REPLACE INTO series VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (series_uid, first.study_uid, first.modality, first.body_part, first.manufacturer, first.model,
         first.slice_thickness, first.kvp, first.field_strength, first.rows, first.cols,
         str(list(first.pixel_spacing)) if first.pixel_spacing else None, len(headers),
         sum(h.n_frames for h in headers), ",".join(tasks_for_series(first.modality, first.body_part,
                                                                   first.description)),
         status, reason, message),
    )
    return decoded


def _upsert_study(catalog: Catalog, h: InstanceHeader) -> None:
    patient_key = h.patient_id or f"study:{h.study_uid}"
    catalog.db.execute(
        "INSERT OR REPLACE INTO studies VALUES (?,?,?,?,?,?)",
        (h.study_uid, patient_key, h.patient_name, catalog.pseudonym(patient_key), h.accession, h.study_date),
    )


def _summarise(catalog: Catalog, report: IngestReport, root: Path) -> None:
    db = catalog.db
    for reason, n in db.execute(
        "SELECT reason, COUNT(*) FROM files WHERE source=? AND status='rejected' GROUP BY reason", (str(root),)
    ):
        report.rejected[f"file:{reason}"] += n
    for row in db.execute(
        """
        SELECT s.status, s.reason, COUNT(*) FROM series s
        WHERE s.series_uid IN (SELECT series_uid FROM files WHERE source=?)
        GROUP BY s.status, s.reason
        """,
        (str(root),),
    ):
        if row[0] == Status.OK:
            report.series_ok += row[2]
        else:
            report.series_rejected += row[2]
            report.rejected[f"series:{row[1]}"] += row[2]
    report.images_ok = db.execute(
        """
        SELECT COUNT(*) FROM images WHERE status='ok'
        AND series_uid IN (SELECT series_uid FROM files WHERE source=?)
        """,
        (str(root),),
    ).fetchone()[0]
    for status, reason, n in db.execute(
        "SELECT status, reason, COUNT(*) FROM annotations WHERE path IN (SELECT path FROM files WHERE source=?) "
        "GROUP BY status, reason", (str(root),)
    ):
        if status == Status.OK:
            report.annotations_ok += n
        else:
            report.annotations_rejected += n
            report.rejected[f"annotation:{reason}"] += n
    rejected_images = db.execute(
        """
        SELECT reason, COUNT(*) FROM images WHERE status='rejected'
        AND series_uid IN (SELECT s.series_uid FROM series s WHERE s.status='ok')
        AND series_uid IN (SELECT series_uid FROM files WHERE source=?) GROUP BY reason
        """,
        (str(root),),
    ).fetchall()
    for reason, n in rejected_images:
        report.rejected[f"image:{reason}"] += n


@dataclass
class _Located:
    """Where one annotation stands before rasterising: its row so far and the image it marks (if found)."""

    sop: str
    row: dict[str, object] | None  # None: the annotation is gone (its file removed or replaced)
    image: sqlite3.Row | None = None


def _annotation_row(sop: str, h: InstanceHeader, **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "sop_instance_uid": sop, "annotation_series_uid": h.series_uid, "study_uid": h.study_uid,
        "series_uid": None, "image_key": None, "kind": h.modality, "path": str(h.path), "mask_file": None,
        "voxels": None, "lesions": None, "status": Status.REJECTED, "reason": None, "message": None,
    }
    row.update(values)
    return row


def _locate(catalog: Catalog, sop: str) -> _Located:
    """Read an annotation's references and find the catalog image it marks (no pixels decoded)."""
    db = catalog.db
    found = db.execute(
        "SELECT header FROM files WHERE sop_instance_uid=? AND status='ok' AND header IS NOT NULL ORDER BY path",
        (sop,)).fetchone()
    h = header_from_json(found["header"]) if found is not None else None
    if h is None or h.modality not in ANNOTATION_MODALITIES:
        return _Located(sop, None)
    try:
        ref = read_annotation_ref(h.path)
    except DicomError as err:
        return _Located(sop, _annotation_row(sop, h, reason=err.reason, message=err.message))
    series = ref.referenced_series[0] if ref.referenced_series else None
    keys = sorted(set(ref.referenced_series) | set(ref.referenced_instances))
    images = db.execute(
        "SELECT image_key, series_uid, study_uid, status, reason, plan FROM images "
        "WHERE image_key IN (SELECT value FROM json_each(?)) ORDER BY image_key", (json.dumps(keys),)).fetchall()
    ok = [r for r in images if r["status"] == Status.OK]
    if len(ok) == 1:
        image = ok[0]
        return _Located(sop, _annotation_row(sop, h, series_uid=image["series_uid"], study_uid=image["study_uid"],
                                             image_key=image["image_key"], status=Status.OK), image)
    if len(ok) > 1:
        return _Located(sop, _annotation_row(
            sop, h, series_uid=series, reason=Reason.ANNOTATION_UNREADABLE,
            message=f"it marks {len(ok)} images of the catalog ({', '.join(r['image_key'] for r in ok[:3])}); "
                    "export one annotation per image"))
    rejected = images[0] if images else db.execute(
        "SELECT series_uid AS image_key, reason FROM series WHERE series_uid IN (SELECT value FROM json_each(?)) "
        "AND status != 'ok' ORDER BY series_uid", (json.dumps(list(ref.referenced_series)),)).fetchone()
    if rejected is not None:
        message = (f"the image it references ({rejected['image_key']}) was rejected ({rejected['reason']}); fix that "
                   "series and ingest again: the annotation is matched when the series is accepted")
    else:
        what = f"series {series}" if series else f"instance {ref.referenced_instances[0]}"
        message = (f"the {what} it references is not in the catalog; ingest the folder or PACS study that holds it "
                   "(the annotation is matched when it arrives)")
    return _Located(sop, _annotation_row(sop, h, series_uid=series, reason=Reason.ANNOTATION_UNREFERENCED,
                                         message=message))


def _rasterise(catalog: Catalog, located: _Located) -> tuple[dict[str, object], np.ndarray | None]:
    """Place an annotation on its image's grid: its final row and mask (None when rejected)."""
    assert located.row is not None and located.image is not None
    plan = plan_from_json(located.image["plan"])
    try:
        annotation = read_annotation(Path(str(located.row["path"])), plan,
                                     headers=catalog.headers_of_series(plan.series_uid))
    except DicomError as err:
        return {**located.row, "status": Status.REJECTED, "reason": err.reason, "message": err.message}, None
    mask = annotation.mask
    lesions = int(ndimage.label(mask)[1])
    message = f"{', '.join(annotation.segments)}: {int(mask.sum())} voxels, {lesions} lesion(s)"
    return {**located.row, "mask_file": mask_file_name(plan.key), "voxels": int(mask.sum()), "lesions": lesions,
            "message": message}, mask


def _components(links: list[set[str]]) -> list[set[str]]:
    """The image keys that must be refreshed together: linked by an annotation that moves between two images."""
    groups: list[set[str]] = []
    for keys in links:
        joined = set(keys)
        for group in [g for g in groups if g & joined]:
            joined |= group
            groups.remove(group)
        groups.append(joined)
    return sorted(groups, key=min)


def _write_rows(db: sqlite3.Connection, rows: list[tuple[str, dict[str, object] | None]]) -> None:
    for sop, row in rows:
        if row is None:
            db.execute("DELETE FROM annotations WHERE sop_instance_uid=?", (sop,))
        else:
            columns = list(row)
            db.execute(f"INSERT OR REPLACE INTO annotations ({','.join(columns)}) VALUES "
                       f"({','.join('?' * len(columns))})", [row[c] for c in columns])


def _match_annotations(catalog: Catalog, tick: Progress) -> int:
    """Match every marked annotation to its image and refresh the masks of the images concerned.

    Images are refreshed in groups (usually one image): the annotations of a group are rasterised, united per image
    and the mask files written (atomically) before the transaction that records their rows and clears their marks.
    A run killed in between leaves the marks, and the next run redoes the group. Returns the annotations matched.
    """
    db = catalog.db
    workspace = catalog.path.parent
    missing = [r[0] for r in db.execute(
        "SELECT DISTINCT mask_file FROM annotations WHERE status='ok' AND mask_file IS NOT NULL")
        if not (workspace / r[0]).is_file()]
    if missing:  # a mask file deleted (the folder can be rebuilt): its image's annotations are matched again
        with catalog.transaction() as tx:
            tx.execute("INSERT OR IGNORE INTO pending_annotations SELECT sop_instance_uid FROM annotations "
                       "WHERE status='ok' AND mask_file IN (SELECT value FROM json_each(?))", (json.dumps(missing),))
    pending = [r[0] for r in db.execute("SELECT sop_instance_uid FROM pending_annotations ORDER BY 1")]
    old = {r[0]: r[1] for r in db.execute(
        "SELECT sop_instance_uid, image_key FROM annotations WHERE image_key IS NOT NULL "
        "AND sop_instance_uid IN (SELECT sop_instance_uid FROM pending_annotations)")}
    located = {sop: _locate(catalog, sop) for sop in pending}

    def keys_of(sop: str) -> set[str]:
        target = located[sop].image["image_key"] if located[sop].image is not None else None
        return {k for k in (old.get(sop), target) if k}

    groups = _components([keys_of(sop) for sop in pending if keys_of(sop)])
    steps = len(groups) + 1
    for i, group in enumerate(groups):
        tick("annotations", i, steps)
        members = [sop for sop in pending if keys_of(sop) & group]
        others = [r[0] for r in db.execute(
            "SELECT sop_instance_uid FROM annotations WHERE status='ok' "
            "AND image_key IN (SELECT value FROM json_each(?)) ORDER BY sop_instance_uid",
            (json.dumps(sorted(group)),)) if r[0] not in located]
        rows: list[tuple[str, dict[str, object] | None]] = []
        union: dict[str, np.ndarray] = {}
        for sop in members + others:
            where = located[sop] if sop in located else _locate(catalog, sop)
            row = where.row
            if where.image is not None:
                row, mask = _rasterise(catalog, where)
                if mask is not None:
                    key = where.image["image_key"]
                    union[key] = union[key] | mask if key in union else mask
            rows.append((sop, row))
        for key in sorted(group):
            file = workspace / mask_file_name(key)
            if key in union:
                write_mask(file, union[key])
            else:
                file.unlink(missing_ok=True)
        with catalog.transaction() as tx:
            _write_rows(tx, rows)
            tx.executemany("DELETE FROM pending_annotations WHERE sop_instance_uid=?", [(s,) for s in members])
    if pending:
        tick("annotations", len(groups), steps)
        rest = [sop for sop in pending if not keys_of(sop)]
        with catalog.transaction() as tx:
            _write_rows(tx, [(sop, located[sop].row) for sop in rest])
            tx.executemany("DELETE FROM pending_annotations WHERE sop_instance_uid=?", [(s,) for s in rest])
        tick("annotations", steps, steps)
    # Studies labelled by their annotations only get a split as CSV-labelled ones do (checked on every run, so a run
    # killed before this point has it done by the next).
    if _unsplit_annotated(catalog):
        with catalog.transaction():
            catalog.assign_splits()
    _remove_stale_masks(catalog)
    return len(pending)


def _unsplit_annotated(catalog: Catalog) -> bool:
    """Whether some study labelled by its annotations belongs to a patient without a split."""
    if catalog.db.execute("SELECT 1 FROM annotations WHERE status='ok' LIMIT 1").fetchone() is None:
        return False
    studies = {study for study, _, _ in catalog.annotation_labels()}
    return bool(studies) and catalog.db.execute(
        "SELECT 1 FROM studies st WHERE st.study_uid IN (SELECT value FROM json_each(?)) AND NOT EXISTS "
        "(SELECT 1 FROM splits sp WHERE sp.patient_pseudonym = st.patient_pseudonym) LIMIT 1",
        (json.dumps(sorted(studies)),)).fetchone() is not None


def _remove_stale_masks(catalog: Catalog) -> None:
    """Delete mask files no ok annotation points to (left by a run killed between a write and its record)."""
    folder = catalog.path.parent / ANNOTATIONS_DIR
    if not folder.is_dir():
        return
    used = {Path(name).name for (name,) in catalog.db.execute(
        "SELECT mask_file FROM annotations WHERE status='ok' AND mask_file IS NOT NULL")}
    for file in folder.iterdir():
        if file.name not in used and file.is_file():
            file.unlink(missing_ok=True)

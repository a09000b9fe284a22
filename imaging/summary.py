"""What a site holds, as plain data for people and tools (the site CLI prints these).

``site_status`` carries counts and reason codes only: no PatientID, name, UID, date or path, so its
output can be shared with the consortium lead. ``series_listing`` lists UIDs and is for the site.
Both shapes are versioned (``schema``) and documented in the README.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from imaging.catalog import Catalog, Split
from imaging.labels import label_gaps
from imaging.presets import PRESETS, SEGMENTATION_PRESETS

__all__ = ["series_listing", "site_status"]

STATUS_SCHEMA = "oncofed.site-status/1"
SERIES_SCHEMA = "oncofed.series/1"


def _counts(catalog: Catalog, sql: str, *args: object) -> dict[str, int]:
    return {str(k if k is not None else ""): int(n) for k, n in catalog.db.execute(sql, args)}


def site_status(catalog: Catalog) -> dict[str, Any]:
    """Counts per task (image and segmentation tasks), modality, manufacturer, label and split, annotations, and
    rejects grouped by reason.

    Returns:
        A JSON-ready dict (schema ``oncofed.site-status/1``); see the README for every field.
    """
    db = catalog.db
    files = _counts(catalog, "SELECT status, COUNT(*) FROM files GROUP BY status")
    series = _counts(catalog, "SELECT status, COUNT(*) FROM series GROUP BY status")
    images = _counts(catalog, "SELECT status, COUNT(*) FROM images GROUP BY status")
    tasks: dict[str, Any] = {}
    for preset in (*PRESETS.values(), *SEGMENTATION_PRESETS.values()):
        items = catalog.items(preset.name)
        by_split: dict[str, Counter[str]] = {s.value: Counter() for s in Split}
        by_split["unassigned"] = Counter()
        for item in items:
            by_split[item.split or "unassigned"][str(item.label)] += 1
        studies_with_images = db.execute(
            "SELECT COUNT(DISTINCT i.study_uid) FROM images i JOIN series se ON se.series_uid = i.series_uid "
            "WHERE i.status='ok' AND i.modality=? AND i.dims=? AND (',' || se.tasks || ',') LIKE ('%,' || ? || ',%')",
            (preset.modality, preset.spatial_dims, preset.image_task),
        ).fetchone()[0]
        labelled = {i.study_uid for i in items}
        tasks[preset.name] = {
            "modality": preset.modality,
            "spatial_dims": preset.spatial_dims,
            "studies_with_usable_images": int(studies_with_images),
            "labelled_studies": len(labelled),
            "samples": len(items),
            "labels": dict(sorted(Counter(str(i.label) for i in items).items())),
            "splits": {k: dict(sorted(v.items())) for k, v in by_split.items() if v},
        }
        if preset.segmentation:
            tasks[preset.name]["masked_samples"] = sum(i.mask is not None for i in items)
    annotated = {study for study, _, _ in catalog.annotation_labels()}
    unlabelled = len({
        r[0] for r in db.execute(
            """
            SELECT DISTINCT i.study_uid FROM images i WHERE i.status='ok'
            AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.study_uid = i.study_uid)
            """
        )
    } - annotated)
    unknown, without_image = label_gaps(catalog)
    rejects = []
    for level, table in (("file", "files"), ("series", "series"), ("image", "images"), ("annotation", "annotations")):
        for reason, n in db.execute(
            f"SELECT reason, COUNT(*) FROM {table} WHERE status='rejected' GROUP BY reason ORDER BY 2 DESC"
        ):
            rejects.append({"level": level, "reason": reason, "count": int(n)})
    return {
        "schema": STATUS_SCHEMA,
        "files": files,
        "series": series,
        "images": images,
        "annotations": _counts(catalog, "SELECT status, COUNT(*) FROM annotations GROUP BY status"),
        "studies": int(db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]),
        "patients": int(db.execute("SELECT COUNT(DISTINCT patient_pseudonym) FROM studies").fetchone()[0]),
        "modalities": _counts(
            catalog, "SELECT modality, COUNT(*) FROM series WHERE status='ok' GROUP BY modality ORDER BY 1"
        ),
        "manufacturers": _counts(
            catalog,
            "SELECT manufacturer, COUNT(*) FROM series WHERE status='ok' GROUP BY manufacturer ORDER BY 1",
        ),
        "tasks": tasks,
        "unlabelled_studies": int(unlabelled),
        "labels_for_unknown_studies": len(unknown),
        "labelled_studies_without_usable_image": len(without_image),
        "split_patients": _counts(catalog, "SELECT split, COUNT(*) FROM splits GROUP BY split ORDER BY 1"),
        "rejects": rejects,
    }


def series_listing(catalog: Catalog) -> dict[str, Any]:
    """Every series: UIDs, modality, matching tasks, slices/frames, shape, spacing, status and reason; every lesion
    annotation with the image it marks or why it was rejected; the files that joined no series.

    Returns:
        A JSON-ready dict (schema ``oncofed.series/1``) with ``series``, ``annotations`` and ``rejected_files``.
    """
    out = []
    for r in catalog.series_rows():
        reason, message = r["reason"], r["message"]
        if reason is None and r["image_reason"] is not None:
            reason, message = r["image_reason"], r["image_message"]
        out.append(
            {
                "study_instance_uid": r["study_uid"],
                "series_instance_uid": r["series_uid"],
                "modality": r["modality"],
                "body_part": r["body_part"] or "",
                "manufacturer": r["manufacturer"] or "",
                "model": r["model"] or "",
                "tasks": [t for t in (r["tasks"] or "").split(",") if t],
                "files": r["n_files"],
                "frames": r["n_frames"],
                "images": r["n_images"] or 0,
                "images_ok": int(r["n_images_ok"] or 0),
                "shape": json.loads(r["shape"]) if r["shape"] else None,
                "spacing_mm": json.loads(r["spacing"]) if r["spacing"] else None,
                "slice_thickness_mm": r["slice_thickness"],
                "status": r["status"],
                "reason": reason,
                "message": message,
            }
        )
    rejected_files = [
        {"path": r["path"], "reason": r["reason"], "message": r["message"]} for r in catalog.rejected_files()
    ]
    annotations = [
        {
            "sop_instance_uid": r["sop_instance_uid"],
            "kind": r["kind"],
            "study_instance_uid": r["study_uid"],
            "series_instance_uid": r["series_uid"],
            "image_key": r["image_key"],
            "path": r["path"],
            "voxels": r["voxels"],
            "lesions": r["lesions"],
            "status": r["status"],
            "reason": r["reason"],
            "message": r["message"],
        }
        for r in catalog.annotation_rows()
    ]
    return {"schema": SERIES_SCHEMA, "series": out, "annotations": annotations, "rejected_files": rejected_files}

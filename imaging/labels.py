"""Label manifests: a CSV of ``study_instance_uid,task,label`` joined to the site catalog.

Loading a manifest replaces the labels that earlier loads of the same file gave, so a corrected CSV
can simply be loaded again. Bad rows are reported with their line number and skipped; the rest load.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from imaging.catalog import Catalog
from imaging.presets import PRESETS

__all__ = ["LabelFileError", "LabelReport", "label_gaps", "load_labels", "read_manifest"]

REQUIRED_COLUMNS = ("study_instance_uid", "task", "label")


class LabelFileError(ValueError):
    """A manifest that cannot be read at all (missing file or columns)."""


@dataclass
class LabelReport:
    """What loading a manifest did."""

    path: str
    rows: int = 0
    stored: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)
    unknown_studies: list[str] = field(default_factory=list)
    without_image: list[tuple[str, str]] = field(default_factory=list)
    newly_split_patients: int = 0


def read_manifest(path: Path | str) -> tuple[list[tuple[str, str, int]], list[tuple[int, str]], int]:
    """Parse a label manifest.

    Args:
        path: The CSV file (header row required; extra columns are ignored).

    Returns:
        ``(rows, problems, n_rows)``: valid ``(study_uid, task, label)`` rows, ``(line, message)`` for
        each rejected row, and the number of data rows read.

    Raises:
        LabelFileError: The file is missing or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"label manifest {path} not found; give a CSV with columns {','.join(REQUIRED_COLUMNS)}")
    try:
        return _read(path)
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                             "save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise LabelFileError(f"{path} is not a readable CSV ({exc}): check that it is the label table and not "
                             "another file") from None
    except OSError as exc:
        raise LabelFileError(f"cannot read {path} ({exc.strerror}): check its permissions") from None


def _read(path: Path) -> tuple[list[tuple[str, str, int]], list[tuple[int, str]], int]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        names = [c.strip().lower() for c in (reader.fieldnames or [])]
        twice = sorted({c for c in names if c in REQUIRED_COLUMNS and names.count(c) > 1})
        if twice:
            raise LabelFileError(f"{path}: column(s) {', '.join(twice)} appear more than once in the header; keep one "
                                 "so that it is clear which holds the value")
        columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise LabelFileError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                f"{','.join(REQUIRED_COLUMNS)} (found: {', '.join(columns) or 'no header'})"
            )
        rows: list[tuple[str, str, int]] = []
        problems: list[tuple[int, str]] = []
        seen: dict[tuple[str, str], tuple[int, int]] = {}
        n = 0
        for n, record in enumerate(reader, start=1):
            line = n + 1  # the header is line 1
            study = (record.get(columns["study_instance_uid"]) or "").strip()
            task = (record.get(columns["task"]) or "").strip()
            raw = (record.get(columns["label"]) or "").strip()
            if not study:
                problems.append((line, "empty study_instance_uid"))
                continue
            if task not in PRESETS:
                problems.append((line, f"unknown task {task!r}; use one of {', '.join(PRESETS)}"))
                continue
            if raw not in ("0", "1"):
                problems.append((line, f"label {raw!r} is not 0 or 1"))
                continue
            label = int(raw)
            if (study, task) in seen:
                first_line, first_label = seen[(study, task)]
                if first_label != label:
                    problems.append(
                        (line, f"conflicts with line {first_line} ({task} label {first_label}); row skipped")
                    )
                continue
            seen[(study, task)] = (line, label)
            rows.append((study, task, label))
    return rows, problems, n


def load_labels(catalog: Catalog, path: Path | str) -> LabelReport:
    """Load a manifest into the catalog, report how it joins, and assign new patients a split.

    Args:
        catalog: The site catalog.
        path: The CSV manifest.

    Returns:
        Rows read and stored, rejected rows, labels of studies the catalog does not hold, and labelled
        studies with no usable image for their task.

    Raises:
        LabelFileError: The file is missing or lacks a required column.
    """
    source = str(Path(path).resolve())
    rows, problems, n = read_manifest(path)
    report = LabelReport(path=source, rows=n, invalid=problems)
    with catalog.transaction() as db:
        db.execute("DELETE FROM labels WHERE source=?", (source,))
        report.stored = catalog.set_labels(rows, source=source)
        report.newly_split_patients = catalog.assign_splits()
    report.unknown_studies, report.without_image = label_gaps(catalog)
    return report


def label_gaps(catalog: Catalog) -> tuple[list[str], list[tuple[str, str]]]:
    """Labels of studies not in the catalog, and labelled studies with no usable image for the task."""
    unknown = [
        r[0]
        for r in catalog.db.execute(
            "SELECT DISTINCT study_uid FROM labels WHERE study_uid NOT IN (SELECT study_uid FROM studies) "
            "ORDER BY study_uid"
        )
    ]
    without: list[tuple[str, str]] = []
    for preset in PRESETS.values():
        for (study,) in catalog.db.execute(
            """
            SELECT l.study_uid FROM labels l JOIN studies s ON s.study_uid = l.study_uid
            WHERE l.task = ? AND NOT EXISTS (
                SELECT 1 FROM images i JOIN series se ON se.series_uid = i.series_uid
                WHERE i.study_uid = l.study_uid AND i.status = 'ok' AND i.modality = ? AND i.dims = ?
                AND (',' || se.tasks || ',') LIKE ('%,' || l.task || ',%'))
            ORDER BY l.study_uid
            """,
            (preset.name, preset.modality, preset.spatial_dims),
        ):
            without.append((study, preset.name))
    return unknown, without

"""Where imaging keeps its files in a site workspace (the site's full layout: ``fl_client.workspace``)."""

from __future__ import annotations

__all__ = ["ANNOTATIONS_DIR", "CACHE_DIR", "CATALOG_FILE"]

CATALOG_FILE = "catalog.sqlite"
"""The catalog database: studies, series, their status and reason, labels, splits, review verdicts."""

CACHE_DIR = "cache"
"""Preprocessed images (MONAI's persistent cache), rebuilt when deleted."""

ANNOTATIONS_DIR = "annotations"
"""Lesion masks of the catalog's annotations, one ``.npz`` per annotated image named by a hash of its key; rebuilt by
the next ingest when deleted."""

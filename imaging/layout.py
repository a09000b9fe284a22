"""Where imaging keeps its files in a site workspace (the site's full layout: ``fl_client.workspace``)."""

from __future__ import annotations

__all__ = ["CACHE_DIR", "CATALOG_FILE"]

CATALOG_FILE = "catalog.sqlite"
"""The catalog database: studies, series, their status and reason, labels, splits, review verdicts."""

CACHE_DIR = "cache"
"""Preprocessed images (MONAI's persistent cache), rebuilt when deleted."""

"""Shared test set-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ is not a package: make its helper modules importable.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """The folder of real DICOM test files that pydicom ships."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None, "pydicom's bundled test files are missing"
    return Path(str(path)).parent

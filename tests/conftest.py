"""Shared test set-up."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: make its helper modules importable.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Each test starts with torch's default CPU threads: a training run with the ``threads`` key sets them for
    its process, and a slow learner's result depends on them (a pooled colorectal run reached validation AUROC
    0.88 with two threads and 0.56 with one), so a test must not inherit another's setting."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """The folder of real DICOM test files that pydicom ships."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None, "pydicom's bundled test files are missing"
    return Path(str(path)).parent


def system_tool(name: str) -> str:
    """The path of a system program a test needs (Debian packages that .ci/run installs).

    Missing: the test is skipped on a developer's machine, and fails where ONCOFED_REQUIRE_SYSTEM_TOOLS
    is set (.ci/run sets it), so CI can never pass by skipping.
    """
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it with apt-get)"
        if os.environ.get("ONCOFED_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return path

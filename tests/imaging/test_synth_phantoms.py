"""The phantom registry: one phantom per preset, and the only place in the generator that names a task."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

import imaging.synth as synth
import imaging.synth.phantoms as phantoms
from imaging.presets import PRESETS
from imaging.synth import ALL_TASKS, PHANTOMS, Patient, StudyPlan, phantom_for, site_profiles
from imaging.synth.naming import Namer
from imaging.synth_cli import main as synth_main


def test_every_phantom_is_a_preset_of_its_modality_in_preset_order() -> None:
    assert tuple(PRESETS) == ALL_TASKS
    assert set(PHANTOMS) == set(PRESETS)
    for task, phantom in PHANTOMS.items():
        assert phantom.task == task
        assert phantom.modality == PRESETS[task].modality, task
        assert phantom_for(task) is phantom


def test_every_phantom_module_is_registered() -> None:
    """A module in imaging/synth/phantoms/ that defines a PHANTOM but is not listed would be silently unused."""
    modules = [m.name for m in pkgutil.iter_modules(phantoms.__path__)]
    assert modules
    for name in modules:
        module = importlib.import_module(f"{phantoms.__name__}.{name}")
        assert PHANTOMS[module.PHANTOM.task] is module.PHANTOM, name


def test_no_module_outside_the_phantoms_names_a_task() -> None:
    root = Path(synth.__file__).parent
    pattern = re.compile("|".join(re.escape(task) for task in PRESETS))
    for path in sorted(root.glob("*.py")):
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.name} names a task; put it in that task's phantom: {hits}"


def test_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="tasks with one: lung-ct"):
        phantom_for("lung")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_each_phantom_writes_a_positive_study_with_its_lesion(task: str, tmp_path: Path) -> None:
    site = site_profiles(1, seed=0)[0]
    phantom = phantom_for(task)
    patient = Patient(patient_id="A1234567001", name="SYNTHETIC^A0001", sex=phantom.patient_sex or "F",
                      birth_date="19600101", body=1.0)
    plan = StudyPlan(site, task, 0, 1, patient, "1.2.3.4", "A2500000123", "20250102", "093000", (0, 0, 0, 0))
    namer = Namer(site, tmp_path / "dicom", np.random.default_rng(0))
    files, records = phantom.write(plan, np.random.default_rng(1), site_dir=tmp_path, namer=namer, scale=1)
    written = sorted(p for p in (tmp_path / "dicom").rglob("*") if p.is_file())
    assert files == len(written) > 0
    ds = pydicom.dcmread(written[0], stop_before_pixels=True)
    assert ds.Modality == PRESETS[task].modality
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.PatientSex == patient.sex
    assert records and all(r["task"] == task and r["label"] == 1 for r in records)
    for record in records:
        mask = np.load(tmp_path / record["mask"])["mask"]
        assert mask.any() and int(mask.sum()) == record["mask_voxels"]


def test_cli_help_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        synth_main(["--help"])
    out = capsys.readouterr().out
    for task in ALL_TASKS:
        assert re.search(rf"^\s+{re.escape(task)}\s+{re.escape(PRESETS[task].title)}$", out, re.MULTILINE), task

"""Writing a whole synthetic consortium: each site's patients and studies, its DICOM folder, labels CSV and
lesion records, sites in parallel processes, and the consortium manifest."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from imaging.presets import PRESETS
from imaging.synth.naming import Namer
from imaging.synth.phantoms import ALL_TASKS, PHANTOMS, phantom_for
from imaging.synth.profiles import SiteProfile, site_profiles
from imaging.synth.study import Patient, StudyPlan

__all__ = [
    "FORMAT",
    "MARKER",
    "ConsortiumResult",
    "Progress",
    "SiteResult",
    "generate_consortium",
    "ingested_consortium",
    "validate_tasks",
]

MARKER = "consortium.json"
FORMAT = "oncofed.synthetic-consortium/1"

Progress = Callable[[int, int, str], None]
"""``progress(done, total, site)``, called after each study."""


@dataclass(frozen=True)
class SiteResult:
    """What was written for one site.

    Args:
        name: Site id.
        dicom_dir: Its DICOM folder.
        labels_csv: Its labels (``study_instance_uid,task,label``).
        lesions_json: Its lesion records.
        studies: Studies written.
        positives: Studies with a lesion.
        files: DICOM files written.
        patients: Distinct patients.
        per_task: Per task: ``{"studies": n, "positives": n}``.
    """

    name: str
    dicom_dir: Path
    labels_csv: Path
    lesions_json: Path
    studies: int
    positives: int
    files: int
    patients: int
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsortiumResult:
    """What :func:`generate_consortium` wrote.

    Args:
        out: The consortium folder.
        sites: One result per site.
        seconds: Wall time of the generation.
    """

    out: Path
    sites: list[SiteResult]
    seconds: float

    @property
    def files(self) -> int:
        """DICOM files written at all sites."""
        return sum(s.files for s in self.sites)


def _studies_for_site(site: SiteProfile, site_index: int, tasks: Sequence[str], studies_per_task: int,
                      seed: int) -> list[StudyPlan]:
    """Patients and studies of one site, with labels at the site's prevalence."""
    rng = np.random.default_rng([seed, site_index, 1])
    patients: list[Patient] = []
    plans: list[StudyPlan] = []
    letter = site.name[-1].upper()

    def new_patient(sex: str) -> Patient:
        i = len(patients) + 1
        born = int(rng.integers(1940, 1980))
        p = Patient(
            patient_id=f"{letter}{int(rng.integers(10**6, 10**7))}{i:03d}",
            name=f"SYNTHETIC^{letter}{i:04d}",
            sex=sex,
            birth_date=f"{born}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
            body=float(rng.uniform(0.9, 1.1)),
        )
        patients.append(p)
        return p

    for task_index, task in enumerate(tasks):
        n = max(4, int(round(studies_per_task * site.size_factor)))
        positives = min(max(2, int(round(n * site.prevalence))), n - 2)
        labels = np.array([1] * positives + [0] * (n - positives))
        rng.shuffle(labels)
        sex_rule = phantom_for(task).patient_sex
        for i in range(n):
            sex = sex_rule or str(rng.choice(["F", "M"]))
            earlier = [p for p in patients if p.sex == sex]
            patient = earlier[int(rng.integers(0, len(earlier)))] if earlier and rng.random() < 0.2 else \
                new_patient(sex)
            year = int(rng.integers(2019, 2026))
            date = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            accession = f"{letter}{year % 100:02d}{task_index}{i:04d}{int(rng.integers(100, 1000))}"
            study_uid = generate_uid(entropy_srcs=[str(seed), site.name, task, str(i), "study"])
            plans.append(StudyPlan(site, task, i, int(labels[i]), patient, study_uid, accession, date,
                                   f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
                                   (seed, site_index, task_index, i)))
    return plans


def _generate_site(root: Path, site: SiteProfile, site_index: int, tasks: Sequence[str], studies_per_task: int,
                   seed: int, scale: int, progress: Progress | None, done: list[int], total: int) -> SiteResult:
    """Write one site's studies, labels and lesion records under ``root/<site>``."""
    site_dir = root / site.name
    dicom_dir = site_dir / "dicom"
    plans = _studies_for_site(site, site_index, tasks, studies_per_task, seed)
    namer = Namer(site, dicom_dir, np.random.default_rng([seed, site_index, 2]))
    # The lesion SEG objects are named in the same style from their own random source, so the image files' names
    # do not depend on which studies have a lesion.
    annotations = Namer(site, dicom_dir, np.random.default_rng([seed, site_index, 3]))
    files = 0
    lesions: list[dict[str, Any]] = []
    per_task: dict[str, dict[str, int]] = {}
    for plan in plans:
        rng = np.random.default_rng(list(plan.seed))
        n, records = phantom_for(plan.task).write(plan, rng, site_dir=site_dir, namer=namer, scale=scale,
                                                  annotations=annotations)
        files += n
        lesions.extend(records)
        counts = per_task.setdefault(plan.task, {"studies": 0, "positives": 0})
        counts["studies"] += 1
        counts["positives"] += plan.label
        done[0] += 1
        if progress is not None:
            progress(done[0], total, site.name)
    labels_csv = site_dir / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_instance_uid", "task", "label"])
        for plan in plans:
            writer.writerow([plan.study_uid, plan.task, plan.label])
    lesions_json = site_dir / "lesions.json"
    lesions_json.write_text(json.dumps(lesions, indent=1))
    return SiteResult(
        name=site.name, dicom_dir=dicom_dir, labels_csv=labels_csv, lesions_json=lesions_json,
        studies=len(plans), positives=sum(p.label for p in plans), files=files,
        patients=len({p.patient.patient_id for p in plans}), per_task=per_task,
    )


def _site_worker(args: tuple[Any, ...]) -> SiteResult:
    out, profile, i, task_list, studies_per_task, seed, scale, queue = args

    def report(done: int, total: int, site: str) -> None:
        queue.put(site)

    return _generate_site(out, profile, i, task_list, studies_per_task, seed, scale, report, [0], 0)


def _load_highdicom_tables() -> None:
    """Load the tables of the standard that highdicom reads on first use (a quarter of a second) once, before the
    site processes fork, rather than once in each. They live in a private module: a name it no longer has only
    costs that time."""
    from highdicom import _standard_utils as tables

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(tables, name, None)
        if callable(loader):
            loader()


def _generate_parallel(out: Path, profiles: list[SiteProfile], task_list: list[str], studies_per_task: int,
                       seed: int, scale: int, progress: Progress | None, total: int, workers: int) -> list[SiteResult]:
    """One process per site (at most ``workers`` at a time); progress comes back through a queue."""
    _load_highdicom_tables()
    # fork: works without a __main__ guard in the caller; the workers never touch torch.
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        queue = manager.Queue()
        jobs = [(out, p, i, task_list, studies_per_task, seed, scale, queue) for i, p in enumerate(profiles)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_site_worker, job) for job in jobs]
            done = 0
            while done < total:
                try:
                    site = queue.get(timeout=0.2)
                except Empty:
                    if all(f.done() for f in futures):
                        break
                    continue
                done += 1
                if progress is not None:
                    progress(done, total, site)
            return [f.result() for f in futures]


def validate_tasks(tasks: Iterable[str]) -> list[str]:
    """The tasks as a list, blanks dropped and duplicates removed (first occurrence kept).

    Args:
        tasks: Task names (preset names with a phantom).

    Returns:
        The tasks, in the order given.

    Raises:
        ValueError: Naming each unknown task and the known ones, or saying that none was given.
    """
    out = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in out if t not in PHANTOMS or t not in PRESETS]
    if unknown or not out:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(out))


def generate_consortium(
    out: Path | str,
    *,
    sites: int = 3,
    studies_per_task: int = 24,
    seed: int = 0,
    tasks: Iterable[str] = ALL_TASKS,
    scale: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    unlike: str | None = None,
) -> ConsortiumResult:
    """Write a synthetic consortium under ``out``.

    Layout: ``out/<site>/dicom/...`` (DICOM files), ``out/<site>/labels.csv``
    (``study_instance_uid,task,label``), ``out/<site>/lesions.json`` (one record per lesion: study,
    series and, for 2D, SOP instance UID; centre in patient mm and voxel indices ``col,row,slice`` in
    the reader's spatial order; radius; kind; the mask file ``masks/<key>.npz`` holding ``mask`` of
    shape ``(slices, rows, cols)`` or ``(rows, cols)``), and ``out/consortium.json``.

    Args:
        out: The folder (created). It must be empty or an earlier consortium (then ``overwrite``).
        sites: Number of hospitals (1-26).
        studies_per_task: Studies per task at a site of size factor 1 (sites vary by ±25 %; at least 4).
        seed: Everything follows from it.
        tasks: Which tasks to write.
        scale: In-plane matrix multiplier (1 = the CPU-friendly default; 8 gives 512×512 CT).
        overwrite: Replace an earlier consortium in ``out``.
        progress: Called as ``progress(done, total, site)`` after each study.
        workers: Processes writing sites in parallel (default: one per core, at most one per site).
            The output does not depend on it.
        unlike: The non-IID variant: this site's scanners are unlike the others'
            (:data:`~imaging.synth.profiles.UNLIKE_SCANNERS`); the other sites are written as without it.

    Returns:
        What was written, per site.

    Raises:
        ValueError: Bad arguments (message names the argument).
        FileExistsError: ``out`` holds something else.
    """
    out = Path(out)
    task_list = validate_tasks(tasks)
    if studies_per_task < 4:
        raise ValueError(f"studies_per_task must be at least 4 (2 per class), got {studies_per_task}")
    if not 1 <= scale <= 16:
        raise ValueError(f"scale must be between 1 and 16, got {scale}")
    profiles = site_profiles(sites, seed, unlike=unlike)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out} is not empty and holds no synthetic consortium; choose an empty folder")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a synthetic consortium; replace it with --force "
                                  "(overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = sum(max(4, int(round(studies_per_task * p.size_factor))) for p in profiles) * len(task_list)
    workers = min(len(profiles), workers or os.cpu_count() or 1)
    if workers <= 1:
        done = [0]
        results = [
            _generate_site(out, profile, i, task_list, studies_per_task, seed, scale, progress, done, total)
            for i, profile in enumerate(profiles)
        ]
    else:
        results = _generate_parallel(out, profiles, task_list, studies_per_task, seed, scale, progress, total,
                                     workers)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "sites": len(profiles),
        "studies_per_task": studies_per_task,
        "tasks": task_list,
        "scale": scale,
        "unlike": unlike,
        "profiles": [asdict(p) for p in profiles],
        "results": [
            {"site": r.name, "studies": r.studies, "positives": r.positives, "files": r.files, "patients": r.patients,
             "per_task": r.per_task}
            for r in results
        ],
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=1))
    return ConsortiumResult(out=out, sites=results, seconds=seconds)


def ingested_consortium(root: Path | str, *, sites: int, studies_per_task: int, seed: int,
                        tasks: Iterable[str], unlike: str | None = None) -> Path:
    """A synthetic consortium written under ``root/data`` and ingested (DICOM, annotations, labels) into one site
    workspace per site under ``root/ws``; returns ``root/ws``. Reused as it is when ``root/ws`` already exists.
    For benchmarks and demos: a site's own ingest is ``oncofed-site ingest``."""
    from imaging.catalog import Catalog
    from imaging.ingest import ingest_folder
    from imaging.labels import load_labels

    root = Path(root)
    if (root / "ws").is_dir():
        return root / "ws"
    generate_consortium(root / "data", sites=sites, studies_per_task=studies_per_task, seed=seed, tasks=list(tasks),
                        unlike=unlike)
    for site in sorted(p for p in (root / "data").iterdir() if (p / "dicom").is_dir()):
        with Catalog.open(root / "ws" / site.name) as catalog:
            ingest_folder(catalog, site / "dicom")
            load_labels(catalog, site / "labels.csv")
    return root / "ws"

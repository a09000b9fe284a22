"""The radiologist's review page: the model's score and saliency overlays on the site's own studies.

``oncofed-site review`` serves a small web app bound to 127.0.0.1: a worklist of the site's studies
with the model's probability (sortable; filters for task, split, label and review state; calibrated, and marked when
at or above the consortium's operating point, when the model carries its run's calibration and threshold) and a viewer
per image (slice scrolling, window/level presets, the saliency overlay with an opacity slider and a
method switch, the score and, where known, the label). The reader records a verdict (agree, disagree,
unsure, a comment and their initials); verdicts go into the site catalog's ``review_verdicts`` table
with the time, the model file's SHA-256 and the probability shown, and can be exported as CSV.

Images are shown on their own DICOM grid (as stored, slice by slice); the map computed on the
network's grid is carried back onto it (:func:`imaging.transforms.network_to_source`). Maps are
computed when an image is first opened and kept in memory. Nothing leaves the site: the page, its
images and the verdicts stay on this machine.

For a lesion segmentation model (a ``*-seg`` task) the worklist shows the predicted lesion's volume (the area of a
mammogram) instead of a probability, and the viewer the predicted lesion's outline over the slices, with the
reference annotation's outline in another colour where the study has one (:mod:`fl_client.predict`: the same
masks and colours as ``oncofed-site predict``). The verdict is recorded as for a classifier; its ``probability`` is
then the highest lesion probability of any voxel of the image.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fl_client.explainer import Explainer
from fl_client.predict import (
    PREDICTED_COLOUR,
    REFERENCE_COLOUR,
    LesionSummary,
    PredictError,
    lesion_slices,
    lesion_summary,
    reference_mask,
    reported_mask,
)
from imaging.catalog import Catalog, Item
from imaging.dataset import cached_dataset
from imaging.dicom import read_image
from imaging.presets import get_preset
from models.device import Placement
from models.methods import REVIEW_METHODS, methods_for
from models.saliency import Method
from models.weights import WeightsError

__all__ = [
    "Case",
    "Guard",
    "ReviewError",
    "ReviewSession",
    "VerdictStore",
    "check_address",
    "contour_png",
    "create_app",
    "load_models",
    "overlay_png",
    "page_html",
    "serve",
    "slice_png",
]

VERDICTS = ("agree", "disagree", "unsure")
READER = re.compile(r"^[A-Za-z][A-Za-z .'-]{0,15}$")
MAX_COMMENT = 2000
CT_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "abdomen": (50.0, 400.0),
              "bone": (400.0, 1800.0)}
CSV_COLUMNS = ("created", "study_uid", "image_key", "task", "verdict", "comment", "reader", "probability",
               "label", "model_sha256", "model_file")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    study_uid TEXT NOT NULL,
    image_key TEXT NOT NULL,
    task TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree', 'unsure')),
    comment TEXT NOT NULL DEFAULT '',
    reader TEXT NOT NULL,
    probability REAL NOT NULL,
    label INTEGER,
    model_sha256 TEXT NOT NULL,
    model_file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS review_verdicts_image ON review_verdicts(image_key, id);
"""


class ReviewError(ValueError):
    """A bad request or set-up; the message names the field, file or task and says what to do."""


@dataclass(frozen=True)
class Case:
    """One image on the worklist (``call``: at or above its model's operating point, decided on the network's own
    score; None for an outline or a model without one)."""

    key: str
    study_uid: str
    task: str
    split: str
    label: int | None
    probability: float
    item: Item
    lesion: LesionSummary | None = None
    call: bool | None = None

    @property
    def segmentation(self) -> bool:
        """Whether the image's model outlines lesions (then :attr:`lesion` holds the prediction's size)."""
        return self.lesion is not None

    @property
    def modality(self) -> str:
        """The image's DICOM modality."""
        return self.item.plan.modality

    @property
    def view(self) -> str:
        """How the worklist names the image: its laterality and view (mammography), else its modality."""
        plan = self.item.plan
        return " ".join(v for v in (plan.laterality, plan.view) if v) or plan.modality


def load_models(paths: Sequence[Path], *, placement: Placement | None = None) -> dict[str, Explainer]:
    """One model per task from ``model.pt`` files, on ``placement``'s device (default the CPU).

    Raises:
        ReviewError: A file is not a model, or two models are for the same task.
    """
    models: dict[str, Explainer] = {}
    for path in paths:
        try:
            explainer = Explainer.load(path, placement=placement)
        except WeightsError as exc:
            raise ReviewError(str(exc)) from None
        task = explainer.task
        if task in models:
            raise ReviewError(f"--model {path} and {models[task].path} are both for {task}: give one model per task")
        models[task] = explainer
    return models


class VerdictStore:
    """Verdicts in the site catalog (table ``review_verdicts``): append-only, the latest per image counts."""

    def __init__(self, workspace: Path) -> None:
        with Catalog.open(workspace, create=False) as catalog:
            self.path = catalog.path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def add(self, case: Case, model: Explainer, *, verdict: str, comment: str, reader: str) -> dict[str, Any]:
        """Record a verdict; return it as stored.

        Raises:
            ReviewError: The verdict, comment or initials are not acceptable (the message names the field).
        """
        verdict, comment, reader = verdict.strip().lower(), comment.strip(), reader.strip()
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict {verdict!r}: choose one of {', '.join(VERDICTS)}")
        if not READER.match(reader):
            raise ReviewError("reader: give your initials (letters, up to 16 characters)")
        if len(comment) > MAX_COMMENT:
            raise ReviewError(f"comment: at most {MAX_COMMENT} characters, got {len(comment)}")
        row = {"created": time.time(), "study_uid": case.study_uid, "image_key": case.key, "task": case.task,
               "verdict": verdict, "comment": comment, "reader": reader, "probability": case.probability,
               "label": case.label, "model_sha256": model.sha256, "model_file": str(model.path)}
        with self._lock, self._connect() as db:
            db.execute(f"INSERT INTO review_verdicts({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
        return row

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest verdict of each image key."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM review_verdicts WHERE id IN "
                              "(SELECT MAX(id) FROM review_verdicts GROUP BY image_key)").fetchall()
        return {r["image_key"]: dict(r) for r in rows}

    def history(self, key: str) -> list[dict[str, Any]]:
        """Every verdict of one image, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM review_verdicts WHERE image_key=? ORDER BY id", (key,)).fetchall()
        return [dict(r) for r in rows]

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every verdict, oldest first."""
        with self._connect() as db:
            for r in db.execute("SELECT * FROM review_verdicts ORDER BY id"):
                yield dict(r)

    def csv_text(self) -> str:
        """All verdicts as CSV (ISO 8601 UTC times)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            row["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["created"]))
            writer.writerow({k: _inert(v) for k, v in row.items()})
        return out.getvalue()


def _inert(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a leading =, +, -, @, tab or CR would start a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class ReviewSession:
    """The worklist of a site for some models, and the images and maps the viewer asks for.

    Args:
        workspace: The site workspace.
        models: One model per task (:func:`load_models`).
        methods: Saliency methods offered in the viewer, each task's own first where offered.
        on_progress: Called as ``on_progress(done, total)`` while the worklist is scored.

    Raises:
        ReviewError: The workspace has no catalog or no images of the models' tasks.
    """

    def __init__(self, workspace: Path, models: dict[str, Explainer], *,
                 methods: Sequence[Method] = REVIEW_METHODS,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        self.workspace = Path(workspace)
        self.models = models
        self.methods = tuple(methods)
        try:
            self.verdicts = VerdictStore(self.workspace)
        except FileNotFoundError as exc:
            raise ReviewError(str(exc)) from None
        self.cases: dict[str, Case] = {}
        self._lock = threading.Lock()  # one saliency computation at a time (hooks on shared modules)
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._maps: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._masks: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._score(on_progress)
        if not self.cases:
            raise ReviewError(f"no images of {', '.join(models)} in {self.workspace}: "
                              "see 'oncofed-site status' for what the site holds")

    def _score(self, on_progress: Callable[[int, int], None] | None) -> None:
        with Catalog.open(self.workspace, create=False) as catalog:
            per_task = {task: catalog.items(task, labelled_only=False) for task in self.models}
        total, done = sum(len(v) for v in per_task.values()), 0
        for task, items in per_task.items():
            model = self.models[task]
            dataset = cached_dataset(items, model.preset, workspace=self.workspace, train=False)
            if model.segmentation:
                for i, item in enumerate(items):
                    self._add_case(item, task, *self._outline(item, model, dataset[i]["image"]))
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
                continue
            for start in range(0, len(items), 16):
                batch = [dataset[i]["image"] for i in range(start, min(start + 16, len(items)))]
                logits = model.logits(batch)
                probs = model.scoring.probabilities(logits)
                calls = model.scoring.calls(logits) or [None] * len(batch)
                for item, p, call in zip(items[start:start + len(batch)], probs, calls, strict=True):
                    self._add_case(item, task, float(p), call=call)
                done += len(batch)
                if on_progress is not None:
                    on_progress(done, total)

    def _add_case(self, item: Item, task: str, probability: float, lesion: LesionSummary | None = None, *,
                  call: bool | None = None) -> None:
        label = item.label if item.label in (0, 1) else None  # the catalog's -1: no label
        self.cases[item.plan.key] = Case(item.plan.key, item.study_uid, task, item.split or "unassigned", label,
                                         probability, item, lesion, call)

    def _outline(self, item: Item, model: Explainer, image: Any) -> tuple[float, LesionSummary]:
        """Predict an image's lesion mask on its DICOM grid and keep it (and the reference) in memory; return the
        highest voxel probability and the lesion's size."""
        probabilities = model.lesion_probabilities(image)
        mask = reported_mask(probabilities, item.plan, model.preset)  # as predict writes it
        try:
            ref = reference_mask(item)
        except PredictError as exc:
            raise ReviewError(str(exc)) from None
        with self._lock:
            self._masks[item.plan.key] = (mask, ref)
            while len(self._masks) > 8:
                self._masks.popitem(last=False)
        return float(probabilities.max()), lesion_summary(mask, item.plan)

    def outlines(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The predicted lesion mask and the reference annotation (None if unknown) of a segmentation model's image
        on its DICOM grid, ``(slices, rows, cols)``.

        Raises:
            ReviewError: The image's model is not a segmentation model.
        """
        case = self.case(key)
        if not case.segmentation:
            raise ReviewError(f"image {key}: its {case.task} model scores images; it has saliency maps, not outlines")
        with self._lock:
            cached = self._masks.get(key)
            if cached is not None:
                self._masks.move_to_end(key)
        if cached is None:
            model = self.models[case.task]
            self._outline(case.item, model, model.network_input(case.item, workspace=self.workspace))
            with self._lock:
                cached = self._masks[key]
        mask, ref = cached
        return (mask[None], None if ref is None else ref[None]) if mask.ndim == 2 else (mask, ref)

    def case(self, key: str) -> Case:
        """A worklist image by key.

        Raises:
            ReviewError: Unknown key.
        """
        try:
            return self.cases[key]
        except KeyError:
            raise ReviewError(f"no image {key} on this worklist") from None

    def worklist(self) -> list[dict[str, Any]]:
        """Rows of the worklist, with the latest verdict."""
        latest = self.verdicts.latest()
        rows = []
        for c in self.cases.values():
            v = latest.get(c.key)
            rows.append({"key": c.key, "study_uid": c.study_uid, "task": c.task, "split": c.split, "label": c.label,
                         "probability": round(c.probability, 4), "call": c.call,
                         "view": c.view, "modality": c.modality,
                         "verdict": v["verdict"] if v else None, "reader": v["reader"] if v else None,
                         "segmentation": c.segmentation, "lesion_size": None if c.lesion is None else round(
                             c.lesion.size, 3), "size_unit": None if c.lesion is None else c.lesion.unit})
        return rows

    def image(self, key: str) -> np.ndarray:
        """The image's pixels in modality units on its DICOM grid (``(slices, rows, cols)``)."""
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        array = read_image(self.case(key).item.plan).array
        array = array[None] if array.ndim == 2 else array
        with self._lock:
            self._images[key] = array
            while len(self._images) > 8:
                self._images.popitem(last=False)
        return array

    def heat(self, key: str, method: str) -> np.ndarray:
        """The saliency map of ``method`` on the image's DICOM grid, in [0, 1].

        Raises:
            ReviewError: A method this page does not offer, or the image's model is a segmentation model.
        """
        if self.case(key).segmentation:
            raise ReviewError(f"image {key}: its model outlines lesions; it has outlines, not saliency maps")
        if method not in {m.value for m in self.methods}:
            raise ReviewError(f"method {method!r}: choose one of {', '.join(m.value for m in self.methods)}")
        case = self.case(key)
        with self._lock:
            cached = self._maps.get((key, method))
            if cached is not None:
                return cached
            model = self.models[case.task]
            x = model.network_input(case.item, workspace=self.workspace)
            on_source = model.explain(x, Method(method), plan=case.item.plan).on_source
            assert on_source is not None  # a plan was given
            on_source = on_source[None] if on_source.ndim == 2 else on_source
            self._maps[(key, method)] = on_source
            while len(self._maps) > 32:
                self._maps.popitem(last=False)
            return on_source

    def presets(self, key: str) -> dict[str, tuple[float, float]]:
        """Window/level presets (centre, width) for an image: CT presets, and 'auto' (1st-99th percentile)."""
        image = self.image(key)
        lo, hi = np.percentile(image[:: max(1, image.shape[0] // 8)], [1.0, 99.0])
        auto = ((float(lo) + float(hi)) / 2, max(float(hi - lo), 1.0))
        out = {"auto": auto}
        if self.case(key).modality == "CT":
            out = {**CT_PRESETS, **out}
            preset = get_preset(self.case(key).task)
            if preset.window is not None:  # the window the model reads first
                out = {"model": ((preset.window[0] + preset.window[1]) / 2, preset.window[1] - preset.window[0]),
                       **out}
        return out

    def meta(self, key: str) -> dict[str, Any]:
        """What the viewer needs of an image: geometry, score, label, presets, the map's peak slice, verdicts."""
        case = self.case(key)
        image = self.image(key)
        extra: dict[str, Any] = {"segmentation": case.segmentation}
        if case.lesion is not None:
            mask, ref = self.outlines(key)
            peak = lesion_slices(mask, ref, 1)[0]
            extra.update({"lesion": {"voxels": case.lesion.voxels, "lesions": case.lesion.lesions,
                                     "size": case.lesion.size, "unit": case.lesion.unit},
                          "reference": ref is not None and bool(ref.any()),
                          "colours": {"predicted": PREDICTED_COLOUR, "reference": REFERENCE_COLOUR}})
            methods: list[str] = []
        else:
            methods = [m.value for m in methods_for(case.task, self.methods)]
            heat = self.heat(key, methods[0])
            peak = int(np.argmax(heat.reshape(heat.shape[0], -1).max(axis=1)))
        model = self.models[case.task]
        return {"key": key, "study_uid": case.study_uid, "task": case.task, "title": get_preset(case.task).title,
                "split": case.split, "label": case.label, "probability": case.probability, "call": case.call,
                "calibrated": model.scoring.calibration is not None, "threshold": model.scoring.shown_threshold,
                "rule": model.scoring.rule, "view": case.view,
                "modality": case.modality, "slices": int(image.shape[0]), "rows": int(image.shape[1]),
                "cols": int(image.shape[2]), "spacing": list(case.item.plan.spacing), "peak_slice": peak,
                "methods": methods, "presets": self.presets(key),
                "model_sha256": model.sha256, "model_file": model.path.name if model.path else "",
                "verdicts": self.verdicts.history(key),
                **extra}

    def add_verdict(self, key: str, *, verdict: str, comment: str, reader: str) -> dict[str, Any]:
        """Record a verdict on an image (see :meth:`VerdictStore.add`)."""
        case = self.case(key)
        return self.verdicts.add(case, self.models[case.task], verdict=verdict, comment=comment, reader=reader)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def slice_png(image: np.ndarray, k: int, center: float, width: float) -> bytes:
    """One slice of an image windowed to grey (PNG)."""
    lo = center - width / 2
    grey = np.clip((image[k] - lo) / max(width, 1e-6), 0, 1)
    return _png((grey * 255).astype(np.uint8))


def overlay_png(heat: np.ndarray, k: int, *, threshold: float = 0.15) -> bytes:
    """One slice of a map as colour with transparency where it is weak (RGBA PNG)."""
    from matplotlib import colormaps

    h = np.clip(heat[k], 0, 1)
    rgba = (colormaps["jet"](h) * 255).astype(np.uint8)
    rgba[..., 3] = (np.clip((h - threshold) / (1 - threshold), 0, 1) ** 0.5 * 255).astype(np.uint8)
    return _png(rgba)


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def contour_png(pred: np.ndarray, ref: np.ndarray | None, k: int) -> bytes:
    """One slice's outlines as colour on transparency (RGBA PNG): the predicted lesion's in
    :data:`fl_client.predict.PREDICTED_COLOUR`, over the reference annotation's in ``REFERENCE_COLOUR``. Drawn at
    up to 8 times the slice's size (at least 512 pixels where it can), so the lines stay thin on the page."""
    from scipy import ndimage

    rows, cols = pred.shape[-2:]
    scale = max(1, min(8, 512 // max(rows, cols)))
    rgba = np.zeros((rows * scale, cols * scale, 4), np.uint8)
    for mask, colour in ((ref, REFERENCE_COLOUR), (pred, PREDICTED_COLOUR)):
        if mask is None or not mask[k].any():
            continue
        big = np.kron(mask[k].astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool)
        edge = big & ~ndimage.binary_erosion(big, border_value=0)
        if scale > 2:
            edge = ndimage.binary_dilation(edge) & big  # two pixels wide, inside the lesion
        rgba[edge] = (*_rgb(colour), 255)
    return _png(rgba)


def page_html(token: str) -> str:
    """The single-page app, with this server's request token in it."""
    text = resources.files("fl_client").joinpath("review_page.html").read_text(encoding="utf-8")
    return text.replace("{{TOKEN}}", token)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "oncofed_review"
MAX_POST_BYTES = 64 * 1024


class Guard:
    """ASGI middleware in front of the review app, checked before anything is parsed:

    - the ``Host`` header must name this machine's loopback address (and the server's port): a page of
      another site whose name an attacker points at 127.0.0.1 (DNS rebinding) gets nothing;
    - every ``/api/`` request carries the page's token: in ``X-Review-Token``, or for reads (images, the
      CSV export) in the ``SameSite=Strict`` cookie the page set, which other sites' pages never send;
      changes (verdicts) need the header;
    - a request body is at most ``MAX_POST_BYTES`` (declared or streamed).

    Args:
        app: The review app.
        token: The page's secret token.
        port: The port the server is bound to (None: any).
    """

    def __init__(self, app: Any, *, token: str, port: int | None = None) -> None:
        self.app = app
        self.token = token
        self.port = port

    def _host_ok(self, host: str) -> bool:
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        name = name.strip("[]").lower()
        return name in LOOPBACK and (self.port is None or port == str(self.port))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self._host_ok(headers.get("host", "")):
            await _refuse(send, 421, "this review page answers only to the address it printed (127.0.0.1)")
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/api/"):
            cookies = dict(c.strip().split("=", 1) for c in headers.get("cookie", "").split(";") if "=" in c)
            by_header = secrets.compare_digest(headers.get("x-review-token", ""), self.token)
            by_cookie = secrets.compare_digest(cookies.get(COOKIE, ""), self.token)
            if not (by_header or (method == "GET" and by_cookie)):
                await _refuse(send, 403, "reload the review page: its token is missing or stale")
                return
        if method not in ("GET", "HEAD"):
            try:
                declared = int(headers.get("content-length", "0") or 0)
            except ValueError:
                declared = MAX_POST_BYTES + 1
            if declared > MAX_POST_BYTES:
                await _refuse(send, 413, f"a request body may hold at most {MAX_POST_BYTES // 1024} KiB")
                return
            receive = _capped(receive, MAX_POST_BYTES)
        await self.app(scope, receive, send)


def _capped(receive: Any, limit: int) -> Any:
    seen = 0

    async def capped() -> Any:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise ReviewError(f"a request body may hold at most {limit // 1024} KiB")
        return message

    return capped


async def _refuse(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(session: ReviewSession, *, token: str | None = None, port: int | None = None) -> Any:
    """The review app behind its :class:`Guard`: only this machine's loopback address, the page's token on every
    API request (so another web page open in the same browser can neither read nor post), small bodies."""
    from fastapi import FastAPI, Header, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    token = token or secrets.token_urlsafe(24)
    app = FastAPI(title="oncofed review", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, exc: ReviewError) -> JSONResponse:
        status = 404 if str(exc).startswith("no image") else 422
        return JSONResponse({"error": str(exc)}, status_code=status)

    def check_slice(key: str, k: int) -> None:
        slices = session.image(key).shape[0]
        if not 0 <= k < slices:
            raise ReviewError(f"slice {k}: image {key} has slices 0-{slices - 1}")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        page = HTMLResponse(page_html(token), headers={"Cache-Control": "no-store"})
        page.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return page

    @app.get("/api/worklist")
    def worklist() -> dict[str, Any]:
        return {"tasks": sorted(session.models), "rows": session.worklist()}

    @app.get("/api/images/{key}")
    def meta(key: str) -> dict[str, Any]:
        return session.meta(key)

    @app.get("/api/images/{key}/slices/{k}.png")
    def image_slice(key: str, k: int, center: float, width: float) -> Response:
        check_slice(key, k)
        return Response(slice_png(session.image(key), k, center, width), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.get("/api/images/{key}/maps/{method}/{k}.png")
    def map_slice(key: str, method: str, k: int) -> Response:
        check_slice(key, k)
        return Response(overlay_png(session.heat(key, method), k), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.get("/api/images/{key}/outlines/{k}.png")
    def outline_slice(key: str, k: int) -> Response:
        check_slice(key, k)
        pred, ref = session.outlines(key)
        return Response(contour_png(pred, ref, k), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/images/{key}/verdicts")
    def verdict(key: str, body: dict[str, Any], x_review_token: str = Header(default="")) -> dict[str, Any]:
        if not secrets.compare_digest(x_review_token, token):
            raise HTTPException(status_code=403, detail="reload the review page: its token is missing or stale")
        return session.add_verdict(key, verdict=str(body.get("verdict", "")), comment=str(body.get("comment", "")),
                                   reader=str(body.get("reader", "")))

    @app.get("/api/verdicts.csv")
    def export() -> PlainTextResponse:
        return PlainTextResponse(session.verdicts.csv_text(), media_type="text/csv",
                                 headers={"Content-Disposition": "attachment; filename=verdicts.csv"})

    return Guard(app, token=token, port=port)


def check_address(host: str, port: int) -> None:
    """Raise unless the page would listen on this machine only, on a valid port.

    Raises:
        ReviewError: Naming the option and what to do instead.
    """
    if host not in LOOPBACK:
        raise ReviewError(f"--host {host}: the review page shows patient images and has no login of its own, so it "
                          "listens on this machine only (127.0.0.1, localhost or ::1); from another machine, use "
                          "an SSH tunnel: ssh -L 8765:127.0.0.1:8765 THIS-HOST")
    if not 0 <= port <= 65535:
        raise ReviewError(f"--port {port}: a port is from 1 to 65535 (0: a free one)")


def serve(session: ReviewSession, *, host: str = "127.0.0.1", port: int = 8765,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the review page until interrupted (Ctrl-C). ``port=0`` takes a free port.

    Raises:
        ReviewError: The address is in use or cannot be bound.
    """
    import socket

    import uvicorn

    check_address(host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ReviewError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(session, port=bound), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        display = f"[{host}]" if ":" in host else host
        on_ready(f"http://{display}:{bound}/")
    server.run(sockets=[sock])

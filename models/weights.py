"""Model weights as named NumPy arrays in a fixed order, and packed into one flat array for transfer.

The order is the model's own ``state_dict`` order, which :func:`build_model` makes identical on the
server and every site. Opacus wraps a model and prefixes its keys with ``_module.``; the prefix is
stripped here so a DP site and a plain server speak the same names.

Sending one flat array instead of hundreds matters: the transport costs about 40 ms per array per
node (see the stack notes), so a DenseNet121 in 727 arrays took 141 s a round and 12.8 s in 9.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.evaluation import HeldOutFigures, Scoring
from models.tasks import PREPROCESSING_VERSION, UNVERSIONED_PREPROCESSING, preprocessing_changed

__all__ = [
    "MAX_MODEL_BYTES",
    "ModelFile",
    "WeightsError",
    "check_arrays",
    "load_arrays",
    "load_checkpoint",
    "load_scoring",
    "pack",
    "read_model",
    "save_checkpoint",
    "state_arrays",
    "unpack",
]

OPACUS_PREFIX = "_module."
MAX_MODEL_BYTES = 4 << 30
"""The largest file read as a model (4 GiB; the default networks' files are under 1 MB, a 3D DenseNet121's about
45 MB): a file given by mistake is refused by its size, not read into memory."""
_ARCHIVE_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class WeightsError(ValueError):
    """Arrays do not fit the model; the message names the key."""


def _strip(key: str) -> str:
    while key.startswith(OPACUS_PREFIX):
        key = key[len(OPACUS_PREFIX):]
    return key


def state_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The model's state (parameters and buffers) as named arrays on the CPU, in ``state_dict`` order; floating
    tensors as float32 whatever device or precision they were trained in (what a site sends is always this)."""
    return OrderedDict((_strip(k), _host(v)) for k, v in model.state_dict().items())


def _host(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.numpy().copy()


def check_arrays(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], *,
                 finite: bool = False) -> None:
    """Raise unless ``arrays`` has exactly the keys, shapes and dtypes of ``reference`` (and, with ``finite``, only
    finite values). The one check of arrays against a model: loading weights, the site's egress guard and the
    server's update validation all use it.

    Raises:
        WeightsError: Naming the first missing, unexpected, mis-shaped, mis-typed or non-finite array.
    """
    missing = [k for k in reference if k not in arrays]
    if missing:
        raise WeightsError(f"array {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = [k for k in arrays if k not in reference]
    if extra:
        raise WeightsError(f"unexpected array {extra[0]!r} ({len(extra)} unexpected in all)")
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise WeightsError(f"array {key!r} has shape {tuple(got.shape)}, the model's is {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise WeightsError(f"array {key!r} has dtype {got.dtype}, the model's is {ref.dtype}")
        if finite and got.dtype.kind in "fc" and not np.isfinite(got).all():
            raise WeightsError(f"array {key!r} holds NaN or Inf")


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into ``model`` (wrapped by Opacus or not) after checking them.

    Raises:
        WeightsError: Keys, shapes or dtypes do not fit.
    """
    current = model.state_dict()
    names = {_strip(k): k for k in current}
    reference = OrderedDict((k, current[v].detach().cpu().numpy()) for k, v in names.items())
    check_arrays(reference, arrays)
    model.load_state_dict(OrderedDict((names[k], torch.from_numpy(np.asarray(arrays[k]).copy())) for k in names))


def pack(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one flat float32 array, in their order (integer buffers round-trip exactly
    up to 2**24, which covers the step counters MONAI and torch keep)."""
    if not arrays:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays.values()])


def unpack(flat: np.ndarray, reference: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Split a packed array back into named arrays shaped and typed like ``reference``.

    Raises:
        WeightsError: The flat array's length does not match the reference.
    """
    need = sum(int(np.prod(a.shape)) for a in reference.values())
    if flat.ndim != 1 or flat.size != need:
        raise WeightsError(f"packed weights have {flat.size} values, the model needs {need}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for key, ref in reference.items():
        n = int(np.prod(ref.shape))
        out[key] = flat[offset:offset + n].reshape(ref.shape).astype(ref.dtype)
        offset += n
    return out


def save_checkpoint(path: Path | str, arrays: Mapping[str, np.ndarray], run_config: Mapping[str, Any], *,
                    round_number: int, scoring: Scoring | None = None, tested: HeldOutFigures | None = None) -> None:
    """Write a ``model.pt`` that :func:`load_checkpoint` reads: ``{"arrays", "run_config", "round",
    "preprocessing_version"}`` (round 0 for a local run; :data:`models.tasks.PREPROCESSING_VERSION`), and with
    ``scoring`` how its scores are read (calibration and operating point, chosen on validation at the end of the run;
    :func:`load_scoring`), with ``tested`` how it scored on its run's test studies (:class:`ModelFile`'s ``tested``).
    Written atomically (a temporary file, fsync, rename): a process killed mid-write leaves the
    previous file whole."""
    path = Path(path)
    buffer = io.BytesIO()
    doc: dict[str, Any] = {"arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                           "run_config": {str(k): v for k, v in run_config.items()}, "round": int(round_number),
                           "preprocessing_version": PREPROCESSING_VERSION}
    if scoring is not None:
        doc["scoring"] = scoring.to_dict()
    if tested is not None:
        doc["tested"] = HeldOutFigures.from_dict(tested.to_dict()).to_dict()  # checked as it will be read
    torch.save(doc, buffer)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True, eq=False)
class ModelFile:
    """Everything a ``model.pt`` holds, read from one read of its bytes (:func:`read_model`), so its digest, weights
    and tables are one file's even if the file is replaced while it is read.

    Attributes:
        path: The file as given.
        sha256: The digest of the bytes the rest was read from (outputs, review verdicts and a run's record of its
            start name the model by it).
        arrays: The named arrays, in the file's order.
        run_config: The flat run configuration it was trained with.
        round: The federated round that wrote it (0 for a local run).
        scoring: How its scores are read (:class:`Scoring`; empty when it carries none).
        tested: How it scored on its run's test studies (:class:`HeldOutFigures`), or None.
    """

    path: Path
    sha256: str
    arrays: OrderedDict[str, np.ndarray]
    run_config: dict[str, Any]
    round: int
    scoring: Scoring
    tested: HeldOutFigures | None


def read_model(path: Path | str) -> ModelFile:
    """Read a ``model.pt`` (a local run's, or a federated run's checkpoint or global model) once, and check all of it.

    Raises:
        WeightsError: The file is missing or not an oncofed model file, its task's preprocessing changed since it
            was trained (:func:`models.tasks.preprocessing_changed`), an array holds NaN, or its ``scoring`` or
            ``tested`` table is malformed; the message names the file and what to do.
    """
    path = Path(path)
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    doc = _load_doc(path, data)
    del data
    try:
        arrays = OrderedDict((str(k), v.numpy()) for k, v in doc["arrays"].items())
        run_config, round_number = doc.get("run_config", {}), doc.get("round", 0)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise _not_a_model(path, exc) from None
    if not isinstance(run_config, dict) or not all(isinstance(k, str) for k in run_config):
        raise WeightsError(f"{path}: its run_config is a {type(run_config).__name__}, not the run's key/value table: "
                           "the file was not written by oncofed, or was edited; use the model.pt a run wrote")
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise WeightsError(f"{path}: its round is {round_number!r}, not a round number: use the model.pt a run wrote")
    version = doc.get("preprocessing_version", UNVERSIONED_PREPROCESSING)
    if isinstance(version, bool) or not isinstance(version, int):
        raise WeightsError(f"{path}: its preprocessing version is {version!r}, not a number: use the model.pt a run "
                           "wrote")
    task = str(run_config.get("task", ""))
    changed = preprocessing_changed(task, version)
    if changed:
        raise WeightsError(
            f"{path}: this {task} model learned from images prepared by preprocessing version {version}, and this "
            f"oncofed prepares {task} images by version {PREPROCESSING_VERSION} ({'; '.join(changed)}), so its "
            "scores and maps would not mean what they did: retrain the model with this version, or run it with the "
            "oncofed version that trained it")
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise WeightsError(f"{path}: array {key!r} holds NaN or infinite values (a training that diverged): "
                               "use an earlier checkpoint")
    return ModelFile(path, digest, arrays, dict(run_config), round_number,
                     scoring=_table(path, doc, "scoring", Scoring.from_dict),
                     tested=_table(path, doc, "tested", HeldOutFigures.from_dict))


def load_checkpoint(path: Path | str) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any], int]:
    """A ``model.pt``'s arrays, flat run configuration and round (0 for a local run): :func:`read_model`'s.

    Raises:
        WeightsError: As :func:`read_model`.
    """
    model = read_model(path)
    return model.arrays, model.run_config, model.round


def load_scoring(path: Path | str) -> Scoring:
    """How a ``model.pt``'s scores are read: its calibration and operating point (:class:`Scoring`; empty for a file
    written without them: the network's own sigmoid, no threshold). :func:`read_model`'s.

    Raises:
        WeightsError: As :func:`read_model` (a malformed ``scoring`` table is named).
    """
    return read_model(path).scoring


def _table(path: Path, doc: dict[str, Any], key: str, parse: Callable[[object], Any]) -> Any:
    """A ``model.pt``'s ``key`` table read by ``parse`` (which raises ValueError on a malformed one)."""
    try:
        return parse(doc.get(key))
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}: use the model.pt the run wrote") from None


def _not_a_model(path: Path, exc: Exception) -> WeightsError:
    return WeightsError(f"{path} is not an oncofed model file ({type(exc).__name__}): give the model.pt a train-local "
                        "or federated run wrote")


def _read_bytes(path: Path) -> bytes:
    """A model file's bytes, from one open file: a missing, unreadable or oversized one named, and one that is not a
    torch archive (its first bytes) refused before the rest is read, so a wrong file given by mistake (a DICOM archive)
    is never read whole."""
    if not path.is_file():  # before open: a FIFO would block it
        raise WeightsError(f"model file {path} does not exist: give the model.pt a run wrote")
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise IsADirectoryError(str(path))
            head = fh.read(len(_ARCHIVE_MAGIC))
            if head != _ARCHIVE_MAGIC:
                raise _not_a_model(path, ValueError("not a torch archive"))
            if info.st_size > MAX_MODEL_BYTES:
                raise WeightsError(f"{path} holds {info.st_size / 2**30:.1f} GiB, more than a model file of oncofed "
                                   f"({MAX_MODEL_BYTES / 2**30:.0f} GiB at most): give the model.pt a run wrote")
            fh.seek(0)
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise WeightsError(f"model file {path} does not exist: give the model.pt a run wrote") from None
    except OSError as exc:
        raise WeightsError(f"model file {path} cannot be read ({type(exc).__name__}): check its permissions") from None


def _load_doc(path: Path, data: bytes) -> dict[str, Any]:
    """A ``model.pt``'s saved table from its bytes (tensors and plain values only: ``weights_only``)."""
    try:
        doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise _not_a_model(path, exc) from None
    if not isinstance(doc, dict):
        raise _not_a_model(path, TypeError(type(doc).__name__))
    return doc

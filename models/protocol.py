"""The contract between a site and the server: every key of what crosses the network, what a site may send,
and the codes a refusal or a failure carries.

Both apps import this module; no record, config or metric key is spelled anywhere else. A message from the
server holds :attr:`Record.ARRAYS` (one packed float32 array, :data:`WEIGHTS`) and :attr:`Record.CONFIG`
(:class:`RoundKey`). A site's reply holds :attr:`Record.METRICS` (only :data:`ALLOWED_METRICS`),
:attr:`Record.SITE` (only :data:`ALLOWED_STRINGS`), the trained :attr:`Record.ARRAYS` and, when asked,
:attr:`Record.EVALUATION`. A site that does not take part says so with a :class:`Refusal` code; one that
fails says so with a :class:`FailureCode`; both as a PHI-free sentence in the one text form
:func:`failure_text` writes and :func:`parse_failure` reads back.

Usage::

    metrics = {Metric.NUM_EXAMPLES: 48, Metric.TRAIN_LOSS: 0.61}
    round_config = {RoundKey.SERVER_ROUND: 3, RoundKey.RUN_ID: "run-7"}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from models.evaluation import SCORE_BINS
from models.tasks import is_segmentation

__all__ = [
    "ALLOWED_METRICS",
    "ALLOWED_STRINGS",
    "EVAL_AGGREGATED",
    "EVAL_METRICS",
    "HISTOGRAM_KEYS",
    "HEADLINE_METRICS",
    "FIELD_T_BINS",
    "INTENSITY_BINS",
    "LONG_STRINGS",
    "MODEL_FAMILIES",
    "PIXEL_MM_BINS",
    "PRIVACY_METRICS",
    "REFUSAL_METRICS",
    "SLICE_MM_BINS",
    "SCORE_NEG",
    "SCORE_POS",
    "SUBGROUP",
    "SUBGROUP_KEYS",
    "SUBGROUP_KINDS",
    "SUBGROUP_STATS",
    "SUPPRESSED",
    "TRAIN_AGGREGATED",
    "TRAIN_METRICS",
    "VENDORS",
    "WEIGHTS",
    "FailureCode",
    "Metric",
    "NodeKey",
    "ParsedFailure",
    "Record",
    "Refusal",
    "RoundKey",
    "SiteKey",
    "Split",
    "failure_text",
    "field_bin",
    "headline_metric",
    "histogram_metrics",
    "parse_failure",
    "pixel_bin",
    "reason_codes",
    "report_metrics",
    "slice_bin",
    "split_histograms",
    "split_subgroups",
    "summary_keys",
    "model_family_of",
    "vendor_of",
]


class Record(StrEnum):
    """The records of a message's ``RecordDict``."""

    ARRAYS = "arrays"  # the global model (to a site) or the trained one (from a site)
    CONFIG = "config"  # the round's configuration (to a site)
    METRICS = "metrics"  # whitelisted scalars (from a site)
    EVALUATION = "evaluation"  # the received model's metrics on another split (from a site)
    SITE = "site"  # the site's short strings (from a site)
    SUMMARY = "summary"  # the site's data summary, every key from :func:`summary_keys` (from a site)


WEIGHTS = "weights"
"""The one array in :attr:`Record.ARRAYS`: every weight of the model packed in its ``state_dict`` order."""


class RoundKey(StrEnum):
    """Keys of the round configuration the server sends with each message."""

    SERVER_ROUND = "server-round"
    RUN_ID = "run-id"  # the lead's run id (the run directory's), as the sites' ledgers and logs name it
    SPLIT = "split"  # the split to evaluate
    EVALUATE_SPLIT = "evaluate-split"  # also evaluate the received model on this split (in a training message)
    PROXIMAL_MU = "proximal-mu"  # FedProx's proximal term for this round


class Split(StrEnum):
    """The patient-level splits of a site's data."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class NodeKey(StrEnum):
    """Keys of a SuperNode's node config: the site's own settings, never the lead's."""

    WORKSPACE = "workspace"
    SITE_ID = "site-id"
    PARTITION_ID = "partition-id"  # a simulated node's index (Flower sets it)
    APP_BUNDLE = "app-bundle"  # the run's app bundle, as the site's executor checked it
    APP_BUNDLE_SHA256 = "app-bundle-sha256"
    DEVICE = "device"  # where the site runs models: auto, cpu, cuda, cuda:N
    PRECISION = "precision"  # auto, fp32, bf16, fp16


class Metric(StrEnum):
    """Scalar metrics a site may send."""

    NUM_EXAMPLES = "num-examples"  # training samples (not batches); studies for an evaluation
    TRAIN_LOSS = "train-loss"
    TRAIN_SECONDS = "train-seconds"
    SAMPLES_SEEN = "samples-seen"
    STEPS = "steps"
    EVAL_LOSS = "eval-loss"
    AUROC = "auroc"
    AUROC_LOW = "auroc-low"  # DeLong 95 % interval
    AUROC_HIGH = "auroc-high"
    ECE = "ece"  # expected calibration error, 10 equal-width bins
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    BALANCED_ACCURACY = "balanced-accuracy"
    BRIER = "brier"
    THRESHOLD = "threshold"
    STUDIES = "studies"
    POSITIVES = "positives"
    NEGATIVES = "negatives"
    EVAL_SECONDS = "eval-seconds"
    DICE = "dice"  # segmentation: mean Dice over the studies with a lesion
    LESIONS = "lesions"  # segmentation: reference lesions (connected components) in the split
    LESION_SENSITIVITY = "lesion-sensitivity"  # reference lesions found (IoU >= 0.1) / all
    FP_LESIONS = "fp-lesions"  # predicted lesions touching no reference lesion, per study
    HD95 = "hd95"  # mm, mean over studies with a lesion and a prediction
    DP = "dp"
    EPSILON = "epsilon"  # cumulative over every round and run on the site's data
    EPSILON_MAX = "epsilon-max"
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise-multiplier"
    SAMPLE_RATE = "sample-rate"
    REFUSED = "refused"
    REFUSED_BUDGET = "refused-budget"
    REFUSED_NO_DATA = "refused-no-data"


TRAIN_METRICS = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS, Metric.TRAIN_SECONDS, Metric.SAMPLES_SEEN, Metric.STEPS)
EVAL_METRICS = (Metric.EVAL_LOSS, Metric.AUROC, Metric.AUROC_LOW, Metric.AUROC_HIGH, Metric.ECE, Metric.SENSITIVITY,
                Metric.SPECIFICITY, Metric.BALANCED_ACCURACY, Metric.BRIER, Metric.THRESHOLD, Metric.STUDIES,
                Metric.POSITIVES, Metric.NEGATIVES, Metric.EVAL_SECONDS, Metric.DICE, Metric.LESIONS,
                Metric.LESION_SENSITIVITY, Metric.FP_LESIONS, Metric.HD95)
PRIVACY_METRICS = (Metric.DP, Metric.EPSILON, Metric.EPSILON_MAX, Metric.DELTA, Metric.NOISE_MULTIPLIER,
                   Metric.SAMPLE_RATE)
REFUSAL_METRICS = (Metric.REFUSED, Metric.REFUSED_BUDGET, Metric.REFUSED_NO_DATA)
SCORE_POS = "score-pos:"  # + bin index: positive studies whose score falls in the bin (models.evaluation)
SCORE_NEG = "score-neg:"
HISTOGRAM_KEYS = frozenset(f"{prefix}{b}" for prefix in (SCORE_POS, SCORE_NEG) for b in range(SCORE_BINS))
"""A classifier's evaluation also carries its study scores as two histograms on fixed bins (per class), from
which the server computes the consortium's AUROC and operating point without any per-study score."""


def histogram_metrics(pos: Sequence[float], neg: Sequence[float]) -> dict[str, float]:
    """The metric entries of per-class score histograms (:data:`SCORE_BINS` counts each)."""
    return {**{f"{SCORE_POS}{b}": float(v) for b, v in enumerate(pos)},
            **{f"{SCORE_NEG}{b}": float(v) for b, v in enumerate(neg)}}


def split_histograms(metrics: Mapping[str, float]) -> tuple[dict[str, float], list[float] | None, list[float] | None]:
    """A reply's metrics without its histogram entries, and the histograms (None when it sent none, or counts that
    are not whole numbers from 0 to 10⁹: such a site is left out of the consortium's figures, and named there)."""
    rest = {k: float(v) for k, v in metrics.items() if k not in HISTOGRAM_KEYS}
    if f"{SCORE_POS}0" not in metrics:
        return rest, None, None
    pos = [float(metrics.get(f"{SCORE_POS}{b}", 0.0)) for b in range(SCORE_BINS)]
    neg = [float(metrics.get(f"{SCORE_NEG}{b}", 0.0)) for b in range(SCORE_BINS)]
    if not all(0.0 <= v <= 1e9 and v == int(v) for v in pos + neg):  # NaN fails the first test
        return rest, None, None
    return rest, pos, neg

# What the server aggregates over sites (each reply must carry the same keys for Flower's checks).
TRAIN_AGGREGATED = (Metric.TRAIN_LOSS,)
EVAL_AGGREGATED = (Metric.AUROC, Metric.SENSITIVITY, Metric.SPECIFICITY, Metric.BALANCED_ACCURACY, Metric.BRIER,
                   Metric.EVAL_LOSS, Metric.DICE, Metric.LESION_SENSITIVITY, Metric.FP_LESIONS, Metric.HD95)
HEADLINE_METRICS = (Metric.AUROC, Metric.DICE)
"""A site's evaluation counts in an aggregate when it has studies and one of these (a classifier's AUROC needs
both classes; a segmenter's Dice needs a study with a lesion)."""


def headline_metric(task: str) -> Metric:
    """The figure a task is judged by: Dice for a segmentation task, AUROC for a classifier."""
    return Metric.DICE if is_segmentation(task) else Metric.AUROC


def report_metrics(task: str) -> tuple[tuple[str, Metric], ...]:
    """The evaluation figures a report shows for ``task``, with their column titles."""
    if is_segmentation(task):
        return (("Dice", Metric.DICE), ("lesion sens. (IoU≥0.1)", Metric.LESION_SENSITIVITY),
                ("FP lesions/study", Metric.FP_LESIONS), ("HD95 mm", Metric.HD95))
    return (("AUROC", Metric.AUROC), ("sensitivity", Metric.SENSITIVITY), ("specificity", Metric.SPECIFICITY),
            ("bal. acc.", Metric.BALANCED_ACCURACY), ("Brier", Metric.BRIER))


class SiteKey(StrEnum):
    """Short strings a site may send in :attr:`Record.SITE` (the egress whitelist of text)."""

    SITE_ID = "site-id"
    SPLIT = "split"
    TASK = "task"
    REFUSAL = "refusal"  # a Refusal code
    DETAIL = "detail"  # a sentence the site's code wrote (never a path, an identifier or a tag value)
    REASON = "reason"  # a FailureCode


ALLOWED_STRINGS = frozenset(SiteKey)
LONG_STRINGS = frozenset({SiteKey.DETAIL})
"""Strings that may hold a sentence (240 characters); the others are short codes (64)."""


class Refusal(StrEnum):
    """Why a site does not take part in a message, sent with a PHI-free sentence."""

    VERSION = "version"  # the run was built for another oncofed than the site runs
    TASK = "policy-task"
    ROUNDS = "policy-rounds"
    LOCAL_EPOCHS = "policy-local-epochs"
    NETWORK = "policy-network"
    RESOLUTION = "policy-resolution"
    PENDING = "pending-approval"
    REFUSED = "refused-by-site"
    BUDGET = "budget"
    NO_DATA = "no-data"
    NO_SUMMARY = "summary-not-shared"  # the site's policy does not share its data summary


class FailureCode(StrEnum):
    """Why a site's reply failed."""

    EGRESS = "egress-refused"
    RUN_CONFIG = "run-config"
    SITE_CONFIG = "site-config"
    DATA_UNREADABLE = "data-unreadable"
    OUT_OF_MEMORY = "out-of-memory"
    IO_ERROR = "io-error"
    TASK_CRASHED = "task-crashed"
    SITE_ERROR = "site-error"


# The site's data summary: counts and distributions on fixed vocabularies and bins, so that no free text and no
# tag value leaves (a Manufacturer is mapped to a vendor of this list, a slice thickness to a bin).
VENDORS = ("siemens", "ge", "philips", "canon", "fujifilm", "hologic", "agfa", "carestream", "konica", "samsung",
           "other")
# Scanner product lines, matched by a word of ManufacturerModelName ("SOMATOM Definition AS+" -> somatom); a model of
# no line here is "other". Product lines, not free text: the model tag's own text never leaves the site either.
MODEL_FAMILIES = ("somatom", "naeotom", "magnetom", "mammomat", "revolution", "lightspeed", "discovery", "optima",
                  "signa", "senographe", "pristina", "aquilion", "vantage", "orian", "iqon", "brilliance",
                  "ingenuity", "incisive", "spectral", "ingenia", "achieva", "selenia", "dimensions", "amulet",
                  "other")
SLICE_MM_BINS = ("lt1", "1-2", "2-3", "3-5", "ge5")  # slice thickness / spacing, mm
PIXEL_MM_BINS = ("lt0.2", "0.2-0.5", "0.5-1", "ge1")  # in-plane pixel spacing, mm
FIELD_T_BINS = ("1.5", "3", "other")  # MR field strength, tesla
INTENSITY_BINS = 16  # histogram of the preprocessed images' values (the network's input), fixed edges
SUPPRESSED = -1.0  # a count above 0 and below the site's minimum: "fewer than the minimum", not the count


def summary_keys(tasks: tuple[str, ...]) -> frozenset[str]:
    """Every key a site's data summary may hold for ``tasks`` (``models.tasks.TASK_DIMS`` in practice)."""
    keys = set()
    for task in tasks:
        keys |= {f"{task}:studies", f"{task}:labelled", f"{task}:suppressed", f"{task}:train:patients"}
        keys |= {f"{task}:{split}:{label}" for split in Split for label in ("pos", "neg")}
        keys |= {f"{task}:vendor:{v}" for v in VENDORS}
        keys |= {f"{task}:model:{m}" for m in MODEL_FAMILIES}
        keys |= {f"{task}:slice-mm:{b}" for b in SLICE_MM_BINS}
        keys |= {f"{task}:pixel-mm:{b}" for b in PIXEL_MM_BINS}
        keys |= {f"{task}:field-t:{b}" for b in FIELD_T_BINS}
        keys |= {f"{task}:intensity:{i}" for i in range(INTENSITY_BINS)}
    return frozenset(keys)


def vendor_of(manufacturer: str) -> str:
    """A Manufacturer tag's vendor, from :data:`VENDORS` (the tag's own text never leaves the site)."""
    text = "".join(ch for ch in manufacturer.lower() if ch.isalnum())
    aliases = {"siemens": "siemens", "ge": "ge", "gehealthcare": "ge", "gemedical": "ge", "philips": "philips",
               "canon": "canon", "toshiba": "canon", "fuji": "fujifilm", "hologic": "hologic", "agfa": "agfa",
               "carestream": "carestream", "kodak": "carestream", "konica": "konica", "samsung": "samsung"}
    for alias, vendor in aliases.items():
        if text == alias or (len(alias) > 2 and text.startswith(alias)):
            return vendor
    return "other"


def model_family_of(model: str) -> str:
    """A ManufacturerModelName's product line, from :data:`MODEL_FAMILIES`: the first word of the name that is a
    known line (so "Senographe Pristina" is senographe, "SIGNA Artist" signa), else "other"."""
    words = ["".join(ch for ch in w if ch.isalnum()) for w in model.lower().replace("-", " ").split()]
    for word in words:
        if word in MODEL_FAMILIES and word != "other":
            return word
    return "other"


def slice_bin(mm: float) -> str:
    """A slice thickness's band, from :data:`SLICE_MM_BINS`."""
    for edge, name in ((1.0, "lt1"), (2.0, "1-2"), (3.0, "2-3"), (5.0, "3-5")):
        if mm < edge:
            return name
    return SLICE_MM_BINS[-1]


def pixel_bin(mm: float) -> str:
    """An in-plane pixel spacing's band, from :data:`PIXEL_MM_BINS`."""
    for edge, name in ((0.2, "lt0.2"), (0.5, "0.2-0.5"), (1.0, "0.5-1")):
        if mm < edge:
            return name
    return PIXEL_MM_BINS[-1]


def field_bin(tesla: float) -> str:
    """An MR field strength's band, from :data:`FIELD_T_BINS`."""
    if abs(tesla - 1.5) < 0.3:
        return "1.5"
    if abs(tesla - 3.0) < 0.5:
        return "3"
    return FIELD_T_BINS[-1]


SUBGROUP = "subgroup:"
SUBGROUP_KINDS: dict[str, tuple[str, ...]] = {"vendor": VENDORS, "slice-mm": SLICE_MM_BINS, "field-t": FIELD_T_BINS}
SUBGROUP_STATS = ("studies", "positives", "negatives", "auroc", "auroc-low", "auroc-high")
SUBGROUP_KEYS = frozenset(f"{SUBGROUP}{kind}:{value}:{stat}" for kind, values in SUBGROUP_KINDS.items()
                          for value in values for stat in SUBGROUP_STATS)
"""A classifier's test evaluation also carries its figures per subgroup of studies a site can tell apart: scanner
vendor, slice thickness band, MR field strength band (fixed vocabularies); a subgroup of fewer studies than the
site's minimum count is not sent."""

ALLOWED_METRICS = frozenset(Metric) | HISTOGRAM_KEYS | SUBGROUP_KEYS
"""The egress whitelist of scalars: anything else is refused by the site's guard."""


def split_subgroups(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """A reply's metrics without its subgroup entries, and the subgroups (``"vendor:siemens"`` -> stat -> value)."""
    rest: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key in SUBGROUP_KEYS:
            kind, name, stat = key[len(SUBGROUP):].split(":")
            groups.setdefault(f"{kind}:{name}", {})[stat] = float(value)
        else:
            rest[key] = float(value)
    return rest, groups


def reason_codes() -> frozenset[str]:
    """Every code a site may give for not answering normally (refusals and failures)."""
    return frozenset({*Refusal, *FailureCode})


@dataclass(frozen=True)
class ParsedFailure:
    """A failure or refusal read back from an error reply's text."""

    site_id: str
    code: str
    sentence: str


_PREFIX = "oncofed site "
# The sentence ends where Flower's wrapping starts: "'>" (a deployment), or the escaped or real newline of
# the traceback a simulation appends.
_FAILURE = re.compile(r"oncofed site (\S+): ([a-z][a-z0-9-]*): ([^\\\n]*?)(?:'>|\\|\n|$)")


def failure_text(site_id: str, code: str, sentence: str) -> str:
    """The one text form of a failure or refusal that travels as an error: ``oncofed site ID: CODE: sentence``."""
    return f"{_PREFIX}{site_id}: {code}: {sentence}"


def parse_failure(text: str) -> ParsedFailure | None:
    """Read a :func:`failure_text` back, wherever Flower's wrapping put it in ``text`` (None if absent)."""
    found = _FAILURE.search(text or "")
    if found is None:
        return None
    return ParsedFailure(found.group(1), found.group(2), found.group(3).strip())

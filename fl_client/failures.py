"""What leaves a site when something goes wrong: a reason code from a fixed list and a sentence the site's
code wrote — never an exception's own text, which can hold a path named after a patient, a UID or a tag
value.

Flower sends any exception a ClientApp raises to the server as ``<class>:<'message'>``, and the server
keeps it (history, run log, report). So the site's handlers never let a raw exception out: each one
becomes a :class:`SiteFailure` whose text is ``oncofed site ID: CODE: sentence``. The full details (the
exception and its traceback) go to the site's own error log, ``WS/site-errors.log``; the failure as
sent goes to the egress log like any reply. The same happens in a simulation and in a deployment, where
the site's executor also answers for a task process that died outright (``task-crashed``).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from fl_client.workspace import Workspace
from models.protocol import FailureCode, SiteKey, failure_text, reason_codes

__all__ = ["Failure", "SiteFailure", "checked", "failure_of", "record_failure"]


@dataclass(frozen=True)
class Failure:
    """A failure as it leaves the site: a code and a sentence with no path, UID or tag value."""

    code: str
    sentence: str

    def reason(self, site_id: str) -> str:
        """The text that leaves the site (see :func:`models.protocol.failure_text`)."""
        return failure_text(site_id, self.code, self.sentence)


class SiteFailure(Exception):
    """A failure whose text may leave the site (see :class:`Failure`).

    Args:
        site_id: The site.
        failure: The code and sentence.
    """

    def __init__(self, site_id: str, failure: Failure) -> None:
        super().__init__(failure.reason(site_id))
        self.site_id = site_id
        self.failure = failure


def checked(failure: Failure) -> Failure:
    """``failure`` if the egress guard lets it leave — a code from the fixed lists and a short printable
    sentence — else a generic failure that does."""
    from fl_client.egress import EgressError, check_reply

    try:
        if failure.code not in reason_codes():
            raise EgressError(f"reason code {failure.code!r} is not on the fixed list")
        check_reply({}, {}, reference=None, strings={SiteKey.REASON: failure.code, SiteKey.DETAIL: failure.sentence})
    except EgressError:
        return Failure(FailureCode.SITE_ERROR, "a failure at the site; the site's error log has the details")
    return failure


def failure_of(exc: BaseException) -> Failure:
    """The PHI-free account of an exception raised while serving a message (see :func:`_failure_of`), passed
    through the egress guard (:func:`checked`)."""
    return checked(_failure_of(exc))


def _failure_of(exc: BaseException) -> Failure:
    """The account of an exception. Its text is used only where the site's own code wrote it to leave the site
    (a refusal, a failure already accounted for) or where it names only what the lead sent (a run-config key
    and value)."""
    from fl_client.egress import EgressError
    from fl_client.federated import Refused, SiteConfigError
    from models.config import ConfigError
    from models.device import DeviceError

    if isinstance(exc, SiteFailure):
        return exc.failure
    if isinstance(exc, Refused):
        return Failure(exc.code, exc.detail)
    if isinstance(exc, EgressError):
        return Failure(FailureCode.EGRESS, "the site's egress guard stopped the reply; nothing was sent")
    if isinstance(exc, ConfigError):
        return Failure(FailureCode.RUN_CONFIG, " ".join(str(exc).split())[:200])
    if isinstance(exc, DeviceError):
        return Failure(FailureCode.SITE_CONFIG, " ".join(str(exc).split())[:200])  # names devices, nothing else
    if isinstance(exc, SiteConfigError):
        return Failure(FailureCode.SITE_CONFIG, "the site's SuperNode is not configured with an ingested workspace")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return Failure(FailureCode.DATA_UNREADABLE,
                       "a file the site ingested could not be read: restore it or ingest again")
    if isinstance(exc, MemoryError):
        return Failure(FailureCode.OUT_OF_MEMORY, "the site ran out of memory on this task")
    if isinstance(exc, OSError):
        return Failure(FailureCode.IO_ERROR, f"an input/output error at the site (errno {exc.errno})")
    return Failure(FailureCode.SITE_ERROR, f"{type(exc).__name__} at the site; the site's error log has the details")


def record_failure(workspace: Path | None, failure: Failure, *, run: str, round_number: int,
                   exc: BaseException | None = None) -> None:
    """Keep the details at the site (``WS/site-errors.log``) and log the failure as sent (``egress.jsonl``).

    Args:
        workspace: The site workspace (None or missing: nothing can be written).
        failure: What is sent.
        run: The run, as the egress log names it.
        round_number: The server round.
        exc: The exception behind it, whose traceback stays in the site's error log.
    """
    from fl_client.egress import EgressLog, append_line

    if workspace is None or not Path(workspace).is_dir():
        return
    details = "".join(traceback.format_exception(exc)) if exc is not None else ""
    append_line(Workspace.of(workspace).error_log, f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} run {run} round "
                                             f"{round_number}: {failure.code}: {failure.sentence}\n{details}")
    EgressLog(Path(workspace)).append(run=run, round_number=round_number, kind="error", arrays={}, metrics={},
                                      strings={SiteKey.REASON: failure.code, SiteKey.DETAIL: failure.sentence})

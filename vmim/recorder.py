"""One recorder per step: it logs the step, times it and fills its `--json` result (as mkosi's
complete_step()), so a step function only does its work and returns what it did."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from vmim.errors import EXIT_COMMAND, OperationError, VmimError, full_disk

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: str
    status: str = "running"  # ok, failed
    message: str = ""
    seconds: float = 0.0
    implicit: bool = False
    details: Dict[str, Any] = field(default_factory=dict)  # image, format, bytes, timings

    def as_dict(self) -> dict:
        return {"step": self.step, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 3), "implicit": self.implicit, **self.details}


@dataclass
class BoxResult:
    box: str
    steps: List[StepResult] = field(default_factory=list)
    error: Optional[VmimError] = None
    host: Optional[str] = None

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else 0

    def as_dict(self) -> dict:
        d: Dict[str, Any] = {"box": self.box, "exit_code": self.exit_code,
                             "steps": [s.as_dict() for s in self.steps]}
        if self.error:
            d["error"] = str(self.error)
        return d


class Clock:
    """Where a step's time goes: named laps in seconds (the JSON's "timings")."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.last, 3)
        self.last = now


@contextlib.contextmanager
def record(result: BoxResult, name: str, implicit: bool = False) -> Iterator[StepResult]:
    """Run a step under a record: `step.message = ...` and `step.details[...]` in the body; a
    failure is recorded with its message and raised as a VmimError (an unexpected exception
    becomes exit 1, its traceback logged at debug level)."""
    step = StepResult(name, implicit=implicit)
    result.steps.append(step)
    started = time.monotonic()
    try:
        yield step
    except Exception as exc:
        error = exc if isinstance(exc, VmimError) else as_error(exc)
        step.status, step.message = "failed", str(error)
        step.seconds = time.monotonic() - started
        if error is exc:
            raise
        raise error from exc
    step.status = "ok"
    step.seconds = time.monotonic() - started
    log.info("box %s: %s: %s", result.box, name, step.message)


def as_error(exc: Exception) -> VmimError:
    """An unexpected error inside a step still aborts the box cleanly (disk released, exit 1)."""
    log.debug("unexpected error", exc_info=exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        error = OperationError(f"{exc.strerror or exc}{where}")
        if full_disk(exc):
            error.exit_code = EXIT_COMMAND
        return error
    return OperationError(f"{type(exc).__name__}: {exc}")

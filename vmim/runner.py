"""Runs a box's plan: under the slot's lock, observe, plan, then walk exactly the plan's steps.

A plan whose verdict is already known (an unknown image, a running domain and no step that
stops it...) ends the box with that error before any step. A step that fails aborts the box:
its disk is released (an implicit release step, recorded), its domain left down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Optional, Tuple, Type

from vmim import lease, lock, process, procscan
from vmim.config import Config
from vmim.disk import hold
from vmim.domain import Hypervisor
from vmim.errors import (
    EXIT_CLEANUP,
    EXIT_CONFIG,
    EXIT_ENVIRONMENT,
    EXIT_LOCKED,
    CleanupError,
    ConfigError,
    HostEnvironmentError,
    LockBusyError,
    StateError,
    VmimError,
)
from vmim.observe import observe
from vmim.plan import Plan, Request, Verdict, plan_box
from vmim.recorder import BoxResult, as_error, record
from vmim.steps import Box, Options, registry
from vmim.steps.mount import NOTHING_TO_RELEASE, is_mounted, release_slot

log = logging.getLogger(__name__)

_ERRORS: Dict[int, Type[VmimError]] = {EXIT_CONFIG: ConfigError, EXIT_LOCKED: LockBusyError,
                                       EXIT_ENVIRONMENT: HostEnvironmentError,
                                       EXIT_CLEANUP: CleanupError}


def error_of(verdict: Verdict) -> VmimError:
    return _ERRORS.get(verdict.exit_code, StateError)(verdict.message)


def run_box(cfg: Config, name: str, hv: Hypervisor, req: Request,
            options: Optional[Options] = None, *, locked: bool = False) -> BoxResult:
    """Run req on one box under its lock (already held by the caller when `locked`)."""
    options = options or Options()
    result = BoxResult(name)
    box = Box(cfg, name, hv, req, options)
    plan = None
    try:
        with contextlib.ExitStack() as stack:
            if not locked:
                stack.enter_context(lock.slot_lock(cfg.lockdir, name, options.lock_wait))
            slot = cfg.slot(name)
            if slot is not None and slot.mount:
                # what a run killed by SIGKILL left running would go on writing into the slot
                procscan.reap_orphans([slot.mount])
            try:
                plan = plan_box(req, name, observe(cfg, hv, name, req))
            except VmimError:
                raise
            except Exception as exc:  # noqa: BLE001 — this box fails, the others go on
                raise as_error(exc) from exc
            if plan.verdict is not None:
                raise error_of(plan.verdict)
            steps = registry()
            for step in plan.steps:
                process.check_cancelled()
                lease.check()  # a fleet job whose worker lost it stops here: never boots
                with record(result, step.name, step.implicit) as rec:
                    rec.message = steps[step.name](box, step, rec)
    except VmimError as exc:
        result.error = exc
        _release_after_failure(box, plan, result)
    finally:
        _keep_or_let_go(box)
    return result


def _keep_or_let_go(box: Box) -> None:
    """The run ends: a slot it leaves mounted (--mount, or a release that failed) stays held by
    a holder process until --release (or -u) stops it; then this run's own hold is dropped."""
    slot = box.slot
    try:
        if box.held and slot is not None and is_mounted(slot):
            hold.keep_while_mounted(box.held, True)
    except (VmimError, OSError) as exc:
        log.error("box %s: its disk stays mounted but is no longer held against a domain "
                  "start: %s", box.name, exc)
    finally:
        box.let_go()


def _release_after_failure(box: Box, plan: Plan | None, result: BoxResult) -> None:
    """A failed step aborts the box: its disk is released, its domain left down."""
    slot = box.slot
    if slot is None or slot.store_type is None or os.geteuid() != 0 or plan is None:
        return
    if not {"mount", "release"} & {s.name for s in plan.steps} or \
            isinstance(result.error, (LockBusyError, CleanupError)):
        return
    if plan.verdict is not None:
        return  # nothing was done
    try:
        with record(result, "release", implicit=True) as rec:
            rec.message = release_slot(slot)
            if rec.message == NOTHING_TO_RELEASE:
                result.steps.pop()
                return
            rec.message = f"after the failure: {rec.message}"
    except VmimError as exc:
        log.error("box %s: after the failure, the release failed too: %s", box.name, exc)


def claim_free_slot(cfg: Config, hv: Hypervisor) -> Tuple[str, contextlib.ExitStack]:
    """Lock the first free slot (listing.slot_is_free, in name order) and return its name with
    the held lock; judged under the lock, so two claims never get the same slot."""
    from vmim import listing

    for slot in sorted(cfg.slots, key=lambda s: s.name):
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(lock.slot_lock(cfg.lockdir, slot.name, 0))
        except LockBusyError:
            continue
        if listing.slot_is_free(slot, hv.domain(slot.name), is_mounted(slot), locked=False):
            return slot.name, stack
        stack.close()
    raise LockBusyError(f"no free slot: all {len(cfg.slots)} slots of {cfg.path} are running, "
                        "mounted or locked; try again later")

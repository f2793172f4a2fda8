"""Runs a box's plan: under the slot's lock, observe, plan, then walk exactly the plan's steps.

A plan whose verdict is already known (an unknown image, a running domain and no step that
stops it...) ends the box with that error before any step. A step that fails aborts the box:
its disk is released (an implicit release step, recorded), its domain left down.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Dict, Optional, Tuple, Type

from vmim import lease, lock, process, procscan, signals, stages, standby
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
    Interrupted,
    LockBusyError,
    StateError,
    VmimError,
)
from vmim.observe import observe
from vmim.plan import Plan, Request, Verdict, plan_box
from vmim.recorder import BoxResult, as_error, record
from vmim.steps import Box, Options, proof, registry
from vmim.steps.mount import NOTHING_TO_RELEASE, is_mounted, release_slot

log = logging.getLogger(__name__)

_ERRORS: Dict[int, Type[VmimError]] = {EXIT_CONFIG: ConfigError, EXIT_LOCKED: LockBusyError,
                                       EXIT_ENVIRONMENT: HostEnvironmentError,
                                       EXIT_CLEANUP: CleanupError}


#: The steps that run while the digest of the image to restore is still being checked
#: (vmim.steps.proof.verify): they change nothing the image's failure would leave changed —
#: the slot's disk is mapped and mounted (as --mount does), the restore reads its filesystem
#: and tries its re-make on a file; each waits for the check itself before it changes more
#: (proof.before_change). Every other step waits for the check first. (The verify step
#: comes first in every plan, and its check is left running only where the mount and the
#: restore come next: plan._check_beside.)
BESIDE_THE_CHECK = ("verify", "mount", "restore")


def error_of(verdict: Verdict) -> VmimError:
    return _ERRORS.get(verdict.exit_code, StateError)(verdict.message)


def run_box(cfg: Config, name: str, hv: Hypervisor, req: Request,
            options: Optional[Options] = None, *, locked: bool = False,
            on_plan: Optional[Callable[[Config], None]] = None) -> BoxResult:
    """Run req on one box under its lock (already held by the caller when `locked`).
    on_plan(cfg): called once the plan holds no verdict, before its first step. What its
    commands warn of on their way to success is logged under its name."""
    with stages.box_context(name):
        return _run_box(cfg, name, hv, req, options, locked=locked, on_plan=on_plan)


def _run_box(cfg: Config, name: str, hv: Hypervisor, req: Request,
             options: Optional[Options] = None, *, locked: bool = False,
             on_plan: Optional[Callable[[Config], None]] = None) -> BoxResult:
    options = options or Options()
    if req.stage:
        return _run_staged(cfg, name, hv, req, options)
    result = BoxResult(name)
    box = Box(cfg, name, hv, req, options)
    plan = None
    try:
        with contextlib.ExitStack() as stack:
            if not locked:
                stack.enter_context(lock.slot_lock(cfg.lockdir, name, options.lock_wait))
            # the slot on the disk its domain boots (a slot with a standby has two)
            box.cfg = cfg = standby.resolve(cfg, hv, name)
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
            if on_plan is not None:  # once its images are proven, before the first change
                box.on_change = functools.partial(on_plan, cfg)
            steps = registry()
            for step in plan.steps:
                process.check_cancelled()
                lease.check()  # a fleet job whose worker lost it stops here: never boots
                with record(result, step.name, step.implicit) as rec:
                    if step.name not in BESIDE_THE_CHECK:
                        proof.before_change(box)
                    rec.message = steps[step.name](box, step, rec)
            proof.before_change(box)  # (a plan always has a step after its verify)
    except VmimError as exc:
        result.error = exc
        with signals.kept():  # the clean-up is not cut short by a signal (vmim.signals)
            if isinstance(exc, Interrupted):
                process.stop_live()  # a command started as the signal came: before the release
            _release_after_failure(box, plan, result)
    finally:
        with signals.kept():
            box.call_off_checks()
            _keep_or_let_go(box, say=result.error is None)
    return result


def _keep_or_let_go(box: Box, say: bool = False) -> None:
    """The run ends: a slot it leaves mounted (--mount, or a release that failed) stays held by
    a holder process until --release (or -u) stops it; then this run's own hold is dropped.
    With say (the run succeeded), a slot left mounted is said to be, and how to let it go."""
    slot = box.slot
    try:
        if box.held and slot is not None and is_mounted(slot):
            hold.keep_while_mounted(box.held, True)
            if say:
                log.info("box %s: stays mounted at %s: --release unmounts it, -u unmounts it "
                         "and starts the domain", box.name, slot.mount)
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


def _run_staged(cfg: Config, name: str, hv: Hypervisor, req: Request,
                options: Options) -> BoxResult:
    """--stage: restore and insert into the standby disk under the standby's lock, the domain
    running on (vmim.standby); then, with -u, swap it in under the slot's lock."""
    result = BoxResult(name)
    spare_name = standby.standby_name(name)
    part: Optional[BoxResult] = None
    try:
        with lock.slot_lock(cfg.lockdir, spare_name, options.lock_wait):
            rcfg = standby.resolve(cfg, hv, name)
            slot, spare = rcfg.slot(name), rcfg.slot(spare_name)
            if slot is None:
                raise StateError(f"box '{name}' has no slot in {cfg.path}: there is no standby "
                                 "disk to stage into")
            if spare is None:
                raise ConfigError(f"box '{name}' has no standby disk: set standby in "
                                  f"[{slot.section}] (a second disk, as HostDisk or root)")
            if req.restore is None:
                st = standby.staged(rcfg, slot, spare)
                if st is None or not st.ready:
                    raise StateError(f"box '{name}': nothing staged to insert into"
                                     f"{': ' + st.skip if st and st.skip else ''}; stage an "
                                     "image with -r NAME --stage")

            def begin(_cfg: Config) -> None:  # the plan holds: the standby is about to change
                assert slot is not None and spare is not None
                standby.begin(rcfg, slot, spare, req.restore, [t.name for t in req.inserts])

            part = run_box(rcfg, spare_name, hv, req.staging(), options, locked=True,
                           on_plan=begin)
            if part.error is None:
                standby.finish(rcfg, slot)
    except VmimError as exc:
        result.error = exc
    if part is not None:
        for step in part.steps:
            step.details["disk"] = "standby"
        result.steps += part.steps
        result.error = result.error or part.error
    if result.error is None and req.swapping().actions:
        rest = run_box(cfg, name, hv, req.swapping(), options)
        result.steps += rest.steps
        result.error = rest.error
    return result


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
        slot = standby.resolve(cfg, hv, slot.name).slot(slot.name) or slot  # its active disk
        if listing.slot_is_free(slot, hv.domain(slot.name), is_mounted(slot), locked=False):
            return slot.name, stack
        stack.close()
    raise LockBusyError(f"no free slot: all {len(cfg.slots)} slots of {cfg.path} are running, "
                        "mounted or locked; try again later")

"""Power steps: kill (force off), down (graceful, then forced), up (define if missing, start)."""

from __future__ import annotations

import logging

from vmim import incomplete
from vmim.errors import StateError
from vmim.plan import Step
from vmim.recorder import StepResult
from vmim.steps import Box

log = logging.getLogger(__name__)


def kill(box: Box, step: Step, rec: StepResult) -> str:
    if box.hv.domain(box.name) is None:
        return "not defined in libvirt; nothing to force off"
    return box.hv.destroy(box.name)


def down(box: Box, step: Step, rec: StepResult) -> str:
    if box.hv.domain(box.name) is None:
        return "not defined in libvirt; nothing to shut down"
    timeout = box.options.timeout
    if timeout is None:
        timeout = box.slot.timeout if box.slot else 180
    return box.hv.shutdown(box.name, timeout)


def redefine(box: Box, step: Step, rec: StepResult) -> str:
    """Replace libvirt's definition with the config's (the domain must be shut off)."""
    from vmim import definition

    slot = box.need_slot()
    info = box.hv.domain(box.name)
    if info is not None and not info.is_shut_off:
        raise StateError(f"box '{box.name}': domain is {info.state}; --redefine replaces a "
                         "definition only while the domain is shut off: add -d (or -k)")
    current = box.hv.definition(box.name) if info else None
    diff = definition.drift_of(slot, current)
    box.hv.define(definition.keeping_identity(definition.domain_xml(slot), current))
    rec.details.update(changed=diff)
    if info is None:
        return "defined from the config"
    return f"redefined from the config ({'; '.join(diff)})" if diff else \
        "redefined from the config (it already agreed)"


def up(box: Box, step: Step, rec: StepResult) -> str:
    """Start the domain (its disk was released by the plan's step before this one)."""
    done = []
    slot = box.slot
    if slot is not None and slot.store_type is not None:
        mark = incomplete.read(box.cfg, slot)
        if mark is not None:
            raise StateError(f"box '{box.name}': {incomplete.describe(mark)}, so its "
                             "filesystem is incomplete and it is not started; restore an "
                             f"image into it (vmimagemanager -b {box.name} -r NAME -u)")
    from vmim import definition

    if box.hv.domain(box.name) is None:
        box.hv.define(definition.domain_xml(box.need_slot()))
        done.append("defined from the config")
        unbootable = definition.boot_warning(box.need_slot())
        if unbootable:
            log.warning("%s", unbootable)
    elif slot is not None and "redefine" not in box.req.actions:
        diff = definition.drift_of(slot, box.hv.definition(box.name))
        if diff:  # said, not acted on: the user's own changes to the domain may be why
            log.warning("%s", definition.drift_line(box.name, diff))
    done.append(box.hv.start(box.name, vcpus=box.options.core, wait=box.options.start_wait))
    skipped = _staged_skip(box)
    if skipped:
        log.warning("box %s: %s", box.name, skipped)
        done.append(skipped)
    return "; ".join(done)


def _staged_skip(box: Box) -> str:
    """Why the image staged on the slot's standby disk was not swapped in, or ""."""
    from vmim import standby

    slot, spare = box.slot, box.cfg.slot(standby.standby_name(box.name))
    if slot is None or spare is None or "swap" in box.req.actions:
        return ""
    st = standby.staged(box.cfg, slot, spare)
    return f"the staged image is not swapped in: {st.skip}" if st and st.skip else ""

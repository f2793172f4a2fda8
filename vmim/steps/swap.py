"""The swap step: the staged standby disk becomes the domain's disk (vmim.standby).

With the domain shut off (the plan puts a down before it) and the standby's lock held (no
staging runs), after checking again that what is staged is complete and current and that
nothing holds the standby: libvirt's definition is changed in the source of its disk only,
then the host's record follows. A domain libvirt does not know is defined by the up step from
the config, on the disk the record names. A qcow2 slot's old overlay on an image is removed."""

from __future__ import annotations

import logging
import os

from vmim import definition, lock, standby
from vmim.config import Slot
from vmim.disk import for_slot, qcow2
from vmim.errors import ConfigError, StateError
from vmim.plan import Step
from vmim.recorder import StepResult
from vmim.steps import Box
from vmim.steps.mount import is_mounted

log = logging.getLogger(__name__)


def swap(box: Box, step: Step, rec: StepResult) -> str:
    spare_name = standby.standby_name(box.name)
    with lock.slot_lock(box.cfg.lockdir, spare_name, box.options.lock_wait):
        cfg = standby.resolve(box.cfg, box.hv, box.name)  # again, under the standby's lock
        slot, spare = cfg.slot(box.name), cfg.slot(spare_name)
        if slot is None or spare is None or not slot.disk or not spare.disk:
            raise ConfigError(f"box '{box.name}' has no standby disk: set standby in its "
                              "section")
        staged = standby.staged(cfg, slot, spare)
        if staged is None or not staged.ready:
            raise StateError(f"box '{box.name}': nothing to swap in: "
                             f"{staged.skip if staged else 'no image is staged'}")
        info = box.hv.domain(box.name)
        if info is not None and not info.is_shut_off:
            raise StateError(f"box '{box.name}': domain is {info.state}; the disks are swapped "
                             "only while it is shut off")
        if is_mounted(spare):
            raise StateError(f"box '{box.name}': its standby disk is mounted at "
                             f"{spare.mount}: not swapped in")
        disk = for_slot(spare)
        mapped = disk.mapped_devices()
        if mapped:
            raise StateError(f"box '{box.name}': its standby disk is mapped by "
                             f"{', '.join(mapped)}: not swapped in")
        disk.check_free()  # a process holding it as QEMU does: exit 4
        users = box.hv.disk_users(spare.disk, defined=True)
        if users:
            raise StateError(f"box '{box.name}': its standby disk {spare.disk} is a disk of "
                             f"domain {', '.join(repr(u) for u in users)}: not swapped in")
        if info is not None:
            current = box.hv.definition(box.name) or ""
            box.hv.define(definition.with_disk(current, slot.disk, spare.disk))
        standby.swapped(cfg, box.name, spare.disk)
        left = _drop_old_overlay(slot)
    box.cfg = standby.resolve(box.cfg, box.hv, box.name)  # the up step boots the new disk
    rec.details.update(image=staged.image, disk=spare.disk, standby=slot.disk,
                       staged=staged.finished)
    return (f"the domain's disk is now {spare.disk} (image {staged.image}, staged "
            f"{staged.finished}); {slot.disk} is the standby{left}")


def _drop_old_overlay(slot: Slot) -> str:
    """A qcow2 slot's old overlay on an image holds only what the guest wrote since: removed
    (the next staging of a disk image makes a new one, in constant time). A qcow2 disk of its
    own (a tree was restored into it) is kept as the standby."""
    if slot.store_type != "qcow2" or not slot.disk or not qcow2.current_base(slot):
        return ""
    try:
        os.unlink(slot.disk)
    except OSError as exc:
        log.warning("box %s: the old overlay %s stays: %s", slot.name, slot.disk, exc.strerror)
        return ""
    return " (its old overlay was removed)"

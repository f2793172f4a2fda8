"""Mount steps: mount (map the slot's disk and mount its root filesystem, or check that what is
mounted there is it) and release (unmount and unmap, found from the system's live state)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import List, Set

from vmim import disk as disk_mod
from vmim import tree, worklog
from vmim.config import Config, Slot
from vmim.disk import mounts, namespaces
from vmim.domain import Hypervisor
from vmim.errors import CleanupError, CommandError, StateError
from vmim.plan import Step
from vmim.recorder import StepResult
from vmim.steps import Box, require_root

log = logging.getLogger(__name__)

NOTHING_TO_RELEASE = "nothing was mounted or mapped"


def release_command(box: str) -> str:
    return f"vmimagemanager -b {box} --release"


def is_mounted(slot: Slot) -> bool:
    return mounts.mounted_at(slot.mount) is not None


def candidate_devices(d: disk_mod.SlotDisk) -> Set[str]:
    """Devices from which the slot's filesystem can be mounted now."""
    devices = set(d.mapped_devices())
    try:
        if stat.S_ISBLK(os.stat(d.source).st_mode):
            devices.add(d.source)
    except OSError:
        pass
    return devices


def mounts_of(devices: Set[str]) -> List[mounts.Mount]:
    devnos = set()
    for dev in devices:
        try:
            devnos.add(os.stat(dev).st_rdev)
        except OSError:
            pass
    real = {os.path.realpath(d) for d in devices}
    return [m for m in mounts.all_mounts()
            if m.devno in devnos or os.path.realpath(m.source) in real]


def check_domain_off(hv: Hypervisor, slot: Slot, d: disk_mod.SlotDisk) -> None:
    info = hv.domain(slot.name)
    if info is not None and not info.is_shut_off:
        raise StateError(f"box '{slot.name}': domain is {info.state}; add -d to shut it down "
                         "first (or -k to force it off)")
    users = hv.disk_users(d.source)
    if users:
        raise StateError(f"box '{slot.name}': disk '{d.source}' is in use by running domain "
                         f"{', '.join(repr(u) for u in users)}")


def create(box: Box, step: Step, rec: StepResult) -> str:
    """Make the slot's missing disk (disksize): the plan puts this before its mount."""
    from vmim.disk import create as create_mod

    slot = box.need_slot()
    require_root("making a disk")
    fstype, _needs = create_mod.image_facts(slot, box.req.restore)
    done = create_mod.create(slot, fstype)
    rec.details.update(disk=slot.disk, bytes=slot.disksize, filesystem=fstype or
                       create_mod.DEFAULT_FS)
    return done


def mount(box: Box, step: Step, rec: StepResult) -> str:
    slot = box.need_slot()
    require_root("--mount")
    message = mount_slot(box.cfg, box.hv, slot)
    # what a killed run left in the guest, as the host recorded it
    tree.remove_stale_work(slot.mount, worklog.WorkLog.of(box.cfg, slot))
    return message


def mount_slot(cfg: Config, hv: Hypervisor, slot: Slot) -> str:
    d = disk_mod.for_slot(slot)
    check_domain_off(hv, slot, d)
    devices = candidate_devices(d)
    ours = mounts_of(devices)
    here = mounts.mounted_at(slot.mount)
    if here is not None:
        if any(m.mount_id == here.mount_id for m in ours):
            return f"already mounted at {slot.mount}"
        raise StateError(f"box '{slot.name}': {slot.mount} already has another filesystem "
                         f"mounted ({here.source}); unmount it or set the slot's mount")
    if ours:
        m = ours[0]
        raise StateError(f"box '{slot.name}': its filesystem is already mounted at "
                         f"{m.target} ({m.source}); unmount it first")
    held = namespaces.mounts_elsewhere(devices)  # never map a disk mounted anywhere
    if held:
        raise CleanupError(f"box '{slot.name}': its disk is still mounted elsewhere; not "
                           f"mapping it a second time: {namespaces.describe(held)}; then "
                           "mount it again")
    leftovers = d.unmap_all()  # mappings an interrupted run left, mounted nowhere
    if leftovers:
        log.warning("box %s: cleaned up after an interrupted run: %s", slot.name,
                    "; ".join(leftovers))
    still = d.mapped_devices()  # unmap_all() raises first; this keeps the promise if not
    if still:
        raise CleanupError(f"box '{slot.name}': not mapping its disk a second time: still "
                           f"mapped by {', '.join(still)}")
    with contextlib.ExitStack() as stack:
        device = d.map(stack)
        fs = disk_mod.probe_filesystem(device, f"box '{slot.name}': {d.describe()}")
        mounts.ensure_shared(mounts.mount_base(slot.mount, cfg.mount_prefix))
        os.makedirs(slot.mount, mode=0o755, exist_ok=True)
        try:
            mounts.mount(device, slot.mount, fs.type, fs.mount_options)
        except CommandError as exc:
            raise CommandError(exc.argv, exc.returncode,
                               f"{exc.stderr_tail} (is the {fs.type} filesystem of "
                               f"{d.describe()} damaged? check it with fsck)") from None
        stack.pop_all()
    return f"mounted {d.describe()} ({fs.type}) at {slot.mount}"


def release(box: Box, step: Step, rec: StepResult) -> str:
    return release_slot(box.need_slot())


def release_slot(slot: Slot) -> str:
    require_root("--release")
    hint = release_command(slot.name)
    undone = []
    for m in mounts.mounts_at(slot.mount):
        mounts.umount(m.target, release_hint=hint)
        undone.append(f"unmounted {m.target}")
    if slot.store_type is not None:
        d = disk_mod.for_slot(slot)
        elsewhere = mounts_of(candidate_devices(d))  # the device itself too
        if elsewhere:
            where = ", ".join(f"{m.target} ({m.source})" for m in elsewhere)
            first = elsewhere[0].target
            raise CleanupError(f"box '{slot.name}': its disk is still mounted at {where}; "
                               f"run 'umount {first}', then '{hint}'")
        held = namespaces.mounts_elsewhere(candidate_devices(d))
        if held:  # a QEMU started while it was mounted here: --release again cannot help
            raise CleanupError(f"box '{slot.name}': its disk is still mounted in another "
                               f"mount namespace: {namespaces.describe(held)}; then run "
                               f"'{hint}'")
        undone += d.unmap_all()
        left = d.mapped_devices()
        if left:
            raise CleanupError(f"box '{slot.name}': still mapped after release: "
                               f"{', '.join(left)}; run '{hint}' again")
    return "; ".join(undone) if undone else NOTHING_TO_RELEASE

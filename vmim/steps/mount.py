"""Mount steps: mount (map the slot's disk and mount its root filesystem, or check that what is
mounted there is it) and release (unmount and unmap, found from the system's live state)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import List, Set

from vmim import disk as disk_mod
from vmim import incomplete, tree, worklog
from vmim.config import Config, Slot
from vmim.disk import hold, mounts, namespaces, remake
from vmim.disk.hold import DiskHold
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
    incomplete.remove_remake(box.cfg, slot)  # of a disk that was there: not the new one's
    done = create_mod.create(slot, fstype)
    rec.details.update(disk=slot.disk, bytes=slot.disksize, filesystem=fstype or
                       create_mod.DEFAULT_FS)
    return done


def mount(box: Box, step: Step, rec: StepResult) -> str:
    """Map and mount the slot. It may run while the digest of the image to restore is still
    being checked (vmim.steps.proof): what changes more than the mount waits for the check —
    the re-make a killed restore left to do, the removal of what a killed run left."""
    from vmim.steps import proof  # (proof → wholedisk → this module)

    slot = box.need_slot()
    require_root("--mount")
    if os.path.lexists(incomplete.remake_path(box.cfg, slot)):
        proof.before_change(box)
    message = mount_slot(box.cfg, box.hv, slot, box.holds, box.held,
                         restoring=box.req.restore is not None)
    # what a killed run left in the guest, as the host recorded it
    records = worklog.WorkLog.of(box.cfg, slot)
    if records.any():
        proof.before_change(box)
    tree.remove_stale_work(slot.mount, records)
    return message


def mount_slot(cfg: Config, hv: Hypervisor, slot: Slot, holds: contextlib.ExitStack,
               held: List[DiskHold], *, restoring: bool = False) -> str:
    """Map and mount the slot's filesystem, holding its disk as QEMU does (vmim.disk.hold) from
    before the domain's state is checked until the release: a domain started meanwhile fails
    to start instead of booting a mounted disk. The hold goes on holds (the box's). A re-make
    of the filesystem that an earlier restore began and did not end runs again first when
    this run restores (restoring), and is refused otherwise (_finish_remake)."""
    d = disk_mod.for_slot(slot)
    devices = candidate_devices(d)
    ours = mounts_of(devices)
    here = mounts.mounted_at(slot.mount)
    if here is not None and any(m.mount_id == here.mount_id for m in ours):
        _hold(d, holds, held)  # a --mount's holder process holds it too: it acts for us
        check_domain_off(hv, slot, d)
        # mounted: a re-make recorded (vmim.incomplete) ended, killed before it said so
        incomplete.remove_remake(cfg, slot)
        if mounts.restrict(here, disk_mod.SLOT_OPTIONS):  # mounted by hand, or by 1.x
            return f"already mounted at {slot.mount}; remounted {','.join(disk_mod.SLOT_OPTIONS)}"
        return f"already mounted at {slot.mount}"
    check_domain_off(hv, slot, d)  # the plain refusal first, before anything is held
    if here is not None:
        raise StateError(f"box '{slot.name}': {slot.mount} already has another filesystem "
                         f"mounted ({here.source}); unmount it or set the slot's mount")
    if ours:
        m = ours[0]
        raise StateError(f"box '{slot.name}': its filesystem is already mounted at "
                         f"{m.target} ({m.source}); unmount it first")
    held_elsewhere = namespaces.mounts_elsewhere(devices)  # never map a disk mounted anywhere
    if held_elsewhere:
        raise CleanupError(f"box '{slot.name}': its disk is still mounted elsewhere; not "
                           f"mapping it a second time: {namespaces.describe(held_elsewhere)}; "
                           "then mount it again")
    leftovers = d.unmap_all()  # mappings an interrupted run left, mounted nowhere
    if leftovers:
        log.warning("box %s: cleaned up after an interrupted run: %s", slot.name,
                    "; ".join(leftovers))
    still = d.mapped_devices()  # unmap_all() raises first; this keeps the promise if not
    if still:
        raise CleanupError(f"box '{slot.name}': not mapping its disk a second time: still "
                           f"mapped by {', '.join(still)}")
    _hold(d, holds, held)  # from here a domain start fails; a QEMU holding it is refused
    check_domain_off(hv, slot, d)  # started before the hold: refused now
    with contextlib.ExitStack() as stack:
        device = d.map(stack)
        check_domain_off(hv, slot, d)  # a qcow2 slot: held from the export daemon's start
        remade = _finish_remake(cfg, slot, device, restoring)
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
    if remade:
        incomplete.remove_remake(cfg, slot)
    # Belt and braces, before the first write: a domain that runs now (a QEMU that does not
    # lock, say) makes the run fail, and the failure releases the disk.
    check_domain_off(hv, slot, d)
    return f"mounted {d.describe()} ({fs.type}) at {slot.mount}"


def _finish_remake(cfg: Config, slot: Slot, device: str, restoring: bool) -> bool:
    """Run again the re-make an earlier restore recorded (vmim.incomplete.write_remake) and
    did not end, killed or crashed from its unmount until the re-made filesystem was
    mounted: the device holds what mkfs left, no filesystem or one half made. Only a restore
    re-makes it (what was there is lost to the restore anyway); any other run is refused
    before it touches the device. True when it ran."""
    path = incomplete.remake_path(cfg, slot)
    try:
        found = incomplete.read_remake(cfg, slot)
        if found is None:
            return False
        how, size = remake.from_record(found[0]), found[1]
    except ValueError as exc:
        raise StateError(f"box '{slot.name}': the record of an interrupted re-make of its "
                         f"filesystem cannot be read ({exc}): {path}; remove it to mount "
                         "what the disk holds") from None
    now = disk_mod.device_size(device)
    if now != size:  # resized, or another disk at its path: not the one it was made for
        raise StateError(f"box '{slot.name}': a re-make of its filesystem was interrupted "
                         f"on a device of {size} bytes, and {device} has {now}: not run "
                         f"again; make a filesystem on it by hand, then remove {path}")
    if not restoring:
        raise StateError(f"box '{slot.name}': a restore was interrupted while it re-made "
                         "the slot's filesystem, so the disk holds none, or one half made "
                         f"({path}); restore an image (-r NAME): it makes the filesystem "
                         "again first")
    log.warning("box %s: a restore was interrupted while it re-made the slot's %s "
                "filesystem: making it again", slot.name, how.fs.type)
    remake.remake(how, device)
    return True


def _hold(d: disk_mod.SlotDisk, holds: contextlib.ExitStack, held: List[DiskHold]) -> None:
    h = d.hold(holds)
    if h is not None:
        held.append(h)


def release(box: Box, step: Step, rec: StepResult) -> str:
    message = release_slot(box.need_slot())
    box.let_go()  # unmounted and unmapped: the domain may start again
    spare = _release_standby(box) if not step.implicit else ""
    return f"{message}; standby: {spare}" if spare else message


def _release_standby(box: Box) -> str:
    """--release of a slot with a standby disk releases what a killed staging left of it too,
    unless a staging runs now (it holds the standby's lock)."""
    from vmim import lock, standby
    from vmim.errors import LockBusyError

    spare_name = standby.standby_name(box.name)
    spare = box.cfg.slot(spare_name)
    if spare is None:
        return ""
    try:
        with lock.slot_lock(box.cfg.lockdir, spare_name, 0):
            done = release_slot(spare)
    except LockBusyError:
        return "a staging runs: left to it"
    return "" if done == NOTHING_TO_RELEASE else done


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
        undone += hold.stop_holders(d.source, hint)  # what kept a --mount's hold
    return "; ".join(undone) if undone else NOTHING_TO_RELEASE

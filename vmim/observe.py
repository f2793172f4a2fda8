"""What a box's plan depends on, read from the system: one place for the dry run and the run.

Reads only: libvirt's domain state, the mount table, the lock, the restore mark, the image
and inserts stores (detecting what a requested image is), and, for disk work as root, mounts
of the slot's disk in other mount namespaces.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from vmim import disk as disk_mod
from vmim import incomplete, lock, standby, store
from vmim.config import Config, Slot
from vmim.disk import create as create_mod
from vmim.disk import qcow2
from vmim.domain import Hypervisor
from vmim.errors import StateError
from vmim.plan import DATA_ACTIONS, DISK_IMAGE_FORMATS, MISSING, STORE_KINDS, Observed, Request
from vmim.steps import wholedisk
from vmim.steps.proof import planned_format


def observe(cfg: Config, hv: Hypervisor, box: str, req: Request) -> Observed:
    """What the plan of req on box depends on; cfg as standby.resolve() gives it."""
    from vmim.disk import mounts

    slot = cfg.slot(box)
    info = hv.domain(box)
    state = info.state if info else "undefined"
    held = lock.holder(cfg.lockdir, box)
    if held is not None and held.pid == os.getpid():
        held = None  # this run holds it (observing under its own lock)
    locked_by = f"pid {held.pid} ({held.command})" if held else None
    if slot is None:
        return Observed(domain_state=state, in_config=False, locked_by=locked_by,
                        root=os.geteuid() == 0)
    mark = incomplete.read(cfg, slot)
    images: Dict[str, str] = {}
    inserts: Dict[str, str] = {}
    missing: List[str] = []
    unusable: List[str] = []
    checksum = False
    for key, names, found in (("vmimages", [req.restore] if req.restore is not None else [],
                               images),
                              ("vminserts", [t.name for t in req.inserts], inserts)):
        directory = getattr(slot, key)
        if names and not directory:
            missing.append(key)
            continue
        st = store.ImageStore(directory, STORE_KINDS[key])
        for name in names:
            try:
                if key == "vmimages" and (req.disk_image or slot.store_type == "qcow2" and
                                          qcow2.is_disk_image(st.find(name), st.metadata(name))):
                    found[name] = wholedisk.usable(slot, req.disk_image, st, name)
                else:
                    found[name], by_digest = planned_format(st, name)
                    if key == "vmimages":
                        checksum = by_digest
            except (StateError, OSError) as exc:  # what the run's verify step would say
                found[name] = MISSING if not os.path.lexists(st.path(name)) else "unknown"
                unusable.append(str(exc) if isinstance(exc, StateError) else
                                f"{st.kind} '{name}': {exc.strerror} ({exc.filename})")
    if req.disk_image and slot.store_type != "qcow2" and req.store is not None:
        try:
            wholedisk.image_file_disk(slot)  # what the store step would refuse
        except StateError as exc:
            unusable.append(str(exc))
    if req.store is not None and not slot.vmimages and "vmimages" not in missing:
        missing.append("vmimages")
    if req.extracts and not slot.vmextracts:
        missing.append("vmextracts")
    for key, wanted in (("vmimages", req.store is not None), ("vmextracts", bool(req.extracts))):
        directory = getattr(slot, key)
        if wanted and directory and not os.path.isdir(directory):  # what the store step says
            unusable.append(f"{STORE_KINDS[key]} store {directory} does not exist; create it "
                            "or fix the config")
    mounted = mounts.mounted_at(slot.mount) is not None
    create: Optional[str] = None
    # a missing disk (an LV's strategy says its own word when mapping): made first, or refused
    # (a qcow2 slot restoring a disk image gets a new overlay: its old disk is not needed)
    new_overlay = (slot.store_type == "qcow2" and req.restore is not None and
                   images.get(req.restore) in DISK_IMAGE_FORMATS and
                   not set(req.actions) & {"mount", "extract", "store", "insert"})
    if not mounted and set(req.actions) & {"mount", *DATA_ACTIONS} and not new_overlay and \
            disk_mod.missing_disk(slot):
        fstype, needs = create_mod.image_facts(slot, req.restore)
        why = create_mod.refusal(slot, needs)
        if why is None:  # the plan makes it first (disksize)
            create = create_mod.describe(slot, fstype)
        else:  # what the mount step says
            unusable.insert(0, why)
    return Observed(
        domain_state=state,
        in_config=True,
        disk=slot.describe_disk(),
        mount=slot.mount,
        mounted=mounted,
        store_type=slot.store_type,
        clear=slot.clear,
        timeout=slot.timeout,
        images=images,
        checksum=checksum,
        inserts=inserts,
        missing_stores=tuple(missing),
        unusable=tuple(unusable),
        locked_by=locked_by,
        root=os.geteuid() == 0,
        incomplete=str(mark.get("image", "?")) if mark else None,
        pinned=_pinned(slot, req) if not mounted and not slot.conflict else None,
        held_by=_held_by(hv, slot, req) if not mounted and not create else None,
        conflict=slot.conflict,
        create=create,
        **_standby_facts(cfg, hv, slot, req),
    )


def _standby_facts(cfg: Config, hv: Hypervisor, slot: Slot, req: Request) -> Dict[str, Any]:
    """standby, staged, staged_skip of a slot with a standby disk; attached of a standby."""
    if standby.owner_of(slot.name) is not None:
        if not set(req.actions) & {"mount", "release", *DATA_ACTIONS}:
            return {}
        users = hv.disk_users(str(slot.disk), defined=True)
        return {"attached": f"its standby disk {slot.disk} is a disk of domain "
                            f"{', '.join(repr(u) for u in users)}: not touched while a "
                            "definition lists it"} if users else {}
    spare = cfg.slot(standby.standby_name(slot.name))
    if spare is None:
        return {}
    st = standby.staged(cfg, slot, spare)
    return {"standby": spare.disk, "staged": st.image if st and st.ready else None,
            "staged_skip": st.skip if st else None}


def _held_by(hv: Hypervisor, slot: Slot, req: Request) -> Optional[str]:
    """Why the mount would refuse the slot's disk: another process holds QEMU's lock bytes on
    it (vmim.disk.hold), whatever libvirt says of the domain (root, disk work only). A running
    domain libvirt names as the disk's user is left to the mount step, which says so."""
    if os.geteuid() != 0 or slot.store_type is None or not (
            set(req.actions) & {"mount", *DATA_ACTIONS}):
        return None
    from vmim.disk import for_slot

    try:
        d = for_slot(slot)
        if hv.disk_users(d.source):
            return None
        d.check_free()
    except StateError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 — observing must not fail; the step itself checks again
        return None
    return None


def _pinned(slot: Slot, req: Request) -> Optional[str]:
    """Who holds the slot's disk mounted in another mount namespace (root, disk work only)."""
    if os.geteuid() != 0 or slot.store_type is None or not (
            set(req.actions) & {"mount", "release", "up", *DATA_ACTIONS}):
        return None
    from vmim.disk import for_slot, namespaces
    from vmim.steps.mount import candidate_devices

    try:
        held = namespaces.mounts_elsewhere(candidate_devices(for_slot(slot)))
    except Exception:  # noqa: BLE001 — observing must not fail; the step itself checks again
        return None
    return namespaces.describe(held) if held else None

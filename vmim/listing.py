"""The lists: boxes (config ∪ libvirt), images, inserts. Data only; cli.py renders it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from vmim import incomplete, lock, standby, store
from vmim.config import Config, Slot
from vmim.definition import drift_of
from vmim.disk import missing_disk, mounts, qcow2
from vmim.domain import UNDEFINED, DomainInfo
from vmim.standby import Staged


@dataclass(frozen=True)
class BoxRow:
    name: str
    in_config: bool
    section: Optional[str]
    state: str  # a libvirt state word, or "undefined"
    persistent: Optional[bool]
    store_type: Optional[str]
    disk: Optional[str]
    disk_text: str
    mount: Optional[str]
    mounted: bool
    locked_by: Optional[lock.Holder]
    base: Optional[str]  # a qcow2 slot's current base image
    incomplete: Optional[dict]  # the mark of a restore that did not finish (vmim.incomplete)

    is_free: bool
    disk_missing: bool = False  # the configured disk file or device is not there
    drift: Tuple[str, ...] = ()  # how libvirt's definition differs from the config's
    standby: Optional[str] = None  # the standby disk (vmim.standby)
    staged: Optional[Staged] = None  # what is staged on it

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "in_config": self.in_config,
            "section": self.section,
            "domain": {"defined": self.state != UNDEFINED, "state": self.state,
                       "persistent": self.persistent},
            "store_type": self.store_type,
            "disk": self.disk,
            "disk_missing": self.disk_missing,
            "definition_drift": list(self.drift),
            "mount": self.mount,
            "mounted": self.mounted,
            "locked": self.locked_by.as_dict() if self.locked_by else None,
            "base": self.base,
            "incomplete": self.incomplete,
            "standby": self.standby,
            "staged": self.staged.as_dict() if self.staged else None,
        }


def slot_is_free(slot: Slot, domain: Optional[DomainInfo], mounted: bool, locked: bool) -> bool:
    """Free for work: a configured disk that is there, the domain shut off or not defined, not
    mounted, not locked. The one definition behind -f, -b any-free and its dry run."""
    return (slot.store_type is not None and (domain is None or domain.is_shut_off)
            and not mounted and not locked and missing_disk(slot) is None)


def boxes(cfg: Config, domains: Optional[Dict[str, DomainInfo]],
          definitions: Optional[Callable[[str], Optional[str]]] = None) -> List[BoxRow]:
    """Slots of the config and domains of libvirt; without libvirt, the config's slots only.
    definitions: libvirt's definition of a domain by name, to compare with the config's."""
    domains = domains or {}
    targets = {m.target for m in mounts.all_mounts()}
    rows: List[BoxRow] = []
    for name in sorted(set(cfg.slot_names) | set(domains)):
        slot = cfg.slot(name)
        dom = domains.get(name)
        spare = None
        if slot is not None and slot.standby_disk:  # on its active disk (vmim.standby)
            slot, spare = standby.resolve_slot(cfg, slot, definitions(name)
                                               if definitions and dom else None)
        mounted = bool(slot and os.path.realpath(slot.mount) in targets)
        held = lock.holder(cfg.lockdir, name)
        gone = bool(slot and missing_disk(slot))
        rows.append(BoxRow(
            name=name,
            in_config=slot is not None,
            section=slot.section if slot else None,
            state=dom.state if dom else UNDEFINED,
            persistent=dom.persistent if dom else None,
            store_type=slot.store_type if slot else None,
            disk=slot.disk if slot else None,
            disk_text=(slot.describe_disk() + (" (missing)" if gone else "")) if slot else "-",
            mount=slot.mount if slot else None,
            mounted=mounted,
            locked_by=held,
            is_free=slot is not None and slot_is_free(slot, dom, mounted, held is not None),
            base=(qcow2.current_base(slot) or None) if slot and slot.store_type == "qcow2" else None,
            incomplete=incomplete.read(cfg, slot) if slot else None,
            disk_missing=gone,
            drift=tuple(drift_of(slot, definitions(name)))
            if slot and dom and definitions else (),
            standby=spare.disk if spare else None,
            staged=standby.staged(cfg, slot, spare) if slot and spare else None,
        ))
    return rows


def images(cfg: Config) -> List[store.Entry]:
    """Images, each with the slots whose qcow2 overlays use it as their base."""
    from dataclasses import replace

    users = qcow2.bases_in_use(cfg) if any(s.store_type == "qcow2" for s in cfg.slots) else {}
    return [replace(e, base_of=tuple(users.get(os.path.realpath(e.path), ())))
            for d in cfg.image_dirs() for e in store.list_entries(d)]


def inserts(cfg: Config) -> List[store.Entry]:
    return [e for d in cfg.insert_dirs() for e in store.list_entries(d)]

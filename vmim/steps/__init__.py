"""The steps a plan is made of, one module per family: power (kill, down, up), mount (mount,
release), data (verify, extract, store, restore, insert), wholedisk (disk images), swap (the
staged standby disk becomes the domain's).

A step is a function `step(box, record) -> str`: it does its work on the box, puts its details
in the record and returns what it did. It never calls another step: the runner walks the plan.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from vmim import store as store_mod
from vmim.config import Config, Slot
from vmim.disk.hold import DiskHold
from vmim.domain import Hypervisor
from vmim.errors import ConfigError, HostEnvironmentError, StateError
from vmim.plan import STORE_KINDS, Request, Step
from vmim.recorder import StepResult


@dataclass(frozen=True)
class Options:
    """Command-line settings that steps use."""

    lock_wait: float = 0
    timeout: Optional[int] = None  # --timeout, else the slot's timeout
    core: Optional[int] = None  # --core
    start_wait: float = 60


@dataclass(frozen=True)
class Proven:
    """An image or insert the verify step proved restorable."""

    path: str
    fmt: Any  # an archive Format, or a DiskImageFormat
    summary: Any = None  # what a full read found (archive.Summary), None when a checksum proved it
    #: the digest check still running (vmim.digest.Check): the image is not proven until
    #: vmim.steps.proof.confirm() has its answer, which every step that changes something
    #: waits for
    check: Any = None


@dataclass
class Box:
    """One box in one run: what every step of its plan works on."""

    cfg: Config
    name: str
    hv: Hypervisor
    req: Request
    options: Options = Options()
    proven: Dict[Tuple[str, int], Proven] = field(default_factory=dict)  # ("image"|"insert", i)
    #: the hold of the slot's disk while it is mapped (vmim.disk.hold), from the mount step
    #: until the release step or the end of the run
    holds: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    held: List[DiskHold] = field(default_factory=list)
    #: run once before the first change, after the images are proven
    #: (vmim.steps.proof.before_change): a staging's record of what it stages
    on_change: Optional[Callable[[], None]] = None

    def call_off_checks(self) -> None:
        """The run ends: the digest checks still running are called off."""
        for p in self.proven.values():
            if p.check is not None:
                p.check.cancel()

    def let_go(self) -> None:
        """Drop the hold of the slot's disk (released, or the run ends)."""
        self.held.clear()
        self.holds.close()

    @property
    def slot(self) -> Optional[Slot]:
        return self.cfg.slot(self.name)

    def need_slot(self) -> Slot:
        slot = self.slot
        if slot is None:
            raise StateError(f"box '{self.name}' is a libvirt domain with no slot in "
                             f"{self.cfg.path}; disk actions need a [vmim.vm.NAME] section "
                             "with its HostDisk or root")
        return slot

    def store(self, key: str) -> store_mod.ImageStore:
        slot = self.need_slot()
        directory = getattr(slot, key)
        kind = STORE_KINDS[key]
        if not directory:
            raise ConfigError(f"box '{slot.name}': no {kind} store configured: set {key} in "
                              f"[vmim.local] or [{slot.section}] of {self.cfg.path}")
        return store_mod.ImageStore(directory, kind)


StepFunction = Callable[[Box, Step, StepResult], str]


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostEnvironmentError(f"{what} needs root (mounting and loop devices): run "
                                   "vmimagemanager as root, with sudo for instance; the lists "
                                   "(-l, -L) work for the libvirt group")


def registry() -> Dict[str, StepFunction]:
    from vmim.steps import data, mount, power, proof, swap

    return {
        "kill": power.kill, "down": power.down, "redefine": power.redefine, "up": power.up,
        "create": mount.create, "mount": mount.mount, "release": mount.release,
        "verify": proof.verify, "extract": data.extract, "store": data.store,
        "restore": data.restore, "insert": data.insert, "swap": swap.swap,
    }

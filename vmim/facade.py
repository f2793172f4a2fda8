"""Runs the steps of one command for one slot: disk strategy + domain state + lock."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from vmim import digest, incomplete, lock, process, progress, tree, writeback
from vmim import disk as disk_mod
from vmim import store as store_mod
from vmim.archive import detect, for_detected, for_name
from vmim.config import Config, Slot
from vmim.disk import mounts, namespaces, qcow2
from vmim.errors import (
    CleanupError,
    CommandError,
    ConfigError,
    HostEnvironmentError,
    IncompleteError,
    LockBusyError,
    OperationError,
    StateError,
    VmimError,
)
from vmim.plan import DISK_ACTIONS, Request
from vmim.progress import human_size

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Options:
    """Command-line settings that steps use."""

    lock_wait: float = 0
    timeout: Optional[int] = None  # --timeout, else the slot's timeout
    core: Optional[int] = None  # --core
    start_wait: float = 60


@dataclass
class StepResult:
    step: str
    status: str  # ok, failed
    message: str = ""
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)  # image, format, bytes

    def as_dict(self) -> dict:
        return {"step": self.step, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 3), **self.details}


@dataclass
class BoxResult:
    box: str
    steps: List[StepResult] = field(default_factory=list)
    error: Optional[VmimError] = None

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else 0

    def as_dict(self) -> dict:
        d: Dict[str, Any] = {"box": self.box, "exit_code": self.exit_code,
                             "steps": [s.as_dict() for s in self.steps]}
        if self.error:
            d["error"] = str(self.error)
        return d


NOTHING_TO_RELEASE = "nothing was mounted or mapped"


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostEnvironmentError(f"{what} needs root (mounting and loop devices)")


def release_command(box: str) -> str:
    return f"vmimagemanager -b {box} --release"


class SlotRunner:
    """The steps of one command on one slot, under the slot's lock."""

    def __init__(self, cfg: Config, box: str, hv: Any, options: Options = Options()):
        self.cfg = cfg
        self.box = box
        self.hv = hv
        self.options = options
        self.slot: Optional[Slot] = cfg.slot(box)
        self.req = Request()
        self.details: Dict[str, Any] = {}
        self._root_checked = False  # _root() verified the mounted filesystem in this command

    def run(self, actions: List[str], req: Optional[Request] = None,
            locked: bool = False) -> BoxResult:
        """Run the steps under the slot's lock (already held by the caller when `locked`)."""
        self.req = req or Request(boxes=[self.box], actions=list(actions))
        result = BoxResult(self.box)
        try:
            with contextlib.ExitStack() as stack:
                if not locked:
                    stack.enter_context(lock.slot_lock(self.cfg.lockdir, self.box,
                                                       self.options.lock_wait))
                if self.slot is not None and self.slot.mount:
                    # what a run killed by SIGKILL left running would go on writing into the slot
                    process.reap_orphans([self.slot.mount])
                for step in actions:
                    process.check_cancelled()
                    started = time.monotonic()
                    self.details = {}
                    try:
                        message = getattr(self, f"step_{step}")()
                    except Exception as exc:
                        error = exc if isinstance(exc, VmimError) else _as_error(exc)
                        result.steps.append(StepResult(step, "failed", str(error),
                                                       time.monotonic() - started, self.details))
                        raise error from exc
                    result.steps.append(StepResult(step, "ok", message, time.monotonic() - started,
                                                   self.details))
                    log.info("box %s: %s: %s", self.box, step, message)
        except VmimError as exc:
            result.error = exc
            self._release_after_failure(actions, result)
        return result

    def _release_after_failure(self, actions: List[str], result: BoxResult) -> None:
        """A failed step aborts the box: its disk is released, its domain left down."""
        slot = self.slot
        if slot is None or slot.store_type is None or os.geteuid() != 0:
            return
        if not set(actions) & set(DISK_ACTIONS) or isinstance(result.error, (LockBusyError, CleanupError)):
            return
        try:
            message = self.step_release()
        except VmimError as exc:
            log.error("box %s: after the failure, the release failed too: %s", self.box, exc)
            result.steps.append(StepResult("release", "failed", str(exc)))
            return
        if message != NOTHING_TO_RELEASE:
            result.steps.append(StepResult("release", "ok", f"after the failure: {message}"))

    # ------------------------------------------------------------------ helpers

    def _slot(self) -> Slot:
        if self.slot is None:
            raise StateError(f"box '{self.box}' is a libvirt domain with no slot in "
                             f"{self.cfg.path}; disk actions need a [vmim.vm.NAME] section "
                             "with its HostDisk or root")
        return self.slot

    def _candidate_devices(self, d: disk_mod.SlotDisk) -> Set[str]:
        """Devices from which the slot's filesystem can be mounted now."""
        devices = set(d.mapped_devices())
        try:
            if stat.S_ISBLK(os.stat(d.source).st_mode):
                devices.add(d.source)
        except OSError:
            pass
        return devices

    def _mounts_of(self, devices: Set[str]) -> List[mounts.Mount]:
        devnos = set()
        for dev in devices:
            try:
                devnos.add(os.stat(dev).st_rdev)
            except OSError:
                pass
        real = {os.path.realpath(d) for d in devices}
        return [m for m in mounts.all_mounts()
                if m.devno in devnos or os.path.realpath(m.source) in real]

    def _check_domain_off(self, slot: Slot, d: disk_mod.SlotDisk) -> None:
        info = self.hv.domain(slot.name)
        if info is not None and not info.is_shut_off:
            raise StateError(f"box '{slot.name}': domain is {info.state}; add -d to shut it down "
                             "first (or -k to force it off)")
        users = self.hv.disk_users(d.source)
        if users:
            raise StateError(f"box '{slot.name}': disk '{d.source}' is in use by running domain "
                             f"{', '.join(repr(u) for u in users)}")

    # ------------------------------------------------------------------ steps

    def step_kill(self) -> str:
        if self.hv.domain(self.box) is None:
            return "not defined in libvirt; nothing to force off"
        return self.hv.destroy(self.box)

    def step_down(self) -> str:
        if self.hv.domain(self.box) is None:
            return "not defined in libvirt; nothing to shut down"
        timeout = self.options.timeout
        if timeout is None:
            timeout = self.slot.timeout if self.slot else 180
        return self.hv.shutdown(self.box, timeout)

    def step_up(self) -> str:
        done = []
        clock = _Clock()
        self.details = {"timings": clock.laps}
        if self.slot is not None and self.slot.store_type is not None:
            released = self.step_release()  # never boot a domain whose disk is mounted here
            if released != NOTHING_TO_RELEASE:
                done.append(released)
            clock.lap("release")
            mark = incomplete.read(self.cfg, self.slot)
            if mark is not None:
                raise StateError(f"box '{self.box}': {incomplete.describe(mark)}, so its "
                                 "filesystem is incomplete and it is not started; restore an "
                                 f"image into it (vmimagemanager -b {self.box} -r NAME -u)")
        if self.hv.domain(self.box) is None:
            slot = self._slot()
            from vmim import definition

            self.hv.define(definition.domain_xml(slot))
            done.append("defined from the config")
        done.append(self.hv.start(self.box, vcpus=self.options.core, wait=self.options.start_wait))
        clock.lap("start")
        return "; ".join(done)

    def step_mount(self) -> str:
        slot = self._slot()
        require_root("--mount")
        d = disk_mod.for_slot(slot)
        self._check_domain_off(slot, d)
        devices = self._candidate_devices(d)
        ours = self._mounts_of(devices)
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
            mounts.ensure_shared(mounts.mount_base(slot.mount, self.cfg.mount_prefix))
            os.makedirs(slot.mount, mode=0o755, exist_ok=True)
            try:
                mounts.mount(device, slot.mount, fs.type, fs.mount_options)
            except CommandError as exc:
                raise CommandError(exc.argv, exc.returncode,
                                   f"{exc.stderr_tail} (is the {fs.type} filesystem of "
                                   f"{d.describe()} damaged? check it with fsck)") from None
            stack.pop_all()
        return f"mounted {d.describe()} ({fs.type}) at {slot.mount}"

    def step_release(self) -> str:
        slot = self._slot()
        require_root("--release")
        self._root_checked = False
        hint = release_command(slot.name)
        undone = []
        for m in mounts.mounts_at(slot.mount):
            mounts.umount(m.target, release_hint=hint)
            undone.append(f"unmounted {m.target}")
        if slot.store_type is not None:
            d = disk_mod.for_slot(slot)
            elsewhere = self._mounts_of(self._candidate_devices(d))  # the device itself too
            if elsewhere:
                where = ", ".join(f"{m.target} ({m.source})" for m in elsewhere)
                first = elsewhere[0].target
                raise CleanupError(f"box '{slot.name}': its disk is still mounted at {where}; "
                                   f"run 'umount {first}', then '{hint}'")
            held = namespaces.mounts_elsewhere(self._candidate_devices(d))
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


    # ------------------------------------------------------------------ data steps

    def _root(self, clock: Optional[_Clock] = None) -> str:
        """The slot's mounted root filesystem: stop the domain and mount it when needed
        (as 0.3 did for store, restore, insert and extract)."""
        slot = self._slot()
        require_root("this step")
        clock = clock or _Clock()
        if self._root_checked and mounts.mounted_at(slot.mount) is not None:
            return slot.mount  # an earlier step of this command mounted and checked it
        if mounts.mounted_at(slot.mount) is None:
            self._ensure_down()
            clock.lap("down")
            log.info("box %s: mount: %s", slot.name, self.step_mount())
            clock.lap("mount")
        else:
            self.step_mount()  # checks that what is mounted there is this slot's filesystem
        tree.remove_stale_work(slot.mount)
        self._root_checked = True
        return slot.mount

    def _store(self, key: str) -> store_mod.ImageStore:
        slot = self._slot()
        directory = getattr(slot, key)
        kind = {"vmimages": "image", "vminserts": "insert", "vmextracts": "extract"}[key]
        if not directory:
            raise ConfigError(f"box '{slot.name}': no {kind} store configured: set {key} in "
                              f"[vmim.local] or [{slot.section}] of {self.cfg.path}")
        return store_mod.ImageStore(directory, kind)

    def _verified_image(self, st: store_mod.ImageStore, name: str) -> Any:
        """Find, detect and prove an image restorable before anything touches the slot: by the
        digest this tool recorded (vmim.digest), else by a full read of its structure. Returns
        the path, the format and what the full read found (None when the checksum proved it)."""
        path = st.find(name)
        meta = st.metadata(name)
        checked = digest.check_recorded(path, meta, f"{st.kind} '{name}'")  # BLAKE3 or sha256
        found = detect.detect(path)
        if not found.known and found.compression:
            raise StateError(f"{st.kind} '{name}' in {st.directory} is corrupt or truncated: "
                             f"{found.compression} data whose start cannot be read "
                             f"({found.description})")
        if not found.known:
            raise StateError(f"{st.kind} '{name}' in {st.directory} is not an image "
                             f"vmimagemanager can use ({found.description})")
        fmt = for_detected(found, f"{st.kind} '{name}'")
        for tool in fmt.unpack_tools():
            process.require_tool(tool, f"it is needed to unpack {st.kind} '{name}' ({fmt.name}); "
                                 "the slot was not touched")
        summary = None if checked else fmt.verify(path)  # no checksum: read all of it
        return path, fmt, summary

    def _meta(self, **extra: Any) -> Dict[str, Any]:
        return {"source_box": self.box, "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}

    def step_extract(self) -> str:
        root = self._root()
        fmt = for_name(self.req.format or "rsync")
        st = self._store("vmextracts")
        done = []
        for t in self.req.extracts:
            name = self.req.extract_name(t.name, self.box)
            host = tree.resolve(root, t.directory)
            if not os.path.isdir(host) or os.path.islink(host):
                raise StateError(f"box '{self.box}': directory {t.directory} does not exist in "
                                 "the guest")
            rel = tree.guest_relative(root, host)
            fmt.check_tree(host, f"box {self.box}: extract {name}")
            meta = st.write(name, fmt, functools.partial(_write_paths, fmt, root, [rel]),
                            self._meta(directory=t.directory))
            self.details.setdefault("extracts", []).append(
                {"name": name, "directory": t.directory, "format": fmt.name, "bytes": meta["size"]})
            done.append(f"{t.directory} → {st.path(name)} ({fmt.name})")
        return "; ".join(done)

    def _ensure_down(self) -> None:
        info = self.hv.domain(self.box)
        if info is not None and not info.is_shut_off:
            log.info("box %s: down: %s", self.box, self.step_down())

    def _refuse_base_in_use(self, st: store_mod.ImageStore, name: str) -> None:
        users = qcow2.bases_in_use(self.cfg).get(os.path.realpath(st.path(name)))
        if users:
            raise StateError(f"image '{name}' is the base of the qcow2 overlay of "
                             f"{', '.join(users)}: storing over it would corrupt "
                             f"{'them' if len(users) > 1 else 'it'}; store under another name")

    def _whole_disk(self, slot: Slot) -> bool:
        return slot.store_type == "qcow2" or self.req.disk_image

    def _image_file_disk(self, slot: Slot) -> str:
        disk = slot.hostdisk or slot.root or ""
        if not os.path.isfile(disk):
            raise StateError(f"box '{slot.name}': --disk-image works on disk image files; "
                             f"'{disk}' is not one")
        return disk

    def _store_disk(self, slot: Slot, st: store_mod.ImageStore, name: str) -> str:
        self._ensure_down()
        if slot.store_type == "qcow2":
            disk, fmt = slot.hostdisk or "", DiskImageFormat("qcow2")
        else:
            self.step_release()  # the file must not change under the copy
            disk, fmt = self._image_file_disk(slot), DiskImageFormat(slot.disk_image_format)
        if fmt.name == "qcow2":
            writer = functools.partial(_convert_to, disk, "qcow2", slot.qcow2_compress)
        else:
            writer = functools.partial(_copy_raw_to, disk)
        meta = st.write(name, fmt, writer, self._meta(disk=disk))
        self.details = {"image": name, "format": fmt.name, "bytes": meta["size"]}
        return f"stored the whole disk as {st.path(name)} ({fmt.name}, {meta['size']} bytes)"

    def _restore_disk(self, slot: Slot, st: store_mod.ImageStore, name: str) -> str:
        path = st.find(name)
        meta = st.metadata(name)
        # A raw disk image has no magic of its own: what the store recorded says what it is.
        fmt_name = meta["format"] if meta and meta.get("format") in ("qcow2", "raw") else \
            detect.detect(path).format
        wanted = ("qcow2",) if slot.store_type == "qcow2" else ("qcow2", "raw")
        if fmt_name not in wanted:
            raise StateError(f"image '{name}' is {fmt_name}, not a disk image this slot can "
                             f"use ({' or '.join(wanted)})")
        if fmt_name == "qcow2":
            try:
                process.run(["qemu-img", "check", "-q", path])
            except CommandError as exc:
                raise StateError(f"image '{name}' is corrupt: {exc.stderr_tail}; the slot was "
                                 "not touched") from None
        self.details = {"image": name, "format": fmt_name, "bytes": os.path.getsize(path)}
        self._ensure_down()
        if slot.store_type == "qcow2":
            qcow2.make_overlay(path, slot.hostdisk or "")
            incomplete.remove(self.cfg, slot)  # the whole disk was replaced at once
            return f"{name}: the slot's disk is a new qcow2 overlay on it"
        was_mounted = is_mounted(slot)
        self.step_release()
        disk = self._image_file_disk(slot)
        tmp = f"{disk}.vmim-tmp.{os.getpid()}"
        try:
            if fmt_name == "raw":
                how = qcow2.copy_raw(path, tmp)
            else:
                qcow2.convert(path, tmp, "raw")
                how = "converted to raw, sparse"
            os.chmod(tmp, stat.S_IMODE(os.stat(disk).st_mode))
            os.replace(tmp, disk)  # atomic: the old disk is intact until here
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        incomplete.remove(self.cfg, slot)
        if was_mounted:  # as it was before (and as --mount, which ran first, asked)
            self.step_mount()
        return f"{name} ({fmt_name}) written over the whole disk ({how})"

    def step_store(self) -> str:
        name = self.req.store_name(self.box)
        assert name is not None
        st = self._store("vmimages")
        store_mod.validate_name(name)
        self._refuse_base_in_use(st, name)
        if self._whole_disk(self._slot()):
            return self._store_disk(self._slot(), st, name)
        root = self._root()
        fmt = for_name(self.req.format or "rsync")
        fmt.check_tree(root, f"box {self.box}: store {name}")
        vfs = os.statvfs(root)
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        with progress.watch(f"{self.box} store", used):
            meta = st.write(name, fmt, functools.partial(_write_paths, fmt, root, ["."]),
                            self._meta())
        self.details = {"image": name, "format": fmt.name, "bytes": meta["size"]}
        return f"stored as {st.path(name)} ({fmt.name}, {meta['size']} bytes)"

    def step_restore(self) -> str:
        slot = self._slot()
        name = self.req.restore
        assert name is not None
        st = self._store("vmimages")
        if self._whole_disk(slot):
            return self._restore_disk(slot, st, name)
        clock = _Clock()
        path, fmt, summary = self._verified_image(st, name)
        clock.lap("verify")
        meta = st.metadata(name)  # the tree's size, without walking it again
        size = meta["size"] if meta and "size" in meta else (
            store_mod.tree_size(path) if fmt.is_tree else os.path.getsize(path))
        self.details = {"image": name, "format": fmt.name, "bytes": size, "timings": clock.laps}
        root = self._root(clock)
        _check_room(root, summary, name)
        incomplete.write(self.cfg, slot, name)  # durable before anything in the slot changes
        try:
            if fmt.is_tree:
                with progress.watch(f"{self.box} restore", self.details["bytes"]), \
                        writeback.pushed_to_disk(root):  # the disk writes during the transfer
                    fmt.mirror(path, root)
                clock.lap("transfer")
            else:
                if slot.clear == "mkfs":
                    self._remake_filesystem()
                else:
                    tree.clear(root)
                clock.lap("clear")
                staging = tree.staging_dir(root, "restore", like=root)
                with progress.watch(f"{self.box} restore", self.details["bytes"]), \
                        writeback.pushed_to_disk(root):  # the disk writes during the transfer
                    fmt.unpack(path, staging)
                tree.merge(staging, root)
                os.rmdir(staging)
                clock.lap("transfer")
            if slot.sourceimage:
                with open(os.path.join(root, "sourceimage"), "w") as fh:
                    fh.write(name + "\n")
            # No sync here: the release (umount) flushes the filesystem before any boot.
        except (VmimError, OSError) as exc:
            cause = exc if isinstance(exc, VmimError) else _as_error(exc)
            raise IncompleteError(f"restore of {name}{_full_note(root)}", cause) from None
        incomplete.remove(self.cfg, slot)
        how = "mirrored" if fmt.is_tree else f"unpacked after clearing ({slot.clear})"
        return f"{name} ({fmt.name}) {how}"

    def step_insert(self) -> str:
        st = self._store("vminserts")
        checked = [(t, *self._verified_image(st, t.name)) for t in self.req.inserts]
        root = self._root()
        done = []
        for t, path, fmt, _summary in checked:
            staging = tree.staging_dir(root, "insert", like=tree.target_dir(root, t.directory))
            try:
                fmt.unpack(path, staging)
                n = tree.merge(staging, root, t.directory)
            finally:
                if os.path.lexists(staging):
                    tree.remove([staging])
            done.append(f"{t.name} ({fmt.name}) at {t.directory}: {n} entries")
            self.details.setdefault("inserts", []).append(
                {"name": t.name, "directory": t.directory, "format": fmt.name})
        return "; ".join(done)

    def _remake_filesystem(self) -> None:
        """clear = "mkfs": make the filesystem anew with the same type, UUID and label."""
        slot = self._slot()
        here = mounts.mounted_at(slot.mount)
        assert here is not None
        device = here.source
        fs = disk_mod.probe_filesystem(device, f"box '{slot.name}'")
        mounts.umount(slot.mount, release_hint=release_command(slot.name))
        # No discard: trimming the whole device first would cost more than the restore saves.
        if fs.type == "xfs":
            argv = ["mkfs.xfs", "-q", "-f", "-K", "-m", f"uuid={fs.uuid}"]
        elif fs.type == "btrfs":
            argv = ["mkfs.btrfs", "-q", "-f", "--nodiscard", "-U", fs.uuid]
        else:
            argv = [f"mkfs.{fs.type}", "-q", "-F", "-E", "nodiscard", "-U", fs.uuid]
        if fs.label:
            argv += ["-L", fs.label]
        process.run([*argv, device])
        # ext4 would otherwise zero its inode tables in the background during the restore;
        # with noinit_itable that waits for the next mount (the guest's).
        options = [*fs.mount_options, *(["noinit_itable"] if fs.type == "ext4" else [])]
        mounts.mount(device, slot.mount, fs.type, options)


def _as_error(exc: Exception) -> VmimError:
    """An unexpected error inside a step still aborts the box cleanly (disk released, exit 1);
    its traceback is logged at debug level."""
    log.debug("unexpected error", exc_info=exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return OperationError(f"{exc.strerror or exc}{where}")
    return OperationError(f"{type(exc).__name__}: {exc}")


class _Clock:
    """Where a step's time goes: named laps in seconds (the JSON's "timings")."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.laps: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.last, 3)
        self.last = now


def claim_free_slot(cfg: Config, hv: Any) -> Tuple[str, contextlib.ExitStack]:
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


def _check_room(root: str, summary: Any, name: str) -> None:
    """Refuse, before the slot is cleared, an image whose data cannot fit in the filesystem
    even when it is empty (known when the image's structure was read)."""
    needs = getattr(summary, "needs_bytes", None)
    if not needs:
        return
    st = os.statvfs(root)
    size = st.f_blocks * st.f_frsize
    if needs > size:
        raise StateError(f"image '{name}' holds {human_size(needs)} of data, more than the "
                         f"slot's whole filesystem ({human_size(size)}); the slot was not "
                         "touched")


def _full_note(root: str) -> str:
    """' (the slot's filesystem is full)' when it is, so a disk-full failure says so."""
    try:
        st = os.statvfs(root)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (the slot's filesystem is full: {free} bytes free)" if free < 4 * 1024 * 1024 else ""


class DiskImageFormat:
    """A whole-disk image in the store (qcow2 or raw): no archive checksum, qemu-img checks."""

    is_tree = False

    def __init__(self, name: str):
        self.name = name


def _convert_to(disk: str, out_format: str, compress: bool, tmp: str, _link: str) -> None:
    qcow2.convert(disk, tmp, out_format, compress=compress)


def _copy_raw_to(disk: str, tmp: str, _link: str) -> None:
    qcow2.copy_raw(disk, tmp)


def _write_paths(fmt: Any, root: str, paths: List[str], tmp: str,
                 link_dest: str) -> Optional[str]:
    return fmt.write(root, paths, tmp, link_dest)  # the sha256 of an archive, made on the way


def is_mounted(slot: Slot) -> bool:
    return mounts.mounted_at(slot.mount) is not None

"""Data steps: extract, store, restore, insert. The plan mounts the slot before them; their
verify step, which proves images restorable before the slot is touched, is vmim.steps.proof;
whole-disk images go to wholedisk."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import stat
import time
from typing import Any, Dict, List, Optional

from vmim import disk as disk_mod
from vmim import incomplete, lease, process, progress, sandbox, trash, tree, worklog, writeback
from vmim import store as store_mod
from vmim.archive import Summary, fits, for_name
from vmim.disk import mounts, qcow2, remake
from vmim.errors import IncompleteError, StateError, VmimError
from vmim.plan import Step
from vmim.progress import human_size
from vmim.recorder import Clock, StepResult, as_error
from vmim.steps import Box, Proven, wholedisk
from vmim.steps.mount import release_command
from vmim.steps.proof import before_change
from vmim.terminal import safe

log = logging.getLogger(__name__)

def _root(box: Box) -> str:
    """The slot's root filesystem, which the plan's mount step mounted and checked."""
    slot = box.need_slot()
    if mounts.mounted_at(slot.mount) is None:
        raise StateError(f"box '{box.name}': its filesystem is not mounted at {slot.mount}")
    return slot.mount


def _meta(box: Box, **extra: Any) -> Dict[str, Any]:
    return {"source_box": box.name, "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def _write_paths(fmt: Any, root: str, paths: List[str], meta: Dict[str, Any], tmp: str,
                 link_dest: str) -> Optional[str]:
    digest = fmt.write(root, paths, tmp, link_dest)  # of an archive, made on the way
    if getattr(fmt, "shape", None):  # what a restore must fit (vmim.archive.fits)
        meta["shape"] = fmt.shape
    return digest


def extract(box: Box, step: Step, rec: StepResult) -> str:
    root = _root(box)
    t = box.req.extracts[step.item]
    fmt = for_name(box.req.format or "rsync")
    st = box.store("vmextracts")
    name = box.req.extract_name(t.name, box.name)
    host = tree.resolve(root, t.directory)
    if not os.path.isdir(host) or os.path.islink(host):
        raise StateError(f"box '{box.name}': directory {t.directory} does not exist in the guest")
    rel = tree.guest_relative(root, host)
    fmt.check_tree(host, f"box {box.name}: extract {name}")
    facts = _meta(box, directory=t.directory)
    meta = st.write(name, fmt, functools.partial(_write_paths, fmt, root, [rel], facts), facts)
    rec.details.update(name=name, directory=t.directory, format=fmt.name, bytes=meta["size"])
    return f"{t.directory} → {st.path(name)} ({fmt.name}, {human_size(meta['size'])})"


def _refuse_base_in_use(box: Box, st: store_mod.ImageStore, name: str) -> None:
    users = qcow2.bases_in_use(box.cfg).get(os.path.realpath(st.path(name)))
    if users:
        raise StateError(f"image '{name}' is the base of the qcow2 overlay of "
                         f"{', '.join(users)}: storing over it would corrupt "
                         f"{'them' if len(users) > 1 else 'it'}; store under another name")


def store(box: Box, step: Step, rec: StepResult) -> str:
    name = box.req.store_name(box.name)
    assert name is not None
    st = box.store("vmimages")
    store_mod.validate_name(name)
    _refuse_base_in_use(box, st, name)
    mark = incomplete.read(box.cfg, box.need_slot())
    if mark is not None:  # stored as it is (what is there may be wanted), but said
        log.warning("box %s: %s: its filesystem is incomplete, and the image '%s' is what is "
                    "there", box.name, incomplete.describe(mark), safe(name))
    if step.whole:
        return wholedisk.store(box, st, name, rec, _meta(box))
    root = _root(box)
    fmt = for_name(box.req.format or "rsync")
    fmt.check_tree(root, f"box {box.name}: store {name}")
    vfs = os.statvfs(root)
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
    here = mounts.mounted_at(root)
    facts = _meta(box, filesystem=here.fstype if here else None, filesystem_used=used)
    with progress.watch(f"{box.name} store", used):  # facts: what a disk made for it needs
        meta = st.write(name, fmt, functools.partial(_write_paths, fmt, root, ["."], facts),
                        facts)
    rec.details.update(image=name, format=fmt.name, bytes=meta["size"])
    return f"stored as {st.path(name)} ({fmt.name}, {human_size(meta['size'])})"


def restore(box: Box, step: Step, rec: StepResult) -> str:
    slot = box.need_slot()
    name = box.req.restore
    assert name is not None
    proven = box.proven[("image", 0)]  # the plan's verify step came first
    if isinstance(proven.fmt, wholedisk.DiskImageFormat):  # verify chose the whole disk
        before_change(box)  # (wholedisk.verify checks at once: nothing to wait for)
        return wholedisk.restore(box, name, proven, rec)
    st = box.store("vmimages")
    path, fmt = proven.path, proven.fmt
    meta = st.metadata(name)
    size = store_mod.stored_size(meta, path)  # a tree's, without walking it again
    clock = Clock()
    rec.details.update(image=name, format=fmt.name, bytes=size, timings=clock.laps)
    root = _root(box)
    shape = proven.summary or _recorded_shape(meta)
    _check_room(root, shape, name)
    inodes = getattr(shape, "inodes", 0)  # the image's, when known
    choice, needs = None, None
    if not fmt.is_tree:  # reads the filesystem and tries its re-make on a file: changes nothing
        needs = _image_bytes(proven, meta)
        choice = _choose_clear(box, root, needs, inodes)
    clock.lap("prepare")
    checked_beside = proven.check is not None
    before_change(box)  # the image's digest, checked meanwhile: before the slot changes
    if checked_beside:
        clock.lap("digest wait")
        # a signal that came meanwhile (a box of a parallel run: its wait was not where a
        # signal is raised), a fleet job's lease lost meanwhile: stop before the first change
        process.check_cancelled()
        lease.check()
    if choice is not None:
        rec.details["clear"] = choice.as_dict()
    incomplete.write(box.cfg, slot, name)  # durable before anything in the slot changes
    deletion: Optional[trash.Deletion] = None
    try:
        if fmt.is_tree:
            tree.empty_lost_found(root)  # the previous guest's, as a clear leaves it
            with progress.watch(f"{box.name} restore", size), \
                    writeback.pushed_to_disk(root):  # the disk writes during the transfer
                fmt.mirror(path, root)
            clock.lap("transfer")
        else:
            assert choice is not None
            records = worklog.WorkLog.of(box.cfg, slot)
            if choice.method == "mkfs":
                _remake_filesystem(box, choice)
            elif trash.room_for_both(root, needs or 0, inodes):
                # set aside, deleted while the image unpacks
                try:
                    deletion = trash.Deletion(root, records)
                except OSError as exc:
                    if slot.clear != "auto":
                        raise
                    # an immutable or append-only entry (chattr: the guest's root may set it)
                    # cannot be moved: auto's other way, the re-make, does not care
                    choice = _choose_clear(box, root, None)
                    if choice.method != "mkfs":
                        raise
                    choice = dataclasses.replace(choice, why=(
                        f"the old content could not be set aside ({exc.strerror}: "
                        f"{safe(os.path.basename(str(exc.filename)))}): {choice.why}"))
                    rec.details["clear"] = choice.as_dict()
                    _remake_filesystem(box, choice)
            else:
                tree.clear(root)
            clock.lap("clear")
            # the root's owner and mode, not its attributes: the image's "." gives those
            staging = tree.staging_dir(root, "restore", like=root, records=records,
                                       like_xattrs=False)
            with progress.watch(f"{box.name} restore", size), \
                    writeback.pushed_to_disk(root):  # after the clear: mkfs remounts root
                fmt.unpack(path, staging, acl_records=_acl_records(proven))
            tree.leave_out_lost_found(staging)
            staging = tree.named_unlike_its_entries(staging, records)
            if deletion is not None and deletion.in_the_way(staging):
                deletion.wait()
            # "/" takes the archive's "." metadata, times included
            keep = [os.path.basename(deletion.path)] if deletion is not None else []
            if tree.move_into_empty(staging, root, keep) is None:
                tree.merge_contained(staging, root, exact=True)
            times = os.stat(root)
            os.rmdir(staging)  # which changes the mtime of "/" again: put the archive's back
            records.forget(os.path.basename(staging))
            clock.lap("transfer")
            if deletion is not None:
                deletion.wait()  # its rm of the set-aside directory changes "/" too
                rec.details["clear"]["delete_seconds"] = deletion.seconds
                clock.lap("delete")
            os.utime(root, ns=(times.st_atime_ns, times.st_mtime_ns))
        if slot.sourceimage:
            _write_sourceimage(root, name)
        # No sync here: the release (umount) flushes the filesystem before any boot.
    except (VmimError, OSError) as exc:
        cause = exc if isinstance(exc, VmimError) else as_error(exc)
        raise IncompleteError(f"restore of {name}{_full_note(root)}", cause) from None
    finally:
        if deletion is not None:
            deletion.finish_quietly()
    incomplete.remove(box.cfg, slot)
    how = "mirrored" if choice is None else \
        f"unpacked after clearing ({choice.method}): {choice.why}"
    return f"{name} ({fmt.name}) {how}"


def _acl_records(proven: Proven) -> bool:
    """Whether the image may hold ACL records of its own (Summary.acl_records): as its full
    read found. An image proven by the digest this tool recorded is one it wrote, with every
    ACL an attribute too (vmim.archive.tar.CREATE, since 1.0), which --xattrs applies."""
    return proven.summary is not None and proven.summary.acl_records


def _write_sourceimage(root: str, name: str) -> None:
    """/sourceimage holding the image name, written inside the guest only: whatever the image
    put there (a symlink to a host path, say) is replaced, never followed. A directory there
    is the image's content: kept, and the name not written (a warning: the restore itself is
    complete, and failing now would leave the slot cleared for a marker)."""
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            if stat.S_ISDIR(os.lstat("sourceimage", dir_fd=dfd).st_mode):
                log.warning("the image %s has a directory at /sourceimage: kept, and the image "
                            "name not written there (set sourceimage = false for this slot)",
                            safe(name))
                return
            os.unlink("sourceimage", dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open("sourceimage", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=dfd)
        with os.fdopen(fd, "w") as fh:
            fh.write(name + "\n")
    finally:
        os.close(dfd)


def insert(box: Box, step: Step, rec: StepResult) -> str:
    root = _root(box)
    t = box.req.inserts[step.item]
    proven = box.proven[("insert", step.item)]
    records = worklog.WorkLog.of(box.cfg, box.need_slot())
    staging = tree.staging_dir(root, "insert", records=records)
    try:
        tree.prepare_contained(staging, root, t.directory)
        proven.fmt.unpack(proven.path, staging)
        n = tree.merge_contained(staging, root, t.directory, remove_staging=True)
    finally:
        tree.remove_staging(staging, records)
    rec.details.update(name=t.name, directory=t.directory, format=proven.fmt.name)
    return f"{t.name} ({proven.fmt.name}) at {t.directory}: {n} {'entry' if n == 1 else 'entries'}"


def _image_bytes(proven: Proven, meta: Optional[Dict[str, Any]]) -> Optional[int]:
    """What the image's tree takes, for the room beside the old content: the larger of what
    a full-read proof read from it (a lower bound: a sparse file's data is not counted) and
    what the filesystem it was stored from used (the metadata of stores after 1.0.0 records
    it); None when neither is known (an image proven by the digest of an older store)."""
    needs = getattr(proven.summary, "needs_bytes", None) or 0
    return max(int(needs), _count((meta or {}).get("filesystem_used"))) or None


def _count(value: Any) -> int:
    """A count the image's metadata records (a JSON file of the store: any value): itself
    when it is a positive integer, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


#: auto deletes beside the unpack only an old content of at most this many inodes: the `rm`
#: of many files slows the unpack down more than a re-make costs (bench/restore.py,
#: docs/performance.md: 13,613 inodes of Debian 12, deleted beside: 2.39 s against 2.70 s
#: re-made; 55,945 of the corpus: 8.93 s against 6.97 s for tar.zst)
DELETE_BESIDE_INODES = 32768


def _choose_clear(box: Box, root: str, needs_bytes: Optional[int],
                  needs_inodes: int = 0) -> remake.Choice:
    """How this restore clears the slot: the slot's clear; for auto, the delete beside the
    unpack when the filesystem has room for both trees (known to, as the size of the image's
    tree is known; its inodes too, when they are) and the old content is small
    (DELETE_BESIDE_INODES), else the re-make when the same filesystem can be made
    (vmim.disk.remake reads it and tries), else the delete."""
    slot = box.need_slot()
    # what an interrupted run left in the guest and the mount could not remove (immutable
    # entries, chattr): a delete would fail on it again, the re-make does not
    pinned = bool(worklog.WorkLog.of(box.cfg, slot).stale(root))
    if slot.clear == "auto" and needs_bytes is not None and not pinned and \
            trash.room_for_both(root, needs_bytes, needs_inodes):
        vfs = os.statvfs(root)
        inodes = vfs.f_files - vfs.f_ffree
        if inodes <= DELETE_BESIDE_INODES:
            return remake.Choice("delete", f"auto: {inodes} inodes to delete, and room for the "
                                 "image beside them: deleted while the image unpacks")
    here = mounts.mounted_at(slot.mount)
    assert here is not None
    fs = disk_mod.probe_filesystem(here.source, f"box '{slot.name}'")
    return remake.choose(slot.clear, here.source, fs, slot.mount)


def _remake_filesystem(box: Box, choice: remake.Choice) -> None:
    """Make the filesystem anew: the same one, or (clear = "mkfs" where it cannot be the
    same) the type's defaults with the same type, UUID and label."""
    slot = box.need_slot()
    here = mounts.mounted_at(slot.mount)
    assert here is not None
    device = here.source
    fs = disk_mod.probe_filesystem(device, f"box '{slot.name}'")
    how = remake.how(choice, fs)
    # killed from the unmount until the re-made filesystem is mounted, the slot may hold no
    # filesystem: the next restore runs the recorded re-make again (vmim.steps.mount)
    incomplete.write_remake(box.cfg, slot, remake.to_record(how), disk_mod.device_size(device))
    try:
        mounts.umount(slot.mount, release_hint=release_command(slot.name))
    except BaseException:
        incomplete.remove_remake(box.cfg, slot)  # still mounted: nothing was re-made
        raise
    remake.remake(how, device)
    # ext4 would otherwise zero its inode tables in the background during the restore;
    # with noinit_itable that waits for the next mount (the guest's).
    options = [*fs.mount_options, *(["noinit_itable"] if fs.type == "ext4" else [])]
    mounts.mount(device, slot.mount, fs.type, options)
    incomplete.remove_remake(box.cfg, slot)


def _check_room(root: str, summary: Any, name: str) -> None:
    """Refuse, before the slot is cleared, an image whose data cannot fit in the filesystem
    even when it is empty, or that the filesystem or the kernel would refuse on the way
    (vmim.archive.fits): known when the image's structure was read."""
    here = mounts.mounted_at(root)
    fits.check(root, here.fstype if here else "", summary, name)
    needs = getattr(summary, "needs_bytes", None)
    if not needs:
        return
    st = os.statvfs(root)
    size = st.f_blocks * st.f_frsize
    what = "the slot's whole filesystem"
    if not _reserve_usable(here):
        size -= (st.f_bfree - st.f_bavail) * st.f_frsize
        what = ("what the unpack may write of the slot's filesystem (not the blocks it "
                "reserves for another user than root, without CAP_SYS_RESOURCE in this host's "
                "capability bounding set)")
    if needs > size:
        raise StateError(f"image '{name}' holds {human_size(needs)} of data, more than "
                         f"{what} ({human_size(size)}); the slot was not touched")


def _reserve_usable(here: Optional[mounts.Mount]) -> bool:
    """Whether the unpack (root, in the sandbox) may write the blocks ext2/3/4 reserves:
    with CAP_SYS_RESOURCE, or as the reserve's user (resuid: 0 unless the filesystem names
    another, which mountinfo shows as resuid=N). (A resgid root is in is not looked at: a
    refusal on the safe side.)"""
    if sandbox.keeps("CAP_SYS_RESOURCE") or here is None:
        return True
    ids = dict(o.split("=", 1) for o in here.super_options if "=" in o)
    return ids.get("resuid", "0") == "0"


def _recorded_shape(meta: Optional[Dict[str, Any]]) -> Optional[Summary]:
    """What an image proven by its digest must fit, as its store recorded it (the "shape" of
    the tree GNU tar archived: its inodes, names per file, symlink targets and bytes of file
    data; of the tree a cpio store surveyed: the same but the bytes, and name components):
    checked before the clear as a full read's is. None when the store recorded none (an older
    one, a tree)."""
    shape = (meta or {}).get("shape")
    if not isinstance(shape, dict):
        return None

    data = shape.get("data")
    return Summary(0, _count(data) if isinstance(data, int) else None,
                   inodes=_count(shape.get("inodes")),
                   longest_component=_count(shape.get("longest_component")),
                   most_links=_count(shape.get("most_links")) or 1,
                   longest_symlink=_count(shape.get("longest_symlink")))


def _full_note(root: str) -> str:
    """' (the slot's filesystem is full)' when it is, so a disk-full failure says so."""
    try:
        st = os.statvfs(root)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (the slot's filesystem is full: {human_size(free)} free)" \
        if free < 4 * 1024 * 1024 else ""

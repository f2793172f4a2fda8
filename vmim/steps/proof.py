"""The verify step: prove the images and inserts of a run restorable before the slot is
touched — by the digest this tool recorded when it stored them, else by a full read of their
structure. The digest of the image to restore is checked in a thread of its own while the
slot is mapped and mounted and its clear chosen (prove(later=True)); confirm() has its answer
before anything changes (vmim.runner.BESIDE_THE_CHECK)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from vmim import digest, process
from vmim import store as store_mod
from vmim.archive import detect, for_detected
from vmim.errors import StateError
from vmim.plan import Step
from vmim.recorder import StepResult
from vmim.steps import Box, Proven, wholedisk


def verify(box: Box, step: Step, rec: StepResult) -> str:
    """Prove the image and the inserts restorable: nothing of the slot is touched before."""
    done = []
    if box.req.restore is not None:
        name = box.req.restore
        st = box.store("vmimages")
        if step.whole:  # as the plan decided from what it observed
            box.proven[("image", 0)] = wholedisk.verify(box, st, name)
        else:
            # as the plan says (Step.beside): its digest is checked while the slot is mapped,
            # mounted and its clear chosen
            box.proven[("image", 0)] = prove(st, name, later=step.beside)
        done.append(_how(name, box.proven[("image", 0)]))
    if box.req.inserts:
        st = box.store("vminserts")
        for i, t in enumerate(box.req.inserts):
            box.proven[("insert", i)] = prove(st, t.name)
            done.append(_how(t.name, box.proven[("insert", i)]))
    return "; ".join(done)


def _how(name: str, p: Proven) -> str:
    if isinstance(p.fmt, wholedisk.DiskImageFormat):
        return f"{name} ({p.fmt.name}): " + ("qemu-img check" if p.fmt.name == "qcow2" else
                                             "a raw disk image: nothing to check")
    if p.summary is not None:
        return f"{name} ({p.fmt.name}): read to its end, {p.summary.members} members"
    if p.check is not None:
        return f"{name} ({p.fmt.name}): checksum, checked beside the mount"
    return f"{name} ({p.fmt.name}): checksum"


def prove(st: store_mod.ImageStore, name: str, later: bool = False) -> Proven:
    """Find, detect and prove an image restorable: by the digest this tool recorded, else by a
    full read of its structure (StateError, exit 4, when it is not). With later, an image
    whose metadata says what it is and carries a digest this host checks is returned with the
    check still running (Proven.check): confirm() waits for it before the slot changes."""
    meta = st.metadata(name)
    if later:
        pending = _pending_proof(st, name, meta)
        if pending is not None:
            return pending
    proven = _proven_by_record(st.find(name), meta)
    if proven is not None:
        (path, found), checked = proven, True
    else:
        path, found = find_usable(st, name)
        # by the digest this tool recorded (BLAKE3, or a 1.0 image's sha256) when this host
        # can check it; a mismatch is exit 4 with the slot untouched
        checked = digest.check_recorded(path, meta, f"{st.kind} '{name}'")
    fmt = _unpackable(st, name, found)
    return Proven(path, fmt, None if checked else fmt.verify(path))


def _unpackable(st: store_mod.ImageStore, name: str, found: detect.Detected) -> Any:
    """The archive format of what was found, its unpack tools installed (exit 7 if not)."""
    fmt = for_detected(found, f"{st.kind} '{name}'")
    for tool in fmt.unpack_tools():
        process.require_tool(tool, f"it is needed to unpack {st.kind} '{name}' ({fmt.name}); "
                             "the slot was not touched")
    return fmt


def _by_record(path: str, meta: Optional[Dict[str, Any]]
               ) -> Optional[Tuple[detect.Detected, Tuple[str, str]]]:
    """For an archive this tool stored (a file whose metadata still describes it, names its
    format and carries a digest this host checks): what the metadata says it is, and that
    digest (algorithm, hex). None otherwise."""
    found = detect.recorded((meta or {}).get("format"))
    checkable = digest.recorded(meta)
    if found is None or checkable is None or os.path.isdir(path):
        return None
    return found, checkable


def _proven_by_record(path: str, meta: Optional[Dict[str, Any]]
                      ) -> Optional[Tuple[str, detect.Detected]]:
    """An archive this tool stored, whose recorded digest matches: its path and what its
    metadata says it is, without asking libmagic (0.02-0.04 s of a restore). None otherwise:
    then it is detected and proven as any image (a digest that differs says so there)."""
    record = _by_record(path, meta)
    if record is None:
        return None
    found, (algorithm, expected) = record
    if digest.of_file(path, algorithm) != expected:
        return None
    return path, found


def _pending_proof(st: store_mod.ImageStore, name: str,
                   meta: Optional[Dict[str, Any]]) -> Optional[Proven]:
    path = st.find(name)
    record = _by_record(path, meta)
    if record is None:
        return None
    return Proven(path, _unpackable(st, name, record[0]), check=digest.Check(path, *record[1]))


def confirm(box: Box) -> None:
    """Wait for the digest checks still running (prove(later=True)): before anything changes
    the slot or its domain, every image is proven. One that did not match is proven again
    the slow way, which says why it fails (StateError, exit 4). One that proves now was
    replaced meanwhile (a store of the same name): what was prepared for it does not hold,
    and the run stops (StateError) before it changes anything."""
    for key, p in list(box.proven.items()):
        if p.check is None:
            continue
        ok = p.check.matches()  # a signal here: the check stays, for call_off_checks()
        box.proven[key] = dataclasses.replace(p, check=None)  # a second call: no wait
        if ok:
            continue
        kind = "vmimages" if key[0] == "image" else "vminserts"
        name = box.req.restore if key[0] == "image" else box.req.inserts[key[1]].name
        assert name is not None
        st = box.store(kind)
        prove(st, name)  # StateError when it is corrupt, saying how
        raise StateError(f"{st.kind} '{name}' changed while the run prepared its restore "
                         "(stored again meanwhile?); the slot was not changed: run again")


def before_change(box: Box) -> None:
    """What comes before the run's first change of the slot or its domain: every image
    proven (confirm), then box.on_change (once)."""
    confirm(box)
    hook, box.on_change = box.on_change, None
    if hook is not None:
        hook()


def planned_format(st: store_mod.ImageStore, name: str) -> Tuple[str, bool]:
    """The format the plan shows and decides by (vmim.observe): for an archive this tool
    stored, whose metadata still describes the file and carries a digest this host checks,
    the format it recorded, without asking libmagic (0.1 s of every restore); the verify step
    then proves it by that digest (what libmagic would see of a damaged start, the digest
    sees too). Else what find_usable() finds, with its refusals. With it: whether the verify
    step proves it by that digest (prove(later=True) can check it beside the mount)."""
    meta = st.metadata(name)
    record = _by_record(st.find(name), meta) if meta else None
    if record is not None:
        return record[0].format, True
    return find_usable(st, name)[1].format, False


def find_usable(st: store_mod.ImageStore, name: str) -> Tuple[str, detect.Detected]:
    """The path of an image or insert and what it is; StateError (exit 4) naming similar names
    when it is missing, and saying what it is when it is not an image this tool unpacks."""
    path = st.find(name)
    found = detect.detect(path)
    meta = (st.metadata(name) if not found.known else None) or {}
    recorded = digest.recorded(meta)
    if recorded:
        algorithm = recorded[0]
        raise StateError(f"{st.kind} '{name}' is corrupt: its {algorithm} digest differs from "
                         "the one recorded when it was stored (it no longer reads as the "
                         f"{meta.get('format')} it was: {found.description}); the slot was not "
                         "touched")
    if not found.known and found.compression:
        raise StateError(f"{st.kind} '{name}' in {st.directory} is corrupt or truncated: "
                         f"{found.compression} data whose start cannot be read "
                         f"({found.description})")
    if not found.known:
        raise StateError(f"{st.kind} '{name}' in {st.directory} is not an image "
                         f"vmimagemanager can use ({found.description})")
    for_detected(found, f"{st.kind} '{name}'")  # a disk image is not unpacked: exit 4 here too
    return path, found

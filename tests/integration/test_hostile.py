"""Generated hostile archives against hostile guests (hypothesis).

Every example builds a guest root holding the traps real guests hold (absolute symlinks, a
symlink to a host directory, `..` links, option-like names), then restores or inserts a
generated tar or cpio archive through the code the real run uses: detection, the proof of the
image (verify), the unpack into a staging directory and the merge into the guest. After each
example nothing outside the guest root may have changed, and any failure must be one of the
tool's own errors (a clear message and an exit code), never a crash.

Root: unpacking keeps owners and device nodes. The guest root is a plain directory here (the
mount is not what is under attack); test_images.py and test_trust.py run the same through the
command line on mounted slots.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from typing import Dict, List, Tuple

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (make test "
                                 "installs it with the test extras)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.archives import newc_of, tar_of  # noqa: E402
from vmim import tree, worklog  # noqa: E402
from vmim.archive import detect, for_detected  # noqa: E402
from vmim.errors import VmimError  # noqa: E402

COMPONENTS = ["a", "b", "etc", "passwd", "..", ".", "-rf", "--delete", "-fprint", "lnk", "up",
              "abs", "var", "run", "x y", "\u00e9", "evil"]


def _name_strategy():
    parts = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4)
    return st.tuples(st.booleans(), parts).map(lambda t: ("/" if t[0] else "") + "/".join(t[1]))


def _member_strategy(host: str):
    targets = st.sampled_from([host, f"{host}/file", "/etc", "/run", "..", "../..", "../../..",
                               "a", "/", "etc/passwd", "lnk/file"])
    return st.one_of(
        st.tuples(st.just("file"), _name_strategy(), st.binary(max_size=64)),
        st.tuples(st.just("dir"), _name_strategy(), st.just(b"")),
        st.tuples(st.just("symlink"), _name_strategy(), targets.map(str.encode)),
        st.tuples(st.just("hardlink"), _name_strategy(),
                  st.one_of(_name_strategy(), targets).map(str.encode)),
    )


Member = Tuple[str, str, bytes]


def _tar(members: List[Member]) -> bytes:
    return tar_of((name, kind, extra) for kind, name, extra in members)


def _newc(members: List[Member]) -> bytes:
    entries = []
    for ino, (kind, name, extra) in enumerate(members, 1):
        raw = name.encode()
        if kind == "file":
            entries.append((ino, stat.S_IFREG | 0o644, 1, raw, extra))
        elif kind == "dir":
            entries.append((ino, stat.S_IFDIR | 0o755, 2, raw, b""))
        elif kind == "symlink":
            entries.append((ino, stat.S_IFLNK | 0o777, 1, raw, extra))
        else:  # cpio has no link member: two names with one inode, the data with the last
            entries.append((1000 + ino, stat.S_IFREG | 0o644, 2, raw, b""))
            entries.append((1000 + ino, stat.S_IFREG | 0o644, 2, extra, b"linked\n"))
    return newc_of(entries)


def _snapshot(top: str, skip: str) -> Dict[str, Tuple[int, str]]:
    """Everything below top except skip: path -> (mode, content digest or link target)."""
    snap: Dict[str, Tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == skip or dirpath.startswith(skip + "/"):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if p == skip:
                continue
            s = os.lstat(p)
            if stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                with open(p, "rb") as fh:
                    what = hashlib.sha256(fh.read()).hexdigest()
            else:
                what = ""
            snap[p] = (s.st_mode, what)
    return snap


def _hostile_guest(root: str, host: str, layout: str) -> None:
    if layout == "etc symlinked to a host path":
        os.symlink(host, os.path.join(root, "etc"))  # the guest's /etc -> the host's directory
        os.makedirs(root + host)  # which exists inside the guest too
        with open(os.path.join(root + host, "passwd"), "w") as fh:
            fh.write("root:x:0:0::/root:/bin/sh\n")
    else:
        os.makedirs(os.path.join(root, "etc"))
        with open(os.path.join(root, "etc", "passwd"), "w") as fh:
            fh.write("root:x:0:0::/root:/bin/sh\n")
    os.makedirs(os.path.join(root, "var"), exist_ok=True)  # host may be under /var/tmp
    os.symlink("/run", os.path.join(root, "var", "run"))  # absolute: the guest's /run
    os.symlink(host, os.path.join(root, "lnk"))  # absolute, naming a real host directory
    os.symlink("../../..", os.path.join(root, "up"))
    os.symlink("/etc", os.path.join(root, "abs"))
    os.makedirs(os.path.join(root, "-rf"))
    os.makedirs(os.path.join(root, "--delete"))


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """A host directory with a canary (what a guest symlink names) beside the guests."""
    top = tmp_path_factory.mktemp("arena")
    host = top / "host"
    host.mkdir()
    (host / "file").write_text("host file\n")
    (top / "etc").mkdir()  # where a `..` escape from a guest would land
    return top


def _attempt(top, kind: str, how: str, layout: str, members: List[Member]) -> None:
    host = str(top / "host")
    guest = str(top / "guest")
    store = top / "store"
    shutil.rmtree(guest, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    os.makedirs(guest)
    store.mkdir()
    _hostile_guest(guest, host, layout)
    image = store / "image"
    image.write_bytes(_tar(members) if kind == "tar" else _newc(members))
    before = _snapshot(str(top), guest)
    cwd_before = sorted(os.listdir("."))
    try:
        found = detect.detect(str(image))
        fmt = for_detected(found, "the image")
        fmt.verify(str(image))
        if how == "restore":
            tree.clear(guest)
        dest = "/" if how == "restore" else "/lnk/sub"
        records = worklog.WorkLog(f"{top}-state", "hostile", guest)  # outside the snapshot
        staging = tree.staging_dir(guest, how, records=records)  # as steps/data.py
        try:
            tree.prepare_contained(staging, guest, dest)
            fmt.unpack(str(image), staging)
            if how == "restore":
                tree.leave_out_lost_found(staging)
            tree.merge_contained(staging, guest, dest)
        finally:
            tree.remove_staging(staging, records)
    except VmimError:
        pass  # refused or failed cleanly: what matters is below
    after = _snapshot(str(top), guest)
    after.pop(str(image), None)
    before.pop(str(image), None)
    assert after == before, "something outside the guest changed"
    assert (top / "host" / "file").read_text() == "host file\n"
    assert sorted(os.listdir(".")) == cwd_before
    assert not any(n.startswith(".vmim-") for n in os.listdir(guest))  # no staging left




def _members_for(top) -> st.SearchStrategy:
    return st.lists(_member_strategy(str(top / "host")), min_size=1, max_size=8)


@pytest.mark.parametrize("layout", ["plain", "etc symlinked to a host path"])
@pytest.mark.parametrize("how", ["restore", "insert"])
@pytest.mark.parametrize("kind", ["tar", "cpio"])
def test_generated_hostile_archives_change_nothing_outside_the_guest(arena, kind, how, layout,
                                                                     monkeypatch):
    monkeypatch.chdir(arena / "etc")  # a relative write would show here

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(members=_members_for(arena))
    def attack(members):
        _attempt(arena, kind, how, layout, members)

    attack()


def test_the_attack_rig_sees_an_escape(arena, monkeypatch):
    """The check above can fail: GNU cpio, which 1.0's insert path did not use but many tools
    do, follows a symlink member and writes outside; the same snapshot sees it."""
    monkeypatch.chdir(arena / "etc")
    guest = arena / "guest-gnu-cpio"
    shutil.rmtree(guest, ignore_errors=True)
    guest.mkdir()
    before = _snapshot(str(arena), str(guest))
    data = _newc([("symlink", "escape", str(arena / "host").encode()),
                  ("file", "escape/planted", b"pwned\n")])
    subprocess.run(["cpio", "-i", "--quiet", "-d"], cwd=guest, input=data, check=False,
                   capture_output=True)
    after = _snapshot(str(arena), str(guest))
    try:
        assert after != before and (arena / "host" / "planted").exists()
    finally:
        if (arena / "host" / "planted").exists():
            os.unlink(arena / "host" / "planted")
        shutil.rmtree(guest)

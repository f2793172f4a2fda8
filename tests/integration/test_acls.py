"""POSIX ACLs through a tar restore, whichever way the archive carries them: as GNU tar's ACL
records (--acls), as system.posix_acl_* attributes (--xattrs), or both (what this tool
writes). The unpack leaves --acls out only where it changes nothing: no member has an ACL
record and the directory it unpacks into has no ACL to pass on."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from tests.integration import diskimages as di

MiB = 1024 * 1024
ACL_ATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def acls(path):
    """The ACL attributes of path, as raw values (None: none)."""
    out = {}
    for name in ACL_ATTRS:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            out[name] = None
    return out


@pytest.fixture
def slot(tmp_path, root_slot):
    """An ext4 root_slot; a source tree with an access ACL on a file and a default ACL on a
    directory; image(name, *flags) puts a tar.zst of it, made by GNU tar, in the store."""
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "f").write_text("acl\n")
    (src / "plain").write_text("plain\n")
    os.chmod(src / "f", 0o640)
    di.run("setfacl", "-m", "u:65534:rw,g:65534:r", str(src / "f"))
    di.run("setfacl", "-d", "-m", "u:65534:rwx", str(src / "shared"))
    root_slot.make(64, ["mkfs.ext4", "-q", "-F"])
    root_slot.source = str(src)

    def image(name, *flags, root=None):
        tar = subprocess.run(["tar", "--create", "--file=-", "--format=posix", *flags,
                              "-C", root or str(src), "."],
                             check=True, capture_output=True).stdout
        with open(root_slot.images / name, "wb") as fh:
            fh.write(subprocess.run(["zstd", "-q", "-c"], input=tar, check=True,
                                    capture_output=True).stdout)

    root_slot.image = image
    return root_slot


def restored(vmim, slot, cfg, image):
    r = vmim("--config", cfg, "-b", slot.box, "-r", image, "--mount")
    assert r.code == 0, r
    return slot.mnt


@pytest.mark.parametrize("carried", {
    "attributes": ["--xattrs", "--xattrs-include=*"],
    "both, as this tool writes": ["--acls", "--xattrs", "--xattrs-include=*"],
}.items(), ids=lambda c: c[0])
def test_acls_come_back_whichever_way_the_archive_carries_them(vmim, slot, carried):
    slot.image("golden", *carried[1])
    root = restored(vmim, slot, slot.config(), "golden")
    for rel in ("f", "shared", "plain"):
        assert acls(os.path.join(root, rel)) == acls(os.path.join(slot.source, rel)), rel
    assert acls(os.path.join(root, "f"))["system.posix_acl_access"] is not None
    assert acls(os.path.join(root, "shared"))["system.posix_acl_default"] is not None


def test_acls_of_an_image_this_tool_stored_come_back_without_a_full_read(vmim, slot):
    """Proven by its recorded digest (no full read, so no listing): its ACLs are attributes."""
    cfg = slot.config()
    slot.image("golden", "--acls", "--xattrs", "--xattrs-include=*")
    restored(vmim, slot, cfg, "golden")
    r = vmim("--config", cfg, "-b", slot.box, "--zstd", "-s", "mine", "--json")
    assert r.code == 0, r
    r = vmim("--config", cfg, "-b", slot.box, "-r", "mine", "--mount", "--json")
    assert r.code == 0, r
    verify = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "verify")
    assert ": checksum" in verify["message"], verify
    for rel in ("f", "shared", "plain"):
        assert acls(os.path.join(slot.mnt, rel)) == acls(os.path.join(slot.source, rel)), rel


def test_an_acl_record_the_sandbox_cannot_resolve_is_said_not_dropped_silently(vmim, slot):
    """GNU tar's ACL records name users and groups ("user:nobody:rw-"); the unpack runs where
    no user database is (the sandbox), so such an entry cannot be made: GNU tar warns and
    exits 0 — the warning reaches the admin."""
    slot.image("golden", "--acls")
    r = vmim("--config", slot.config(), "-b", slot.box, "-r", "golden", "--mount")
    assert r.code == 0, r
    assert "Cannot acl_from_text" in r.err and "./f" in r.err, r.err
    assert f"warning: box {slot.box}: tar: " in r.err, r.err  # which slot, with -j too


def test_a_root_with_a_default_acl_passes_nothing_on_to_an_image_without_acls(vmim, slot,
                                                                             tmp_path):
    """clear = delete keeps the slot's root directory: a default ACL left on it by the
    previous image must not reach the members of an image that has none."""
    bare = tmp_path / "bare"
    (bare / "dir").mkdir(parents=True)
    (bare / "dir" / "file").write_text("x\n")
    slot.image("noacl", "--acls", "--xattrs", "--xattrs-include=*", root=str(bare))
    cfg = slot.config(clear="delete")
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    di.run("setfacl", "-d", "-m", "u:65534:rwx", slot.mnt)
    root = restored(vmim, slot, cfg, "noacl")
    for rel in ("dir", "dir/file"):
        assert acls(os.path.join(root, rel)) == {n: None for n in ACL_ATTRS}, rel


@pytest.mark.parametrize("clear,way", [("delete", "renamed"), ("delete", "merged"),
                                       ("mkfs", "renamed")])
def test_the_restored_root_has_the_attributes_of_the_images_root_and_no_others(
        vmim, slot, tmp_path, clear, way):
    """The slot's root directory, kept by clear = delete, had an attribute and a default ACL
    of the previous image: a restore leaves it with those of the image's "." only, as a
    re-made filesystem does (the staging directory used to start as a copy of the root's
    attributes, and the copy back only added)."""
    bare = tmp_path / "bare"
    (bare / "dir").mkdir(parents=True)
    if way == "merged":  # a name the root holds already: the sandboxed merge, not renames
        (bare / "lost+found").mkdir()
    os.setxattr(bare, "user.image", b"new")
    slot.image("bare", "--acls", "--xattrs", "--xattrs-include=*", root=str(bare))
    cfg = slot.config(clear=clear)
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    os.setxattr(slot.mnt, "user.previous", b"old")
    di.run("setfacl", "-d", "-m", "u:65534:rwx", slot.mnt)
    root = restored(vmim, slot, cfg, "bare")
    assert sorted(os.listxattr(root)) == ["user.image"]
    assert os.getxattr(root, "user.image") == b"new"
    assert acls(root) == {n: None for n in ACL_ATTRS}


@pytest.mark.parametrize("clear", ["delete", None])
def test_a_default_acl_the_guest_left_on_the_root_reaches_no_file_of_a_cpio_image(
        vmim, slot, tmp_path, clear):
    """The staging directory is made inside the slot's root: the kernel gives it the root's
    default ACL, and a cpio image (no ACLs) would pass it on to every file — the previous
    guest's user reading the new system's /etc/shadow. With clear = delete (which keeps the
    root), and with auto."""
    bare = tmp_path / "bare"
    (bare / "etc").mkdir(parents=True)
    (bare / "etc" / "shadow").write_text("root:x:\n")
    os.chmod(bare / "etc" / "shadow", 0o640)
    names = subprocess.run(["find", "."], cwd=bare, check=True, capture_output=True).stdout
    newc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=bare, input=names,
                          check=True, capture_output=True).stdout
    (slot.images / "sys").write_bytes(subprocess.run(["bzip2", "-c"], input=newc, check=True,
                                                     capture_output=True).stdout)
    image = "sys"
    cfg = slot.config(clear=clear)
    if clear is None:
        # auto deletes beside the unpack when the image's size is known and both fit: an
        # image this tool stored (its size recorded), on a filesystem with room for both
        slot.make(400, ["mkfs.ext4", "-q", "-F"])
        for argv in (["-r", "sys", "--mount"], ["-w", "-s", "mine"]):
            r = vmim("--config", cfg, "-b", slot.box, *argv)
            assert r.code == 0, r
        image = "mine"
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    di.run("setfacl", "-d", "-m", "u:65534:rwx", slot.mnt)
    r = vmim("--config", cfg, "-b", slot.box, "-r", image, "--mount", "--json")
    assert r.code == 0, r
    step = next(s for s in json.loads(r.out)["results"][0]["steps"] if s["step"] == "restore")
    assert step["clear"]["method"] == "delete", step
    for rel in ("etc", "etc/shadow"):
        assert acls(os.path.join(slot.mnt, rel)) == {n: None for n in ACL_ATTRS}, rel
    assert acls(slot.mnt) == {n: None for n in ACL_ATTRS}
    assert stat.S_IMODE(os.stat(os.path.join(slot.mnt, "etc", "shadow")).st_mode) == 0o640


def test_an_insert_takes_the_acl_of_its_target_not_the_one_the_root_passes_on(vmim, slot,
                                                                              tmp_path):
    """The insert's staging directory is made at the guest root (the root's default ACL given
    by the kernel): what it unpacks into /opt (-i app:/opt) must come out as if made in /opt.
    (An insert at / whose members go below an existing directory still takes the root's:
    its new directories are made in the staging directory, not in the guest's.)"""
    inserts = tmp_path / "inserts"
    inserts.mkdir()
    bare = tmp_path / "bare"
    (bare / "app").mkdir(parents=True)
    (bare / "app" / "conf").write_text("x\n")
    names = subprocess.run(["find", "."], cwd=bare, check=True, capture_output=True).stdout
    newc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=bare, input=names,
                          check=True, capture_output=True).stdout
    (inserts / "app").write_bytes(subprocess.run(["bzip2", "-c"], input=newc, check=True,
                                                 capture_output=True).stdout)
    cfg = slot.config()
    with open(cfg, "a") as fh:
        fh.write(f'vminserts = "{inserts}"\n')
    r = vmim("--config", cfg, "-b", slot.box, "--mount")
    assert r.code == 0, r
    os.mkdir(os.path.join(slot.mnt, "opt"))
    di.run("setfacl", "-d", "-m", "u:65534:rwx", slot.mnt)
    r = vmim("--config", cfg, "-b", slot.box, "-i", "app:/opt", "--mount")
    assert r.code == 0, r
    for rel in ("opt/app", "opt/app/conf"):
        assert acls(os.path.join(slot.mnt, rel)) == {n: None for n in ACL_ATTRS}, rel

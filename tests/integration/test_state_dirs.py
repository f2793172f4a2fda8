"""Root-owned state only in root-owned directories, through the command line: a lock or state
directory another user made or can write stops every box action (exit 7), and nothing is
written through what that user planted there."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

from tests.integration import test_images
from tests.integration.test_images import run_ok
from tests.unit.test_safedir import as_nobody
from vmim.disk import loop, mounts

# the slots of the images tier
blank_images, rig = test_images.blank_images, test_images.rig


def _public(rig):
    """A root-owned sticky directory every user may write, like /run/lock; and a root file."""
    public = rig.root / "run-lock"
    public.mkdir()
    os.chmod(public, 0o1777)
    victim = rig.root / "victim"
    victim.write_text("precious\n")
    return public, victim


def _set(rig, key, value):
    text = open(rig.cfg).read()
    old = next(line for line in text.splitlines() if line.startswith(f"{key} = "))
    open(rig.cfg, "w").write(text.replace(old, f'{key} = "{value}"'))


def test_a_lock_directory_a_user_made_first_stops_every_box_action(vmim, rig):
    """Finding 6: the user makes the (then default) lock directory first and plants
    <box>.lock -> a file of root's, which root's next run truncated."""
    public, victim = _public(rig)
    box = rig.names["ext4"]
    lockdir = public / "vmimagemanager"
    as_nobody(f"mkdir -m 0755 {lockdir} && ln -s {victim} {lockdir}/{box}.lock")
    _set(rig, "lockdir", lockdir)
    r = vmim("-b", box, "--mount", "--config", rig.cfg)
    assert r.code == 7, r
    assert f"{lockdir} is owned by uid 65534" in r.err and "set lockdir" in r.err
    assert victim.read_text() == "precious\n"
    assert mounts.mounted_at(rig.mnt("ext4")) is None
    assert loop.loops_backed_by(rig.disk("ext4")) == []
    r = vmim("-l", "--config", rig.cfg)  # the lists, which read the locks, refuse too
    assert r.code == 7 and "lock directory" in r.err, r
    # the remedy works: the directory removed, root's own is made and used
    subprocess.run(["rm", "-rf", "--", str(lockdir)], check=True)
    run_ok(vmim, rig, "-b", box, "--mount", "--release")
    assert os.stat(lockdir).st_uid == 0 and os.stat(lockdir).st_mode & 0o022 == 0
    assert not os.path.islink(lockdir / f"{box}.lock")


def test_a_lock_directory_others_can_write_is_refused_with_the_remedy(vmim, rig):
    lockdir = rig.root / "locks"
    lockdir.mkdir()
    os.chmod(lockdir, 0o777)
    r = vmim("-b", rig.names["ext4"], "--mount", "--config", rig.cfg)
    assert r.code == 7, r
    assert f"chmod go-w {lockdir}" in r.err and "writable by others" in r.err
    assert os.listdir(lockdir) == []
    assert mounts.mounted_at(rig.mnt("ext4")) is None


def test_a_state_directory_a_user_made_stops_a_restore_before_the_slot_is_touched(vmim, rig):
    """A user who can write the state directory can remove the mark of a half-written slot,
    or plant a symlink for the mark to be written through."""
    public, victim = _public(rig)
    box = rig.names["ext4"]
    (rig.images / "good").write_bytes(_tgz({"marker": b"good\n"}))
    statedir = public / "state"
    as_nobody(f"mkdir -m 0777 {statedir} && ln -s {victim} {statedir}/{box}.incomplete")
    safe = open(rig.cfg).read()
    _set(rig, "statedir", statedir)
    r = vmim("-b", box, "-r", "good", "--config", rig.cfg)
    assert r.code == 7, r
    assert "state directory" in r.err and "set statedir" in r.err
    assert victim.read_text() == "precious\n"
    assert mounts.mounted_at(rig.mnt("ext4")) is None
    open(rig.cfg, "w").write(safe)
    run_ok(vmim, rig, "-b", box, "--mount")
    assert open(os.path.join(rig.mnt("ext4"), "marker")).read() == "ext4 slot\n"  # untouched
    run_ok(vmim, rig, "-b", box, "--release")


def _tgz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

"""The guest's tree seen from the host: what the tool leaves at the guest root, and only that.

A staging directory is the tool's when the host's record (vmim.worklog, in the state directory)
says so: name, inode and generation, made by a run that has ended. Nothing the guest can write
(a name, an xattr) makes an entry the tool's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vmim import tree, worklog

#: removals run rm in the sandbox of guest data (bwrap, as root: vmim.sandbox)
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the removal of staging directories "
                                "runs rm in the sandbox of guest data (bwrap, root)")


@pytest.fixture
def guest(tmp_path):
    g = tmp_path / "guest"
    g.mkdir()
    return g


@pytest.fixture
def log(tmp_path):
    return worklog.WorkLog(str(tmp_path / "state"), "web1", "/dev/vdb-of-web1")


def _records(log):
    d = os.path.join(log.statedir, "staging", "web1")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _killed_run_staging(guest, log, what="insert"):
    """What a run killed (SIGKILL) while it unpacked leaves: its staging, half full, recorded."""
    code = textwrap.dedent(f"""
        import os, signal
        from vmim import tree, worklog
        log = worklog.WorkLog({log.statedir!r}, {log.box!r}, {log.disk!r})
        staging = tree.staging_dir({str(guest)!r}, {what!r}, like={str(guest)!r}, records=log)
        open(os.path.join(staging, "half-unpacked"), "w").write("x")
        print(os.path.basename(staging), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == -9, r
    return r.stdout.strip()


def test_guest_entries_named_like_ours_or_carrying_the_old_mark_are_guest_data(guest, log):
    """Finding 9: the mark was the user.vmim.owner xattr, which the guest's root can set."""
    dead = _dead_pid()
    (guest / ".vmim-keys").write_text("secret")
    for name in (".vmim-cache", ".vmim-cache.d", f".vmim-restore.{dead}", ".vmim-insert.1234"):
        (guest / name).mkdir()
        (guest / name / "entry").write_text("cached")
        os.setxattr(guest / name, tree.OWNER_XATTR, f"{dead}:12345".encode())
    before = sorted(os.listdir(guest))
    tree.remove_stale_work(str(guest), log)
    assert sorted(os.listdir(guest)) == before
    assert (guest / ".vmim-cache" / "entry").read_text() == "cached"


def test_a_killed_runs_staging_is_removed_by_its_record_and_nothing_else(guest, log):
    killed = _killed_run_staging(guest, log)
    assert killed.startswith(".vmim-insert.") and (guest / killed / "half-unpacked").exists()
    assert _records(log) == [killed + ".json"]
    (guest / ".vmim-insert.1").mkdir()  # the guest's
    tree.remove_stale_work(str(guest), log)
    assert sorted(os.listdir(guest)) == [".vmim-insert.1"]
    assert _records(log) == []


def test_a_record_never_removes_another_entry_of_that_name(guest, log):
    """The killed run's staging went another way and the guest made one of that name: another
    inode, so it stays, and the record that no longer names anything goes."""
    killed = _killed_run_staging(guest, log)
    subprocess.run(["rm", "-rf", "--", str(guest / killed)], check=True)
    (guest / killed).mkdir()
    (guest / killed / "guest-file").write_text("guest")
    tree.remove_stale_work(str(guest), log)
    assert (guest / killed / "guest-file").read_text() == "guest"
    assert _records(log) == []


def test_a_record_of_another_disk_does_not_apply(guest, log):
    killed = _killed_run_staging(guest, log)
    other = worklog.WorkLog(log.statedir, log.box, "/dev/another-disk")  # the config changed
    tree.remove_stale_work(str(guest), other)
    assert (guest / killed).is_dir() and _records(log) == []


def test_a_staging_directory_is_recorded_before_use_and_kept_while_its_run_lives(guest, log):
    staging = tree.staging_dir(str(guest), "insert", like=str(guest), records=log)
    name = os.path.basename(staging)
    (rec,) = _records(log)
    entry = json.loads(open(os.path.join(log.statedir, "staging", "web1", rec)).read())
    assert entry["name"] == name and entry["ino"] == os.stat(staging).st_ino
    assert entry["disk"] == log.disk
    tree.remove_stale_work(str(guest), log)  # a parallel job of this very run: not stale
    assert os.path.isdir(staging)
    with open(os.path.join(staging, "file"), "w") as fh:
        fh.write("inserted\n")
    tree.merge(staging, str(guest))
    tree.remove_staging(staging, log)
    assert os.listdir(guest) == ["file"] and _records(log) == []
    assert tree.OWNER_XATTR not in os.listxattr(guest)  # no mark given to the guest


def test_a_guest_entry_with_the_staging_name_is_left_alone(guest, log):
    (guest / f".vmim-insert.{os.getpid()}").write_text("guest data")
    staging = tree.staging_dir(str(guest), "insert", like=str(guest), records=log)
    assert staging != str(guest / f".vmim-insert.{os.getpid()}")
    assert (guest / f".vmim-insert.{os.getpid()}").read_text() == "guest data"
    tree.remove_staging(staging, log)
    assert os.listdir(guest) == [f".vmim-insert.{os.getpid()}"] and _records(log) == []


def _staged(guest, log):
    """A staging directory at the guest root holding what an unpack made: a file, a directory,
    and symlinks named like the host's directories pointing out of the guest."""
    staging = tree.staging_dir(str(guest), "restore", like=str(guest), records=log)
    os.mkdir(os.path.join(staging, "usr"))
    with open(os.path.join(staging, "usr", "f"), "w") as fh:
        fh.write("guest\n")
    os.symlink("/", os.path.join(staging, "etc"))
    os.symlink("../../outside", os.path.join(staging, "tmp"))
    os.chmod(staging, 0o751)  # the archive's "." metadata
    return staging


def test_a_restore_into_an_emptied_root_moves_each_entry_and_follows_nothing(guest, log,
                                                                          tmp_path):
    (tmp_path / "outside").mkdir()
    (guest / "lost+found").mkdir()
    staging = _staged(guest, log)
    assert tree.move_into_empty(staging, str(guest)) == 3
    assert sorted(os.listdir(guest)) == sorted(["lost+found", "usr", "etc", "tmp",
                                                os.path.basename(staging)])
    assert os.readlink(guest / "etc") == "/" and os.readlink(guest / "tmp") == "../../outside"
    assert (guest / "usr" / "f").read_text() == "guest\n"
    assert os.listdir(tmp_path / "outside") == [] and os.listdir(staging) == []
    assert os.stat(guest).st_mode & 0o777 == 0o751  # the root took the "." metadata


def test_a_root_holding_anything_else_is_left_to_the_sandboxed_merge(guest, log):
    (guest / "kept").write_text("x")
    staging = _staged(guest, log)
    assert tree.move_into_empty(staging, str(guest)) is None
    assert sorted(os.listdir(staging)) == ["etc", "tmp", "usr"]  # nothing moved
    # nor when the image holds a name the root keeps (the set-aside directory being deleted)
    (guest / "kept").unlink()
    os.mkdir(guest / ".vmim-trash.1")
    os.mkdir(os.path.join(staging, ".vmim-trash.1"))
    assert tree.move_into_empty(staging, str(guest), [".vmim-trash.1"]) is None
    assert len(os.listdir(staging)) == 4



def _chain(base, depth):
    fd = os.open(base, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)
    return base / "/".join(["d"] * depth)


def test_a_merge_into_a_guest_tree_as_deep_as_a_path_reaches(tmp_path):
    """An archive inserted where the guest has the same 1500 directories (3000 bytes of path,
    within PATH_MAX): the merge recurses once a level, and died of Python's RecursionError in
    the sandbox on the main of 2026-12-07."""
    root = tmp_path / "guest"
    staging = root / ".stage"
    staging.mkdir(parents=True)
    try:
        _chain(root, 1500)
        (_chain(staging, 1500) / "leaf").write_text("inserted\n")
        assert tree.merge_contained(str(staging), str(root), remove_staging=True) == 1
        assert (root / "/".join(["d"] * 1500) / "leaf").read_text() == "inserted\n"
    finally:  # pytest's own removal of tmp_path recurses too
        subprocess.run(["rm", "-rf", "--", str(root)], check=True)


def test_the_merge_walks_a_staged_tree_deeper_than_pythons_recursion_limit(tmp_path):
    """The merge is iterative: the sandbox's raised recursion limit is not what lets it
    through (the merge of 1500 levels, in this process, under a limit of 300)."""
    import sys

    root = tmp_path / "guest"
    staging = root / ".stage"
    staging.mkdir(parents=True)
    limit = sys.getrecursionlimit()
    try:
        _chain(root, 1500)
        (_chain(staging, 1500) / "leaf").write_text("inserted\n")
        sys.setrecursionlimit(300)
        try:
            assert tree.merge(str(staging), str(root)) == 1
        finally:
            sys.setrecursionlimit(limit)
        assert (root / "/".join(["d"] * 1500) / "leaf").read_text() == "inserted\n"
    finally:
        subprocess.run(["rm", "-rf", "--", str(root)], check=True)

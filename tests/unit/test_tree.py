"""The guest's tree seen from the host: what the tool leaves at the guest root, and only that."""

from __future__ import annotations

import os
import subprocess

import pytest

from vmim import procscan, tree


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.skipif(os.geteuid() != 0, reason="the removal runs rm in the sandbox of guest "
                    "data (bwrap as root, vmim.sandbox)")
def test_guest_entries_named_like_work_entries_are_guest_data(tmp_path):
    """Only staging directories marked by a run of this tool that is gone are removed."""
    dead = _dead_pid()
    (tmp_path / ".vmim-keys").write_text("secret")
    (tmp_path / ".vmim-cache.d").mkdir()
    (tmp_path / ".vmim-cache.d" / "entry").write_text("cached")
    (tmp_path / f".vmim-restore.{dead}").mkdir()  # the guest's own, no marker
    (tmp_path / f".vmim-insert.{dead}").mkdir()  # marked by a run that lives (this one)
    os.setxattr(tmp_path / f".vmim-insert.{dead}", tree.OWNER_XATTR, procscan.owner_tag().encode())
    # left by a run that was killed: the marker names a run that is gone
    stale = tmp_path / f".vmim-insert.{dead + 1}"
    stale.mkdir()
    (stale / "half-unpacked").write_text("x")
    os.setxattr(stale, tree.OWNER_XATTR, f"{dead}:12345".encode())
    tree.remove_stale_work(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([
        ".vmim-keys", ".vmim-cache.d", f".vmim-restore.{dead}", f".vmim-insert.{dead}"])
    assert (tmp_path / ".vmim-cache.d" / "entry").read_text() == "cached"


def test_a_staging_directory_is_marked_with_its_run_and_kept_while_that_run_lives(tmp_path):
    guest = tmp_path / "guest"
    guest.mkdir()
    staging = tree.staging_dir(str(guest), "insert", like=str(guest))
    assert os.getxattr(staging, tree.OWNER_XATTR).decode() == procscan.owner_tag()
    tree.remove_stale_work(str(guest))  # a parallel job of this very run: not stale
    assert os.path.isdir(staging)
    with open(os.path.join(staging, "file"), "w") as fh:
        fh.write("inserted\n")
    tree.merge(staging, str(guest))
    os.rmdir(staging)
    assert (guest / "file").read_text() == "inserted\n"
    # the marker stays with the staging directory: the guest root does not take it
    assert tree.OWNER_XATTR not in os.listxattr(guest)


def test_a_guest_entry_with_the_staging_name_is_left_alone(tmp_path):
    (tmp_path / f".vmim-insert.{os.getpid()}").write_text("guest data")
    staging = tree.staging_dir(str(tmp_path), "insert", like=str(tmp_path))
    assert staging != str(tmp_path / f".vmim-insert.{os.getpid()}")
    assert (tmp_path / f".vmim-insert.{os.getpid()}").read_text() == "guest data"
    os.rmdir(staging)

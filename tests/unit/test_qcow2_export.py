"""The qcow2 FUSE export's names and command line, and which qcow2 actions are whole-disk
(no root: the export itself is tested in tests/integration/test_qcow2_fuse.py)."""

from __future__ import annotations

import os

from vmim import plan
from vmim.disk import fuse


def test_the_export_is_named_from_the_disk_s_real_path(tmp_path):
    disk = tmp_path / "a,b.qcow2"
    disk.write_bytes(b"")
    os.symlink(disk, tmp_path / "link.qcow2")
    exp = fuse.export_for(str(tmp_path / "link.qcow2"))
    assert exp == fuse.export_for(str(disk))
    assert exp.disk == str(disk)
    assert os.path.dirname(exp.path) == os.path.realpath(fuse.EXPORT_DIR)
    assert os.path.basename(exp.path).startswith("a,b.qcow2-") and exp.path.endswith(".raw")
    assert exp.pidfile == exp.path[:-len(".raw")] + ".pid"
    assert fuse.export_for(str(tmp_path / "other.qcow2")).path != exp.path


def test_commas_in_paths_are_doubled_in_the_daemon_s_options(tmp_path):
    exp = fuse.Export("/d/a,b.qcow2", "/run/vmim/exports/x,y.raw", "/run/vmim/exports/x,y.pid")
    argv = fuse.daemon_argv(exp)
    assert argv[0] == "qemu-storage-daemon"
    assert "driver=file,filename=/d/a,,b.qcow2,node-name=f" in argv
    assert ("type=fuse,id=e,node-name=q,mountpoint=/run/vmim/exports/x,,y.raw,writable=on"
            in argv)
    assert argv[-3:] == ["--daemonize", "--pidfile", "/run/vmim/exports/x,y.pid"]  # not parsed


def _steps(actions, fmt=None, images=None, **req):
    seen = plan.Observed(domain_state="shut off", in_config=True, disk="/d/s.qcow2",
                         mount="/mnt/vm/s", mounted=False, store_type="qcow2",
                         images=images or {})
    request = plan.Request(boxes=["s"], actions=actions, format=fmt, **req)
    return [(s.name, s.description) for s in plan.plan_box(request, "s", seen).steps]


def test_a_qcow2_store_without_a_format_flag_is_the_whole_disk():
    steps = _steps(["store"], store="snap")
    assert [s for s, _ in steps] == ["release", "store"]  # the export must not hold the disk
    assert "whole disk" in steps[1][1]


def test_a_qcow2_store_with_a_format_flag_mounts_through_the_export():
    steps = _steps(["store"], fmt="tar.zst", store="snap")
    assert steps[0][0] == "mount" and "qemu-storage-daemon FUSE export" in steps[0][1]
    assert steps[1][0] == "store" and "(tar.zst)" in steps[1][1]


def test_a_qcow2_restore_depends_on_the_image():
    steps = _steps(["restore"], restore="golden", images={"golden": "qcow2"})
    assert [s for s, _ in steps] == ["verify", "release", "restore"]
    assert "new qcow2 overlay" in steps[2][1]
    steps = _steps(["restore"], restore="tree", images={"tree": "tgz"})
    assert [s for s, _ in steps] == ["verify", "mount", "restore"]
    assert "unpack image tree (tgz) into a staging directory" in steps[2][1]

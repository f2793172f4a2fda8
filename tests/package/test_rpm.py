"""rpm/vmimagemanager.spec: rpmbuild -bb makes a noarch RPM with the command, the config as
%config(noreplace), the man page and the completion; its Python code runs."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from vmim import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild is not installed (tools/setup-host installs Debian's rpm)")
    out = tmp_path_factory.mktemp("rpm")
    res = subprocess.run([os.path.join(ROOT, "tools", "build-rpm"), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (path,) = glob.glob(str(out / f"vmimagemanager-{__version__}-1*.noarch.rpm"))
    return path


def rpm_query(path, *flags):
    return subprocess.run(["rpm", "-qp", *flags, path], capture_output=True, text=True,
                          check=True).stdout.split()


def test_rpm_holds_command_config_man_page_and_completion(rpm):
    files = rpm_query(rpm, "-l")
    for wanted in ("/usr/bin/vmimagemanager", "/etc/vmimagemanager/vmimagemanager.cfg",
                   "/usr/share/bash-completion/completions/vmimagemanager",
                   "/usr/share/vmimagemanager/vmimagemanager.cfg.template",
                   "/usr/share/vmimagemanager/libvirt.xsl"):
        assert wanted in files
    assert any(f.startswith("/usr/share/man/man1/vmimagemanager.1") for f in files)
    assert rpm_query(rpm, "-c") == ["/etc/vmimagemanager/vmimagemanager.cfg"]
    requires = rpm_query(rpm, "--requires")
    assert {"python3-libvirt", "python3-lxml", "python3-magic", "rsync", "qemu-img"} <= set(requires)


def test_rpm_payload_runs(rpm, tmp_path):
    cpio = subprocess.run(["rpm2cpio", rpm], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=tmp_path, check=True)
    (site,) = glob.glob(str(tmp_path / "usr" / "lib" / "python3*" / "*-packages"))
    res = subprocess.run([sys.executable, "-m", "vmim", "--version"], capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and res.stdout.strip() == f"vmimagemanager {__version__}", res

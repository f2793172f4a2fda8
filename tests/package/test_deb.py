"""The Debian package: `make deb` builds it, apt installs it into a fresh Debian 12 chroot.

The chroot is made by mmdebstrap from this machine's apt sources; its base tarball and the
.deb files apt fetched for the dependencies are cached under /var/cache/vmimagemanager-tests,
so a rerun takes well under a minute. Commands run in the chroot inside a private mount and
PID namespace (`unshare --mount-proc`), so nothing stays mounted after a test.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time

import pytest

from vmim import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("VMIM_TEST_CACHE", "/var/cache/vmimagemanager-tests")
BASE = os.path.join(CACHE, "bookworm-base.tar")
ARCHIVES = os.path.join(CACHE, "apt-archives")
BASE_MAX_AGE = 30 * 24 * 3600  # seconds; apt-get update in the chroot covers the weeks between
DEB = f"vmimagemanager_{__version__}_all.deb"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
       "DEBIAN_FRONTEND": "noninteractive", "MANWIDTH": "100"}


def host_sources() -> str:
    """This machine's apt sources (a deb822 file or sources.list), for mmdebstrap."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if os.path.isfile(path) and "bookworm" in open(path).read():
            return path
    return "http://deb.debian.org/debian"


def make_base() -> None:
    """A minimal bookworm with apt and man-db, as a tarball; made again after a month."""
    if os.path.isfile(BASE) and time.time() - os.path.getmtime(BASE) < BASE_MAX_AGE:
        return
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{BASE}.tmp{os.getpid()}.tar"
    res = subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--variant=apt",
                          "--include=man-db", "bookworm", tmp, host_sources()],
                         capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, f"mmdebstrap failed:\n{res.stderr[-3000:]}"
    os.replace(tmp, BASE)
    shutil.rmtree(ARCHIVES, ignore_errors=True)  # .debs fetched for the old base


def in_chroot(root, *argv, check=False):
    res = subprocess.run(["unshare", "--mount", "--pid", "--fork",
                          f"--mount-proc={root}/proc", "chroot", str(root), *argv],
                         capture_output=True, text=True, env=ENV)
    if check:
        assert res.returncode == 0, f"{argv}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([os.path.join(ROOT, "tools", "build-deb"), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0 and "install them as root" in res.stderr:
        pytest.skip(res.stderr.strip())  # not root, and the Debian build tools are missing
    assert res.returncode == 0, res.stderr  # lintian errors fail build-deb too
    path = out / DEB
    assert path.is_file(), os.listdir(out)
    return path


@pytest.fixture(scope="module")
def chroot(deb, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the package test needs root (mmdebstrap --mode=root, chroot)")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (tools/setup-host installs it)")
    make_base()
    root = tmp_path_factory.mktemp("chroot")
    subprocess.run(["tar", "-xf", BASE, "-C", str(root)], check=True)
    try:
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        archives = root / "var" / "cache" / "apt" / "archives"
        os.makedirs(ARCHIVES, exist_ok=True)
        for cached in glob.glob(os.path.join(ARCHIVES, "*.deb")):
            shutil.copy(cached, archives)
        shutil.copy(deb, root / "tmp" / DEB)
        in_chroot(root, "apt-get", "update", "-qq", check=True)
        in_chroot(root, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                  f"/tmp/{DEB}", check=True)
        for fetched in glob.glob(str(archives / "*.deb")):
            if not os.path.exists(os.path.join(ARCHIVES, os.path.basename(fetched))):
                shutil.copy(fetched, ARCHIVES)
        yield root
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def test_package_metadata_names_debian_libraries(deb):
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    for name in ("python3-libvirt", "python3-lxml", "python3-magic", "rsync", "zstd",
                 "qemu-utils", "e2fsprogs"):
        assert name in depends
    recommends = subprocess.run(["dpkg-deb", "-f", str(deb), "Recommends"], capture_output=True,
                                text=True, check=True).stdout
    assert "libvirt-daemon-system" in recommends and "python3-kombu" in recommends


def test_the_fleet_worker_unit_is_shipped_not_enabled(chroot):
    unit = chroot / "lib" / "systemd" / "system" / "vmimagemanager-worker.service"
    assert "ExecStart=/usr/bin/vmimagemanager worker" in unit.read_text()
    wants = chroot / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert not (wants / "vmimagemanager-worker.service").exists()  # it needs `broker` first
    res = in_chroot(chroot, "/usr/bin/vmimagemanager", "worker", "--help")
    assert res.returncode == 0 and "--broker" in res.stdout, res


def test_version_runs_from_usr_bin(chroot):
    res = in_chroot(chroot, "/usr/bin/vmimagemanager", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"vmimagemanager {__version__}"
    # libvirt-python came from Debian, not compiled: no compiler in the chroot
    assert in_chroot(chroot, "dpkg-query", "-W", "python3-libvirt").returncode == 0
    assert in_chroot(chroot, "sh", "-c", "command -v gcc").returncode != 0


def test_man_page_is_on_the_manpath(chroot):
    res = in_chroot(chroot, "man", "-w", "vmimagemanager")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "/usr/share/man/man1/vmimagemanager.1.gz"
    page = in_chroot(chroot, "man", "vmimagemanager", check=True).stdout
    assert "EXIT STATUS" in page and "--connect URI" in page


def test_config_is_a_conffile_made_from_the_template(chroot):
    cfg = chroot / "etc" / "vmimagemanager" / "vmimagemanager.cfg"
    with open(os.path.join(ROOT, "vmimagemanager.cfg.template")) as fh:
        assert cfg.read_text() == fh.read()
    conffiles = in_chroot(chroot, "dpkg-query", "-W", "-f=${Conffiles}", "vmimagemanager",
                          check=True).stdout
    assert "/etc/vmimagemanager/vmimagemanager.cfg" in conffiles
    template = chroot / "usr" / "share" / "vmimagemanager" / "vmimagemanager.cfg.template"
    assert template.is_file()


def test_bash_completion_is_installed_and_loads(chroot):
    path = "/usr/share/bash-completion/completions/vmimagemanager"
    res = in_chroot(chroot, "bash", "-c", f"source {path} && complete -p vmimagemanager")
    assert res.returncode == 0, res.stderr
    assert "_shtab_vmimagemanager" in res.stdout
    # -b offers the slots of /etc/vmimagemanager/vmimagemanager.cfg: none active when fresh
    res = in_chroot(chroot, "bash", "-c", f"source {path}; COMP_WORDS=(vmimagemanager -b ''); "
                    "COMP_CWORD=2; _shtab_vmimagemanager; echo ${COMPREPLY[@]}")
    assert res.stdout.split() == ["any-free"], res


def test_list_without_libvirtd_is_exit_7_naming_the_uri(chroot):
    # The shipped config says qemu:///system; no libvirtd runs in the chroot.
    res = in_chroot(chroot, "vmimagemanager", "-l")
    assert res.returncode == 7, res
    assert "could not connect to libvirt at 'qemu:///system'" in res.stderr
    assert "Traceback" not in res.stderr


def test_list_with_connect_to_the_test_driver(chroot):
    # libvirt's test driver needs no daemon. The shipped config has no active slot: a fresh
    # install lists the host's domains only, and says nothing about the config.
    res = in_chroot(chroot, "vmimagemanager", "--connect", "test:///default", "-l")
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()[1:]]
    assert names == ["test"], res.stdout
    assert "warning" not in res.stderr, res.stderr


def test_missing_config_names_the_installed_template(chroot):
    res = in_chroot(chroot, "vmimagemanager", "--config", "/etc/nowhere.cfg", "-l")
    assert res.returncode == 3, res
    assert "/etc/nowhere.cfg" in res.stderr
    template = "/usr/share/vmimagemanager/vmimagemanager.cfg.template"
    assert template in res.stderr
    assert (chroot / template.lstrip("/")).is_file()

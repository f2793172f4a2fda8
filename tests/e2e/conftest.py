"""e2e tier: a real guest boots under libvirt (see tests/guest.py and tests/rig.py)."""

import os
import subprocess
import time

import pytest

from tests import guest as guest_mod
from tests.guest import console_lines
from tests.integration import diskimages as di
from tests.rig import _test_root, _traversable_tmp, domains, no_leaks, skip_without_host  # noqa: F401


def pytest_collection_modifyitems(config, items):
    skip_without_host(items, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def guest():
    try:
        return guest_mod.build()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot build the test guest from Debian packages: {detail}")


BOOT_TIMEOUT = 90  # seconds; a boot under TCG takes about five


def wait_for_line(path, wanted, timeout=BOOT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = console_lines(path)
        if wanted in lines:
            return lines
        time.sleep(0.2)
    raise AssertionError(f"{wanted!r} not on the console within {timeout} s: {console_lines(path)}")


def wait_for_state(doms, name, state, timeout=BOOT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while doms.state(name) != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not in state {state} after {timeout} s")
        time.sleep(0.2)


class Slot:
    def __init__(self, root, cfg, name):
        self.root = root
        self.cfg = cfg
        self.name = name
        self.console = str(root / "console.log")
        self.disk = str(root / "disk.img")
        self.mount = str(root / "mnt" / name)


@pytest.fixture
def make_slot(tmp_path, guest, write_config, domains):  # noqa: F811 (the rig's fixture)
    """A slot with a 1-partition disk whose /marker says 'slot marker', booted by direct
    kernel boot into the test guest in the given mode."""

    os.chmod(tmp_path, 0o755)  # QEMU runs as libvirt-qemu

    def make(mode="report", extra="", report="/marker"):
        name = domains.track(domains.name(mode))
        disk = tmp_path / "disk.img"
        if not disk.exists():
            di.partitioned_image(str(disk), "dos", [24], ["ext4"])
            with di.attached(str(disk), di.MiB) as dev, di.mounted(dev) as mp:
                with open(os.path.join(mp, "marker"), "w") as fh:
                    fh.write("slot marker\n")
        cfg = write_config(f"""\
        [vmim.local]
        lockdir = "{tmp_path}/locks"
        statedir = "{tmp_path}/state"
        mount = "{tmp_path}/mnt"
        virt_type = "qemu"
        [vmim.vm.guest]
        HostName = "{name}"
        HostDisk = "{disk}"
        partition = 1
        memory = 262144
        kernel = "{guest.kernel}"
        initrd = "{guest.initrd}"
        cmdline = "console=ttyS0 quiet vmim.mode={mode} vmim.report={report}"
        serial_log = "{tmp_path}/console.log"
        {extra}
        """)
        return Slot(tmp_path, cfg, name)

    return make



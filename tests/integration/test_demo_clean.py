"""`make demo-clean` (tools/demo.py --clean) is quiet and succeeds whatever is already gone."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "tools", "demo.py")


def clean(demo_dir, box):
    env = {**os.environ, "VMIM_DEMO_DIR": str(demo_dir), "VMIM_DEMO_BOX": box}
    return subprocess.run([sys.executable, DEMO, "--clean"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_clean_with_the_demo_domain_shut_off_prints_no_error(tmp_path, domains):
    # After `make demo` the guest has powered itself off: the domain is defined, shut off.
    box = domains.define(domains.name("demo-clean"))
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "vmimagemanager.cfg").write_text(
        f'[vmim.vm.1]\nHostName = "{box}"\nroot = "{demo_dir}/root.img"\n')
    res = clean(demo_dir, box)
    assert res.returncode == 0, res
    assert "error" not in (res.stdout + res.stderr).lower(), res
    assert res.stdout.splitlines()[-1] == "demo removed"
    assert box not in [d.name() for d in domains.conn.listAllDomains()]
    assert not demo_dir.exists()


def test_clean_when_the_demo_is_already_gone_prints_no_error(tmp_path, domains):
    res = clean(tmp_path / "demo", domains.name("demo-gone"))
    assert res.returncode == 0, res
    assert res.stdout == "demo removed\n" and res.stderr == ""

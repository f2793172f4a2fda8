"""`make demo` ends with the console line proving the restored image booted; `make
demo-clean` leaves nothing behind. Run on a demo directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_runs_twice_and_cleans_up(tmp_path, domains, guest):
    os.chmod(tmp_path, 0o755)
    box = f"vmim-test-demo-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "VMIM_DEMO_DIR": str(tmp_path / "demo"), "VMIM_DEMO_BOX": box}
    demo = [sys.executable, os.path.join(ROOT, "tools", "demo.py")]
    for _ in range(2):  # re-runnable
        res = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        last = [line for line in res.stdout.splitlines() if line.strip()][-2]
        assert last == ("== The guest booted the restored image: its console says "
                        "'VMIM-FILE /marker: original demo image'")
    res = subprocess.run([*demo, "--clean"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "demo").exists()
    assert box not in [d.name() for d in domains.conn.listAllDomains()]

"""A fleet job's lease (vmim.lease): checked before every step of a run."""

from __future__ import annotations

import os
import time

import pytest

from vmim import lease


def test_a_command_run_by_hand_has_no_lease(monkeypatch):
    monkeypatch.delenv(lease.ENV_LEASE, raising=False)
    lease.check()  # nothing to check: no error


def test_a_fresh_lease_lets_the_run_go_on_and_a_stale_one_stops_it(tmp_path, monkeypatch):
    path = tmp_path / "job"
    monkeypatch.setenv(lease.ENV_LEASE, str(path))
    monkeypatch.setenv(lease.ENV_TTL, "5")
    lease.renew(str(path))
    lease.check()
    old = time.time() - 60
    os.utime(path, (old, old))  # the worker was frozen for a minute
    with pytest.raises(lease.LeaseLost, match="another worker") as info:
        lease.check()
    assert info.value.exit_code == 1
    path.unlink()  # a worker that died took its lease with it
    with pytest.raises(lease.LeaseLost):
        lease.check()

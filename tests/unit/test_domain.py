"""libvirt failures become clear errors; the test driver stands in for a daemon."""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmim import domain  # noqa: E402
from vmim.errors import HostEnvironmentError  # noqa: E402


def test_a_query_libvirt_fails_is_exit_7_naming_the_uri():
    hv = domain.connect("test:///default")  # libvirt's own in-process test driver
    assert "test" in hv.domains()  # its one predefined domain, running
    hv.conn.close()  # the connection is gone, as when libvirtd stops mid-command
    with pytest.raises(HostEnvironmentError) as exc:
        hv.domains()
    assert exc.value.exit_code == 7 and "test:///default" in str(exc.value)
    with pytest.raises(HostEnvironmentError):
        hv.domain("test")


class _DeafGuest:
    """A running domain that ignores the power button until it is forced off."""

    def __init__(self):
        self.active = True

    def isActive(self):
        return self.active

    def shutdownFlags(self, flags):
        pass

    def destroy(self):
        self.active = False


def test_a_long_graceful_shutdown_says_it_waits_and_how_to_wait_less(monkeypatch, caplog):
    import logging

    hv = domain.connect("test:///default")
    guest = _DeafGuest()
    monkeypatch.setattr(hv, "_lookup", lambda name: guest)
    monkeypatch.setattr(hv, "_state", lambda dom: "running")
    monkeypatch.setattr(domain, "SHUTDOWN_SAY", 0.2)
    with caplog.at_level(logging.INFO, logger="vmim"):
        assert hv.shutdown("web1", 1) == "forced off after 1 s without a graceful shutdown"
    hv.close()
    said = [m for m in caplog.messages if "waiting for the guest" in m]
    assert said == ["box web1: waiting for the guest to shut down; forced off after 1 s (-k "
                    "forces it off at once, --timeout S waits less)"], caplog.messages

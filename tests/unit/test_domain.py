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

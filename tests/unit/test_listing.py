"""The one definition of a free slot, behind -f, -b any-free and its dry run."""

from __future__ import annotations

from vmim import config
from vmim.domain import DomainInfo
from vmim.listing import slot_is_free

CFG = config.parse('[vmim.vm.a]\nHostName = "a"\nroot = "/dev/null"\n'  # a disk that is there
                   '[vmim.vm.b]\nHostName = "b"\n'
                   '[vmim.vm.c]\nHostName = "c"\nroot = "/nonexistent/c.img"\n', "/x.cfg")


def dom(state):
    return DomainInfo("a", state, True)


def test_free_means_disk_configured_domain_off_not_mounted_not_locked():
    a = CFG.slot("a")
    assert slot_is_free(a, None, mounted=False, locked=False)
    assert slot_is_free(a, dom("shut off"), mounted=False, locked=False)
    for state in ("running", "paused", "shutting down", "suspended", "crashed"):
        assert not slot_is_free(a, dom(state), mounted=False, locked=False), state
    assert not slot_is_free(a, None, mounted=True, locked=False)
    assert not slot_is_free(a, None, mounted=False, locked=True)
    assert not slot_is_free(CFG.slot("b"), None, mounted=False, locked=False)  # no disk
    assert not slot_is_free(CFG.slot("c"), None, mounted=False, locked=False)  # disk not there

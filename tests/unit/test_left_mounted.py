"""A run that ends with the slot mounted (-r, -s, -i, -e or --mount without -u or --release)
says so and how to let it go; a newcomer's `-r golden` otherwise ended silently with the
slot mounted, and -u or -l was the first to tell."""

from __future__ import annotations

import logging
import types

from vmim import runner


def _box(mount):
    gone = []
    slot = types.SimpleNamespace(mount=mount)
    box = types.SimpleNamespace(name="web1", slot=slot, held=[object()],
                                let_go=lambda: gone.append(True))
    return box, gone


def test_a_slot_left_mounted_is_said_to_be_and_how_to_release_it(monkeypatch, caplog):
    kept = []
    monkeypatch.setattr(runner, "is_mounted", lambda slot: True)
    monkeypatch.setattr(runner.hold, "keep_while_mounted", lambda held, m: kept.append(m))
    box, gone = _box("/mnt/vm/web1")
    with caplog.at_level(logging.INFO, logger="vmim"):
        runner._keep_or_let_go(box, say=True)
    assert kept == [True] and gone == [True]
    assert ("box web1: stays mounted at /mnt/vm/web1: --release unmounts it, -u unmounts it "
            "and starts the domain") in caplog.messages


def test_nothing_is_said_after_a_failure_or_when_nothing_stays_mounted(monkeypatch, caplog):
    monkeypatch.setattr(runner.hold, "keep_while_mounted", lambda held, m: None)
    with caplog.at_level(logging.INFO, logger="vmim"):
        monkeypatch.setattr(runner, "is_mounted", lambda slot: True)
        runner._keep_or_let_go(_box("/mnt/vm/web1")[0], say=False)  # the error says enough
        monkeypatch.setattr(runner, "is_mounted", lambda slot: False)
        runner._keep_or_let_go(_box("/mnt/vm/web1")[0], say=True)
    assert not [m for m in caplog.messages if "stays mounted" in m]

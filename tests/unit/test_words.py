"""The vocabulary as enums (vmim.words): each word is its str everywhere it travels."""

from __future__ import annotations

import json

import pytest

from vmim import config
from vmim.request import FORMATS, LISTS, PIPELINE, Request
from vmim.words import Action, Format, ListKind, StoreType, Word


@pytest.mark.parametrize("word", [*Action, *ListKind, *Format, *StoreType])
def test_a_word_prints_and_serialises_as_its_string(word):
    plain = word.value
    assert isinstance(word, str) and word == plain and hash(word) == hash(plain)
    assert str(word) == f"{word}" == "%s" % word == plain  # noqa: UP031 - as logging formats it
    assert f"{word:>12}" == f"{plain:>12}"
    assert json.dumps({word: [word]}) == json.dumps({plain: [plain]})
    assert type(str(word)) is str


def test_the_vocabulary_is_the_one_the_request_has_always_spoken():
    assert PIPELINE == ("kill", "down", "mount", "extract", "store", "restore", "insert",
                        "release", "redefine", "swap", "up")
    assert FORMATS == ("rsync", "tgz", "cpio.bz2", "tar.zst")
    assert LISTS == ("boxes", "images", "inserts", "free", "locked")


def test_a_request_holds_words_of_the_vocabulary_and_refuses_others():
    req = Request(boxes=("web1",), actions=("store", "release"), lists=("free",), store="x",
                  format="tgz")
    assert all(isinstance(a, Action) for a in req.actions)
    assert req.lists == (ListKind.FREE,) and req.format is Format.TGZ
    assert Request.from_dict(json.loads(json.dumps(req.to_dict()))) == req
    with pytest.raises(ValueError):
        Request(actions=("reboot",))


def test_a_slots_store_type_is_a_store_type():
    cfg = config.parse('[vmim.vm.a]\nHostName = "a"\nHostDisk = "/srv/a.qcow2"\n', "/x.cfg")
    assert cfg.slot_names == ["a"]
    slot = cfg.slot("a")
    assert slot is not None and slot.store_type is StoreType.QCOW2
    assert issubclass(StoreType, Word)

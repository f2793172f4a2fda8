"""The broker permissions of docs/fleet.md (vmim.fleet.permissions): what each regular
expression lets a user name. RabbitMQ matches them with Erlang's re (PCRE); these use only what
PCRE and Python's re read alike (anchors, alternation, escapes, `.*`). The broker's own checks
are tested in tests/fleet (real users on a real node)."""

from __future__ import annotations

import os
import re

import pytest

from vmim.fleet import permissions, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def allowed(regex: str, name: str) -> bool:
    return re.search(regex, name) is not None


@pytest.mark.parametrize("name,ok", [
    ("vmim.host.h1.box.web1", True),
    ("vmim.control.h1.0a1b2c3d", True),
    ("vmim.host.h1.probe.0a1b2c3d", True),
    ("vmim.host.h10.box.web1", False),  # another host whose name starts alike
    ("vmim.host.h1.prod.box.web1", False),  # another host whose name is h1 and a dot more
    ("vmim.control.h1.prod.0a1b2c3d", False),
    ("vmim.host.h1.probe.x.box.web1", False),
    ("vmim.host.h1.box.web2", False),  # not one of its slots
    ("vmim.host.h2.box.web1", False),
    ("vmim.control.h2.0a1b2c3d", False),
    ("vmim.jobs", False),  # the direct exchange of earlier releases: not any more
    ("vmim.reply.0123", False),
    ("amq.default", False),
])
def test_a_host_user_configures_and_reads_its_own_names_only(name, ok):
    configure, _write, read = permissions.host_grants("h1", ["web1"])
    assert allowed(configure, name) == ok
    assert allowed(read, name) == ok


@pytest.mark.parametrize("name", [protocol.JOBS, protocol.CONTROL, protocol.ANY_QUEUE])
def test_a_host_user_reads_what_every_host_shares_but_cannot_configure_it(name):
    """Configure would let a host delete them, or declare the jobs exchange again as a fanout
    (no topic permission guards a fanout) and see every host's jobs: the clients declare
    them (vmim.fleet.topology)."""
    configure, write, read = permissions.host_grants("h1", ["web1"])
    assert allowed(read, name)
    assert not allowed(configure, name) and not allowed(write, name)


def test_a_host_user_writes_its_queues_and_answers_but_publishes_no_job():
    _configure, write, _read = permissions.host_grants("h1", ["web1"])
    assert allowed(write, "amq.default") and allowed(write, "vmim.host.h1.box.web1")
    assert not allowed(write, protocol.JOBS) and not allowed(write, protocol.CONTROL)


def test_a_host_name_is_a_name_not_a_pattern():
    configure, _write, _read = permissions.host_grants("a.b", ["x"])
    assert allowed(configure, "vmim.host.a.b.box.x")
    assert not allowed(configure, "vmim.host.aXb.box.x")


@pytest.mark.parametrize("key,ok", [
    ("box.web1", True), ("box.web-2", True), ("any", True),
    ("box.web10", False), ("box.web1.x", False), ("box.h2a", False), ("#", False),
    ("box.*", False), ("box.#", False), ("*.web1", False), ("box", False),
])
def test_a_host_binds_the_keys_of_its_own_slots_and_any_only(key, ok):
    write, read = permissions.host_topic_grants(["web1", "web-2"])
    assert allowed(read, key) == ok
    assert not allowed(write, key)  # it publishes no job


def test_a_slot_whose_name_has_a_wildcard_word_is_not_routable():
    assert not protocol.routable("a.*") and not protocol.routable("#")
    assert not protocol.routable("x.#.y")
    assert protocol.routable("web*1") and protocol.routable("a.b") and protocol.routable("a#")
    _write, read = permissions.host_topic_grants(["web1", "a.*"])
    assert not allowed(read, "box.a.*")
    assert "rename it" in "\n".join(permissions.commands("h7", ["web1", "a.*"]))


def test_a_client_publishes_jobs_and_list_requests_and_owns_its_reply_queues():
    configure, write, read = permissions.client_grants()
    for name in (protocol.JOBS, protocol.CONTROL, "amq.default"):
        assert allowed(write, name)
    assert not allowed(write, "vmim.jobs") and not allowed(write, "vmim.host.h1.box.web1")
    assert allowed(configure, "vmim.reply.0123") and allowed(read, "vmim.reply.0123")
    assert not allowed(read, "vmim.any")  # it takes no job
    for name in (protocol.JOBS, protocol.CONTROL, protocol.ANY_QUEUE):  # it declares them
        assert allowed(configure, name)
    assert allowed(write, protocol.ANY_QUEUE) and allowed(read, protocol.JOBS)  # and binds
    topic_write, topic_read = permissions.client_topic_grants()  # vmim.any's key only
    assert allowed(topic_read, "any") and allowed(topic_write, "box.web1")
    for key in ("#", "box.web1", "*.*", "anything"):
        assert not allowed(topic_read, key), key




def test_a_reply_is_believed_from_the_hosts_user_or_the_clients_own():
    assert permissions.vouched("h1", "h1", "ci")
    assert permissions.vouched("h1", "ci", "ci")  # one user for hosts and clients
    assert not permissions.vouched("h1", "h2", "ci")
    assert not permissions.vouched("h1", None, "ci")  # a reply that does not say


def test_the_docs_give_the_commands_the_tool_prints():
    with open(os.path.join(ROOT, "docs", "fleet.md"), encoding="utf-8") as fh:
        docs = fh.read()
    for command in permissions.commands("h7", ["web7", "db7"]):
        assert command in docs, command


def test_a_hosts_slot_queues_are_no_other_hosts_and_the_names_that_would_share_are_refused():
    """Host `web` with slot `a.box.b` and host `web.box.a` with slot `b` had one queue name,
    and each host's user could read the other's jobs. A host name with a word `box` after its
    first is refused (the worker exits 2); of the rest, each (host, slot) has a queue of its
    own, which only that host's grants match."""
    hosts = ["web", "web.box.a", "web.box", "box", "box.web", "web.a", "a.b.box.c", "h.prod"]
    slots = ["b", "a.box.b", "box", "box.b", "b.box", "prod.box.b", "a"]
    assert [h for h in hosts if protocol.host_name_problem(h)] == \
        ["web.box.a", "web.box", "a.b.box.c"]
    fleet = [h for h in hosts if not protocol.host_name_problem(h)]
    names = {(h, s): protocol.box_queue(h, s) for h in fleet for s in slots}
    assert len(set(names.values())) == len(names)
    for h in fleet:
        configure, _write, read = permissions.host_grants(h, slots)
        for (owner, _slot), queue in names.items():
            assert allowed(configure, queue) == allowed(read, queue) == (owner == h), \
                (h, queue)


@pytest.mark.parametrize("host", ["", "a\x1bb", "x" * 256])
def test_a_host_name_that_cannot_be_shown_or_be_a_user_is_refused(host):
    assert protocol.host_name_problem(host)


def test_the_worker_refuses_such_a_host_name_before_anything(capsys):
    from vmim.fleet import service

    cfg = os.path.join(ROOT, "vmimagemanager.cfg.template")
    assert service.main(["--config", cfg, "--host-name", "web.box.a",
                         "--print-permissions"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "host name 'web.box.a' (--host-name): a word 'box'" in err.err
    assert service.main(["--config", cfg, "--host-name", "box.web", "--print-permissions"]) == 0
    assert "rabbitmqctl add_user box.web" in capsys.readouterr().out

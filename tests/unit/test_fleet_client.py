"""The fleet client's reading of what comes from the broker, without a broker: which replies it
believes (their validated user_id) and what each error of the connection becomes. The same
on a real broker: tests/fleet/test_fleet_trust.py, tests/fleet/test_fleet_bounds.py."""

from __future__ import annotations

import errno
import json
import socket
import time

import amqp
import pytest

from vmim.errors import HostEnvironmentError, LockBusyError
from vmim.fleet import protocol, transport
from vmim.fleet.client import Client


class Message:
    def __init__(self, body: dict, corr: str, user_id=None):
        self.body = json.dumps(dict(body, v=protocol.VERSION)).encode()
        self.properties = {"correlation_id": corr, "user_id": user_id}


def client(user: str = "ci") -> Client:
    c = Client.__new__(Client)  # no connection: only what reads messages and errors
    c.spec = transport.BrokerSpec(f"amqp://{user}:pw@mq.example.org//")
    c.user, c.inbox, c.awaited, c.broadcast = user, [], {"a" * 32, "d" * 32}, {"d" * 32}
    c.nacked = set()
    c.reply_to = "vmim.reply." + "c" * 32
    return c


@pytest.mark.parametrize("user_id,ok", [("h1", True), ("ci", True), ("h2", False),
                                        (None, False)])
def test_a_reply_is_believed_only_from_the_user_of_the_host_it_names(user_id, ok):
    c = client()
    c._on_reply(Message({"type": "here", "host": "h1"}, "a" * 32, user_id))
    if ok:
        assert c.wait(time.monotonic() + 1)[1].host == "h1"
        return
    with pytest.raises(HostEnvironmentError) as exc:
        c.wait(time.monotonic() + 1)
    assert exc.value.exit_code == 7
    assert "in the name of host h1" in str(exc.value)
    assert f"from broker user {user_id or '(none)'}" in str(exc.value)


def test_a_forged_or_undecodable_reply_to_a_list_request_is_dropped_not_the_end(caplog):
    """Every host sees a list request (the control fanout): one of them answering in another's
    name, or with what is no reply, would otherwise end every client's -l with exit 7."""
    c = client()
    c._on_reply(Message({"type": "lists", "host": "h1", "exit_code": 0, "doc": {},
                         "stderr": []}, "d" * 32, "h2"))
    bad = Message({}, "d" * 32, "h2")
    bad.body = b"{not json"
    c._on_reply(bad)
    assert c.inbox == []
    assert "in the name of host h1" in caplog.text and "from broker user h2" in caplog.text
    assert "dropped a malformed reply to the list request from broker user h2" in caplog.text
    c._on_reply(Message({"type": "here", "host": "h1"}, "d" * 32, "h1"))
    assert c.wait(time.monotonic() + 1)[1].host == "h1"  # the real one still counts


def test_a_hosts_own_malformed_reply_to_a_list_request_is_its_answer_an_error():
    c = client()
    c._on_reply(Message({"type": "lists", "host": "h1", "exit_code": "zero"}, "d" * 32, "h1"))
    corr, refused = c.wait(time.monotonic() + 1)
    assert corr == "d" * 32 and refused.host == "h1" and "exit_code" in refused.why


def test_a_reply_to_what_the_client_did_not_ask_is_not_read_whoever_sent_it():
    c = client()
    c._on_reply(Message({"type": "here", "host": "h1"}, "b" * 32, "h2"))
    assert c.inbox == []


@pytest.mark.parametrize("exc,kind,words", [
    (amqp.exceptions.AccessRefused("Login was refused"), HostEnvironmentError,
     "refused user ci: wrong password"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), transport.BrokerLost, "lost the broker"),
    (socket.timeout("timed out"), transport.BrokerLost, "lost the broker"),
    (OSError(errno.ENOSPC, "No space left on device"), HostEnvironmentError,
     "an error of this host, not of the broker"),
])
def test_each_error_of_the_broker_connection_is_read_in_one_place(exc, kind, words):
    err = client()._error(exc)
    assert isinstance(err, kind) and words in str(err), err
    assert "pw@" not in str(err)  # the URL is shown without its password


def test_an_error_that_is_not_the_brokers_stays_what_it_is():
    bug = KeyError("x")
    assert client()._error(bug) is bug
    busy = LockBusyError("busy")
    assert client()._error(busy) is busy


class Nacking:
    def publish(self, *args, **kwargs):
        raise amqp.exceptions.MessageNacked()


def test_a_job_the_broker_refuses_for_a_full_queue_is_exit_5():
    c = client()
    c.publisher = Nacking()
    with pytest.raises(LockBusyError) as exc:
        c.publish(b"{}", "a" * 32, protocol.JOBS, "box.x")
    assert exc.value.exit_code == 5 and "full" in str(exc.value)


def test_a_list_request_one_full_queue_refused_goes_on_to_the_other_hosts():
    """A list request goes to every worker's queue on the control fanout: one full queue
    makes the broker refuse (nack) it, though the others took it. It is noted (the lists
    say so and exit 5: tests/unit/test_terminal_depth.py), not the end of the run."""
    c = client()
    c.publisher = Nacking()
    assert c.publish(b"{}", "d" * 32, protocol.CONTROL, "", mandatory=False) is True
    assert c.nacked == {"d" * 32}

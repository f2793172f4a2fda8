"""The test rig's private RabbitMQ node (tests/fleet/broker.py): a node that cannot start under
its first name and ports (here: its port is taken) is started again once under a new name."""

from __future__ import annotations

import socket

from tests.fleet import broker as broker_mod


def test_a_node_whose_port_is_taken_starts_again_under_a_new_name(tmp_path):
    b = broker_mod.Broker(str(tmp_path))
    first, first_port = b.node, b.port
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", first_port))
    blocker.listen(1)
    try:
        b.start(timeout=60)
        try:
            assert b.node != first and b.port != first_port
            assert b.ctl("status").returncode == 0  # the node of the second start runs
        finally:
            b.stop()
    finally:
        blocker.close()
    assert not epmds(b.epmd_ports)  # stopped: neither start's epmd is left


def epmds(ports) -> list:
    import subprocess

    out = subprocess.run(["pgrep", "epmd"], capture_output=True, text=True).stdout.split()
    left = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        if any(f"ERL_EPMD_PORT={p}".encode() in environ for p in ports):
            left.append(pid)
    return left

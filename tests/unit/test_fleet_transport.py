"""vmim/fleet/transport.py without a broker: which errors are the broker connection's and
which the host's, and the TLS files (an unreadable one is exit 3, named)."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from vmim.errors import EXIT_CONFIG, ConfigError
from vmim.fleet import transport


def test_a_lost_connection_is_told_from_an_error_of_the_host():
    for exc in (ConnectionResetError(errno.ECONNRESET, "reset"), BrokenPipeError(errno.EPIPE, "x"),
                ConnectionRefusedError(errno.ECONNREFUSED, "refused"), socket.timeout("timed out"),
                OSError("Server unexpectedly closed connection"), ssl.SSLError("bad record"),
                socket.gaierror(-2, "Name or service not known"), EOFError(),
                transport.BrokerLost("gone")):
        assert transport.lost(exc), exc
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                IsADirectoryError(errno.EISDIR, "Is a directory"),
                PermissionError(errno.EACCES, "Permission denied"),
                FileNotFoundError(errno.ENOENT, "No such file"), OSError(errno.EMFILE, "files"),
                ValueError("bug"), ConfigError("x")):
        assert not transport.lost(exc), exc
    amqp = pytest.importorskip("amqp")
    assert transport.lost(amqp.exceptions.RecoverableConnectionError("gone"))
    assert transport.BrokerLost("x").exit_code == 7


@pytest.mark.parametrize("key", ["ca", "cert", "key"])
def test_an_unreadable_tls_file_is_exit_3_naming_it(tmp_path, key):
    missing = str(tmp_path / f"no-{key}.pem")
    readable = tmp_path / "readable.pem"
    readable.write_text("x\n")  # read before it is parsed: the unreadable one is named first
    files = {"ca": None, "cert": str(readable), "key": None}
    files[key] = missing
    spec = transport.BrokerSpec("amqps://127.0.0.1:1//", **files)
    with pytest.raises(ConfigError) as err:
        transport.tls_context(spec)
    assert err.value.exit_code == EXIT_CONFIG
    assert f"broker_{key} {missing}: cannot read it" in str(err.value)
    files[key] = str(tmp_path)  # a directory
    with pytest.raises(ConfigError, match=f"broker_{key} {tmp_path}: cannot read it"):
        transport.tls_context(transport.BrokerSpec("amqps://127.0.0.1:1//", **files))


def test_a_tls_file_that_holds_no_certificate_is_exit_3_naming_it(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"broker_cert {junk}"):
        transport.tls_context(transport.BrokerSpec("amqps://127.0.0.1:1//", cert=str(junk)))
    with pytest.raises(ConfigError, match=f"broker_ca {junk}"):
        transport.tls_context(transport.BrokerSpec("amqps://127.0.0.1:1//", ca=str(junk)))


def test_a_client_with_an_unreadable_key_is_exit_3_before_any_connection(tmp_path):
    pytest.importorskip("kombu")
    from vmim.fleet.client import Client

    key, cert = str(tmp_path / "client.key"), tmp_path / "c.pem"
    cert.write_text("x\n")
    with pytest.raises(ConfigError, match=f"broker_key {key}: cannot read it"):
        Client(transport.BrokerSpec("amqps://127.0.0.1:1//", cert=str(cert), key=key))


def test_a_channels_messages_keep_a_compressed_body_as_it_came():
    """kombu inflates a body whose `compression` header names a codec before anyone sees it (a
    thousandfold); a channel of transport.channel() keeps it as it came (no JSON: refused)."""
    import zlib

    import amqp
    from kombu.transport import pyamqp

    class Conn:
        def channel(self):
            return type("Channel", (), {"Message": pyamqp.Message})()

    ch = transport.channel(Conn())
    bomb = zlib.compress(bytes(1 << 20))
    raw = amqp.Message(bomb, application_headers={"compression": "application/x-gzip"})
    raw.delivery_info = {"delivery_tag": 1, "exchange": "vmim.jobs.topic", "routing_key": "any"}
    assert pyamqp.Message(raw, channel=None).body == bytes(1 << 20)  # kombu's own: inflated
    raw.properties["application_headers"] = {"compression": "application/x-gzip"}
    assert ch.Message(raw, channel=ch).body == bomb

"""The broker connection, for the client and the worker alike: kombu with publisher confirms
(each waited for CONFIRM_TIMEOUT at most) and, for amqps://, TLS from files that are checked
(an unreadable one is a config error naming it, exit 3); connecting with one quick retry;
publishing that tells when a mandatory message came back (no queue took it: an unknown box, a
client that is gone); and which errors are the broker's (a lost connection: BrokerLost, exit 7)
and which the host's (a full disk, an unreadable file: not the broker's)."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any, List, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from vmim.errors import ConfigError, HostEnvironmentError, UsageError
from vmim.fleet.protocol import HEARTBEAT

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0  # seconds a close waits for the broker's answer
CONFIRM_TIMEOUT = 30.0  # seconds a publish waits for the broker's confirm (a resource alarm
# blocks publishers: the wait must end)
#: errno values of a network connection gone wrong (any other errno is the host's)
NET_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
              errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
              errno.ENOTCONN, errno.EHOSTDOWN, errno.ESHUTDOWN}


class BrokerLost(HostEnvironmentError):
    """The connection to the broker was lost or never made (exit 7) — not an error of the
    host the command runs on."""


@dataclass(frozen=True)
class BrokerSpec:
    url: str
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    @property
    def shown(self) -> str:
        """The URL without its password, for messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def user(self) -> str:
        """The broker user of the URL (kombu's default: guest)."""
        return unquote(urlsplit(self.url).username or "") or "guest"


def connection(spec: BrokerSpec, heartbeat: int = HEARTBEAT) -> Any:
    """A kombu connection with publisher confirms (a mandatory publish that no queue takes
    comes back before the confirm) and, for amqps://, TLS with the configured CA/cert/key."""
    try:
        import kombu
    except ImportError:
        raise HostEnvironmentError("the fleet needs the Python package kombu "
                                   "(Debian: python3-kombu; pip install kombu)") from None
    ssl_opt: Any = None
    if spec.url.startswith("amqps://"):
        ssl_opt = tls_context(spec)
    elif spec.ca or spec.cert:
        raise UsageError(f"broker_ca/broker_cert are set but the broker URL {spec.shown} is not "
                         "amqps://")
    return kombu.Connection(spec.url, heartbeat=heartbeat, ssl=ssl_opt,
                            connect_timeout=CONNECT_TIMEOUT,
                            transport_options={"confirm_publish": True})


def channel(conn: Any) -> Any:
    """A channel of conn whose messages keep their body as it came. kombu inflates a body whose
    `compression` header names a codec (zlib, bz2, lzma) when it makes the message, before any
    size limit of ours: a body the broker takes would become a thousand times larger in the
    memory of the worker (root on a hypervisor) or the client. The header is dropped instead:
    a compressed body is no JSON, and is refused as any other (vmim.fleet.protocol)."""
    ch = conn.channel()
    base = getattr(ch, "Message", None)
    if isinstance(base, type):
        ch.Message = type("RawMessage", (base,), {"__init__": _raw_init(base)})
    return ch


def _raw_init(base: type) -> Any:
    def __init__(self: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
        props = getattr(msg, "properties", None)
        headers = props.get("application_headers") if isinstance(props, dict) else None
        if isinstance(props, dict) and isinstance(headers, dict) and "compression" in headers:
            props["application_headers"] = {k: v for k, v in headers.items()
                                            if k != "compression"}
        base.__init__(self, msg, *args, **kwargs)  # type: ignore[misc]

    return __init__


def tls_context(spec: BrokerSpec) -> ssl.SSLContext:
    """The TLS context of broker_ca, broker_cert and broker_key: a file that cannot be read,
    or does not hold what it should, is a ConfigError naming it (exit 3)."""
    files = [("broker_ca", spec.ca), ("broker_cert", spec.cert), ("broker_key", spec.key)]
    for key, path in files:
        if path:
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                raise ConfigError(f"{key} {path}: cannot read it: "
                                  f"{exc.strerror or exc}") from None
    try:
        ctx = ssl.create_default_context(cafile=spec.ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"broker_ca {spec.ca}: not a CA certificate file: {exc}") from None
    if spec.cert:
        try:
            ctx.load_cert_chain(spec.cert, spec.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"broker_cert {spec.cert}, broker_key {spec.key or '(in the cert)'}"
                              f": not a certificate and its private key: {exc}") from None
    return ctx


def close(conn: Any, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close the connection, waiting `timeout` seconds at most for the broker's answer (the
    AMQP close waits for one, without end, from a broker that froze or lost the network)."""
    try:
        sock = getattr(conn._connection, "sock", None) if conn._connection else None
        if sock is not None:
            sock.settimeout(timeout)
        conn.release()
    except Exception:  # noqa: BLE001 - the connection may be broken already
        try:
            conn.collect()  # forget it without talking to the broker
        except Exception:  # noqa: BLE001
            pass


def connect(conn: Any) -> None:
    """Connect now: one attempt and one immediate retry (kombu's connect() waits 2 s first)."""
    conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0)


class Publisher:
    """A producer on a channel that knows whether its last mandatory publish came back."""

    def __init__(self, channel: Any, user_id: Optional[str] = None):
        import kombu

        self.user_id = user_id  # set on every message: the broker checks it is the connection's
        self.returned: List[Any] = []
        self.producer = kombu.Producer(channel, on_return=self._on_return)

    def _on_return(self, exc: Any, exchange: Any, routing_key: Any, message: Any) -> None:
        self.returned.append(routing_key)

    def publish(self, body: bytes, *, routing_key: str, exchange: str = "",
                mandatory: bool = False, reply_to: Optional[str] = None,
                correlation_id: Optional[str] = None, expiration: Optional[float] = None,
                persistent: bool = False) -> bool:
        """Publish and wait for the broker's confirm; False when a mandatory message came
        back (no queue is bound for it)."""
        self.returned = []
        self.producer.publish(body, exchange=exchange, routing_key=routing_key,
                              reply_to=reply_to, correlation_id=correlation_id,
                              content_type="application/json", content_encoding="utf-8",
                              serializer=None, delivery_mode=2 if persistent else None,
                              mandatory=mandatory, expiration=expiration,
                              confirm_timeout=CONFIRM_TIMEOUT,
                              **({"user_id": self.user_id} if self.user_id else {}))
        return not self.returned

    def reply(self, body: bytes, *, routing_key: str, correlation_id: Optional[str],
              mandatory: bool = False) -> bool:
        """Publish to a client's reply queue: False when the reply did not arrive there — no
        such queue (mandatory), or the broker refused it (nacked: a queue its client declared
        with a length of 0 and reject-publish, say). A client chooses its reply queue and
        its arguments: what that queue does is the client's loss, never the worker's (the
        nack once raised in the worker, which dropped its connection and so aborted every
        job of the host; a job with such a reply queue came back after each reconnect).
        Only a lost connection raises."""
        import amqp

        try:
            return self.publish(body, routing_key=routing_key, correlation_id=correlation_id,
                                mandatory=mandatory)
        except amqp.exceptions.MessageNacked:
            log.warning("the broker refused a reply to %s (nacked: its client's queue takes "
                        "nothing): that client does not get it", routing_key)
            return False


def connection_errors() -> tuple:
    """What a lost or refused broker connection raises (socket, AMQP and kombu errors)."""
    errors: tuple = (OSError, EOFError)
    try:
        import amqp
        import kombu.exceptions

        errors += (amqp.exceptions.ConnectionError, amqp.exceptions.RecoverableConnectionError,
                   kombu.exceptions.OperationalError, kombu.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return errors


def lost(exc: BaseException) -> bool:
    """Whether `exc` is the broker connection's (lost, refused, timed out, a TLS or AMQP
    error) rather than the host's: an OSError with an errno of its own (a full disk, a
    missing file, no memory) is the host's, one of a network connection the broker's."""
    if isinstance(exc, BrokerLost):
        return True
    if isinstance(exc, (ssl.SSLError, socket.timeout, socket.gaierror, EOFError)):
        return True
    if isinstance(exc, OSError):  # py-amqp: "Server unexpectedly closed connection" (no errno)
        return exc.errno is None or exc.errno in NET_ERRNOS
    return isinstance(exc, connection_errors())


def refusals() -> tuple:
    """What a broker's refusal raises: 403 access refused, 404 not found and the like."""
    try:
        import amqp

        return (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)
    except ImportError:  # pragma: no cover
        return ()

"""libvirt: connection, domain discovery and state.

libvirt-python is imported only here and only when a connection is needed, so that
--help, --version and --print-config never load it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from vmim import signals
from vmim.errors import ConfigError, HostEnvironmentError, OperationError, StateError

log = logging.getLogger(__name__)

#: libvirt's virDomainState codes, as the words the lists show.
STATE_NAMES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended",
}
UNDEFINED = "undefined"
#: Seconds between ACPI shutdown requests (a guest still booting may miss the first).
SHUTDOWN_RESEND = 5.0
#: Seconds of a graceful shutdown after which the wait is said (a guest that ignores ACPI
#: keeps the command silent for the whole timeout otherwise).
SHUTDOWN_SAY = 5.0


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: str
    persistent: bool

    @property
    def is_shut_off(self) -> bool:
        return self.state == "shut off"


def _import_libvirt() -> Any:
    try:
        import libvirt  # noqa: PLC0415 — deliberately lazy
    except ImportError as exc:
        raise HostEnvironmentError(
            f"the Python module 'libvirt' cannot be imported ({exc}); install libvirt-python"
        ) from None
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


#: the sockets a system daemon listens on (monolithic libvirtd, modular virtqemud)
SYSTEM_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock")


def _daemon_listens(uri: str) -> bool:
    """Whether the system daemon is there (its socket exists): then a non-root user who cannot
    connect lacks the permission, whatever libvirt's own message says (without polkit it
    talks of a missing system bus)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    given = parse_qs(parts.query).get("socket")
    if given:
        return os.path.exists(given[0])
    if parts.hostname or "+" in parts.scheme and not parts.scheme.endswith("+unix"):
        return True  # a remote daemon: it answered or not, nothing local to look at
    return any(os.path.exists(p) for p in SYSTEM_SOCKETS)


def connect(uri: str) -> Hypervisor:
    libvirt = _import_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        message = exc.get_error_message() or ""
        if os.geteuid() != 0 and _daemon_listens(uri):
            # The daemon is there but refused a user: the socket is root's and the libvirt group's.
            advice = ("run vmimagemanager as root, or as a member of the 'libvirt' group "
                      "(adduser USER libvirt) for the lists; disk actions need root anyway")
        else:
            advice = ("is libvirtd running? Start it with 'systemctl start libvirtd' "
                      "(without systemd: 'virtlogd -d && libvirtd -d'), or set vmemulator in "
                      "the config or give --connect URI")
        raise HostEnvironmentError(
            f"could not connect to libvirt at '{uri}': {message}; {advice}") from None
    return Hypervisor(uri, conn, libvirt)


def _reported(method: Any) -> Any:
    """A query libvirt fails (daemon gone, connection dropped) is exit 7, not a traceback."""

    @functools.wraps(method)
    def wrapper(self: Hypervisor, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self.libvirt.libvirtError as exc:
            raise HostEnvironmentError(f"libvirt at '{self.uri}' failed: "
                                       f"{exc.get_error_message()}") from None

    return wrapper


class Hypervisor:
    """An open libvirt connection."""

    def __init__(self, uri: str, conn: Any, libvirt: Any):
        self.uri = uri
        self.conn = conn
        self.libvirt = libvirt

    def close(self) -> None:
        try:
            self.conn.close()
        except self.libvirt.libvirtError:  # pragma: no cover - closing a dead connection
            pass

    @_reported
    def domains(self) -> Dict[str, DomainInfo]:
        """Every domain libvirt knows, running or defined, by name."""
        out: Dict[str, DomainInfo] = {}
        for dom in self.conn.listAllDomains(0):
            info = self._info(dom)
            if info is not None:
                out[info.name] = info
        return out

    @_reported
    def domain(self, name: str) -> Optional[DomainInfo]:
        dom = self._find(name)
        return self._info(dom) if dom is not None else None

    def _find(self, name: str) -> Any:
        """The libvirt domain object, or None when libvirt does not know the name."""
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError as exc:
            if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    # ------------------------------------------------------------------ lifecycle

    def _lookup(self, name: str) -> Any:
        dom = self._find(name)
        if dom is None:
            raise StateError(f"box '{name}': libvirt does not know this domain")
        return dom

    def _state(self, dom: Any) -> str:
        return STATE_NAMES.get(dom.state()[0], "no state")

    def definition(self, name: str) -> Optional[str]:
        """libvirt's persistent definition of a domain (the inactive XML), None when it has
        none or cannot say."""
        try:
            dom = self._find(name)
            if dom is None:
                return None
            return str(dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE))
        except self.libvirt.libvirtError:
            return None

    def define(self, xml: str) -> None:
        try:
            self.conn.defineXML(xml)
        except self.libvirt.libvirtError as exc:
            raise ConfigError(f"libvirt refused the domain XML: {exc.get_error_message()}") from None

    def start(self, name: str, *, vcpus: Optional[int] = None, wait: float = 30) -> str:
        """Start the domain; wait until it runs. Already running: nothing is done."""
        dom = self._lookup(name)
        state = self._state(dom)
        if state in ("running", "blocked"):
            if vcpus:
                log.warning("box %s: already running; --core %d not applied", name, vcpus)
            return "already running"
        if state == "paused":
            self._call(name, "resume", dom.resume)
            return "resumed (it was paused)"
        if state == "suspended":
            self._call(name, "wake up", lambda: dom.pMWakeup(0))
            return "woken up (it was suspended)"
        if state not in ("shut off", "crashed", "no state"):
            raise StateError(f"box '{name}': domain is {state}; cannot start it now")
        if state == "crashed":
            self._call(name, "destroy", dom.destroy)
        if vcpus:
            self.set_vcpus(dom, vcpus)
        self._call(name, "start", dom.create)
        deadline = time.monotonic() + wait
        while self._state(dom) not in ("running", "blocked"):
            if time.monotonic() > deadline:
                raise OperationError(f"box '{name}': domain not running {wait:.0f} s after start")
            signals.sleep(0.1)
        return "started"

    def set_vcpus(self, dom: Any, vcpus: int) -> None:
        lv = self.libvirt
        flags = lv.VIR_DOMAIN_AFFECT_CONFIG
        try:
            if vcpus > dom.vcpusFlags(flags | lv.VIR_DOMAIN_VCPU_MAXIMUM):
                dom.setVcpusFlags(vcpus, flags | lv.VIR_DOMAIN_VCPU_MAXIMUM)
            dom.setVcpusFlags(vcpus, flags)
        except lv.libvirtError as exc:
            raise OperationError(f"box '{dom.name()}': cannot set {vcpus} vCPUs: "
                                 f"{exc.get_error_message()}") from None

    def destroy(self, name: str) -> str:
        """Force the domain off now."""
        dom = self._lookup(name)
        if not dom.isActive():
            return "already shut off"
        self._call(name, "force off", dom.destroy)
        return "forced off"

    def shutdown(self, name: str, timeout: float) -> str:
        """Graceful ACPI shutdown; forced off after timeout seconds (with a warning)."""
        dom = self._lookup(name)
        state = self._state(dom)
        if state == "shut off" or not dom.isActive():
            return "already shut off"
        if state == "crashed":
            self._call(name, "force off", dom.destroy)
            return "forced off (it had crashed)"
        if state == "paused":
            # A paused guest cannot see the power button: let it run to answer it.
            self._call(name, "resume", dom.resume)
        elif state == "suspended":
            try:
                dom.pMWakeup(0)
            except self.libvirt.libvirtError:
                self._call(name, "force off", dom.destroy)
                return "forced off (it was suspended and would not wake up)"
        started = time.monotonic()
        last_request = -SHUTDOWN_RESEND
        said = False
        while dom.isActive():
            from vmim.process import check_cancelled

            check_cancelled()
            now = time.monotonic() - started
            if now >= timeout:
                log.warning("box %s: domain did not shut down within %d s; forcing it off",
                            name, timeout)
                self._call(name, "force off", dom.destroy)
                return f"forced off after {timeout:.0f} s without a graceful shutdown"
            if not said and now >= SHUTDOWN_SAY:
                log.info("box %s: waiting for the guest to shut down; forced off after %d s "
                         "(-k forces it off at once, --timeout S waits less)", name, timeout)
                said = True
            if state != "shutting down" and now - last_request >= SHUTDOWN_RESEND:
                try:
                    dom.shutdownFlags(self.libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                except self.libvirt.libvirtError as exc:
                    if not dom.isActive():
                        break
                    log.debug("shutdown request to %s failed: %s", name, exc)
                last_request = now
            signals.sleep(0.2)
        return f"shut down in {time.monotonic() - started:.1f} s"

    def _call(self, name: str, what: str, fn: Any) -> Any:
        try:
            return fn()
        except self.libvirt.libvirtError as exc:
            raise OperationError(f"box '{name}': libvirt could not {what} the domain: "
                                 f"{exc.get_error_message()}") from None

    @_reported
    def disk_users(self, path: str, *, defined: bool = False) -> List[str]:
        """Names of active domains (with `defined`, of every domain libvirt knows) with a disk
        whose source is path (same file or device)."""
        users = []
        flags = 0 if defined else self.libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        for dom in self.conn.listAllDomains(flags):
            try:
                xml = dom.XMLDesc(0)
            except self.libvirt.libvirtError:
                continue
            if any(_same_file(src, path) for src in disk_sources(xml)):
                users.append(dom.name())
        return users

    def _info(self, dom: Any) -> Optional[DomainInfo]:
        try:
            state, _reason = dom.state()
            return DomainInfo(
                name=dom.name(),
                state=STATE_NAMES.get(state, f"state {state}"),
                persistent=bool(dom.isPersistent()),
            )
        except self.libvirt.libvirtError as exc:
            # A transient domain can vanish between listing and asking.
            if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise


def disk_sources(xml: str) -> List[str]:
    """The file and block-device sources of a domain's disks."""
    from xml.etree import ElementTree

    root = ElementTree.fromstring(xml)
    out = []
    for src in root.findall("./devices/disk/source"):
        path = src.get("file") or src.get("dev")
        if path:
            out.append(path)
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)

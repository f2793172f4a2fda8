"""A private RabbitMQ node for tests and benchmarks: started without systemd, on ports of its
own, with its data, logs, pid file and Erlang cookie under one directory, so it never touches a
system broker. Stopped by its pid file, then its epmd by pid: nothing is left running."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def missing() -> str:
    """Empty when a node can be started here, else why not."""
    if not os.path.exists(SERVER):
        return "rabbitmq-server is not installed (make test installs it: tools/setup-host)"
    try:
        import kombu  # noqa: F401
    except ImportError:
        return "kombu is not installed (pip install -e '.[test]')"
    return ""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> List[int]:
    """n distinct ports free now (all held open while they are picked), so that two test
    sessions on one machine — each with its own node — do not collide."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Broker:
    def __init__(self, base: str, name: str = "vmimtest"):
        self.base = base
        self.name = name
        self._new_identity()
        self.pidfile = os.path.join(base, "rabbit.pid")
        self.proc: Optional[subprocess.Popen] = None
        self.epmd_pids: List[int] = []

    def _new_identity(self) -> None:
        """A node name no other node has (a leftover node of a killed run, another session:
        a fixed name would collide) and ports free now."""
        self.node = f"{self.name}{os.getpid()}x{secrets.token_hex(4)}@localhost"
        self.port, self.dist_port, self.epmd_port = free_ports(3)
        self.epmd_ports = [*getattr(self, "epmd_ports", []), self.epmd_port]  # all, to stop

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> Dict[str, str]:
        b = self.base
        env = dict(os.environ)
        env.update({
            "HOME": os.path.join(b, "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": os.path.join(b, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(b, "log"),
            "RABBITMQ_PID_FILE": self.pidfile,
            "RABBITMQ_CONFIG_FILE": os.path.join(b, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(b, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(b, "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(b, "rabbitmq-env.conf"),
        })
        return env

    def start(self, timeout: float = 120) -> None:
        """Start the node; when it does not come up, once more with a new name and ports (a
        port taken meanwhile, a name in use), then give up with the reason."""
        try:
            self._start(timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            shutil.rmtree(os.path.join(self.base, "mnesia"), ignore_errors=True)
            self._new_identity()
            self._start(timeout)

    def _start(self, timeout: float) -> None:
        b = self.base
        for d in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(b, d), exist_ok=True)
        if not os.path.exists(os.path.join(b, "rabbitmq.conf")):
            with open(os.path.join(b, "rabbitmq.conf"), "w") as fh:
                # a long restore must not hit the default 30 min delivery-acknowledgement timeout
                fh.write("consumer_timeout = 7200000\nheartbeat = 10\n"
                         "disk_free_limit.absolute = 10MB\n")
            with open(os.path.join(b, "enabled_plugins"), "w") as fh:
                fh.write("[].\n")
            with open(os.path.join(b, "rabbitmq-env.conf"), "w") as fh:
                fh.write("")
        log = open(os.path.join(b, "log", "server.out"), "ab")
        self.proc = subprocess.Popen([SERVER], env=self.env(), stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            subprocess.run([CTL, "--timeout", str(int(timeout)), "wait", self.pidfile],
                           env=self.env(), check=True, capture_output=True, timeout=timeout + 10)
        except BaseException:
            self.stop()
            raise
        self._note_epmd()

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CTL, *args], env=self.env(), capture_output=True, text=True,
                              timeout=60)

    def _note_epmd(self) -> None:
        """The epmds our node started: those listening on our own epmd ports."""
        out = subprocess.run(["pgrep", "-a", "epmd"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, cmd = line.partition(" ")
            if pid.isdigit() and int(pid) not in self.epmd_pids:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        environ = fh.read().split(b"\0")
                except OSError:  # gone meanwhile (another test run's epmd, say)
                    continue
                if any(f"ERL_EPMD_PORT={port}".encode() in environ or f"-port {port}" in cmd
                       for port in self.epmd_ports):  # a failed first start's epmd too
                    self.epmd_pids.append(int(pid))

    def stop_node(self) -> None:
        """Stop the node (keep its data: a restart finds its durable queues and messages)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.ctl("stop", self.pidfile)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # beam.smp may outlive the wrapper script: end it by its pid file
        try:
            with open(self.pidfile) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid:
            _kill_and_wait(pid)
        self.proc = None

    def stop(self) -> None:
        self.stop_node()
        self._note_epmd()
        for pid in self.epmd_pids:
            _kill_and_wait(pid)
        self.epmd_pids = []


def _kill_and_wait(pid: int, grace: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def remove(base: str) -> None:
    shutil.rmtree(base, ignore_errors=True)

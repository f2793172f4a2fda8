"""Fleet tier: a private RabbitMQ node (tests/fleet/broker.py) and workers on this machine, each
with its own config, slots, lock directory, mount base and state directory, as hosts h1, h2, h3
sharing one image store (as over NFS). Needs root and libvirtd like the integration tier, and
rabbitmq-server + kombu (`make test` installs both)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest

from tests.fleet import broker as broker_mod
from tests.integration import diskimages as di
from tests.rig import _test_root, _traversable_tmp, no_leaks, skip_without_host  # noqa: F401
from vmim.disk import mounts
from vmim.fleet import permissions, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTS = ("h1", "h2", "h3")
BIG = ("h1a", "h2a")  # slots large enough for the slow restore of the kill -9 test
#: slots with a standby disk
STANDBY = {"h3b"}


def pytest_collection_modifyitems(config, items):
    skip_without_host(items, os.path.dirname(__file__))
    why = broker_mod.missing()
    if why:
        for item in items:
            if str(item.fspath).startswith(os.path.dirname(__file__)):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A private RabbitMQ node for the session; always stopped with its epmd at the end."""
    base = str(tmp_path_factory.mktemp("rabbit"))
    b = broker_mod.Broker(base)
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Run:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self) -> dict:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["VMIM_CFG"] = "/nonexistent/vmim.cfg"  # a client needs no config (no slots)
    e.pop("VMIM_BROKER", None)
    return e


class Fleet:
    """Hosts (configs, slots) and their worker processes."""

    def __init__(self, root: str, broker: broker_mod.Broker):
        self.root = root
        self.broker = broker
        self.images = os.path.join(root, "images")
        self.inserts = os.path.join(root, "inserts")
        self.configs: Dict[str, str] = {}
        self.slots: Dict[str, List[str]] = {}
        self.workers: Dict[str, subprocess.Popen] = {}
        self.logs: Dict[str, str] = {}
        self.urls: Dict[str, str] = {}  # each host's broker URL: its own user (docs/fleet.md)

    def slot_disk(self, box: str) -> str:
        return os.path.join(self.root, box[:2], box + ".img")

    def mount_of(self, box: str) -> str:
        return os.path.join(self.root, box[:2], "mnt", box)

    def write_host(self, host: str, blank: str, big: str, count: int = 2) -> None:
        d = os.path.join(self.root, host)
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        boxes = [f"{host}{chr(ord('a') + i)}" for i in range(count)]
        lines = ["[vmim.local]", f'mount = "{d}/mnt"', f'lockdir = "{d}/locks"',
                 f'statedir = "{d}/state"', f'vmimages = "{self.images}"',
                 f'vminserts = "{self.inserts}"', 'vmemulator = "qemu:///system"']
        for box in boxes:
            src = big if box in BIG else blank
            subprocess.run(["cp", "--sparse=always", src, self.slot_disk(box)], check=True)
            lines += [f"[vmim.vm.{box}]", f'HostName = "{box}"', f'root = "{self.slot_disk(box)}"']
            if box in STANDBY:  # a second disk to stage images into (vmim.standby)
                spare = self.slot_disk(box)[:-len(".img")] + ".standby.img"
                subprocess.run(["cp", "--sparse=always", blank, spare], check=True)
                lines.append(f'standby = "{spare}"')
        path = os.path.join(d, "vmim.cfg")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.configs[host] = path
        self.slots[host] = boxes

    def start(self, host: str, *extra: str) -> subprocess.Popen:
        logpath = os.path.join(self.root, f"worker-{host}.log")
        with open(logpath, "a") as fh:
            fh.write(f"--- start {time.time()}\n")
        start_at = os.path.getsize(logpath)
        log = open(logpath, "ab")
        if host not in self.urls:  # once: deleting a user closes its connections
            self.urls[host] = add_host_user(self.broker, host, self.slots[host])
        url = self.urls[host]
        p = subprocess.Popen([sys.executable, "-m", "vmim", "worker", "--config",
                              self.configs[host], "--broker", url, "--host-name",
                              host, *extra], stderr=log, stdout=log, stdin=subprocess.DEVNULL,
                             env=env(), start_new_session=True)
        log.close()
        self.workers[host] = p
        self.logs[host] = logpath
        self.wait_log(host, f"worker {host}: ready", start_at)
        return p

    def wait_log(self, host: str, text: str, start_at: int = 0, timeout: float = 30) -> None:
        p, logpath = self.workers[host], self.logs[host]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(logpath) as fh:
                fh.seek(start_at)
                if text in fh.read():
                    return
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker {host} did not log {text!r}:\n" + open(logpath).read())

    def log_since(self, host: str, start_at: int) -> str:
        with open(self.logs[host]) as fh:
            fh.seek(start_at)
            return fh.read()

    def log_size(self, host: str) -> int:
        return os.path.getsize(self.logs[host])

    def overlapping_jobs(self) -> int:
        """Any-free jobs that held a slot while another job of the fleet held it too, from the
        workers' journals (start and end of each job)."""
        import glob

        spans: Dict[str, List[tuple]] = {}
        for path in glob.glob(os.path.join(self.root, "h*", "state", "fleet", "jobs", "*.json")):
            with open(path) as fh:
                e = json.load(fh)
            if e.get("state") == "done" and e.get("started"):
                spans.setdefault(f"{e['box']}", []).append((e["started"], e["finished"]))
        overlaps = 0
        for s in spans.values():
            s.sort()
            overlaps += sum(1 for a, b in zip(s, s[1:]) if b[0] < a[1])
        return overlaps

    def log(self, host: str) -> str:
        with open(self.logs[host]) as fh:
            return fh.read()

    def stop(self, host: str, timeout: float = 60) -> Optional[int]:
        p = self.workers.pop(host, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
                raise AssertionError(f"worker {host} did not stop on SIGTERM") from None
        return p.returncode

    def signal_group(self, host: str, sig: int) -> None:
        os.killpg(self.workers[host].pid, sig)

    def kill9(self, host: str) -> None:
        """SIGKILL the worker and every process of its session (its job's command too)."""
        p = self.workers.pop(host)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _session_pids(p.pid):
            time.sleep(0.05)

    def vmim(self, *argv: str, timeout: float = 120) -> Run:
        """The command line as a client: --broker, no config of its own."""
        res = subprocess.run([sys.executable, "-m", "vmim", "--broker", self.broker.url, *argv],
                             capture_output=True, text=True, env=env(), timeout=timeout)
        return Run(res.returncode, res.stdout, res.stderr)

    def spawn(self, *argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "vmim", "--broker", self.broker.url,
                                 *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env())

    def local(self, host: str, *argv: str) -> Run:
        res = subprocess.run([sys.executable, "-m", "vmim", "--local", "--config",
                              self.configs[host], *argv], capture_output=True, text=True,
                             env=env(), timeout=120)
        return Run(res.returncode, res.stdout, res.stderr)


def _session_pids(sid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, broker):
    root = tmp_path_factory.mktemp("fleet")
    os.chmod(root, 0o755)
    blank = str(root / "blank.img")
    big = str(root / "big.img")
    di.filesystem_image(blank, "ext4", 16, "blank")
    di.filesystem_image(big, "ext4", 200, "big")
    f = Fleet(str(root), broker)
    os.makedirs(f.images)
    os.makedirs(f.inserts)
    for h in HOSTS:
        f.write_host(h, blank, big)
        # the shared mount base each worker's first mount would make (mounts.ensure_shared),
        # made once here: a test's leak check then sees it as there before the test (not its
        # own to unmount), and so does that of a test session that starts while this one runs
        mounts.ensure_shared(os.path.join(f.root, h, "mnt"))
    try:
        declare_shared(broker.url)  # as the site's first client does: a host's user may not
        for h in HOSTS:
            f.start(h)
        yield f
    finally:
        pids = [p.pid for p in f.workers.values()]
        for h in list(f.workers):
            try:
                f.stop(h)
            except AssertionError:
                pass
        left = [pid for s in pids for pid in _session_pids(s)]
        for h in HOSTS:  # the shared mount bases the tool made (mounts.ensure_shared)
            base = os.path.join(f.root, h, "mnt")
            if mounts.mounted_at(base):  # a self-bind: os.path.ismount does not see it
                subprocess.run(["umount", "-l", base], capture_output=True)
        for h in f.urls:
            broker.ctl("delete_user", h)
        assert not left, f"worker processes left running: {left}"


def stop_process(p: subprocess.Popen, timeout: float = 30) -> None:
    """End a worker a test started by itself: SIGTERM, then its whole session killed."""
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def is_mounted(path: str) -> bool:
    return bool(mounts.mounted_at(path))


def wait_mounted(path: str, client) -> None:
    deadline = time.monotonic() + 60
    while not is_mounted(path):
        assert time.monotonic() < deadline, f"{path} was never mounted"
        assert client.poll() is None, client.communicate()
        time.sleep(0.005)


def marker_of(fleet, box: str) -> str:
    """The text of /marker in box's filesystem, read through the fleet (mount, read, release)."""
    check = fleet.vmim("-b", box, "--mount")
    assert check.code == 0, check
    try:
        with open(os.path.join(fleet.mount_of(box), "marker")) as fh:
            return fh.read()
    finally:
        assert fleet.vmim("-b", box, "--release").code == 0


@pytest.fixture(scope="module")
def big(fleet):
    """Image `big` (60 MiB in 60 files), stored from h2a: its restore takes a while."""
    r = fleet.vmim("-b", "h2a", "--mount")
    assert r.code == 0, r
    top = fleet.mount_of("h2a")
    for i in range(60):
        with open(os.path.join(top, f"blob{i}"), "wb") as fh:
            fh.write(os.urandom(1 << 20))
    with open(os.path.join(top, "marker"), "w") as fh:
        fh.write("big\n")
    assert fleet.vmim("-b", "h2a", "--release").code == 0
    st = fleet.vmim("-b", "h2a", "-s", "big", "--release")
    assert st.code == 0, st
    return "big"


@contextlib.contextmanager
def own_vhost(broker, name: str):
    """A virtual host of its own (`name`-PID) where guest may do anything: a broker that the
    test alone shapes. Yields its URL as guest; deleted at the end."""
    vhost = f"{name}-{os.getpid()}"
    assert broker.ctl("add_vhost", vhost).returncode == 0
    try:
        assert broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
                          ).returncode == 0
        yield broker.url[:-1] + vhost
    finally:
        broker.ctl("delete_vhost", vhost)


def one_slot_worker(tmp_path, slot: str, url: str, host: str, log) -> subprocess.Popen:
    """A worker named `host` serving one slot `slot` (an empty disk file: enough to list it),
    its config, lock and state directories under tmp_path, logging to `log`."""
    cfg = tmp_path / f"{slot}.cfg"
    if not cfg.exists():
        disk = tmp_path / f"{slot}.img"
        disk.write_bytes(b"")
        cfg.write_text(f'[vmim.local]\nlockdir = "{tmp_path}/locks"\n'
                       f'statedir = "{tmp_path}/state"\n'
                       f'[vmim.vm.{slot}]\nHostName = "{slot}"\nroot = "{disk}"\n')
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "vmim", "worker", "--config", str(cfg),
                                 "--broker", url, "--host-name", host], stderr=fh, stdout=fh,
                                env=env(), start_new_session=True)


def declare_shared(url: str) -> str:
    """What a client declares when it connects (the fleet's exchanges and vmim.any), as the
    user of `url`: topology.ensure_shared's answer."""
    import kombu

    from vmim.fleet import topology

    with kombu.Connection(url) as conn:
        conn.connect()
        return topology.ensure_shared(conn.connection)


#: the client user's permissions of docs/fleet.md: publish jobs and list requests, own its
#: reply queues — and nothing else
CLIENT_PERMS = permissions.client_grants()


def add_client_user(broker, user: str, password: str, vhost: str = "/") -> str:
    """A client's broker user with the permissions of docs/fleet.md (made again if it
    exists): its broker URL."""
    broker.ctl("delete_user", user)
    assert broker.ctl("add_user", user, password).returncode == 0
    assert broker.ctl("set_permissions", "-p", vhost, user, *CLIENT_PERMS).returncode == 0
    assert broker.ctl("set_topic_permissions", "-p", vhost, user, protocol.JOBS,
                      *permissions.client_topic_grants()).returncode == 0
    path = "/" if vhost == "/" else vhost
    return f"amqp://{user}:{password}@127.0.0.1:{broker.port}/{path}"


def add_host_user(broker, host: str, boxes, password: Optional[str] = None) -> str:
    """The broker user of host `host` serving `boxes`, with the permissions of docs/fleet.md
    (its password: pw-HOST unless given; made again if it exists): its broker URL."""
    password = password or f"pw-{host}"
    broker.ctl("delete_user", host)
    assert broker.ctl("add_user", host, password).returncode == 0
    assert broker.ctl("set_permissions", "-p", "/", host,
                      *permissions.host_grants(host, boxes)).returncode == 0
    assert broker.ctl("set_topic_permissions", "-p", "/", host, protocol.JOBS,
                      *permissions.host_topic_grants(boxes)).returncode == 0
    return f"amqp://{host}:{password}@127.0.0.1:{broker.port}//"


class Sender:
    """A client that speaks to the broker with kombu directly, as a broker user with only the
    client permissions of docs/fleet.md: it publishes whatever bytes it likes and collects
    the replies sent to its reply queue, by correlation id."""

    def __init__(self, url: str):
        import kombu

        self.conn = kombu.Connection(url)
        self.conn.connect()
        self.channel = self.conn.channel()
        self.reply_to = f"vmim.reply.{os.urandom(16).hex()}"
        q = kombu.Queue(self.reply_to, exclusive=True, auto_delete=True, durable=False)
        self.replies: Dict[str, List[dict]] = {}
        self.consumer = kombu.Consumer(self.channel, queues=[q], no_ack=True,
                                       on_message=self._got)
        self.consumer.consume()
        self.producer = kombu.Producer(self.channel)

    def _got(self, message) -> None:
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {"undecodable": message.body}
        corr = message.properties.get("correlation_id")
        self.replies.setdefault(corr, []).append(body)

    def send(self, body, exchange: str = protocol.JOBS, routing_key: str = "any",
             corr: Optional[str] = None, reply_to: Optional[str] = "") -> str:
        """Publish raw bytes (or a dict as JSON) as a client would; returns the correlation id."""
        if corr is None and isinstance(body, dict) and isinstance(body.get("job_id"), str) \
                and len(body["job_id"]) == 32:
            corr = body["job_id"]  # as a real client does: the reply names the job
        corr = corr or os.urandom(16).hex()
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.producer.publish(body, exchange=exchange, routing_key=routing_key,
                              reply_to=self.reply_to if reply_to == "" else reply_to,
                              correlation_id=corr, content_type="application/json",
                              content_encoding="utf-8", serializer=None, delivery_mode=2)
        return corr

    def wait(self, corrs: List[str], timeout: float = 30) -> None:
        """Until every correlation id has a final reply (a result), or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(any(r.get("type") == "result" for r in self.replies.get(c, []))
                   for c in corrs):
                return
            try:
                self.conn.drain_events(timeout=0.2)
            except (TimeoutError, OSError):
                pass

    def result(self, corr: str) -> Optional[dict]:
        return next((r for r in self.replies.get(corr, []) if r.get("type") == "result"), None)

    def close(self) -> None:
        self.conn.release()


@pytest.fixture
def sender(broker):
    """A Sender logged in as `mallory`, a broker user with the client permissions only."""
    user = f"mallory{os.getpid()}"
    url = add_client_user(broker, user, "pw-mallory")
    try:
        s = Sender(url)
        try:
            yield s
        finally:
            s.close()
    finally:
        broker.ctl("delete_user", user)


def queue_depth(broker, queue: str, settle: float = 5.0) -> int:
    """Messages in the queue, ready or delivered and not yet acknowledged (waiting up to
    `settle` seconds for the count to reach 0: the broker's statistics lag a little)."""
    deadline = time.monotonic() + settle
    while True:
        out = broker.ctl("list_queues", "name", "messages").stdout
        n = 0
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                n = int(parts[1])
        if n == 0 or time.monotonic() >= deadline:
            return n
        time.sleep(0.5)

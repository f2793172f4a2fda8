"""What a worker does on its host beside the broker: its child processes (vmim.fleet.child),
one per job, list or recovery — each gets its typed run as JSON on its stdin, never a command
line, and runs it as the local command would with the worker's config; a job's child runs
under a lease (vmim.lease) the worker renews while it holds the job — the recovery of what a
killed predecessor left, and which slot is really free for an any-free job."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vmim import lease, safedir
from vmim.errors import EXIT_ENVIRONMENT, EXIT_FAILED, VmimError
from vmim.fleet import protocol
from vmim.fleet.scheduler import Job
from vmim.invocation import BoxRun, RunOptions
from vmim.plan import Request

log = logging.getLogger("vmim.fleet.worker")

RECOVER_WAIT = 60  # seconds a recovering release waits for the slot's lock (a dying child)
RECOVER_TIMEOUT = 600  # seconds a recovering release may take: then the worker serves anyway


def exit_code(code: int) -> int:
    """A child's exit status as the shell reports it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else min(code, 255)


def _document(out: bytes) -> Dict[str, Any]:
    try:
        doc = json.loads(out or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class Children:
    def __init__(self, config_path: str, statedir: str, lease_ttl: float):
        self.config_path = config_path
        self.statedir = statedir
        self.lease_ttl = lease_ttl

    def start(self, run: BoxRun, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """The child for `run`, started, its stdout and stderr pipes open."""
        proc = subprocess.Popen(protocol.child_command(self.config_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE, env=env or protocol.child_env())
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(run.to_dict()).encode())
            proc.stdin.close()
        except OSError:  # the child died at once: its exit code and stderr say why
            pass
        return proc

    def run(self, run: BoxRun, timeout: Optional[float] = None
            ) -> Tuple[int, Dict[str, Any], List[str]]:
        """Run `run` to its end: exit code, JSON document, stderr lines (past `timeout`
        seconds the child is killed: subprocess.TimeoutExpired)."""
        res = subprocess.run(protocol.child_command(self.config_path), capture_output=True,
                             input=json.dumps(run.to_dict()).encode(), env=protocol.child_env(),
                             timeout=timeout)
        return (exit_code(res.returncode), _document(res.stdout),
                res.stderr.decode("utf-8", "replace").splitlines(True))

    def release(self, box: str) -> Tuple[int, List[str]]:
        """`-b BOX --release`, waiting a while for the slot's lock: recovery at start."""
        try:
            code, _doc, lines = self.run(BoxRun(Request(boxes=(box,), actions=("release",)),
                                                RunOptions(json=True, lock_wait=RECOVER_WAIT)),
                                         RECOVER_TIMEOUT)
        except subprocess.TimeoutExpired:  # the worker serves anyway: see recover()
            return EXIT_ENVIRONMENT, [f"the release did not end within {RECOVER_TIMEOUT} s\n"]
        return code, lines

    def lists(self, lists: Tuple[str, ...], host: str, timeout: float) -> protocol.Reply:
        """The lists of this host, as the reply to a client's list request (whatever goes
        wrong, the client gets an answer; a child that runs past `timeout` is killed: exit 7)."""
        try:
            code, doc, lines = self.run(BoxRun(Request(lists=lists), RunOptions(json=True)),
                                        timeout)
        except subprocess.TimeoutExpired:
            log.error("worker %s: the lists took more than %.0f s; stopped", host, timeout)
            return protocol.Reply("lists", host, exit_code=EXIT_ENVIRONMENT, stderr=(
                f"the lists of host {host} took more than {timeout:.0f} s (libvirt or the "
                "image store hangs?)\n",))
        except Exception as exc:  # noqa: BLE001
            log.exception("worker %s: the lists failed", host)
            return protocol.Reply("lists", host, exit_code=EXIT_FAILED,
                                  stderr=(f"the worker failed to make the lists: {exc!r}\n",))
        return protocol.Reply("lists", host, exit_code=code, doc=doc, stderr=tuple(lines))

    # ------------------------------------------------------------------ jobs and leases

    def _lease_dir(self) -> safedir.SafeDir:
        """<statedir>/fleet/leases, verified (vmim.safedir): root's, nobody else's to write."""
        with safedir.open_dir(self.statedir, what="state directory", key="statedir",
                              mode=0o755) as top:
            with top.subdir("fleet", 0o700) as fleet:
                return fleet.subdir("leases", 0o700)

    def lease_path(self, job_id: str) -> str:
        return os.path.join(self.statedir, "fleet", "leases", job_id)

    def renew_lease(self, job_id: str) -> None:
        """The job is still ours: touch its lease (made when missing, never through a
        symlink)."""
        with self._lease_dir() as d:
            fd = d.open(job_id, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.utime(fd)
            finally:
                os.close(fd)

    def _drop_lease(self, job_id: str) -> None:
        with contextlib.suppress(OSError, FileNotFoundError):
            with self._lease_dir() as d:
                d.unlink(job_id)

    def job_reply(self, job: Job, host: str, on_line: Callable[[str], None]) -> protocol.Reply:
        """Run a fleet job in the child for its slot: its stderr lines to `on_line`, its JSON
        document and exit code the reply (a child that cannot start: exit 7). The run is the
        client's request for this slot only, with the lock wait left of the client's deadline."""
        left = max(0, min(int(job.deadline - time.time()), 7 * 24 * 3600))
        run = BoxRun(replace(job.run.request, boxes=(job.box,), lists=()),
                     replace(job.run.options, json=True, jobs=1, lock_wait=left))
        log.info("job %s: box %s: %s", job.job_id, job.box,
                 ", ".join(run.request.actions) or "print-xml")

        def started(proc: Any) -> None:
            job.proc = proc

        try:
            code, doc, lines = self.run_job(job.job_id, run, started, on_line)
        except (OSError, VmimError) as exc:  # no exec, no lease directory: this host's error
            return protocol.error_result(
                f"cannot start the job: {exc}", host,
                exc.exit_code if isinstance(exc, VmimError) else EXIT_ENVIRONMENT, job.box)
        if job.aborted:  # no client hears of it: what its command said stays in this log
            log.warning("job %s: box %s: aborted; its command exited %s%s", job.job_id,
                        job.box, code, "".join(f"\n  {line.rstrip()}" for line in lines[-20:]))
        doc["host"] = host
        if job.any_free:  # the slot claimed for it
            doc["claimed"] = job.box
        return protocol.Reply("result", host, box=job.box, exit_code=code, doc=doc,
                              stderr=tuple(lines))

    def run_job(self, job_id: str, run: BoxRun, started: Callable[[subprocess.Popen], None],
                on_line: Callable[[str], None]) -> Tuple[int, Dict[str, Any], List[str]]:
        """Run a job's child under its lease: `started` gets the process (to stop it),
        `on_line` each stderr line as it comes. Returns exit code, JSON document, lines."""
        env = protocol.child_env()
        env[lease.ENV_LEASE] = self.lease_path(job_id)  # stale: the job stops before a step
        env[lease.ENV_TTL] = str(self.lease_ttl)  # (the broker may have handed it on)
        self.renew_lease(job_id)
        try:
            proc = self.start(run, env)
        except BaseException:
            self._drop_lease(job_id)
            raise
        started(proc)
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None and stderr is not None
        out: List[bytes] = []
        reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
        reader.start()
        lines: List[str] = []
        for raw in stderr:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            on_line(line)
        reader.join()
        code = proc.wait()
        self._drop_lease(job_id)
        return exit_code(code), _document(b"".join(out)), lines

    # ------------------------------------------------------------------ the host's state

    def recover(self, journal: Any, is_slot: Callable[[str], bool]) -> None:
        """Release what a killed predecessor left — every slot whose job was still running
        (the journal says so) — the same release a local `-b BOX --release` does, waiting a
        while for the slot's lock (the killed job's own command may still clean up)."""
        for job_id, e in journal.entries().items():
            if e.get("state") != "running":
                continue
            box = str(e.get("box"))
            if is_slot(box):
                log.warning("job %s on box %s was cut short by a killed worker: releasing box "
                            "%s", job_id, box, box)
                code, lines = self.release(box)
                for line in lines:
                    log.info("release %s: %s", box, line.rstrip("\n"))
                if code != 0:
                    log.error("box %s: release after a killed worker failed (exit %d); the "
                              "worker serves the box anyway: its next job's command releases "
                              "it first or fails clearly", box, code)
            journal.forget(job_id)  # a redelivery runs the job again, from the start

    @staticmethod
    def free_slot(cfg: Any, idle: Sequence[str]) -> Optional[str]:
        """One of `idle` (slots without a fleet job) that is really free: configured, shut
        off, not locked, not mounted (libvirt and the host say so)."""
        from vmim import domain, listing

        try:
            hv = domain.connect(cfg.uri)
        except VmimError as exc:
            log.error("cannot judge free slots: %s", exc)
            return None
        try:
            rows = listing.boxes(cfg, hv.domains())
        finally:
            hv.close()
        return next((r.name for r in rows if r.is_free and r.name in idle), None)

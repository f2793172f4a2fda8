"""The worker's per-job journal: one small JSON file per job id under <statedir>/fleet/jobs
(a directory verified root's and nobody else's to write: vmim.safedir).

`running` (with the job's request) is written before the job's command starts, `done` (with the
whole reply, and the request still) before the reply is sent. A redelivered job that is `done`
is answered from here instead of being run again — when its request is the one kept: a message
that reuses the id of another job is refused; a `running` entry found when a worker starts was
left by a killed predecessor."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from vmim import safedir

KEEP_SECONDS = 7 * 24 * 3600


class Journal:
    def __init__(self, statedir: str):
        self.statedir = statedir

    def _dir(self, *, create: bool = True) -> safedir.SafeDir:
        """<statedir>/fleet/jobs, verified (vmim.safedir): root's, and nobody else's to write."""
        top = safedir.open_dir(self.statedir, what="state directory", key="statedir",
                               mode=0o755 if create else None)
        with top:
            with top.subdir("fleet", 0o700, create=create) as fleet:
                return fleet.subdir("jobs", 0o700, create=create)

    def _write(self, job_id: str, entry: Dict[str, Any]) -> None:
        with self._dir() as d:
            d.write_atomic(job_id + ".json", json.dumps(entry).encode(), 0o600)

    def begin(self, job_id: str, box: str, request: Any) -> None:
        """The job is about to run on slot `box` (`request`: what it asked for, as a plain
        value; kept to tell a redelivery of this job from another job reusing its id)."""
        self._write(job_id, {"state": "running", "box": box, "request": request,
                             "started": time.time(), "worker_pid": os.getpid()})

    def finish(self, job_id: str, box: str, reply: Dict[str, Any]) -> None:
        """The job ended with `reply`; its request (begin's) stays."""
        begun = self.get(job_id) or {}
        self._write(job_id, {"state": "done", "box": box, "reply": reply,
                             "request": begun.get("request"),
                             "started": begun.get("started"), "finished": time.time()})

    def forget(self, job_id: str) -> None:
        try:
            with self._dir(create=False) as d:
                d.unlink(job_id + ".json")
        except FileNotFoundError:
            pass

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        try:
            with self._dir(create=False) as d:
                data = d.read(job_id + ".json")
            entry = json.loads(data) if data is not None else None
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def entries(self) -> Dict[str, Dict[str, Any]]:
        try:
            with self._dir(create=False) as d:
                names = d.listdir()
        except FileNotFoundError:
            return {}
        out = {}
        for n in names:
            if n.endswith(".json") and not n.startswith("."):
                entry = self.get(n[:-5])
                if entry is not None:
                    out[n[:-5]] = entry
        return out

    def prune(self, now: Optional[float] = None) -> None:
        now = now or time.time()
        for job_id, e in self.entries().items():
            if e.get("state") == "done" and now - float(e.get("finished", now)) > KEEP_SECONDS:
                self.forget(job_id)

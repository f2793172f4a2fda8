"""The worker's per-job journal: one small JSON file per job id under <statedir>/fleet/jobs.

`running` is written before the job's command starts, `done` (with the whole reply) before the
reply is sent. A redelivered job that is `done` is answered from here instead of being run
again; a `running` entry found when a worker starts was left by a killed predecessor."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

KEEP_SECONDS = 7 * 24 * 3600


class Journal:
    def __init__(self, statedir: str):
        self.dir = os.path.join(statedir, "fleet", "jobs")

    def _path(self, job_id: str) -> str:
        return os.path.join(self.dir, job_id + ".json")

    def _write(self, job_id: str, entry: Dict[str, Any]) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        tmp = self._path(job_id) + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(entry, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path(job_id))

    def begin(self, job_id: str, box: str, run: Any) -> None:
        """The job is about to run (`run`: what it asked for, as a plain value)."""
        self._write(job_id, {"state": "running", "box": box, "run": run,
                             "started": time.time(), "worker_pid": os.getpid()})

    def finish(self, job_id: str, box: str, reply: Dict[str, Any]) -> None:
        started = (self.get(job_id) or {}).get("started")
        self._write(job_id, {"state": "done", "box": box, "reply": reply,
                             "started": started, "finished": time.time()})

    def forget(self, job_id: str) -> None:
        try:
            os.unlink(self._path(job_id))
        except FileNotFoundError:
            pass

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        try:
            with open(self._path(job_id), encoding="utf-8") as fh:
                entry = json.load(fh)
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def entries(self) -> Dict[str, Dict[str, Any]]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return {}
        out = {}
        for n in names:
            if n.endswith(".json"):
                entry = self.get(n[:-5])
                if entry is not None:
                    out[n[:-5]] = entry
        return out

    def prune(self, now: Optional[float] = None) -> None:
        now = now or time.time()
        for job_id, e in self.entries().items():
            if e.get("state") == "done" and now - float(e.get("finished", now)) > KEEP_SECONDS:
                self.forget(job_id)

"""Which of a worker's slots hold a fleet job, and which box-routed jobs wait for a slot an
any-free job holds: the worker's bookkeeping, pure (no broker, no processes), so that it is
tested on its own. A slot is reserved before the worker publishes anything about the job
(while a publish waits for its confirm, kombu runs the callbacks of new deliveries, and an
any-free job must not pick a slot already promised)."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vmim.invocation import BoxRun


@dataclass
class Job:
    """A job a worker holds, from the delivery of its message to its acknowledgement."""

    job_id: str
    box: str  # the slot it runs on (an any-free job: once claimed)
    run: BoxRun  # as the client sent it: no boxes
    reply_to: str
    message: Any
    deadline: float
    any_free: bool = False
    proc: Optional[subprocess.Popen] = None
    thread: Optional[threading.Thread] = None
    aborted: bool = False


class Slots:
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.running: Dict[str, Job] = {}  # slot → the fleet job on it (running or reserved)
        self.waiting: Dict[str, Job] = {}  # slot → a box-routed job waiting for it

    def held(self) -> List[Job]:
        """Every job held: running (or reserved) and waiting."""
        return [*self.running.values(), *self.waiting.values()]

    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def idle(self) -> List[str]:
        """Slots with no fleet job, running or waiting (whether they are really free — shut
        off, not mounted, not locked — the worker asks the host)."""
        return [s for s in self.names if s not in self.running and s not in self.waiting]

    def hold(self, job: Job) -> bool:
        """Reserve job.box for a box-routed job: True when it may run now, False when it
        waits for the any-free job that holds the slot."""
        if job.box in self.running:
            self.waiting[job.box] = job
            return False
        self.running[job.box] = job
        return True

    def claim(self, job: Job, box: str) -> None:
        """An any-free job takes `box` (one of idle(), found really free)."""
        job.box = box
        self.running[box] = job

    def drop(self, job: Job) -> None:
        """Forget a job that will not run (its client is gone)."""
        for table in (self.running, self.waiting):
            if table.get(job.box) is job:
                del table[job.box]

    def done(self, job: Job) -> Optional[Job]:
        """A running job ended: the job waiting for its slot, if any (the caller starts it
        or tells it its deadline passed)."""
        self.drop(job)
        return self.waiting.pop(job.box, None)

    def expired(self, now: float) -> List[Job]:
        """Waiting jobs whose deadline (epoch seconds) passed, no longer held."""
        gone = [j for j in self.waiting.values() if now > j.deadline]
        for j in gone:
            del self.waiting[j.box]
        return gone

    def clear(self) -> None:
        self.running.clear()
        self.waiting.clear()


class Undelivered:
    """Results whose client was away when they were sent (a broker restart: its reply queue
    is being declared again), offered again every second for `patience` seconds."""

    def __init__(self, patience: float):
        self.patience = patience
        self.items: List[Tuple[float, str, str, Any]] = []  # (until, reply_to, job_id, reply)
        self.next_try = 0.0

    def add(self, reply_to: str, job_id: str, reply: Any, now: float) -> None:
        self.items.append((now + self.patience, reply_to, job_id, reply))

    def due(self, now: float) -> List[Tuple[float, str, str, Any]]:
        """The results to offer again now, taken out (keep() puts one back)."""
        if now < self.next_try or not self.items:
            return []
        self.next_try = now + 1.0
        items, self.items = self.items, []
        return items

    def keep(self, item: Tuple[float, str, str, Any], now: float) -> bool:
        """Put an item back, unless its patience is spent (False)."""
        if now < item[0]:
            self.items.append(item)
            return True
        return False

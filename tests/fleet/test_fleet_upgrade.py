"""A broker that served an earlier release: what its workers declared stays (durable), and a
worker of this release must start on it all the same."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from vmim.fleet import protocol


def test_a_worker_starts_on_a_broker_of_the_earlier_release(broker, tmp_path):
    """An earlier release declared `vmim.jobs` as a direct exchange and bound each slot's
    queue to it; a topic exchange of that name cannot be declared (PRECONDITION_FAILED), so
    the jobs exchange has a name of its own. A worker of this release starts on such a
    broker, binds the same durable queue to the new exchange and serves a job sent there; a
    job that an old client still sends through the old exchange is refused (exit 2), naming
    the exchange to use. The control queue has a new name on every connection: one of an
    earlier worker, declared without a length bound, is never declared again."""
    import kombu

    from tests.fleet.conftest import env, one_slot_worker, own_vhost, stop_process

    worker = None
    with own_vhost(broker, "vmim-upgrade") as url:
        try:
            with kombu.Connection(url) as conn:  # what a worker of the earlier release declared
                old = kombu.Exchange("vmim.jobs", type="direct", durable=True)
                kombu.Queue("vmim.host.hu.box.hu1", old, routing_key="box.hu1",
                            durable=True)(conn.default_channel).declare()
                kombu.Queue("vmim.any", old, routing_key="any",
                            durable=True)(conn.default_channel).declare()
            log = tmp_path / "worker.log"
            worker = one_slot_worker(tmp_path, "hu1", url, "hu", log)
            deadline = time.monotonic() + 30
            while "worker hu: ready" not in log.read_text():
                assert time.monotonic() < deadline and worker.poll() is None, log.read_text()
                time.sleep(0.1)
            # its user (guest: everything) declared what hosts share itself: it is told to narrow
            assert "may declare and delete what every host shares" in log.read_text()

            def client(*argv):
                return subprocess.run([sys.executable, "-m", "vmim", "--broker", url, *argv],
                                      capture_output=True, text=True, env=env(), timeout=120)

            lists = client("-l", "--json")
            assert lists.returncode == 0, lists
            # the slots of its config (a hypervisor's other domains are listed too, not in config)
            assert [b["name"] for b in json.loads(lists.stdout)["boxes"]
                    if b["in_config"]] == ["hu1"]
            job = client("-b", "hu1", "--dry-run", "--mount", "--json")
            assert job.returncode != 4 and "unknown box" not in job.stderr, job
            assert json.loads(job.stdout)["host"] == "hu", job
            with kombu.Connection(url) as conn:  # an old client: through the old exchange
                reply_q = kombu.Queue(f"vmim.reply.{protocol.new_job_id()}", exclusive=True,
                                      auto_delete=True)
                got: list = []
                with kombu.Consumer(conn, queues=[reply_q], no_ack=True,
                                    on_message=lambda m: got.append(json.loads(m.body))):
                    job_id = protocol.new_job_id()
                    body = {"v": protocol.VERSION, "type": "job", "job_id": job_id, "box": "hu1",
                            "deadline": time.time() + 30, "request": {"actions": ["mount"]},
                            "options": {"dry_run": True}}
                    kombu.Producer(conn).publish(json.dumps(body).encode(), exchange="vmim.jobs",
                                                 routing_key="box.hu1", reply_to=reply_q.name,
                                                 correlation_id=job_id, serializer=None)
                    deadline = time.monotonic() + 30
                    while not any(r.get("type") == "result" for r in got):
                        assert time.monotonic() < deadline, got
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
            result = next(r for r in got if r.get("type") == "result")
            assert result["exit_code"] == 2, result
            assert protocol.JOBS in result["doc"]["error"]["message"], result
            assert "PRECONDITION_FAILED" not in log.read_text()
            # guest has no topic permissions: the worker says what that lets its user see
            assert "may bind any routing key on vmim.jobs.topic" in log.read_text()
        finally:
            if worker is not None:
                stop_process(worker)

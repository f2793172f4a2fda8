"""A worker's job children (vmim/fleet/children.py) that cannot start, without a broker."""

from __future__ import annotations


def test_a_job_whose_child_cannot_start_is_answered_with_exit_7(tmp_path):
    """No lease directory to be had (the state directory is writable by others) or no
    program to exec: the job's reply is a result of exit 7 saying why, not an exception
    (the worker then frees the slot with the reply)."""
    import os
    from unittest import mock

    from vmim.fleet.children import Children
    from vmim.fleet.scheduler import Job
    from vmim.invocation import BoxRun
    from vmim.plan import Request

    job = Job(job_id="b" * 32, box="web1", run=BoxRun(Request(actions=("release",))),
              reply_to="q", message=None, deadline=0.0)
    open_state = tmp_path / "open"
    open_state.mkdir()
    os.chmod(open_state, 0o777)
    reply = Children("/c", str(open_state), 20).job_reply(job, "h1", lambda line: None)
    assert reply.type == "result" and reply.exit_code == 7, reply
    assert "cannot start the job" in reply.stderr[0]
    state = tmp_path / "state"
    state.mkdir()
    with mock.patch("vmim.fleet.protocol.child_command", return_value=["/nonexistent/py"]):
        reply = Children("/c", str(state), 20).job_reply(job, "h1", lambda line: None)
    assert reply.exit_code == 7 and "/nonexistent/py" in reply.stderr[0], reply
    assert not os.listdir(state / "fleet" / "leases")  # its lease is not left behind


def test_a_lost_connection_does_not_wait_for_ever_on_a_command_that_ignores_sigterm(
        tmp_path, monkeypatch):
    """The broker is lost while a job's command runs and ignores SIGTERM: the worker waits
    ABORT_WAIT for its clean-up, then kills it, and goes on to reconnect (it hung before)."""
    import subprocess
    import threading
    import time
    from types import SimpleNamespace

    from vmim.fleet import transport
    from vmim.fleet import worker as worker_mod
    from vmim.fleet.scheduler import Job
    from vmim.invocation import BoxRun

    monkeypatch.setattr(worker_mod, "ABORT_WAIT", 1.0)
    cfg = SimpleNamespace(statedir=str(tmp_path), slots=[], slot_names=["web1"], path="/c")
    w = worker_mod.Worker(cfg, transport.BrokerSpec("amqp://x//"), "h1")
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 100"])
    job = Job(job_id="c" * 32, box="web1", run=BoxRun(), reply_to="q", message=None,
              deadline=0.0, proc=proc)
    job.thread = threading.Thread(target=proc.wait, daemon=True)
    job.thread.start()
    w.slots.running["web1"] = job
    time.sleep(0.2)  # the trap is set
    t = time.monotonic()
    w._drop_connection()
    assert time.monotonic() - t < 15
    assert proc.poll() == -9 and job.aborted  # SIGTERM ignored, then killed
    assert w.slots.running == {}


def test_a_recovering_release_that_hangs_is_stopped(tmp_path, monkeypatch):
    """The release of what a killed predecessor left does not end (a hung unmount, say): the
    worker stops it after RECOVER_TIMEOUT and serves anyway, saying so (exit 7)."""
    import time
    from unittest import mock

    from vmim.fleet import children as children_mod

    monkeypatch.setattr(children_mod, "RECOVER_TIMEOUT", 1)
    t = time.monotonic()
    with mock.patch("vmim.fleet.protocol.child_command", return_value=["sleep", "100"]):
        code, lines = children_mod.Children("/c", str(tmp_path), 20).release("web1")
    assert time.monotonic() - t < 10
    assert code == 7 and "did not end within 1 s" in lines[0]


def test_a_child_whose_worker_died_before_it_could_be_signalled_does_not_run(tmp_path):
    """The worker died between the fork and the child's prctl(PR_SET_PDEATHSIG): the child's
    parent is another process, so it runs nothing (its job goes back to the broker), while the
    same run from its worker does run (here: a config that does not exist, exit 3)."""
    import json
    import os
    import subprocess

    from vmim.fleet import protocol
    from vmim.invocation import BoxRun
    from vmim.plan import Request

    run = json.dumps(BoxRun(Request(boxes=("web1",), actions=("release",))).to_dict())
    argv = [*protocol.child_command(str(tmp_path / "none.cfg"))]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**protocol.child_env(), "PYTHONPATH": root}
    env[protocol.ENV_WORKER] = str(os.getpid() + 1000000)
    gone = subprocess.run(argv, input=run, capture_output=True, text=True, env=env)
    assert gone.returncode == 143 and "is gone: not running it" in gone.stderr, gone
    env[protocol.ENV_WORKER] = str(os.getpid())
    ours = subprocess.run(argv, input=run, capture_output=True, text=True, env=env)
    assert ours.returncode not in (0, 143) and "is gone" not in ours.stderr, ours
    assert "none.cfg" in ours.stderr, ours

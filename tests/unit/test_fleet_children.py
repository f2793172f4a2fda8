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

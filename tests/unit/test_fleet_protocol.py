"""The fleet's job protocol and journal, without a broker."""

from __future__ import annotations

import pytest

from vmim.cli import build_parser, make_request
from vmim.errors import UsageError
from vmim.fleet import protocol
from vmim.fleet.journal import Journal


@pytest.mark.parametrize("argv", [
    ["-b", "web1", "-r", "golden", "-i", "certs:/etc/ssl", "-u", "--core", "2"],
    ["-b", "web1", "-d", "--timeout", "30", "-e", "logs:/var/log", "--zstd", "--release"],
    ["-b", "web1", "-s", "img-{box}", "-w", "--dry-run", "-q"],
    ["-b", "any-free", "--mount", "-v", "--disk-image", "-r", "disk"],
])
def test_job_argv_carries_the_same_request(argv):
    args = build_parser().parse_args([*argv, "--broker", "amqp://x//", "--json",
                                      "--lock-wait", "9", "--config", "/c.cfg"])
    job = protocol.job_argv(args, list(args.box))
    again = build_parser().parse_args(job)
    assert vars(make_request(again)) == vars(make_request(build_parser().parse_args(argv)))
    assert "--broker" not in job and "--config" not in job and "--json" not in job
    assert protocol.checked_argv(job) == job


@pytest.mark.parametrize("extra", [["--config", "/etc/other.cfg"], ["--print-config", "/etc/x"],
                                   ["--log-config", "/tmp/l"], ["--syslog"],
                                   ["--broker", "amqp://h//"], ["--local"]])
def test_a_job_may_not_carry_client_options(extra):
    with pytest.raises(UsageError) as exc:
        protocol.checked_argv(["-b", "web1", "-u", *extra])
    assert "may not carry" in str(exc.value)


@pytest.mark.parametrize("flag", ["--help", "-h", "--version"])
def test_a_job_cannot_end_the_worker_with_help_or_version(flag, capsys):
    with pytest.raises(UsageError):
        protocol.checked_argv(["-b", "web1", flag])


def test_a_job_argv_must_be_strings():
    with pytest.raises(UsageError):
        protocol.checked_argv(["-b", 3])


def test_child_command_runs_the_local_cli_with_the_workers_config():
    cmd = protocol.child_command(["-b", "web1", "-u"], "/etc/w.cfg", 12.7)
    assert cmd[1:3] == ["-m", "vmim.fleet.child"]
    assert cmd[3:] == ["-b", "web1", "-u", "--json", "--local", "--config", "/etc/w.cfg",
                       "--lock-wait", "12"]
    assert protocol.child_command([], "/c", -5)[-1] == "0"


def test_broker_url_is_shown_without_its_password():
    spec = protocol.BrokerSpec("amqps://host1:s3cret@mq.example.org:5671/fleet")
    assert spec.shown == "amqps://host1:***@mq.example.org:5671/fleet"
    assert "s3cret" not in spec.shown


def test_tls_files_need_an_amqps_url():
    pytest.importorskip("kombu")
    with pytest.raises(UsageError) as exc:
        protocol.connection(protocol.BrokerSpec("amqp://mq//", ca="/etc/ca.pem"))
    assert "amqps://" in str(exc.value)


def test_job_ids_are_checked():
    assert protocol.valid_job_id(protocol.new_job_id())
    assert not protocol.valid_job_id("../../etc/passwd")
    assert not protocol.valid_job_id(None)


def test_journal_answers_done_jobs_and_lists_cut_short_ones(tmp_path):
    j = Journal(str(tmp_path))
    a, b = protocol.new_job_id(), protocol.new_job_id()
    j.begin(a, "web1", ["-b", "web1", "-u"])
    j.begin(b, "web2", ["-b", "web2", "-u"])
    j.finish(b, "web2", {"type": "result", "exit_code": 0})
    entries = j.entries()
    assert entries[a]["state"] == "running" and entries[a]["box"] == "web1"
    assert j.get(b)["reply"] == {"type": "result", "exit_code": 0}
    j.prune(now=entries[b]["finished"] + 8 * 24 * 3600)
    assert j.get(b) is None and j.get(a) is not None  # old answers go, cut-short ones stay
    j.forget(a)
    assert j.entries() == {}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_broker_is_exit_7(vmim, monkeypatch, tmp_path):
    pytest.importorskip("kombu")
    monkeypatch.setenv("VMIM_CFG", str(tmp_path / "none.cfg"))
    r = vmim("--broker", f"amqp://u:pw@127.0.0.1:{_closed_port()}//", "-b", "web1", "-u")
    assert r.code == 7, r
    assert "cannot reach the broker" in r.err and "u:***@" in r.err and "pw" not in r.err


def test_vmim_broker_sends_lists_to_the_fleet_and_local_keeps_them_here(vmim, monkeypatch,
                                                                         write_config):
    pytest.importorskip("kombu")
    cfg = write_config('[vmim.local]\nvmemulator = "test:///default"\n')
    monkeypatch.setenv("VMIM_BROKER", f"amqp://127.0.0.1:{_closed_port()}//")
    assert vmim("--config", cfg, "-L").code == 7
    r = vmim("--config", cfg, "-L", "--local")
    assert r.code == 0, r
    assert "NAME" in r.out


def test_broker_key_in_the_config_sends_to_the_fleet(vmim, monkeypatch, write_config):
    pytest.importorskip("kombu")
    monkeypatch.delenv("VMIM_BROKER", raising=False)
    cfg = write_config(f'[vmim.local]\nbroker = "amqp://127.0.0.1:{_closed_port()}//"\n')
    r = vmim("--config", cfg, "-L")
    assert r.code == 7, r
    assert "cannot reach the broker" in r.err


def test_worker_without_a_broker_is_a_usage_error(vmim, monkeypatch, write_config):
    monkeypatch.delenv("VMIM_BROKER", raising=False)
    cfg = write_config("[vmim.local]\n")
    r = vmim("worker", "--config", cfg)
    assert r.code == 2, r
    assert "no broker" in r.err

"""The metrics endpoint has no authentication: it listens on 127.0.0.1 unless an address is given.

Real processes: a fleet worker (`celery -A pipeline.worker worker` with
$PIPELINE_METRICS_PORT) and `pipeline run`. "Not reachable from elsewhere" is checked two
ways: a connection to this machine's non-loopback IPv4 addresses is refused, and the kernel's
socket table (/proc/net/tcp) shows the listening socket bound to 127.0.0.1 — the second holds
even on a machine with no other interface, so the test cannot pass for want of one.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import config_text, run_cli
from tests.services import WorkerProcess, free_port, private_redis, wait_until

pytestmark = pytest.mark.timeout(120)

SIOCGIFADDR = 0x8915  # Linux: an interface's (first) IPv4 address
TCP_LISTEN = "0A"
NOT_THIS_MACHINE = "198.51.100.7"  # TEST-NET-2: documentation only, never a local address


def _non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than 127.0.0.0/8, one per interface."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # the interface has no IPv4 address
                continue
            address = socket.inet_ntoa(ifreq[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                found.append(address)
    return found


def _listening_on(port: int) -> set[str]:
    """The IPv4 addresses a socket LISTENs on at `port`, from the kernel's table (this network namespace)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        address_hex, port_hex = local.split(":")
        if state == TCP_LISTEN and int(port_hex, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(address_hex)[::-1]))  # stored little-endian
    return addresses


def _scrape(address: str, port: int) -> str:
    return urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5).read().decode()


def _up(port: int) -> bool:
    try:
        _scrape("127.0.0.1", port)
        return True
    except OSError:
        return False


@pytest.fixture
def config_path(tmp_path: Path, db_url: str, key_prefix: str) -> Path:
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text(db_url, key_prefix), encoding="utf-8")
    return path


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with private_redis(tmp_path / "broker") as url:
        yield url


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fleet_worker_with_only_a_port_serves_on_loopback_alone(
        config_path: Path, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_METRICS_BIND", raising=False)  # the worker inherits this environment
    port = free_port()
    worker = WorkerProcess(config_path, tmp_path / "worker.log", concurrency=1,
                           env={"CELERY_BROKER_URL": broker_url, "PIPELINE_METRICS_PORT": str(port)}).start()
    try:
        wait_until(lambda: _up(port), 60, "the metrics endpoint did not come up")
        assert "mailloop_status_up" in _scrape("127.0.0.1", port)
        assert _listening_on(port) == {"127.0.0.1"}
        for address in _non_loopback_ipv4():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()
    finally:
        worker.stop()
    assert f"metrics on 127.0.0.1:{port}/metrics" in worker.log()


@contextmanager
def _pipeline_run(config_path: Path, broker_url: str, log: Path, port: int, env: dict[str, str]) -> Iterator[None]:
    """`pipeline run --metrics-port PORT` until its endpoint answers on 127.0.0.1; a clean stop after."""
    full_env = {**os.environ, "PIPELINE_CONFIG": str(config_path), "CELERY_BROKER_URL": broker_url, **env}
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--concurrency", "1",
                            "--metrics-port", str(port)], env=full_env, stdout=subprocess.DEVNULL,
                           stderr=log.open("wb"))
    try:
        wait_until(lambda: _up(port), 60, "the metrics endpoint did not come up")
        yield
        run.send_signal(signal.SIGTERM)
        assert run.wait(90) == 0, log.read_text()
    finally:
        if run.poll() is None:
            run.kill()  # its children follow it (they get SIGTERM when it dies)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pipeline_run_with_only_a_port_serves_on_loopback_alone(
        config_path: Path, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_METRICS_BIND", raising=False)
    port = free_port()
    with _pipeline_run(config_path, broker_url, tmp_path / "run.log", port, env={}):
        assert _listening_on(port) == {"127.0.0.1"}
        for address in _non_loopback_ipv4():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()
    assert f"metrics on 127.0.0.1:{port}/metrics" in (tmp_path / "run.log").read_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pipeline_run_with_metrics_bind_from_the_environment_is_reachable_from_elsewhere(
        config_path: Path, broker_url: str, tmp_path: Path) -> None:
    others = _non_loopback_ipv4()
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address to scrape from")
    port = free_port()
    env = {"PIPELINE_METRICS_BIND": "0.0.0.0"}
    with _pipeline_run(config_path, broker_url, tmp_path / "run.log", port, env):
        assert _listening_on(port) == {"0.0.0.0"}
        for address in others:
            assert "mailloop_status_up" in _scrape(address, port)
    assert f"metrics on 0.0.0.0:{port}/metrics" in (tmp_path / "run.log").read_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pipeline_run_refuses_an_address_not_of_this_machine_in_one_line(config_path: Path) -> None:
    # The address reaches the listening socket: were it dropped on the way, 127.0.0.1 would be served.
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("this machine lets a socket bind any address")
    port = free_port()
    # Not run_cli: a run that wrongly starts would be waited for 120 s; it should be done in one or two.
    result = subprocess.run([sys.executable, "-m", "pipeline", "--config", str(config_path), "run",
                             "--metrics-port", str(port), "--metrics-bind", NOT_THIS_MACHINE],
                            capture_output=True, timeout=30, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 75, stderr
    assert f"pipeline: error: cannot serve metrics on {NOT_THIS_MACHINE}:{port}: " in stderr
    assert "Traceback" not in stderr
    assert "worker started" not in stderr  # refused before any child was started


def test_run_help_says_the_endpoint_is_loopback_only_and_how_to_open_it() -> None:
    result = run_cli("run", "--help")
    help_text = " ".join(result.stdout.decode().split())
    assert result.returncode == 0
    assert "--metrics-bind ADDRESS" in help_text
    assert "$PIPELINE_METRICS_BIND" in help_text
    assert "Default 127.0.0.1: loopback only" in help_text
    assert "0.0.0.0" in help_text


@pytest.mark.parametrize("args, env, named", [
    (["--metrics-bind", "0.0.0.O"], {}, "'0.0.0.O'"),
    ([], {"PIPELINE_METRICS_BIND": "metrics.example"}, "$PIPELINE_METRICS_BIND: 'metrics.example'"),
])
def test_run_rejects_a_bind_address_that_is_not_an_ip_address(args: list[str], env: dict[str, str],
                                                               named: str) -> None:
    result = run_cli("run", "--metrics-port", "9464", *args, env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors == [(f"Error: Invalid value for '--metrics-bind': {named} is not an IP address: give 127.0.0.1, "
                       "0.0.0.0 (every IPv4 interface), :: (every interface) or one address of this machine")]
    assert "Traceback" not in stderr


def test_fleet_worker_with_a_bad_bind_address_logs_one_line_and_serves_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.tasks import _serve_metrics

    port = free_port()
    monkeypatch.setenv("PIPELINE_METRICS_PORT", str(port))
    monkeypatch.setenv("PIPELINE_METRICS_BIND", "every-interface")
    with caplog.at_level(logging.INFO, logger="pipeline.metrics"):
        _serve_metrics()  # what the worker's worker_ready signal runs
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records] == [
        (logging.ERROR, ("metrics not served: PIPELINE_METRICS_BIND: 'every-interface' is not an IP address: give "
                         "127.0.0.1, 0.0.0.0 (every IPv4 interface), :: (every interface) or one address of this "
                         "machine"), None)]
    assert not _listening_on(port)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fleet_worker_listens_on_the_address_given_or_says_in_one_line_why_not(
        config_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # An address not of this machine shows the worker passes $PIPELINE_METRICS_BIND to the socket
    # (dropped on the way, 127.0.0.1 would be served) without leaving a server in this test process.
    from pipeline.tasks import _serve_metrics

    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("this machine lets a socket bind any address")
    port = free_port()
    monkeypatch.setenv("PIPELINE_CONFIG", str(config_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # a registry of its own, not the global one
    monkeypatch.setenv("PIPELINE_METRICS_PORT", str(port))
    monkeypatch.setenv("PIPELINE_METRICS_BIND", NOT_THIS_MACHINE)
    with caplog.at_level(logging.INFO, logger="pipeline.metrics"):
        _serve_metrics()
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.ERROR, None)]
    assert caplog.records[0].getMessage().startswith(
        f"metrics not served: cannot serve metrics on {NOT_THIS_MACHINE}:{port}: ")
    assert not _listening_on(port)


def test_fleet_worker_with_a_port_that_is_no_number_logs_one_line_and_serves_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.tasks import _serve_metrics

    monkeypatch.setenv("PIPELINE_METRICS_PORT", "metrics")
    with caplog.at_level(logging.INFO, logger="pipeline.metrics"):
        _serve_metrics()
    assert [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records] == [
        (logging.ERROR, "metrics not served: PIPELINE_METRICS_PORT: 'metrics' is not a port number", None)]

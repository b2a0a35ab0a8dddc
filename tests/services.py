"""Private services and worker processes for tests that run a real Celery worker or break things.

A test that needs a broker gets one of its own — a private redis-server on a free port,
or a RabbitMQ vhost of its own on the shared server — so that test runs going on at the
same time never consume each other's tasks. A test that restarts Redis or PostgreSQL
starts a private one it may restart. The shared services are never stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import portpicker


def free_port() -> int:
    """A port nothing listens on, and never one this test run has handed out before.

    Binding port 0 and closing it can give the same port twice in a row: a Dovecot given
    four such ports once refused to start with "duplicate listener". portpicker remembers
    what it has handed out in this process, and checks the port is free on TCP and UDP.
    """
    return portpicker.pick_unused_port()


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: accepts(self.port), 10, "private redis-server did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        wait_until(lambda: not accepts(self.port), 10, "private redis-server did not stop")


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of the test's own; yields its URL."""
    server = PrivateRedis(workdir).start()
    try:
        yield server.url
    finally:
        server.stop()


class PrivatePostgres:
    """A PostgreSQL server of the test's own, in a temporary data directory, that it may restart."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = bins[-1] if bins else Path(shutil.which("pg_ctl") or "pg_ctl").parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailloop-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        # PostgreSQL refuses to run as root; the Debian package provides the postgres user.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(args), check=True, capture_output=True, timeout=120)

    def start(self) -> "PrivatePostgres":
        if not self.data.exists():
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres")
            self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
                          "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                          "start")
        return self

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def accepts(port: int) -> bool:
    """Does something listen on this loopback port?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of the test's own on the shared RabbitMQ; yields the broker URL."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    vhost = f"mailloop-test-{uuid.uuid4().hex[:12]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True, timeout=60)
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


def wait_until(predicate: Callable[[], bool], timeout: float, message: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"{message} (waited {timeout}s)")


class WorkerProcess:
    """`celery -A pipeline.worker worker` in a process group of its own, so SIGKILL takes it all."""

    def __init__(self, config_path: Path, log_path: Path, concurrency: int = 2, env: dict[str, str] | None = None):
        self.config_path = config_path
        self.log_path = log_path
        self.concurrency = concurrency
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "WorkerProcess":
        env = {**os.environ, "PIPELINE_CONFIG": str(self.config_path), **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pipeline.worker", "worker", "-Q",
             "fetch,process,notify,maintenance", "--concurrency", str(self.concurrency),
             "-n", f"test-{uuid.uuid4().hex[:8]}@%h", "--without-gossip", "--without-mingle",
             "--loglevel", "INFO"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL to the worker and its pool processes at once: a machine losing power."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM to the main process alone is Celery's warm shutdown: it lets the pool finish
        # its tasks, log lines included. SIGTERM to the whole group would kill a pool process
        # between its commit and its log line (a flake CI showed).
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever outlived the shutdown
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

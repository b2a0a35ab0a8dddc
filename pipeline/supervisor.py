"""`pipeline run`: worker, scheduler and fetchers of one machine in one process tree.

The supervisor starts a Celery worker for every queue as a child process, and a Celery
beat child only while it holds the fleet's scheduler lock in Redis — so two machines
running `pipeline run` never both schedule, and when the machine that schedules goes
away another takes over within `SCHEDULER_LOCK_SECONDS`. SIGTERM or SIGINT stops the
children cleanly (the worker finishes the tasks it has started) and releases the lock.

The long-running sources — an IMAP IDLE fetcher per mailbox, an SMTP/LMTP listener per
address — are children too (`pipeline listen --mailbox …`), one per unit, so one that
crashes is restarted after `LISTENER_RESTART_SECONDS` without touching the others.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from pipeline import metrics
from pipeline.config import Config
from pipeline.scheduler_lock import HELD_BY_PARENT_ENV, RENEW_EVERY, SchedulerLock
from pipeline.sources.serve import units
from pipeline.tasks.policy import QUEUES

log = logging.getLogger("pipeline.run")

STOP_GRACE_SECONDS = 60
# A listener child that exited is started again after this long (it retries outages itself;
# an exit means a bug or a port in use, which a tight restart loop would only flood the log with).
LISTENER_RESTART_SECONDS = 5
PR_SET_PDEATHSIG = 1


class Supervisor:
    def __init__(self, config: Config, client: redis.Redis, mailboxes: list[str], concurrency: int | None,
                 loglevel: str = "INFO", metrics_port: int | None = None,
                 read_status: Callable[[], object] | None = None,
                 metrics_bind: str = metrics.DEFAULT_BIND) -> None:
        self.config = config
        self.client = client
        self.mailboxes = mailboxes
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.stopping = False
        self.worker: subprocess.Popen[bytes] | None = None
        self.beat: subprocess.Popen[bytes] | None = None
        self.state_dir = Path(tempfile.mkdtemp(prefix="mailloop-run-"))
        # The worker's pool processes write their counters here; this process serves the sum.
        self.metrics_dir = self.state_dir / "metrics"
        self.metrics_dir.mkdir()
        self.metrics_port = metrics_port
        self.metrics_bind = metrics_bind
        self.read_status = read_status
        self.lock = SchedulerLock(client, config)
        # The mailboxes each long-running child serves -> its process, and when it may (re)start.
        self.listeners: dict[tuple[str, ...], subprocess.Popen[bytes] | None] = {
            tuple(unit): None for unit in units(config, mailboxes)}
        self.listener_due: dict[tuple[str, ...], float] = {unit: 0.0 for unit in self.listeners}

    # -- children ------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.config.path is not None:
            env["PIPELINE_CONFIG"] = str(self.config.path.resolve())
        env["PIPELINE_MAILBOXES"] = ",".join(self.mailboxes)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        # This process serves the metrics, not the worker.
        env.pop("PIPELINE_METRICS_PORT", None)
        env.pop("PIPELINE_METRICS_BIND", None)
        return env

    def _celery(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "celery", "-A", "pipeline.worker", *args, "--loglevel", self.loglevel]
        return subprocess.Popen(cmd, env={**self._env(), **(env or {})}, preexec_fn=_die_with_parent)

    def start_worker(self) -> None:
        args = ["worker", "-Q", ",".join(QUEUES), "-n", f"mailloop-{os.getpid()}@{socket.gethostname()}"]
        if self.concurrency:
            args += ["--concurrency", str(self.concurrency)]
        self.worker = self._celery(*args)
        log.info("worker started (pid %s)", self.worker.pid)

    def _start_beat(self) -> None:
        self.beat = self._celery("beat", "--schedule", str(self.state_dir / "beat-schedule"),
                                 env={HELD_BY_PARENT_ENV: "1"})
        log.info("this machine schedules for the fleet: beat started (pid %s)", self.beat.pid)

    def tend_listeners(self) -> None:
        """Start each long-running source child, and start it again after it exited."""
        for unit, proc in self.listeners.items():
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:
                log.error("listener for %s exited with status %s; restarting in %ss", ", ".join(unit),
                          proc.returncode, LISTENER_RESTART_SECONDS)
                self.listeners[unit] = None
                self.listener_due[unit] = time.monotonic() + LISTENER_RESTART_SECONDS
                continue
            if time.monotonic() >= self.listener_due[unit]:
                args = [a for name in unit for a in ("--mailbox", name)]
                self.listeners[unit] = subprocess.Popen([sys.executable, "-m", "pipeline", "listen", *args],
                                                        env=self._env(), preexec_fn=_die_with_parent)
                log.info("listener for %s started (pid %s)", ", ".join(unit), self.listeners[unit].pid)

    # -- the scheduler lock --------------------------------------------------------------
    def tend_scheduler(self) -> None:
        """Hold the lock and run beat, or wait for the lock while another machine holds it."""
        if self.beat is None:
            if self.lock.try_acquire():
                self._start_beat()
            return
        if not self.lock.renew():
            log.warning("lost the scheduler lock; stopping beat so that only one machine schedules")
            _stop(self.beat)
            self.beat = None

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        code = 0
        last_renew = 0.0
        try:
            # Metrics first: an address that cannot be listened on stops the run before any child starts.
            if self.metrics_port and self.read_status:
                metrics.serve(self.metrics_port, self.read_status, str(self.metrics_dir), bind=self.metrics_bind)
            self.start_worker()
            while not self.stopping:
                self.tend_listeners()
                if time.monotonic() - last_renew >= RENEW_EVERY:
                    self.tend_scheduler()
                    last_renew = time.monotonic()
                if self.worker.poll() is not None:
                    log.error("the worker exited with status %s; stopping", self.worker.returncode)
                    code = 1
                    break
                if self.beat is not None and self.beat.poll() is not None:
                    log.error("beat exited with status %s; it restarts at the next turn", self.beat.returncode)
                    self.beat = None
                    self._release()
                time.sleep(0.2)
        finally:
            self.shutdown()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("%s received: stopping cleanly", signal.Signals(signum).name)
        self.stopping = True

    def shutdown(self) -> None:
        if self.beat is not None:
            _stop(self.beat)
            self.beat = None
        self._release()
        for proc in self.listeners.values():
            if proc is not None:
                proc.send_signal(signal.SIGTERM)  # all at once: each closes its connections in parallel
        for unit, proc in self.listeners.items():
            if proc is not None:
                _stop(proc)
                self.listeners[unit] = None
        if self.worker is not None:
            _stop(self.worker)  # warm shutdown: tasks already started are finished
        shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("stopped")

    def _release(self) -> None:
        self.lock.release()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor dies, even by SIGKILL (Linux),
    so a killed `pipeline run` never leaves a worker or a second beat behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the children outlive a SIGKILLed supervisor, as with any shell


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        log.error("pid %s did not stop within %ss; killing it", proc.pid, STOP_GRACE_SECONDS)
        proc.kill()
        proc.wait()

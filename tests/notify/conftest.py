"""Fixtures for the notification tests: a real SMTP server, and a configuration that sends through it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from pipeline.config import Config
from tests.notify.smtp import SmtpServer


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def smtp_table(port: int, **extra: str) -> str:
    settings = {"host": '"127.0.0.1"', "port": str(port), "timeout_seconds": "5", **extra}
    lines = [f"{k} = {v}" for k, v in settings.items()]
    return "\n[smtp]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def config(make_config, smtp: SmtpServer) -> Config:
    """The shared test configuration, sending through the test's SMTP server."""
    return make_config(smtp_table(smtp.port), notifications='{ from_name = "MSP Service Desk" }')


FIXTURES = Path(__file__).parent.parent / "fixtures" / "notify"

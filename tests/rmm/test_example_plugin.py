"""The example plug-in package (examples/mailloop-example-stage): installed, run, removed, required."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import config_text, make_mail, run_cli

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "mailloop-example-stage"


def pip(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, timeout=300)


def test_the_example_plugin_runs_in_the_pipeline_and_a_mailbox_requiring_it_fails_without_it(
        db_url: str, key_prefix: str, tmp_path: Path) -> None:
    # Written, not parsed here: this process cannot load the stage before the plug-in is installed.
    path = tmp_path / "mailboxes.toml"
    text = config_text(db_url, key_prefix, parser_stages='["ticket_number", "acme_example"]',
                       require_stages='["acme_example"]').replace(
        '[[mailbox]]\nname = "billing"',
        "[mailbox.stage_settings.acme_example]\npattern = 'ASSET-\\d+'\n\n[[mailbox]]\nname = \"billing\"")
    path.write_text(text, encoding="utf-8")
    installed = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(PLUGIN))
    assert installed.returncode == 0, installed.stderr.decode()
    try:
        proc = run_cli("--config", str(path), "ingest", "--dry-run", "--json", "--mailbox", "support", "-",
                       input=make_mail(subject="Laptop ASSET-77 will not boot"))
        assert proc.returncode == 0, proc.stderr.decode()
        trace = json.loads(proc.stdout)["trace"]
        assert {"stage": "acme_example", "decision": "asset tags: ASSET-77", "why": "pattern ASSET-\\d+"} in trace
    finally:
        removed = pip("uninstall", "-y", "mailloop-example-stage")
        assert removed.returncode == 0, removed.stderr.decode()
    proc = run_cli("--config", str(path), "check-config")
    assert proc.returncode != 0
    err = proc.stderr.decode() + proc.stdout.decode()
    assert "require_stages" in err and "'acme_example' is not installed" in err

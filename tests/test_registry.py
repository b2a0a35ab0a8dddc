"""Parser-stage plug-ins (D9): the entry-point group, the mailbox's order, refusals at start.

Plug-ins are made real: a distribution's metadata (`*.dist-info/entry_points.txt`) on the
path of a fresh `pipeline` process registers them in `mailloop.parser_stages`, exactly as
`pip install` of a plug-in package would.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, config_text, fixture_bytes, run_cli

STAGES_MODULE = '''
class FirstStage:
    """Tags the mail before the built-in stages look at it."""

    name = "sample_first"

    def __call__(self, ctx):
        ctx.annotations[self.name] = len(ctx.references)
        ctx.note(self.name, "ran", f"{len(ctx.references)} reference(s) found before me")


class LocalStage:
    name = "local_tagger"

    def __call__(self, ctx):
        ctx.note(self.name, "ran", "a local stage named by its dotted path")
'''


def _distribution(site: Path, dist: str, entry_points: dict[str, str], module: str | None = None) -> None:
    """Install a distribution's metadata (and module) into `site`, as pip would."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mailloop.parser_stages]\n{lines}\n", encoding="utf-8")
    if module:
        (site / "sample_stages.py").write_text(textwrap.dedent(module), encoding="utf-8")


def _write_config(tmp_path: Path, db_url: str, key_prefix: str, stages: list[str]) -> Path:
    path = tmp_path / "mailboxes.toml"
    path.write_text(config_text(db_url, key_prefix, parser_stages=json.dumps(stages)), encoding="utf-8")
    return path


def _dry_run(config: Path, site: Path) -> list[str]:
    proc = run_cli("--config", str(config), "ingest", "--dry-run", "--json", "--mailbox", "support", "-",
                   input=fixture_bytes("reply_with_ticket_number.eml"),
                   env={"PYTHONPATH": str(site), "REDIS_URL": REDIS_URL})
    assert proc.returncode == 0, proc.stderr.decode()
    return [step["stage"] for step in json.loads(proc.stdout)["trace"]]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    _distribution(site, "mailloop-sample-stages", {"sample_first": "sample_stages:FirstStage"}, STAGES_MODULE)
    return site


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_plugin_stage_runs_where_the_mailbox_puts_it(tmp_path: Path, db_url: str, key_prefix: str,
                                                       site: Path) -> None:
    first = _write_config(tmp_path, db_url, key_prefix, ["sample_first", "ticket_number", "reply_reference"])
    stages = _dry_run(first, site)
    assert stages.index("sample_first") < stages.index("ticket_number") < stages.index("reply_reference")

    last = _write_config(tmp_path, db_url, key_prefix, ["ticket_number", "reply_reference", "sample_first"])
    stages = _dry_run(last, site)
    assert stages.index("ticket_number") < stages.index("reply_reference") < stages.index("sample_first")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_local_stage_is_named_by_its_dotted_path(tmp_path: Path, db_url: str, key_prefix: str,
                                                   site: Path) -> None:
    config = _write_config(tmp_path, db_url, key_prefix, ["ticket_number", "sample_stages:LocalStage"])
    assert "local_tagger" in _dry_run(config, site)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_unknown_stage_name_fails_check_config_with_one_clear_line(tmp_path: Path, db_url: str,
                                                                      key_prefix: str, site: Path) -> None:
    config = _write_config(tmp_path, db_url, key_prefix, ["ticket_number", "sample_frist"])
    proc = run_cli("check-config", str(config), env={"PYTHONPATH": str(site)})
    assert proc.returncode == 1
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if "parser_stages" in text)
    assert f"mailboxes.toml:{line}: mailbox[0].parser_stages" in err
    assert "'sample_frist'" in err and "sample_first" in err  # what is wrong, and what is registered


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_local_stage_that_does_not_import_is_refused_at_start(tmp_path: Path, db_url: str,
                                                                key_prefix: str, site: Path) -> None:
    config = _write_config(tmp_path, db_url, key_prefix, ["no_such_module:Stage"])
    proc = run_cli("check-config", str(config), env={"PYTHONPATH": str(site)})
    assert proc.returncode == 1
    assert "'no_such_module:Stage' does not load: ModuleNotFoundError" in proc.stderr.decode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_plugin_that_does_not_load_is_named_by_its_package(tmp_path: Path, db_url: str,
                                                             key_prefix: str, site: Path) -> None:
    _distribution(site, "acme-broken-stages", {"broken": "acme_missing_module:Stage"})
    config = _write_config(tmp_path, db_url, key_prefix, ["ticket_number"])
    proc = run_cli("check-config", str(config), env={"PYTHONPATH": str(site)})
    assert proc.returncode == 1
    err = proc.stderr.decode().strip()
    assert "parser stage 'broken' from package acme-broken-stages does not load" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_packages_registering_one_name_are_refused(tmp_path: Path, db_url: str, key_prefix: str,
                                                       site: Path) -> None:
    _distribution(site, "acme-copycat", {"sample_first": "sample_stages:LocalStage"})
    config = _write_config(tmp_path, db_url, key_prefix, ["ticket_number"])
    proc = run_cli("check-config", str(config), env={"PYTHONPATH": str(site)})
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "'sample_first' is registered twice" in err
    assert "acme-copycat" in err and "mailloop-sample-stages" in err

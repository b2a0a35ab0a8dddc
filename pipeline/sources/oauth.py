"""Secrets for sources: passwords and XOAUTH2 access tokens, read from the environment or a command.

Access tokens are short-lived (an hour at Microsoft 365 and Google): a token is asked for
at every login, never cached here, so a refresh done by the command (or by whatever keeps
the variable current) is picked up at the next connection. A command that fails is
reported with its own last line of stderr — the usual way a refresh that broke says why.
"""

from __future__ import annotations

import os
import subprocess

from pipeline.sources.base import PermanentSourceError
from pipeline.sources.settings import SourceSettings

TOKEN_COMMAND_SECONDS = 30


def secret(variable: str, what: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise PermanentSourceError(f"the {what} is read from the environment variable {variable}, which is not set")
    return value


def password(source: SourceSettings) -> str:
    assert source.password_env
    return secret(source.password_env, "password")


def access_token(source: SourceSettings) -> str:
    """A current XOAUTH2 access token: from `oauth_token_env`, or printed by `oauth_token_command`."""
    if source.oauth_token_env:
        return secret(source.oauth_token_env, "OAuth2 access token")
    command = source.oauth_token_command or []
    try:
        done = subprocess.run(command, capture_output=True, timeout=TOKEN_COMMAND_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PermanentSourceError(f"the OAuth2 token command {command[0]!r} could not run: {exc}") from None
    token = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0 or not token:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}, no token printed"
        raise PermanentSourceError(f"the OAuth2 token command {command[0]!r} failed: {why}")
    return token.splitlines()[0]

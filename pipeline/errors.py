"""Errors that stop a command (not a mail) from running."""


class CannotRun(Exception):
    """The command cannot run at all (database or Redis down, bad configuration).

    The message is one line for a person; `ingest` exits 75 (EX_TEMPFAIL) on it so an
    MTA retries later.
    """

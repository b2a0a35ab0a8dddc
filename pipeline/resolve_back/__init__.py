"""Resolving back (issue 9): tell the RMM when a person completes the ticket its alert opened.

- `settings`: a mailbox's `[mailbox.resolve_back.<stage name>]` tables (URL, method, body and
  header templates; secrets by environment-variable name).
- `outbox`: the row written by the lifecycle in the transaction that completes the ticket,
  claimed under a lease, retried with backoff, marked done or failed; the sweep's query.
- `call`: rendering the request (sandboxed Jinja2) and making it (httpx), one batch at a time.
- `check`: what `pipeline check-config` finds wrong with those tables.

The Celery side is `pipeline.tasks.resolve_back`, on the notify (I/O) queue.
"""

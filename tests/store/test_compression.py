"""PostgreSQL stores large mail columns with lz4, not pglz (migration 0007, bench/README.md)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pipeline.process import MailProcessor
from tests.conftest import make_mail

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def test_a_large_journaled_mail_is_compressed_with_lz4(processor: MailProcessor, store) -> None:
    body = "".join(f"Line {i}: the backup job on FS01 failed again, see the log below.\n" for i in range(200))
    result = processor.ingest("support", make_mail(subject="Backup failed", body=body))
    assert result.outcome == "ticket_created"
    with store.engine.connect() as conn:
        lz4 = conn.execute(text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")).scalar()
        if not lz4:
            pytest.skip("this PostgreSQL is built without lz4")
        raw_method = conn.execute(text("SELECT pg_column_compression(raw) FROM journal WHERE id = :id"),
                                  {"id": result.journal_id}).scalar()
        body_method = conn.execute(text("SELECT pg_column_compression(description) FROM tickets")).scalar()
        declared = dict(conn.execute(text(
            "SELECT attname, attcompression FROM pg_attribute"
            " WHERE attrelid = 'attachments'::regclass AND attname = 'data'")).all())
    assert raw_method == "lz4"
    assert body_method == "lz4"
    assert declared == {"data": "l"}

"""The ticket store (D3) as SQLAlchemy 2 tables; the schema itself is made by Alembic.

Notes, time entries, attachments and timeline entries belong to a ticket, a task or a
project: they carry `entity_type` ("ticket" | "task" | "project") and `entity_id`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    manager_id: Mapped[int | None] = mapped_column(ForeignKey("resources.id"))
    domains: Mapped[list["AccountDomain"]] = relationship(back_populates="account", cascade="all, delete-orphan")


class AccountDomain(Base):
    __tablename__ = "account_domains"
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    account: Mapped[Account] = relationship(back_populates="domains")


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    notifications: Mapped[bool] = mapped_column(Boolean, default=True)
    account: Mapped[Account] = relationship()


class Resource(Base):
    __tablename__ = "resources"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    roles: Mapped[list[Any]] = mapped_column(default=list)
    default_role: Mapped[str | None] = mapped_column(String(100))


class Queue(Base):
    __tablename__ = "queues"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class QueueMember(Base):
    __tablename__ = "queue_members"
    queue_id: Mapped[int] = mapped_column(ForeignKey("queues.id"), primary_key=True)
    resource_id: Mapped[int] = mapped_column(ForeignKey("resources.id"), primary_key=True)


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    title: Mapped[str] = mapped_column(String(500))
    description: Mapped[str] = mapped_column(Text, default="")
    description_html: Mapped[str | None] = mapped_column(Text)  # sanitized (D8)
    status: Mapped[str] = mapped_column(String(40), default="New", index=True)
    priority: Mapped[str] = mapped_column(String(20), default="Medium")
    queue_id: Mapped[int | None] = mapped_column(ForeignKey("queues.id"))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"))
    assigned_resource_id: Mapped[int | None] = mapped_column(ForeignKey("resources.id"))
    source: Mapped[str] = mapped_column(String(40), default="Email")
    source_mailbox: Mapped[str | None] = mapped_column(String(200))
    category: Mapped[str | None] = mapped_column(String(100))
    # Normalised subject (D1.5) for the duplicate-ticket rule.
    subject_key: Mapped[str] = mapped_column(String(500), default="", index=True)
    linked_ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The lifecycle (D2, pipeline/lifecycle.py). When the status last changed: auto-close
    # counts the days in Waiting Customer from here.
    status_changed_at: Mapped[datetime | None] = mapped_column()
    wait_until: Mapped[datetime | None] = mapped_column()  # set only in Waiting Until
    # The latest resolution (its time starts the feedback window) and the first one, which
    # a reopen and a second resolution never overwrite.
    resolution_method: Mapped[str | None] = mapped_column(String(40))
    resolved_at: Mapped[datetime | None] = mapped_column()
    resolved_by: Mapped[str | None] = mapped_column(String(320))
    first_resolved_at: Mapped[datetime | None] = mapped_column()
    first_resolved_by: Mapped[str | None] = mapped_column(String(320))
    # SLA pause while Waiting Customer, when the mailbox says so: since when (None: the
    # clock runs) and the seconds paused in earlier waits.
    sla_paused_at: Mapped[datetime | None] = mapped_column()
    sla_paused_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Alert tickets (D9, pipeline/parsers/rmm/): the correlation key (vendor:device:alert), how
    # often the alert repeated while open and when it was last seen, and when it last recovered.
    alert_key: Mapped[str | None] = mapped_column(String(300), index=True)
    alert_repeat_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    alert_last_seen_at: Mapped[datetime | None] = mapped_column()
    recovered_at: Mapped[datetime | None] = mapped_column()

    account: Mapped[Account] = relationship()
    contact: Mapped[Contact | None] = relationship()
    assigned_resource: Mapped[Resource | None] = relationship()
    queue: Mapped[Queue | None] = relationship()


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    account: Mapped[Account] = relationship()
    tasks: Mapped[list["Task"]] = relationship(back_populates="project", order_by="Task.id")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("project_id", "title"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    title: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(40), default="New")
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    project: Mapped[Project] = relationship(back_populates="tasks")


class Note(Base):
    __tablename__ = "notes"
    __table_args__ = (Index("ix_notes_entity", "entity_type", "entity_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    entity_type: Mapped[str] = mapped_column(String(10))
    entity_id: Mapped[int] = mapped_column(Integer)
    author_name: Mapped[str] = mapped_column(String(200), default="")
    author_email: Mapped[str] = mapped_column(String(320), default="")
    body: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str | None] = mapped_column(Text)  # sanitized (D8)
    # Internal notes are never shown or sent to customers (D8).
    internal: Mapped[bool] = mapped_column(Boolean, default=False)
    journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TimeEntry(Base):
    __tablename__ = "time_entries"
    __table_args__ = (Index("ix_time_entries_entity", "entity_type", "entity_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    entity_type: Mapped[str] = mapped_column(String(10))
    entity_id: Mapped[int] = mapped_column(Integer)
    resource_id: Mapped[int] = mapped_column(ForeignKey("resources.id"))
    hours: Mapped[float] = mapped_column(Float)
    role: Mapped[str | None] = mapped_column(String(100))
    billable: Mapped[bool] = mapped_column(Boolean, default=True)
    summary: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[datetime] = mapped_column(default=utcnow)
    note_id: Mapped[int | None] = mapped_column(ForeignKey("notes.id"))
    resource: Mapped[Resource] = relationship()


class Attachment(Base):
    __tablename__ = "attachments"
    __table_args__ = (Index("ix_attachments_entity", "entity_type", "entity_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    entity_type: Mapped[str] = mapped_column(String(10))
    entity_id: Mapped[int] = mapped_column(Integer)
    note_id: Mapped[int | None] = mapped_column(ForeignKey("notes.id"))
    journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))
    filename: Mapped[str] = mapped_column(String(255))  # sanitized (D8)
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    content_id: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # Over the mailbox's size limit: recorded without its data, and why (the mail is still processed).
    skipped_reason: Mapped[str | None] = mapped_column(String(200))
    inline: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class TimelineEntry(Base):
    __tablename__ = "timeline"
    __table_args__ = (Index("ix_timeline_entity", "entity_type", "entity_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    entity_type: Mapped[str] = mapped_column(String(10))
    entity_id: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    who: Mapped[str] = mapped_column(String(320))
    what: Mapped[str] = mapped_column(String(100))
    from_value: Mapped[str | None] = mapped_column(String(200))
    to_value: Mapped[str | None] = mapped_column(String(200))
    journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))


class JournalEntry(Base):
    """One received mail, written before its source may forget it (D1.1)."""

    __tablename__ = "journal"
    __table_args__ = (Index("ix_journal_outcome", "outcome"),
                      Index("ix_journal_mailbox_source_ref", "mailbox", "source_ref"))
    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200), index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # Where it came from (e.g. a Maildir file name or IMAP UID) so a source can tell
    # whether it already journaled a mail after a crash.
    source_ref: Mapped[str | None] = mapped_column(String(500))
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    identity: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str | None] = mapped_column(String(30))
    reason: Mapped[str | None] = mapped_column(Text)
    entity_type: Mapped[str | None] = mapped_column(String(10))
    entity_number: Mapped[str | None] = mapped_column(String(40))
    trace: Mapped[list[Any] | None] = mapped_column()
    failed_stage: Mapped[str | None] = mapped_column(String(60))
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None] = mapped_column()


class ProcessedMail(Base):
    """A mail identity that has been processed: the store refuses it twice (D1.5.1)."""

    __tablename__ = "processed_mail"
    identity: Mapped[str] = mapped_column(String(64), primary_key=True)
    journal_id: Mapped[int] = mapped_column(ForeignKey("journal.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NumberSequence(Base):
    """Per-kind, per-day counters; incremented atomically by an upsert."""

    __tablename__ = "number_sequences"
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    last_value: Mapped[int] = mapped_column(Integer, default=0)


class Notification(Base):
    """The outbox (D1.6–7): written in the mail's transaction, sent after commit; history for 30 days.

    `status`: pending → sending (claimed under a lease) → sent, or back to pending after a
    transient failure, or failed (permanent refusal, or out of attempts).
    """

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_status", "status"),
        Index("ix_notifications_entity", "entity_type", "entity_id"),
        Index("ix_notifications_created_at", "created_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    event: Mapped[str] = mapped_column(String(40))
    entity_type: Mapped[str | None] = mapped_column(String(10))
    entity_id: Mapped[int | None] = mapped_column(Integer)
    journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))
    mailbox: Mapped[str] = mapped_column(String(200))
    from_address: Mapped[str] = mapped_column(String(320))
    recipients: Mapped[list["NotificationRecipient"]] = relationship(
        cascade="all, delete-orphan", order_by="NotificationRecipient.email"
    )
    subject: Mapped[str] = mapped_column(String(998))
    body_text: Mapped[str] = mapped_column(Text)
    body_html: Mapped[str | None] = mapped_column(Text)
    # Recorded before sending; a resend reuses it (D1.7).
    message_id: Mapped[str] = mapped_column(String(998), unique=True)
    in_reply_to: Mapped[str | None] = mapped_column(String(998))
    references: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    # A sender that claimed the row owns it until then; a sender killed mid-send leaves it to expire.
    lease_until: Mapped[datetime | None] = mapped_column()
    # After a transient failure: when the sweep may try again (backoff across worker restarts).
    next_attempt_at: Mapped[datetime | None] = mapped_column()


class NotificationRecipient(Base):
    """Who a notification goes to; also who may write into its ticket (D8)."""

    __tablename__ = "notification_recipients"
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(40), default="sender")


class ResolveBackCall(Base):
    """Resolving back (issue 9): one HTTP call telling an RMM that a person completed its alert's ticket.

    Written in the transaction that completes the ticket (pipeline/lifecycle.py), made after
    commit (pipeline/resolve_back/, pipeline/tasks/resolve_back.py). `status`: pending →
    calling (claimed under a lease) → done, or back to pending after a transient failure, or
    failed (refused by the RMM, a template that does not render, or out of attempts).
    """

    __tablename__ = "resolve_back_calls"
    __table_args__ = (Index("ix_resolve_back_calls_status", "status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    # The RMM stage that claimed the alert (the first part of tickets.alert_key): its table in
    # `[mailbox.resolve_back]` says what to call.
    vendor: Mapped[str] = mapped_column(String(100))
    # The mail that completed the ticket (none for the clock's auto-close), and the latest alert
    # mail of the ticket, whose device, site, type, severity and id the templates get.
    journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))
    alert_journal_id: Mapped[int | None] = mapped_column(ForeignKey("journal.id"))
    # The ticket as it was completed (number, title, status, resolution, …): what the call says.
    ticket_values: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int | None] = mapped_column(Integer)  # of the latest answer, if any
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column()
    # As for notifications: a caller that claimed the row owns it until then; after a transient
    # failure the sweep tries again from next_attempt_at.
    lease_until: Mapped[datetime | None] = mapped_column()
    next_attempt_at: Mapped[datetime | None] = mapped_column()

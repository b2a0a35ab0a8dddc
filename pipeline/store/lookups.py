"""The reads that stages make, on one session (the mail's transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, NamedTuple

from sqlalchemy import Integer, String, bindparam, func, literal, or_, select
from sqlalchemy.orm import Session

from pipeline.context import EntityRef, EntityType
from pipeline.lifecycle import OPEN, TicketState, state_of
from pipeline.store.models import (
    Account,
    AccountDomain,
    Contact,
    Notification,
    NotificationRecipient,
    ProcessedMail,
    Project,
    Resource,
    Task,
    Ticket,
)
from pipeline.store.new_contacts import written_ahead
from pipeline.store.rows import flush_appended, held_objects, write_held

OPEN_STATUSES = OPEN


class TicketRef(NamedTuple):
    """A ticket's id and number, without the ticket."""

    id: int
    number: str


@dataclass(frozen=True)
class EntityInfo:
    type: EntityType
    id: int
    number: str
    status: str
    account_id: int | None
    contact_id: int | None
    # Tickets only: what the lifecycle needs to tell the status at a given time (D2).
    state: TicketState | None = None
    source_mailbox: str | None = None


@dataclass(frozen=True)
class ResourceInfo:
    id: int
    name: str


@dataclass(frozen=True)
class AccountInfo:
    id: int
    name: str


@dataclass(frozen=True)
class ContactInfo:
    id: int
    name: str
    account_id: int
    account_name: str
    notifications: bool


# session.info key of the directory rows read in this transaction (see `remembered`).
_CACHE = "mailloop.directory"
_MISSING = object()
_HELD = "mailloop.held"


def remembered(session: Session, key: tuple, load: Callable[[], Any], *, absent_too: bool = False) -> Any:
    """`load()` once per transaction (a batch of mails shares one): the directory does not
    change under a batch, and the same technicians, domains and queues recur in every mail.

    Only what the pipeline never creates may be remembered as absent (`absent_too`): a
    contact or account missing at the first mail may have been created by the second. The
    exceptions are the batch's prefetched contacts and mail identities (`Lookups.prefetch_people`,
    `prefetch_seen`): the write stage, the only place that creates them, tells the cache
    (`remember`). `forget` empties the cache when a mail's savepoint rolls back what it created.
    """
    cache = session.info.setdefault(_CACHE, {})
    value = cache.get(key, _MISSING)
    if value is _MISSING:
        value = load()
        if value is not None or absent_too:
            cache[key] = value
    return value


def cached(session: Session, key: tuple) -> Any:
    """What this transaction's cache holds for `key` (None: nothing), without loading it."""
    return session.info.get(_CACHE, {}).get(key)


def remember(session: Session, key: tuple, value: Any) -> None:
    """Tell the cache what this transaction has just created (a contact, a processed identity)."""
    session.info.setdefault(_CACHE, {})[key] = value


def forget(session: Session) -> None:
    session.info.pop(_CACHE, None)


def hold(session: Session, row: Any) -> Any:
    """Keep `row` in the session's identity map until the transaction ends, and return it.

    The identity map holds rows weakly: a ticket the resolve or write stage read is gone by
    the time the apply stage asks `session.get` for it, which then costs a SELECT per mail.
    A held row outlives the mail that read it, so the queries that find tickets refresh it
    (`populate_existing`): another transaction may have changed it before this one locked it.
    """
    session.info.setdefault(_HELD, []).append(row)
    return row


# Built once and run through Core: the first gate asks it for every mail (bench/README.md, issue 10).
# A mail without a Message-ID (NULL) matches no notification.
_SEEN_BEFORE = select(
    select(Notification.__table__.c.id).where(Notification.__table__.c.message_id == bindparam("message_id"))
    .limit(1).scalar_subquery(),
    select(ProcessedMail.__table__.c.journal_id).where(ProcessedMail.__table__.c.identity == bindparam("identity"))
    .scalar_subquery(),
)

# The same two questions for a whole batch (`Lookups.prefetch_seen`).
_OUR_MESSAGE_IDS = (select(Notification.__table__.c.message_id)
                    .where(Notification.__table__.c.message_id.in_(bindparam("message_ids", expanding=True))))
_PROCESSED = (select(ProcessedMail.__table__.c.identity, ProcessedMail.__table__.c.journal_id)
              .where(ProcessedMail.__table__.c.identity.in_(bindparam("identities", expanding=True))))


# Who an address is, read through Core (built once): every mail asks it for its sender. The
# account owning the address's domain comes in the same round trip, for a sender who turns out
# to be neither resource nor contact (a new contact's first mail): its domain and up to three
# parent domains, the longest that matches winning.
_DOMAINS = 4
_probe = select(bindparam("email", type_=String).label("email")).subquery()
_RES, _CON, _ACC, _AD = Resource.__table__, Contact.__table__, Account.__table__, AccountDomain.__table__
_NEAREST_DOMAIN, _DOMAIN_ACCOUNT = _AD.alias("nearest_domain"), _ACC.alias("domain_account")
_nearest_account_id = (
    select(_NEAREST_DOMAIN.c.account_id)
    .where(_NEAREST_DOMAIN.c.domain.in_([bindparam(f"domain{i}", type_=String) for i in range(_DOMAINS)]))
    .order_by(func.length(_NEAREST_DOMAIN.c.domain).desc()).limit(1).scalar_subquery()
)
_PERSON = (
    select(_RES.c.id.label("resource_id"), _RES.c.name.label("resource_name"),
           _CON.c.id.label("contact_id"), _CON.c.name.label("contact_name"), _CON.c.account_id,
           _ACC.c.name.label("account_name"), _CON.c.notifications,
           _DOMAIN_ACCOUNT.c.id.label("domain_account_id"), _DOMAIN_ACCOUNT.c.name.label("domain_account_name"))
    .select_from(_probe)
    .outerjoin(_RES, _RES.c.email == _probe.c.email)
    .outerjoin(_CON, _CON.c.email == _probe.c.email)
    .outerjoin(_ACC, _ACC.c.id == _CON.c.account_id)
    .outerjoin(_DOMAIN_ACCOUNT, _DOMAIN_ACCOUNT.c.id == _nearest_account_id)
)

# Who a batch's addresses are (`Lookups.prefetch_people`): three round trips for the whole batch.
_RESOURCES_BY_EMAIL = select(_RES.c.email, _RES.c.id, _RES.c.name).where(
    _RES.c.email.in_(bindparam("emails", expanding=True)))
_CONTACT_OBJECTS = select(Contact, Account).outerjoin(Account, Account.id == Contact.account_id)
_ACCOUNTS_BY_DOMAIN = (select(_AD.c.domain, _ACC.c.id, _ACC.c.name).join_from(_AD, _ACC, _AD.c.account_id == _ACC.c.id)
                       .where(_AD.c.domain.in_(bindparam("domains", expanding=True))))

# The same rule for a domain with more parents than the person query takes: the longest match wins.
_ACCOUNT_BY_DOMAIN = (select(_ACC.c.id, _ACC.c.name).join_from(_AD, _ACC, _AD.c.account_id == _ACC.c.id)
                      .where(_AD.c.domain.in_(bindparam("domains", expanding=True)))
                      .order_by(func.length(_AD.c.domain).desc()).limit(1))

# The duplicate-ticket rule's question for every new customer conversation. A None id compares
# as unknown, never true, so one statement serves a contact, an account or both.
_TICKETS = Ticket.__table__
# `Lookups.open_ticket_like` asks the same of the tickets a batch holds back: keep the two alike.
_OPEN_TICKET_LIKE = (
    select(_TICKETS.c.id, _TICKETS.c.number)
    .where(_TICKETS.c.subject_key == bindparam("subject_key"),
           _TICKETS.c.status.in_([literal(s) for s in OPEN_STATUSES]),
           or_(_TICKETS.c.contact_id == bindparam("contact_id", type_=Integer),
               _TICKETS.c.account_id == bindparam("account_id", type_=Integer)))
    .order_by(_TICKETS.c.id.desc()).limit(1)
)


def _parent_domains(domain: str) -> list[str]:
    """mail.acme.example → [mail.acme.example, acme.example]: the names an account's domain may be."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


class Lookups:
    def __init__(self, session: Session) -> None:
        self.session = session

    def contact(self, email: str) -> ContactInfo | None:
        email = email.lower()
        cache = self.session.info.get(_CACHE, {})
        if ("contact", email) in cache:
            return cache[("contact", email)]
        return self.person(email)[1]

    def person(self, email: str) -> tuple[ResourceInfo | None, ContactInfo | None]:
        """The resource and the contact with this address, in one round trip (the attribute stage asks both)."""
        email = email.lower()
        cache = self.session.info.setdefault(_CACHE, {})
        if ("resource", email) in cache and ("contact", email) in cache:
            return cache[("resource", email)], cache[("contact", email)]
        domain = email.rsplit("@", 1)[-1]
        candidates = _parent_domains(domain)
        params = {"email": email, **{f"domain{i}": None for i in range(_DOMAINS)}}
        params.update({f"domain{i}": c for i, c in enumerate(candidates[:_DOMAINS])})
        write_held(self.session, Contact)  # a Core read: any contact row held back is written first
        row = self.session.connection().execute(_PERSON, params).one()
        resource = ResourceInfo(row.resource_id, row.resource_name) if row.resource_id is not None else None
        contact = (ContactInfo(row.contact_id, row.contact_name, row.account_id, row.account_name,
                               row.notifications)
                   if row.contact_id is not None and not written_ahead(self.session, email) else None)
        remembered(self.session, ("resource", email), lambda: resource, absent_too=True)
        if len(candidates) <= _DOMAINS:  # else `account_by_domain` asks for all of them
            remembered(self.session, ("domain", domain), lambda: row.domain_account_id and AccountInfo(
                row.domain_account_id, row.domain_account_name), absent_too=True)
        if contact is not None:  # a contact absent now may be created by the next mail of the batch
            remembered(self.session, ("contact", email), lambda: contact)
        return resource, contact

    def prefetch_people(self, addresses: Iterable[str]) -> None:
        """Answer `person` and `account_by_domain` for all of a batch's senders in three round trips
        instead of one per mail. A contact absent now is remembered absent: the write stage
        remembers the contact it creates, and a concurrent worker's new contact makes this
        transaction's insert fail (the unique address), which runs the mail again."""
        cache = self.session.info.setdefault(_CACHE, {})
        emails = sorted({a.lower() for a in addresses if a} - {k[1] for k in cache if k[0] == "contact"})
        if not emails:
            return
        conn = self.session.connection()
        resources = {r.email: ResourceInfo(r.id, r.name)
                     for r in conn.execute(_RESOURCES_BY_EMAIL, {"emails": emails})}
        contacts = {}
        # As objects, held: the notification plan reads a new ticket's contact and account through the
        # ticket, which was a SELECT per mail from a known contact (bench/README.md, issue 10, session 21).
        for contact, account in self.session.execute(_CONTACT_OBJECTS.where(Contact.email.in_(emails))):
            hold(self.session, contact)
            if account is not None:
                hold(self.session, account)
            contacts[contact.email] = ContactInfo(contact.id, contact.name, contact.account_id,
                                                  account.name if account else None, contact.notifications)
        domains = {e.rsplit("@", 1)[-1] for e in emails} - {k[1] for k in cache if k[0] == "domain"}
        candidates = {d: _parent_domains(d) for d in domains}
        owners = {r.domain: AccountInfo(r.id, r.name) for r in conn.execute(
            _ACCOUNTS_BY_DOMAIN, {"domains": sorted({c for cs in candidates.values() for c in cs})})}
        for email in emails:
            cache.setdefault(("resource", email), resources.get(email))
            cache.setdefault(("contact", email), contacts.get(email))
        for domain, names in candidates.items():
            # The longest name that matches wins: the candidates run from the longest.
            cache[("domain", domain)] = next((owners[n] for n in names if n in owners), None)

    def account_by_domain(self, domain: str) -> AccountInfo | None:
        """The account (id, name) owning `domain` or its nearest parent domain (mail.acme.example → acme.example)."""
        domain = domain.lower()
        return remembered(self.session, ("domain", domain), lambda: self._account_by_domain(domain),
                          absent_too=True)

    def _account_by_domain(self, domain: str) -> AccountInfo | None:
        candidates = _parent_domains(domain)
        if not candidates:
            return None
        row = self.session.connection().execute(_ACCOUNT_BY_DOMAIN, {"domains": candidates}).first()
        return AccountInfo(row.id, row.name) if row is not None else None

    def account_by_name(self, name: str) -> Account | None:
        """The account named `name`; remembered absent too, for the write stage remembers the
        (default) account it creates (`write._default_account`)."""
        return remembered(self.session, ("account", name),
                          lambda: self.session.scalar(select(Account).where(Account.name == name)), absent_too=True)

    def known_roles(self) -> set[str]:
        """Every role some resource has: a role outside this set does not exist (D4)."""
        return {r for roles in self.session.scalars(select(Resource.roles)) for r in roles or []}

    def entity(self, ref: EntityRef) -> EntityInfo | None:
        if ref.type == "ticket":
            t = self.session.scalar(select(Ticket).where(Ticket.number == ref.number)
                                    .execution_options(populate_existing=True))
            if t is not None:
                hold(self.session, t)  # the write and apply stages come back to it
            return t and EntityInfo("ticket", t.id, t.number, t.status, t.account_id, t.contact_id,
                                    state_of(t), t.source_mailbox)
        if ref.type == "task":
            k = self.session.scalar(select(Task).where(Task.number == ref.number))
            return k and EntityInfo("task", k.id, k.number, k.status, k.project.account_id, None)
        p = self.session.scalar(select(Project).where(Project.number == ref.number))
        return p and EntityInfo("project", p.id, p.number, "In Progress", p.account_id, None)

    def seen_before(self, message_id: str | None, identity: str) -> tuple[bool, int | None]:
        """Is `message_id` one of our notifications (our own mail come back), and which journal id
        processed this mail identity already, if any: the first gate's two questions in one round trip,
        or none when `prefetch_seen` asked them for the whole batch."""
        cache = self.session.info.get(_CACHE, {})
        if ("processed", identity) in cache and (message_id is None or ("ours", message_id) in cache):
            return message_id is not None and cache[("ours", message_id)], cache[("processed", identity)]
        flush_appended(self.session)  # an identity this batch holds back is one it has seen
        notification_id, journal_id = self.session.connection().execute(
            _SEEN_BEFORE, {"message_id": message_id, "identity": identity}).one()
        return notification_id is not None, journal_id

    def prefetch_seen(self, mails: Iterable[tuple[str | None, str]]) -> None:
        """Answer `seen_before` for a batch's (Message-ID, identity) pairs in two round trips.

        An identity the batch processes is remembered by the write stage, so a later copy in
        the same batch is seen. A notification this transaction writes has not been sent, so no
        mail of the batch can carry its Message-ID.
        """
        mails = list(mails)
        if not mails:
            return
        cache = self.session.info.setdefault(_CACHE, {})
        conn = self.session.connection()
        message_ids = sorted({m for m, _ in mails if m})
        ours = set(conn.execute(_OUR_MESSAGE_IDS, {"message_ids": message_ids}).scalars()) if message_ids else set()
        identities = sorted({i for _, i in mails})
        processed = {r.identity: r.journal_id for r in conn.execute(_PROCESSED, {"identities": identities})}
        for message_id in message_ids:
            cache.setdefault(("ours", message_id), message_id in ours)
        for identity in identities:
            cache.setdefault(("processed", identity), processed.get(identity))

    def sent_by_us(self, message_ids: list[str], entity: EntityInfo) -> bool:
        """Is one of `message_ids` a notification we sent about `entity`?"""
        if not message_ids:
            return False
        return self.session.scalar(
            select(Notification.id).where(
                Notification.message_id.in_(message_ids),
                Notification.entity_type == entity.type,
                Notification.entity_id == entity.id,
            ).limit(1)
        ) is not None

    def was_notified(self, email: str, entity: EntityInfo) -> bool:
        """Was `email` a recipient of a notification on `entity`?"""
        return self.session.scalar(
            select(Notification.id)
            .join(NotificationRecipient)
            .where(
                NotificationRecipient.email == email.lower(),
                Notification.entity_type == entity.type,
                Notification.entity_id == entity.id,
            ).limit(1)
        ) is not None

    def open_ticket_like(self, subject_key: str, contact_id: int | None, account_id: int | None) -> TicketRef | None:
        """The newest open ticket (id, number) with this normalised subject from this contact (or account).

        Only its id and number: the write stage reads the ticket itself under the entity lock."""
        if not subject_key or (contact_id is None and account_id is None):
            return None
        # A ticket this batch holds back is newer than any the store has (a concurrent first mail of
        # the subject waits on the conversation lock): asked first, and the store's rows need not wait
        # for the held ones to be written — a round trip per mail from a known contact otherwise.
        for held in reversed(held_objects(self.session, Ticket)):
            if held.subject_key == subject_key and held.status in OPEN_STATUSES and (
                    (contact_id is not None and held.contact_id == contact_id)
                    or (account_id is not None and held.account_id == account_id)):
                return TicketRef(held.id, held.number)
        row = self.session.connection().execute(
            _OPEN_TICKET_LIKE, {"subject_key": subject_key, "contact_id": contact_id, "account_id": account_id}
        ).first()
        return TicketRef(*row) if row is not None else None

    def alert_ticket(self, alert_key: str, recovered_since: datetime) -> Ticket | None:
        """The newest ticket for this alert that is open, or Resolved by a recovery since `recovered_since`.

        The second is flapping: the alert fired again soon after it recovered (D9).
        """
        ticket = self.session.scalar(
            select(Ticket).where(Ticket.alert_key == alert_key, Ticket.status.in_(OPEN_STATUSES + ("Resolved",)))
            .order_by(Ticket.id.desc()).limit(1).execution_options(populate_existing=True))
        if ticket is not None:
            hold(self.session, ticket)  # the write and apply stages come back to it, as do the storm's next mails
        if ticket is None or ticket.status in OPEN_STATUSES:
            return ticket
        recovered = ticket.recovered_at
        if recovered is not None and recovered.tzinfo is None:  # SQLite returns naive UTC
            recovered = recovered.replace(tzinfo=recovered_since.tzinfo)
        return ticket if recovered is not None and recovered >= recovered_since else None

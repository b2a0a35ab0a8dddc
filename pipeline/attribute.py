"""Who sent a mail (D1.3): a resource, a contact, or an unknown sender and the policy for it."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources as package_files

from pipeline.config import UnknownSenderPolicy
from pipeline.context import Sender


@lru_cache(maxsize=1)
def shipped_public_domains() -> frozenset[str]:
    text = package_files.files("pipeline").joinpath("data/public_domains.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def is_public_domain(domain: str, extra: list[str] = ()) -> bool:
    domain = domain.lower()
    return domain in shipped_public_domains() or domain in {d.lower() for d in extra}


def decide_sender(
    address: str,
    name: str,
    *,
    resource: tuple[int, str] | None,
    contact: tuple[int, str, int, str] | None,
    domain_account: tuple[int, str] | None,
    default_account: tuple[int, str] | None,
    policy: UnknownSenderPolicy,
    public_domains_extra: list[str] = (),
) -> Sender:
    """Attribute `address`, given what the directory holds for it.

    resource: (id, name); contact: (id, name, account id, account name);
    domain_account: the account owning the address's domain; default_account: the
    mailbox's default account if it exists yet (None: created on first use).
    """
    if resource:
        return Sender(address, resource[1] or name, "resource", resource_id=resource[0],
                      why="address of a resource")
    if contact:
        is_default = contact[3] == policy.default_account
        return Sender(address, contact[1] or name, "contact", contact_id=contact[0], account_id=contact[2],
                      account_name=contact[3], account_is_default=is_default, why=f"contact of {contact[3]}")
    domain = address.rsplit("@", 1)[-1]
    if policy.match_domain and domain_account and not is_public_domain(domain, public_domains_extra):
        return Sender(address, name, "new_contact", account_id=domain_account[0], account_name=domain_account[1],
                      why=f"unknown address at {domain}, a domain of {domain_account[1]}")
    public = is_public_domain(domain, public_domains_extra)
    why = f"unknown address at {'public mail domain ' if public else ''}{domain}"
    if policy.otherwise == "reject":
        return Sender(address, name, "unknown", policy="reject", why=why + "; the mailbox rejects unknown senders")
    if policy.otherwise == "quarantine":
        return Sender(address, name, "unknown", policy="quarantine",
                      why=why + "; the mailbox quarantines unknown senders")
    return Sender(address, name, "new_contact",
                  account_id=default_account[0] if default_account else None,
                  account_name=policy.default_account, account_is_default=True,
                  why=why + f"; new contact of {policy.default_account}")

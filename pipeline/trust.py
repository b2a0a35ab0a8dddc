"""Which Authentication-Results to believe, and whether a mail passed the policy (D8).

Only a header that a trusted host added itself counts: walking the headers from the
top, an `Authentication-Results` whose authserv-id is trusted and that sits above the
first `Received:` line written by a host outside the trust. A header further down came
in with the mail and could have been written by anyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailparser.utils import parse_received

from pipeline.config import TrustPolicy
from pipeline.context import TrustVerdict


@dataclass(frozen=True)
class MethodResult:
    method: str  # dmarc, dkim, spf, arc, …
    result: str  # pass, fail, none, …
    properties: dict[str, str]


@dataclass(frozen=True)
class AuthResults:
    authserv_id: str
    results: list[MethodResult]


_RESINFO = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*([A-Za-z0-9_-]+)(.*)$", re.DOTALL)
_PROP = re.compile(r"([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)\s*=\s*(\"[^\"]*\"|[^\s;]+)")


def parse_authentication_results(value: str) -> AuthResults | None:
    """RFC 8601 header text to its authserv-id and method results (comments dropped)."""
    text = re.sub(r"\([^()]*\)", " ", value)  # comments, one level deep is what MTAs write
    parts = [p.strip() for p in text.split(";")]
    if not parts or not parts[0]:
        return None
    authserv_id = parts[0].split()[0].lower()  # an optional version number may follow
    results = []
    for part in parts[1:]:
        m = _RESINFO.match(part)
        if not m or m.group(1).lower() == "none":
            continue
        props = {k.lower(): v.strip('"').lower() for k, v in _PROP.findall(m.group(3))}
        results.append(MethodResult(m.group(1).lower(), m.group(2).lower(), props))
    return AuthResults(authserv_id, results)


def trusted_authentication_results(headers: list[tuple[str, str]], trusted_ids: list[str],
                                   trusted_hosts: list[str] = ()) -> AuthResults | None:
    """The topmost Authentication-Results that a trusted host added itself, or None."""
    trusted = {t.lower() for t in trusted_ids}
    if not trusted:
        return None
    inside = trusted | {h.lower() for h in trusted_hosts}
    for name, value in headers:
        lname = name.lower()
        if lname == "received" and not _received_by_trusted(value, inside):
            # Everything below this line was written before the mail reached our hosts.
            return None
        if lname == "authentication-results":
            parsed = parse_authentication_results(value)
            if parsed and parsed.authserv_id in trusted:
                return parsed
    return None


def _received_by_trusted(value: str, trusted: set[str]) -> bool:
    try:
        by = parse_received(value).get("by", "")
    except Exception:  # an unparseable Received: line is not one of ours
        return False
    host = by.split()[0].lower().rstrip(";") if by.split() else ""
    return host in trusted


def evaluate(headers: list[tuple[str, str]], from_address: str, policy: TrustPolicy) -> TrustVerdict:
    """Did this mail pass the mailbox's trust policy?"""
    if not policy.authserv_ids:
        return TrustVerdict(False, "the mailbox trusts no authserv-id")
    ar = trusted_authentication_results(headers, policy.authserv_ids, policy.trusted_hosts)
    if ar is None:
        return TrustVerdict(False, "no Authentication-Results from a trusted host ("
                            + ", ".join(policy.authserv_ids) + ")")
    domain = from_address.rsplit("@", 1)[-1].lower()
    dmarc = _dmarc_pass(ar, domain)
    dkim = _dkim_aligned(ar, domain)
    if policy.require == "dmarc":
        ok, what = dmarc, "DMARC pass"
    elif policy.require == "dkim_aligned":
        ok, what = dkim, f"DKIM pass aligned with {domain}"
    else:
        ok, what = dmarc or dkim, f"DMARC pass or DKIM aligned with {domain}"
    seen = ", ".join(f"{r.method}={r.result}" for r in ar.results) or "no results"
    if ok:
        return TrustVerdict(True, f"{ar.authserv_id}: {what} ({seen})", ar.authserv_id)
    return TrustVerdict(False, f"{ar.authserv_id}: {what} required, got {seen}", ar.authserv_id)


def _aligned(d: str, domain: str) -> bool:
    # Relaxed alignment: the same domain or one a parent of the other.
    return bool(d) and (d == domain or domain.endswith("." + d) or d.endswith("." + domain))


def _dmarc_pass(ar: AuthResults, domain: str) -> bool:
    for r in ar.results:
        if r.method == "dmarc" and r.result == "pass":
            header_from = r.properties.get("header.from", domain)
            if _aligned(header_from, domain):
                return True
    return False


def _dkim_aligned(ar: AuthResults, domain: str) -> bool:
    for r in ar.results:
        if r.method == "dkim" and r.result == "pass":
            d = r.properties.get("header.d") or r.properties.get("header.i", "").rsplit("@", 1)[-1]
            if _aligned(d, domain):
                return True
    return False

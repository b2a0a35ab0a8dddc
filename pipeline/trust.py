"""Which Authentication-Results to believe, and whether a mail passed the policy (D8).

Only a header that a trusted host added itself counts: walking the headers from the
top, an `Authentication-Results` whose authserv-id is trusted and that sits above the
first `Received:` line written by a host outside the trust. A header further down came
in with the mail and could have been written by anyone. (Our receiving server must add
its own verdict to every mail: then it is the topmost, and a forged one below it is
never reached.)
"""

from __future__ import annotations

import ipaddress
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
    why_none: str = ""  # the comment on a `none` verdict, e.g. our intake's reason for it


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
    if len(parts) == 2 and parts[1].lower() == "none":
        comment = re.search(r";\s*none\s*\(([^()]*)\)", value, re.IGNORECASE)
        return AuthResults(authserv_id, [], comment.group(1).strip() if comment else "")
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
        if lname == "received" and not _received_inside(value, inside):
            # Everything below this line was written before the mail reached our hosts.
            return None
        if lname == "authentication-results":
            parsed = parse_authentication_results(value)
            if parsed and parsed.authserv_id in trusted:
                return parsed
    return None


def _received_inside(value: str, trusted: set[str]) -> bool:
    """Was this Received: line written by one of our hosts?

    Only who wrote it counts, not where the mail came from: Postfix hides its own Received:
    line from milters, so the Authentication-Results they add sits just *below* the line
    that records the mail coming in from outside — and must still be believed (D8).
    """
    try:
        by = parse_received(value).get("by", "")
    except Exception:  # an unparseable Received: line is not one of ours
        return False
    host = by.split()[0].lower().rstrip(";") if by.split() else ""
    return host in trusted


def peer_ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a connecting peer as a socket names it, or None when it is none."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])  # a link-local scope is no part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # a dual-stack socket's IPv4 peer
        return ip.ipv4_mapped
    return ip


def is_intake_relay(address: str | None, policy: TrustPolicy) -> bool:
    """Is `address`, the peer that handed a mail to our SMTP/LMTP intake, one of the policy's relays?"""
    ip = peer_ip(address) if policy.intake_relays else None
    return ip is not None and any(ip in ipaddress.ip_network(relay, strict=False) for relay in policy.intake_relays)


def evaluate(headers: list[tuple[str, str]], from_address: str, policy: TrustPolicy) -> TrustVerdict:
    """Did this mail pass the mailbox's trust policy?"""
    if not policy.authserv_ids:
        return TrustVerdict(False, "the mailbox trusts no authserv-id")
    ar = trusted_authentication_results(headers, policy.authserv_ids, policy.trusted_hosts)
    if ar is None:
        return TrustVerdict(False, "no Authentication-Results from a trusted host ("
                            + ", ".join(policy.authserv_ids) + ")")
    domain = from_address.rsplit("@", 1)[-1].lower()
    ok, what = _meets(ar, domain, policy.require)
    seen = _seen(ar)
    if ok:
        return TrustVerdict(True, f"{ar.authserv_id}: {what} ({seen})", ar.authserv_id)
    why = f"{ar.authserv_id}: {what} required, got {seen}"
    if policy.arc_authserv_ids:
        arc_ok, arc_why = arc_verdict(headers, ar, domain, policy)
        if arc_ok:
            return TrustVerdict(True, f"{ar.authserv_id}: {seen}; {arc_why}", ar.authserv_id)
        why += f"; ARC: {arc_why}"
    return TrustVerdict(False, why, ar.authserv_id)


def _meets(ar: AuthResults, domain: str, require: str) -> tuple[bool, str]:
    dmarc = _dmarc_pass(ar, domain)
    dkim = _dkim_aligned(ar, domain)
    if require == "dmarc":
        return dmarc, "DMARC pass"
    if require == "dkim_aligned":
        return dkim, f"DKIM pass aligned with {domain}"
    return dmarc or dkim, f"DMARC pass or DKIM aligned with {domain}"


def _seen(ar: AuthResults) -> str:
    if not ar.results:
        return f"none ({ar.why_none})" if ar.why_none else "no results"
    return ", ".join(f"{r.method}={r.result}" for r in ar.results)


# -- ARC (RFC 8617): mail forwarded to us by Microsoft 365 or Google ------------------------------

@dataclass(frozen=True)
class ArcSet:
    instance: int
    sealer: str  # the ARC-Seal's d=
    cv: str  # the ARC-Seal's chain validation: none, pass, fail
    results: AuthResults | None  # the ARC-Authentication-Results of this instance


def arc_sets(headers: list[tuple[str, str]]) -> list[ArcSet] | None:
    """The mail's ARC sets, newest (highest instance) first; None when the sets are malformed."""
    seals: dict[int, dict[str, str]] = {}
    aars: dict[int, AuthResults | None] = {}
    for name, value in headers:
        lname = name.lower()
        if lname not in ("arc-seal", "arc-authentication-results"):
            continue
        m = re.match(r"\s*i\s*=\s*(\d+)\s*;(.*)$", value, re.DOTALL)
        if not m:
            return None
        instance = int(m.group(1))
        target = seals if lname == "arc-seal" else aars
        if instance in target:  # two sets with one instance: a broken or doctored chain
            return None
        if lname == "arc-seal":
            tags = dict((k.strip().lower(), v.strip()) for k, _, v in
                        (t.partition("=") for t in value.split(";")) if k.strip())
            seals[instance] = tags
        else:
            aars[instance] = parse_authentication_results(m.group(2))
    out = []
    for instance in sorted(seals, reverse=True):
        tags = seals[instance]
        out.append(ArcSet(instance, re.sub(r"\s+", "", tags.get("d", "")).lower(),
                          tags.get("cv", "").lower(), aars.get(instance)))
    return out


def arc_verdict(headers: list[tuple[str, str]], ours: AuthResults, domain: str,
                policy: TrustPolicy) -> tuple[bool, str]:
    """Believe a trusted forwarder's verdict, carried in its ARC set (D8).

    The ARC headers came in with the mail, so by themselves they prove nothing. They count
    only when our trusted host verified the chain (arc=pass in its Authentication-Results)
    and the newest set not written by our own hosts is sealed by the domain of a forwarder
    the mailbox trusts (Microsoft 365's seal is d=microsoft.com for mx.microsoft.com):
    anyone can seal a chain, but only Microsoft can seal with microsoft.com's key.
    """
    if not any(r.method == "arc" and r.result == "pass" for r in ours.results):
        return False, f"{ours.authserv_id} did not verify an ARC chain (no arc=pass)"
    sets = arc_sets(headers)
    if not sets:
        return False, "no well-formed ARC set"
    own = {a.lower() for a in policy.authserv_ids}
    newest = next((s for s in sets if not (s.results and s.results.authserv_id in own)), None)
    if newest is None or newest.results is None:
        return False, "no ARC-Authentication-Results from a forwarder"
    forwarder = newest.results.authserv_id
    if forwarder not in {a.lower() for a in policy.arc_authserv_ids}:
        return False, f"ARC i={newest.instance} is from {forwarder}, not a trusted forwarder"
    if not newest.sealer or not (forwarder == newest.sealer or forwarder.endswith("." + newest.sealer)):
        return False, f"ARC i={newest.instance} claims {forwarder} but is sealed by {newest.sealer or 'nobody'}"
    if newest.cv == "fail":
        return False, f"ARC i={newest.instance} records a failed chain (cv=fail)"
    ok, what = _meets(newest.results, domain, policy.require)
    seen = _seen(newest.results)
    if ok:
        return True, f"ARC i={newest.instance} sealed by {newest.sealer}: {forwarder} saw {what} ({seen})"
    return False, f"ARC i={newest.instance}: {forwarder} saw {seen}, {what} required"


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

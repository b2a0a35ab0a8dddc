"""Trust (D8): only Authentication-Results that our own hosts added count."""

from pipeline.config import TrustPolicy
from pipeline.trust import evaluate, parse_authentication_results

POLICY = TrustPolicy(authserv_ids=["mx.msp.example"], require="dmarc")
OUR_RECEIVED = ("Received", "from laptop.msp.example (laptop [10.0.0.5]) by mx.msp.example (Postfix) with ESMTPSA "
                "id 4A; Mon, 23 Nov 2026 09:00:00 +0000")
OUTSIDE_RECEIVED = ("Received", "from localhost by evil-host.evil.example with SMTP; Mon, 23 Nov 2026 08:59:00 +0000")
PASS = ("Authentication-Results", "mx.msp.example; dkim=pass header.d=msp.example; "
        "dmarc=pass (p=reject) header.from=msp.example")
FAIL = ("Authentication-Results", "mx.msp.example; spf=fail smtp.mailfrom=msp.example; dmarc=fail "
        "header.from=msp.example")


def test_a_dmarc_pass_added_by_our_mx_is_believed() -> None:
    verdict = evaluate([PASS, OUR_RECEIVED], "tom@msp.example", POLICY)
    assert verdict.passed and verdict.authserv_id == "mx.msp.example"


def test_a_forged_header_that_came_in_with_the_mail_is_ignored() -> None:
    # The sender wrote a "pass" for our authserv-id below the line where the mail entered our hosts.
    headers = [("Received", "from evil-host.evil.example (unknown [198.51.100.66]) by mx.msp.example (Postfix) "
                            "with ESMTP id 9Z; Mon, 23 Nov 2026 09:00:00 +0000"), OUTSIDE_RECEIVED, PASS]
    verdict = evaluate(headers, "tom@msp.example", POLICY)
    assert not verdict.passed
    assert "no Authentication-Results from a trusted host" in verdict.why


def test_our_fail_above_a_forged_pass_is_what_counts() -> None:
    headers = [FAIL, ("Received", "from evil-host.evil.example by mx.msp.example (Postfix); Mon, 23 Nov 2026"),
               PASS, OUTSIDE_RECEIVED]
    verdict = evaluate(headers, "tom@msp.example", POLICY)
    assert not verdict.passed and "dmarc=fail" in verdict.why


def test_a_header_from_an_untrusted_authserv_id_is_ignored() -> None:
    other = ("Authentication-Results", "mx.evil.example; dmarc=pass header.from=msp.example")
    assert not evaluate([other], "tom@msp.example", POLICY).passed


def test_mail_handed_over_directly_uses_the_topmost_header() -> None:
    assert evaluate([PASS], "tom@msp.example", POLICY).passed
    assert not evaluate([FAIL, PASS], "tom@msp.example", POLICY).passed


def test_dmarc_must_be_for_the_senders_domain() -> None:
    assert not evaluate([PASS, OUR_RECEIVED], "tom@other.example", POLICY).passed


def test_dkim_alignment_policy() -> None:
    policy = TrustPolicy(authserv_ids=["mx.msp.example"], require="dkim_aligned")
    dkim = ("Authentication-Results", "mx.msp.example; dkim=pass header.d=mail.msp.example; dmarc=none")
    assert evaluate([dkim], "tom@msp.example", policy).passed
    foreign = ("Authentication-Results", "mx.msp.example; dkim=pass header.d=mailer.example")
    assert not evaluate([foreign], "tom@msp.example", policy).passed


def test_a_mailbox_that_trusts_nobody_passes_nothing() -> None:
    assert not evaluate([PASS], "tom@msp.example", TrustPolicy()).passed


def test_authentication_results_are_parsed_with_comments_and_versions() -> None:
    ar = parse_authentication_results("mx.msp.example 1; dkim=pass (2048-bit key) header.d=acme.example "
                                      "header.s=s1; spf=pass smtp.mailfrom=acme.example")
    assert ar.authserv_id == "mx.msp.example"
    assert [(r.method, r.result) for r in ar.results] == [("dkim", "pass"), ("spf", "pass")]
    assert ar.results[0].properties["header.d"] == "acme.example"


# -- ARC: mail forwarded to us by Microsoft 365 or Google (D8) ----------------------------------------

ARC_POLICY = TrustPolicy(authserv_ids=["mx.msp.example"], require="dmarc",
                         arc_authserv_ids=["mx.microsoft.com", "mx.google.com"])
OUR_ARC_PASS = ("Authentication-Results", "mx.msp.example; arc=pass (i=1) smtp.remote-ip=40.107.22.71; "
                "spf=fail smtp.mailfrom=msp.example; dkim=fail (body hash did not verify) header.d=msp.example; "
                "dmarc=fail header.from=msp.example")
OUR_ARC_FAIL = ("Authentication-Results", OUR_ARC_PASS[1].replace("arc=pass", "arc=fail"))
M365_ENTRY = ("Received", "from EUR05-DB8-obe.outbound.protection.outlook.com (mail-db8eur05on2071.outbound."
                          "protection.outlook.com [40.107.22.71]) by mx.msp.example (Postfix) with ESMTPS id 4C; "
                          "Mon, 23 Nov 2026 16:40:33 +0100")


def arc_set(sealer: str, authserv_id: str, dmarc: str = "pass", i: int = 1, cv: str = "none") -> list[tuple[str, str]]:
    return [
        ("ARC-Seal", f"i={i}; a=rsa-sha256; s=arcselector10001; d={sealer}; cv={cv}; b=c2VhbA=="),
        ("ARC-Message-Signature", f"i={i}; a=rsa-sha256; c=relaxed/relaxed; d={sealer}; s=arcselector10001; "
                                  "h=From:Date:Subject; bh=Ym9keQ==; b=c2ln"),
        ("ARC-Authentication-Results", f"i={i}; {authserv_id} 1; spf=pass smtp.mailfrom=msp.example; "
                                       f"dmarc={dmarc} action=none header.from=msp.example; dkim=pass "
                                       "header.d=msp.example; arc=none"),
    ]


def test_microsoft_365_forwarded_mail_passes_when_its_arc_is_trusted() -> None:
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("microsoft.com", "mx.microsoft.com")]
    verdict = evaluate(headers, "tom@msp.example", ARC_POLICY)
    assert verdict.passed
    assert "ARC i=1 sealed by microsoft.com: mx.microsoft.com saw DMARC pass" in verdict.why


def test_google_forwarded_mail_passes_when_its_arc_is_trusted() -> None:
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("google.com", "mx.google.com")]
    assert evaluate(headers, "tom@msp.example", ARC_POLICY).passed


def test_arc_is_not_used_unless_the_mailbox_trusts_the_forwarder() -> None:
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("microsoft.com", "mx.microsoft.com")]
    assert not evaluate(headers, "tom@msp.example", POLICY).passed
    only_google = TrustPolicy(authserv_ids=["mx.msp.example"], arc_authserv_ids=["mx.google.com"])
    verdict = evaluate(headers, "tom@msp.example", only_google)
    assert not verdict.passed and "not a trusted forwarder" in verdict.why


def test_arc_needs_our_host_to_have_verified_the_chain() -> None:
    headers = [OUR_ARC_FAIL, M365_ENTRY, *arc_set("microsoft.com", "mx.microsoft.com")]
    verdict = evaluate(headers, "tom@msp.example", ARC_POLICY)
    assert not verdict.passed and "no arc=pass" in verdict.why


def test_an_arc_set_sealed_by_someone_else_cannot_speak_for_microsoft() -> None:
    # Anyone can seal a valid chain with their own key and write "mx.microsoft.com" in it.
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("evil.example", "mx.microsoft.com")]
    verdict = evaluate(headers, "tom@msp.example", ARC_POLICY)
    assert not verdict.passed and "sealed by evil.example" in verdict.why


def test_the_forwarder_must_have_seen_dmarc_pass() -> None:
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("microsoft.com", "mx.microsoft.com", dmarc="fail")]
    verdict = evaluate(headers, "tom@msp.example", ARC_POLICY)
    assert not verdict.passed and "mx.microsoft.com saw" in verdict.why


def test_the_newest_arc_set_counts_and_ours_is_skipped() -> None:
    # Microsoft forwarded (i=1), a Google group forwarded again (i=2), and our MX sealed too (i=3).
    headers = [OUR_ARC_PASS, *arc_set("msp.example", "mx.msp.example", i=3, cv="pass"), M365_ENTRY,
               *arc_set("google.com", "mx.google.com", dmarc="fail", i=2, cv="pass"),
               *arc_set("microsoft.com", "mx.microsoft.com", i=1)]
    verdict = evaluate(headers, "tom@msp.example", ARC_POLICY)
    assert not verdict.passed and "ARC i=2" in verdict.why


def test_doubled_arc_instances_are_refused() -> None:
    headers = [OUR_ARC_PASS, M365_ENTRY, *arc_set("microsoft.com", "mx.microsoft.com"),
               *arc_set("microsoft.com", "mx.microsoft.com")]
    assert not evaluate(headers, "tom@msp.example", ARC_POLICY).passed


def test_a_milter_verdict_just_below_our_own_received_line_counts() -> None:
    # Postfix hides its own Received: line from milters, so their verdict lands below it.
    headers = [OUR_RECEIVED, PASS, OUTSIDE_RECEIVED]
    assert evaluate(headers, "tom@msp.example", POLICY).passed


def test_hops_between_our_hosts_and_through_a_local_filter_are_inside() -> None:
    policy = TrustPolicy(authserv_ids=["mx.msp.example"], trusted_hosts=["relay.msp.example"])
    headers = [("Received", "from mx.msp.example (mx.msp.example [10.0.0.2]) by relay.msp.example (Postfix); "
                            "Mon, 23 Nov 2026 09:00:02 +0000"),
               ("Received", "from localhost (localhost [127.0.0.1]) by mx.msp.example (Postfix); "
                            "Mon, 23 Nov 2026 09:00:01 +0000"),
               PASS, OUR_RECEIVED]
    assert evaluate(headers, "tom@msp.example", policy).passed


def test_our_intakes_none_verdict_is_the_one_believed_and_says_why() -> None:
    ours = ("Authentication-Results",
            "mx.msp.example; none (mailloop intake: peer 198.51.100.66 is not one of intake_relays)")
    received = ("Received", ("from evil ([198.51.100.66])\r\n\tby mx.msp.example (mailloop) with ESMTP\r\n\t"
                             "for <support@msp.example>; Mon, 23 Nov 2026 09:30:00 +0000"))
    verdict = evaluate([ours, received, PASS], "tom@msp.example", POLICY)
    assert not verdict.passed
    assert verdict.why == ("mx.msp.example: DMARC pass required, got none (mailloop intake: peer 198.51.100.66 "
                           "is not one of intake_relays)")


def test_an_intake_relay_is_an_address_or_a_range_and_an_ipv4_peer_of_a_dual_stack_socket_counts() -> None:
    from pipeline.trust import is_intake_relay

    policy = TrustPolicy(authserv_ids=["mx.msp.example"], intake_relays=["192.0.2.25", "10.1.0.0/16", "2001:db8::/32"])
    assert is_intake_relay("192.0.2.25", policy) and is_intake_relay("10.1.200.3", policy)
    assert is_intake_relay("::ffff:10.1.0.9", policy) and is_intake_relay("2001:db8::1", policy)
    assert not is_intake_relay("192.0.2.26", policy) and not is_intake_relay("10.2.0.1", policy)
    assert not is_intake_relay("::1", policy) and not is_intake_relay(None, policy)
    assert not is_intake_relay("not-an-address", policy)
    assert not is_intake_relay("127.0.0.1", TrustPolicy(authserv_ids=["mx.msp.example"]))

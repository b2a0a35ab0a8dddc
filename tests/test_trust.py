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

"""Subject normalisation (D1.5) and the ticket title made from a subject."""

import pytest

from pipeline.parsers.references import tag_pattern
from pipeline.parsers.subject import normalise_subject, ticket_title


@pytest.mark.parametrize("subject", [
    "Printer down", "RE: Printer down", "Re: RE: printer  DOWN", "FW: Printer down", "Fwd: Printer down",
    "AW: WG: Printer down", "SV: VS: Printer down", "RV: TR: Printer down", "Antw: Printer down",
    "RE[2]: Printer down", "[EXTERNAL] RE: Printer down", "  re :  Printer\tdown ",
])
def test_reply_and_forward_prefixes_are_stripped(subject: str) -> None:
    assert normalise_subject(subject) == "printer down"


def test_the_ticket_tag_is_kept() -> None:
    assert normalise_subject("RE: [Ticket#T20261123.0001] Printer down") == "[ticket#t20261123.0001] printer down"


def test_a_word_that_merely_starts_like_a_prefix_is_kept() -> None:
    assert normalise_subject("Rework of the VPN") == "rework of the vpn"
    assert normalise_subject("Travel request") == "travel request"


def test_a_title_loses_prefixes_and_our_tag() -> None:
    tag = tag_pattern("[Ticket#{number}]", "T{date:%Y%m%d}.{seq:04d}")
    assert ticket_title("RE: [Ticket#T20261123.0001] Printer down", tag) == "Printer down"
    assert ticket_title("", tag) == "(no subject)"

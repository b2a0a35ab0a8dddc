"""Finding ticket, task and project numbers (D3), tagged or bare, and our own Message-IDs."""

from pipeline.config import NumberingSettings
from pipeline.parsers.references import (
    find_references_in_subject,
    find_ticket_number,
    outbound_message_id,
    references_from_message_ids,
)

N = NumberingSettings()


def test_a_tagged_number_is_found() -> None:
    assert find_ticket_number("RE: [Ticket#T20261123.0001] Printer", N) == "T20261123.0001"


def test_a_bare_number_is_found_and_upper_cased() -> None:
    assert find_ticket_number("about t20261123.0042 again", N) == "T20261123.0042"


def test_a_number_past_9999_widens() -> None:
    assert find_ticket_number("[Ticket#T20261123.10000]", N) == "T20261123.10000"


def test_a_number_inside_a_longer_word_is_not_a_number() -> None:
    assert find_ticket_number("XT20261123.0001", N) is None
    assert find_ticket_number("T2026112.0001", N) is None


def test_task_and_project_numbers_are_found() -> None:
    refs = find_references_in_subject("K20261123.0002 for P20261120.0001", N)
    assert [(r.type, r.number) for r in refs] == [("task", "K20261123.0002"), ("project", "P20261120.0001")]


def test_custom_formats_are_honoured() -> None:
    custom = NumberingSettings(ticket="INC-{date:%y%j}-{seq:06d}")
    assert find_ticket_number("Re: INC-26341-000123 outage", custom) == "INC-26341-000123"


def test_our_message_ids_name_their_entity() -> None:
    ours = outbound_message_id("ticket", "T20261123.0001", 12, "abc123", "msp.example")
    refs = references_from_message_ids(["<x@client.example>", ours])
    assert [(r.type, r.number, r.via) for r in refs] == [("ticket", "T20261123.0001", "reply")]
    assert references_from_message_ids(["<mailloop+ticket+T1@evil.example"]) == []

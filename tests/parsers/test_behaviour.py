"""Single behaviours of the parsers, each named for what it guarantees."""

from __future__ import annotations

import base64

from pipeline.parsers.charset import decode_bytes, decode_header_value
from pipeline.parsers.html import html_to_text
from pipeline.parsers.mime import mail_identity, parse_mail, unflow
from pipeline.parsers.params import split_header
from pipeline.parsers.reply import new_text
from pipeline.parsers.sanitize import sanitize_html
from pipeline.parsers.subject import normalise_subject, strip_prefixes
from tests.parsers.tnef_blob import winmail_dat


def test_a_character_split_across_two_encoded_words_comes_out_whole() -> None:
    raw = "Grüße".encode()
    first, second = base64.b64encode(raw[:3]).decode(), base64.b64encode(raw[3:]).decode()
    assert decode_header_value(f"=?UTF-8?B?{first}?=\r\n =?UTF-8?B?{second}?=") == "Grüße"


def test_utf8_labelled_latin1_is_read_as_utf8() -> None:
    assert decode_bytes("Grüße €".encode(), "iso-8859-1") == "Grüße €"


def test_windows_1252_labelled_utf8_is_read_as_windows_1252() -> None:
    assert decode_bytes("l’accès coûte 50 €".encode("cp1252"), "utf-8") == "l’accès coûte 50 €"


def test_unlabelled_iso_2022_jp_is_recognised_by_its_escapes() -> None:
    assert decode_bytes("日本語のメール".encode("iso2022_jp")) == "日本語のメール"


def test_any_bytes_under_any_label_decode_to_text() -> None:
    for label in (None, "utf-8", "utf-7", "iso-2022-jp", "x-nonsense", "utf-16", "windows-1255", "'\"*"):
        assert isinstance(decode_bytes(bytes(range(256)), label), str)


def test_rfc2231_segments_are_joined_before_percent_decoding() -> None:
    _, params = split_header("attachment; filename*0*=UTF-8''Gr%C3; filename*1*=%BC%C3%9Fe.txt")
    assert params["filename"] == "Grüße.txt"


def test_mail_without_message_id_gets_the_same_identity_every_time() -> None:
    raw = b"From: a@b.example\nSubject: x\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n\nbody\n"
    first, second = parse_mail(raw), parse_mail(raw)
    assert first.message_id is None
    assert mail_identity(first) == mail_identity(second)
    assert mail_identity(first) != mail_identity(parse_mail(raw.replace(b"body", b"other body")))


def test_german_outlook_block_is_cut_from_the_note() -> None:
    body = ("Passt, danke.\n\nVon: MSP <support@msp.example>\nGesendet: Montag, 23. November 2026 10:12\n"
            "An: Max\nBetreff: Drucker\n\nAlter Text")
    assert new_text(body) == "Passt, danke."


def test_a_thank_you_that_is_the_whole_reply_is_kept() -> None:
    assert new_text("Thanks, that helped.\n") == "Thanks, that helped."


def test_a_closing_followed_by_more_sentences_is_not_a_signature() -> None:
    body = "Hi,\n\nThanks!\n\nAlso the scanner on floor 2 is broken. Can you look at it?"
    assert new_text(body) == body


def test_bottom_posted_answer_is_the_note() -> None:
    assert new_text("On Mon, Jane wrote:\n> old\n> older\n\nNew answer here.") == "New answer here."


def test_remote_images_lose_their_source_but_inline_images_keep_it() -> None:
    html = sanitize_html('<img src="https://t.example/p.gif"><img src="cid:logo@x"><p onclick="x()">hi</p>')
    assert "t.example" not in html and 'src="cid:logo@x"' in html and "onclick" not in html


def test_html_quotes_become_quoted_lines() -> None:
    assert html_to_text("<p>Yes.</p><blockquote>Is it on?</blockquote>") == "Yes.\n\n> Is it on?"


def test_subject_tags_of_mailing_lists_are_kept_and_prefixes_around_them_dropped() -> None:
    assert normalise_subject("[acme-users] Re: VPN") == normalise_subject("Re: [acme-users] VPN")
    assert strip_prefixes("RES: ENC: Impressora") == "Impressora"
    assert strip_prefixes("EXTERNAL: AW: WG: Drucker") == "Drucker"


def test_attachments_over_the_limit_are_skipped_without_losing_the_mail() -> None:
    raw = (b"From: a@b.example\nContent-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/plain\n\nhi\n"
           b"--x\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n"
           b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(b"%PDF" * 5000) + b"--x--\n")
    small = parse_mail(raw, max_attachment_bytes=1000)
    assert small.body_text == "hi"
    assert small.attachments[0].skipped and small.attachments[0].data == b""
    assert small.attachments[0].size >= 20000
    assert parse_mail(raw).attachments[0].skipped is None


def test_a_broken_winmail_dat_is_kept_as_it_came() -> None:
    blob = winmail_dat([("a.txt", b"hello")])[:20]
    raw = (b"From: a@b.example\nContent-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/plain\n\nhi\n"
           b"--x\nContent-Type: application/ms-tnef; name=winmail.dat\nContent-Transfer-Encoding: base64\n\n"
           + base64.encodebytes(blob) + b"--x--\n")
    mail = parse_mail(raw)
    assert [a.filename for a in mail.attachments] == ["winmail.dat"]
    assert mail.warnings == ["winmail.dat could not be unpacked: kept as it came"]
    assert mail.body_text == "hi"


def test_format_flowed_lines_are_joined_and_the_signature_separator_kept() -> None:
    text = "One long \nparagraph.\n-- \nJane\n> quoted \n> line\n>> deeper"
    assert unflow(text) == "One long paragraph.\n-- \nJane\n> quoted line\n>> deeper"
    assert unflow("split-\nno\nwo \nrd", delsp=True) == "split-\nno\nword"


def test_a_sent_line_above_the_from_line_is_history_too() -> None:
    body = "Passt.\n\nGesendet: Mittwoch, 25. November 2026 um 17:02 Uhr\nVon: MSP <support@msp.example>\nAn: Hans\n\nalt"
    assert new_text(body) == "Passt."


def test_a_note_keeps_at_most_one_empty_line_between_paragraphs() -> None:
    assert new_text("First.\n\n \n\n\nSecond.") == "First.\n\nSecond."

"""What the sender newly wrote: the body without quoted history, signature and disclaimer.

The note that lands on a ticket is `new_text(body_text)`; the whole body stays in
`body_text` and the raw mail in the journal. Where the history starts is the earliest of:
- an attribution line ("On … wrote:" and its Spanish, German, French, Portuguese, Dutch,
  Italian, … forms, also wrapped over two lines) — mail-parser-reply's maintained
  per-language patterns, plus our own for what they miss (Portuguese; Gmail's Spanish
  "escribió:" after a single space; German "Am … schrieb …:" variants; Russian "… пишет:";
  Gmail's Japanese "<date> <name> <address>:");
- an "-----Original Message-----" / forwarded-message rule in any of those languages;
- an Outlook header block: a From:-line followed closely by a Sent:/Date:-line, in any of
  those languages and in Russian, Greek, Hebrew, Japanese and Chinese (with the underscore
  rule Outlook puts above it, or the Sent: line that GMX and web.de put above From:);
- a block of `>`-quoted lines that runs to the end; quoted lines between new text
  (answers written inline) are dropped with the attribution above them.
Then the signature ("-- ", "Sent from my iPhone" and its translations, a closing
"Kind regards," / "Mit freundlichen Grüßen" / "Saludos," … followed by a few short
lines), trailing legal disclaimers and a leading "this mail came from outside" banner go.
A body that would come out empty is kept whole.
"""

from __future__ import annotations

import re

from mailparser_reply.constants import MAIL_LANGUAGES

_LIBRARY_LANGUAGES = ("en", "de", "es", "fr", "it", "nl", "da", "sv", "pl", "cs")
_LONGEST_HEADER_LINE = 400  # attribution lines are short; long lines are never tested (and never backtrack)
_SCAN_LINES = 5000  # history starts near the top; a 20 MB body is not searched line by line


def _library_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for lang in _LIBRARY_LANGUAGES:
        source = MAIL_LANGUAGES.get(lang, {}).get("wrote_header")
        if source:
            try:
                patterns.append(re.compile(source, re.IGNORECASE))
            except re.error:  # a future release with a pattern we cannot use: ours still apply
                continue
    return patterns


_LIBRARY_WROTE = _library_patterns()
_ATTRIBUTION = re.compile(
    r"""^\s*>?\s*(?:
        On\s.{3,300}\swrote\s?:                              # English
      | El\s.{3,300}\sescribi[óo]\s?:                        # Spanish
      | Am\s.{3,300}\sschrieb.{0,200}:                       # German
      | .{3,200}\sschrieb\s(?:am\s.{3,100})?:                # German, "X schrieb am …:"
      | Le\s.{3,300}\sa\s[ée]crit\s?:                        # French
      | Em\s.{3,300}\sescreveu\s?:                           # Portuguese
      | .{3,200}\sescreveu\s?:                               # Portuguese, "X escreveu:"
      | Op\s.{3,300}\sschreef.{0,200}:                       # Dutch
      | Il\s.{3,300}\sha\sscritto\s?:                        # Italian
      | .{3,200}\s(?:wrote|escribió|a\sécrit|ha\sscritto|schreef)\s?:  # "Name wrote:"
      | .{3,200}\s(?:пишет|написал[аи]?|написал\(а\))\s?:       # Russian, "<date>, <name> пишет:"
      | \d{4}年\d{1,2}月\d{1,2}日.{3,300}[:：]                  # Japanese (Gmail): "<date> <name> <address>:"
    )\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_RULE = re.compile(
    r"""^\s*>?\s*(?:
        -{2,}\s*(?:Original\sMessage|Urspr[üu]ngliche\sNachricht|Originalnachricht|Mensaje\soriginal
                 |Message\sd'origine|Message\soriginal|Mensagem\soriginal|Oorspronkelijk\sbericht
                 |Origineel\sbericht|Messaggio\soriginale|Forwarded\smessage|Weitergeleitete\sNachricht
                 |Mensaje\sreenviado|Message\stransf[ée]r[ée]|Mensagem\sencaminhada|Doorgestuurd\sbericht
                 |Messaggio\sinoltrato|Original-Nachricht)\s*-{2,}
      | Begin\sforwarded\smessage\s?:
      | Anfang\sder\sweitergeleiteten\s(?:Nachricht|E-Mail)\s?:
      | Inicio\sdel\smensaje\sreenviado\s?:
      | D[ée]but\sdu\smessage\sr[ée]exp[ée]di[ée]\s?:
      | In[íi]cio\sda\smensagem\sreencaminhada\s?:
      | Begin\sdoorgestuurd\sbericht\s?:
      | Inizio\smessaggio\sinoltrato\s?:
    )\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
# Outlook's header block: a From: line followed closely by Sent:/Date: (in any language).
_HEADER_FROM = re.compile(r"^\s*>?\s*\*?(?:From|Von|De|Van|Da|Från|Fra|Od|Absender|От|Από|מאת|差出人|发件人|寄件者)"
                          r"\s*[:：]\*?\s*\S", re.IGNORECASE)
_HEADER_SENT = re.compile(
    r"^\s*>?\s*\*?(?:Sent|Date|Gesendet|Datum|Enviado|Fecha|Envoy[ée]|Date\sd'envoi|Verzonden|Verstuurd|Inviato"
    r"|Data|Skickat|Sendt|Wysłano|To|An|Para|À|A|Aan|Subject|Betreff|Asunto|Objet|Assunto|Onderwerp|Oggetto"
    r"|Отправлено|Дата|Кому|Тема|Στάλθηκε|Ημερομηνία|Προς|Θέμα|נשלח|תאריך|אל|נושא|送信日時|日付|宛先|件名"
    r"|发送时间|收件人|主题)\s*[:：]",
    re.IGNORECASE,
)
_HEADER_DATE = re.compile(
    r"^\s*>?\s*\*?(?:Sent|Date|Gesendet|Datum|Enviado|Fecha|Envoy[ée]|Verzonden|Inviato|Data|Отправлено|Дата"
    r"|Στάλθηκε|נשלח|送信日時)\s*[:：]\*?\s*\S",
    re.IGNORECASE,
)
_UNDERSCORE_RULE = re.compile(r"^\s*[_\-]{10,}\s*$")
_SIG_DELIMITER = re.compile(r"^-- ?$|^—$")
_MOBILE = re.compile(
    r"^(?:Sent\sfrom\s(?:my\s)?|Get\sOutlook\sfor\s|Sent\swith\s|Von\smeinem\s|Gesendet\svon\s(?:meinem\s)?"
    r"|Gesendet\smit\s|Enviado\sdesde\smi\s|Enviado\sdesde\s|Envoy[ée]\sde(?:puis)?\smon\s|Envoy[ée]\sde(?:puis)?\s"
    r"|Enviado\sdo\smeu\s|Enviado\sa\spartir\sdo\s|Verzonden\s(?:vanaf|met)\smijn\s|Verstuurd\svanaf\smijn\s"
    r"|Inviato\sda(?:l\smio)?\s|Skickat\sfrån\smin\s|Sendt\sfra\smin\s).{1,60}$",
    re.IGNORECASE | re.VERBOSE,
)
_CLOSING = re.compile(
    r"""^(?:best\sregards|kind\sregards|warm\sregards|regards|best\swishes|best|cheers|thanks|thank\syou|many\sthanks
      |thanks\sin\sadvance|br|mit\sfreundlichen\sgr(?:ü|ue)(?:ß|ss)en|freundliche\sgr(?:ü|ue)(?:ß|ss)e
      |viele\sgr(?:ü|ue)(?:ß|ss)e|beste\sgr(?:ü|ue)(?:ß|ss)e|liebe\sgr(?:ü|ue)(?:ß|ss)e|gru(?:ß|ss)|mfg|lg|vg
      |danke|vielen\sdank|saludos(?:\scordiales)?|un\ssaludo|atentamente|cordialmente|gracias|muchas\sgracias
      |cordialement|bien\scordialement|salutations|bien\s[àa]\svous|merci|merci\sd'avance|bonne\sjourn[ée]e
      |atenciosamente|cumprimentos|abra[çc]os|obrigad[oa]|com\sos\smelhores\scumprimentos
      |met\svriendelijke\sgroet(?:en)?|vriendelijke\sgroet(?:en)?|groeten|mvg|bedankt
      |cordiali\ssaluti|distinti\ssaluti|saluti|grazie|un\scordiale\ssaluto
      |с\sуважением|спасибо|заранее\sспасибо|всего\sдоброго|ευχαριστώ|με\sεκτίμηση|φιλικά|תודה|תודה\sרבה|בברכה
    )[\s,.!]*$""",
    re.IGNORECASE | re.VERBOSE,
)
_SIGNATURE_MAX_LINES = 12
_DISCLAIMER = re.compile(
    r"confidential|privileged|intended\s(?:solely\s|only\s)?for|if\syou\s(?:are\snot|have\sreceived)|disclaimer"
    r"|vertraulich|nicht\sder\srichtige\sadressat|irrt[üu]mlich|haftungsausschluss|gesch[äa]ftsf[üu]hrer|amtsgericht"
    r"|confidencial|destinatario|aviso\slegal|confidentiel|destinataire|ce\smessage\set\stoutes"
    r"|destinat[áa]rio|vertrouwelijk|geadresseerde|riservat|destinatari"
    r"|consider\sthe\senvironment|before\sprinting",
    re.IGNORECASE,
)
_BANNER = re.compile(
    r"^\s*\[?(?:CAUTION|EXTERNAL(?:\sEMAIL)?|WARNING|WARNUNG|ACHTUNG|ATENCI[ÓO]N|ATTENTION|ATEN[ÇC][ÃA]O|LET\sOP"
    r"|ATTENZIONE)\]?\s*:?.{0,200}(?:outside|extern|exterior|ext[ée]rieur|externe|externo|buiten|esterno)",
    re.IGNORECASE,
)
_QUOTE = re.compile(r"^\s*>")
_BLANK_RUN = re.compile(r"\n(?:[ \t]*\n){2,}")  # a note has at most one empty line between paragraphs


def new_text(body: str) -> str:
    """The part of `body` its sender newly wrote (see the module docstring)."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = lines[:history_start(lines)]
    lines = _without_inline_quotes(lines)
    lines = _without_banner(lines)
    lines = _without_disclaimer(lines)
    lines = _without_signature(lines)
    text = _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n").rstrip()
    # A reply that is only a quote (or empty) keeps its whole body rather than nothing.
    return text if text.strip() else body.strip()


def history_start(lines: list[str]) -> int:
    """Index of the first line of quoted or forwarded history (len(lines) when there is none)."""
    last_unquoted = max((i for i, x in enumerate(lines) if x.strip() and not _QUOTE.match(x)), default=-1)
    written = False  # has the sender written anything above this line?
    for i, line in enumerate(lines[:_SCAN_LINES]):
        if not line.strip():
            continue
        if len(line) <= _LONGEST_HEADER_LINE:
            if _QUOTE.match(line) and i > last_unquoted:
                return i
            # Above the sender's own text, an attribution is bottom-posting: the quote it
            # introduces is dropped later, the answer below it kept.
            if (_RULE.match(line) or _is_attribution(line) or _attribution_wrapped(lines, i)
                    or _HEADER_FROM.match(line) and _header_block_follows(lines, i)):
                if written:
                    return _above_rule(lines, i)
                continue
        if not _QUOTE.match(line) and not _UNDERSCORE_RULE.match(line):
            written = True
    return len(lines)


def _is_attribution(line: str) -> bool:
    stripped = line.strip()
    if not stripped.endswith((":", "：")):
        return False
    if _ATTRIBUTION.match(line):
        return True
    return any(p.match(stripped) for p in _LIBRARY_WROTE)


def _attribution_wrapped(lines: list[str], i: int) -> bool:
    # Clients wrap long "On <date>, <name> <address> wrote:" lines in two (or three).
    if i + 1 >= len(lines) or not lines[i + 1].strip() or len(lines[i + 1]) > _LONGEST_HEADER_LINE:
        return False
    joined = lines[i].rstrip() + " " + lines[i + 1].strip()
    if _is_attribution(joined):
        return True
    return (i + 2 < len(lines) and bool(lines[i + 2].strip()) and len(lines[i + 2]) <= _LONGEST_HEADER_LINE
            and _is_attribution(joined + " " + lines[i + 2].strip()))


def _header_block_follows(lines: list[str], i: int) -> bool:
    return any(_HEADER_SENT.match(x) for x in lines[i + 1: i + 4] if x.strip())


def _above_rule(lines: list[str], i: int) -> int:
    """Outlook puts an underscore rule (or an "Original Message" rule) above its header block;
    GMX and web.de put the block's "Gesendet:" line right above its "Von:" line."""
    if i > 0 and _HEADER_DATE.match(lines[i - 1]):
        i -= 1
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j >= 0 and (_UNDERSCORE_RULE.match(lines[j]) or _RULE.match(lines[j])):
        return j
    return i


def _without_inline_quotes(lines: list[str]) -> list[str]:
    """Answers written between quoted lines keep the answers, not the quotes (nor "X wrote:" above them)."""
    if not any(_QUOTE.match(x) for x in lines):
        return lines
    keep: list[str] = []
    next_is_quote = False  # is the next non-blank line a quote? (scanning backwards)
    for line in reversed(lines):
        if _QUOTE.match(line):
            next_is_quote = True
            continue
        if line.strip():
            if next_is_quote and _is_attribution(line):
                next_is_quote = False
                continue
            next_is_quote = False
        if line.strip() or not keep or keep[-1].strip():  # a removed quote leaves one blank line, not two
            keep.append(line)
    keep.reverse()
    return keep


def _without_banner(lines: list[str]) -> list[str]:
    first = next((i for i, x in enumerate(lines) if x.strip()), None)
    if first is None or not _BANNER.match(lines[first]):
        return lines
    end = first
    while end < len(lines) and lines[end].strip():
        end += 1
    return lines[end:]


def _without_signature(lines: list[str]) -> list[str]:
    for i, line in enumerate(lines[:_SCAN_LINES]):
        stripped = line.strip()
        if not stripped:
            continue
        if _SIG_DELIMITER.match(line.rstrip("\n")) or _MOBILE.match(stripped):
            return lines[:i]
        if i > 0 and len(stripped) < 40 and _CLOSING.match(stripped):
            rest = [x.strip() for x in lines[i + 1:] if x.strip()]
            if len(rest) <= _SIGNATURE_MAX_LINES and all(_signature_like(x) for x in rest):
                return lines[:i]
    return lines


def _signature_like(line: str) -> bool:
    """A name, title, company, phone or address line — not a sentence someone wrote."""
    if _DISCLAIMER.search(line):
        return True
    return len(line) <= 70 and not (len(line.split()) >= 5 and line[-1] in ".?!:") and not line.endswith("?")


def _without_disclaimer(lines: list[str]) -> list[str]:
    """Trailing paragraphs in legal language ("This e-mail is confidential…")."""
    end = len(lines)
    while True:
        while end and not lines[end - 1].strip():
            end -= 1
        start = end
        while start and lines[start - 1].strip():
            start -= 1
        paragraph = " ".join(lines[start:end])
        if start == 0 or not paragraph or len(_DISCLAIMER.findall(paragraph)) < 2:
            return lines[:end]
        end = start

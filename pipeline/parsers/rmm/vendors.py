"""One small subclass per RMM vendor: its default sender and the patterns of its alert mail.

Written from the vendors' documented default alert mail (and the samples in
tests/fixtures/rmm/); every pattern is overridable per mailbox in
`[mailbox.stage_settings.<name>]`. Cloud products send from the vendor's domain; the
on-premises ones (Kaseya VSA, N-central, Automate) from an address the MSP chose, so their
default sender is only the usual local part — set `senders` for yours.
"""

from __future__ import annotations

from pipeline.parsers.rmm import RmmAlertStage

# A label cell in an HTML table comes out of the text conversion as "Label: | value".
_SEP = r":?[ \t]*\|?[ \t]*"


def _line(label: str, field: str) -> str:
    return rf"^[ \t]*(?:{label}){_SEP}(?P<{field}>[^\r\n|]+?)[ \t]*$"


class DattoRmm(RmmAlertStage):
    """Datto RMM (CentraStage): "Alert: <monitor> - <device> - Priority: <p>"; "Resolved: …" on recovery."""

    name = "datto_rmm"
    senders = (r"no-?reply@(?:[\w-]+\.)*(?:centrastage\.net|rmm\.datto\.com)",)
    subject = (r"^(?:Alert(?: Resolved)?|Resolved)\s*:\s*(?P<alert_type>.+?) - (?P<device>\S+)"
               r"(?: - Priority\s*:\s*(?P<severity>\w+))?$",)
    body = {"site": _line("Site", "site"), "severity": _line("Priority", "severity"),
            "alert_id": _line("Alert UID", "alert_id")}
    recovery = r"^(?:Alert Resolved|Resolved)\s*:|^An alert has been resolved"


class KaseyaVsa(RmmAlertStage):
    """Kaseya VSA monitoring alarm: "Monitoring Alarm - <machine.group> - <what>"; "Alarm Cleared" on recovery."""

    name = "kaseya_vsa"
    senders = (r"(?:vsa|kaseya)[\w.+-]*@[\w.-]+",)
    subject = (r"^(?:Monitoring )?Alarm(?: Cleared| Closed)? - (?P<device>\S+) - (?P<alert_type>.+)$",)
    body = {"site": _line("Group", "site"), "alert_id": _line("Alarm ID", "alert_id"),
            "severity": _line("Severity", "severity")}
    recovery = r"^(?:Monitoring )?Alarm (?:Cleared|Closed)\b|^Alarm status:\s*(?:Cleared|Closed)"


class Nable(RmmAlertStage):
    """N-able N-central "<State> - <service> - <device> - <customer>", N-sight "<STATE> - <check> on <device> (<client>)"."""

    name = "nable"
    senders = (r"(?:n-?central|n-?sight|n-?able|rmm)[\w.+-]*@[\w.-]+",)
    subject = (
        r"^(?P<severity>Failed|Warning|Normal|Misconfigured|No Data|Disconnected) - (?P<alert_type>.+?)"
        r" - (?P<device>\S+) - (?P<site>.+)$",
        r"^(?P<severity>FAILED|PASSED|OK)\s*-\s*(?P<alert_type>.+?) on (?P<device>\S+)(?: \((?P<site>[^)]+)\))?$",
    )
    body = {"site": _line("Customer|Client", "site"), "alert_id": _line("Notification ID", "alert_id")}
    recovery = r"^(?:Normal|PASSED|OK) - |^State" + _SEP + r"Normal\b"


class NinjaOne(RmmAlertStage):
    """NinjaOne condition: "[<severity>] <condition> - <device>"; "[Reset] …" when the condition resets."""

    name = "ninjaone"
    senders = (r"no-?reply@(?:[\w-]+\.)*(?:ninjarmm\.com|ninjaone\.com)",)
    subject = (r"^\[(?P<severity>[^\]]+)\]\s*(?P<alert_type>.+) - (?P<device>\S+)$",)
    body = {"site": _line("Organization", "site"), "alert_id": _line("Alert ID|Activity ID", "alert_id")}
    recovery = r"^\[Reset\]|^Condition reset"


class ConnectWiseAutomate(RmmAlertStage):
    """ConnectWise Automate (LabTech): "<STATUS> - <monitor> on <computer> at <client>\\<location>"; SUCCESS on recovery."""

    name = "cw_automate"
    senders = (r"(?:automate|labtech|cwa)[\w.+-]*@[\w.-]+",)
    subject = (r"^(?P<severity>FAILED|SUCCESS|WARNING)\s*-\s*(?P<alert_type>.+?) on (?P<device>\S+)"
               r"(?: at (?P<site>[^\\]+?)(?:\\.*)?)?$",)
    body = {"site": _line("Client", "site"), "alert_id": _line("Alert ID|Monitor ID", "alert_id")}
    recovery = r"^SUCCESS\s*-"

"""Tables and details for people (stdout of the non-JSON commands)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"New": "bold cyan", "In Progress": "yellow", "Waiting Customer": "magenta",
                "Waiting Until": "magenta", "Resolved": "green", "Closed": "dim"}
OUTCOME_STYLE = {"ticket_created": "green", "note_added": "cyan", "discarded": "yellow",
                 "already_processed": "dim", "quarantined": "red", "rejected": "red"}


def ticket_table(rows: list[dict[str, Any]], console: Console | None = None, title: str = "Tickets") -> None:
    console = console or Console()
    table = Table(title=title, title_justify="left")
    for col in ("Number", "Status", "Account", "Contact", "Title", "Notes"):
        table.add_column(col, justify="right" if col == "Notes" else "left")
    for r in rows:
        contact = r["contact"]["email"] if r["contact"] else "—"
        table.add_row(r["number"], f"[{STATUS_STYLE.get(r['status'], '')}]{r['status']}", r["account"], contact,
                      r["title"], str(r["notes"]))
    console.print(table)


def ticket_detail(t: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{t['number']}[/bold]  {t['title']}")
    who = t["contact"]["email"] if t["contact"] else "—"
    assigned = t["assigned_resource"]["email"] if t["assigned_resource"] else "unassigned"
    console.print(f"{t['status']} · {t['priority']} · {t['account']} · contact {who} · {assigned}\n")
    console.print(t["description"] or "(no description)", markup=False)
    for n in t["notes"]:
        flag = " (internal)" if n["internal"] else ""
        console.print(f"\n[bold]Note by {n['author']['email'] if n['author'] else '?'}{flag}[/bold] "
                      f"{n['created_at']}")
        console.print(n["body"], markup=False)
    if t["timeline"]:
        console.print("\n[bold]Timeline[/bold]")
        for e in t["timeline"]:
            change = f" {e['from'] or ''} → {e['to']}" if e["to"] else ""
            console.print(f"  {e['at']}  {e['who']}  {e['what']}{change}", markup=False)

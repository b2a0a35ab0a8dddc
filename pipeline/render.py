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


def status_tables(st: Any, console: Console | None = None) -> None:
    """`pipeline status`: one table per concern, read at a glance."""
    console = console or Console()
    boxes = Table(title="Mailboxes", title_justify="left")
    for col in ("Mailbox", "Source", "Last fetch", "State", "Waiting", "Outcomes"):
        boxes.add_column(col)
    for b in st.mailboxes:
        state = f"[red]failing: {b.failing}" if b.failing else "[green]ok"
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(b.outcomes.items())) or "—"
        boxes.add_row(b.name, b.source, b.last_fetch or "never", state, str(b.waiting), outcomes)
    console.print(boxes)
    queues = ", ".join(f"{q} {n if n is not None else '?'}" for q, n in st.queues.items())
    console.print(f"Queues: {queues}" + (f"  [red](broker: {st.broker_error})" if st.broker_error else ""))
    if st.lag_samples:
        console.print(f"Journal-to-written lag, last hour: p50 {st.lag_p50_seconds:.2f} s, "
                      f"p99 {st.lag_p99_seconds:.2f} s over {st.lag_samples} mail(s)")
    else:
        console.print("Journal-to-written lag, last hour: no mail processed")
    style = "red" if st.quarantine else "green"
    console.print(f"Quarantine: [{style}]{st.quarantine}[/{style}] (pipeline quarantine list)   "
                  f"Waiting for an outcome: {st.waiting}")

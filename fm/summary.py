"""A stage's summary dict as people read it: a rich table (terminal, logs) or Markdown (Prefect UI).

A summary is what a stage function returns: `stage`, `seconds`, per-modality `counts`
(`in = kept + quarantined`), `outputs`, and its other figures (loss, vocabulary size, ...).
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

HIDDEN = ("stage", "counts", "seconds", "outputs", "stats", "val_curve", "status", "note", "expert_load",
          "previous_schedule", "set_aside", "layout")


def _columns(counts: dict) -> list[str]:
    return list(dict.fromkeys(k for c in counts.values() for k in c))


def _figures(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in HIDDEN}


def rich_table(summary: dict) -> Table | None:
    counts = summary.get("counts") or {}
    if not counts:
        return None
    table = Table(title=f"{summary['stage']} ({summary.get('seconds', 0):.1f} s)", title_justify="left")
    table.add_column("modality")
    for col in _columns(counts):
        table.add_column(col, justify="right")
    for modality, c in counts.items():
        table.add_row(modality, *(f"{c.get(col, '')}" for col in _columns(counts)))
    return table


def print_summary(summary: dict, console: Console) -> None:
    """Per-modality counts as a table, then the stage's other figures on one line, then its outputs."""
    if summary.get("status") == "skipped":
        console.print(f"[bold]{summary['stage']}[/] skipped: {summary.get('note', '')}")
        return
    table = rich_table(summary)
    if table is not None:
        console.print(table)
    else:
        console.print(f"[bold]{summary['stage']}[/] ({summary.get('seconds', 0):.1f} s)")
    extras = _figures(summary)
    if extras:
        console.print("  " + "  ".join(f"{k}={v}" for k, v in extras.items()), soft_wrap=True)
    if summary.get("note"):
        console.print(f"  note: {summary['note']}", soft_wrap=True)
    for out in summary.get("outputs", []):
        console.print(f"  -> {out}", style="dim")


def as_text(summary: dict) -> str:
    """The same as print_summary, as plain text (for log lines)."""
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=110, color_system=None, force_terminal=False))
    return buf.getvalue().rstrip()


def as_markdown(summary: dict) -> str:
    """The summary as a Markdown artifact: counts table, figures, outputs."""
    name = summary["stage"]
    if summary.get("status") == "skipped":
        return f"## {name}: skipped\n\n{summary.get('note', '')}\n"
    lines = [f"## {name} ({summary.get('seconds', 0):.1f} s)", ""]
    counts = summary.get("counts") or {}
    if counts:
        cols = _columns(counts)
        lines += ["| modality | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {m} | " + " | ".join(str(c.get(col, "")) for col in cols) + " |" for m, c in counts.items()]
        lines.append("")
    figures = _figures(summary)
    if figures:
        lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures.items()] + [""]
    if summary.get("note"):
        lines += [f"Note: {summary['note']}", ""]
    if summary.get("outputs"):
        lines += ["Outputs:", ""] + [f"- `{o}`" for o in summary["outputs"]]
    return "\n".join(lines) + "\n"

"""The one table formatter: result rows (dicts) as a markdown table.

Used by the quality harness's report and the policies benchmark. A column is
``(key, title, format)``: ``format`` is a ``str.format`` pattern (``"{:.3f}"``) or a callable
of the value; a missing or None value is an empty cell, and a column no row has is left out.
"""

from __future__ import annotations

from typing import Callable, Sequence

Column = tuple[str, str, "str | Callable[[object], str]"]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """``rows`` as a markdown table of the ``columns`` that some row has a value for."""
    shown = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _key, title, _fmt in shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = []
        for key, _title, fmt in shown:
            value = row.get(key)
            cells.append(fmt(value) if callable(fmt) else "" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["Column", "markdown_table"]

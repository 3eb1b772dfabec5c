"""What the command line prints: a table of left-aligned columns (``haltless
machines list``, ``haltless agent --check``)."""
from __future__ import annotations


def print_table(rows: list, header: list[str], *, ragged_last: bool = False) -> None:
    """Print ``header`` and ``rows`` in columns two spaces apart; None prints as
    nothing. With ``ragged_last`` the last column is not padded or measured
    (a free-text message may be long)."""
    cells = [list(header)] + [["" if c is None else str(c) for c in r] for r in rows]
    measured = len(header) - 1 if ragged_last else len(header)
    widths = [max(len(r[i]) for r in cells) for i in range(measured)] + [0] * (len(header) - measured)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

"""Plain-text tables for the terminal: the one formatter every command and backend uses."""
from __future__ import annotations

from typing import Iterable, Sequence


NOT_APPLICABLE = "-"  # a cell for a figure that does not exist for its row: a numeric column stays numeric


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, footer: Sequence[object] | None = None) -> str:
    """Columns sized to their widest cell; numbers right-aligned, text left-aligned."""
    body = [[_cell(v) for v in row] for row in rows]
    foot = [_cell(v) for v in footer] if footer is not None else None
    every = [list(headers)] + body + ([foot] if foot else [])
    widths = [max(len(r[i]) for r in every) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in body if r[i] not in ("", NOT_APPLICABLE)) and bool(body)
               for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(headers), rule] + [line(r) for r in body]
    if foot:
        out += [rule, line(foot)]
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return "" if value is None else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")

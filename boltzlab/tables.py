r"""Tables of results, rendered as HTML tables in a notebook.

A chapter that reports numbers for several methods builds a :class:`Table` with
:func:`table` and shows it with ``display(...)`` (or as a cell's last expression).
JupyterLab renders its HTML as a table that fits the column (no printed lines that wrap
mid-row); plain consoles and text comparisons get an aligned text version::

    from IPython.display import display
    display(table([{"sampler": "MALA", "energy W2": 0.031}, {"sampler": "PT", "energy W2": 0.012}],
                  caption="double well, 10,000 samples"))

Numbers are formatted by ``float_format`` (or a per-column format in ``formats``);
integers get thousands separators; ``None`` is an empty cell; strings are escaped.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Table", "table"]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as its Python number; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if not _is_number(value):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return format(value, fmt)


@dataclass(frozen=True)
class Table:
    """A table of formatted cells: ``columns`` (header), ``cells`` (rows of strings),
    ``numeric`` (which columns hold any number: right-aligned) and an optional ``caption``."""

    columns: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    caption: str | None = None

    def _repr_html_(self) -> str:
        def cell(tag: str, text: str, right: bool) -> str:
            style = ' style="text-align: right"' if right else ' style="text-align: left"'
            return f"<{tag}{style}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", c, r) for c, r in zip(self.columns, self.numeric))
        body = "".join("<tr>" + "".join(cell("td", v, r) for v, r in zip(row, self.numeric)) + "</tr>"
                       for row in self.cells)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __str__(self) -> str:
        widths = [max(len(c), *(len(row[k]) for row in self.cells)) if self.cells else len(c)
                  for k, c in enumerate(self.columns)]

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w)
                             for v, w, r in zip(values, widths, self.numeric)).rstrip()

        lines = [self.caption] if self.caption else []
        lines += [line(self.columns), "  ".join("-" * w for w in widths)]
        lines += [line(row) for row in self.cells]
        return "\n".join(lines)

    __repr__ = __str__


def table(
    rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
    columns: Sequence[str] | None = None,
    caption: str | None = None,
    float_format: str = ".4g",
    formats: Mapping[str, str] | None = None,
) -> Table:
    """A :class:`Table` of ``rows``: dicts (columns default to the first row's keys, in order;
    a missing key is an empty cell) or sequences (then ``columns`` is required and every row
    must have that length). ``formats`` maps a column to a format spec for its numbers
    (default ``float_format``)."""
    rows = list(rows)
    if not rows:
        raise ValueError("table: no rows")
    formats = dict(formats or {})
    if all(isinstance(r, Mapping) for r in rows):
        columns = list(columns) if columns is not None else list(rows[0])
        values = [[_scalar(r.get(c)) for c in columns] for r in rows]  # type: ignore[union-attr]
    elif any(isinstance(r, Mapping) for r in rows):
        raise ValueError("table: rows must be all dicts or all sequences")
    else:
        if columns is None:
            raise ValueError("table: rows given as sequences need columns=[...]")
        columns = list(columns)
        values = [[_scalar(v) for v in r] for r in rows]
        bad = [k for k, r in enumerate(values) if len(r) != len(columns)]
        if bad:
            raise ValueError(f"table: row {bad[0]} has {len(values[bad[0]])} values for {len(columns)} columns")
    unknown = sorted(set(formats) - set(columns))
    if unknown:
        raise ValueError(f"table: formats for unknown columns {unknown}")
    cells = tuple(tuple(_format(v, formats.get(c, float_format)) for v, c in zip(row, columns)) for row in values)
    column_values = [[row[k] for row in values if row[k] is not None] for k in range(len(columns))]
    numeric = tuple(any(_is_number(v) for v in vs) for vs in column_values)  # notes like "n.r." align with them
    return Table(tuple(str(c) for c in columns), cells, numeric, caption)

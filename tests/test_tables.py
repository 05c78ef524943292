"""Tests of boltzlab.tables: rendered HTML tables with formatted, escaped, aligned cells."""

from __future__ import annotations

import html.parser

import numpy as np
import pytest
import torch

from boltzlab.tables import table


class _Cells(html.parser.HTMLParser):
    """Collect the text of every th/td, row by row (an independent reading of the HTML)."""

    def __init__(self):
        super().__init__()
        self.rows, self.align, self._in_cell, self.caption, self._in_caption = [], [], False, None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")
            self.align.append(dict(attrs).get("style", ""))
        elif tag == "caption":
            self._in_caption = True

    def handle_endtag(self, tag):
        self._in_cell = self._in_cell and tag not in ("td", "th")
        self._in_caption = self._in_caption and tag != "caption"

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data
        elif self._in_caption:
            self.caption = data


def parse(t):
    parser = _Cells()
    parser.feed(t._repr_html_())
    return parser


def test_table_of_dicts_renders_header_rows_and_formatted_numbers():
    rows = [{"sampler": "MALA", "energy W2": 0.0312345, "evaluations": 1200000, "note": None},
            {"sampler": "PT <8 replicas>", "energy W2": torch.tensor(0.5), "evaluations": np.int64(3), "note": "n.r."}]
    t = table(rows, caption="double well & friends")
    parsed = parse(t)
    assert parsed.caption == "double well & friends"
    assert parsed.rows == [["sampler", "energy W2", "evaluations", "note"],
                           ["MALA", "0.03123", "1,200,000", ""],
                           ["PT <8 replicas>", "0.5", "3", "n.r."]]
    assert "&lt;8 replicas&gt;" in t._repr_html_()  # escaped, not parsed as a tag
    assert parsed.align[:4] == ["text-align: left", "text-align: right", "text-align: right", "text-align: left"]


def test_table_text_version_is_aligned_for_consoles():
    t = table([["a", 1.0], ["bbbb", 22.5]], columns=["name", "value"])
    lines = str(t).splitlines()
    assert lines[0].split() == ["name", "value"]
    assert lines[2] == "a         1" and lines[3] == "bbbb   22.5"
    assert repr(t) == str(t)


def test_table_column_formats_and_missing_keys():
    t = table([{"p": 0.96712, "n": 10}, {"p": 0.5}], formats={"p": ".3f"})
    assert t.cells == (("0.967", "10"), ("0.500", ""))


def test_table_rejects_bad_rows():
    with pytest.raises(ValueError, match="no rows"):
        table([])
    with pytest.raises(ValueError, match="need columns"):
        table([[1, 2]])
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        table([[1, 2], [3]], columns=["a", "b"])
    with pytest.raises(ValueError, match="all dicts or all sequences"):
        table([{"a": 1}, [2]])
    with pytest.raises(ValueError, match="unknown columns"):
        table([{"a": 1}], formats={"b": ".2f"})


def test_benchmark_table_gives_ratios_against_the_baseline():
    from boltzlab.kernels.benchmark import BenchCase, Measurement, benchmark_table, format_table

    case = BenchCase(13, 4, 8)
    results = [Measurement("vmap_grad", 1, "ok", seconds=2.0, peak_bytes=4e9),
               Measurement("torch_eager", 1, "ok", seconds=0.5, peak_bytes=1e9),
               Measurement("torch_compiled", 1, "compile failed")]
    t = benchmark_table(case, results, "vmap_grad", peak_flops=1e12)
    rows = {row[0]: dict(zip(t.columns, row)) for row in t.cells}
    eager = next(r for name, r in rows.items() if "eager" in name)
    assert eager["speed-up"] == "4.0x" and eager["mem ratio"] == "4.0x"
    assert any(r["time/call"] == "compile failed" for r in rows.values())
    assert t.caption.startswith("LJ-13: B=4, K=8")
    assert format_table(case, results, "vmap_grad", 1e12) == str(t)

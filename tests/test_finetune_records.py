"""The saved DW-4 comparison that chapter 08 loads, and the helpers that read it."""

from __future__ import annotations

import copy
import json
import math

import pytest

from boltzlab.finetune import FinetuneInputError
from boltzlab.finetune.records import (
    curves,
    final_table,
    load_comparison,
    merge_payloads,
    records_path,
)


@pytest.fixture(scope="module")
def payload():
    return load_comparison()


def test_saved_comparison_is_complete_with_every_method_and_seed(payload):
    assert records_path().is_file() and payload["complete"] and payload["size"] == "small"
    seeds = set(payload["seeds"])
    assert len(seeds) >= 3
    for task in ("tempering", "inner_pairs"):
        methods = {r["method"] for r in payload["records"] if r["task"] == task}
        assert {"pretrained", "best_of_n", "rwr", "policy_gradient", "vidd_pretrained", "vidd_student",
                "vidd_mixture"} <= methods
        for method in methods:  # every method ran with every seed
            assert {r["seed"] for r in payload["records"] if r["task"] == task and r["method"] == method} == seeds


def test_final_table_agrees_with_the_comparison_s_own_summary(payload):
    from boltzlab.finetune.compare import summarize

    rows = {(r["task"], r["method"]): r for r in final_table(payload)}
    summary = summarize(payload["records"])
    assert len(summary) == len(rows)
    for s in summary:
        row = rows[(s["task"], s["method"])]
        for key in ("reward", "kl", "objective", "gap", "reward_sd", "kl_sd", "score_rows", "reward_evals"):
            assert row[key] == pytest.approx(s[key], rel=1e-12, abs=1e-12)
        assert row["kl_min"] <= row["kl"] <= row["kl_max"] and row["diverged"] == 0


def test_gap_is_optimum_minus_objective_in_every_final_row(payload):
    for row in final_table(payload):
        opt = payload["tasks"][row["task"]]["optimum"]["objective"]
        assert row["gap"] == pytest.approx(opt - row["objective"], abs=1e-9)


def test_merge_of_a_split_payload_gives_the_same_table(payload):
    seeds = sorted(payload["seeds"])
    parts = []
    for chunk in (seeds[:1], seeds[1:]):
        p = copy.deepcopy(payload)
        p["seeds"], p["records"] = chunk, [r for r in payload["records"] if r["seed"] in chunk]
        parts.append(p)
    merged = merge_payloads(parts)
    assert merged["seeds"] == seeds
    a, b = final_table(payload), final_table(merged)
    key = lambda r: (r["task"], r["method"])
    for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
        assert ra == pytest.approx(rb)
    with pytest.raises(FinetuneInputError, match=r"seeds \[0\] appear in two payloads"):
        merge_payloads([parts[0], parts[0]])
    other = copy.deepcopy(parts[1])
    other["kT"] = 0.5
    with pytest.raises(FinetuneInputError, match="'kT' differ"):
        merge_payloads([parts[0], other])


def test_curves_start_at_the_pretrained_sampler(payload):
    lines = curves(payload, "tempering", "vidd_student")
    assert len(lines) == len(payload["seeds"])
    rec = next(r for r in payload["records"] if r["task"] == "tempering" and r["method"] == "vidd_student"
               and r["seed"] == min(payload["seeds"]))
    kl, reward = lines[0]
    assert kl[0] == 0.0 and len(kl) == len(rec["curve"]) + 1 == len(reward)
    assert kl[1:] == [p["kl"] for p in rec["curve"]]
    rwr = next(r for r in payload["records"] if r["task"] == "tempering" and r["method"] == "rwr"
               and r["seed"] == min(payload["seeds"]))
    assert reward[0] == rwr["curve"][0]["reward"]  # the same evaluation chains as every curve
    bon_kl, _ = curves(payload, "inner_pairs", "best_of_n")[0]
    assert bon_kl == sorted(bon_kl) and bon_kl[0] > 0  # over N, no pretrained start
    with pytest.raises(FinetuneInputError, match="no records of method 'draft' on task 'inner_pairs'"):
        curves(payload, "inner_pairs", "draft")


def test_load_refuses_missing_and_interrupted_files(tmp_path, payload):
    with pytest.raises(FinetuneInputError, match="no comparison records"):
        load_comparison(tmp_path / "none.json")
    path = tmp_path / "records.json"
    path.write_text(json.dumps({**payload, "complete": False}))
    with pytest.raises(FinetuneInputError, match="interrupted"):
        load_comparison(path)
    assert not math.isnan(final_table(payload)[0]["reward"])

"""The DW-4 fine-tuning tasks and the comparison script, at smoke size: the records hold what the
chapter will be written from, and their numbers obey the identities they must."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boltzlab.finetune import InnerPairReward
from boltzlab.finetune.compare import METHODS, SIZES, run_comparison
from boltzlab.finetune.tasks import dw4_tasks, evaluate_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_compare")
    payload = run_comparison("smoke", out=out, progress=False)
    return payload, out


def test_comparison_records_every_method_on_both_tasks(smoke_payload):
    payload, out = smoke_payload
    saved = json.loads((out / "records.json").read_text())
    assert (out / "table.md").read_text().startswith("| task | method |")
    pairs = {(r["task"], r["method"]) for r in saved["records"]}
    # reward backpropagation needs a gradient: it runs on the tempering reward only
    expected = {(t, m) for t in ("tempering", "inner_pairs") for m in METHODS
                if t == "tempering" or m not in ("draft", "draft_truncated")}
    assert pairs == expected
    for rec in saved["records"]:
        final = rec["final"]
        assert rec["curve"] and all(math.isfinite(final[k]) for k in ("reward", "kl", "objective", "gap"))
        opt = saved["tasks"][rec["task"]]["optimum"]
        assert final["gap"] == pytest.approx(opt["objective"] - final["objective"])
        assert final["objective"] == pytest.approx(final["reward"] - final["kl"], abs=1e-9)  # alpha = 1
        assert final["kl"] >= 0
        if rec["method"] not in ("pretrained", "best_of_n"):
            assert rec["score_rows"] > 0 and rec["reward_evals"] > 0  # fine-tuning spent something
    for task in ("tempering", "inner_pairs"):
        pre = next(r for r in saved["records"] if r["task"] == task and r["method"] == "pretrained")
        assert pre["final"]["kl"] == 0.0  # the pretrained sampler against itself
        # the optimum of E[r] - KL is at least as good as the pretrained model (up to Monte Carlo error)
        opt = saved["tasks"][task]["optimum"]
        assert opt["objective"] > pre["final"]["objective"] - 4 * (opt["log_z_se"] + pre["final"]["objective_se"])


def test_best_of_n_kl_in_the_records_is_the_closed_form(smoke_payload):
    payload, _ = smoke_payload
    bon = next(r for r in payload["records"] if r["task"] == "tempering" and r["method"] == "best_of_n")
    for row in bon["curve"]:
        n = row["n"]
        assert row["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    discrete = next(r for r in payload["records"] if r["task"] == "inner_pairs" and r["method"] == "best_of_n")
    # ties make the discrete best-of-N closer to q_pre than the continuous formula
    assert all(0 < row["kl"] <= math.log(row["n"]) - (row["n"] - 1) / row["n"] + 1e-9 for row in discrete["curve"])


def test_task_optima_and_evaluation_are_consistent():
    tasks = dw4_tasks(sde_steps=5, n_pool=300, seed=1)
    pairs = tasks["inner_pairs"]
    assert isinstance(pairs.reward, InnerPairReward) and not pairs.differentiable
    # the IS optimum from the pool equals the exact discrete optimum of the pool's empirical law
    from boltzlab.finetune import discrete_tilted_optimum
    values, counts = torch.unique(pairs.pool_rewards, return_counts=True)
    exact = discrete_tilted_optimum(counts.double() / counts.sum(), values, pairs.alpha)
    assert pairs.optimum.kl == pytest.approx(exact["kl"], abs=1e-9)
    assert pairs.optimum.objective == pytest.approx(exact["objective"], abs=1e-9)
    ev = evaluate_model(pairs, pairs.pretrained, 50, torch.Generator().manual_seed(0))
    assert ev["kl"] == 0.0 and ev["gap"] == pytest.approx(pairs.optimum.objective - ev["reward"])


def test_benchmark_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune_compare.py"), "--size", "smoke",
                           "--tasks", "inner_pairs", "--methods", "pretrained", "vidd_mixture", "--no-progress",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout, whatever is installed
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "records.json").read_text())["records"]
    assert [r["method"] for r in records] == ["pretrained", "vidd_mixture"]
    assert records[1]["settings"]["rollin"] == "mixture"


def test_smoke_size_is_small():
    s = SIZES["smoke"]
    assert s.n_pool * s.sde_steps <= 10_000 and s.pg_iterations <= 5

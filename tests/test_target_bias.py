"""The regression-target diagnostics (boltzlab.training.target_bias), checked against exact scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from boltzlab.energies import GaussianMixture
from boltzlab.estimators import gmm_noised_score
from boltzlab.training import ablation, target_bias
from boltzlab.training.checkpoints import TrainedSampler
from boltzlab.training.idem import config_for, shipped_checkpoint


def _gmm_sampler() -> TrainedSampler:
    return TrainedSampler(torch.nn.Identity(), config_for("gmm40"), GaussianMixture(), 0, 0.0, [])


def test_virial_by_sigma_finds_the_exact_value_for_the_exact_score_and_a_near_exact_target() -> None:
    sampler = _gmm_sampler()
    gmm, schedule = sampler.energy, sampler.config.schedule

    def exact_score(x, t, g):
        return gmm_noised_score(gmm, x, schedule.std(t))

    def half_score(x, t, g):
        return 0.5 * exact_score(x, t, g)

    scores = {"exact_score": exact_score, "half_score": half_score,
              "target": target_bias.mc_target_score(sampler, 4000)}
    rows = target_bias.virial_by_sigma(sampler, scores, [5.0, 10.0], n_points=5000, seed=1)
    for row in rows:
        assert row["exact"] == -2.0  # -dim for a non-particle target
        # 5000 exact samples of p_t: the exact score's mean virial within sampling noise (standard error < 0.07)
        assert abs(row["exact_score"] + 2.0) < 0.3, row
        assert abs(row["half_score"] + 2.0) > 0.6, row  # a score half as strong fails the identity
        assert abs(row["target"] - row["exact_score"]) < 0.3, row  # K = 4000 copies in 2-D: nearly unbiased
    again = target_bias.virial_by_sigma(sampler, {"exact_score": exact_score}, [5.0, 10.0], n_points=5000, seed=1)
    assert [r["exact_score"] for r in again] == [r["exact_score"] for r in rows]  # same points for the same seed


def test_the_target_virial_command_writes_a_record_named_after_the_checkpoint(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "dw4_copy"
    shutil.copytree(shipped_checkpoint("dw4"), copy)
    monkeypatch.setattr(ablation, "RECORDS_DIR", tmp_path / "records")
    full_size = target_bias.target_virial_record  # K = 1000, 4000, 32000: too slow here
    monkeypatch.setattr(target_bias, "target_virial_record",
                        lambda sampler, sigmas, n_points: full_size(sampler, sigmas, n_points, ks=(16, 64)))
    assert ablation.main(["dw4", "--target-virial", str(copy), "--n-points", "6", "--sigmas", "0.5", "0.1"]) == 0
    record = target_bias.load_record("target_virial", "dw4_copy", tmp_path / "records")
    assert record["checkpoint"] == str(copy) and record["n_points"] == 6 and record["ks"] == [16, 64]
    assert [r["sigma"] for r in record["rows"]] == [0.1, 0.5]
    for row in record["rows"]:
        assert row["exact"] == -6.0  # DW-4: (4 - 1) particles x 2 dimensions
        assert set(row) >= {"network", "target_16", "target_64", "target_16_unclipped", "ess_16", "ess_64"}
        assert 1.0 <= row["ess_16"] <= 16.0 and 1.0 <= row["ess_64"] <= 64.0
    with pytest.raises(FileNotFoundError, match="--dsm-ceiling boltzlab/data/checkpoints/dw4_copy"):
        target_bias.load_record("dsm_ceiling", "dw4_copy", tmp_path / "records")
    with pytest.raises(ValueError, match="unknown record kind"):
        target_bias.load_record("virial", "dw4_copy", tmp_path / "records")
    with pytest.raises(SystemExit):
        ablation.main(["lj13", "--target-virial", str(copy)])
    assert "is a dw4 checkpoint, not lj13" in capsys.readouterr().err


def test_data_ceiling_regresses_onto_the_chosen_target_at_reference_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from boltzlab.training.idem import load_sampler

    with pytest.raises(TypeError, match="not one"):
        target_bias.data_ceiling(_gmm_sampler(), 1)
    sampler = load_sampler(shipped_checkpoint("dw4"))
    with pytest.raises(ValueError, match="unknown regression"):
        target_bias.data_ceiling(sampler, 1, regression="nem")
    seen = []
    real = target_bias.regression_target

    def counting(config, energy, x0, generator, compile=None):
        seen.append(x0.clone())
        return real(config, energy, x0, generator, compile)

    monkeypatch.setattr(target_bias, "regression_target", counting)
    train, _ = target_bias.reference_halves("dw4")
    record, _ = target_bias.data_ceiling(sampler, 3, n_samples=8, progress=False, compile=False,
                                         regression="mc_target")
    # three regression steps, each on a batch of the first reference half (exact samples), none from a buffer
    assert len(seen) == 3 and all(x.shape == (sampler.config.batch_size, 8) for x in seen)
    rows = {tuple(r.tolist()) for r in train}
    assert all(tuple(r.tolist()) in rows for x in seen for r in x)
    assert record["regression"] == "mc_target" and record["n_steps"] == 3 and record["config"]["n_mc"] == sampler.config.n_mc
    dsm, _ = target_bias.data_ceiling(sampler, 3, n_samples=8, progress=False, compile=False)
    assert dsm["regression"] == "dsm" and len(seen) == 3  # DSM spends no Monte Carlo targets


def test_the_lj13_records_show_a_target_that_breaks_the_virial_identity_and_a_network_that_does_not() -> None:
    """What chapter 06 says about the saved records (written by the commands in target_bias)."""
    virial = target_bias.load_record("target_virial", "lj13_phase3")
    rows = {r["sigma"]: r for r in virial["rows"]}
    assert all(r["exact"] == -36.0 for r in rows.values())
    # small noise: many copies carry weight and the target is nearly right
    assert rows[0.03]["ess_1000"] > 20 and abs(rows[0.03]["target_32000"] + 36) < 6  # 200 points: +- 2
    # sigma 0.1-0.2: the K = 1000 target pushes particles apart (virial above zero, exact -36) and the
    # network trained on it does too; 32 times the copies halve the error at most
    for s in (0.1, 0.2):
        assert rows[s]["target_1000"] > 0 and rows[s]["network"] > -5, rows[s]
        assert rows[s]["ess_1000"] < 3
        assert abs(rows[s]["target_32000"] + 36) > 0.3 * abs(rows[s]["target_1000"] + 36), rows[s]
    # without the clip the best copy's overlaps push far harder
    assert rows[0.3]["target_1000_unclipped"] > 100
    # sigma 1 and 2: it pulls them together too hard, whatever K
    for s in (1.0, 2.0):
        assert all(rows[s][f"target_{k}"] < -45 for k in (1000, 4000, 32000)) and rows[s]["network"] < -45, rows[s]
    ceiling = target_bias.load_record("dsm_ceiling", "lj13_phase3")
    assert ceiling["config"]["hidden"] == 64 and ceiling["config"]["n_layers"] == 4
    assert ceiling["metrics"]["distance_w2"] < 0.03 and ceiling["n_samples"] >= 2000
    # the same points and network regressed onto iDEM's target instead: the target alone triples distance W2
    mc = target_bias.load_record("mc_target_ceiling", "lj13_phase3")
    assert mc["regression"] == "mc_target" and ceiling["regression"] == "dsm" and mc["n_steps"] == ceiling["n_steps"]
    assert mc["metrics"]["distance_w2"] > 2.5 * ceiling["metrics"]["distance_w2"]
    assert mc["metrics"]["mean_energy"] > ceiling["metrics"]["mean_energy"] + 1  # hotter

"""Tests of boltzlab.training.idem: resumable and reproducible runs, the energy-evaluation
counter against a count of the energies actually evaluated, the noised-energy estimate
against the exact GMM-40 value, evaluation metrics on exact samples, the command line,
data-parallel training with the gloo backend on 2 CPU processes, and the bfloat16 training
option (``precision``): autocast rounds exactly the linear layers' and pair sums' inputs
(checked against the network with them rounded by hand), the loss and its gradient stay
within bfloat16 rounding of float32, and a bfloat16 run trains, resumes and keeps its
precision."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from boltzlab.energies import GaussianMixture, get_target
from boltzlab.estimators import clip_score, gmm_noised_score, mc_score
from boltzlab.reference import load_reference
from boltzlab.training import idem
from boltzlab.training.compiled import LowPrecisionForward, with_precision
from boltzlab.training.idem import (
    CheckpointError,
    TrainingConfigError,
    config_for,
    evaluate_samples,
    load_sampler,
    noised_energy_estimate,
    regression_target,
    target_loss,
    train_idem,
    train_to_completion,
)

TINY = {"hidden": 16, "n_layers": 2, "n_mc": 8, "batch_size": 16, "n_outer": 4, "inner_steps": 3, "n_refill": 32,
        "sde_steps": 10, "buffer_capacity": 64, "eval_every": 2, "n_eval": 50}


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("target", ["gmm40", "dw4"])
def test_stop_and_resume_equals_uninterrupted_run(tmp_path: Path, target: str) -> None:
    config = config_for(target, **TINY)
    full = train_idem(config, tmp_path / "full", progress=False)
    train_idem(config, tmp_path / "split", stop_after=2, progress=False)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["outer"] == 2
    resumed = train_idem(config, tmp_path / "split", resume=True, progress=False)
    assert resumed.outer == full.outer == 4
    assert torch.equal(_params(resumed.model), _params(full.model))
    assert torch.equal(_params(resumed.ema), _params(full.ema))
    assert torch.equal(resumed.buffer.data, full.buffer.data)
    assert resumed.energy_evaluations == full.energy_evaluations
    assert resumed.evaluations == full.evaluations
    # a different seed gives a different run (the comparison above can fail)
    other = train_idem(replace(config, seed=1), None, progress=False)
    assert not torch.equal(_params(other.model), _params(full.model))


def test_checkpoint_files_and_sampler(tmp_path: Path) -> None:
    config = config_for("gmm40", **TINY)
    state = train_idem(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(config.__dict__))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["energy_evaluations"] == state.energy_evaluations
    assert summary["final"]["outer"] == 4
    sampler = load_sampler(tmp_path)
    assert sampler.energy_evaluations == state.energy_evaluations
    x = sampler.sample(20, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20, 2) and torch.isfinite(x).all()
    # the sampler is the EMA network
    assert torch.equal(_params(sampler.model), _params(state.ema))


def test_energy_evaluation_counter_matches_energies_actually_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for("gmm40", **TINY)
    counted = {"points": 0}
    original = GaussianMixture._energy_and_forces

    def counting(self, x, want_forces):  # type: ignore[no-untyped-def]
        counted["points"] += x.numel() // x.shape[-1]
        return original(self, x, want_forces)

    monkeypatch.setattr(GaussianMixture, "_energy_and_forces", counting)
    monkeypatch.setattr(idem, "evaluate_samples", lambda *a, **k: {})  # evaluation is not training
    state = train_idem(config, None, progress=False)
    assert counted["points"] == state.energy_evaluations
    assert state.energy_evaluations == config.n_outer * config.inner_steps * config.batch_size * config.n_mc


def test_noised_energy_estimate_converges_to_exact_gmm_value() -> None:
    gmm = GaussianMixture()
    g = torch.Generator().manual_seed(0)
    x = gmm.sample(64, generator=g).double() + 0.5 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    sigma = torch.full((64,), 1.0, dtype=torch.float64)
    # p_t is again a mixture with variance std^2 + sigma^2; E_t = -log p_t
    exact = GaussianMixture(std=math.sqrt(gmm.std**2 + 1.0)).energy(x)
    est = noised_energy_estimate(gmm, x, sigma, 4_000, g)
    assert (est - exact).abs().max() < 0.05
    # with few copies the log of a mean is biased upwards (Jensen), on average
    few = torch.stack([noised_energy_estimate(gmm, x, sigma, 4, g) for _ in range(50)]).mean(0)
    assert float((few - exact).mean()) > 0.05


def test_evaluation_metrics_on_exact_samples() -> None:
    gmm = get_target("gmm40")
    g = torch.Generator().manual_seed(1)
    good = evaluate_samples(gmm, gmm.sample(1000, generator=g), gmm.sample(1000, generator=g), g)
    assert good["modes_covered"] == 40 and good["energy_w2"] < 0.35 and good["nonfinite_fraction"] == 0.0
    pool = gmm.sample(5000, generator=g)
    collapsed = evaluate_samples(gmm, pool[gmm.nearest_mode(pool) < 10][:1000], gmm.sample(1000, generator=g), g)
    assert collapsed["modes_covered"] <= 10 and collapsed["x_w2"] > good["x_w2"]


def test_nem_trains_an_energy_network() -> None:
    config = config_for("gmm40", method="nem", **TINY)
    state = train_idem(config, None, progress=False)
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert hasattr(state.ema, "energy")


def test_pdem_trains_at_prior_draws_without_a_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for("dw4", method="pdem", **TINY)
    seen = []
    real = idem.regression_target

    def spy(config, energy, x0, generator, compile=None):
        seen.append(x0.clone())
        return real(config, energy, x0, generator, compile)

    monkeypatch.setattr(idem, "regression_target", spy)
    state = train_idem(config, None, progress=False)
    assert len(state.buffer) == 0  # never refilled
    x0 = torch.cat(seen)
    # prior draws: centre-of-mass free, each coordinate of spread sigma_1 (projection removes 1/n of it)
    assert x0.reshape(-1, 4, 2).mean(1).abs().max() < 1e-5
    assert float(x0.std()) == pytest.approx(config.schedule.prior_std * (3 / 4) ** 0.5, rel=0.1)
    # the energy budget is the regression targets' alone: no sampler runs counted
    assert state.energy_evaluations == config.n_outer * config.inner_steps * config.batch_size * config.n_mc


def test_train_to_completion_continues_an_interrupted_run_and_keeps_its_baseline(tmp_path: Path) -> None:
    """What chapter 06 does under ``full``: a run cut off after 2 of 4 outer iterations is
    continued (not restarted) to the same weights as an uninterrupted run, its equal-budget
    baseline is written once for that run's evaluation count, and a second call trains nothing."""
    config = config_for("gmm40", **TINY)
    uninterrupted = train_idem(config, None, progress=False)
    train_idem(config, tmp_path, stop_after=2, progress=False)
    train_to_completion(config, tmp_path, progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert payload["outer"] == 4
    assert torch.equal(torch.cat([v.reshape(-1) for v in payload["ema"].values()]), _params(uninterrupted.ema))
    baseline = json.loads((tmp_path / "mcmc_baseline.json").read_text())
    assert baseline["budget"] == payload["energy_evaluations"] == uninterrupted.energy_evaluations
    assert baseline["energy_evaluations"] >= baseline["budget"]
    before = ((tmp_path / "mcmc_baseline.json").stat().st_mtime_ns, (tmp_path / "checkpoint.pt").stat().st_mtime_ns)
    train_to_completion(config, tmp_path, progress=False)
    after = ((tmp_path / "mcmc_baseline.json").stat().st_mtime_ns, (tmp_path / "checkpoint.pt").stat().st_mtime_ns)
    assert after == before
    # continued for longer (only n_outer may change): the old baseline no longer matches and is redone
    longer = replace(config, n_outer=6)
    train_to_completion(longer, tmp_path, progress=False)
    redone = json.loads((tmp_path / "mcmc_baseline.json").read_text())
    assert redone["budget"] == torch.load(tmp_path / "checkpoint.pt", weights_only=False)["energy_evaluations"]
    assert redone["budget"] == 1.5 * baseline["budget"]
    with pytest.raises(CheckpointError, match="different config"):
        train_to_completion(replace(config, lr=0.1), tmp_path, progress=False)
    # without samples.pt the baseline draws the final evaluation's samples again: the same ones
    evaluated = torch.load(tmp_path / "samples.pt")
    (tmp_path / "samples.pt").unlink()
    idem.write_baseline(tmp_path, progress=False)
    assert torch.equal(torch.load(tmp_path / "samples.pt"), evaluated)


def test_bad_configs_and_missing_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(TrainingConfigError, match="unknown target"):
        idem.IDEMConfig("lj99")
    with pytest.raises(TrainingConfigError, match="n_mc must be a positive int"):
        config_for("gmm40", n_mc=0)
    with pytest.raises(TrainingConfigError, match="unknown config fields: nonsense"):
        config_for("gmm40", nonsense=1)
    with pytest.raises(TrainingConfigError, match="EGNN needs a particle system"):
        idem.build_model(config_for("gmm40", network="egnn"), get_target("gmm40"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_sampler(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train_idem(config_for("gmm40", **TINY), tmp_path, resume=True, progress=False)
    train_idem(config_for("gmm40", **TINY), tmp_path, stop_after=1, progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train_idem(config_for("gmm40", **{**TINY, "lr": 0.1}), tmp_path, resume=True, progress=False)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def _set_args(**fields: object) -> list[str]:
    return [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]


def test_command_line_trains_and_resumes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "boltzlab", "train", "gmm40", "--out", str(tmp_path), "--no-progress",
           *_set_args(**TINY)]
    first = _run([*cmd, "--stop-after", "2"])
    assert first.returncode == 0, first.stderr
    second = _run([*cmd, "--resume"])
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["outer"] == 4
    # --auto-resume starts a run where there is none and continues one where there is
    fresh = _run([*cmd, "--auto-resume", "--stop-after", "1", "--out", str(tmp_path / "auto")])
    assert fresh.returncode == 0, fresh.stderr
    again = _run([*cmd, "--auto-resume", "--out", str(tmp_path / "auto")])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["outer"] == 4
    bad = _run([sys.executable, "-m", "boltzlab", "train", "lj99", "--out", str(tmp_path)])
    assert bad.returncode != 0 and "invalid choice: 'lj99'" in bad.stderr


def test_data_parallel_training_with_gloo_on_two_processes(tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks: DDP averages gradients, so the ranks stay identical
    (train_idem checks parameter checksums across ranks at the end and fails otherwise); the
    global sizes are the config's (each rank takes half the batch), so the energy-evaluation
    counter equals a single process's; and stop-and-resume equals the uninterrupted run,
    because the checkpoint keeps both ranks' buffers and random states."""
    fields = {**TINY, "n_outer": 2, "eval_every": 2}
    cmd = [sys.executable, "-m", "boltzlab", "train", "gmm40", "--procs", "2", "--no-progress",
           *_set_args(**fields)]
    result = _run([*cmd, "--out", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    config = config_for("gmm40", **fields)
    single = config.n_outer * config.inner_steps * config.batch_size * config.n_mc
    assert summary["energy_evaluations"] == single
    # the two-rank run differs from a single-process run with the same seed (rank 1's
    # batches entered the averaged gradients)
    alone = train_idem(config, None, progress=False)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert ddp["world_size"] == 2 and len(ddp["rank_states"]) == 2
    assert not torch.equal(ddp["rank_states"][0]["buffer"]["data"], ddp["rank_states"][1]["buffer"]["data"])
    assert not torch.equal(_params(alone.model), torch.cat([v.reshape(-1) for v in ddp["model"].values()]))
    split = [*cmd, "--out", str(tmp_path / "split")]
    assert _run([*split, "--stop-after", "1"]).returncode == 0
    resumed = _run([*split, "--auto-resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for key in ddp["model"]:
        assert torch.equal(again["model"][key], ddp["model"][key]), key
    for mine, other in zip(again["rank_states"], ddp["rank_states"]):
        assert torch.equal(mine["buffer"]["data"], other["buffer"]["data"])
    # a two-process checkpoint cannot silently continue in one process
    single_resume = _run([sys.executable, "-m", "boltzlab", "train", "gmm40", "--no-progress", "--resume",
                          "--out", str(tmp_path / "split"), *_set_args(**{**fields, "n_outer": 3})])
    assert single_resume.returncode != 0 and "--procs 2" in single_resume.stderr
    # and the mistakes every rank would make are named once, before any process starts
    odd = _run([*cmd, "--out", str(tmp_path / "odd"), "--set", "batch_size=15"])
    assert odd.returncode != 0 and "batch_size 15 must be divisible by --procs 2" in odd.stderr
    alone_dir = tmp_path / "alone"
    assert _run([sys.executable, "-m", "boltzlab", "train", "gmm40", "--no-progress", "--out", str(alone_dir),
                 *_set_args(**{**fields, "n_outer": 1})]).returncode == 0
    widened = _run([*cmd, "--out", str(alone_dir), "--auto-resume"])
    assert widened.returncode != 0 and "trained with 1 process(es); resume it with --procs 1" in widened.stderr


def test_equal_budget_mcmc_spends_the_budget_it_is_given() -> None:
    config = config_for("dw4", n_eval=50)
    result = idem.equal_budget_mcmc(config, 20_000, progress=False, max_steps=100)
    # 200 chains x 100 steps (plus the initial evaluation of every chain)
    assert result["n_chains"] == 200 and result["steps"] == 100
    assert 20_000 <= result["energy_evaluations"] <= 20_000 + 200
    assert math.isfinite(result["energy_w2"]) and 0.0 <= result["distance_tvd"] <= 1.0
    assert result["chains_run"] == 200 and result["reference_samples"] == 50
    # a capped run: 64 of the budget's 200 i.i.d. chains, each with the budget's 100 steps, measured
    # against the whole reference set; the evaluations reported are still the budget's
    capped = idem.equal_budget_mcmc(config, 20_000, progress=False, max_steps=100, max_chains=64,
                                    whole_reference=True)
    assert (capped["n_chains"], capped["chains_run"], capped["steps"]) == (200, 64, 100)
    assert 20_000 <= capped["energy_evaluations"] <= 20_000 + 200
    assert capped["reference_samples"] == 10_000
    with pytest.raises(TrainingConfigError, match="max_chains"):
        idem.equal_budget_mcmc(config, 20_000, progress=False, max_chains=0)


def test_annealed_start_frees_chains_stuck_in_the_repulsive_core() -> None:
    from boltzlab.training.mcmc_baseline import annealed_start, unequilibrated

    lj = get_target("lj13")
    reference = lj.energy(idem.evaluation_reference("lj13", 500, torch.Generator().manual_seed(0)).double())
    gen = torch.Generator().manual_seed(5)
    x0 = lj.remove_com(torch.randn(64, lj.dim, generator=gen, dtype=torch.float64))
    x0 = x0.reshape(64, 13, 3)
    x0[:, 1] = x0[:, 0] + 0.3  # a pair at distance 0.52: pair energy ~ 2 (1/0.52)^12 ~ 5e3 and more
    x0 = lj.remove_com(x0.reshape(64, -1))
    assert bool(unequilibrated(lj.energy(x0), reference).all())
    from boltzlab.mcmc import run_mcmc

    def final(x: torch.Tensor, n: int) -> torch.Tensor:
        return run_mcmc(lj, x, n, step_size=1e-3, burn_in=n // 2, thin=n - n // 2, generator=gen, progress=False,
                        keep_energy_trace=False).samples[-1]

    # with 1000 evaluations per chain, MALA alone leaves most chains stuck (84% measured) ...
    stuck = final(x0, 1000)
    warmed = annealed_start(lj, x0, 100, generator=gen)
    assert torch.isfinite(lj.energy(warmed)).all()
    # ... while 100 warm-up steps and 900 MALA steps free nearly every chain (6% left measured)
    freed = final(warmed, 900)
    assert float(unequilibrated(lj.energy(freed), reference).float().mean()) <= 0.15
    assert float(unequilibrated(lj.energy(stuck), reference).float().mean()) > 0.5
    torch.testing.assert_close(warmed.reshape(64, 13, 3).mean(1), torch.zeros(64, 3, dtype=torch.float64))
    assert bool(unequilibrated(torch.tensor([float("nan"), 0.0, 1e9]), torch.tensor([0.0, 1.0])).tolist()
                == [True, False, True])


def test_equal_budget_mcmc_reports_unequilibrated_chains_separately() -> None:
    config = config_for("lj13", n_eval=200)
    result = idem.equal_budget_mcmc(config, 200 * 2000, progress=False)
    assert result["warmup_steps"] == 200 and result["steps"] == 2000
    # measured: 11.5% of chains still uncondensed after 2000 steps (16.5% without the warm-up)
    assert 0.0 < result["unequilibrated_fraction"] < 0.2
    assert result["energy_w2_equilibrated"] < result["energy_w2"]
    # the same budget without the warm-up leaves more chains stuck
    cold = idem.equal_budget_mcmc(config, 200 * 2000, progress=False, warmup_fraction=0.0)
    assert cold["unequilibrated_fraction"] > result["unequilibrated_fraction"]
    with pytest.raises(TrainingConfigError, match="warmup_fraction"):
        idem.equal_budget_mcmc(config, 10_000, progress=False, warmup_fraction=1.0)


def test_new_config_fields_loss_weight_and_negative_time() -> None:
    dw4 = get_target("dw4")
    config = config_for("dw4", **TINY)
    gen = torch.Generator().manual_seed(0)
    x0 = idem.evaluation_reference("dw4", 16, gen)
    x_t, t, target = idem.regression_target(config, dw4, x0, gen)
    model = idem.build_model(config, dw4)
    with torch.no_grad():
        squared = (model(x_t, t) - target).pow(2).sum(-1)
        weight = config.schedule.variance(t) + config.local_scale**2
        assert float(idem.target_loss(model, config, dw4, x_t, t, target)) == pytest.approx(float((weight * squared).mean()))
        one = replace(config, loss_weight="one")
        assert float(idem.target_loss(model, one, dw4, x_t, t, target)) == pytest.approx(float(squared.mean()))
    # one negative-time step is a clipped gradient step on the energy itself: E goes down
    steps = replace(config, negative_time_steps=1, negative_time_step=1e-4, max_norm=20.0)
    x = x0.double() + 0.05 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    moved = idem.negative_time(steps, dw4, x)
    expected = dw4.remove_com(x + 1e-4 * clip_score(dw4.score(x), 20.0, n_particles=4, spatial_dim=2))
    torch.testing.assert_close(moved, expected)
    assert bool((dw4.energy(moved) <= dw4.energy(x) + 1e-12).all())
    assert idem.sampling_energy_evaluations(replace(config, negative_time_steps=10), 128) == 1280
    for bad in ({"loss_weight": "two"}, {"diffusion_scale": -0.1}, {"negative_time_steps": -1},
                {"negative_time_step": 0.0}):
        with pytest.raises(TrainingConfigError, match=next(iter(bad))):
            config_for("dw4", **bad)
    paper = config_for("lj55", "paper")
    assert (paper.loss_weight, paper.diffusion_scale, paper.negative_time_steps) == ("one", 0.5, 10)
    assert (config_for("lj13", "paper").diffusion_scale, config_for("dw4", "paper").diffusion_scale) == (0.9, 1.0)


def test_paper_preset_has_the_public_code_sizes_and_old_checkpoints_keep_euler() -> None:
    lj = config_for("lj13", "paper")
    assert (lj.hidden, lj.n_layers, lj.n_mc, lj.max_norm, lj.batch_size) == (128, 5, 1000, 20.0, 512)
    assert (lj.sigma_min, lj.sigma_max, lj.sde_steps, lj.n_refill, lj.buffer_capacity) == (0.01, 2.0, 1000, 1000, 10_000)
    lj55 = config_for("lj55", "paper", n_outer=3)
    assert (lj55.n_mc, lj55.batch_size, lj55.sigma_min, lj55.sigma_max, lj55.n_outer) == (100, 128, 0.5, 4.0, 3)
    assert config_for("dw4", "paper").sigma_min == 1e-5
    with pytest.raises(TrainingConfigError, match="preset"):
        config_for("lj13", "gpu")
    with pytest.raises(TrainingConfigError, match="sde_increment"):
        config_for("lj13", sde_increment="heun")
    # the shipped checkpoints were saved before sde_increment existed: they sample as trained
    shipped = json.loads((idem.shipped_checkpoint("gmm40") / "config.json").read_text())
    assert "sde_increment" not in shipped and idem.IDEMConfig(**shipped).sde_increment == "euler"


def test_profile_scales_the_measured_phases_to_the_config(tmp_path: Path) -> None:
    from boltzlab.training.profile import profile_training

    config = config_for("dw4", **{**TINY, "inner_steps": 6, "sde_steps": 8, "eval_every": 4})
    report = profile_training(config, regression_steps=2, sde_steps=2, compile=False)
    assert set(report.seconds) == {"target", "network", "optimizer", "refill", "evaluation"}
    assert all(v > 0 for v in report.seconds.values())
    loop = sum(v for k, v in report.seconds.items() if k != "evaluation")
    assert report.regression_steps_per_s == pytest.approx(6 / loop)
    assert report.refill_samples_per_s == pytest.approx(config.n_refill / report.seconds["refill"])
    assert report.seconds["evaluation"] == pytest.approx(report.seconds_per_evaluation / 4)
    assert "| target |" in report.table() and not report.compiled
    # the baseline swaps in the materialised targets of before the fused pass, nothing else
    base = profile_training(config, regression_steps=2, sde_steps=2, compile=True, baseline=True)
    assert not base.compiled and base.seconds["target"] > 0
    out = _run([sys.executable, "-m", "boltzlab", "train", "dw4", "--profile", "--profile-steps", "2",
                "--no-compile", "--no-progress", *_set_args(**TINY)])
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["profile"] == "dw4" and summary["regression_steps_per_s"] > 0


def test_compiled_network_matches_eager_and_falls_back_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from boltzlab.models import EGNN
    from boltzlab.training.compiled import CompiledForward, compile_wanted

    torch.manual_seed(0)
    net = EGNN(4, 2, hidden=16, n_layers=2)
    x, t = torch.randn(8, 8), torch.rand(8)
    eager_out = net(x, t)
    eager_grad = torch.autograd.grad(eager_out.pow(2).sum(), list(net.parameters()))
    compiled = CompiledForward(net)
    out = compiled(x, t)
    grad = torch.autograd.grad(out.pow(2).sum(), list(net.parameters()))
    assert not compiled.failed, "torch.compile failed, so nothing compiled was tested"
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad, eager_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # parameters changed in place (as the EMA does) are seen
        for p in net.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-5, atol=1e-6)

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    fallback = CompiledForward(net)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for EGNN .*no C\\+\\+ compiler.*eager"):
        result = fallback(x, t)
    assert fallback.failed and torch.equal(result, net(x, t))
    monkeypatch.setenv("BOLTZLAB_COMPILE", "0")
    assert not compile_wanted(None, 10**6) and compile_wanted(True, 1)
    monkeypatch.setenv("BOLTZLAB_COMPILE", "auto")
    assert compile_wanted(None, 1000) and not compile_wanted(None, 999)


def test_final_evaluation_ships_n_fresh_samples_reproducibly(tmp_path: Path) -> None:
    config = config_for("dw4", **TINY)
    train_idem(config, tmp_path, progress=False)
    first = idem.final_evaluation(tmp_path, 40, progress=False)
    samples = torch.load(tmp_path / "samples.pt")
    assert samples.shape == (40, 8) and first["n_samples"] == 40.0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["final"] == first and summary["evaluations"][-1] == first
    # the metrics are those of the saved samples against the whole reference set
    reference = load_reference("dw4")
    assert first["reference_samples"] == reference.shape[0] == 10_000
    recomputed = evaluate_samples(get_target("dw4"), samples.double(), reference)
    for metric in ("energy_w2", "distance_w2", "distance_tvd"):
        assert recomputed[metric] == pytest.approx(first[metric], rel=1e-4), metric
    # again: the same samples, and the evaluation replaces (not duplicates) its own entry
    again = idem.final_evaluation(tmp_path, 40, progress=False)
    torch.testing.assert_close(torch.load(tmp_path / "samples.pt"), samples)
    assert again == first
    assert sum("n_samples" in e for e in json.loads((tmp_path / "metrics.json").read_text())["evaluations"]) == 1
    # through torch.compile: the same samples to float32 rounding (same noise, same network)
    idem.final_evaluation(tmp_path, 40, progress=False, compile=True)
    torch.testing.assert_close(torch.load(tmp_path / "samples.pt"), samples, rtol=1e-4, atol=1e-4)
    idem.final_evaluation(tmp_path, 40, progress=False)
    # the run still resumes, keeping the evaluation in its history
    state = train_idem(replace(config, n_outer=config.n_outer + 1), tmp_path, resume=True, progress=False)
    assert any("n_samples" in e for e in state.evaluations)
    with pytest.raises(TrainingConfigError, match="at least 2"):
        idem.final_evaluation(tmp_path, 1, progress=False)


def test_set_overrides_parse_json_values_and_name_bad_ones() -> None:
    from boltzlab.training.idem_config import IDEMConfig
    from boltzlab.validation import parse_field_override

    known = IDEMConfig.__dataclass_fields__
    assert parse_field_override("n_mc=1000", TrainingConfigError, known) == ("n_mc", 1000)
    assert parse_field_override("max_norm=20.5", TrainingConfigError, known) == ("max_norm", 20.5)
    assert parse_field_override("estimator=lse", TrainingConfigError, known) == ("estimator", "lse")
    assert parse_field_override("anything=[1, 2]") == ("anything", [1, 2])  # no field list: any name
    with pytest.raises(TrainingConfigError, match="--set expects FIELD=VALUE, got 'n_mc'"):
        parse_field_override("n_mc", TrainingConfigError, known)
    with pytest.raises(TrainingConfigError, match="unknown config field 'nonsense'"):
        parse_field_override("nonsense=1", TrainingConfigError, known)


def test_clip_sigma_loosens_the_clip_at_small_noise_where_the_target_is_the_force() -> None:
    lj13 = get_target("lj13")
    config = config_for("lj13", **TINY)
    assert config.max_norm == 20.0 and config.clip_sigma == 0.0
    sigma = torch.tensor([0.005, 0.05, 0.1, 1.0])
    assert idem.target_clip(config, sigma) == 20.0  # the public code's fixed clip
    loose = replace(config, clip_sigma=0.1)
    torch.testing.assert_close(idem.target_clip(loose, sigma), torch.tensor([400.0, 40.0, 20.0, 20.0]))
    # at small noise the Monte Carlo score is the force -grad E / kT; in equilibrium LJ-13 many
    # particles feel more than 20, so the fixed clip changes the target and the loose one does not
    x = idem.evaluation_reference("lj13", 32, torch.Generator().manual_seed(3)).double()
    force = lj13.score(x)
    small = torch.full((32,), 0.002, dtype=torch.float64)
    estimate = mc_score(lj13, x, small, 256, generator=torch.Generator().manual_seed(4))
    assert (force.reshape(32, 13, 3).norm(dim=-1) > 20).float().mean() > 0.1
    fixed = clip_score(estimate, idem.target_clip(config, small), n_particles=13, spatial_dim=3)
    loosened = clip_score(estimate, idem.target_clip(loose, small), n_particles=13, spatial_dim=3)
    error_fixed = (fixed - force).norm() / force.norm()
    error_loose = (loosened - force).norm() / force.norm()
    assert error_loose < 0.05 < error_fixed
    with pytest.raises(TrainingConfigError, match="clip_sigma"):
        config_for("lj13", clip_sigma=-1.0)
    with pytest.raises(TrainingConfigError, match="needs max_norm"):
        config_for("dw4", clip_sigma=0.1, max_norm=None)
    # a separate clip from sigma_high up, alone or on top of clip_sigma
    high = replace(config, max_norm_high=40.0, sigma_high=0.1)
    torch.testing.assert_close(idem.target_clip(high, sigma), torch.tensor([20.0, 20.0, 40.0, 40.0]))
    both = replace(loose, max_norm_high=40.0, sigma_high=0.5)
    torch.testing.assert_close(idem.target_clip(both, sigma), torch.tensor([400.0, 40.0, 20.0, 40.0]))
    with pytest.raises(TrainingConfigError, match="max_norm_high replaces max_norm"):
        config_for("dw4", max_norm=None, max_norm_high=40.0)
    with pytest.raises(TrainingConfigError, match="max_norm_high must be positive"):
        config_for("lj13", max_norm_high=0.0)
    with pytest.raises(TrainingConfigError, match="sigma_high must be positive"):
        config_for("lj13", sigma_high=float("nan"))


def test_warm_start_continues_exactly_and_records_the_earlier_phase(tmp_path: Path) -> None:
    config = config_for("dw4", **TINY)
    full = train_idem(config, tmp_path / "full", progress=False)
    train_idem(config, tmp_path / "first", stop_after=2, progress=False)
    # a warm start under the same config is a resume under another name: the same run exactly
    same = train_idem(config, tmp_path / "second", init_from=tmp_path / "first", progress=False)
    assert same.outer == 4 and same.energy_evaluations == full.energy_evaluations
    assert torch.equal(_params(same.model), _params(full.model))
    assert torch.equal(same.buffer.data, full.buffer.data)
    assert same.evaluations == full.evaluations
    # a second phase with a changed target: counters and records carry over, the config is kept
    changed = replace(config, max_norm=20.0, clip_sigma=0.5, n_mc=4, lr=2e-3, n_outer=5)
    state = train_idem(changed, tmp_path / "phase2", init_from=tmp_path / "first", progress=False)
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert state.outer == 5
    assert state.energy_evaluations == first["energy_evaluations"] + 3 * (
        changed.inner_steps * changed.batch_size * changed.n_mc + idem.sampling_energy_evaluations(changed, changed.n_refill))
    assert state.optimizer.param_groups[0]["lr"] == 2e-3
    summary = json.loads((tmp_path / "phase2" / "metrics.json").read_text())
    assert summary["phases"] == [{"config": json.loads(json.dumps(config.__dict__)), "until_outer": 2,
                                  "from": str(tmp_path / "first")}]
    assert [e["outer"] for e in summary["evaluations"]] == [2.0, 4.0, 5.0]
    resumed = train_idem(replace(changed, n_outer=6), tmp_path / "phase2", resume=True, progress=False)
    assert resumed.outer == 6 and len(resumed.phases) == 1
    # a warm start that trains no further writes the first run under the new config (another sampler)
    resampled = train_idem(replace(config, sde_steps=7), tmp_path / "sampler", init_from=tmp_path / "first",
                           stop_after=0, progress=False)
    saved = torch.load(tmp_path / "sampler" / "checkpoint.pt", weights_only=False)
    first_saved = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=False)
    assert resampled.outer == saved["outer"] == 2 and saved["config"]["sde_steps"] == 7
    assert all(torch.equal(saved["ema"][k], first_saved["ema"][k]) for k in first_saved["ema"])
    assert saved["energy_evaluations"] == first_saved["energy_evaluations"] and len(saved["phases"]) == 1
    assert load_sampler(tmp_path / "sampler").config.sde_steps == 7
    with pytest.raises(CheckpointError, match="hidden"):
        train_idem(replace(config, hidden=32), tmp_path / "bad", init_from=tmp_path / "first", progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_idem(config, tmp_path / "bad", init_from=tmp_path / "missing", progress=False)


def test_train_shipped_runs_the_phases_in_turn_and_picks_up_after_an_interruption(tmp_path: Path) -> None:
    from boltzlab.training.mcmc_baseline import train_shipped

    tiny = {**TINY, "eval_every": 100}
    # the second phase runs past the recipe's planned n_outer = 4, as DW-4's shipped one does
    phases = [(tiny, 2), ({**tiny, "clip_sigma": 0.5}, 5), ({**tiny, "clip_sigma": 0.5, "sde_steps": 7}, 5)]
    # an interrupted first phase: one outer iteration done
    train_idem(config_for("dw4", **tiny), tmp_path / "run" / "phase1", stop_after=1, progress=False)
    out = train_shipped("dw4", tmp_path / "run", baseline=False, progress=False, phases=phases)
    first = torch.load(out / "phase1" / "checkpoint.pt", weights_only=False)
    second = torch.load(out / "phase2" / "checkpoint.pt", weights_only=False)
    last = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (first["outer"], second["outer"], last["outer"]) == (2, 5, 5)
    assert second["config"]["clip_sigma"] == 0.5 and last["config"]["sde_steps"] == 7
    assert [p["until_outer"] for p in last["phases"]] == [2, 5]
    assert all(torch.equal(last["ema"][k], second["ema"][k]) for k in second["ema"])
    # the same phases uninterrupted give the same weights
    again = train_shipped("dw4", tmp_path / "again", baseline=False, progress=False, phases=phases)
    other = torch.load(again / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(last["ema"][k], other["ema"][k]) for k in other["ema"])
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    train_shipped("dw4", tmp_path / "run", baseline=False, progress=False, phases=phases)
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime  # finished phases are not retrained
    assert idem.SHIPPED_PHASES["lj13"][0] == ({}, 159)


def test_blend_scale_moves_the_switch_of_the_blended_target_and_nothing_else() -> None:
    dw4 = get_target("dw4")
    config = config_for("dw4", **TINY)
    assert config.estimator == "blended" and config.blend_scale is None
    x0 = idem.evaluation_reference("dw4", 16, torch.Generator().manual_seed(5))

    def target_of(cfg):
        return idem.regression_target(cfg, dw4, x0, torch.Generator().manual_seed(6))

    x_t, t, default = target_of(config)
    _, _, same = target_of(replace(config, blend_scale=config.local_scale))
    x_t2, t2, moved = target_of(replace(config, blend_scale=1.0))
    torch.testing.assert_close(same, default)
    assert torch.equal(x_t2, x_t) and torch.equal(t2, t)  # same points and times: only the target changes
    sigma = config.schedule.std(t)
    g = torch.Generator().manual_seed(6)
    idem.sample_times(16, generator=g, t_min=config.t_min, dtype=x0.dtype)  # replay the draws before the target
    idem.perturb(x0, t, config.schedule, project=dw4.remove_com, generator=g)
    expected = mc_score(dw4, x_t, sigma, config.n_mc, generator=g, max_norm=config.max_norm, estimator="blended",
                        local_scale=1.0)
    torch.testing.assert_close(moved, expected)
    assert not torch.allclose(moved, default)
    with pytest.raises(TrainingConfigError, match="blend_scale"):
        config_for("dw4", blend_scale=0.0)


def test_sampler_passes_large_batches_to_the_network_in_chunks_with_the_same_samples(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # an EGNN on thousands of samples at once runs out of cache; sampling in chunks must give
    # the samples that one call would, chunk boundaries anywhere
    from boltzlab.training import sampler as sampler_module

    dw4 = get_target("dw4")
    config = config_for("dw4", **TINY)
    model = idem.build_model(config, dw4)
    batches: list[int] = []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return model(x, t)

    with torch.no_grad():
        whole = idem.sample_model(model, config, dw4, 45, torch.Generator().manual_seed(3), forward=counting)
        assert set(batches) == {45}
        monkeypatch.setattr(sampler_module, "SCORE_CHUNK_PAIRS", 16 * 12)  # DW-4: 12 ordered pairs
        batches.clear()
        chunked = idem.sample_model(model, config, dw4, 45, torch.Generator().manual_seed(3), forward=counting)
    assert set(batches) == {16, 13} and len(batches) == 3 * config.sde_steps
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    assert sampler_module.score_chunk(get_target("gmm40")) == sampler_module.SCORE_CHUNK
    monkeypatch.undo()
    assert sampler_module.score_chunk(get_target("lj55")) == 65_536 // (55 * 54) == 22


def test_profile_baseline_egnn_layer_is_the_same_function_over_all_n_by_n_pairs() -> None:
    # --profile-baseline times the EGNN as it was at cf35560 (all n x n pairs, diagonal masked):
    # a faithful baseline must compute what today's layer computes, shared features or not
    from boltzlab.models import EGNNLayer
    from boltzlab.training.profile import baseline_egnn_layer_forward

    gen = torch.Generator().manual_seed(0)
    for update in (True, False):
        layer = EGNNLayer(8, update_features=update).double()
        x = torch.randn(3, 5, 3, generator=gen, dtype=torch.float64)
        for h in (torch.randn(3, 5, 8, generator=gen, dtype=torch.float64),
                  torch.randn(3, 1, 8, generator=gen, dtype=torch.float64).expand(3, 5, 8)):
            shared = bool((h == h[:, :1]).all())
            now = layer(h, x, features_shared=shared)
            before = baseline_egnn_layer_forward(layer, h, x)
            for a, b in zip(now, before):
                torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


# ---- bfloat16 training (IDEMConfig.precision) ----


def _lj13_network() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    config = config_for("lj13", hidden=32, n_layers=3)
    torch.manual_seed(0)
    model = idem.build_model(config, get_target("lj13"))
    x = 0.7 * torch.randn(24, 39)
    t = torch.rand(24)
    return model, x, t


_LINEAR, _EINSUM = F.linear, torch.einsum


def _bf16_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    b = None if bias is None else bias.bfloat16()
    return _LINEAR(input.bfloat16(), weight.bfloat16(), b)


def _bf16_einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    return _EINSUM(equation, *(op.bfloat16() for op in operands))


def test_bfloat16_forward_equals_linear_layers_cast_by_hand() -> None:
    model, x, t = _lj13_network()
    with torch.no_grad():
        out = LowPrecisionForward(model)(x, t)
        # the independent version: every linear layer's (and the pair sums') inputs rounded to
        # bfloat16 by hand, everything else (coordinates, distances, scalings) untouched
        with mock.patch.object(F, "linear", _bf16_linear), mock.patch.object(torch, "einsum", _bf16_einsum):
            by_hand = model(x, t).float()
        exact = model(x, t)
    assert out.dtype == torch.float32
    assert torch.equal(out, by_hand)
    relative = (out - exact).norm() / exact.norm()
    # rounded (bfloat16 keeps 8 bits: 2^-8 = 0.004 per product), but only to that order
    assert 1e-4 < float(relative) < 3e-2


def test_bfloat16_loss_and_gradient_within_rounding_of_float32() -> None:
    config = config_for("lj13", hidden=32, n_layers=3, n_mc=64, batch_size=32)
    energy = get_target("lj13")
    torch.manual_seed(0)
    model = idem.build_model(config, energy)
    x0 = 0.7 * torch.randn(32, 39)
    x_t, t, target = regression_target(config, energy, x0, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    loss32 = target_loss(model, config, energy, x_t, t, target)
    grad32 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss32, params)])
    loss16 = target_loss(with_precision(model, "bfloat16"), config, energy, x_t, t, target)
    grad16 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss16, params)])
    assert loss16.dtype == torch.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    cosine = torch.dot(grad16, grad32) / (grad16.norm() * grad32.norm())
    assert float(cosine) > 0.999
    assert with_precision(model, "float32") is model


def test_bfloat16_run_trains_resumes_and_keeps_its_precision(tmp_path: Path) -> None:
    config = config_for("dw4", network="egnn", precision="bfloat16", **TINY)
    full = train_idem(config, tmp_path / "full", progress=False)
    assert full.outer == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in full.history)
    assert (tmp_path / "full" / "config.json").read_text().count('"precision": "bfloat16"') == 1
    train_idem(config, tmp_path / "split", stop_after=2, progress=False)
    resumed = train_idem(config, tmp_path / "split", resume=True, progress=False)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    # the evaluations sample in float32, so their metrics are those of the float32 sampler
    assert resumed.evaluations == full.evaluations
    with pytest.raises(CheckpointError, match="precision"):
        train_idem(config_for("dw4", network="egnn", **TINY), tmp_path / "split", resume=True, progress=False)


def test_precision_settings_are_checked() -> None:
    with pytest.raises(TrainingConfigError, match="unknown precision 'float16'"):
        config_for("dw4", precision="float16")
    with pytest.raises(TrainingConfigError, match="NEM"):
        config_for("gmm40", method="nem", precision="bfloat16")
    with pytest.raises(ValueError, match="unknown precision"):
        with_precision(torch.nn.Identity(), "half")


def test_refill_diffusion_scale_moves_only_the_refills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, float]] = []
    real = idem.sample_model

    def recording(model, config, energy, n, *args, **kwargs):
        calls.append((n, config.diffusion_scale))
        return real(model, config, energy, n, *args, **kwargs)

    monkeypatch.setattr(idem, "sample_model", recording)
    config = config_for("dw4", **TINY, diffusion_scale=0.9, refill_diffusion_scale=1.3)
    train_idem(config, tmp_path / "run", stop_after=2, progress=False)
    refills = [scale for n, scale in calls if n == TINY["n_refill"]]
    evaluations = [scale for n, scale in calls if n == TINY["n_eval"]]
    # the seed fill and one refill per outer iteration at 1.3; the evaluation at outer 2 at 0.9
    assert refills == [1.3, 1.3, 1.3] and evaluations == [0.9]
    assert idem.refill_sampler_config(replace(config, refill_diffusion_scale=None)).diffusion_scale == 0.9
    for bad in (-0.5, float("nan"), True):
        with pytest.raises(TrainingConfigError, match="refill_diffusion_scale must be finite and >= 0"):
            config_for("dw4", refill_diffusion_scale=bad)


def test_evaluation_tail_metrics_on_exact_samples_and_on_samples_without_the_tail() -> None:
    from boltzlab import metrics
    from boltzlab.reference import load_reference

    lj = get_target("lj13")
    reference = load_reference("lj13").double()
    a, b = reference[:5000], reference[5000:]
    exact = evaluate_samples(lj, a, b, torch.Generator().manual_seed(0))
    # exact samples: 10% beyond the other half's r90, up to binomial noise (sd 0.004 at n = 5000)
    assert abs(exact["beyond_r90"] - 0.1) < 0.015
    assert exact["distance_w2_tail"] <= exact["distance_w2"]
    # the same samples with the configurations of the largest 20% of radii removed: no tail
    radius = metrics.cluster_radius(a, 13, 3)
    cut = evaluate_samples(lj, a[radius < torch.quantile(radius, 0.8)], b, torch.Generator().manual_seed(0))
    assert cut["beyond_r90"] == 0.0
    assert cut["distance_w2_tail"] > 3 * exact["distance_w2_tail"]
    assert cut["distance_w2_tail"] ** 2 > 0.3 * cut["distance_w2"] ** 2  # most of the damage is in the tail


def test_virial_penalty_is_the_binned_squared_virial_error_and_moves_the_score() -> None:
    from boltzlab import metrics
    from boltzlab.training.idem import virial_penalty

    energy = get_target("lj13")
    gen = torch.Generator().manual_seed(0)
    x_t = energy.remove_com(torch.randn(4, 39, generator=gen))
    centred = (x_t.view(4, 13, 3) - x_t.view(4, 13, 3).mean(1, keepdim=True)).reshape(4, 39)
    a = torch.tensor([-1.0, -3.0, 0.5, -2.0], requires_grad=True)
    score = a[:, None] * centred  # virial a_b |x_b - c_b|^2
    t = torch.tensor([0.1, 0.2, 0.7, 0.9])
    v = metrics.score_virial(x_t, score.detach(), 13, 3)
    expected = 0.5 * ((v[:2].mean() + 36) / 36) ** 2 + 0.5 * ((v[2:].mean() + 36) / 36) ** 2
    penalty = virial_penalty(energy, x_t, t, score, n_bins=2)
    assert torch.allclose(penalty.double(), expected, rtol=1e-5)
    penalty.backward()
    assert a.grad is not None and bool((a.grad != 0).all())
    # one point per bin, empty bins skipped; a score with the exact mean virial costs nothing
    exact = -36.0 / (centred ** 2).sum(1)
    assert float(virial_penalty(energy, x_t, t, exact[:, None] * centred, n_bins=8)) < 1e-10
    with pytest.raises(TrainingConfigError, match="particle system"):
        virial_penalty(get_target("gmm40"), torch.zeros(2, 2), torch.tensor([0.1, 0.5]), torch.zeros(2, 2), 2)
    with pytest.raises(TrainingConfigError, match="virial_weight must be finite"):
        config_for("lj13", virial_weight=-1.0)
    with pytest.raises(TrainingConfigError, match="method='idem'"):
        config_for("lj13", method="pdem", virial_weight=1.0)


def test_a_run_with_the_virial_penalty_trains_and_resumes_to_the_same_state(tmp_path: Path) -> None:
    config = config_for("dw4", **{**TINY, "virial_weight": 100.0, "n_outer": 2})
    full = train_idem(config, tmp_path / "full", progress=False)
    train_idem(config, tmp_path / "split", stop_after=1, progress=False)
    resumed = train_idem(config, tmp_path / "split", resume=True, progress=False)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    plain = train_idem(replace(config, virial_weight=0.0), None, progress=False)
    assert any(not torch.equal(p, q) for p, q in zip(full.model.parameters(), plain.model.parameters()))


def test_buffer_mala_steps_move_the_buffer_and_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With buffer_mala_steps every refill is followed by MALA on the whole buffer: each state
    is moved (mala_refine is called on exactly the stored states) and the energy evaluations
    grow by len(buffer) * steps per outer iteration over plain iDEM's count."""
    config = config_for("dw4", **{**TINY, "n_outer": 2, "eval_every": 10})
    calls: list[tuple[int, int]] = []
    real = idem.mala_refine

    def spy(energy, x, n_steps, generator=None, step_size=1e-3):  # type: ignore[no-untyped-def]
        calls.append((x.shape[0], n_steps))
        return real(energy, x, n_steps, generator, step_size)

    monkeypatch.setattr(idem, "mala_refine", spy)
    plain = train_idem(config, None, progress=False)
    moved = train_idem(replace(config, buffer_mala_steps=3), None, progress=False)
    assert calls == [(64, 3), (64, 3)]  # the first refill (32) plus one (32) fill the 64 slots
    assert moved.energy_evaluations - plain.energy_evaluations == 2 * 64 * 3
    assert not torch.equal(moved.buffer.data, plain.buffer.data)
    for bad in (-1, 1.5, True):
        with pytest.raises(TrainingConfigError, match="buffer_mala_steps"):
            config_for("dw4", buffer_mala_steps=bad)


def test_model_informed_proposal_serves_only_low_noise_targets_and_keeps_their_limit() -> None:
    """With proposal_sigma, targets at sigma_t <= proposal_sigma draw their copies around
    x_t + sigma_t^2 s(x_t, t): the estimate there still converges to the exact noised GMM-40
    score (K = 4000, the exact score as proposal), the other points keep the plain target, the
    clip applies to both, and a bad proposal_sigma is named."""
    gmm = get_target("gmm40")
    assert isinstance(gmm, GaussianMixture)
    config = config_for("gmm40", n_mc=4000, max_norm=None, proposal_sigma=5.0)
    seen: list[int] = []

    class ExactScore(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return gmm_noised_score(gmm, x.double(), config.schedule.std(t).double()).float()

    gen = torch.Generator().manual_seed(2)
    x0 = gmm.sample(256, gen).float()
    x_t, t, target = idem.regression_target(config, gmm, x0, gen, proposal=ExactScore())
    sigma = config.schedule.std(t)
    low = sigma <= 5.0
    assert 0 < int(low.sum()) < 256 and seen == [256]  # one call on the whole batch
    exact = gmm_noised_score(gmm, x_t.double(), sigma.double()).float()
    error = (target - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-2)
    assert float(error[low].median()) < 0.02 and float(error[~low].median()) < 0.15  # plain copies, large sigma
    # the same points without a proposal: the plain estimate is worse where the shift applies
    _, _, plain = idem.regression_target(config, gmm, x0, torch.Generator().manual_seed(2))
    plain_error = (plain - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-2)
    assert float(error[low].mean()) < float(plain_error[low].mean())
    clipped = replace(config, max_norm=0.01)
    _, _, target2 = idem.regression_target(clipped, gmm, x0, torch.Generator().manual_seed(2), proposal=ExactScore())
    assert float(target2.norm(dim=1).max()) <= 0.01 * (1 + 1e-5)
    with pytest.raises(TrainingConfigError, match="proposal_sigma"):
        config_for("gmm40", proposal_sigma=-1.0)

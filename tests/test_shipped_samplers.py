"""The shipped iDEM checkpoints against chapter 06's targets (boltzlab.training.published).

Each target is checked three ways, independently of the numbers the training run wrote: the
metrics recomputed from the checkpoint's ``samples.pt`` (at least 2000 samples of the plain
sampler) against the project's reference set; ``metrics.json`` against that recomputation (the
file must say what the samples show); and a few fresh samples of the checkpoint itself
(smoke size), which must look like ``samples.pt`` (so the file was drawn from this model).
The LJ-13 samples are also compared with the external reference set when it is present.

Targets a shipped checkpoint does not meet yet are strict xfails carrying the measured gap
(issue 18): they fail loudly once the target is met, so the marker must then be removed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzlab import metrics
from boltzlab.energies import get_target
from boltzlab.training.idem import evaluate_samples, load_sampler, shipped_checkpoint
from boltzlab.training.published import (
    PUBLISHED,
    SAMPLER_TARGETS,
    TARGET_SAMPLES,
    published_for,
    target_verdicts,
)
from boltzlab.reference import load_reference

EXTERNAL = Path(__file__).resolve().parents[2] / "shared" / "reference"

# (target, metric) -> why it is not met yet; the test that checks it is a strict xfail
NOT_MET: dict[tuple[str, str], str] = {}


def _samples(target: str) -> torch.Tensor:
    return torch.load(shipped_checkpoint(target) / "samples.pt", map_location="cpu").double()


@functools.lru_cache(maxsize=None)
def _recomputed(target: str) -> dict[str, float]:
    x = _samples(target)
    # the whole reference set, as the final evaluation uses (a 2000-draw is itself a noisy yardstick)
    reference = load_reference(target)
    return evaluate_samples(get_target(target), x, reference, torch.Generator().manual_seed(12))


# fresh samples drawn per checkpoint: LJ-55's EGNN costs seconds per sample on a CPU
FRESH_SAMPLES = {"dw4": 128, "lj13": 128, "lj55": 16}

CASES = [(t, m) for t, goals in SAMPLER_TARGETS.items() for m in goals]


@pytest.mark.parametrize(("target", "metric"), [
    pytest.param(t, m, marks=pytest.mark.xfail(reason=NOT_MET[(t, m)], strict=True)) if (t, m) in NOT_MET
    else (t, m) for t, m in CASES])
def test_shipped_checkpoint_meets_its_target(target: str, metric: str) -> None:
    x = _samples(target)
    assert x.shape[0] >= TARGET_SAMPLES, f"{target}: samples.pt holds {x.shape[0]} samples, need {TARGET_SAMPLES}"
    verdict = {m: (v, bound, met) for m, v, bound, met in target_verdicts(target, _recomputed(target))}
    value, bound, met = verdict[metric]
    assert met, f"{target}: {metric} = {value:.4g} recomputed from samples.pt, target <= {bound:g}"


@pytest.mark.parametrize("target", list(SAMPLER_TARGETS))
def test_metrics_file_says_what_the_samples_show(target: str) -> None:
    final = json.loads((shipped_checkpoint(target) / "metrics.json").read_text())["final"]
    x = _samples(target)
    # the recorded metrics were computed on these samples against the whole reference set, so
    # recomputing them here must give the same numbers
    assert final["n_samples"] == x.shape[0] and final["reference_samples"] == load_reference(target).shape[0]
    recomputed = _recomputed(target)
    for metric in SAMPLER_TARGETS[target]:
        assert recomputed[metric] == pytest.approx(final[metric], rel=1e-4), (target, metric)
    assert final["mean_energy"] == pytest.approx(float(get_target(target).energy(x).mean()), rel=1e-3, abs=1e-2)


@pytest.mark.parametrize("target", list(SAMPLER_TARGETS))
def test_fresh_samples_of_the_checkpoint_look_like_its_samples_file(target: str) -> None:
    sampler = load_sampler(shipped_checkpoint(target))
    n_fresh = FRESH_SAMPLES[target]
    with torch.no_grad():
        fresh = sampler.sample(n_fresh, torch.Generator().manual_seed(3)).double()
    shipped = _samples(target)
    energy = get_target(target)
    n, d = energy.n_particles, energy.spatial_dim
    # the pooled distance histograms of the fresh samples and of the file agree to sampling noise,
    # measured here as the TVD between as many reference samples and a file-sized reference draw
    reference = load_reference(target, n=n_fresh + shipped.shape[0], generator=torch.Generator().manual_seed(6))
    floor = metrics.distance_tvd(reference[:n_fresh].double(), reference[n_fresh:].double(), n, d)
    assert metrics.distance_tvd(fresh, shipped, n, d) < 1.5 * floor + 0.05
    e_fresh, e_file = energy.energy(fresh), energy.energy(shipped)
    assert torch.isfinite(e_fresh).float().mean() > 0.9
    lo, hi = torch.quantile(e_file[torch.isfinite(e_file)], torch.tensor([0.05, 0.95], dtype=torch.float64))
    inside = ((e_fresh >= lo) & (e_fresh <= hi)).double().mean()
    assert 0.6 < float(inside) <= 1.0, f"{target}: {float(inside):.2f} of fresh energies in the file's 5-95% band"


@pytest.mark.skipif(not (EXTERNAL / "test_split_LJ13-1000.npy").is_file(), reason="../shared/reference absent")
def test_lj13_checkpoint_against_the_external_reference_set() -> None:
    external = torch.from_numpy(np.load(EXTERNAL / "test_split_LJ13-1000.npy")).double()
    ours = _samples("lj13")
    own = load_reference("lj13", n=2000, generator=torch.Generator().manual_seed(4)).double()
    lj = get_target("lj13")
    # the project's reference and the external set agree to 0.012 in distance W2 (measured; two
    # halves of the external set: 0.008), so the yardstick is sound to about 0.01 ...
    assert metrics.distance_w2(own, external[:2000], 13, 3) < 0.02
    # ... and the sampler is measured against both; the two distances differ by the yardstick only
    to_external = metrics.distance_w2(ours, external[:2000], 13, 3)
    to_own = metrics.distance_w2(ours, own, 13, 3)
    assert abs(to_external - to_own) < 0.015 + 0.1 * to_own
    assert metrics.energy_w2(lj.energy(own), lj.energy(external[:2000])) < 1.0


def test_published_numbers_have_sources_and_targets_are_checked_whole() -> None:
    assert all(p.source and p.value > 0 for p in PUBLISHED)
    lj13 = {(p.method, p.metric): p.value for p in published_for("lj13") if "blog" in p.source}
    assert lj13[("iDEM", "distance_w2")] == 0.024 and lj13[("Metropolis, same energy evaluations", "energy_w2")] == 0.52
    with pytest.raises(KeyError, match="distance_tvd"):
        target_verdicts("lj13", {"distance_w2": 0.01, "energy_w2": 1.0})
    verdicts = target_verdicts("lj13", {"distance_w2": 0.01, "distance_tvd": 0.1, "energy_w2": 1.0})
    assert [(m, met) for m, _, _, met in verdicts] == [("distance_w2", True), ("distance_tvd", False),
                                                       ("energy_w2", True)]


# the earlier phases kept as checkpoints of their own: (name, target, how many of its phases)
EARLIER_PHASES = [("dw4_phase1", "dw4", 1), ("lj13_phase3", "lj13", 3), ("lj55_phase2", "lj55", 2)]


@pytest.mark.parametrize(("name", "target", "n_phases"),
                         [(t, t, None) for t in SAMPLER_TARGETS] + EARLIER_PHASES)
def test_a_shipped_checkpoint_was_trained_by_the_phases_its_recipe_lists(name: str, target: str,
                                                                         n_phases: int | None) -> None:
    from dataclasses import asdict

    from boltzlab.training.idem_config import SHIPPED_PHASES, config_for

    summary = json.loads((shipped_checkpoint(name) / "metrics.json").read_text())
    config = json.loads((shipped_checkpoint(name) / "config.json").read_text())
    phases = SHIPPED_PHASES.get(target, [({}, summary["outer_iterations"])])[:n_phases]
    configs = [*(p["config"] for p in summary.get("phases", [])), config]
    assert len(configs) == len(phases)
    ends = [p["until_outer"] for p in summary.get("phases", [])] + [summary["outer_iterations"]]
    for (overrides, until), saved, end in zip(phases, configs, ends):
        expected = asdict(config_for(target, **overrides))
        assert end == until
        # fields the checkpoint predates take their defaults; n_outer is the plan, not the result
        assert {k: v for k, v in saved.items() if k != "n_outer"} == {
            k: v for k, v in expected.items() if k in saved and k != "n_outer"}


@pytest.mark.parametrize("name", ["gmm40", "dw4", "dw4_phase1", "lj13", "lj13_phase3", "lj55", "lj55_phase2"])
def test_a_shipped_mcmc_baseline_was_run_for_its_checkpoints_budget(name: str) -> None:
    path = shipped_checkpoint(name) / "mcmc_baseline.json"
    if not path.is_file():
        pytest.skip(f"{name}: no equal-budget MCMC baseline shipped yet")
    baseline = json.loads(path.read_text())
    spent = json.loads((shipped_checkpoint(name) / "metrics.json").read_text())["energy_evaluations"]
    # (GMM-40's file predates the "budget" key; its chains x steps still pin it to this checkpoint)
    assert baseline.get("budget", spent) == spent
    # the budget buys n_chains x steps evaluations (rounded down to whole steps, plus each chain's first)
    assert baseline["n_chains"] * baseline["steps"] <= spent < baseline["n_chains"] * (baseline["steps"] + 1)
    assert baseline.get("chains_run", baseline["n_chains"]) <= baseline["n_chains"]

"""Tests of boltzlab.training.ablation: the CPU budget stops a run after the outer iteration that
spends it (and the stopped run is evaluated and resumable), each variant changes exactly what it
says, records are written once and kept, and the sampler sweep evaluates one checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from boltzlab import metrics
from boltzlab.reference import load_reference
from boltzlab.training import ablation
from boltzlab.training.idem import TrainingConfigError, config_for, load_sampler, train_idem

TINY = {"hidden": 8, "n_layers": 1, "n_mc": 4, "batch_size": 8, "inner_steps": 2, "n_refill": 8, "sde_steps": 4,
        "buffer_capacity": 32, "n_eval": 20, "n_outer": 50, "eval_every": 50}


def test_cpu_budget_stops_after_the_outer_iteration_that_spends_it(tmp_path: Path) -> None:
    config = config_for("dw4", **TINY)
    state = train_idem(config, tmp_path, progress=False, cpu_budget_s=0.0)
    # a zero budget is spent by the first outer iteration, which is evaluated and saved
    assert state.outer == 1 and len(state.evaluations) == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["outer_iterations"] == 1
    again = train_idem(config, tmp_path, resume=True, progress=False, cpu_budget_s=0.0)
    assert again.outer == 2


def test_every_variant_changes_only_its_own_fields() -> None:
    base = asdict(ablation.variant_config("lj13", "base"))
    for name, (_, overrides) in ablation.VARIANTS.items():
        changed = {k for k, v in asdict(ablation.variant_config("lj13", name)).items() if base[k] != v}
        assert changed == {k for k, v in overrides.items() if base[k] != v} and (changed or name == "base")
    with pytest.raises(TrainingConfigError, match="variant"):
        ablation.variant_config("lj13", "bigger")
    with pytest.raises(TrainingConfigError, match="ablation base"):
        ablation.variant_config("dw4", "base")


def test_run_ablation_writes_records_once_and_sweeps_the_sampler(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ablation.ABLATION_BASE, "lj13", replace(config_for("lj13", **TINY), n_mc=4))
    records = ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=20, names=["base", "k128"],
                                    progress=False)
    assert [r["variant"] for r in records] == ["base", "k128"]
    assert records[1]["config"]["n_mc"] == 128 and records[0]["config"]["n_mc"] == 4
    for r in records:
        assert r["outer_iterations"] >= 1 and r["cpu_s"] > 0 and 0.0 <= r["distance_tvd"] <= 1.0
        assert r["regression_steps"] == r["outer_iterations"] * TINY["inner_steps"]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in saved] == ["base", "k128"]
    mtime = (tmp_path / "base" / "checkpoint.pt").stat().st_mtime_ns
    ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=20, names=["base"], progress=False)
    assert (tmp_path / "base" / "checkpoint.pt").stat().st_mtime_ns == mtime  # kept, not retrained
    rows = ablation.sampler_sweep(tmp_path / "base", 20, [2, 4], [0.9, 1.0])
    assert [(r["sde_steps"], r["diffusion_scale"]) for r in rows] == [(2, 0.9), (2, 1.0), (4, 0.9), (4, 1.0)]
    # the sweep's row at the config's own sampler equals a plain evaluation of the checkpoint
    plain = ablation.evaluate_checkpoint(tmp_path / "base", 20)
    assert rows[3]["energy_w2"] == pytest.approx(plain["energy_w2"])
    # against the whole reference set: the same samples, measured against all 10,000 configurations
    whole = ablation.evaluate_checkpoint(tmp_path / "base", 20, whole_reference=True)
    with torch.no_grad():
        x = load_sampler(tmp_path / "base").sample(20, torch.Generator().manual_seed(0))
    assert whole["mean_energy"] == pytest.approx(plain["mean_energy"])
    assert whole["distance_w2"] == pytest.approx(metrics.distance_w2(x, load_reference("lj13"), 13, 3), rel=1e-6)


def test_scaling_records_round_trip_with_regression_steps(tmp_path: Path) -> None:
    config = config_for("dw4", **{**TINY, "n_outer": 4, "eval_every": 2})
    run = tmp_path / "run"
    train_idem(config, run, progress=False)
    path = ablation.save_scaling_record(run, "dw4_tiny", records_dir=tmp_path / "records")
    assert path.name == "scaling_dw4_tiny.json"
    (record,) = ablation.load_scaling_records("dw4", records_dir=tmp_path / "records")
    assert [e["outer"] for e in record["evaluations"]] == [2.0, 4.0]
    assert [e["regression_steps"] for e in record["evaluations"]] == [2.0 * TINY["inner_steps"], 4.0 * TINY["inner_steps"]]
    assert record["config"]["n_mc"] == TINY["n_mc"] and record["outer_iterations"] == 4
    assert ablation.load_scaling_records("lj13", records_dir=tmp_path / "records") == []
    with pytest.raises(FileNotFoundError):
        ablation.scaling_record(tmp_path / "nowhere", "x")
    # a second phase with other inner steps: each evaluation counts the steps of its own phases
    second = replace(config, inner_steps=5, n_outer=6, clip_sigma=0.2)
    train_idem(second, tmp_path / "phase2", init_from=run, progress=False)
    record = ablation.scaling_record(tmp_path / "phase2", "two_phases")
    assert [(e["outer"], e["regression_steps"]) for e in record["evaluations"]] == [
        (2.0, 2.0 * TINY["inner_steps"]), (4.0, 4.0 * TINY["inner_steps"]), (6.0, 4.0 * TINY["inner_steps"] + 2 * 5)]
    assert [p["until_outer"] for p in record["phases"]] == [4]
    # the command line records any target's run; the ablation itself names the targets it has a base for
    with pytest.raises(SystemExit):
        ablation.main(["dw4", "--out", str(tmp_path / "ablation"), "--only", "base"])
    assert not (tmp_path / "ablation").exists()


def test_an_interrupted_variant_resumes_with_what_is_left_of_its_cpu_budget(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ablation.ABLATION_BASE, "lj13", replace(config_for("lj13", **TINY), n_mc=4))
    config = ablation.variant_config("lj13", "base")
    # a run cut off after 3 outer iterations: the checkpoint counts the CPU they took
    state = train_idem(config, tmp_path / "base", progress=False, stop_after=3)
    assert state.cpu_time > 0
    budget = state.cpu_time / 60.0 * 0.5  # less than already spent: nothing is left to train
    (record,) = ablation.run_ablation("lj13", tmp_path, cpu_minutes=budget, n_eval=20, names=["base"], progress=False)
    assert record["outer_iterations"] == 3
    assert record["cpu_s"] == pytest.approx(state.cpu_time, abs=0.05)
    # with a larger budget it continues from the checkpoint, not from scratch
    (record,) = ablation.run_ablation("lj13", tmp_path, cpu_minutes=budget * 100, n_eval=20, names=["base"],
                                      progress=False)
    assert record["outer_iterations"] > 3 and record["cpu_s"] > state.cpu_time


def test_two_processes_splitting_the_variants_leave_one_table_and_publish_it(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ablation.ABLATION_BASE, "lj13", replace(config_for("lj13", **TINY), n_mc=4))
    # as two processes with --only would: each call knows only its own variants
    ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=20, names=["k128"], progress=False)
    ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=20, names=["base"], progress=False)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in saved] == ["base", "k128"]  # both, in VARIANTS order
    path = ablation.save_ablation_record(tmp_path, "lj13", records_dir=tmp_path / "records")
    assert path.name == "ablation_lj13.json"
    assert ablation.load_ablation_record("lj13", records_dir=tmp_path / "records") == saved
    assert ablation.load_base_resampled("lj13", records_dir=tmp_path / "records") == []
    # the base re-evaluated with other sampling seeds: same network, other samples
    rows = ablation.sampling_spread(tmp_path, seeds=(1, 2))
    assert [r["seed"] for r in rows] == [1, 2] and rows[0]["distance_w2"] != rows[1]["distance_w2"]
    assert rows[0] == {"seed": 1, **ablation.evaluate_checkpoint(tmp_path / "base", 20, seed=1)}
    ablation.save_ablation_record(tmp_path, "lj13", records_dir=tmp_path / "records")
    assert ablation.load_base_resampled("lj13", records_dir=tmp_path / "records") == rows
    with pytest.raises(FileNotFoundError, match="no saved ablation"):
        ablation.load_ablation_record("lj55", records_dir=tmp_path / "records")
    # a variant evaluated on another number of samples cannot join the table
    ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=30, names=["base_seed1"], progress=False)
    with pytest.raises(TrainingConfigError, match="different budgets"):
        ablation.save_ablation_record(tmp_path, "lj13", records_dir=tmp_path / "records")
    with pytest.raises(TrainingConfigError, match="no finished"):
        ablation.save_ablation_record(tmp_path / "empty", "lj13", records_dir=tmp_path / "records")


def test_a_variant_held_by_a_live_process_is_skipped_and_a_stale_claim_is_taken(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    monkeypatch.setitem(ablation.ABLATION_BASE, "lj13", replace(config_for("lj13", **TINY), n_mc=4))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "k128").mkdir()
        (tmp_path / "k128" / ".running").write_text(str(sleeper.pid))  # a live process holds k128
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / ".running").write_text("999999999")  # no such process: stale
        records = ablation.run_ablation("lj13", tmp_path, cpu_minutes=0.001, n_eval=20, names=["base", "k128"],
                                        progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [r["variant"] for r in records] == ["base"]  # k128 left to its holder
    assert not (tmp_path / "k128" / "ablation.json").exists()
    assert not (tmp_path / "base" / ".running").exists()  # released after training
    assert (tmp_path / "k128" / ".running").read_text() == str(sleeper.pid)
    assert os.path.isfile(tmp_path / "base" / "ablation.json")


class _GMMScore(torch.nn.Module):
    """The exact noised score of GMM-40, times ``factor`` where ``band[0] < sigma_t < band[1]`` (a
    score that is wrong in one band of noise levels only)."""

    def __init__(self, schedule, factor: float = 1.0, band: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        from boltzlab.energies import GaussianMixture

        self.gmm, self.schedule, self.factor, self.band = GaussianMixture(), schedule, factor, band

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from boltzlab.estimators import gmm_noised_score

        sigma = self.schedule.std(t)
        scale = torch.where((sigma > self.band[0]) & (sigma < self.band[1]), self.factor, 1.0).to(x.dtype)
        return scale[:, None] * gmm_noised_score(self.gmm, x, sigma)


def test_denoise_from_reference_finds_the_band_where_a_score_is_wrong() -> None:
    from boltzlab.energies import GaussianMixture
    from boltzlab.training.checkpoints import TrainedSampler

    config = config_for("gmm40")
    torch.manual_seed(0)  # GMM-40's whole "reference set" is a fresh exact draw

    def rows_of(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        sampler = TrainedSampler(model, config, GaussianMixture(), 0, 0.0, [])
        rows = ablation.denoise_from_reference(sampler, [30.0, 0.3], n=2000, steps_per_unit=200, seed=3)
        assert [r["start"] for r in rows] == ["reference", "data", "data", "prior"]
        assert [r["sigma_start"] for r in rows[1:3]] == [0.3, 30.0]  # sorted
        return {f"{r['start']}{r['sigma_start']:g}": r for r in rows}

    exact = rows_of(_GMMScore(config.schedule))
    floor = exact["reference0"]["energy_w2"]  # exact samples against exact samples: sampling noise
    for key, r in exact.items():
        assert r["modes_covered"] == 40, key
        assert r["energy_w2"] < 3 * floor + 0.05, (key, r, floor)
    # half the score for 0.5 < sigma < 3: a start below the band never meets it, one above does
    wrong = rows_of(_GMMScore(config.schedule, factor=0.5, band=(0.5, 3.0)))
    assert wrong["data0.3"]["energy_w2"] < 3 * floor + 0.05, wrong["data0.3"]
    assert wrong["data30"]["energy_w2"] > 10 * max(wrong["data0.3"]["energy_w2"], floor), wrong
    assert wrong["prior70"]["energy_w2"] > 10 * max(wrong["data0.3"]["energy_w2"], floor), wrong
    with pytest.raises(TrainingConfigError, match="n must be between 2"):
        ablation.denoise_from_reference(TrainedSampler(_GMMScore(config.schedule), config, GaussianMixture(), 0, 0.0, []),
                                        [1.0], n=1)


def test_from_data_command_refuses_a_checkpoint_of_another_target(capsys: pytest.CaptureFixture[str]) -> None:
    from boltzlab.training.idem import shipped_checkpoint

    with pytest.raises(SystemExit):
        ablation.main(["lj13", "--from-data", str(shipped_checkpoint("dw4")), "--n-eval", "8"])
    assert "is a dw4 checkpoint, not lj13" in capsys.readouterr().err


def test_from_data_command_names_its_record_after_the_checkpoint_folder(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from boltzlab.training.idem import shipped_checkpoint

    # two checkpoints of one target (a shipped one and an earlier phase) must not overwrite each other's record
    copy = tmp_path / "dw4_somephase"
    shutil.copytree(shipped_checkpoint("dw4"), copy)
    monkeypatch.setattr(ablation, "RECORDS_DIR", tmp_path / "records")
    assert ablation.main(["dw4", "--from-data", str(copy), "--n-eval", "8", "--sigmas", "0.5",
                          "--no-compile", "--no-progress"]) == 0
    record = ablation.load_from_data_record("dw4_somephase", tmp_path / "records")
    assert record["target"] == "dw4" and record["checkpoint"] == str(copy) and record["n"] == 8
    assert [r["start"] for r in record["rows"]] == ["reference", "data", "prior"]
    assert record["rows"][1]["sigma_start"] == 0.5
    with pytest.raises(FileNotFoundError, match="no from-data record for 'dw4'"):
        ablation.load_from_data_record("dw4", tmp_path / "records")

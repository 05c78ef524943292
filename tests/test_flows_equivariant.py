"""Tests of the particle Boltzmann generator (boltzlab.flows.equivariant and
boltzlab.flows.particle_training) against symmetry, exact Gaussian flows, brute-force
Jacobians of an independent integrator, and the analytic flow-matching minimiser."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from boltzlab import flows as F
from boltzlab.energies import Energy, remove_com
from boltzlab.metrics import kish_ess, log_z_estimate, wasserstein_1d, weighted_wasserstein_1d


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_cnf(n: int, d: int, seed: int = 0, std: float = 1.3) -> F.EquivariantCNF:
    cnf = F.EquivariantCNF(n, d, prior_std=std, hidden=16, n_layers=2, time_dim=8, seed=seed).double()
    with torch.no_grad():  # perturbed default weights: a field clearly non-zero and non-linear
        g = gen(seed + 100)
        for p in cnf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return cnf


def com_free(b: int, n: int, d: int, seed: int = 1) -> Tensor:
    return F.sample_com_free_gaussian(b, n, d, 1.5, gen(seed), torch.float64)


def random_orthogonal(d: int, seed: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate(x: Tensor, rot: Tensor, n: int, d: int) -> Tensor:
    return (x.reshape(-1, n, d) @ rot.T).reshape(x.shape)


def permute(x: Tensor, perm: Tensor, n: int, d: int) -> Tensor:
    return x.reshape(-1, n, d)[:, perm].reshape(x.shape)


SYSTEMS = [(4, 2), (5, 3)]


# ----------------------------------------------------------------------------------------
# the subspace and the prior
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SYSTEMS)
def test_basis_is_orthonormal_and_spans_the_com_free_subspace(n, d):
    basis = F.com_free_basis(n, d)
    assert basis.shape == ((n - 1) * d, n * d)
    torch.testing.assert_close(basis @ basis.T, torch.eye((n - 1) * d, dtype=torch.float64))
    torch.testing.assert_close(basis.T @ basis, remove_com(torch.eye(n * d, dtype=torch.float64), n, d))


def test_prior_log_prob_matches_a_gaussian_in_subspace_coordinates():
    n, d, std = 4, 2, 1.7
    z = com_free(50, n, d)
    coords = z @ F.com_free_basis(n, d).T                       # (50, 6): orthonormal coordinates on U
    expected = torch.distributions.Normal(0.0, std).log_prob(coords).sum(-1)
    torch.testing.assert_close(F.com_free_gaussian_log_prob(z, n, d, std), expected)
    with pytest.raises(F.FlowInputError, match="centre-of-mass free"):
        F.com_free_gaussian_log_prob(z + 1.0, n, d, std)


# ----------------------------------------------------------------------------------------
# symmetries
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SYSTEMS)
def test_vector_field_is_rotation_permutation_and_translation_equivariant(n, d):
    cnf = small_cnf(n, d)
    x = com_free(6, n, d)
    t = torch.rand(6, generator=gen(2), dtype=torch.float64)
    v = cnf.velocity(x, t)
    assert float(v.detach().abs().max()) > 1e-2
    torch.testing.assert_close(v.reshape(-1, n, d).sum(1), torch.zeros(6, d, dtype=torch.float64))
    rot = random_orthogonal(d, 3)
    torch.testing.assert_close(cnf.velocity(rotate(x, rot, n, d), t), rotate(v, rot, n, d))
    perm = torch.randperm(n, generator=gen(4))
    torch.testing.assert_close(cnf.velocity(permute(x, perm, n, d), t), permute(v, perm, n, d))
    shift = torch.randn(d, generator=gen(5), dtype=torch.float64).repeat(n)
    torch.testing.assert_close(cnf.velocity(x + shift, t), v)


@pytest.mark.parametrize("n,d", SYSTEMS)
def test_log_q_is_invariant(n, d):
    cnf = small_cnf(n, d)
    x = com_free(5, n, d, seed=7)
    lq = cnf.log_prob(x, n_steps=10)
    assert float(lq.std()) > 1e-2  # not a constant function
    rot = random_orthogonal(d, 8)
    torch.testing.assert_close(cnf.log_prob(rotate(x, rot, n, d), n_steps=10), lq)
    perm = torch.randperm(n, generator=gen(9))
    torch.testing.assert_close(cnf.log_prob(permute(x, perm, n, d), n_steps=10), lq)
    shifted = x + torch.randn(d, generator=gen(10), dtype=torch.float64).repeat(n)
    torch.testing.assert_close(cnf.log_prob(shifted, n_steps=10, project=True), lq)
    with pytest.raises(F.FlowInputError, match="centre-of-mass free"):
        cnf.log_prob(shifted, n_steps=10)


# ----------------------------------------------------------------------------------------
# the likelihood
# ----------------------------------------------------------------------------------------


class LinearField(nn.Module):
    """v(x, t) = (a + b t) x: x_1 = exp(a + b/2) x_0, so q_1 = N(0, σ² e^{2a + b} P)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return (self.a + self.b * t)[:, None] * x


def test_ode_log_likelihood_of_a_linear_field_is_the_exact_gaussian():
    n, d, std, a, b = 4, 2, 1.3, 0.4, -0.6
    cnf = F.EquivariantCNF(n, d, prior_std=std).double()
    cnf.field = LinearField(a, b)
    x, lq = cnf.sample(300, n_steps=20, generator=gen(11))
    exact = F.com_free_gaussian_log_prob(x, n, d, std * math.exp(a + b / 2))
    torch.testing.assert_close(lq, exact, atol=1e-7, rtol=0)
    torch.testing.assert_close(cnf.log_prob(x, n_steps=20), exact, atol=1e-7, rtol=0)


def _rk4_map(field, z: Tensor, n_steps: int) -> Tensor:
    """An independent differentiable RK4 integrator of dx/dt = field(x, t) from 0 to 1."""
    h = 1.0 / n_steps
    x = z
    for k in range(n_steps):
        t = torch.full((1,), k * h, dtype=z.dtype)
        k1 = field(x, t)
        k2 = field(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = field(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = field(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_log_q_matches_the_brute_force_jacobian_of_the_flow_map():
    """log q(Φ(z)) = log p_0(z) - log|det(Bᵀ ∂Φ/∂z B)| on the subspace (change of variables)."""
    n, d = 4, 2
    cnf = small_cnf(n, d, seed=3)
    basis = F.com_free_basis(n, d)
    x, lq = cnf.sample(4, n_steps=40, generator=gen(12))
    z = cnf.sample_prior(4, gen(12))
    for i in range(4):
        coords = z[i] @ basis.T

        def phi(c: Tensor) -> Tensor:
            return _rk4_map(cnf.field, (c @ basis)[None], 40)[0] @ basis.T

        jac = torch.autograd.functional.jacobian(phi, coords)
        expected = cnf.prior_log_prob(z[i:i + 1])[0] - torch.linalg.slogdet(jac).logabsdet
        assert abs(float(lq[i] - expected)) < 1e-6, (i, float(lq[i]), float(expected))
        torch.testing.assert_close(phi(coords) @ basis, x[i])


def test_sampling_and_log_prob_agree_and_converge_in_the_step_count():
    cnf = small_cnf(4, 2, seed=5)
    x, lq = cnf.sample(20, n_steps=30, generator=gen(13))
    torch.testing.assert_close(cnf.log_prob(x, n_steps=30), lq, atol=1e-5, rtol=0)
    conv = F.ode_convergence(cnf, 20, 30)
    assert conv["log_q_rms_diff"] < 1e-4


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComFreeHarmonic(Energy):
    """E = |x|² / (2 s²) on the centre-of-mass-free subspace: p = N(0, s² P) at kT = 1."""

    n: int = 4
    d: int = 2
    s: float = 1.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool):
        return 0.5 * x.pow(2).sum(-1) / self.s**2, (-x / self.s**2 if want_forces else None)


def test_exact_samples_have_ess_n_and_the_exact_log_z():
    n, d, std = 4, 2, 1.3
    cnf = F.EquivariantCNF(n, d, prior_std=std, hidden=8, n_layers=2).double()
    with torch.no_grad():
        for p in cnf.parameters():
            p.zero_()  # v = 0: q is the prior, the target below exactly
    energy = ComFreeHarmonic(name="harmonic", dim=n * d, n=n, d=d, s=std)
    x, lq, log_w = F.importance_log_weights(cnf, energy, 2000, n_steps=4, generator=gen(14))
    assert kish_ess(log_w) == pytest.approx(2000, rel=1e-9)
    log_z, _ = log_z_estimate(log_w)
    assert log_z == pytest.approx(0.5 * (n - 1) * d * math.log(2 * math.pi * std**2), abs=1e-9)


def test_weighted_w2_equals_w2_of_the_repeated_sample():
    a = torch.randn(9, generator=gen(15), dtype=torch.float64)
    b = torch.randn(6, generator=gen(16), dtype=torch.float64) + 0.5
    assert weighted_wasserstein_1d(a, torch.zeros(9), b) == pytest.approx(wasserstein_1d(a, b), abs=1e-12)
    counts = torch.tensor([1, 3, 2, 1, 5, 1, 2, 4, 1])
    expected = wasserstein_1d(a.repeat_interleave(counts), b)
    assert weighted_wasserstein_1d(a, counts.double().log(), b) == pytest.approx(expected, abs=1e-8)


# ----------------------------------------------------------------------------------------
# flow matching
# ----------------------------------------------------------------------------------------


class ScaledIdentity(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.c * x


@pytest.mark.parametrize("t", [0.25, 0.7])
def test_flow_matching_loss_is_minimised_by_the_conditional_mean(t):
    """Data N(0, s² P), prior N(0, σ² P), independent pairs: v*(x, t) = c(t) x with
    c = (t s² - (1-t) σ²) / V, V = (1-t)² σ² + t² s², and the minimum is d_eff s² σ² / V."""
    n, d, s, sigma, B = 4, 2, 2.0, 1.0, 200_000
    v_var = (1 - t) ** 2 * sigma**2 + t**2 * s**2
    c = (t * s**2 - (1 - t) * sigma**2) / v_var
    minimum = (n - 1) * d * s**2 * sigma**2 / v_var
    x1 = F.sample_com_free_gaussian(B, n, d, s, gen(17), torch.float64)
    tt = torch.full((B,), t, dtype=torch.float64)

    def loss(cc: float) -> float:
        return float(F.flow_matching_loss(ScaledIdentity(cc), x1, n, d, sigma, "none", gen(18), t=tt))

    assert loss(c) == pytest.approx(minimum, rel=0.01)
    assert loss(c + 0.1) > loss(c) + 0.5 * 0.01 * (n - 1) * d * v_var  # curvature d_eff V δ²
    assert loss(c - 0.1) > loss(c) + 0.5 * 0.01 * (n - 1) * d * v_var


def _sorted_distances(x: Tensor, n: int, d: int) -> Tensor:
    r = x.reshape(-1, n, d)
    i, j = torch.triu_indices(n, n, 1)
    return (r[:, i] - r[:, j]).norm(dim=-1).sort(-1).values


def test_alignment_costs_against_brute_force():
    n, d, B = 4, 2, 4
    x1 = com_free(B, n, d, seed=19)
    x0 = com_free(B, n, d, seed=20)

    def cost(a: Tensor) -> float:
        return float((a - x1).pow(2).sum())

    # "ot": the best of all B! row assignments
    brute_ot = min(cost(x0[list(p)]) for p in itertools.permutations(range(B)))
    assert cost(F.align_pairs(x0, x1, n, d, "ot")) == pytest.approx(brute_ot, rel=1e-9)
    # "equivariant": rows also rotated (fine angle grid) and relabelled (all 24 permutations)
    angles = torch.linspace(0, 2 * math.pi, 7201, dtype=torch.float64)
    rots = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                        torch.stack([angles.sin(), angles.cos()], -1)], -2)          # (A, 2, 2)
    perms = torch.tensor(list(itertools.permutations(range(n))))
    pair = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            a = x0[j].reshape(n, d)[perms]                                          # (24, n, d)
            moved = torch.einsum("pnd,aed->pane", a, rots)                           # (24, A, n, d)
            pair[i, j] = (moved - x1[i].reshape(n, d)).pow(2).sum((-1, -2)).min()
    brute_eq = min(sum(float(pair[i, p[i]]) for i in range(B)) for p in itertools.permutations(range(B)))
    aligned = F.align_pairs(x0, x1, n, d, "equivariant")
    assert cost(aligned) == pytest.approx(brute_eq, rel=1e-5)
    assert cost(aligned) <= brute_ot + 1e-9
    # each aligned row is an isometric relabelling of a prior row: same pair distances
    dist_a, dist_0 = _sorted_distances(aligned, n, d), _sorted_distances(x0, n, d)
    assert float(torch.cdist(dist_a, dist_0).min(1).values.max()) < 1e-9
    torch.testing.assert_close(aligned.reshape(B, n, d).sum(1), torch.zeros(B, d, dtype=torch.float64))


def test_equivariant_alignment_in_3d_against_scipy_rotations():
    from scipy.spatial.transform import Rotation

    n, d, B = 3, 3, 4
    x1 = com_free(B, n, d, seed=22)
    x0 = com_free(B, n, d, seed=23)
    perms = list(itertools.permutations(range(n)))
    pair = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            best = math.inf
            for p in perms:
                a = x0[j].reshape(n, d)[list(p)].numpy()
                rot, _ = Rotation.align_vectors(x1[i].reshape(n, d).numpy(), a)
                best = min(best, float(((rot.apply(a) - x1[i].reshape(n, d).numpy()) ** 2).sum()))
            pair[i, j] = best
    brute = min(sum(float(pair[i, p[i]]) for i in range(B)) for p in itertools.permutations(range(B)))
    aligned = F.align_pairs(x0, x1, n, d, "equivariant")
    assert float((aligned - x1).pow(2).sum()) == pytest.approx(brute, rel=1e-6)
    dist_a, dist_0 = _sorted_distances(aligned, n, d), _sorted_distances(x0, n, d)
    assert float(torch.cdist(dist_a, dist_0).min(1).values.max()) < 1e-9


def test_bad_input_is_named():
    cnf = small_cnf(4, 2)
    with pytest.raises(F.FlowInputError, match=r"shape \(B, 8\)"):
        cnf.log_prob(torch.zeros(3, 9, dtype=torch.float64))
    with pytest.raises(F.FlowInputError, match="NaN"):
        cnf.velocity(torch.full((2, 8), float("nan"), dtype=torch.float64), 0.5)
    with pytest.raises(F.FlowInputError, match="alignment"):
        F.align_pairs(com_free(2, 4, 2), com_free(2, 4, 2), 4, 2, "sinkhorn")
    with pytest.raises(F.FlowInputError, match="permutations"):
        F.align_pairs(com_free(2, 13, 3), com_free(2, 13, 3), 13, 3, "equivariant")
    with pytest.raises(F.FlowInputError, match="prior_std"):
        F.EquivariantCNF(4, 2, prior_std=-1.0)
    with pytest.raises(F.FlowInputError, match="n_steps"):
        cnf.sample(3, n_steps=0)


# ----------------------------------------------------------------------------------------
# the training command
# ----------------------------------------------------------------------------------------

TINY = ["--set", "n_train=200", "--set", "n_heldout=200", "--set", "hidden=8", "--set", "n_layers=2",
        "--set", "batch_size=16", "--set", "n_steps=6", "--set", "checkpoint_every=2", "--set", "n_eval=64",
        "--set", "ode_steps=4", "--no-progress"]


def test_training_command_resumes_to_the_same_result(tmp_path):
    from boltzlab.__main__ import main
    from boltzlab.flows.particle_training import load_particle_flow

    assert main(["train-flow", "dw4", "--out", str(tmp_path / "a"), *TINY]) == 0
    assert main(["train-flow", "dw4", "--out", str(tmp_path / "b"), "--stop-after", "3", *TINY]) == 0
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert main(["train-flow", "dw4", "--out", str(tmp_path / "b"), "--auto-resume", *TINY]) == 0
    model_a, config, metrics_a = load_particle_flow(tmp_path / "a")
    model_b, _, metrics_b = load_particle_flow(tmp_path / "b")
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert metrics_a["ess_per_sample"] == metrics_b["ess_per_sample"]
    assert 1 / 64 <= metrics_a["ess_per_sample"] <= 1
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["n_train"] == 200 and config.n_steps == 6
    # a different config cannot continue the run, and an existing run is not overwritten
    assert main(["train-flow", "dw4", "--out", str(tmp_path / "a"), "--auto-resume", *TINY,
                 "--set", "lr=0.5"]) == 2
    assert main(["train-flow", "dw4", "--out", str(tmp_path / "a"), *TINY]) == 2
    # the evaluation's size may change on resume (a finished run is then only re-evaluated)
    assert main(["train-flow", "dw4", "--out", str(tmp_path / "a"), "--auto-resume", *TINY,
                 "--set", "n_eval=32"]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["n_eval"] == 32
    assert json.loads((tmp_path / "a" / "config.json").read_text())["n_eval"] == 32


def test_config_rejects_bad_fields():
    from boltzlab.flows.particle_training import ParticleFlowConfigError, config_for

    with pytest.raises(ParticleFlowConfigError, match="unknown config field"):
        config_for("dw4", n_stepz=3)
    with pytest.raises(ParticleFlowConfigError, match="alignment"):
        config_for("dw4", alignment="sinkhorn")
    with pytest.raises(ParticleFlowConfigError, match="n_eval"):
        config_for("dw4", n_eval=0)


# ----------------------------------------------------------------------------------------
# the shipped DW-4 flow
# ----------------------------------------------------------------------------------------


def test_shipped_dw4_flow_meets_its_targets_on_fresh_samples():
    from boltzlab.energies import dw4
    from boltzlab.flows.particle_training import load_particle_flow, shipped_particle_flow

    path = shipped_particle_flow("dw4")
    model, config, metrics = load_particle_flow(path)
    saved_config = json.loads((path / "config.json").read_text())
    assert {k: saved_config[k] for k in ("hidden", "n_layers", "alignment", "n_steps")} == \
        {"hidden": config.hidden, "n_layers": config.n_layers, "alignment": config.alignment,
         "n_steps": config.n_steps}
    assert metrics["steps"] == config.n_steps and metrics["n_eval"] >= 10_000
    assert metrics["ess_per_sample"] >= 0.3
    assert metrics["energy_w2_reweighted"] <= 0.1
    assert metrics["train_cpu_time_s"] <= 2 * 3600
    energy = dw4()
    # the stored weights are -E/kT - log q of the stored samples
    samples = torch.load(path / "samples.pt")
    x, log_q, log_w = samples["x"], samples["log_q"], samples["log_w"]
    assert x.shape == (metrics["n_eval"], 8)
    torch.testing.assert_close(log_w[:500], -energy.energy(x[:500]).double() - log_q[:500], atol=1e-4, rtol=0)
    assert kish_ess(log_w) / log_w.numel() == pytest.approx(metrics["ess_per_sample"], rel=1e-9)
    # the stored log q is the flow's: integrating back from x recovers it
    torch.testing.assert_close(model.log_prob(x[:40], n_steps=config.ode_steps), log_q[:40], atol=2e-3, rtol=0)
    # fresh samples at a small size: an ESS like the shipped one (n = 600: noisy, hence the margin)
    _, _, fresh = F.importance_log_weights(model, energy, 600, n_steps=config.ode_steps, generator=gen(21))
    assert abs(kish_ess(fresh) / 600 - metrics["ess_per_sample"]) < 0.15


def test_shipped_lj13_flow_meets_its_aim_and_its_files_agree():
    from boltzlab.energies import lj13
    from boltzlab.flows.particle_training import load_particle_flow, reference_split, shipped_particle_flow
    from boltzlab.metrics import distance_tvd

    path = shipped_particle_flow("lj13")
    model, config, metrics = load_particle_flow(path)
    assert metrics["steps"] == config.n_steps and metrics["n_eval"] >= 10_000
    assert metrics["train_cpu_time_s"] <= 4 * 3600  # the training budget
    assert metrics["ess_per_sample"] >= 0.01
    energy = lj13()
    samples = torch.load(path / "samples.pt")
    x, log_q, log_w = samples["x"], samples["log_q"], samples["log_w"]
    assert x.shape == (metrics["n_eval"], 39) and torch.isfinite(log_w).all()
    # every stored weight is -E/kT - log q of its stored sample (float64 energies, as in the evaluation)
    torch.testing.assert_close(log_w, -energy.energy(x.double()) / energy.kT - log_q, atol=1e-8, rtol=0)
    assert kish_ess(log_w) / log_w.numel() == pytest.approx(metrics["ess_per_sample"], rel=1e-9)
    assert log_z_estimate(log_w)[0] == pytest.approx(metrics["log_z"], abs=1e-9)
    _, heldout = reference_split(config)
    assert distance_tvd(x, heldout, 13, 3) == pytest.approx(metrics["distance_tvd_flow"], abs=1e-9)
    # the stored log q is the flow's: integrating back from three samples recovers it, up to the
    # RK4 error the evaluation measured (log q at N against 2N steps; 36 dimensions, so it is
    # larger than DW-4's 2e-3)
    solver = metrics["ode_log_q_rms_diff"]
    assert 0 < solver < 0.2
    back = model.log_prob(x[:3], n_steps=config.ode_steps)
    assert (back - log_q[:3]).abs().max() < 4 * solver, (back, log_q[:3], solver)

"""Tests of boltzlab.kernels.

Chain of trust: the dense references are checked against boltzlab.energies and against
autograd; the fast CPU path and the Triton kernels (run by Triton's interpreter in a child
process, so TRITON_INTERPRET never enters this process) are checked against the references
on the same inputs and noise, in float32 and float64, for several N and with ragged blocks.
The online logsumexp is checked against a direct softmax, including huge energies from
overlapping particles. The appendix exercise's check function is tested at the end with a
correct update and with the mistakes it must name.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

from boltzlab.energies import GaussianMixture, PairPotential, dw4, lj13, lj55, lj_benchmark, lj_standard
from boltzlab.kernels import NOISE_CHUNK, ScoreInputError, draw_noise, lj_energy_forces, mc_score_estimate
from boltzlab.kernels.interpret import run_interpreted
from boltzlab.kernels.online_lse import OnlineLSEState, fold_block
from boltzlab.kernels.reference import (
    autograd_score_estimate,
    dense_pair_energy,
    dense_pair_energy_forces,
    reference_log_weights,
    reference_score_estimate,
    vmap_grad_score_estimate,
)

_TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET")
F64 = torch.float64
F32 = torch.float32
# relative tolerances (of the largest reference entry) by dtype
REL = {F32: 2e-4, F64: 1e-10}


def cluster(potential: PairPotential, batch: int, seed: int, jitter: float = 0.08, dtype: torch.dtype = F64) -> Tensor:
    """Configurations (batch, dim) near a lattice with spacing about r_m (LJ) or d0 (DW): physical
    energies, no accidental overlaps, centre of mass removed."""
    g = torch.Generator().manual_seed(seed)
    n, d = potential.n, potential.d_space
    side = math.ceil(n ** (1.0 / d))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=F64)] * d, indexing="ij"), -1).reshape(-1, d)[:n]
    spacing = 1.05 * potential.r_m if potential.kind == "lj" else 0.9 * potential.dw_d0
    x = spacing * grid.expand(batch, n, d) + jitter * spacing * torch.randn(batch, n, d, generator=g, dtype=F64)
    return potential.remove_com(x.reshape(batch, n * d)).to(dtype)


def assert_close_rel(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """Row-wise relative check: |actual_b - expected_b| <= rel * max(max|expected_b|, 1) for each
    leading index b, so one configuration with a huge energy cannot hide errors in the others."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    err = (actual.to(F64) - expected.to(F64)).abs().reshape(expected.shape[0], -1).amax(1)
    scale = expected.to(F64).abs().reshape(expected.shape[0], -1).amax(1).clamp_min(1.0)
    worst = int((err / scale).argmax())
    assert (err <= rel * scale).all(), (
        f"{what}: row {worst} error {err[worst]:.3e} > {rel:.1e} * {scale[worst]:.3e}")


POTENTIALS = {
    "dw4": dw4(),
    "lj13": lj13(),
    "lj_standard_7_tethered": lj_standard(7, eps=0.7, r_m=1.3, harmonic=0.4),
    "lj22_benchmark": lj_benchmark(22),
}




# ----------------------------------------------------------------------------------------
# References against energies.py and autograd
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POTENTIALS))
def test_dense_reference_matches_energies_module(name: str) -> None:
    pot = POTENTIALS[name]
    x = cluster(pot, 6, seed=1, jitter=0.2)
    e, f = dense_pair_energy_forces(pot, x)
    e_ref, f_ref = pot.energy_and_forces(x)
    assert_close_rel(e, e_ref, 1e-12, f"{name} energy")
    assert_close_rel(f, f_ref, 1e-12, f"{name} forces")


def test_dense_reference_overlap_conventions_match_energies_module() -> None:
    # clamped pairs (d < PAIR_MIN_DISTANCE) and exactly coincident particles
    pot = lj13()
    x = cluster(pot, 3, seed=2).reshape(3, 13, 3)
    x[0, 1] = x[0, 0] + torch.tensor([3e-3, 0.0, 1e-3], dtype=F64)  # clamped, with a direction
    x[1, 4] = x[1, 2]  # exactly on top of each other: no pair force
    x[2, 5] = x[2, 6] + 1e-6
    x = x.reshape(3, 39)
    e, f = dense_pair_energy_forces(pot, x)
    e_ref, f_ref = pot.energy_and_forces(x)
    assert (e > 1e20).all(), "overlaps should give huge energies"
    assert_close_rel(e, e_ref, 1e-12, "overlap energy")
    assert_close_rel(f, f_ref, 1e-12, "overlap forces")


@pytest.mark.parametrize("name", list(POTENTIALS))
def test_dense_reference_forces_are_minus_the_autograd_gradient(name: str) -> None:
    pot = POTENTIALS[name]
    x = cluster(pot, 5, seed=3, jitter=0.2).requires_grad_(True)
    (grad,) = torch.autograd.grad(dense_pair_energy(pot, x).sum(), x)
    _, f = dense_pair_energy_forces(pot, x.detach())
    assert_close_rel(f, -grad, 1e-12, f"{name} forces vs autograd")


@pytest.mark.parametrize("name", ["dw4", "lj13", "lj_standard_7_tethered"])
def test_reference_score_matches_autograd_and_vmap_grad(name: str) -> None:
    pot = POTENTIALS[name]
    x = cluster(pot, 4, seed=4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 33, pot.dim, generator=g, dtype=F64)
    sigma = torch.tensor([0.0, 0.05, 0.2, 0.5], dtype=F64)
    ref = reference_score_estimate(pot, x, sigma, noise)
    auto = autograd_score_estimate(pot, x, sigma, noise)
    vmapped = vmap_grad_score_estimate(pot, x, sigma, noise)
    assert_close_rel(ref.score, auto.score, 1e-10, "score vs autograd")
    assert_close_rel(ref.score, vmapped, 1e-10, "score vs vmap/grad")
    assert_close_rel(ref.log_normalizer, auto.log_normalizer, 1e-12, "log normaliser")
    # sigma = 0: every copy is x_t, so the weights are uniform and the score is F(x_t)/kT
    _, f0 = pot.energy_and_forces(x[:1])
    assert_close_rel(ref.score[:1], f0 / pot.kT, 1e-12, "sigma = 0 score")
    assert ref.ess[0].item() == pytest.approx(33.0, rel=1e-12)


def test_reference_noise_is_projected_for_particles_only() -> None:
    pot = lj13()
    x = cluster(pot, 2, seed=6)
    shifted = torch.zeros(2, 5, 39, dtype=F64)
    shifted[..., 0::3] = 1.0  # a pure translation of every copy: projected away
    ref = reference_score_estimate(pot, x, 0.3, shifted)
    assert_close_rel(ref.score, pot.forces(x) / pot.kT, 1e-12, "translation noise")


# ----------------------------------------------------------------------------------------
# Online logsumexp
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e30])
def test_online_logsumexp_equals_direct_softmax(scale: float) -> None:
    g = torch.Generator().manual_seed(7)
    log_w = scale * torch.randn(3, 23, generator=g, dtype=F64)
    values = torch.randn(3, 23, 4, generator=g, dtype=F64)
    state = OnlineLSEState.empty(3, 4, F64, "cpu")
    for block in ([0, 1], [2], list(range(3, 17)), list(range(17, 23))):  # uneven blocks
        idx = torch.tensor(block)
        padded_w = torch.cat([log_w[:, idx], torch.full((3, 2), -math.inf, dtype=F64)], 1)  # padding
        padded_v = torch.cat([values[:, idx], torch.zeros(3, 2, 4, dtype=F64)], 1)
        state = fold_block(state, padded_w, padded_v)
    w = torch.softmax(log_w, 1)
    assert_close_rel(state.weighted_sum / state.sum_weights[:, None], (w[..., None] * values).sum(1), 1e-12, "mean")
    lse = state.max_log_weight + torch.log(state.sum_weights)
    assert torch.allclose(lse, torch.logsumexp(log_w, 1), rtol=1e-14, atol=1e-12)
    ess = state.sum_weights**2 / state.sum_sq_weights
    assert torch.allclose(ess, 1.0 / (w * w).sum(1), rtol=1e-10)


def test_online_logsumexp_rows_with_only_padding_stay_finite_then_recover() -> None:
    state = OnlineLSEState.empty(2, 1, F64, "cpu")
    pad = torch.full((2, 3), -math.inf, dtype=F64)
    state = fold_block(state, pad, torch.ones(2, 3, 1, dtype=F64))
    assert not torch.isnan(state.sum_weights).any() and (state.sum_weights == 0).all()
    state = fold_block(state, torch.tensor([[0.0], [5.0]], dtype=F64), torch.full((2, 1, 1), 2.0, dtype=F64))
    assert torch.equal(state.weighted_sum / state.sum_weights[:, None], torch.full((2, 1), 2.0, dtype=F64))


# ----------------------------------------------------------------------------------------
# The fast PyTorch path (CPU) against the references
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(POTENTIALS))
def test_cpu_energy_forces_match_reference(name: str, dtype: torch.dtype) -> None:
    pot = POTENTIALS[name]
    x = cluster(pot, 9, seed=8, jitter=0.2, dtype=dtype)
    e, f = lj_energy_forces(pot, x, compile=False)
    e_ref, f_ref = dense_pair_energy_forces(pot, x)
    assert e.dtype == dtype and f.dtype == dtype
    assert_close_rel(e, e_ref, REL[dtype], f"{name} energy")
    assert_close_rel(f, f_ref, REL[dtype], f"{name} forces")


def test_cpu_energy_forces_keep_leading_batch_shape_and_blocks() -> None:
    import boltzlab.kernels.cpu as cpu

    pot = lj55()
    x = cluster(pot, 6, seed=9, jitter=0.2).reshape(2, 3, 165)
    old = cpu.EAGER_PAIRS_PER_BLOCK
    cpu.EAGER_PAIRS_PER_BLOCK = 4 * pot.n * (pot.n - 1) // 2  # 4 configurations per block: a ragged last block
    try:
        e, f = lj_energy_forces(pot, x, compile=False)
    finally:
        cpu.EAGER_PAIRS_PER_BLOCK = old
    e_ref, f_ref = pot.energy_and_forces(x)
    assert e.shape == (2, 3) and f.shape == (2, 3, 165)
    assert_close_rel(e, e_ref, 1e-12, "energy")
    assert_close_rel(f, f_ref, 1e-12, "forces")


SCORE_CASES = [  # name, B, K, block_points, block_copies: ragged in B and in K, K across noise chunks
    ("dw4", 5, 37, 2, 8),
    ("lj13", 7, 150, 3, 16),
    ("lj_standard_7_tethered", 4, 64, None, None),
    ("lj22_benchmark", 3, 70, 2, 4),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,batch,k,points,copies", SCORE_CASES)
def test_cpu_score_matches_reference_with_explicit_noise(
    name: str, batch: int, k: int, points: int | None, copies: int | None, dtype: torch.dtype
) -> None:
    pot = POTENTIALS[name]
    x = cluster(pot, batch, seed=10, dtype=dtype)
    sigma = torch.linspace(0.0, 0.3, batch, dtype=dtype)
    noise = torch.randn(batch, k, pot.dim, generator=torch.Generator().manual_seed(11), dtype=dtype)
    fast = mc_score_estimate(pot, x, sigma, noise=noise, compile=False, block_points=points, block_copies=copies)
    ref = reference_score_estimate(pot, x, sigma, noise)
    assert_close_rel(fast.score, ref.score, 10 * REL[dtype], "score")
    assert_close_rel(fast.log_normalizer, ref.log_normalizer, REL[dtype], "log normaliser")
    assert_close_rel(fast.ess, ref.ess, 10 * REL[dtype], "ESS")
    check_weights_sum_to_one(fast, pot, x, sigma, noise)
    assert fast.n_energy_evals == batch * k
    # the noise form rides on the same pass without changing the force form
    both = mc_score_estimate(pot, x, sigma, noise=noise, compile=False, block_points=points, block_copies=copies,
                             noise_form=True)
    assert fast.noise_score is None
    assert torch.equal(both.score, fast.score), "asking for the noise form must not change the force form"
    check_noise_form(both, ref, sigma, 10 * REL[dtype], f"{name} noise form")
    # the noise form is centre-of-mass free, like the noise it averages
    live = sigma > 0
    com = both.noise_score[live].reshape(int(live.sum()), pot.n, pot.d_space).sum(1)
    assert com.abs().max() <= 1e3 * torch.finfo(dtype).eps * both.noise_score[live].abs().max()


def check_noise_form(est, ref, sigma: Tensor, rel: float, what: str) -> None:
    """The noise form sum_k w_k eps_k / sigma against the reference's: equal where sigma > 0,
    NaN in both where sigma = 0 (0/0)."""
    assert est.noise_score is not None and ref.noise_score is not None
    live = sigma > 0
    assert torch.isnan(est.noise_score[~live]).all() and torch.isnan(ref.noise_score[~live]).all()
    assert_close_rel(est.noise_score[live], ref.noise_score[live], rel, what)


def test_noise_form_by_hand_and_generic_energy() -> None:
    """sum_k softmax_k(l) eps_k / sigma written out for a GMM (no projection), and the streamed
    generic path against the reference with generator noise."""
    gmm = GaussianMixture()
    x = gmm.sample(5, generator=torch.Generator().manual_seed(30), dtype=F64)
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64)
    eps = torch.randn(5, 90, 2, generator=torch.Generator().manual_seed(31), dtype=F64)
    log_w = -gmm.energy(x[:, None] + sigma[:, None, None] * eps) / gmm.kT
    by_hand = (torch.softmax(log_w, 1)[..., None] * eps).sum(1) / sigma[:, None]
    est = mc_score_estimate(gmm, x, sigma, noise=eps, noise_form=True, block_points=2)
    assert_close_rel(est.noise_score, by_hand, 1e-12, "GMM noise form by hand")
    streamed = mc_score_estimate(gmm, x, sigma, 150, generator=torch.Generator().manual_seed(32), noise_form=True)
    ref = mc_score_estimate(gmm, x, sigma, 150, generator=torch.Generator().manual_seed(32), backend="reference")
    assert_close_rel(streamed.noise_score, ref.noise_score, 1e-12, "GMM streamed noise form")
    assert_close_rel(streamed.score, ref.score, 1e-12, "GMM streamed force form")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_noise_form_is_stable_for_overlapping_particles(dtype: torch.dtype) -> None:
    pot, x, sigma, noise = overlap_inputs(dtype)
    est = mc_score_estimate(pot, x, sigma, noise=noise, compile=False, block_copies=8, noise_form=True)
    check_overlap_estimate(est, pot, x, sigma, noise)
    ref = reference_score_estimate(pot, x.to(F64), sigma.to(F64), noise.to(F64))
    check_noise_form(est, ref, sigma, 10 * REL[dtype], "overlap noise form")


def test_generator_noise_is_the_same_on_every_path() -> None:
    pot = lj13()
    x = cluster(pot, 6, seed=12)
    k = 2 * NOISE_CHUNK + 9
    runs = {
        backend: mc_score_estimate(pot, x, 0.2, k, generator=torch.Generator().manual_seed(13),
                                   backend=backend, compile=False)
        for backend in ("reference", "torch")
    }
    explicit = draw_noise(pot, 6, k, generator=torch.Generator().manual_seed(13), dtype=F64)
    by_hand = reference_score_estimate(pot, x, 0.2, explicit)
    assert_close_rel(runs["torch"].score, runs["reference"].score, 1e-10, "torch vs reference")
    assert_close_rel(runs["reference"].score, by_hand.score, 1e-12, "draw_noise")
    different = mc_score_estimate(pot, x, 0.2, k, generator=torch.Generator().manual_seed(14), compile=False)
    assert (different.score - runs["torch"].score).abs().max() > 1e-3, "another seed must give other noise"


def test_generic_energy_streams_like_the_reference() -> None:
    gmm = GaussianMixture()
    x = gmm.sample(10, generator=torch.Generator().manual_seed(15), dtype=F64)
    est = mc_score_estimate(gmm, x, 2.0, 100, generator=torch.Generator().manual_seed(16), block_points=3)
    ref = mc_score_estimate(gmm, x, 2.0, 100, generator=torch.Generator().manual_seed(16), backend="reference")
    assert_close_rel(est.score, ref.score, 1e-12, "GMM score")
    # large K: the estimator approaches grad log (p * N(0, sigma^2)), known exactly for a mixture
    wide = GaussianMixture(std=math.sqrt(gmm.std**2 + 2.0**2))
    big = mc_score_estimate(gmm, x[:3], 2.0, 20_000, generator=torch.Generator().manual_seed(17))
    assert_close_rel(big.score, wide.score(x[:3]), 0.05, "K -> infinity limit")


def overlap_inputs(dtype: torch.dtype) -> tuple[PairPotential, Tensor, Tensor, Tensor]:
    """LJ-13 points with overlapping particles: every copy has energies around 1e24 or more."""
    pot = lj13()
    x = cluster(pot, 3, seed=18).reshape(3, 13, 3)
    x[0, 1] = x[0, 0]  # exactly coincident
    x[1, 2] = x[1, 3] + 1e-3
    x[2, :4] = x[2, 4]  # five particles on one spot
    x = x.reshape(3, 39).to(dtype)
    sigma = torch.tensor([0.0, 1e-3, 3e-3], dtype=dtype)
    noise = torch.randn(3, 45, 39, generator=torch.Generator().manual_seed(19), dtype=dtype)
    return pot, x, sigma, noise


def check_overlap_estimate(est, pot: PairPotential, x: Tensor, sigma: Tensor, noise: Tensor) -> None:
    """No NaN/inf, ESS in [1, K], and agreement with the reference in relative terms.

    With energies of 1e24 two correct implementations differ by about 1e24 * machine epsilon
    in every log-weight, so weights are compared through relative quantities, not exp() of
    differences (see :func:`check_weights_sum_to_one` for ordinary energies).
    """
    for field in ("score", "log_normalizer", "ess"):
        value = getattr(est, field)
        assert torch.isfinite(value).all(), f"{field} has NaN or inf: {value}"
    k = noise.shape[1]
    assert (est.log_normalizer < -1e20).all(), "energies of overlapping particles are huge"
    assert ((est.ess >= 1.0 - 1e-4) & (est.ess <= k * (1 + 1e-4))).all(), est.ess
    assert est.ess[0].item() == pytest.approx(k, rel=1e-4), "sigma = 0: identical copies, uniform weights"
    ref = reference_score_estimate(pot, x.to(F64), sigma.to(F64), noise.to(F64))
    rel = REL[x.dtype]
    assert_close_rel(est.log_normalizer, ref.log_normalizer, rel, "overlap log normaliser")
    assert_close_rel(est.score, ref.score, 10 * rel, "overlap score")


def check_weights_sum_to_one(est, pot: PairPotential, x: Tensor, sigma: Tensor, noise: Tensor) -> None:
    """The estimator's log-normaliser normalises the reference weights: sum_k exp(l_k - log Z) = 1."""
    log_w = reference_log_weights(pot, x.to(F64), sigma.to(F64), noise.to(F64))
    log_z = est.log_normalizer.to(F64) + math.log(noise.shape[1])
    total = torch.exp(log_w - log_z[:, None]).sum(1)
    tol = 1e-9 if x.dtype == F64 else 1e-3
    assert torch.allclose(total, torch.ones_like(total), rtol=tol, atol=0), total


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_cpu_score_is_stable_for_overlapping_particles(dtype: torch.dtype) -> None:
    pot, x, sigma, noise = overlap_inputs(dtype)
    est = mc_score_estimate(pot, x, sigma, noise=noise, compile=False, block_copies=8)
    check_overlap_estimate(est, pot, x, sigma, noise)


@pytest.mark.slow
def test_compiled_cpu_path_matches_eager() -> None:
    import boltzlab.kernels.cpu as cpu

    pot = lj13()
    x = cluster(pot, 16, seed=20, dtype=F32)
    a, b = (
        mc_score_estimate(pot, x, 0.1, 80, generator=torch.Generator().manual_seed(21), compile=compile,
                          block_points=8, block_copies=8)
        for compile in (True, False)
    )
    assert cpu.compile_available(), "torch.compile failed, so nothing compiled was tested"
    assert_close_rel(a.score, b.score, 1e-4, "compiled vs eager score")
    e, f = lj_energy_forces(pot, x, compile=True)
    e_ref, f_ref = dense_pair_energy_forces(pot, x)
    assert_close_rel(f, f_ref, 1e-4, "compiled forces")


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    pot = lj13()
    x = cluster(pot, 2, seed=22)
    with pytest.raises(ScoreInputError, match="sigma must be finite and >= 0"):
        mc_score_estimate(pot, x, -0.1, 4)
    with pytest.raises(ScoreInputError, match="sigma must be a scalar or have shape"):
        mc_score_estimate(pot, x, torch.ones(3, dtype=F64), 4)
    with pytest.raises(ScoreInputError, match="either noise or a generator"):
        mc_score_estimate(pot, x, 0.1, noise=torch.zeros(2, 3, 39), generator=torch.Generator())
    with pytest.raises(ScoreInputError, match=r"noise must have shape \(2, K, 39\)"):
        mc_score_estimate(pot, x, 0.1, noise=torch.zeros(2, 3, 38))
    with pytest.raises(ScoreInputError, match="n_samples must be a positive int"):
        mc_score_estimate(pot, x, 0.1, 0)
    with pytest.raises(ScoreInputError, match=r"x_t must have shape \(B, 39\)"):
        mc_score_estimate(pot, x[0], 0.1, 4)
    with pytest.raises(ValueError, match="expected shape"):
        mc_score_estimate(pot, x[:, :10], 0.1, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        mc_score_estimate(pot, x, 0.1, 4, backend="cuda")
    with pytest.raises(ValueError, match="pair potentials only"):
        mc_score_estimate(GaussianMixture(), torch.zeros(2, 2), 0.1, 4, backend="triton")
    with pytest.raises(ValueError, match="block_copies dividing 64"):
        mc_score_estimate(pot, x, 0.1, 4, block_copies=3)
    with pytest.raises(TypeError, match="needs a boltzlab.energies.PairPotential"):
        lj_energy_forces(GaussianMixture(), torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("this process runs Triton's interpreter")
        mc_score_estimate(pot, x, 0.1, 4, backend="triton")


# ----------------------------------------------------------------------------------------
# Triton kernels under the interpreter (one child process for all cases)
# ----------------------------------------------------------------------------------------

TRITON_ENERGY_CASES = [(name, dtype) for name in POTENTIALS for dtype in (F32, F64)] + [("lj55", F32)]
TRITON_SCORE_CASES = [(case, dtype) for case in SCORE_CASES for dtype in (F32, F64)]


def _energy_inputs(name: str, dtype: torch.dtype) -> tuple[PairPotential, Tensor]:
    pot = lj55() if name == "lj55" else POTENTIALS[name]
    return pot, cluster(pot, 11, seed=23, jitter=0.2, dtype=dtype)


def _score_inputs(case: tuple, dtype: torch.dtype) -> tuple[PairPotential, Tensor, Tensor, Tensor]:
    name, batch, k, _, _ = case
    pot = POTENTIALS[name]
    x = cluster(pot, batch, seed=24, dtype=dtype)
    sigma = torch.linspace(0.0, 0.3, batch, dtype=dtype)
    noise = torch.randn(batch, k, pot.dim, generator=torch.Generator().manual_seed(25), dtype=dtype)
    return pot, x, sigma, noise


@pytest.fixture(scope="module")
def triton_results() -> dict[str, object]:
    """Run every Triton case in one interpreter process; map case id -> result."""
    pytest.importorskip("triton")
    calls, ids = [], []
    for name, dtype in TRITON_ENERGY_CASES:
        pot, x = _energy_inputs(name, dtype)
        calls.append({"fn": "lj_energy_forces", "energy": pot, "args": (x,)})
        ids.append(f"energy-{name}-{dtype}")
    for case, dtype in TRITON_SCORE_CASES:
        pot, x, sigma, noise = _score_inputs(case, dtype)
        triton_points = 2 if case[3] else None  # Triton tiles are powers of two; 2 leaves B ragged
        calls.append({"fn": "mc_score_estimate", "energy": pot, "args": (x, sigma),
                      "kwargs": {"noise": noise, "block_points": triton_points, "block_copies": case[4]}})
        ids.append(f"score-{case[0]}-{dtype}")
    pot = lj13()
    x = cluster(pot, 6, seed=12)
    calls.append({"fn": "mc_score_estimate", "energy": pot, "args": (x, 0.2, 2 * NOISE_CHUNK + 9),
                  "kwargs": {"generator": torch.Generator().manual_seed(13), "noise_form": True}})
    ids.append("generator")
    for dtype in (F32, F64):
        pot, x, sigma, noise = overlap_inputs(dtype)
        calls.append({"fn": "mc_score_estimate", "energy": pot, "args": (x, sigma),
                      "kwargs": {"noise": noise, "block_copies": 16}})
        ids.append(f"overlap-{dtype}")
    for case in SCORE_CASES[:2]:
        for dtype in (F32, F64):
            pot, x, sigma, noise = _score_inputs(case, dtype)
            calls.append({"fn": "mc_score_estimate", "energy": pot, "args": (x, sigma),
                          "kwargs": {"noise": noise, "noise_form": True}})
            ids.append(f"noise-form-{case[0]}-{dtype}")

    results = run_interpreted(calls, timeout=300)
    return dict(zip(ids, results))


def _result(results: dict[str, object], key: str) -> object:
    value = results[key]
    if isinstance(value, str):
        pytest.fail(f"the Triton call {key} raised in the interpreter:\n{value}")
    return value


@pytest.mark.kernels
@pytest.mark.parametrize("name,dtype", TRITON_ENERGY_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_energy_forces_match_reference(triton_results: dict, name: str, dtype: torch.dtype) -> None:
    pot, x = _energy_inputs(name, dtype)
    e, f = _result(triton_results, f"energy-{name}-{dtype}")
    e_ref, f_ref = dense_pair_energy_forces(pot, x)
    assert e.dtype == dtype
    assert_close_rel(e, e_ref, REL[dtype], f"{name} energy")
    assert_close_rel(f, f_ref, REL[dtype], f"{name} forces")


@pytest.mark.kernels
@pytest.mark.parametrize("case,dtype", TRITON_SCORE_CASES, ids=lambda v: str(v[0] if isinstance(v, tuple) else v).replace("torch.", ""))
def test_triton_score_matches_reference(triton_results: dict, case: tuple, dtype: torch.dtype) -> None:
    pot, x, sigma, noise = _score_inputs(case, dtype)
    est = _result(triton_results, f"score-{case[0]}-{dtype}")
    ref = reference_score_estimate(pot, x, sigma, noise)
    assert_close_rel(est.score, ref.score, 10 * REL[dtype], "score")
    assert_close_rel(est.log_normalizer, ref.log_normalizer, REL[dtype], "log normaliser")
    assert_close_rel(est.ess, ref.ess, 10 * REL[dtype], "ESS")
    check_weights_sum_to_one(est, pot, x, sigma, noise)
    assert est.n_energy_evals == case[1] * case[2]


@pytest.mark.kernels
def test_triton_generator_noise_matches_the_reference(triton_results: dict) -> None:
    pot = lj13()
    x = cluster(pot, 6, seed=12)
    est = _result(triton_results, "generator")
    ref = mc_score_estimate(pot, x, 0.2, 2 * NOISE_CHUNK + 9, generator=torch.Generator().manual_seed(13),
                            backend="reference")
    assert_close_rel(est.score, ref.score, 1e-10, "score with generator noise")
    assert_close_rel(est.noise_score, ref.noise_score, 1e-10, "noise form with generator noise")


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_triton_score_is_stable_for_overlapping_particles(triton_results: dict, dtype: torch.dtype) -> None:
    pot, x, sigma, noise = overlap_inputs(dtype)
    est = _result(triton_results, f"overlap-{dtype}")
    check_overlap_estimate(est, pot, x, sigma, noise)


@pytest.mark.kernels
@pytest.mark.parametrize("case", SCORE_CASES[:2], ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_triton_noise_form_matches_the_reference(triton_results: dict, case: tuple, dtype: torch.dtype) -> None:
    pot, x, sigma, noise = _score_inputs(case, dtype)
    est = _result(triton_results, f"noise-form-{case[0]}-{dtype}")
    ref = reference_score_estimate(pot, x, sigma, noise)
    assert_close_rel(est.score, ref.score, 10 * REL[dtype], "score next to the noise form")
    check_noise_form(est, ref, sigma, 10 * REL[dtype], "Triton noise form")


def test_interpreter_variable_does_not_leak_into_this_process(triton_results: dict) -> None:
    assert os.environ.get("TRITON_INTERPRET") == _TRITON_INTERPRET_AT_IMPORT


# ----------------------------------------------------------------------------------------
# The appendix exercise's check (boltzlab.grading.checks_appendix)
# ----------------------------------------------------------------------------------------


def _correct_update(m, s, acc, log_w, values):
    """The appendix exercise answered by hand: inside the check the package's
    online_lse_update refuses to run (a learner must write it)."""
    new_m = torch.maximum(m, log_w.amax(1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))  # padding-only rows: -inf stays
    scale = torch.exp(m - shift)
    w = torch.exp(log_w - shift[:, None])
    return new_m, s * scale + w.sum(1), acc * scale[:, None] + (w[:, :, None] * values).sum(1)


def _packaged_update(m, s, acc, log_w, values):
    from boltzlab.kernels.online_lse import online_lse_update

    new_m, new_s, _, new_acc = online_lse_update(m, s, torch.zeros_like(s), acc, log_w, values)
    return new_m, new_s, new_acc


def _update_without_rescale(m, s, acc, log_w, values):
    new_m = torch.maximum(m, log_w.amax(1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    w = torch.exp(log_w - shift[:, None])
    return new_m, s + w.sum(1), acc + (w[..., None] * values).sum(1)


def _update_rescaling_s_only(m, s, acc, log_w, values):
    new_m = torch.maximum(m, log_w.amax(1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    w = torch.exp(log_w - shift[:, None])
    return new_m, s * torch.exp(m - shift) + w.sum(1), acc + (w[..., None] * values).sum(1)


def _update_without_max(m, s, acc, log_w, values):  # exponentiates l_k directly
    w = torch.exp(log_w)
    return torch.zeros_like(m), s + w.sum(1), acc + (w[..., None] * values).sum(1)


def _update_nan_on_padding(m, s, acc, log_w, values):  # no finite shift when m_new = -inf
    new_m = torch.maximum(m, log_w.amax(1))
    rescale = torch.exp(m - new_m)
    w = torch.exp(log_w - new_m[:, None])
    return new_m, s * rescale + w.sum(1), acc * rescale[:, None] + (w[..., None] * values).sum(1)


def test_appendix_check_passes_a_correct_update(capsys: pytest.CaptureFixture) -> None:
    from boltzlab.grading.checks_appendix import check_online_update

    check_online_update(_correct_update)
    assert "All checks passed" in capsys.readouterr().out


def test_appendix_check_refuses_the_packaged_update() -> None:
    from boltzlab.grading.checks_appendix import check_online_update
    from boltzlab.grading.feedback import CheckFailed

    with pytest.raises(CheckFailed, match="calls boltzlab.kernels.online_lse.online_lse_update.*write it yourself"):
        check_online_update(_packaged_update)


@pytest.mark.parametrize("wrong,message", [
    (_update_without_rescale, "multiply s and acc by exp\\(m_old - m_new\\)"),
    (_update_rescaling_s_only, "but not acc"),
    (_update_without_max, "every exp\\(l_k\\) underflowed"),
    (_update_nan_on_padding, "block made only of padding"),
])
def test_appendix_check_names_the_mistake(wrong, message: str) -> None:
    from boltzlab.grading.checks_appendix import check_online_update
    from boltzlab.grading.feedback import CheckFailed

    with pytest.raises(CheckFailed, match=message):
        check_online_update(wrong)


def test_appendix_check_reports_untouched_and_malformed_answers() -> None:
    from boltzlab.grading.checks_appendix import check_online_update
    from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_online_update(untouched)
    with pytest.raises(CheckFailed, match="should return a tuple"):
        check_online_update(lambda m, s, acc, log_w, values: acc)
    with pytest.raises(CheckFailed, match="has shape"):
        check_online_update(lambda m, s, acc, log_w, values: (m, s, acc.sum(1)))

"""Tests of boltzlab.metrics against analytic values, exact samples and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, wasserstein_distance

from boltzlab import metrics as M
from boltzlab.energies import DoubleWell2D, GaussianMixture, dw4, lj13


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_quantile_grid(n: int, mean: float, std: float) -> torch.Tensor:
    """n values at the mid-quantiles (i + 1/2)/n of N(mean, std^2): a deterministic 'sample'."""
    u = (np.arange(n) + 0.5) / n
    return torch.from_numpy(mean + std * norm.ppf(u))


# ----------------------------------------------------------------------------- 1-D W2


@pytest.mark.parametrize("n_a, n_b", [(4000, 4000), (3000, 5000)])
def test_w2_between_gaussians_matches_closed_form(n_a, n_b):
    # W2(N(m1, s1^2), N(m2, s2^2)) = sqrt((m1 - m2)^2 + (s1 - s2)^2)
    m1, s1, m2, s2 = 1.0, 0.5, -2.0, 2.0
    a = gaussian_quantile_grid(n_a, m1, s1)
    b = gaussian_quantile_grid(n_b, m2, s2)
    exact = math.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)
    assert M.energy_w2(a, b) == pytest.approx(exact, rel=2e-3)


def test_w2_of_random_gaussian_samples_matches_closed_form():
    g = gen(1)
    a = 3.0 + 1.0 * torch.randn(200_000, generator=g)
    b = 0.0 + 2.0 * torch.randn(150_000, generator=g)
    assert M.energy_w2(a, b) == pytest.approx(math.sqrt(9.0 + 1.0), rel=5e-3)


def test_w2_of_a_shifted_copy_is_the_shift_exactly():
    a = torch.randn(1000, generator=gen(2), dtype=torch.float64)
    for c in (0.0, 0.37, -5.0):
        assert M.energy_w2(a, a + c) == pytest.approx(abs(c), abs=1e-12)


def test_w2_is_order_invariant_and_symmetric():
    a = torch.randn(301, generator=gen(3))
    b = torch.randn(177, generator=gen(4)) * 2
    perm = torch.randperm(301, generator=gen(5))
    assert M.energy_w2(a, b) == pytest.approx(M.energy_w2(a[perm], b), abs=1e-12)
    assert M.energy_w2(a, b) == pytest.approx(M.energy_w2(b, a), abs=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_unequal_sizes_match_brute_force_replication(p):
    # n = 6 and m = 4: repeating each value of a twice and of b three times gives two
    # equal-size sets (12 values) with the same distributions, where W_p is a sorted match
    a = torch.randn(6, generator=gen(6), dtype=torch.float64)
    b = torch.randn(4, generator=gen(7), dtype=torch.float64) + 0.5
    a_rep = torch.sort(a.repeat_interleave(2)).values
    b_rep = torch.sort(b.repeat_interleave(3)).values
    brute = float(((a_rep - b_rep).abs() ** p).mean() ** (1 / p))
    assert M.wasserstein_1d(a, b, p=p) == pytest.approx(brute, abs=1e-12)


def test_w1_matches_scipy_for_unequal_sizes():
    a = torch.randn(123, generator=gen(8), dtype=torch.float64)
    b = torch.rand(457, generator=gen(9), dtype=torch.float64) * 3
    assert M.wasserstein_1d(a, b, p=1) == pytest.approx(wasserstein_distance(a.numpy(), b.numpy()), rel=1e-10)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_quantile_bands_add_up_to_w_p(p):
    a = torch.randn(123, generator=gen(20), dtype=torch.float64)
    b = torch.randn(457, generator=gen(21), dtype=torch.float64).exp()
    bands = M.wasserstein_1d_by_quantile(a, b, edges=(0.0, 0.013, 0.5, 0.77, 0.999, 1.0), p=p)
    assert sum(band.wp_p for band in bands) == pytest.approx(M.wasserstein_1d(a, b, p=p) ** p, rel=1e-12)
    assert sum(band.share for band in bands) == pytest.approx(1.0, abs=1e-12)
    # the signed band means integrate to the difference of the means (∫ F^-1 du is the mean)
    assert sum(band.mean_difference * (band.hi - band.lo) for band in bands) == pytest.approx(
        float(a.mean() - b.mean()), abs=1e-12)


def test_quantile_bands_of_a_shift_and_of_one_outlier_by_hand():
    a = torch.randn(400, generator=gen(22), dtype=torch.float64)
    for band in M.wasserstein_1d_by_quantile(a, a + 0.3):  # a shift: every band, in proportion to its width
        assert band.wp_p == pytest.approx(0.09 * (band.hi - band.lo), rel=1e-12)
        assert band.mean_difference == pytest.approx(-0.3, rel=1e-12)
    # one value of four moved by 10: W2^2 = 100 / 4, all of it in the top quarter of quantile levels
    x, y = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, 13.0])
    bands = M.wasserstein_1d_by_quantile(x, y, edges=(0.0, 0.5, 0.75, 1.0))
    assert [(b.wp_p, b.share, b.mean_difference) for b in bands] == [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0),
                                                                     (25.0, 1.0, -10.0)]
    # an edge inside a quantile step cuts it: 0.8 leaves 0.05 of the last step below and 0.2 above
    low, high = M.wasserstein_1d_by_quantile(x, y, edges=(0.0, 0.8, 1.0))
    assert (low.wp_p, high.wp_p) == (pytest.approx(5.0), pytest.approx(20.0))
    with pytest.raises(ValueError, match="edges must increase from 0 to 1"):
        M.wasserstein_1d_by_quantile(x, y, edges=(0.0, 0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="edges must increase from 0 to 1"):
        M.wasserstein_1d_by_quantile(x, y, edges=(0.1, 1.0))


def test_cluster_radius_of_a_square_and_of_a_square_with_one_particle_moved_out():
    square = torch.tensor([[0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0]])
    moved = square.clone()
    moved[0, 4:6] = torch.tensor([6.0, 6.0])  # centroid (2, 2): that particle is 4 sqrt(2) from it
    radius = M.cluster_radius(torch.cat([square, moved, square + 7.0]), 4, 2)
    torch.testing.assert_close(radius, torch.tensor([math.sqrt(2), 4 * math.sqrt(2), math.sqrt(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 8\)"):
        M.cluster_radius(torch.zeros(3, 9), 4, 2)
    # squares of side 2s have radius s sqrt 2: of s = 1, 2, 3, 4 above the 50% level (2.5 sqrt 2) lie 3 and 4
    reference = torch.cat([square * s for s in (1.0, 2.0, 3.0, 4.0)])
    assert M.share_beyond_radius(torch.cat([square * 3.0, square, square]), reference, 4, 2, level=0.5) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="level must lie in"):
        M.share_beyond_radius(square, reference, 4, 2, level=1.0)


def test_distance_w2_by_quantile_adds_up_to_distance_w2():
    x = torch.randn(50, 39, generator=gen(23), dtype=torch.float64)
    y = 1.1 * torch.randn(70, 39, generator=gen(24), dtype=torch.float64)
    bands = M.distance_w2_by_quantile(x, y, 13, 3)
    assert [(b.lo, b.hi) for b in bands] == list(zip(M.DISTANCE_QUANTILE_EDGES, M.DISTANCE_QUANTILE_EDGES[1:]))
    assert sum(b.wp_p for b in bands) == pytest.approx(M.distance_w2(x, y, 13, 3) ** 2, rel=1e-12)
    assert all(b.mean_difference < 0 for b in bands)  # y is x stretched: every band of distances is longer


def test_energy_w2_rejects_nan_inf_and_empty_with_counts():
    e = torch.randn(10)
    bad = e.clone()
    bad[[1, 4]] = float("nan")
    bad[7] = float("inf")
    with pytest.raises(ValueError, match=r"3 of 10 energies are not finite \(2 NaN, 1 inf\)"):
        M.energy_w2(bad, e)
    with pytest.raises(ValueError, match="e_b: no energies"):
        M.energy_w2(e, torch.empty(0))
    with pytest.raises(ValueError, match="p must be"):
        M.wasserstein_1d(e, e, p=0.5)


# ----------------------------------------------------------------------------- distances


def test_interatomic_distances_of_a_unit_square():
    square = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    d = torch.sort(M.interatomic_distances(square, 4, 2)).values
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, math.sqrt(2), math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(d, expected)


def test_interatomic_distances_match_the_energy_module():
    lj = lj13()
    x = torch.randn(5, lj.dim, generator=gen(10))
    torch.testing.assert_close(
        M.interatomic_distances(x, 13, 3), lj.pair_distances(x).reshape(-1).double()
    )


def test_interatomic_distances_reject_wrong_shape():
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 8\)"):
        M.interatomic_distances(torch.zeros(3, 9), 4, 2)


def random_rotation_3d(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_distance_metrics_are_invariant_to_rotation_translation_and_relabelling():
    g = gen(11)
    x = torch.randn(200, 13, 3, generator=g, dtype=torch.float64)
    rot = random_rotation_3d(g)
    perm = torch.randperm(13, generator=g)
    y = (x @ rot.T + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))[:, perm]
    x, y = x.reshape(200, 39), y.reshape(200, 39)
    assert M.distance_w2(x, y, 13, 3) == pytest.approx(0.0, abs=1e-12)
    assert M.distance_tvd(x, y, 13, 3, bins=50) == pytest.approx(0.0, abs=1e-12)


def test_distance_w2_of_a_scaled_cluster():
    # scaling every configuration by s scales every distance by s: W2 = (s - 1) * rms(d)
    x = torch.randn(100, 8, generator=gen(12), dtype=torch.float64)
    d = M.interatomic_distances(x, 4, 2)
    expected = 0.5 * float(d.pow(2).mean().sqrt())
    assert M.distance_w2(x, 1.5 * x, 4, 2) == pytest.approx(expected, rel=1e-12)


def test_tvd_identical_disjoint_and_hand_computed():
    d = torch.rand(1000, generator=gen(13))
    assert M.distance_tvd(d, d.clone()) == 0.0
    assert M.distance_tvd(d, d + 5.0, bins=10) == pytest.approx(1.0)
    # bins [0,1), [1,2]: p = (3/4, 1/4), q = (1/4, 3/4): TVD = 0.5 (0.5 + 0.5) = 0.5
    a = torch.tensor([0.1, 0.2, 0.3, 1.5])
    b = torch.tensor([0.1, 1.2, 1.3, 1.5])
    assert M.distance_tvd(a, b, bins=2, range=(0.0, 2.0)) == pytest.approx(0.5)


def test_histogram_keeps_track_of_mass_outside_its_range():
    h = M.distance_histogram(torch.tensor([-1.0, 0.5, 0.5, 1.5, 3.0]), bins=2, range=(0.0, 2.0))
    torch.testing.assert_close(h.probs, torch.tensor([0.4, 0.2], dtype=torch.float64))
    assert (h.below, h.above) == (pytest.approx(0.2), pytest.approx(0.2))
    torch.testing.assert_close(h.density, torch.tensor([0.4, 0.2], dtype=torch.float64))
    # all mass outside a cut-off range still counts in the TVD
    a = torch.tensor([0.5, 5.0])
    b = torch.tensor([0.5, 0.5])
    assert M.distance_tvd(a, b, bins=4, range=(0.0, 1.0)) == pytest.approx(0.5)


def test_distance_histogram_of_configurations_matches_distances():
    x = dw4().remove_com(torch.randn(50, 8, generator=gen(14)))
    h_x = M.distance_histogram(x, bins=20, range=(0.0, 6.0), n_particles=4, spatial_dim=2)
    h_d = M.distance_histogram(dw4().pair_distances(x), bins=20, range=(0.0, 6.0))
    torch.testing.assert_close(h_x.probs, h_d.probs)
    assert float(h_x.probs.sum()) + h_x.below + h_x.above == pytest.approx(1.0)


# ----------------------------------------------------------------------------- x-W2


def test_x_w2_of_a_translate_is_the_translation_length():
    x = torch.randn(300, 5, generator=gen(15), dtype=torch.float64)
    c = torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    assert M.x_w2(x, x + c) == pytest.approx(float(c.norm()), rel=1e-12)


def test_x_w2_of_a_permuted_copy_is_zero():
    x = torch.randn(400, 3, generator=gen(16))
    perm = torch.randperm(400, generator=gen(17))
    assert M.x_w2(x, x[perm]) == pytest.approx(0.0, abs=1e-12)


def test_x_w2_matches_brute_force_over_all_permutations():
    a = torch.randn(6, 2, generator=gen(18), dtype=torch.float64)
    b = torch.randn(6, 2, generator=gen(19), dtype=torch.float64) + 1.0
    cost = torch.cdist(a, b).pow(2)
    best = min(sum(float(cost[i, s[i]]) for i in range(6)) for s in itertools.permutations(range(6)))
    assert M.x_w2(a, b) == pytest.approx(math.sqrt(best / 6), rel=1e-12)


def test_x_w2_in_one_dimension_equals_the_sorted_1d_w2():
    a = torch.randn(500, 1, generator=gen(20), dtype=torch.float64)
    b = 2 * torch.randn(500, 1, generator=gen(21), dtype=torch.float64) + 1
    assert M.x_w2(a, b) == pytest.approx(M.wasserstein_1d(a, b), rel=1e-10)


def test_x_w2_subsamples_reproducibly_with_a_generator():
    a = torch.randn(300, 2, generator=gen(22))
    b = torch.randn(700, 2, generator=gen(23))
    w = M.x_w2(a, b, generator=gen(0))
    assert w == M.x_w2(a, b, generator=gen(0))
    assert M.x_w2(a, b, max_samples=100, generator=gen(0)) > 0
    with pytest.raises(ValueError, match="different dimensions"):
        M.x_w2(a, torch.zeros(5, 3))


def test_x_w2_saturates_in_high_dimension():
    # two independent sets from the SAME distribution: near 0 in 2-D, far from 0 in 39-D
    g = gen(34)
    low = M.x_w2(torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g))
    high = M.x_w2(torch.randn(1000, 39, generator=g), torch.randn(1000, 39, generator=g))
    assert low < 0.3
    assert high > 0.6 * math.sqrt(2 * 39)


# ----------------------------------------------------------------------------- weights


def test_kish_ess_limits():
    n = 1000
    assert M.kish_ess(torch.zeros(n)) == pytest.approx(n)
    assert M.normalized_ess(torch.full((n,), -3.7)) == pytest.approx(1.0)
    dominant = torch.zeros(n)
    dominant[17] = 100.0
    assert M.kish_ess(dominant) == pytest.approx(1.0)
    # k equal weights and the rest zero: ESS = k
    lw = torch.full((n,), -math.inf)
    lw[:10] = 0.0
    assert M.kish_ess(lw) == pytest.approx(10.0)


def test_kish_ess_is_shift_invariant_and_finite_for_huge_log_weights():
    lw = torch.randn(2000, generator=gen(24), dtype=torch.float64)
    ess = M.kish_ess(lw)
    assert M.kish_ess(lw + 1e4) == pytest.approx(ess, rel=1e-9)
    assert M.kish_ess(lw - 1e4) == pytest.approx(ess, rel=1e-9)
    assert math.isfinite(M.kish_ess(1e4 * lw))


def test_kish_ess_of_lognormal_weights():
    # log w ~ N(0, s^2): E[w]^2 / E[w^2] = exp(s^2) / exp(2 s^2) = exp(-s^2)
    s = 0.5
    lw = s * torch.randn(200_000, generator=gen(25), dtype=torch.float64)
    assert M.normalized_ess(lw) == pytest.approx(math.exp(-s**2), rel=0.01)


def test_self_normalized_weights():
    lw = torch.tensor([0.0, math.log(3.0), -math.inf], dtype=torch.float32)
    w = M.self_normalized_weights(lw + 500.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75, 0.0]))


def gaussian_importance_log_weights(n: int, g: torch.Generator, s_q: float = 1.5) -> torch.Tensor:
    """Unnormalised target exp(-x^2/2) (Z = sqrt(2 pi)), proposal N(0, s_q^2)."""
    x = s_q * torch.randn(n, generator=g, dtype=torch.float64)
    log_q = -0.5 * (x / s_q) ** 2 - math.log(s_q * math.sqrt(2 * math.pi))
    return -0.5 * x**2 - log_q


def test_log_z_estimate_of_a_gaussian_and_its_standard_error():
    log_z = 0.5 * math.log(2 * math.pi)
    est, se = M.log_z_estimate(gaussian_importance_log_weights(20_000, gen(26)))
    assert 0 < se < 0.02
    assert abs(est - log_z) < 4 * se
    # the delta-method SE must describe the spread over independent repetitions
    g = gen(27)
    repeats = torch.tensor([M.log_z_estimate(gaussian_importance_log_weights(2000, g))[0] for _ in range(200)])
    _, se_one = M.log_z_estimate(gaussian_importance_log_weights(2000, gen(28)))
    assert float(repeats.std()) == pytest.approx(se_one, rel=0.25)
    assert float(repeats.mean()) == pytest.approx(log_z, abs=4 * se_one / math.sqrt(200) + 1e-3)


def test_log_z_of_the_double_well_by_importance_sampling():
    # proposal: N(0, diag(2^2, 1)); exact log Z by quadrature in energies.py
    target = DoubleWell2D()
    g = gen(29)
    scale = torch.tensor([2.0, 1.0], dtype=torch.float64)
    x = torch.randn(50_000, 2, generator=g, dtype=torch.float64) * scale
    log_q = (-0.5 * (x / scale) ** 2).sum(-1) - math.log(2 * math.pi * 2.0)
    log_w = target.log_prob(x) - log_q
    est, se = M.log_z_estimate(log_w)
    assert abs(M.log_z_error(log_w, target.log_z())) < max(4 * se, 1e-3)
    assert est == pytest.approx(target.log_z(), abs=0.05)


def test_exact_importance_weights_give_exact_log_z_with_zero_error():
    est, se = M.log_z_estimate(torch.full((100,), 2.5))
    assert est == pytest.approx(2.5, abs=1e-12) and se == pytest.approx(0.0, abs=1e-7)


def test_weight_functions_reject_bad_log_weights():
    with pytest.raises(ValueError, match="1 NaN and 0 \\+inf of 3"):
        M.kish_ess(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="all log-weights are -inf"):
        M.kish_ess(torch.full((4,), -math.inf))
    with pytest.raises(ValueError, match="empty"):
        M.normalized_ess(torch.empty(0))
    with pytest.raises(ValueError, match="1-D"):
        M.kish_ess(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least 2"):
        M.log_z_estimate(torch.zeros(1))


# ----------------------------------------------------------------------------- modes


def test_exact_gmm40_samples_cover_all_modes():
    gmm = GaussianMixture()
    x = gmm.sample(4000, generator=gen(30))
    n_covered, counts = M.mode_coverage(x, gmm.means, gmm.std)
    assert n_covered == 40
    # nearly every exact sample lands inside its own mode's radius (0.999 of the mass)
    assert int(counts.sum()) >= 0.99 * 4000
    # counted samples are a subset of those whose nearest mean is that mode
    assert bool((counts <= torch.bincount(gmm.nearest_mode(x), minlength=40)).all())


def isolated_gmm40_modes(min_separation_in_std: float = 5.0) -> torch.Tensor:
    gmm = GaussianMixture()
    d = torch.cdist(gmm.means, gmm.means) + 1e9 * torch.eye(gmm.n_modes)
    return torch.nonzero(d.min(dim=1).values > min_separation_in_std * gmm.std).flatten()


def test_samples_from_ten_modes_cover_exactly_those_ten():
    gmm = GaussianMixture()
    chosen = isolated_gmm40_modes()[:10]
    assert chosen.numel() == 10
    modes = chosen.repeat(200)
    x = gmm.means[modes] + gmm.std * torch.randn(2000, 2, generator=gen(31))
    n_covered, counts = M.mode_coverage(x, gmm.means, gmm.std)
    assert n_covered == 10
    covered = torch.nonzero(counts >= 0.2 * 2000 / 40).flatten()
    assert torch.equal(covered, torch.sort(chosen).values)


def test_nearly_coincident_gmm40_modes_are_covered_together():
    # GMM-40 means 22 and 29 are 1.18 apart (< 1 std): samples of one fill the other too,
    # and the metric (rightly) cannot tell them apart; 9 and 16 are within 3 std of 22 as well
    gmm = GaussianMixture()
    assert float((gmm.means[22] - gmm.means[29]).norm()) < gmm.std
    x = gmm.means[22] + gmm.std * torch.randn(1000, 2, generator=gen(33))
    n_covered, counts = M.mode_coverage(x, gmm.means, gmm.std)
    assert n_covered >= 2 and counts[22] > 100 and counts[29] > 100


def test_mode_coverage_threshold_and_radius():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    # expected share N / M = 10 / 2 = 5; min_fraction 0.2 needs 1 sample per mode
    x = torch.tensor([[0.1, 0.0]] * 9 + [[9.9, 0.0]])
    assert M.mode_coverage(x, means, 1.0)[0] == 2
    assert M.mode_coverage(x, means, 1.0, min_fraction=0.4)[0] == 1
    # a point midway (5 std from both) counts for neither mode
    x_mid = torch.tensor([[0.1, 0.0]] * 9 + [[5.0, 0.0]])
    n_covered, counts = M.mode_coverage(x_mid, means, 1.0)
    assert n_covered == 1 and counts.tolist() == [9, 0]


def test_mean_energy_with_se():
    e = torch.randn(10_000, generator=gen(32), dtype=torch.float64) * 2 + 1
    mean, se = M.mean_energy_with_se(e)
    assert se == pytest.approx(2 / 100, rel=0.05)
    assert abs(mean - 1) < 4 * se
    assert M.mean_energy_with_se(e, tau=4.0)[1] == pytest.approx(2 * se)


def test_count_transitions_core_to_core():
    # chain 0: A, -, A, B, -, B, A -> 2 switches; chain 1: -, -, B, -, A, B, B -> 2
    trace = torch.tensor([[-2.0, 0.0], [0.0, 0.1], [-2.0, 2.0], [2.0, 0.0], [0.5, -2.0], [2.0, 2.0], [-2.0, 2.0]])
    counts = M.count_transitions(trace, -1.0, 1.0)
    assert counts.tolist() == [2, 2]
    # recrossing the barrier top without reaching the other core is not a transition
    wiggle = torch.tensor([-2.0, 0.5, -0.5, 0.9, -2.0, 0.9, -2.0]).unsqueeze(-1)
    assert M.count_transitions(wiggle, -1.0, 1.0).tolist() == [0]
    with pytest.raises(ValueError, match="low < high"):
        M.count_transitions(trace, 1.0, -1.0)


def test_count_transitions_of_a_two_state_markov_chain():
    """A symmetric two-state chain that switches with probability p per step makes p (n - 1) switches."""
    g = torch.Generator().manual_seed(5)
    p, n, chains = 0.01, 20_000, 50
    flips = torch.rand(n, chains, generator=g) < p
    state = torch.cumsum(flips.long(), 0) % 2
    coord = torch.where(state == 0, -2.0, 2.0)
    total = int(M.count_transitions(coord, -1.0, 1.0).sum())
    expected = int(flips[1:].sum())
    assert total == expected


def test_score_virial_obeys_steins_identity_for_exact_scores_and_catches_a_scaled_one():
    # particles: COM-free Gaussian N(0, s^2) on the (n - 1) d free coordinates, exact score -x / s^2:
    # per sample -|x|^2 / s^2 ~ -chi^2_{36}, mean -36 = -(n - 1) d
    gen = torch.Generator().manual_seed(0)
    energy = lj13()
    x = energy.remove_com(0.7 * torch.randn(20_000, 39, generator=gen, dtype=torch.float64))
    values = M.score_virial(x, -x / 0.49, 13, 3)
    assert M.virial_expectation(39, 13, 3) == -36.0
    assert abs(float(values.mean()) + 36.0) < 4 * float(values.std()) / math.sqrt(20_000)
    # a non-Gaussian density: the 2-D GMM-40 noised to sigma = 2, exact samples and exact score
    from boltzlab.estimators import gmm_noised_score

    gmm = GaussianMixture()
    x = gmm.sample(20_000, generator=gen, dtype=torch.float64)
    x_t = x + 2.0 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    values = M.score_virial(x_t, gmm_noised_score(gmm, x_t, 2.0))
    se = float(values.std()) / math.sqrt(20_000)
    assert M.virial_expectation(2) == -2.0
    assert abs(float(values.mean()) + 2.0) < 4 * se, (float(values.mean()), se)
    # half the score breaks it by about 1 (a score that pulls too weakly)
    assert abs(float(M.score_virial(x_t, 0.5 * gmm_noised_score(gmm, x_t, 2.0)).mean()) + 1.0) < 4 * se
    # the centroid is removed: translating every particle of a configuration changes nothing
    y = torch.randn(5, 39, generator=gen, dtype=torch.float64)
    s = energy.remove_com(torch.randn(5, 39, generator=gen, dtype=torch.float64))
    assert torch.allclose(M.score_virial(y + torch.tensor([1.0, -2.0, 3.0]).repeat(13), s, 13, 3),
                          M.score_virial(y, s, 13, 3))
    with pytest.raises(M.MetricInputError, match="same shape"):
        M.score_virial(y, s[:, :30], 13, 3)
    with pytest.raises(M.MetricInputError, match="spatial_dim"):
        M.score_virial(y, s, 13)
    with pytest.raises(M.MetricInputError, match="do not make dim"):
        M.virial_expectation(39, 13, 2)
    with pytest.raises(M.MetricInputError, match="NaN or inf"):
        M.score_virial(torch.full((2, 2), float("nan")), torch.zeros(2, 2))

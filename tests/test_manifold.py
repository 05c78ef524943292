"""boltzlab.manifold against independent facts: exact densities, known dimensions, rigid motions."""

import math

import pytest
import torch

from boltzlab.energies import dw4, lj13
from boltzlab.manifold import (
    ManifoldInputError,
    StiffBond,
    distance_jacobian_rank,
    gaussian_kde_mse,
    kde_log_density,
    pca_spectrum,
    power_law_fit,
    rigid_motion_dof,
    silverman_bandwidth,
    sorted_pair_distances,
    twonn_by_scale,
    twonn_dimension,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kde_with_one_sample_is_the_kernel():
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    h = 0.7
    exact = -((y - x) ** 2).sum(1) / (2 * h * h) - math.log(2 * math.pi * h * h)
    assert torch.allclose(kde_log_density(y, x, bandwidth=h), exact, atol=1e-12)


def test_kde_converges_to_the_exact_gaussian_density():
    g = _gen(1)
    y = torch.randn(200, 2, generator=g, dtype=torch.float64)
    exact = -0.5 * (y**2).sum(1) - math.log(2 * math.pi)
    errors = []
    for n in (300, 30_000):
        est = kde_log_density(y, torch.randn(n, 2, generator=g, dtype=torch.float64))
        errors.append(float(((est - exact) ** 2).mean()))
    # with the optimal bandwidth the MSE falls like n^(-4/6): 100x the data, about 21x smaller
    assert errors[1] < 0.02 and errors[1] < errors[0] / 8, errors


def test_kde_chunks_do_not_change_the_answer():
    g = _gen(2)
    x, y = torch.randn(500, 3, generator=g), torch.randn(77, 3, generator=g)
    assert torch.allclose(kde_log_density(y, x, chunk=10), kde_log_density(y, x, chunk=1000), atol=1e-12)


def test_silverman_bandwidth_formula():
    x = torch.randn(1000, 4, generator=_gen(3), dtype=torch.float64) * 2.0
    expected = float(x.std(0).mean()) * (4 / (6 * 1000)) ** (1 / 8)
    assert silverman_bandwidth(x) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_twonn_on_a_linear_subspace(k):
    g = _gen(10 + k)
    basis, _ = torch.linalg.qr(torch.randn(12, k, generator=g, dtype=torch.float64))
    x = torch.rand(3000, k, generator=g, dtype=torch.float64) @ basis.T + 5.0
    assert twonn_dimension(x) == pytest.approx(k, rel=0.12)


def test_twonn_on_a_sphere_is_two():
    v = torch.randn(3000, 3, generator=_gen(20), dtype=torch.float64)
    assert twonn_dimension(v / v.norm(dim=1, keepdim=True)) == pytest.approx(2.0, rel=0.1)


def test_twonn_sees_a_thin_band_as_a_curve_only_at_coarse_scales():
    """A band of width 1e-3 around a line: at small scales 2-D, from far away 1-D."""
    g = _gen(21)
    x = torch.stack([torch.rand(20_000, generator=g), 1e-3 * torch.rand(20_000, generator=g)], 1).double()
    assert twonn_dimension(x) > 1.7
    assert twonn_dimension(x[:200]) < 1.3


def test_twonn_rejects_duplicates_and_bad_shapes():
    x = torch.randn(20, 3, generator=_gen(4))
    with pytest.raises(ManifoldInputError, match="duplicated"):
        twonn_dimension(torch.cat([x, x[:1]]))
    with pytest.raises(ManifoldInputError, match="at least 8 rows"):
        twonn_dimension(x[:5])
    with pytest.raises(ManifoldInputError, match=r"shape \(n, dim\)"):
        twonn_dimension(x[0])
    with pytest.raises(ManifoldInputError, match="NaN"):
        twonn_dimension(torch.full((10, 2), float("nan")))
    with pytest.raises(ManifoldInputError, match="query has dimension 2"):
        kde_log_density(x[:, :2], x)


def test_pca_spectrum_of_a_known_covariance():
    g = _gen(5)
    scales = torch.tensor([3.0, 1.0, 0.1], dtype=torch.float64)
    x = torch.randn(100_000, 3, generator=g, dtype=torch.float64) * scales
    assert torch.allclose(pca_spectrum(x), scales**2, rtol=0.03)
    flat = torch.cat([x[:, :2], x[:, :1] - x[:, 1:2]], 1)  # third column a combination: rank 2
    assert float(pca_spectrum(flat)[-1]) < 1e-10


@pytest.mark.parametrize("target, n, d, internal", [(dw4(), 4, 2, 5), (lj13(), 13, 3, 33)])
def test_distance_jacobian_rank_is_the_internal_dof(target, n, d, internal):
    x = torch.randn(n * d, generator=_gen(6), dtype=torch.float64) * 1.5
    rank, sv = distance_jacobian_rank(x, n, d)
    assert rank == internal == n * d - rigid_motion_dof(n, d)
    # the null space is the rigid motions: translating or rotating leaves the distances fixed
    assert sv.numel() == min(n * (n - 1) // 2, n * d)
    dist = sorted_pair_distances(x[None].float(), n, d)
    assert torch.allclose(dist, torch.sort(target.pair_distances(x[None].float()), dim=1).values)


def test_sorted_distances_are_invariant_to_rigid_motions_and_permutations():
    g = _gen(7)
    r = torch.randn(13, 3, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    moved = (r[torch.randperm(13, generator=g)] @ q.T + torch.tensor([1.0, -2.0, 0.5])).reshape(1, -1)
    assert torch.allclose(sorted_pair_distances(r.reshape(1, -1), 13, 3), sorted_pair_distances(moved, 13, 3))


def test_rigid_motion_dof_values_and_errors():
    assert rigid_motion_dof(4, 2) == 3 and rigid_motion_dof(13, 3) == 6
    with pytest.raises(ManifoldInputError, match="more particles than dimensions"):
        rigid_motion_dof(2, 3)


def test_stiff_bond_exact_samples_and_normalisation():
    sb = StiffBond(k_bond=400.0, k_angle=2.0)
    x = sb.sample(50_000, generator=_gen(8))
    r, theta = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])
    # bond length ~ N(1, kT/k) up to the small r-Jacobian shift; angle ~ N(0, kT/k_angle) (|θ| < π hardly cut)
    assert float(r.std()) == pytest.approx(sb.thickness, rel=0.03)
    assert float(theta.std()) == pytest.approx(math.sqrt(0.5), rel=0.03)
    # normalised: Monte Carlo of ∫ p over a box (uniform proposal) gives 1
    g = _gen(9)
    u = (torch.rand(400_000, 2, generator=g, dtype=torch.float64) - 0.5) * 2.4
    box_mass = float(sb.log_prob(u).exp().mean()) * 2.4**2
    assert box_mass == pytest.approx(1.0, abs=0.03)


def test_stiff_bond_log_likelihood_grows_like_minus_log_thickness():
    """E_p log p rises by 1/2 log 10 per decade of k_bond: no bound as the arc gets thinner."""
    means = [float(StiffBond(k_bond=k).log_prob(StiffBond(k_bond=k).sample(20_000, _gen(11))).mean())
             for k in (100.0, 10_000.0)]
    assert means[1] - means[0] == pytest.approx(math.log(10), abs=0.05)


def test_stiff_bond_rejects_bad_parameters():
    with pytest.raises(ManifoldInputError, match="k_bond"):
        StiffBond(k_bond=0.0)
    with pytest.raises(ManifoldInputError, match="2-D"):
        StiffBond().energy(torch.zeros(3, 3))


def test_power_law_fit_recovers_the_exponent():
    x = torch.tensor([10.0, 100.0, 1000.0, 1e4])
    b, log_c = power_law_fit(x, 3.0 * x**-0.4)
    assert b == pytest.approx(-0.4, abs=1e-6) and log_c == pytest.approx(math.log(3.0), abs=1e-5)
    with pytest.raises(ManifoldInputError, match="positive"):
        power_law_fit(x, -x)


def test_gaussian_kde_mse_falls_at_about_the_textbook_rate_in_one_dimension():
    sizes = (100, 1000, 10_000)
    mse = gaussian_kde_mse(1, sizes, 400, repeats=3, generator=_gen(30))
    slope, _ = power_law_fit(torch.tensor(sizes, dtype=torch.float64), mse)
    assert slope == pytest.approx(-0.8, abs=0.2), (slope, mse)


def test_gaussian_kde_median_error_is_below_the_mean_and_checked():
    g1, g2 = _gen(32), _gen(32)
    mean = gaussian_kde_mse(4, (200,), 300, generator=g1)
    median = gaussian_kde_mse(4, (200,), 300, generator=g2, statistic="median")
    assert 0 < median.item() < mean.item()  # same draws; squared errors are right-skewed
    with pytest.raises(ManifoldInputError, match="statistic"):
        gaussian_kde_mse(4, (200,), 10, statistic="max")


def test_twonn_by_scale_on_a_thin_band():
    g = _gen(31)
    x = torch.stack([torch.rand(8000, generator=g), 1e-3 * torch.rand(8000, generator=g)], 1).double()
    fine, coarse = twonn_by_scale(x, [8000, 100], generator=g).tolist()
    assert fine > 1.7 and coarse < 1.3
    with pytest.raises(ManifoldInputError, match="subset sizes"):
        twonn_by_scale(x, [4])

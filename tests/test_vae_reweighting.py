"""Joint (x, z) reweighting of a VAE, on a linear-Gaussian VAE where every density is exact."""

import math

import pytest
import torch

from boltzlab.models import VAE
from boltzlab.vae_reweighting import (
    VaeReweightingError,
    vae_joint_log_weights,
    weighted_mean,
)

W = torch.tensor([[2.0], [1.0]], dtype=torch.float64)  # decoder mean W z + b (x_dim 2, z_dim 1)
B = torch.tensor([1.0, -1.0], dtype=torch.float64)
NOISE_VAR = torch.tensor([0.3, 0.5], dtype=torch.float64)  # decoder noise, per coordinate


def linear_vae(exact_posterior: bool) -> VAE:
    """A VAE with linear maps (no hidden layers) set by hand. Its marginal is
    N(b, W Wᵀ + diag(noise)); the exact posterior is N(Σ_z Wᵀ Ψ⁻¹ (x - b), Σ_z) with
    Σ_z = (1 + Wᵀ Ψ⁻¹ W)⁻¹. ``exact_posterior=False`` gives a poor encoder: half the gain,
    twice the variance (wider than the posterior, so the weights keep a finite variance)."""
    vae = VAE.gaussian(2, 1, hidden=(), seed=0).double()
    dec, enc = vae.decoder, vae.encoder
    with torch.no_grad():
        dec.net.net[0].weight.copy_(W)
        dec.net.net[0].bias.copy_(B)
        dec.log_var.copy_(NOISE_VAR.log())
        post_var = 1.0 / (1.0 + float((W[:, 0] ** 2 / NOISE_VAR).sum()))
        gain = post_var * W[:, 0] / NOISE_VAR  # posterior mean = gain · (x - b)
        lin = enc.net.net[0]
        if not exact_posterior:
            gain, post_var = 0.5 * gain, 2.0 * post_var
        lin.weight.copy_(torch.stack([gain, torch.zeros(2, dtype=torch.float64)]))
        lin.bias.copy_(torch.tensor([-float(gain @ B), math.log(post_var)], dtype=torch.float64))
    return vae


def gaussian_log_prob(mean: torch.Tensor, cov: torch.Tensor):
    dist = torch.distributions.MultivariateNormal(mean, cov)
    return lambda x: dist.log_prob(x)


def test_weights_are_constant_when_the_vae_is_exact():
    """Target = the VAE's own marginal and encoder = exact posterior: w = p(x) p(z|x) / p(x, z) = 1."""
    vae = linear_vae(exact_posterior=True)
    marginal = gaussian_log_prob(B, W @ W.T + torch.diag(NOISE_VAR))
    jw = vae_joint_log_weights(vae, marginal, 4000, generator=torch.Generator().manual_seed(0))
    assert float(jw.log_w.std()) < 1e-10
    assert jw.ess == pytest.approx(4000, rel=1e-6)
    assert float(jw.log_w.mean()) == pytest.approx(0.0, abs=1e-8)  # normalised target: log Z = 0


@pytest.mark.parametrize("exact_posterior", [True, False])
def test_weighted_mean_converges_to_the_target_mean(exact_posterior):
    """Another Gaussian target: the reweighted mean is its mean (exact), the raw mean is b."""
    vae = linear_vae(exact_posterior)
    m = torch.tensor([2.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=torch.float64)
    jw = vae_joint_log_weights(vae, gaussian_log_prob(m, cov), 40_000, generator=torch.Generator().manual_seed(1))
    for i in range(2):
        est, se = weighted_mean(jw.x[:, i], jw.log_w)
        assert abs(est - float(m[i])) < 4 * se + 1e-3, (i, est, se)
        assert se < 0.05
        assert abs(float(jw.x[:, i].mean()) - float(m[i])) > 0.4  # unweighted: biased
    assert 100 < jw.ess < 40_000


def test_a_poor_encoder_costs_effective_sample_size():
    m, cov = torch.tensor([2.0, -0.5], dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.8
    ess = [vae_joint_log_weights(linear_vae(p), gaussian_log_prob(m, cov), 20_000,
                                 generator=torch.Generator().manual_seed(2)).ess for p in (True, False)]
    assert ess[0] > 1.5 * ess[1], ess


def test_weighted_mean_with_equal_weights_is_the_plain_mean():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est, se = weighted_mean(v, torch.full((1000,), 7.0, dtype=torch.float64))
    assert est == pytest.approx(float(v.mean()), abs=1e-12)
    assert se == pytest.approx(float(v.std(unbiased=False)) / math.sqrt(1000), rel=1e-9)


def test_bad_arguments_are_named():
    vae = linear_vae(True)
    with pytest.raises(VaeReweightingError, match="n must be an int"):
        vae_joint_log_weights(vae, lambda x: x.sum(1), 1)
    with pytest.raises(VaeReweightingError, match=r"log_target must map \(n, x_dim\) to \(n,\)"):
        vae_joint_log_weights(vae, lambda x: x, 10)
    with pytest.raises(VaeReweightingError, match="must be a boltzlab.models.VAE"):
        vae_joint_log_weights(object(), lambda x: x.sum(1), 10)
    with pytest.raises(VaeReweightingError, match="same length"):
        weighted_mean(torch.zeros(3), torch.zeros(4))

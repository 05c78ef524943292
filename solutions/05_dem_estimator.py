# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,nbgrader,boltzlab,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exercise 05 · The logsumexp Monte Carlo score estimator
#
# From chapter 05 "DEM score estimation". Write your code where it says
# `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells
# you what is wrong, specifically.

# %%
import torch

from boltzlab.config import set_torch_threads
from boltzlab.energies import GaussianMixture
from boltzlab.estimators import draw_eps, gmm_noised_score

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## The estimator (4 points)
#
# The score of the noised density $p_t = p * \mathcal N(0, \sigma^2 I)$ is estimated from $K$
# perturbed copies $x_k = x_t + \sigma\epsilon_k$ with log-weights $l_k = -E(x_k)/kT$:
#
# $$S_K(x_t) = \sum_{k=1}^K \operatorname{softmax}_k(l)\,\frac{F(x_k)}{kT},\qquad F = -\nabla E .$$
#
# * `energy`: a `boltzlab.energies.Energy`; `energy.energy_and_forces(x)` takes `(..., dim)`
#   and returns `(E, F)` of shapes `(...)` and `(..., dim)`; `energy.kT` is the temperature;
# * `x_t` `(B, dim)`, `sigma` a float, `eps` `(B, K, dim)` (already drawn for you);
# * return `(B, dim)`.
#
# Energies can be huge ($10^4$ far from the modes, $10^{24}$ for overlapping particles) or
# very negative at low temperature: never exponentiate $l_k$ as it is.

# %% nbgrader={"grade": false, "grade_id": "mc_score_solution", "locked": false, "schema_version": 3, "solution": true}
def mc_score(energy, x_t: torch.Tensor, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    """S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT with x_k = x_t + sigma eps_k.

    x_t: (B, dim); eps: (B, K, dim) -> (B, dim).
    """
    ### BEGIN SOLUTION
    copies = x_t[:, None, :] + sigma * eps  # (B, K, dim)
    energies, forces = energy.energy_and_forces(copies)
    weights = torch.softmax(-energies / energy.kT, dim=1)  # (B, K), max-shifted inside softmax
    return (weights[..., None] * forces).sum(dim=1) / energy.kT
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "mc_score", "locked": true, "points": 4, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch05 import check_mc_score

check_mc_score(mc_score)
### BEGIN HIDDEN TESTS
# instructor tests: float32, another seed, per-point agreement with the package and the exact GMM score
from boltzlab.energies import lj13
from boltzlab.estimators import lse_score

_gmm = GaussianMixture()
_g = torch.Generator().manual_seed(2024)
_x = _gmm.sample(50, _g) + torch.randn(50, 2, generator=_g)
_eps = draw_eps(_gmm, 50, 64, _g)
assert torch.allclose(mc_score(_gmm, _x, 1.0, _eps), lse_score(_gmm, _x, 1.0, _eps), rtol=1e-4, atol=1e-4)
_eps_big = draw_eps(_gmm, 50, 4000, _g, dtype=torch.float64)
_err = (mc_score(_gmm, _x.double(), 1.0, _eps_big) - gmm_noised_score(_gmm, _x.double(), 1.0)).norm(dim=-1)
assert float(_err.median()) < 0.1
_lj = lj13()
_xl = _lj.remove_com(1.1 * torch.randn(3, _lj.dim, generator=_g, dtype=torch.float64))
_el = draw_eps(_lj, 3, 20, _g, dtype=torch.float64)
assert torch.allclose(mc_score(_lj, _xl, 0.02, _el), lse_score(_lj, _xl, 0.02, _el), rtol=1e-6, atol=1e-6)
### END HIDDEN TESTS

# %% [markdown]
# ## Use it: error against the exact score of GMM-40
#
# GMM-40 convolved with $\mathcal N(0,\sigma^2 I)$ is again a Gaussian mixture, so the exact
# noised score is known. Your estimator's error should fall like $1/K$.

# %% tags=["uses-exercise"]
gmm = GaussianMixture()
g = torch.Generator().manual_seed(1)
sigma = 1.0
x_t = gmm.sample(64, g, dtype=torch.float64) + sigma * torch.randn(64, 2, generator=g, dtype=torch.float64)
exact = gmm_noised_score(gmm, x_t, sigma)
mse = {}
for k in (4, 16, 64, 256):
    est = mc_score(gmm, x_t, sigma, draw_eps(gmm, 64, k, g, dtype=torch.float64))
    mse[k] = float(((est - exact) ** 2).sum(-1).mean())
    print(f"K = {k:4d}: MSE {mse[k]:.4f}")
assert mse[256] < mse[4] / 10

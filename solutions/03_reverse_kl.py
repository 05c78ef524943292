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
# # Exercises 03 · Reverse KL and free energy
#
# The two formulas a Boltzmann generator lives by: the reverse-KL loss that trains it from
# the energy alone, and the importance-weighted free-energy difference that corrects it.
# Complete each function where it says `raise NotImplementedError()`, run the cell, then
# run the check cell below it: it tells you what is wrong, specifically. After each check
# a short cell uses *your* function.
#
# Background: chapter 03, section Theory.

# %%
import math

import torch

from boltzlab import flows
from boltzlab.config import budget
from boltzlab.energies import DoubleWell2D, GaussianMixture
from boltzlab.metrics import kish_ess

SEED = 0
torch.manual_seed(SEED)
torch.set_num_threads(1)  # small networks: one thread is fastest
SMOKE = budget() == "smoke"
dw = DoubleWell2D()

# %% [markdown]
# ## Exercise 1 · The reverse-KL loss (3 points)
#
# For a flow q and a target p(x) ∝ exp(−E(x)/kT), the loss
#
# $$\mathcal{L} = \mathbb{E}_{x \sim q}\left[\frac{E(x)}{kT} + \log q(x)\right] \approx \frac1n \sum_{i=1}^n \left[\frac{E(x_i)}{kT} + \log q(x_i)\right]$$
#
# equals −log Z + KL(q ‖ p). Estimate it with `n_samples` samples drawn by
# `x, log_q = flow.sample(n_samples, generator=generator)` (use exactly this call, so that
# the check can reproduce your samples), the energy `energy.energy(x)` and the temperature
# `energy.kT`. Return a tensor that gradients can flow through: training differentiates
# this loss with respect to the flow's parameters *through the samples*.

# %% nbgrader={"grade": false, "grade_id": "reverse_kl_loss_solution", "locked": false, "schema_version": 3, "solution": true}
def reverse_kl_loss(flow: flows.Flow, energy, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo estimate of E_q[E(x)/kT + log q(x)], a 0-d tensor with gradients."""
    ### BEGIN SOLUTION
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x) / energy.kT + log_q).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "reverse_kl_loss", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch03 import check_reverse_kl_loss

check_reverse_kl_loss(reverse_kl_loss)
### BEGIN HIDDEN TESTS
# q = p exactly (an untrained flow is N(loc, scale^2), the target a one-mode mixture with
# log Z = 0): E + log q = log q - log p = 0 for every sample, so the loss is 0 up to rounding
_target = GaussianMixture(means=torch.tensor([[1.0, -2.0]]), std=0.7)
_flow = flows.realnvp(2, n_layers=2, loc=[1.0, -2.0], scale=0.7).double()
_loss = reverse_kl_loss(_flow, _target, 300, torch.Generator().manual_seed(11))
assert abs(float(_loss)) < 1e-5, float(_loss)
# at kT = 2: the average of E/2 + log q over the same samples
_hot = _target.at_temperature(2.0)
_x, _lq = _flow.sample(300, generator=torch.Generator().manual_seed(12))
_expected = (_target.energy(_x) / 2.0 + _lq).mean()
assert abs(float(reverse_kl_loss(_flow, _hot, 300, torch.Generator().manual_seed(12))) - float(_expected)) < 1e-9
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Train a small flow on the double well with *your* loss and Adam, and watch
# the loss approach its lower bound −log Z (exact here) from above.

# %% tags=["uses-exercise"]
flow = flows.spline_flow(2, n_layers=3, n_bins=8, bound=4.0, hidden=32, seed=SEED)
optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(SEED)
n_steps = 60 if SMOKE else 600
for step in range(n_steps):
    loss = reverse_kl_loss(flow, dw, 256, g)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % max(1, n_steps // 6) == 0 or step == n_steps - 1:
        print(f"step {step:4d}: loss {float(loss):9.4f}   (-log Z = {-dw.log_z():.4f})")

# %% [markdown]
# ## Exercise 2 · A free-energy difference from importance weights (2 points)
#
# Samples x_i from a proposal q with log-weights log w_i = −E(x_i)/kT − log q(x_i), and
# two states A and B given as boolean masks over the samples. The probability of a state
# is estimated by P_A ∝ Σ_{i∈A} w_i, so
#
# $$\frac{\Delta F}{kT} = \frac{F_B - F_A}{kT} = -\log\frac{P_B}{P_A} = -\log \frac{\sum_{i \in B} w_i}{\sum_{i \in A} w_i}.$$
#
# Real log-weights are large (hundreds or thousands): exp overflows. Work in log space.

# %% nbgrader={"grade": false, "grade_id": "free_energy_difference_solution", "locked": false, "schema_version": 3, "solution": true}
def free_energy_difference(log_w: torch.Tensor, in_a: torch.Tensor, in_b: torch.Tensor) -> torch.Tensor:
    """ΔF/kT = F_B - F_A from log-weights (n,) and boolean state masks in_a, in_b (n,)."""
    ### BEGIN SOLUTION
    return torch.logsumexp(log_w[in_a], 0) - torch.logsumexp(log_w[in_b], 0)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "free_energy_difference", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch03 import check_free_energy_difference

check_free_energy_difference(free_energy_difference)
### BEGIN HIDDEN TESTS
# three states: samples in neither A nor B must not enter (weights 1..6, A = {1, 2}, B = {4, 5})
_lw = torch.log(torch.arange(1.0, 7.0, dtype=torch.float64))
_a = torch.tensor([True, True, False, False, False, False])
_b = torch.tensor([False, False, False, True, True, False])
assert abs(float(free_energy_difference(_lw, _a, _b)) + math.log(3.0)) < 1e-9
# float32 log-weights of size 5000 stay finite
_lw32 = 5000.0 + torch.randn(1000, generator=torch.Generator().manual_seed(13))
_a32 = torch.arange(1000) < 300
assert math.isfinite(float(free_energy_difference(_lw32, _a32, ~_a32)))
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** A deliberately poor proposal, the Gaussian q = N(0, diag(2², 1.5²)) (its
# log-density is exact), weighted to the double well: your ΔF against the exact 3.38 kT,
# with the effective sample size that makes it trustworthy (or not).

# %% tags=["uses-exercise"]
n = 20_000 if SMOKE else 200_000
proposal = torch.distributions.Normal(torch.zeros(2), torch.tensor([2.0, 1.5]))
x = torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED)) * proposal.scale
log_w = (-dw.energy(x) / dw.kT - proposal.log_prob(x).sum(-1)).double()
estimate = float(free_energy_difference(log_w, x[:, 0] < 0, x[:, 0] >= 0))
print(f"ΔF/kT = {estimate:.3f} (exact {dw.well_free_energy_difference():.3f}), "
      f"Kish ESS = {kish_ess(log_w):.0f} of {n} samples")

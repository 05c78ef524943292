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
# # Exercises 00 · Boltzmann distributions and MCMC
#
# Two exercises from chapter 00. Write your code where it says `raise NotImplementedError()`,
# run the cell, then run the check cell below it: it tells you what is wrong, specifically.

# %%
import math

import torch

from boltzlab.config import set_torch_threads
from boltzlab.energies import DoubleWell2D, Energy

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## Exercise 1 · One MALA step (3 points)
#
# The Metropolis-adjusted Langevin algorithm proposes, for every chain,
#
# $$y = x + \tau\,F(x)/kT + \sqrt{2\tau}\,\xi,\qquad \xi \sim \mathcal N(0, I),\qquad F = -\nabla E,$$
#
# and accepts $y$ with probability $\min(1, \alpha)$,
#
# $$\log\alpha = -\frac{E(y) - E(x)}{kT} + \log q(x\mid y) - \log q(y\mid x),\qquad
#   \log q(y\mid x) = -\frac{\lVert y - x - \tau F(x)/kT\rVert^2}{4\tau} + \text{const}.$$
#
# Accept when `log_u < log_alpha`, where `log_u` is the log of a uniform random number (given,
# so that your step can be checked exactly). `energy.energy_and_forces(x)` returns
# $(E(x), F(x))$ with shapes `(n,)` and `(n, d)`; `energy.kT` is the temperature.

# %% nbgrader={"grade": false, "grade_id": "mala_step_solution", "locked": false, "schema_version": 3, "solution": true}
def mala_step(x: torch.Tensor, energy: Energy, tau: float, xi: torch.Tensor, log_u: torch.Tensor):
    """One MALA step for n chains. x, xi: (n, d); log_u: (n,). Returns (x_new (n, d), accepted (n,) bool)."""
    ### BEGIN SOLUTION
    kT = energy.kT
    e_x, f_x = energy.energy_and_forces(x)
    y = x + tau * f_x / kT + math.sqrt(2 * tau) * xi
    e_y, f_y = energy.energy_and_forces(y)
    log_q_forward = -((y - x - tau * f_x / kT) ** 2).sum(-1) / (4 * tau)
    log_q_backward = -((x - y - tau * f_y / kT) ** 2).sum(-1) / (4 * tau)
    log_alpha = -(e_y - e_x) / kT + log_q_backward - log_q_forward
    accepted = log_u < log_alpha
    x_new = torch.where(accepted[:, None], y, x)
    return x_new, accepted
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "mala_step", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch00 import check_mala_step

check_mala_step(mala_step)
### BEGIN HIDDEN TESTS
from boltzlab.energies import GaussianMixture
from boltzlab.grading.checks_ch00 import _mala_variants

_g = torch.Generator().manual_seed(99)
_gmm = GaussianMixture()
_x = _gmm.sample(300, _g, dtype=torch.float64) + 0.5
_xi = torch.randn(300, 2, generator=_g, dtype=torch.float64)
_lu = torch.log(torch.rand(300, generator=_g, dtype=torch.float64))
_want_x, _want_acc = _mala_variants(_x, _gmm, 0.4, _xi, _lu)["correct"]
_got_x, _got_acc = mala_step(_x.clone(), _gmm, 0.4, _xi, _lu)
assert torch.allclose(_got_x.double(), _want_x, atol=1e-8) and torch.equal(_got_acc, _want_acc)
assert 0 < int(_want_acc.sum()) < 300  # the test exercises both branches
### END HIDDEN TESTS

# %% [markdown]
# Try it: run 200 chains for 500 steps from the shallow well ($x_1 > 0$). How many reach
# the deep well? (Chapter 00 measures how long that takes, and how parallel tempering helps.)

# %% tags=["uses-exercise"]
dw = DoubleWell2D()
g = torch.Generator().manual_seed(1)
x = torch.tensor([1.7, 0.0], dtype=torch.float64).repeat(200, 1)
n_accepted = 0
for _ in range(500):
    xi = torch.randn(x.shape, generator=g, dtype=torch.float64)
    log_u = torch.log(torch.rand(x.shape[0], generator=g, dtype=torch.float64))
    x, acc = mala_step(x, dw, 0.1, xi, log_u)
    n_accepted += int(acc.sum())
print(f"acceptance {n_accepted / (500 * 200):.2f}; chains in the deep well: {int((x[:, 0] < 0).sum())} of 200")

# %% [markdown]
# ## Exercise 2 · Kish's effective sample size (2 points)
#
# With importance weights $w_i = p(x_i)/q(x_i)$ (known up to a constant), Kish's effective
# sample size is
#
# $$\mathrm{ESS} = \frac{\left(\sum_i w_i\right)^2}{\sum_i w_i^2}.$$
#
# You are given **log**-weights, which may be huge (think $-E/kT$ of a Lennard-Jones
# cluster): compute the ESS without overflow (hint: `torch.logsumexp`). Return a float.

# %% nbgrader={"grade": false, "grade_id": "kish_ess_solution", "locked": false, "schema_version": 3, "solution": true}
def kish_ess(log_w: torch.Tensor) -> float:
    """Kish ESS from log-weights of shape (n,)."""
    ### BEGIN SOLUTION
    log_w = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "kish_ess", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch00 import check_kish_ess

check_kish_ess(kish_ess)
### BEGIN HIDDEN TESTS
from boltzlab.metrics import kish_ess as _reference_ess

for _seed, _n, _scale in [(1, 17, 0.3), (2, 5000, 3.0), (3, 2, 10.0)]:
    _lw = _scale * torch.randn(_n, generator=torch.Generator().manual_seed(_seed))
    assert abs(kish_ess(_lw) - _reference_ess(_lw)) < 1e-4 * _reference_ess(_lw)
assert abs(kish_ess(torch.tensor([-1e4, -1e4 + math.log(3.0)], dtype=torch.float64)) - 1.6) < 1e-6
### END HIDDEN TESTS

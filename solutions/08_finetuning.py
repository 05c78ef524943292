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
# # Exercise 08 · Soft-optimal weights and best-of-N
#
# From chapter 08 "Reward-guided fine-tuning by iterative distillation". Write your code where it
# says `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells you
# what is wrong, specifically.

# %%
import math

import torch

from boltzlab.config import set_torch_threads
from boltzlab.energies import DoubleWell2D
from boltzlab.finetune import BoltzmannReward

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. Soft-optimal roll-out weights and the soft value (3 points)
#
# From a roll-in state $x_t$ the teacher draws $M$ completions $x_0^{(1)}, \dots, x_0^{(M)}$ with rewards
# $r_m = r(x_0^{(m)})$. The soft-optimal policy reweights them by $e^{r/\alpha}$:
#
# $$w_m = \frac{e^{r_m/\alpha}}{\sum_{m'} e^{r_{m'}/\alpha}}, \qquad
#   V = \alpha \log\Big(\frac1M \sum_m e^{r_m/\alpha}\Big).$$
#
# * `rewards`: shape `(B, M)`, one row per roll-in state; `alpha > 0` a float;
# * return `(weights, value)` of shapes `(B, M)` and `(B,)`.
#
# Rewards can be large ($10^4$): never exponentiate $r/\alpha$ as it is.

# %% nbgrader={"grade": false, "grade_id": "soft_optimal_weights_solution", "locked": false, "schema_version": 3, "solution": true}
def soft_optimal_weights(rewards: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w = softmax_m(r / alpha) (B, M) and V = alpha * log mean_m exp(r / alpha) (B,)."""
    ### BEGIN SOLUTION
    z = rewards / alpha
    n_completions = rewards.shape[-1]
    value = alpha * (torch.logsumexp(z, dim=-1) - math.log(n_completions))
    return torch.softmax(z, dim=-1), value
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "soft_optimal_weights", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch08 import check_soft_optimal_weights

check_soft_optimal_weights(soft_optimal_weights)
### BEGIN HIDDEN TESTS
# instructor tests: float32 input, another seed and alpha, agreement with the package; a quadratic reward
import boltzlab.finetune as _ft

_g = torch.Generator().manual_seed(2025)
_r = 5 * torch.randn(7, 9, generator=_g)
_w, _v = soft_optimal_weights(_r, 0.3)
_w_ref, _v_ref = _ft.soft_optimal_weights(_r, 0.3)
assert torch.allclose(_w, _w_ref, atol=1e-6) and torch.allclose(_v, _v_ref, atol=1e-4)
_x = 1.2 * torch.randn(1, 300_000, generator=_g, dtype=torch.float64)
_w, _v = soft_optimal_weights(-_x**2 / 2, 1.0)  # N(0, 1.44) tilted by exp(-x^2/2): variance 1.44 / 2.44
assert abs(float((_w * _x**2).sum()) - 1.44 / 2.44) < 0.02
assert abs(float(_v) + 0.5 * math.log(2.44)) < 0.01
### END HIDDEN TESTS

# %% [markdown]
# ## 2. A best-of-N sampler (2 points)
#
# Best-of-N draws $N$ samples and keeps the one with the highest reward. Write
# `best_of_n(sample, reward, n, batch)`:
#
# * `sample(k)` returns `k` fresh samples, shape `(k, dim)`;
# * `reward(x)` maps `(k, dim)` to `(k,)`;
# * return `(batch, dim)`: each row the best of its own `n` fresh candidates (draw exactly
#   `n * batch` samples in total).

# %% nbgrader={"grade": false, "grade_id": "best_of_n_solution", "locked": false, "schema_version": 3, "solution": true}
def best_of_n(sample, reward, n: int, batch: int) -> torch.Tensor:
    """The best of n fresh samples, batch times: (batch, dim)."""
    ### BEGIN SOLUTION
    pool = sample(n * batch)
    groups = pool.reshape(batch, n, pool.shape[-1])
    winner = reward(pool).reshape(batch, n).argmax(dim=-1)
    return groups[torch.arange(batch), winner]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "best_of_n", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch08 import check_best_of_n

check_best_of_n(best_of_n)
### BEGIN HIDDEN TESTS
# instructor tests: Gaussian candidates, E[max of 2 standard normals] = 1/sqrt(pi); another n and seed
_g = torch.Generator().manual_seed(77)
_out = best_of_n(lambda k: torch.randn(k, 3, generator=_g, dtype=torch.float64), lambda x: x[:, 2], 2, 40_000)
assert _out.shape == (40_000, 3)
assert abs(float(_out[:, 2].mean()) - 1 / math.sqrt(math.pi)) < 0.02
assert abs(float(_out[:, 0].mean())) < 0.02  # the other coordinates stay unbiased
_u = best_of_n(lambda k: torch.rand(k, 1, generator=_g, dtype=torch.float64), lambda x: -x[:, 0], 7, 20_000)
assert abs(float(_u.mean()) - 1 / 8) < 0.01  # reward -x: the minimum of 7 uniforms, mean 1/8
### END HIDDEN TESTS

# %% [markdown]
# ## Use them: best-of-N on the double well
#
# Exact samples at $kT_0 = 3$, reward $r = -(1/kT - 1/kT_0)E$ with $kT = 1$. How many candidates does
# best-of-N need to put as much mass in the deep well as the exact Boltzmann density at $kT = 1$? And
# what do the soft-optimal weights of a large sample say about that density? (At $\alpha = 1$ the soft value
# of exact $kT_0$ samples is $\log \mathbb E_{kT_0}[e^{r}] = \log Z_{kT} - \log Z_{kT_0}$.)

# %% tags=["uses-exercise"]
dw = DoubleWell2D()
hot = dw.at_temperature(3.0)
reward = BoltzmannReward(dw, kT=1.0, kT0=3.0)
g = torch.Generator().manual_seed(1)
exact_deep = dw.well_probabilities()[0]
for n in (1, 2, 3, 4, 8):
    x = best_of_n(lambda k: hot.sample(k, g), reward, n, 20_000)
    print(f"best of {n}: P(deep well) = {float((x[:, 0] < 0).float().mean()):.3f} (exact at kT = 1: {exact_deep:.3f})")
pool = hot.sample(200_000, g)
w, v = soft_optimal_weights(reward(pool)[None], 1.0)
deep_reweighted = float((w[0] * (pool[:, 0] < 0)).sum())
log_z_ratio = dw.log_z() - hot.log_z()  # E_{kT0}[e^r] = Z_kT / Z_kT0, so V = log Z_kT - log Z_kT0 at alpha = 1
print(f"reweighting kT = 3 samples by exp(r): P(deep well) = {deep_reweighted:.3f}; soft value {float(v):.3f} "
      f"(exact log Z_1 - log Z_3 = {log_z_ratio:.3f})")
assert abs(deep_reweighted - exact_deep) < 0.01
assert abs(float(v) - log_z_ratio) < 0.05

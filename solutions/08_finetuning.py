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
# # Exercise 08 · Soft-optimal weights, best-of-N, policy gradient and the mixture roll-in
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
# ## 3. The policy-gradient loss with a baseline and a KL penalty (3 points)
#
# On-policy policy gradient (DDPO, Black et al. 2023; DPOK, Fan et al. 2023) maximises
# $J(\theta) = \mathbb E_{p_\theta}[r(x)] - \alpha\,\mathrm{KL}(p_\theta\,\|\,p_{\text{pre}})$ from samples of the current model only. For one
# transition of the sampler, with samples $x_1, \dots, x_B \sim p_\theta$ drawn without gradient,
#
# $$\nabla J \approx \frac1B \sum_b \Big[A_b\,\nabla\log p_\theta(x_b) - \alpha\,\nabla\mathrm{KL}_b(\theta)\Big],\qquad
#   A_b = r_b - \frac{1}{B-1}\sum_{b'\neq b} r_{b'} .$$
#
# The leave-one-out baseline does not depend on $x_b$, so it changes the variance, not the mean. Write the
# **loss** whose gradient is $-\nabla J$ (the package's `policy_gradient_surrogate` does this for every step of
# the chain; here there is one):
#
# * `log_probs`: `(B,)`, $\log p_\theta(x_b)$, carries $\theta$'s gradient;
# * `rewards`: `(B,)`, $r(x_b)$, to be treated as constants (they may carry a gradient: detach them);
# * `kl`: `(B,)`, $\mathrm{KL}_b(\theta)$, carries $\theta$'s gradient; `alpha > 0`, `B >= 2`;
# * return a scalar tensor.

# %% nbgrader={"grade": false, "grade_id": "policy_gradient_loss_solution", "locked": false, "schema_version": 3, "solution": true}
def policy_gradient_loss(log_probs: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """-(1/B) sum_b [A_b log p_b - alpha kl_b], A_b = r_b - mean of the other rewards (constant): a scalar."""
    ### BEGIN SOLUTION
    r = rewards.detach()
    others_mean = (r.sum() - r) / (r.shape[0] - 1)
    advantage = r - others_mean
    return -(advantage * log_probs - alpha * kl).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "policy_gradient_loss", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch08 import check_policy_gradient_loss

check_policy_gradient_loss(policy_gradient_loss)
### BEGIN HIDDEN TESTS
# instructor tests: the package's surrogate for a one-step chain x_1 = x_0 + s + z (increment 1) whose
# student score is a free parameter: both losses must have the same gradient
import boltzlab.finetune as _ft
from boltzlab.finetune import policy_gradient_surrogate as _surrogate

_g = torch.Generator().manual_seed(4242)


class _ConstantScore(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(value.clone())

    def forward(self, x, t):
        return self.value.expand_as(x)


_student, _pre = _ConstantScore(torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)), torch.zeros(3, dtype=torch.float64)
_x0 = torch.zeros(5, 3, dtype=torch.float64)
_x1 = _x0 + _student.value.detach() + torch.randn(5, 3, generator=_g, dtype=torch.float64)
_r = -(_x1 - 1.0).pow(2).sum(-1)
_delta = torch.ones(1, dtype=torch.float64)
_s = _student(_x0, None)
_kl_terms = _ft.step_kl(_s.detach(), _pre.expand_as(_x0), _delta[0])[None]
_ref = _surrogate(_student, _pre.expand_as(_x0)[None], _kl_terms, torch.stack([_x0, _x1]),
                  torch.tensor([1.0, 0.5], dtype=torch.float64), _delta, _r, 0.7)
_g_ref = torch.autograd.grad(_ref, _student.value)[0]
_s = _student(_x0, None)
_mine = policy_gradient_loss(_ft.transition_log_prob(_s, _x0, _x1, _delta[0]), _r, _ft.step_kl(_s, _pre.expand_as(_x0), _delta[0]), 0.7)
_g_mine = torch.autograd.grad(_mine, _student.value)[0]
assert torch.allclose(_g_mine, _g_ref, atol=1e-10)
# with B = 2 the leave-one-out advantage is antisymmetric: A_1 = -A_2
_lp = torch.zeros(2, dtype=torch.float64, requires_grad=True)
(_ga,) = torch.autograd.grad(policy_gradient_loss(_lp, torch.tensor([3.0, 1.0], dtype=torch.float64),
                                                  torch.zeros(2, dtype=torch.float64), 1.0), _lp)
assert torch.allclose(_ga, torch.tensor([-1.0, 1.0], dtype=torch.float64))
### END HIDDEN TESTS

# %% [markdown]
# ## 4. The mixture roll-in (2 points)
#
# Iterative distillation learns at roll-in states $x_t$: states of a reverse SDE stopped at a random time.
# From the current student the roll-in is on-policy; from the pretrained model it is off-policy, and
# so is a **mixture** of the two, which keeps states where the pretrained model puts mass while
# following the student where it moves. Write `mixture_rollin(rollin, student, pretrained, n, student_fraction)`:
#
# * `rollin(model, k)` returns `(x_t (k, dim), t (k,))`: `k` roll-in states of that model; call it only
#   with `k >= 1`, and once per model;
# * take exactly $\lceil f n\rceil$ states from the student ($f$ = `student_fraction`, in $[0, 1]$) and the rest from the
#   pretrained model;
# * return `(x_t (n, dim), t (n,), from_student (n,) bool)`.

# %% nbgrader={"grade": false, "grade_id": "mixture_rollin_solution", "locked": false, "schema_version": 3, "solution": true}
def mixture_rollin(rollin, student, pretrained, n: int, student_fraction: float):
    """(x_t (n, dim), t (n,), from_student (n,) bool): ceil(f n) states from the student, the rest pretrained."""
    ### BEGIN SOLUTION
    n_student = math.ceil(student_fraction * n)
    xs, ts, flags = [], [], []
    for model, count, is_student in ((student, n_student, True), (pretrained, n - n_student, False)):
        if count > 0:
            x, t = rollin(model, count)
            xs.append(x)
            ts.append(t)
            flags.append(torch.full((count,), is_student, dtype=torch.bool))
    return torch.cat(xs), torch.cat(ts), torch.cat(flags)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "mixture_rollin", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch08 import check_mixture_rollin

check_mixture_rollin(mixture_rollin)
### BEGIN HIDDEN TESTS
# instructor tests: the package's roll-in of two Gaussian score models; the states from each model
# are distributed like that model's noised marginal
from boltzlab.diffusion import GeometricNoiseSchedule
from boltzlab.finetune import GaussianScore
from boltzlab.finetune import rollin as _rollin

_sched = GeometricNoiseSchedule(sigma_min=0.01, sigma_max=5.0)
_student_g, _pre_g = GaussianScore([3.0, 0.0], 0.1, _sched), GaussianScore([-3.0, 0.0], 0.1, _sched)
_g = torch.Generator().manual_seed(99)
_x, _t, _from = mixture_rollin(lambda m, k: _rollin(m, _sched, k, 2, 20, generator=_g), _student_g, _pre_g, 601, 0.3)
assert _x.shape == (601, 2) and _t.shape == (601,) and int(_from.sum()) == math.ceil(0.3 * 601)
_late = _t < 0.3  # little noise left: each state sits near its own model's mean
assert float(_x[_late & _from, 0].mean()) > 2.0 and float(_x[_late & ~_from, 0].mean()) < -2.0
### END HIDDEN TESTS


# %% [markdown]
# ## Use them: best-of-N on the double well, and what the baseline buys
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

# %% [markdown]
# The baseline changes the variance of the policy gradient, not its mean. Sampling many batches of 8
# from the Gaussian policy of exercise 3 (no KL here, $\alpha \to 0$), compare the spread of the estimate
# with the leave-one-out baseline and without one (the learner's loss with rewards shifted by a large
# constant: without a baseline that shift would multiply the noise).

# %% tags=["uses-exercise"]
theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
g = torch.Generator().manual_seed(5)
estimates = {"leave-one-out baseline": [], "no baseline": []}
for _ in range(400):
    x = theta.detach() + torch.randn(8, 1, generator=g, dtype=torch.float64)
    log_p = -0.5 * (x - theta).pow(2).sum(-1)
    r = 50.0 - (x - 2.0).pow(2).sum(-1)  # the +50 is what a baseline removes
    zero_kl = torch.zeros(8, dtype=torch.float64)
    estimates["leave-one-out baseline"].append(-float(torch.autograd.grad(policy_gradient_loss(log_p, r, zero_kl, 1.0),
                                                                          theta)[0]))
    estimates["no baseline"].append(float(((r - 0.0) * (x[:, 0] - theta.detach()[0])).mean()))
exact = -2 * (0.5 - 2.0)
for name, values in estimates.items():
    v = torch.tensor(values)
    print(f"{name:24s}: mean {float(v.mean()):6.3f} (exact {exact:.3f}), standard deviation {float(v.std()):6.3f}")
assert torch.tensor(estimates["leave-one-out baseline"]).std() < 0.5 * torch.tensor(estimates["no baseline"]).std()

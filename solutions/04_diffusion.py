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
# # Exercises 04 · Diffusion models from data
#
# From chapter 04 "Diffusion models from data". Write your code where it says
# `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells you
# what is wrong, specifically. At the end, your three functions train and sample a small
# diffusion model.

# %%
import math

import torch

from boltzlab.config import set_torch_threads
from boltzlab.diffusion import GeometricNoiseSchedule, sample_prior
from boltzlab.energies import GaussianMixture
from boltzlab.models import ScoreMLP

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The denoising-score-matching loss (3 points)
#
# For clean samples $x_0$ `(B, dim)`, times $t$ `(B,)` and noise $\epsilon$ `(B, dim)` (drawn for
# you), with $\sigma_t$ = `schedule.std(t)` of shape `(B,)`:
#
# $$x_t = x_0 + \sigma_t\,\epsilon,\qquad
#   \mathcal L = \frac1B\sum_{b=1}^B \big\|\sigma_{t_b}\,s(x_{t}, t)_b + \epsilon_b\big\|^2 .$$
#
# `score(x, t)` takes `x` `(B, dim)` and `t` `(B,)` and returns `(B, dim)`. Return a 0-dim tensor
# that keeps the autograd graph (training calls `.backward()` on it).

# %% nbgrader={"grade": false, "grade_id": "dsm_loss_solution", "locked": false, "schema_version": 3, "solution": true}
def dsm_loss(score, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule) -> torch.Tensor:
    """mean_b | sigma_t s(x0 + sigma_t eps, t) + eps |^2. x0, eps: (B, dim); t: (B,) -> scalar."""
    ### BEGIN SOLUTION
    sigma = schedule.std(t)[:, None]  # (B, 1): broadcasts over the coordinates
    x_t = x0 + sigma * eps
    residual = sigma * score(x_t, t) + eps
    return residual.pow(2).sum(dim=-1).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "dsm_loss", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch04 import check_dsm_loss

check_dsm_loss(dsm_loss)
### BEGIN HIDDEN TESTS
# instructor tests: float32 input, another schedule, and the package's loss on the same draws
from boltzlab.diffusion import dsm_loss as _package_dsm_loss

_sched = GeometricNoiseSchedule(0.05, 5.0)
_g = torch.Generator().manual_seed(2025)
_x0 = torch.randn(128, 4, generator=_g)
_t = torch.rand(128, generator=_g)
_eps = torch.randn(128, 4, generator=_g)
_score = lambda x, t: -x / (1.0 + _sched.variance(t))[:, None] + 0.1 * torch.cos(x)
assert torch.allclose(dsm_loss(_score, _x0, _t, _eps, _sched), _package_dsm_loss(_score, _x0, _t, _eps, _sched),
                      rtol=1e-5, atol=1e-6)
_zero = dsm_loss(lambda x, t: torch.zeros_like(x), _x0, _t, _eps, _sched)
assert torch.allclose(_zero, _eps.pow(2).sum(-1).mean(), rtol=1e-5)  # s = 0 leaves |eps|^2
### END HIDDEN TESTS

# %% [markdown]
# ## 2. One Euler-Maruyama step of the reverse SDE (3 points)
#
# From time $t$ (a float) to $t - \Delta t$, with $g(t)^2$ = `schedule.g2(t)` and the noise $z$
# `(B, dim)` given:
#
# $$x \leftarrow x + g(t)^2\, s(x, t)\,\Delta t + \sqrt{g(t)^2\,\Delta t}\;z .$$
#
# The score wants the time as a tensor of shape `(B,)`: build it with `torch.full`.

# %% nbgrader={"grade": false, "grade_id": "reverse_sde_step_solution", "locked": false, "schema_version": 3, "solution": true}
def reverse_sde_step(score, schedule, x: torch.Tensor, t: float, dt: float, z: torch.Tensor) -> torch.Tensor:
    """x + g(t)^2 s(x, t) dt + sqrt(g(t)^2 dt) z. x, z: (B, dim) -> (B, dim)."""
    ### BEGIN SOLUTION
    tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    g2 = schedule.g2(tt)[:, None]
    return x + g2 * score(x, tt) * dt + (g2 * dt).sqrt() * z
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "reverse_sde_step", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch04 import check_reverse_sde_step

check_reverse_sde_step(reverse_sde_step)
### BEGIN HIDDEN TESTS
# instructor tests: one step equals the package's one-step sampler on the same random numbers
from boltzlab.diffusion import reverse_sde_sample as _package_sampler

_sched = GeometricNoiseSchedule(0.01, 3.0)
_x1 = torch.randn(20, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
_score = lambda x, t: -x / (0.5 + _sched.variance(t))[:, None]
_ref = _package_sampler(_score, _sched, _x1, 1, generator=torch.Generator().manual_seed(12), t_end=0.9)
_z = torch.randn(_x1.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
assert torch.allclose(reverse_sde_step(_score, _sched, _x1, 1.0, 1.0 - 0.9, _z), _ref, rtol=1e-10, atol=1e-10)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Tweedie's denoiser (2 points)
#
# With $\sigma_t^2$ = `schedule.variance(t)` `(B,)`, return the posterior mean of the clean sample:
#
# $$\mathbb E[x_0 \mid x_t] = x_t + \sigma_t^2\, s(x_t, t).$$

# %% nbgrader={"grade": false, "grade_id": "denoise_solution", "locked": false, "schema_version": 3, "solution": true}
def denoise(score, x_t: torch.Tensor, t: torch.Tensor, schedule) -> torch.Tensor:
    """Tweedie: x_t + sigma_t^2 s(x_t, t). x_t: (B, dim), t: (B,) -> (B, dim)."""
    ### BEGIN SOLUTION
    return x_t + schedule.variance(t)[:, None] * score(x_t, t)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "denoise", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch04 import check_denoise

check_denoise(denoise)
### BEGIN HIDDEN TESTS
# instructor tests: GMM-40 with its exact noised score, against Bayes' posterior mean
from boltzlab.estimators import gmm_noised_score, gmm_posterior_mean

_gmm = GaussianMixture()
_sched = GeometricNoiseSchedule(0.01, 70.0)
_g = torch.Generator().manual_seed(77)
_t = torch.rand(300, generator=_g, dtype=torch.float64)
_xt = _gmm.sample(300, _g, dtype=torch.float64) + _sched.std(_t)[:, None] * torch.randn(300, 2, generator=_g,
                                                                                         dtype=torch.float64)
_exact = lambda x, t: gmm_noised_score(_gmm, x, _sched.std(t))
assert torch.allclose(denoise(_exact, _xt, _t, _sched), gmm_posterior_mean(_gmm, _xt, _sched.std(_t)), atol=1e-8)
### END HIDDEN TESTS

# %% [markdown]
# ## Use them: a diffusion model of two Gaussians
#
# Train a small score network with **your** `dsm_loss` on samples of a two-mode mixture, sample
# it with **your** `reverse_sde_step`, and denoise noisy points with **your** `denoise`. The exact
# answers: half of the samples in each mode, and posterior means between the modes at large noise.

# %% tags=["uses-exercise"]
mixture = GaussianMixture(name="two", dim=2, means=torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), std=0.7)
schedule = GeometricNoiseSchedule(0.01, 8.0)
g = torch.Generator().manual_seed(0)
data = mixture.sample(4000, g)
model = ScoreMLP(2, hidden=64, n_layers=2, seed=0)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
for step in range(1000):
    x0 = data[torch.randint(len(data), (256,), generator=g)]
    t = 1e-3 + (1 - 1e-3) * torch.rand(256, generator=g)
    loss = dsm_loss(model, x0, t, torch.randn(x0.shape, generator=g), schedule)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

n_steps = 100
x = sample_prior(schedule, 2000, 2, generator=g)
with torch.no_grad():
    for k in range(n_steps):
        x = reverse_sde_step(model, schedule, x, 1.0 - k / n_steps, 1.0 / n_steps, torch.randn(x.shape, generator=g))
right = float((x[:, 0] > 0).float().mean())
near = float(((x - mixture.means[(x[:, 0] > 0).long()]).norm(dim=-1) < 3 * mixture.std).float().mean())
print(f"final DSM loss {loss.item():.3f}; fraction of samples in the right-hand mode {right:.3f} (exact 0.5);\n"
      f"fraction within 3 s of their mode's centre {near:.3f} (exact {1 - math.exp(-4.5):.3f})")

# %% tags=["uses-exercise"]
t_big = torch.full((5,), 0.9)
noisy = mixture.sample(5, g) + schedule.std(t_big)[:, None] * torch.randn(5, 2, generator=g)
with torch.no_grad():
    means = denoise(model, noisy, t_big, schedule)
print(f"σ_t = {float(schedule.std(t_big[:1])):.2f}: |E[x_0 | x_t]| of five noisy points:",
      ", ".join(f"{float(m.norm()):.2f}" for m in means), "(the modes sit at distance 3)")
# a small network trained for a few seconds splits the mass 50:50 only to within about 0.1 (seeds vary),
# and its modes come out wider than the data's: the small-noise score is the hard part (chapter 04, section 3)
assert 0.3 < right < 0.7

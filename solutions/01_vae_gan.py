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
# # Exercises 01 · VAE and GAN basics
#
# Two functions that every VAE and WGAN relies on. Complete each function where it says
# `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells
# you what is wrong, specifically. After each check a short training run uses *your*
# function on the 2-D double well.
#
# Background: chapter 01, sections Theory and Practice.

# %%
import math

import torch

from boltzlab.config import sizes
from boltzlab.energies import DoubleWell2D
from boltzlab.models import VAE, Critic, Generator
from boltzlab.training import double_well_exact_samples, train_vae, train_wgan

SEED = 0
torch.manual_seed(SEED)
torch.set_num_threads(1)  # tiny networks: one thread is fastest
S = sizes("01")
dw = DoubleWell2D()
x_dw = double_well_exact_samples(S.n_train, dw, generator=torch.Generator().manual_seed(SEED))

# %% [markdown]
# ## Exercise 1 · The ELBO with the reparameterisation trick (3 points)
#
# A VAE with prior p(z) = N(0, I), Gaussian encoder q(z | x) = N(μ(x), diag exp(ℓ(x)))
# (ℓ is the log-variance) and Gaussian decoder p(x | z) = N(m(z), diag exp(v(z))).
# Write the one-sample estimate of the ELBO for each data point:
#
# $$\mathrm{ELBO}(x) \approx \log \mathcal{N}(x;\, m(z),\, \mathrm{diag}\, e^{v(z)}) - \mathrm{KL}\big(\mathcal{N}(\mu, \mathrm{diag}\, e^{\ell}) \,\|\, \mathcal{N}(0, I)\big), \qquad z = \mu + e^{\ell/2} \odot \varepsilon,$$
#
# with
#
# - log N(x; m, diag e^v) = −½ Σ_i [ (x_i − m_i)² e^{−v_i} + v_i + log 2π ],
# - KL = ½ Σ_j ( μ_j² + e^{ℓ_j} − 1 − ℓ_j ).
#
# The noise ε is given (so that the result is reproducible); z must be computed from it
# so that gradients flow through z into the encoder. Use torch operations only.

# %% nbgrader={"grade": false, "grade_id": "elbo_estimate_solution", "locked": false, "schema_version": 3, "solution": true}
def elbo_estimate(x: torch.Tensor, encoder, decoder, eps: torch.Tensor) -> torch.Tensor:
    """One-sample reparameterised ELBO per data point.

    x: (B, x_dim) data; encoder(x) -> (mu, log_var), each (B, z_dim);
    decoder(z) -> (mean, log_var), each (B, x_dim); eps: (B, z_dim) standard normal noise.
    Returns the ELBO of each data point, shape (B,).
    """
    ### BEGIN SOLUTION
    mu, log_var = encoder(x)
    z = mu + torch.exp(0.5 * log_var) * eps
    mean, dec_log_var = decoder(z)
    reconstruction = -0.5 * ((x - mean) ** 2 * torch.exp(-dec_log_var) + dec_log_var + math.log(2 * math.pi)).sum(-1)
    kl = 0.5 * (mu**2 + torch.exp(log_var) - 1.0 - log_var).sum(-1)
    return reconstruction - kl
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "elbo_estimate", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch01 import check_elbo_estimate

check_elbo_estimate(elbo_estimate)
### BEGIN HIDDEN TESTS
from boltzlab.models import GaussianDecoder, GaussianEncoder
from boltzlab.training import elbo as reference_elbo

_enc = GaussianEncoder(4, 3, hidden=(5,), seed=41).double()
_dec = GaussianDecoder(3, 4, hidden=(5,), seed=42).double()
_x = torch.randn(7, 4, generator=torch.Generator().manual_seed(43), dtype=torch.float64) * 3
_eps = torch.randn(7, 3, generator=torch.Generator().manual_seed(44), dtype=torch.float64)
_vae = VAE(_enc, _dec)
_vae.standardizer.double()
torch.testing.assert_close(elbo_estimate(_x, _enc, _dec, _eps), reference_elbo(_vae, _x, eps=_eps).elbo)
# a single data point still gives shape (1,)
assert elbo_estimate(_x[:1], _enc, _dec, _eps[:1]).shape == (1,)
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Train a VAE on the double well with your ELBO as the loss, and compare the
# mass it puts in the deep well with the exact 0.967.

# %% tags=["uses-exercise"]
def my_loss(vae: VAE, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = vae.standardizer(batch)  # the networks work on standardised coordinates
    eps = torch.randn(batch.shape[0], vae.z_dim, generator=generator)
    return -elbo_estimate(u, vae.encoder, vae.decoder, eps).mean()


my_vae = VAE.gaussian(2, 2, (S.hidden, S.hidden), data=x_dw, seed=SEED)
history = train_vae(my_vae, x_dw, S.exercise_steps, batch_size=S.batch_size, seed=SEED, loss_fn=my_loss)
deep = float((my_vae.sample(S.n_eval, torch.Generator().manual_seed(1))[:, 0] < 0).double().mean())
print(f"final loss {history.final('loss'):.3f}; P(deep well): VAE {deep:.3f}, exact {dw.well_probabilities()[0]:.3f}")

# %% [markdown]
# ## Exercise 2 · The WGAN gradient penalty (3 points)
#
# The WGAN critic f must be 1-Lipschitz. WGAN-GP enforces this softly with
#
# $$\mathrm{GP} = \frac{1}{B} \sum_{b=1}^{B} \big( \lVert \nabla_x f(\hat x_b) \rVert_2 - 1 \big)^2, \qquad \hat x_b = t_b\, x^{\text{real}}_b + (1 - t_b)\, x^{\text{fake}}_b .$$
#
# The weights t (shape (B, 1), uniform in [0, 1]) are given. The penalty is added to the
# critic's loss, so it must itself be differentiable with respect to the critic's
# parameters: compute ∇_x f with `torch.autograd.grad(..., create_graph=True)`.
# Return a scalar tensor.

# %% nbgrader={"grade": false, "grade_id": "gradient_penalty_solution", "locked": false, "schema_version": 3, "solution": true}
def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty mean_b (|grad_x f(x_hat_b)|_2 - 1)^2.

    critic: maps (B, x_dim) -> (B,); real, fake: (B, x_dim); t: (B, 1) in [0, 1].
    Returns a scalar tensor, differentiable with respect to the critic's parameters.
    """
    ### BEGIN SOLUTION
    x_hat = (t * real + (1 - t) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(dim=-1) - 1.0) ** 2).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "gradient_penalty", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch01 import check_gradient_penalty

check_gradient_penalty(gradient_penalty)
### BEGIN HIDDEN TESTS
from boltzlab.training import gradient_penalty as reference_gp

_critic = Critic(5, hidden=(7,), seed=51).double()
_g = torch.Generator().manual_seed(52)
_real, _fake = torch.randn(9, 5, generator=_g, dtype=torch.float64), torch.randn(9, 5, generator=_g, dtype=torch.float64)
_t = torch.rand(9, 1, generator=_g, dtype=torch.float64)
torch.testing.assert_close(gradient_penalty(_critic, _real, _fake, _t), reference_gp(_critic, _real, _fake, _t))
# t = 1 evaluates the penalty at the real samples exactly
torch.testing.assert_close(gradient_penalty(_critic, _real, _fake, torch.ones(9, 1, dtype=torch.float64)),
                           reference_gp(_critic, _real, _real, torch.ones(9, 1, dtype=torch.float64)))
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Train a WGAN-GP on the double well with your penalty. A critic that is
# close to 1-Lipschitz keeps the penalty small (well below 1) during training.

# %% tags=["uses-exercise"]
my_gen = Generator(2, 2, (S.hidden, S.hidden), data=x_dw, seed=SEED)
my_critic = Critic(2, (S.hidden, S.hidden), data=x_dw, seed=SEED + 1)
wgan_history = train_wgan(my_gen, my_critic, x_dw, S.exercise_steps // 4, batch_size=S.batch_size,
                          seed=SEED, penalty_fn=gradient_penalty)
print(f"critic's W1 estimate {wgan_history.final('w1', 20):.3f}, penalty {wgan_history.final('gp', 20):.4f}")

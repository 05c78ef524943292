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
# # 01 · VAE and GAN basics on configurations
#
# ## Aim
# Chapter 00 produced samples of Boltzmann distributions with MCMC. Here we train the two
# classic deep generative models, the variational autoencoder (VAE) and the generative
# adversarial network (GAN, and its Wasserstein variant WGAN), on such samples and ask
# the questions that matter for a sampler of p(x) ∝ exp(-E(x)/kT):
#
# - does the model put the right **mass in each well** (the deep well of the 2-D double
#   well holds 0.967 of the probability at kT = 1)?
# - does it **cover every mode** of GMM-40, and does it put mass **between** modes where
#   the target has none?
# - what does a VAE's latent code carry, and when does it carry nothing (**posterior
#   collapse**)?
# - what does the β of a β-VAE trade?
#
# After this chapter you can train all three models with `boltzlab.training` and measure
# each of these effects with a number, not a picture alone.

# %%
import math

import ipywidgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from tqdm.auto import tqdm

from boltzlab.config import budget, describe, set_torch_threads, sizes
from boltzlab.energies import DoubleWell2D, GaussianMixture
from boltzlab.metrics import energy_w2, mode_coverage
from boltzlab.models import VAE, Critic, Discriminator, Generator
from boltzlab.plots import density_2d, panel_grid, samples_2d, training_curve
from boltzlab.tables import table
from boltzlab.training import (
    double_well_exact_samples,
    TrainingHistory,
    elbo,
    latent_usage,
    train_gan,
    train_vae,
    train_wgan,
)
from boltzlab.widgets import slider_figure

SEED = 0
torch.manual_seed(SEED)
set_torch_threads()  # one thread: see boltzlab.config.DEFAULT_TORCH_THREADS
S = sizes("01")
SMOKE = budget() == "smoke"  # smoke runs are too short to train: they check that everything runs
H = (S.hidden, S.hidden)
print(describe(S))

# %% [markdown]
# ## Theory
#
# **Setting.** We have samples x ~ p(x) (here exact ones; in practice MCMC output from
# chapter 00) and want a model q_θ that we can sample cheaply. Neither model below needs
# the energy: they learn from samples alone (chapter 03 learns from the energy).
#
# **VAE.** A latent z ~ p(z) = N(0, I), a decoder p_θ(x | z) and an encoder
# q_φ(z | x) ≈ p_θ(z | x). The model density p_θ(x) = ∫ p(z) p_θ(x | z) dz is
# intractable, but for any q_φ
#
# $$\log p_\theta(x) = \underbrace{\mathbb{E}_{q_\phi(z|x)}[\log p_\theta(x \mid z)] - \mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))}_{\text{ELBO}(x)} + \mathrm{KL}(q_\phi(z \mid x) \,\|\, p_\theta(z \mid x)),$$
#
# so the ELBO is a lower bound, tight when the encoder is the exact posterior. With a
# Gaussian encoder N(μ_φ(x), diag σ_φ²(x)) the KL to N(0, I) is closed form,
# ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²), and the expectation is estimated with the
# **reparameterisation trick** z = μ + σ ⊙ ε, ε ~ N(0, I), which makes z differentiable
# in φ. Maximising the average ELBO over the data is (up to the bound's gap) maximum
# likelihood, i.e. minimising the *forward* KL(p ‖ p_θ): it punishes the model for
# missing any region the data visit, so VAEs tend to **cover** modes and to smear mass
# between them. The **β-VAE** weights the KL: maximise E_q[log p(x | z)] − β KL(q ‖ p(z)).
#
# **GAN.** A generator x = G_θ(z) and a discriminator D_ψ(x) (a logit) play
#
# $$\min_G \max_D \; \mathbb{E}_{p}[\log \sigma(D(x))] + \mathbb{E}_{z}[\log(1 - \sigma(D(G(z))))].$$
#
# For the optimal D the generator minimises 2 JS(p ‖ q_θ) − 2 log 2. In practice the
# generator uses the **non-saturating** loss −E log σ(D(G(z))), which keeps its gradient
# when D wins. At the optimum of the game q_θ = p, with every mode at its weight; but the
# generator reaches it only by gradient steps against a discriminator that is itself being
# fitted, and a generator that puts its samples on a subset of the modes can fool the
# current discriminator locally: GANs **drop modes** through the optimisation, not because
# the objective rewards it.
#
# **WGAN-GP.** Replace JS by the Wasserstein-1 distance, in its dual form
# W1(p, q) = sup over 1-Lipschitz f of E_p f − E_q f. The critic f is kept near
# 1-Lipschitz by the **gradient penalty**
# λ E_x̂ (‖∇f(x̂)‖₂ − 1)², x̂ = t x_real + (1 − t) x_fake, t ~ U(0, 1). W1 stays
# informative when the supports do not overlap, which steadies training.
#
# **What we measure.**
#
# | effect | number |
# |---|---|
# | mass per well (double well) | fraction with x1 < 0, against the exact 0.967 (quadrature) |
# | mode dropping (GMM-40) | `mode_coverage`: modes that received ≥ 20 % of their expected share of samples within 3.7 σ |
# | mass between modes (GMM-40) | fraction of samples farther than 4 σ from every mean; exact samples: P(χ²₂ > 16) = e⁻⁸ ≈ 3·10⁻⁴ |
# | posterior collapse | KL per latent dimension (nats) and active units, Var_x E_q[z_j] > 0.01 |
# | β trade-off | reconstruction E_q log p(x \| z), KL, and sample quality, against β |

# %% [markdown]
# ## Practice
#
# ### 1. Reference samples
# The double well factorises: x2 ~ N(0, kT) and x1 has density ∝ exp(−(x1⁴ − 6x1² + x1)/kT),
# sampled exactly by inverting its CDF on a fine grid (`double_well_exact_samples`). GMM-40
# has an exact sampler. Every model trains on `S.n_train` of these and is evaluated against
# a fresh set.

# %%
dw = DoubleWell2D()
gmm = GaussianMixture()
P_DEEP = dw.well_probabilities()[0]  # exact, by quadrature
FAR = 4.0  # "between modes": farther than FAR standard deviations from every mean


def deep_well_mass(x: torch.Tensor) -> tuple[float, float]:
    """Fraction of samples with x1 < 0 and its binomial standard error."""
    p = float((x[:, 0] < 0).double().mean())
    return p, math.sqrt(max(p * (1 - p), 1e-12) / x.shape[0])


def off_mode_fraction(x: torch.Tensor) -> float:
    """Fraction of samples farther than FAR std from the nearest GMM-40 mean."""
    nearest = torch.cdist(x.double(), gmm.means.double()).min(dim=1).values
    return float((nearest > FAR * gmm.std).double().mean())


def gmm_quality(x: torch.Tensor) -> dict[str, float]:
    return {"modes covered": mode_coverage(x, gmm.means, gmm.std)[0], "off-mode": off_mode_fraction(x)}


g_data = torch.Generator().manual_seed(SEED)
x_dw = double_well_exact_samples(S.n_train, dw, generator=g_data)
x_dw_test = double_well_exact_samples(S.n_eval, dw, generator=g_data)
x_gmm = gmm.sample(S.n_train, generator=g_data)
x_gmm_test = gmm.sample(S.n_eval, generator=g_data)

p_ref, se_ref = deep_well_mass(x_dw)
ref_quality = gmm_quality(x_gmm_test)
print(f"double well: exact P(deep) = {P_DEEP:.4f}; reference samples {p_ref:.4f} ± {se_ref:.4f}")
print(f"GMM-40 exact samples: {ref_quality['modes covered']} of 40 modes covered, "
      f"{ref_quality['off-mode']:.4f} off-mode (expected e^-8 = {math.exp(-8):.4f})")

# %%
assert abs(p_ref - P_DEEP) < 4 * se_ref, "the exact sampler disagrees with quadrature"
assert ref_quality["modes covered"] == 40 and ref_quality["off-mode"] < 0.003

# %% [markdown]
# ### 2. Three models on the double well
# Same data, same network sizes (two hidden layers of `S.hidden` units), 2-D latents.
# The VAE maximises the ELBO with Adam (learning rate 2e-3); the GAN uses the
# non-saturating loss with the usual Adam(2e-4, betas (0.5, 0.999)); the WGAN-GP takes
# `n_critic` critic steps per generator step (settings in `WGAN` below).

# %%
WGAN = dict(lr=2e-4, betas=(0.5, 0.9), n_critic=5, gp_weight=10.0)


def fit(kind: str, data: torch.Tensor, track: bool = False) -> tuple[VAE | Generator, TrainingHistory]:
    """Build one model ("VAE", "GAN" or "WGAN") for ``data`` and train it with the chapter's sizes.
    ``track``: evaluate GMM-40 coverage every ``S.eval_every`` steps."""
    common = dict(batch_size=S.batch_size, seed=SEED)
    if kind == "VAE":
        model = VAE.gaussian(2, 2, H, data=data, seed=SEED)
    else:
        model = Generator(2, 2, H, data=data, seed=SEED)
    if track:
        g_track = torch.Generator().manual_seed(SEED + 200)
        common.update(evaluate=lambda: gmm_quality(model.sample(S.n_eval, g_track)), eval_every=S.eval_every)
    if kind == "VAE":
        return model, train_vae(model, data, S.vae_steps, **common)
    if kind == "GAN":
        return model, train_gan(model, Discriminator(2, H, data=data, seed=SEED + 1), data, S.gan_steps, **common)
    return model, train_wgan(model, Critic(2, H, data=data, seed=SEED + 1), data, S.wgan_steps, **WGAN, **common)


vae_dw, hist_vae_dw = fit("VAE", x_dw)
gan_dw, hist_gan_dw = fit("GAN", x_dw)
wgan_dw, hist_wgan_dw = fit("WGAN", x_dw)

# %%
g_eval = torch.Generator().manual_seed(SEED + 100)
with torch.no_grad():
    dw_samples = {
        "exact": x_dw_test,
        "VAE": vae_dw.sample(S.n_eval, g_eval),
        "GAN": gan_dw.sample(S.n_eval, g_eval),
        "WGAN": wgan_dw.sample(S.n_eval, g_eval),
    }
e_test = dw.energy(x_dw_test)
dw_table = {}
dw_rows = []
for name, x in dw_samples.items():
    p, se = deep_well_mass(x)
    e = dw.energy(x)
    w2 = energy_w2(e, e_test) if name != "exact" else 0.0
    dw_table[name] = (p, se, w2)
    dw_rows.append({"samples": name, "P(deep well)": f"{p:.4f} ± {se:.4f}", "P(shallow well)": 1 - p,
                    "std(x2)": float(x[:, 1].std()), "energy W2": w2, "max energy": float(e.max())})
dw_rows.append({"samples": "exact (quadrature; x2 ~ N(0, kT))", "P(deep well)": f"{P_DEEP:.4f}",
                "P(shallow well)": 1 - P_DEEP, "std(x2)": math.sqrt(dw.kT)})
display(table(dw_rows, float_format=".3f", formats={"P(shallow well)": ".4f", "max energy": ".1f"}))

# %%
fig, axes = panel_grid(5)
for ax, (name, x) in zip(axes, dw_samples.items()):
    density_2d(dw, (-3, 3), (-4, 4), grid=120, ax=ax, colorbar=False)
    samples_2d(x, ax=ax, max_points=2000)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-4, 4)
    ax.set_title(f"{name}: P(deep) = {dw_table[name][0]:.3f}")
u = torch.linspace(-3, 3, 601, dtype=torch.float64)
marginal = torch.exp(-(u**4 - 6 * u**2 + u) / dw.kT)
marginal /= torch.trapezoid(marginal, u)
axes[4].plot(u, marginal, color="k", label="exact p(x1)")
for name in ("VAE", "GAN", "WGAN"):
    axes[4].hist(dw_samples[name][:, 0].numpy(), bins=120, range=(-3, 3), density=True, histtype="step", label=name)
axes[4].set_yscale("log")
axes[4].set_ylim(1e-4, 2)
axes[4].set_xlabel("$x_1$")
axes[4].set_title("marginal of $x_1$ (log scale)")
axes[4].legend(fontsize="small")
plt.show()

# %% [markdown]
# Read the table and the log-scale marginal: the shallow well (x1 > 0) holds 3.3 % of
# the exact probability. The GAN's samples mostly or entirely miss it: this is **mode
# dropping** on the smallest possible example, a mode with 1/30 of the mass. The WGAN's
# share of the shallow well is not right either (compare it with the quadrature line),
# and in this budget its samples may still crowd onto a curve: std(x2) against the
# exact 1 tells.
# The VAE keeps some mass there, though less than the exact share, and spreads its
# samples into the barrier around x1 ≈ 0 and beyond the walls. Look at the largest
# energy among its samples: latent codes from the prior's tails, where the decoder
# extrapolates, can land far up the quartic walls, at energies no exact sample has, and
# a handful of those is enough to make its energy W2 large. A VAE's prior can send
# samples where no training data were.

# %%
if not SMOKE:
    shallow = {name: 1 - dw_table[name][0] for name in dw_table}
    # the GAN keeps less than half of the shallow well's 3.3 % (it drops the mode)
    assert shallow["GAN"] < 0.5 * (1 - P_DEEP), shallow
    # every model still puts most of its mass in the deep well
    assert all(dw_table[name][0] > 0.85 for name in dw_table), dw_table
assert all(bool(torch.isfinite(x).all()) for x in dw_samples.values())

# %% [markdown]
# ### 3. GMM-40: mode covering against mode seeking
# Forty modes of width 1.3 spread over an 80 × 80 box. During training we count the modes
# covered and the fraction of samples between modes every `S.eval_every` steps.

# %%
vae_gmm, hist_vae_gmm = fit("VAE", x_gmm, track=True)
gan_gmm, hist_gan_gmm = fit("GAN", x_gmm, track=True)
wgan_gmm, hist_wgan_gmm = fit("WGAN", x_gmm, track=True)

# %%
with torch.no_grad():
    gmm_samples = {
        "exact": x_gmm_test,
        "VAE": vae_gmm.sample(S.n_eval, g_eval),
        "VAE (decoder mean)": vae_gmm.sample(S.n_eval, g_eval, noise=False),
        "GAN": gan_gmm.sample(S.n_eval, g_eval),
        "WGAN": wgan_gmm.sample(S.n_eval, g_eval),
    }
gmm_table = {name: gmm_quality(x) for name, x in gmm_samples.items()}
display(table([{"samples": name, "modes covered (of 40)": q["modes covered"], "off-mode fraction": q["off-mode"]}
               for name, q in gmm_table.items()], float_format=".4f"))

# %%
fig, axes = panel_grid(4)
for ax, name in zip(axes, ("exact", "VAE", "GAN", "WGAN")):
    density_2d(gmm, (-45, 45), (-45, 45), grid=150, ax=ax, colorbar=False)
    samples_2d(gmm_samples[name], ax=ax, max_points=3000, size=2)
    ax.set_xlim(-45, 45)
    ax.set_ylim(-45, 45)
    q = gmm_table[name]
    ax.set_title(f"{name}: {q['modes covered']}/40 modes, {100 * q['off-mode']:.1f}% off-mode")
plt.show()

fig, (ax1, ax2) = panel_grid(2)
for name, hist in (("VAE", hist_vae_gmm), ("GAN", hist_gan_gmm), ("WGAN", hist_wgan_gmm)):
    ax1.plot(hist.eval_steps, hist.evaluations["modes covered"], marker="o", label=name)
    ax2.plot(hist.eval_steps, hist.evaluations["off-mode"], marker="o", label=name)
ax1.set_xlabel("training step")
ax1.set_ylabel("modes covered (of 40)")
ax2.set_xlabel("training step")
ax2.set_ylabel("fraction off-mode")
ax1.legend()
plt.show()

# %% [markdown]
# The VAE reaches (nearly) every mode, the signature of the mass-covering forward KL, but
# a large fraction of its samples lie more than 4σ from every mean: **blurry mass
# between modes**. Part of it is the decoder's noise (compare "VAE (decoder mean)"), part
# is the decoder's mean itself, a continuous map from a 2-D Gaussian that must stretch
# across the gaps between modes. The GAN covers fewer modes: **mode dropping**, and the
# curve above shows the set of covered modes still changing during training. Its
# generator is continuous too, so in this budget it also leaves many samples between
# modes (the fraction falls with longer training). The WGAN-GP trains steadily: its W1
# estimate falls smoothly (training curves at the end of the chapter) where the GAN's
# losses say nothing about progress, and per generator step it covers modes at least
# as fast as the GAN; each of its steps costs five critic updates, so it gets fewer
# generator steps in the same budget. Its samples still bridge the modes: the critic's
# Lipschitz bound does not make a continuous generator discontinuous. GMM-40 has a few
# pairs of means closer than 2σ (modes 22 and 29 are 1.18 apart), which `mode_coverage`
# counts as two modes that are covered or missed together. The coverage of one set of
# 5000 samples fluctuates by a mode or two from set to set (compare the last point of
# the curve, drawn from other samples, with the table).

# %%
if not SMOKE:
    vae_q, gan_q = gmm_table["VAE"], gmm_table["GAN"]
    assert gan_q["modes covered"] < 40, "the GAN dropped no mode"
    assert vae_q["modes covered"] >= 33, vae_q
    # blur: the VAE puts at least 100x the exact fraction of samples between the modes
    assert vae_q["off-mode"] > 0.05 and vae_q["off-mode"] > 100 * ref_quality["off-mode"] + 0.01, vae_q
assert all(0 <= q["modes covered"] <= 40 for q in gmm_table.values())

# %% [markdown]
# ### 4. Posterior collapse
# Give the VAE a decoder that can model p(x) without z: an **autoregressive mixture**
# p(x | z) = p(x1 | z) p(x2 | x1, z), each factor a mixture of 8 Gaussians. Then the
# ELBO's best trade is to ignore z: any information in z costs KL, and the decoder does
# not need it. The encoder's posterior collapses onto the prior, q(z | x) = N(0, I) for
# every x. We measure the KL per latent dimension and the active units on test samples,
# and compare with the Gaussian-decoder VAE of section 2. As a yardstick for the ELBO,
# E_p[log p(x)] = −E_p[E]/kT − log Z is the best any model can reach on average.

# %%
vae_ar = VAE.autoregressive(2, 2, H, n_components=8, data=x_dw, seed=SEED)
hist_ar = train_vae(vae_ar, x_dw, S.collapse_steps, batch_size=S.batch_size, seed=SEED)

g_elbo = torch.Generator().manual_seed(SEED + 300)
best_log_p = float((-e_test / dw.kT).mean()) - dw.log_z()
collapse = {}
with torch.no_grad():
    for name, model in (("Gaussian decoder", vae_dw), ("autoregressive decoder", vae_ar)):
        usage = latent_usage(model, x_dw_test)
        collapse[name] = dict(
            usage=usage,
            elbo=float(elbo(model, x_dw_test, generator=g_elbo).elbo.mean()),
            deep=deep_well_mass(model.sample(S.n_eval, g_eval))[0],
        )
print(f"E_p[log p(x)] (exact) = {best_log_p:.3f}")
display(table([{"decoder": name, "KL per latent dim (nats)": ", ".join(f"{v:.4f}" for v in c["usage"].kl_per_dim.tolist()),
                "active units (of 2)": c["usage"].active_units, "ELBO": c["elbo"], "P(deep)": c["deep"]}
               for name, c in collapse.items()], float_format=".3f"))

# %%
fig, axes = panel_grid(2)
for ax, (name, model) in zip(axes, (("Gaussian decoder", vae_dw), ("autoregressive decoder", vae_ar))):
    with torch.no_grad():
        mu, _ = model.encode(x_dw_test)
    art = ax.scatter(mu[:, 0], mu[:, 1], c=x_dw_test[:, 0], s=3, cmap="coolwarm", vmin=-2, vmax=2)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_title(name)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
fig.colorbar(art, ax=axes, label="$x_1$ of the encoded sample")
fig.suptitle("encoder means $\\mu(x)$ of test samples")
plt.show()

# %% [markdown]
# With the Gaussian decoder the encoder means spread out and are ordered by x1: one
# latent dimension carries almost all of the KL (it encodes the well), while x2, a
# Gaussian, is left to the decoder's noise. Look where the shallow-well samples (red)
# are encoded: out in the prior's tail, where the prior rarely draws z, which is one way
# a VAE ends up underweighting a minor mode. With the autoregressive decoder every x is
# encoded to the same point, the KL per dimension is ≈ 0 and no unit is active, yet its
# ELBO is the better one, close to E_p[log p]. Collapse is not a failure to fit the
# data: it is a representation that carries nothing, chosen because it is optimal for
# this objective.

# %%
if not SMOKE:
    ar, gauss = collapse["autoregressive decoder"], collapse["Gaussian decoder"]
    assert ar["usage"].active_units == 0 and ar["usage"].kl_total < 0.05, ar
    assert gauss["usage"].active_units >= 1 and gauss["usage"].kl_total > 0.3, gauss
    assert ar["elbo"] > gauss["elbo"], (ar["elbo"], gauss["elbo"])
    assert ar["elbo"] < best_log_p + 0.05  # a bound (up to Monte Carlo noise)

# %% [markdown]
# ### 5. The β-VAE trade-off
# One VAE per β on GMM-40, each trained for `S.beta_steps` steps. On held-out exact
# samples we measure the two terms of the objective, and on model samples the quality.

# %%
BETAS = (0.1, 0.3, 1.0, 2.0, 4.0)
sweep = {}
for beta in tqdm(BETAS, desc="beta-VAEs"):
    model = VAE.gaussian(2, 2, H, data=x_gmm, seed=SEED)
    train_vae(model, x_gmm, S.beta_steps, batch_size=S.batch_size, beta=beta, seed=SEED, progress=False)
    with torch.no_grad():
        terms = elbo(model, x_gmm_test, generator=torch.Generator().manual_seed(SEED + 400))
        x_model = model.sample(S.n_eval, torch.Generator().manual_seed(SEED + 500))
    sweep[beta] = dict(
        reconstruction=float(terms.reconstruction.mean()),
        kl=float(terms.kl.sum(-1).mean()),
        elbo=float(terms.elbo.mean()),
        active=latent_usage(model, x_gmm_test).active_units,
        samples=x_model,
        **gmm_quality(x_model),
    )
display(table([{"beta": beta, "E_q log p(x|z)": r["reconstruction"], "KL": r["kl"], "ELBO": r["elbo"],
                "active units": r["active"], "modes covered": r["modes covered"], "off-mode fraction": r["off-mode"]}
               for beta, r in sweep.items()], float_format=".3f", formats={"beta": ".1f"}))

# %%
fig, (ax1, ax2) = panel_grid(2)
ax1.plot(BETAS, [sweep[b]["reconstruction"] for b in BETAS], marker="o", label="reconstruction $E_q \\log p(x|z)$")
ax1.plot(BETAS, [-sweep[b]["kl"] for b in BETAS], marker="o", label="$-$KL$(q(z|x) \\| p(z))$")
ax1.plot(BETAS, [sweep[b]["elbo"] for b in BETAS], marker="o", label="ELBO")
ax1.set_xscale("log")
ax1.set_xlabel("β")
ax1.set_ylabel("nats per sample")
ax1.legend(fontsize="small")
ax2.plot(BETAS, [sweep[b]["off-mode"] for b in BETAS], marker="o", color="C3")
ax2.set_xscale("log")
ax2.set_xlabel("β")
ax2.set_ylabel("fraction of samples off-mode")
plt.show()


# %%
def draw_beta(fig, beta):
    r = sweep[beta]
    ax = fig.add_subplot()
    density_2d(gmm, (-45, 45), (-45, 45), grid=120, ax=ax, colorbar=False)
    samples_2d(r["samples"], ax=ax, max_points=3000, size=2)
    ax.set_xlim(-45, 45)
    ax.set_ylim(-45, 45)
    ax.set_title(f"β = {beta}: rec {r['reconstruction']:.2f}, KL {r['kl']:.2f} nats, "
                 f"{r['modes covered']}/40 modes, {100 * r['off-mode']:.0f}% off-mode", fontsize="medium")
    return r


beta_widget = slider_figure(
    draw_beta, figsize=(6.0, 5.5),
    beta=ipywidgets.SelectionSlider(options=list(BETAS), value=1.0, description="β", continuous_update=False),
)
beta_widget

# %% [markdown]
# Small β buys reconstruction with KL: the code carries more about x and reconstructions
# are sharp, but the aggregate posterior no longer matches N(0, I), so samples from the
# prior land in regions the decoder never learned. Large β squeezes the KL; past a point
# (on this data between β = 1 and 4) it drops to zero, every unit goes inactive, and the
# decoder can only produce one broad Gaussian over the whole box: posterior collapse
# again, this time forced by the objective's weight instead of the decoder's strength.
# For β ≥ 1 the objective is still a lower bound on log p(x) (the KL term is non-negative,
# so weighting it more only loosens the bound); β = 1 is the tightest, the ELBO itself, and
# for β < 1 it is no bound at all.

# %%
if not SMOKE:
    lo, hi = sweep[BETAS[0]], sweep[BETAS[-1]]
    assert lo["kl"] > hi["kl"] + 1.0, (lo["kl"], hi["kl"])
    assert lo["reconstruction"] > hi["reconstruction"] + 1.0, (lo["reconstruction"], hi["reconstruction"])
    assert hi["active"] == 0 and hi["off-mode"] > lo["off-mode"], hi
assert beta_widget.state is sweep[1.0]

# %% [markdown]
# ### Training curves
# The losses of adversarial training do not go down like a likelihood: a GAN's
# discriminator loss hovers near its equilibrium (2 log 2 ≈ 1.39 when D cannot tell),
# whatever the generator does; the WGAN critic's W1 estimate is a curve that tracks
# progress.

# %%
fig, axes = panel_grid(3)
training_curve({"-ELBO": [-v for v in hist_vae_gmm["elbo"]]}, ax=axes[0], smooth=50, ylabel="nats")
training_curve({"D loss": hist_gan_gmm["d_loss"], "G loss": hist_gan_gmm["g_loss"]}, ax=axes[1], smooth=50)
training_curve({"W1 estimate": hist_wgan_gmm["w1"]}, ax=axes[2], smooth=50, ylabel="critic W1")
for ax, title in zip(axes, ("VAE (GMM-40)", "GAN (GMM-40)", "WGAN-GP (GMM-40)")):
    ax.set_title(title)
plt.show()

# %% [markdown]
# ## Discussion
#
# - **Mass per mode is the first thing to check** and the easiest to get wrong silently.
#   A scatter plot of GAN samples on the double well looks fine; only the count in the
#   shallow well (3.3 % exact) shows that it is missing. For Boltzmann distributions a
#   minor mode is often exactly what you care about (a metastable state).
# - **Coverage and precision are two numbers.** The VAE covers modes but puts a large
#   fraction of samples where p is essentially zero; the GAN leaves modes empty. A model
#   can fail either way, or both: report both numbers.
# - **Reweighting needs a density.** A GAN has none, so its bias cannot be corrected by
#   importance sampling, the tool of chapters 03 and 06. A VAE's marginal q(x) is only
#   bounded, but its joint q(x, z) = p(z) p_θ(x | z) is exact: weights
#   w = e^{−E(x)/kT} r(z | x) / (p(z) p_θ(x | z)), with any normalised r (its encoder, say),
#   reweight (x, z) pairs to a target whose x-marginal is the Boltzmann distribution, at the
#   price of the variance the latent adds. Normalizing flows (chapter 02) have exact
#   densities of x itself, which is why Boltzmann generators use them.
# - **They need samples.** Everything here learned from reference samples, which for a real
#   molecule come from the expensive MCMC we wanted to avoid. Chapter 03 trains from the
#   energy alone.
# - **What can go wrong in your own runs:** adversarial training is sensitive to the
#   learning rates and the number of critic steps (try `WGAN["lr"] = 1e-3` with
#   `WGAN["n_critic"] = 2` in section 3 and watch the modes-covered curve); the VAE's
#   posterior collapse is silent in the loss (the ELBO even improves), so always look at
#   the KL per dimension; `mode_coverage` with too few samples per mode reports dropped
#   modes that are only unlucky, so keep N/40 ≥ 25.
#
# ## Summary
# - The ELBO is log p(x) minus the gap KL(q(z|x) ‖ p(z|x)); the reparameterisation trick
#   makes it differentiable in the encoder.
# - VAEs (forward KL) cover modes and blur mass between them; GANs drop modes, measured as
#   modes covered of 40 and mass in the double well's shallow well.
# - A decoder that can model p(x) without z makes the optimal encoder ignore x:
#   KL per latent dimension ≈ 0, no active units, a good ELBO.
# - β trades reconstruction against KL; large β collapses the code.
# - WGAN-GP replaces the discriminator by a critic kept 1-Lipschitz by a gradient penalty.
#
# ## Exercises
# Open `exercises/01_vae_gan.ipynb` (solutions are for instructors): implement the ELBO
# with the reparameterisation trick, and the WGAN gradient penalty. Each has a check cell
# that tells you what is wrong.

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
# # 05 · DEM score estimation
#
# ## Aim
#
# Denoising energy matching (DEM, iDEM) trains a diffusion sampler without data: its
# regression target is a **Monte Carlo estimate of the score of the noised Boltzmann
# density**, computed from the energy alone. Everything iDEM learns is only as good as this
# estimate. In this chapter you will
#
# - derive the estimator and two tempting alternatives (the Jensen "mean of scores" and the
#   naive ratio without the logsumexp trick);
# - **measure** bias, variance and MSE of each against the *exact* noised score of GMM-40, as
#   functions of the number of copies $K$ and of the noise level $\sigma_t$;
# - see how the estimate degrades with dimension (cosine similarity up to $d = 1000$), why
#   logsumexp is not optional on Lennard-Jones clusters, and what clipping and Richardson
#   extrapolation buy.

# %%
import itertools

import ipywidgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from tqdm.auto import tqdm

from boltzlab.config import describe, set_torch_threads, sizes
from boltzlab.energies import GaussianMixture, lj13, lj55
from boltzlab.estimators import ESTIMATORS, estimator_error, gmm_noised_score, mc_score, score_quality_by_dimension
from boltzlab.plots import panel_grid
from boltzlab.reference import load_reference
from boltzlab.tables import table
from boltzlab.widgets import slider_figure

SEED = 0
torch.manual_seed(SEED)
set_torch_threads()  # one thread: see boltzlab.config.DEFAULT_TORCH_THREADS
S = sizes("05")
print(describe(S))

# %% [markdown]
# ## Theory
#
# **The noised density and its score.** The VE diffusion adds Gaussian noise:
# $x_t = x_0 + \sigma_t \epsilon$, so $p_t = p * \mathcal N(0, \sigma_t^2 I)$, i.e.
# $p_t(x) = \mathbb E_{\epsilon}\,[p(x + \sigma_t\epsilon)]$ with $p \propto e^{-E/kT}$.
# Differentiating under the expectation ($\nabla p = p\,F/kT$ with forces $F = -\nabla E$):
#
# $$\nabla \log p_t(x) = \frac{\mathbb E_\epsilon\big[e^{-E(x+\sigma_t\epsilon)/kT}\,F(x+\sigma_t\epsilon)/kT\big]}
#                              {\mathbb E_\epsilon\big[e^{-E(x+\sigma_t\epsilon)/kT}\big]} .$$
#
# $Z$ cancels. With $K$ draws $\epsilon_k$, copies $x_k = x + \sigma_t\epsilon_k$ and log-weights
# $l_k = -E(x_k)/kT$:
#
# | estimator | formula | what it estimates |
# |---|---|---|
# | **LSE** (DEM) | $S_K = \sum_k \operatorname{softmax}_k(l)\,F(x_k)/kT$ | $\nabla\log p_t$; consistent, bias $O(1/K)$ (a ratio of means), variance $O(1/K)$ |
# | **naive** | $\dfrac{\sum_k e^{l_k} F(x_k)/kT}{\sum_k e^{l_k}}$ | the same number in exact arithmetic; numerator and denominator each unbiased, but $e^{l_k}$ overflows ($l_k > 88$ in float32) or underflows (all $l_k < -103$) |
# | **Jensen** | $\frac1K\sum_k F(x_k)/kT$ | $\mathbb E_\epsilon[\nabla\log p(x+\sigma_t\epsilon)] = \nabla(\log p * \mathcal N_{\sigma_t})(x)$, the gradient of the *smoothed log-density*, which by Jensen lies below $\log p_t$. Unbiased for that, biased for $\nabla\log p_t$ at every $K$ |
#
# For one Gaussian $p = \mathcal N(\mu, s^2 I)$ the last row is exact: Jensen converges to
# $-(x-\mu)/s^2$, the true noised score is $-(x-\mu)/(s^2+\sigma_t^2)$.
#
# **Richardson extrapolation.** $\mathbb E[S_K] = \nabla\log p_t + b/K + O(1/K^2)$, so from $2K$
# copies split in halves $A, B$: $R = 2S_{2K} - \tfrac12(S_K^A + S_K^B)$ has bias $O(1/K^2)$ for the
# same $2K$ energy evaluations, at the price of more variance.
#
# **Clipping.** Near overlapping particles forces are enormous; iDEM clips the target's norm
# (per particle here: $v_i \leftarrow v_i \min(1, c/|v_i|)$), trading bias for bounded targets.
#
# **Exact reference.** GMM-40 convolved with $\mathcal N(0,\sigma^2 I)$ is again a Gaussian
# mixture with the same means and standard deviation $\sqrt{s^2 + \sigma^2}$
# (`gmm_noised_score`), so every error below is measured against the exact answer.

# %% [markdown]
# ## Practice
#
# ### 1. Bias and variance versus $K$ and $\sigma_t$ on GMM-40
#
# Points $x_t = x_0 + \sigma_t\epsilon$ with exact samples $x_0$ (so $x_t \sim p_t$). At each point
# we draw `n_repeats` independent estimates and split the MSE into bias² and variance.

# %%
gmm = GaussianMixture()
g = torch.Generator().manual_seed(SEED)
METHODS = [("lse", False), ("jensen", False), ("lse", True)]
LABELS = {("lse", False): "LSE", ("jensen", False): "Jensen", ("lse", True): "LSE + Richardson"}


def noised_points(n: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = gmm.sample(n, g, dtype=torch.float64)
    x_t = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x_t, gmm_noised_score(gmm, x_t, sigma)


def sweep_k(sigma: float) -> dict:
    x_t, exact = noised_points(S.n_points, sigma)
    out = {key: [] for key in METHODS}
    # methods outer, K inner: the generator's draws come in the same order as a nested loop
    for (est, rich), k in tqdm(list(itertools.product(METHODS, S.k_values)), desc=f"K sweep at sigma = {sigma}"):
        # Richardson spends 2K evaluations on R = 2 S_2K - mean(S_K): compare at equal cost 2K
        out[(est, rich)].append(estimator_error(gmm, x_t, sigma, exact, k // 2 if rich else k, S.n_repeats,
                                                estimator=est, richardson=rich, generator=g))
    return out


SIGMA_MID = 1.0
by_k = sweep_k(SIGMA_MID)
ks = np.array(S.k_values)
fig, axes = panel_grid(2)
for key, errs in by_k.items():
    axes[0].loglog(ks, [e.mse for e in errs], "o-", label=LABELS[key])
    axes[1].loglog(ks, [max(e.bias2 - e.variance / S.n_repeats, 1e-12) for e in errs], "o-", label=LABELS[key])
axes[0].loglog(ks, by_k[("lse", False)][0].mse * ks[0] / ks, "k:", label="1/K")
axes[0].set(xlabel="K (energy evaluations per point)", ylabel="MSE", title=f"MSE vs K, sigma = {SIGMA_MID}")
axes[1].set(xlabel="K", ylabel="bias² (noise-corrected)", title="bias² vs K")
for ax in axes:
    ax.legend()
plt.show()

# %%
lse_mse = [e.mse for e in by_k[("lse", False)]]
jen = by_k[("jensen", False)]
slope = np.polyfit(np.log(ks), np.log(lse_mse), 1)[0]
print(f"LSE: log-log slope of MSE vs K = {slope:.2f} (1/K gives -1)")
print(f"Jensen at K = {ks[-1]}: MSE {jen[-1].mse:.3f}, of which bias² {jen[-1].bias2:.3f}; LSE MSE {lse_mse[-1]:.4f}")
assert -1.4 < slope < -0.6
assert jen[-1].bias2 > 0.5 * jen[-1].mse  # Jensen's error is bias: more copies do not help
assert lse_mse[-1] < jen[-1].mse / 5

# %% [markdown]
# The LSE error falls like $1/K$; the Jensen error flattens at its bias. Now fix $K$ and vary
# the noise level: large $\sigma_t$ spreads the copies over many modes, and the weights
# degenerate (a few copies carry all the weight).

# %%
K_MID = S.k_values[-2]
by_sigma = {key: [] for key in METHODS}
for sigma in tqdm(S.sigmas, desc="noise levels"):
    x_t, exact = noised_points(S.n_points, sigma)
    for est, rich in METHODS:
        by_sigma[(est, rich)].append(estimator_error(gmm, x_t, sigma, exact, K_MID // 2 if rich else K_MID,
                                                     S.n_repeats, estimator=est, richardson=rich, generator=g))
fig, ax = plt.subplots(figsize=(6, 4))
for key, errs in by_sigma.items():
    ax.loglog(S.sigmas, [e.relative_mse for e in errs], "o-", label=LABELS[key])
ax.set(xlabel=r"noise level $\sigma_t$", ylabel="MSE / E|score|²", title=f"relative MSE vs noise level, K = {K_MID}")
ax.legend()
plt.tight_layout()
rel = [e.relative_mse for e in by_sigma[("lse", False)]]
print("LSE relative MSE by sigma:", {s: round(r, 4) for s, r in zip(S.sigmas, rel)})
assert rel[-1] > 10 * rel[0]  # the estimate degrades with the noise level

# %% [markdown]
# ### 2. A widget over $K$ and $\sigma_t$
#
# Black arrows: the exact score of $p_t$ on a grid around a few GMM-40 modes; red: one LSE
# estimate with $K$ copies. Small $\sigma_t$ with few copies is already accurate; large
# $\sigma_t$ needs many.

# %%
centre = gmm.means[gmm.nearest_mode(torch.zeros(1, 2))[0]].double()
axis = torch.linspace(-12, 12, S.widget_grid, dtype=torch.float64)
grid = torch.cartesian_prod(axis, axis) + centre


def draw_field(fig, K: int, sigma: float) -> dict:
    exact = gmm_noised_score(gmm, grid, sigma)
    est = mc_score(gmm, grid, sigma, K, generator=torch.Generator().manual_seed(SEED))
    scale = float(exact.norm(dim=-1).max())
    ax = fig.add_subplot()
    ax.quiver(grid[:, 0], grid[:, 1], exact[:, 0] / scale, exact[:, 1] / scale, color="k", angles="xy")
    ax.quiver(grid[:, 0], grid[:, 1], est[:, 0] / scale, est[:, 1] / scale, color="r", alpha=0.6, angles="xy")
    ax.plot(*gmm.means.T, "b*")
    ax.set(xlim=(grid[:, 0].min() - 2, grid[:, 0].max() + 2), ylim=(grid[:, 1].min() - 2, grid[:, 1].max() + 2))
    rel_err = float(((est - exact) ** 2).sum() / (exact**2).sum())
    ax.set_title(f"K = {K}, sigma = {sigma:.2g}: relative squared error {rel_err:.3f}")
    return {"relative_error": rel_err}


widget = slider_figure(
    draw_field,
    K=ipywidgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], value=16),
    sigma=ipywidgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1.3, step=0.1),
)
widget

# %% [markdown]
# ### 3. Dimension: cosine similarity up to $d = 1000$
#
# In $d$ dimensions the log-weights $l_k$ of the copies spread out by $O(\sqrt d)$, the Kish
# ESS collapses to about 1, and the estimate becomes the score of the single best copy. We use
# an isotropic Gaussian $\mathcal N(0, I_d)$ (noised score exact: $-x/(1+\sigma^2)$) at
# $\sigma_t = 1$ and report the cosine similarity to the exact score and the norm ratio.

# %%
dim_rows = []
for d in tqdm(S.dims, desc="dimensions"):
    row = {"d": d, **score_quality_by_dimension(d, S.dim_points, S.dim_k, sigma=1.0,
                                                generator=torch.Generator().manual_seed(d))}
    dim_rows.append(row)
display(table([{"d": r["d"], f"ESS (of {S.dim_k})": r["ess"], "cosine LSE": r["cos_lse"], "cosine Jensen": r["cos_jensen"],
                "|S| / |score| LSE": r["ratio_lse"], "|S| / |score| Jensen": r["ratio_jensen"]} for r in dim_rows],
              float_format=".3f", formats={f"ESS (of {S.dim_k})": ".1f"}))
fig, axes = panel_grid(2)
dims = [r["d"] for r in dim_rows]
for est in ("lse", "jensen"):
    axes[0].semilogx(dims, [r[f"cos_{est}"] for r in dim_rows], "o-", label=est)
    axes[1].semilogx(dims, [r[f"ratio_{est}"] for r in dim_rows], "o-", label=est)
axes[0].set(xlabel="dimension d", ylabel="cosine similarity", title=f"K = {S.dim_k}, sigma = 1")
axes[1].set(xlabel="dimension d", ylabel="|estimate| / |exact score|")
for ax in axes:
    ax.legend()
plt.show()
assert max(S.dims) >= 1000
assert dim_rows[-1]["cos_lse"] < dim_rows[0]["cos_lse"] - 0.1  # the LSE direction degrades with d
assert dim_rows[-1]["ess"] < 2.0  # weight degeneracy: one copy carries the estimate
assert all(abs(r["ratio_jensen"] - 2.0) < 0.1 for r in dim_rows)  # Jensen: -x/s^2, twice too long

# %% [markdown]
# Cosine similarity alone would crown Jensen (its direction is perfect for one Gaussian),
# while its length is off by exactly $(s^2+\sigma^2)/s^2 = 2$ at every $d$ and every $K$.
#
# ### 4. Why logsumexp: Lennard-Jones in float32
#
# On LJ-55 at the benchmark temperature the energies of reference configurations are far below
# $-88\,kT$, so $e^{-E/kT}$ overflows float32; on LJ-13 at larger $\sigma_t$ every copy of a point can
# have near-overlapping particles (energies up to $10^{24}$) and every weight underflows. The naive
# ratio then returns NaN (printed fractions below).

# %%
rows = []
for target in (lj13(), lj55()):
    x = load_reference(target.name, S.lj_points)
    e_ref = target.energy(x)
    for sigma in tqdm((0.01, 0.1, 0.5), desc=target.name):
        lse = mc_score(target, x, sigma, S.lj_k, generator=torch.Generator().manual_seed(SEED))
        naive = mc_score(target, x, sigma, S.lj_k, generator=torch.Generator().manual_seed(SEED), estimator="naive")
        frac_bad = float((~torch.isfinite(naive)).any(-1).float().mean())
        rows.append((target.name, sigma, float(e_ref.min()), frac_bad, bool(torch.isfinite(lse).all())))
        print(f"{target.name}, sigma = {sigma}: min E of the points {rows[-1][2]:.1f}; naive NaN/inf at "
              f"{100 * frac_bad:.0f}% of points; LSE finite everywhere: {rows[-1][4]}")
assert all(r[4] for r in rows)
assert all(r[3] > 0.0 for r in rows if r[0] == "lj55")  # naive fails on LJ-55 at every sigma
assert any(r[3] == 1.0 for r in rows if r[0] == "lj55")

# %% [markdown]
# ### 5. Clipping the targets
#
# At moderate noise a single copy with a near-overlap dominates the weights and the estimate
# inherits its force. Per-particle norms of LJ-13 targets at $\sigma_t = 0.3$:

# %%
lj = lj13()
x = load_reference("lj13", S.lj_points)
raw = mc_score(lj, x, 0.3, S.lj_k, generator=torch.Generator().manual_seed(SEED))
clipped = mc_score(lj, x, 0.3, S.lj_k, generator=torch.Generator().manual_seed(SEED), max_norm=100.0)
norms = raw.reshape(-1, 13, 3).norm(dim=-1).flatten()
print(f"per-particle |S|: median {float(norms.median()):.1f}, max {float(norms.max()):.3g}; "
      f"{100 * float((norms > 100).float().mean()):.1f}% above the clip at 100")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(np.log10(norms.numpy() + 1e-12), bins=40)
ax.axvline(2.0, color="r", label="clip |v_i| = 100")
ax.set(xlabel=r"$\log_{10}$ per-particle $|S_K|$", ylabel="count", title="LJ-13 targets, sigma = 0.3")
ax.legend()
plt.tight_layout()
assert float(clipped.reshape(-1, 13, 3).norm(dim=-1).max()) <= 100.0 + 1e-3
com_raw = float(raw.reshape(-1, 13, 3).sum(1).norm(dim=-1).max())
com_clipped = float(clipped.reshape(-1, 13, 3).sum(1).norm(dim=-1).max())
print(f"largest |sum_i S_i| (centre-of-mass component): raw {com_raw:.3g}, clipped per particle {com_clipped:.3g}")
assert com_raw < 1e-4 * float(norms.max())  # the raw target lives in the COM-free subspace

# %% [markdown]
# ## Discussion
#
# - **Bias vs variance.** The LSE estimator's error is variance-dominated at small $\sigma_t$
#   and falls as $1/K$ (slope printed above). At large $\sigma_t$ the weights degenerate,
#   the relative error grows by orders of magnitude, and bias becomes visible: that is where
#   Richardson extrapolation helps on bias (the bias² panel) and hurts on variance.
# - **Jensen is not a cheaper LSE.** It converges, but to the gradient of the smoothed
#   log-density. Its error does not fall with $K$; on a Gaussian its length is off by
#   $(s^2 + \sigma^2)/s^2$. Cosine similarity hides this, so report norms or MSE too.
# - **Dimension.** In high dimension the ESS of the copies drops to about 1 and the estimator
#   becomes the noisy score of one copy. This is why iDEM's published LJ-13 runs use about a
#   thousand copies (39 coordinates), why LJ-55 gets expensive, and why the noise schedule's
#   largest $\sigma_t$ matters; chapter 06 measures how well it works on LJ-13 on a CPU, rather
#   than assuming it.
# - **Numerics.** The naive ratio is the same formula, but in float32 it fails on part
#   of the LJ-55 configurations at every noise level above (all of them at the smallest); the
#   logsumexp shift costs nothing and is the only practical choice.
# - **Clipping** bounds rare huge targets from near-overlaps; it biases the target, so the
#   clip should be loose enough that it binds only on those outliers (printed percentage).
#   Per-particle clipping also gives the target a centre-of-mass component (printed above):
#   project it out again (`remove_com`) before regressing an equivariant model onto it.
#
# ## Summary
#
# - $\nabla\log p_t(x) = \mathbb E[e^{-E/kT}F/kT]/\mathbb E[e^{-E/kT}]$ over $x + \sigma_t\epsilon$;
#   the DEM target is its self-normalised Monte Carlo estimate with softmax (logsumexp) weights.
# - Its MSE falls like $1/K$; its bias is $O(1/K)$ and Richardson extrapolation removes the
#   leading term; error grows fast with $\sigma_t$ and with dimension (ESS -> 1).
# - Jensen's uniform weights estimate a different quantity; the naive ratio overflows.
# - GMM-40 and Gaussians give exact noised scores: always test estimators against them.
#
# ## Exercises
#
# Open `exercises/05_dem_estimator.ipynb`: implement the logsumexp estimator. Its check
# tells you if the weights are unnormalised, kT is missing, the force sign is flipped, or
# your version overflows on a hard input.

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
# # 03 · Reverse KL and free energy
#
# ## Aim
# Chapter 02 fitted flows to samples. For a molecule the samples are exactly what we do
# not have: we have the energy E(x). A **Boltzmann generator** trains a flow q_θ from the
# energy alone, by minimising the **reverse KL** divergence KL(q_θ ‖ p), and then corrects
# what remains of the error by **importance weights**. After this chapter you can
#
# - show, with measured numbers, that the reverse-KL loss is the variational free energy
#   and that its distance to the exact −log Z is KL(q ‖ p);
# - recognise **mode collapse**, count it (modes covered of GMM-40), and explain why the
#   loss barely notices it;
# - cure it by **mixing maximum likelihood into the loss** and by **temperature annealing
#   as a curriculum**, measured the same way;
# - reweight a flow to a **free-energy difference** (the double well's ΔF = 3.38 kT) with
#   its effective sample size, and say when reweighting cannot work.

# %%
import math

import matplotlib.pyplot as plt
import torch
from IPython.display import display

from boltzlab import flows
from boltzlab.config import budget, describe, set_torch_threads, sizes
from boltzlab.energies import DoubleWell2D, GaussianMixture
from boltzlab.metrics import kish_ess, log_z_estimate, mode_coverage, self_normalized_weights
from boltzlab.plots import density_2d, panel_grid, samples_2d, training_curve
from boltzlab.tables import table
from boltzlab.widgets import annealing_widget

SEED = 0
torch.manual_seed(SEED)
set_torch_threads()  # one thread: see boltzlab.config.DEFAULT_TORCH_THREADS
S = sizes("03")
SMOKE = budget() == "smoke"  # smoke runs are too short to train well: they check that everything runs
print(describe(S))

# %% [markdown]
# ## Theory
#
# **The loss.** With p(x) = e^{−E(x)/kT}/Z and samples x = f_θ(z), z ~ N(0, I), define
#
# $$\mathcal{L}(\theta) = \mathbb{E}_{x \sim q_\theta}\!\left[\frac{E(x)}{kT} + \log q_\theta(x)\right].$$
#
# It needs E and log q only, never Z or samples of p. Since log p(x) = −E(x)/kT − log Z,
#
# $$\mathcal{L}(\theta) = \mathbb{E}_{q}\left[\log q - \log p\right] - \log Z = \mathrm{KL}(q_\theta \,\|\, p) - \log Z \;\ge\; -\log Z .$$
#
# Multiplied by kT: kT 𝓛 = E_q[E] − T S[q] is the **variational free energy** of q, and
# −kT log Z is the true free energy F. The loss is an upper bound on F/kT, and the gap is
# exactly KL(q ‖ p). Its gradient flows through the samples (reparameterisation):
# ∇_θ 𝓛 = E_z[∇_θ (E(f_θ(z))/kT + log q_θ(f_θ(z)))], so E must be differentiable.
#
# **Why it collapses.** KL(q ‖ p) = ∫ q log(q/p) is an average over *q*: q pays for mass
# where p has none, but nothing for leaving out regions where p has mass. If q equals p
# restricted to a set A of probability P_A, then KL(q ‖ p) = −log P_A. For the double
# well, learning only the deep well costs −log 0.967 = 0.034 nats. The gradient points
# into the nearest well and gives almost no signal to find the other one.
#
# **Importance weights.** For x_i ~ q, w_i = e^{−E(x_i)/kT}/q(x_i) corrects q to p:
#
# $$Z = \mathbb{E}_q[w], \qquad P_A = \frac{\sum_{i \in A} w_i}{\sum_i w_i}, \qquad
# \frac{\Delta F}{kT} = \frac{F_B - F_A}{kT} = -\log\frac{P_B}{P_A} = \log\frac{\sum_{i\in A} w_i}{\sum_{i\in B} w_i},$$
#
# with the Kish effective sample size ESS = (Σ w)²/Σ w² saying how many independent
# samples of p they are worth. Weights can only correct where q puts samples: a well q
# never visits gets no weight at all, whatever n.
#
# **Two cures.** (1) **ML + KL**: add a maximum-likelihood term on some samples,
# (1 − λ) 𝓛 + λ (−E_data log q). Forward KL covers mass, reverse KL sharpens. (2)
# **Temperature annealing as a curriculum**: at a high temperature T_0, p_{T_0} ∝ e^{−E/T_0}
# is one smooth blob and reverse KL has nothing to collapse onto; then step down a ladder
# T_0 > T_1 > … > 1, each time drawing samples from the current flow, weighting them to the
# next temperature, log w = −E/T_k − log q, and fitting them by maximum likelihood
# (`flows.train_annealed`). Each rung only asks the flow to sharpen what it already covers.

# %% [markdown]
# ## Practice
#
# ### 1. The double well from its energy: loss = −log Z + KL(q ‖ p), measured
# A spline flow (4 layers of 8 bins) starts as N(0, I): it knows nothing about the
# landscape beyond its rough size. During training, every `S.eval_every` steps we estimate the
# loss by Monte Carlo with `S.eval_batch` fresh samples (with its standard error), and
# compute KL(q ‖ p) independently, by quadrature on a grid, with the exact log Z.

# %%
dw = DoubleWell2D()
LOG_Z_DW = dw.log_z()  # exact: quadrature in x1, Gaussian in x2
P_DEEP = dw.well_probabilities()[0]
DF_EXACT = dw.well_free_energy_difference()
DW_WINDOW = ((-4.0, 4.0), (-7.0, 7.0))  # for plots: holds all but ~1e-10 of p
# for KL(q||p) the grid must also hold the tails of q: where p is tiny (E(6, 0) = 1086) even
# a little mass of q adds a lot to q log(q/p); the untrained flow N(0, I) has < 1e-8 beyond
KL_WINDOW = ((-6.0, 6.0), (-7.0, 7.0))
print(f"exact: log Z = {LOG_Z_DW:.5f}, P(deep well) = {P_DEEP:.4f}, ΔF = {DF_EXACT:.4f} kT, "
      f"-log P(deep) = {-math.log(P_DEEP):.4f}")


def dw_flow() -> flows.Flow:
    return flows.spline_flow(2, n_layers=4, n_bins=8, bound=4.0, hidden=S.hidden, scale=1.0, seed=SEED)


rkl_flow = dw_flow()
g_eval = torch.Generator().manual_seed(SEED + 1)


def measure_gap() -> dict[str, float]:
    """Monte Carlo loss with its standard error, and KL(q||p) by quadrature."""
    x, log_q = rkl_flow.sample(S.eval_batch, generator=g_eval)
    terms = dw.energy(x).double() / dw.kT + log_q.double()
    kl, mass = flows.kl_on_grid(rkl_flow, dw, LOG_Z_DW, *KL_WINDOW, grid=2 * S.grid)
    return {"loss": float(terms.mean()), "se": float(terms.std()) / math.sqrt(terms.numel()),
            "largest term": float(terms.max()) + LOG_Z_DW, "kl_grid": kl, "mass": mass}


with torch.no_grad():
    before = measure_gap()
history = flows.train(rkl_flow, S.dw_steps, batch_size=S.batch_size, lr=3e-3, energy=dw, seed=SEED,
                      evaluate=measure_gap, eval_every=S.eval_every)
steps = [0] + history.eval_steps
ev = {k: [before[k]] + history.evaluations[k] for k in before}
display(table([{"step": step, "loss (MC)": ev["loss"][i],
                "loss + log Z": f"{ev['loss'][i] + LOG_Z_DW:.4f} ± {ev['se'][i]:.4f}", "KL grid": ev["kl_grid"][i],
                "∫ q": ev["mass"][i], "largest term": ev["largest term"][i]}
               for i, step in enumerate(steps) if i % max(1, len(steps) // 8) == 0 or i == len(steps) - 1],
              float_format=".4f", formats={"largest term": ".1f"}))

# %%
fig, axes = panel_grid(3)
training_curve(history["reverse_kl"], ax=axes[0], smooth=50, ylabel="minibatch loss")
axes[0].axhline(-LOG_Z_DW, color="k", ls="--", lw=0.8, label="-log Z (exact)")
axes[0].set_ylim(-LOG_Z_DW - 0.2, -LOG_Z_DW + 2.0)
axes[0].legend(fontsize="small")
gap = [loss + LOG_Z_DW for loss in ev["loss"]]
axes[1].errorbar(steps, gap, yerr=[2 * s for s in ev["se"]], fmt="o", ms=3, label="loss + log Z (Monte Carlo, ±2 SE)")
axes[1].plot(steps, ev["kl_grid"], "-", label="KL(q || p) by quadrature")
axes[1].axhline(-math.log(P_DEEP), color="k", ls=":", lw=0.8, label="-log P(deep well): q = p on the deep well only")
axes[1].set_yscale("log")
axes[1].set_xlabel("step")
axes[1].set_title("the gap to -log Z is the KL")
axes[1].legend(fontsize="small")
density_2d(dw, *DW_WINDOW, grid=S.grid, ax=axes[2], colorbar=False)
with torch.no_grad():
    x_rkl, log_q_rkl = rkl_flow.sample(S.n_eval, generator=torch.Generator().manual_seed(SEED + 2))
samples_2d(x_rkl, ax=axes[2], max_points=2000)
axes[2].set(xlim=DW_WINDOW[0], ylim=DW_WINDOW[1])
axes[2].set_title(f"flow samples: {float((x_rkl[:, 0] > 0).double().mean()):.4f} in the shallow well")
plt.show()

# %% [markdown]
# Three facts, all measured above:
# - At every evaluation, loss + log Z (Monte Carlo) agrees with KL(q ‖ p) (quadrature)
#   within its error bars (the z-scores below): the loss *is* the variational free
#   energy, −log Z + KL. It starts several nats above −log Z and closes to a few hundredths.
# - The Monte Carlo terms E/kT + log q − log Z = log q − log p are heavy-tailed: the
#   *largest term* column shows single samples worth tens or hundreds of nats, placed where
#   p is nearly zero. A few thousand samples can miss them, and then the mean and its
#   standard error are both too small; that is why the loss is evaluated with
#   `S.eval_batch` samples here, many more than a training batch.
# - The title of the right panel gives the flow's share of samples in the shallow well,
#   against the exact 1 − 0.967 = 0.033. The dotted line shows what the loss would be for a
#   flow that dropped the shallow well completely: 0.034 nats, about as small as the
#   remaining error. The loss can hardly tell the two apart, so whether a run fills the
#   shallow well depends on its start and its noise, not on anything the loss rewards much:
#   the cell below says whether this one did (with short training it usually under-fills it;
#   a long run at a large batch, as under the `full` budget, may fill it).

# %%
z_scores = [(g - kl) / s for g, kl, s in zip(gap, ev["kl_grid"], ev["se"])]
print("(loss + log Z - KL_grid) / SE at each evaluation:", [round(z, 1) for z in z_scores])
# the grid holds q (the smoke budget's coarser grid integrates less accurately)
assert all(abs(m - 1) < (3e-3 if SMOKE else 1e-3) for m in ev["mass"]), ev["mass"]
# the identity holds for any q, trained or not (5 SE for the heavy tail, plus the grid's quadrature error)
assert all(abs(g - kl) < 5 * s + 2e-3 for g, kl, s in zip(gap, ev["kl_grid"], ev["se"])), z_scores
assert all(g > -4 * s for g, s in zip(gap, ev["se"]))  # never below the bound -log Z
shallow_rkl = float((x_rkl[:, 0] > 0).double().mean())
# the binomial standard error of a share of x_rkl.shape[0] samples at the exact value
shallow_se = math.sqrt(P_DEEP * (1 - P_DEEP) / x_rkl.shape[0])
shallow_z = (shallow_rkl - (1 - P_DEEP)) / shallow_se
verdict = "under-filled" if shallow_z < -3 else ("over-filled" if shallow_z > 3 else "filled at its exact share")
print(f"shallow well: share {shallow_rkl:.4f} of {x_rkl.shape[0]} samples against the exact {1 - P_DEEP:.4f} "
      f"({shallow_z:+.1f} SE): {verdict}")
if not SMOKE:
    assert ev["kl_grid"][-1] < 0.1 and ev["kl_grid"][-1] < 0.05 * ev["kl_grid"][0], ev["kl_grid"]
    # mode seeking: the share is below the exact one or consistent with it, never above
    assert shallow_z <= 3, (shallow_rkl, shallow_z)

# %% [markdown]
# ### 2. Importance weights: what they fix and what they cannot
# Weight `S.n_eval` samples of that flow to p. Unweighted, the flow's own samples give
# ΔF from its share of samples in each well; weighted, the estimate corrects that share,
# and log Ẑ estimates log Z. The standard error of ΔF comes from 20 independent batches.


# %%
def reweighting_report(flow: flows.Flow, label: str) -> dict[str, float]:
    """Shallow-well share, ESS, log Z error and ΔF (raw and weighted) from ``S.n_eval`` samples."""
    with torch.no_grad():
        x, log_q = flow.sample(S.n_eval, generator=torch.Generator().manual_seed(SEED + 3))
        log_w = (-dw.energy(x) / dw.kT - log_q).double()
    right = x[:, 0] > 0

    def delta_f(lw: torch.Tensor, r: torch.Tensor) -> float:
        p_right = float(self_normalized_weights(lw)[r].sum())
        return -math.log(p_right / (1 - p_right)) if 0 < p_right < 1 else math.inf

    batches = [delta_f(lw, r) for lw, r in zip(log_w.chunk(20), right.chunk(20))]
    se = float(torch.tensor(batches).std()) / math.sqrt(len(batches)) if all(map(math.isfinite, batches)) else math.inf
    out = {"shallow share": float(right.double().mean()), "ESS": kish_ess(log_w),
           "log Z error": log_z_estimate(log_w)[0] - LOG_Z_DW, "ΔF raw": delta_f(torch.zeros_like(log_w), right),
           "ΔF weighted": delta_f(log_w, right), "± SE": se}
    display(table([{"flow": label, **out}], float_format=".4g"))
    return out


plain = reweighting_report(rkl_flow, "reverse KL")
print(f"exact: shallow share = {1 - P_DEEP:.4g}, ΔF = {DF_EXACT:.4f}")

# %% [markdown]
# The weights correct the flow's share of the shallow well, as far as it proposes samples
# there: compare ΔF raw and weighted with the exact value. What they cannot do is create
# samples where q has none: if q never proposes the shallow well, every weighted
# estimate of it is zero, the ESS can still be large (the weights within the deep well
# are even), and log Ẑ then estimates the log Z of the deep well alone, log Z + log 0.967.
# Section 4 shows this on GMM-40, where reverse KL drops whole modes.

# %%
assert plain["ESS"] >= 1000 or SMOKE, plain
if not SMOKE and 0 < plain["shallow share"]:
    # weighting moves ΔF toward the exact value, or (when the flow's share was already right)
    # leaves it within its statistical error
    assert abs(plain["ΔF weighted"] - DF_EXACT) < max(abs(plain["ΔF raw"] - DF_EXACT), 3 * plain["± SE"]), plain

# %% [markdown]
# ### 3. Annealing as a curriculum, then reweighting: ΔF within 0.05 kT
# Whether plain reverse KL fills the shallow well depends on the run (its start and its
# noise). A curriculum makes it robust. The same flow architecture is trained by
# `flows.train_annealed`: reverse KL at kT = 4, where the barrier (about 11 energy units)
# is under 3 kT and both wells hold mass, then maximum likelihood on its own samples
# reweighted to kT = 2.8, 2, 1.4 and 1.

# %%
annealed_dw = dw_flow()
dw_ladder = torch.logspace(math.log10(4.0), 0.0, 5)
dw_stages = flows.train_annealed(annealed_dw, dw, dw_ladder, S.anneal_first_steps, S.anneal_stage_steps,
                                 pool_size=S.pool_size, batch_size=S.batch_size, lr=3e-3, seed=SEED)
display(flows.ladder_table(dw_stages))
annealed = reweighting_report(annealed_dw, "annealed  ")
kl_annealed, _ = flows.kl_on_grid(annealed_dw, dw, LOG_Z_DW, *KL_WINDOW, grid=2 * S.grid)
print(f"exact ΔF/kT = {DF_EXACT:.4f}; weighted error {annealed['ΔF weighted'] - DF_EXACT:+.4f} "
      f"± {annealed['± SE']:.4f}; KL(q||p) by quadrature {kl_annealed:.4f}")

# %% [markdown]
# The annealed flow proposes the shallow well at close to its exact share, the weights
# correct the rest, and ΔF comes out within 0.05 kT of the exact value with an ESS of
# many thousands (all printed above).

# %%
assert math.isfinite(annealed["ΔF weighted"])
if not SMOKE:
    assert annealed["ESS"] >= 1000, annealed
    assert annealed["shallow share"] > 0.5 * (1 - P_DEEP), annealed
    assert abs(annealed["ΔF weighted"] - DF_EXACT) < 0.05, (annealed, DF_EXACT)
    assert abs(annealed["log Z error"]) < 0.01, annealed

# %% [markdown]
# ### 4. GMM-40: mode collapse, counted
# Forty modes, log Z = 0 exactly. The flow: 6 spline layers of 16 bins, starting as
# N(0, 15² I), which covers the 80 × 80 box. We count modes covered with
# `mode_coverage` (a mode counts when it receives at least 20 % of its fair share of
# samples within 3.7 σ of its mean; some pairs of GMM-40 modes overlap and count
# together), and report KL(q ‖ p) = loss − (−log Z) = loss, the ESS, and log Ẑ.

# %%
gmm = GaussianMixture()
GMM_WINDOW = ((-50.0, 50.0), (-50.0, 50.0))


def gmm_flow() -> flows.Flow:
    return flows.spline_flow(2, n_layers=6, n_bins=16, bound=3.0, hidden=S.hidden, scale=15.0, seed=SEED)


def gmm_report(flow: flows.Flow) -> dict[str, float]:
    with torch.no_grad():
        x, log_q = flow.sample(S.n_eval, generator=torch.Generator().manual_seed(SEED + 4))
        log_w = (-gmm.energy(x) - log_q).double()
    return {"modes covered": mode_coverage(x, gmm.means, gmm.std)[0], "KL(q||p)": float(-log_w.mean()),
            "ESS / n": kish_ess(log_w) / S.n_eval, "log Z est.": log_z_estimate(log_w)[0], "samples": x}


gmm_results = {}
gmm_flows = {"reverse KL": gmm_flow()}
flows.train(gmm_flows["reverse KL"], S.gmm_steps, batch_size=S.batch_size, lr=3e-3, energy=gmm, seed=SEED)
gmm_results["reverse KL"] = gmm_report(gmm_flows["reverse KL"])
display(table([{k: v for k, v in gmm_results["reverse KL"].items() if k != "samples"}], float_format=".4g"))

# %% [markdown]
# ### 5. Cure 1: maximum likelihood mixed into the loss
# Add λ = 0.9 of maximum likelihood on `S.ml_samples` exact samples (a stand-in for a short
# MCMC run), keeping 0.1 of reverse KL.

# %%
g_data = torch.Generator().manual_seed(SEED)
gmm_data = gmm.sample(S.ml_samples, generator=g_data)
gmm_flows["ML + KL"] = gmm_flow()
flows.train(gmm_flows["ML + KL"], S.gmm_steps, batch_size=S.batch_size, lr=3e-3, data=gmm_data, energy=gmm,
            ml_weight=0.9, seed=SEED)
gmm_results["ML + KL"] = gmm_report(gmm_flows["ML + KL"])
display(table([{k: v for k, v in gmm_results["ML + KL"].items() if k != "samples"}], float_format=".4g"))

# %% [markdown]
# ### 6. Cure 2: temperature annealing as a curriculum
# No data at all: reverse KL at kT = 30, where GMM-40's tempered density
# p^{1/30} is a nearly flat plateau over the box, then seven rungs down to kT = 1, each
# fitted by maximum likelihood to the previous flow's samples reweighted to the new
# temperature.

# %%
gmm_ladder = torch.logspace(math.log10(30.0), 0.0, 8)
gmm_flows["annealing"] = gmm_flow()
gmm_stages = flows.train_annealed(gmm_flows["annealing"], gmm, gmm_ladder, S.anneal_first_steps,
                                  S.anneal_stage_steps, pool_size=S.pool_size, batch_size=S.batch_size,
                                  lr=3e-3, seed=SEED)
gmm_results["annealing"] = gmm_report(gmm_flows["annealing"])
display(flows.ladder_table(gmm_stages))
display(table([{k: v for k, v in gmm_results["annealing"].items() if k != "samples"}], float_format=".4g"))

# %%
display(table([{"training": name, "modes covered": row["modes covered"], "KL(q||p)": row["KL(q||p)"],
                "ESS / n": row["ESS / n"], "log Z est.": row["log Z est."]} for name, row in gmm_results.items()],
              float_format=".3f", formats={"log Z est.": ".4f"}, caption="GMM-40 (exact log Z = 0)"))
fig, axes = panel_grid(3)
for ax, (name, row) in zip(axes, gmm_results.items()):
    density_2d(gmm, *GMM_WINDOW, grid=S.grid, ax=ax, colorbar=False)
    samples_2d(row["samples"], ax=ax, max_points=3000, color="orange", size=2)
    ax.set(xlim=GMM_WINDOW[0], ylim=GMM_WINDOW[1], title=f"{name}: {row['modes covered']} of 40 modes")
plt.show()

# %% [markdown]
# The table is the chapter's point in four columns. Pure reverse KL leaves many modes
# out; both cures cover (nearly) all forty. Look at what else the columns say:
# - **KL(q ‖ p)**, the loss's distance to −log Z = 0, does not single out the collapsed
#   flow by much: a flow that covers a share P_A of p exactly pays only −log P_A, and the
#   cured flows pay for mass they smear between modes.
# - **log Ẑ** of the collapsed flow falls well below the exact 0, because the weights can
#   only add up the modes q proposes; the cured flows' log Ẑ is close to 0. That is the
#   support problem of section 2, measured.
#
# Step through the annealing curriculum below: the tempered target p_T ∝ e^{−E/kT} at each
# rung, with samples of the flow fitted at that rung.


# %%
rung_widget = annealing_widget(gmm, gmm_stages, GMM_WINDOW, grid=S.grid // 2)
rung_widget

# %%
for row in gmm_results.values():
    assert math.isfinite(row["KL(q||p)"]) and row["ESS / n"] > 0
assert rung_widget.state.kT == 1.0 and rung_widget.state.rung == len(gmm_stages) - 1
if not SMOKE:
    baseline, mixed, curriculum = (gmm_results[k]["modes covered"] for k in ("reverse KL", "ML + KL", "annealing"))
    assert baseline <= 30, baseline  # collapsed
    assert mixed >= 36 and curriculum >= 36, (mixed, curriculum)
    # weights cannot add the modes q never proposes: log Z is underestimated only by the collapsed flow
    assert gmm_results["reverse KL"]["log Z est."] < -0.1, gmm_results["reverse KL"]
    assert all(abs(gmm_results[k]["log Z est."]) < 0.05 for k in ("ML + KL", "annealing"))

# %% [markdown]
# ## Discussion
# - **The loss is a bound, the gap is a KL.** Section 1 measured loss + log Z against
#   KL(q ‖ p) from quadrature at every evaluation. In higher dimensions there is no
#   quadrature, and log Z is unknown: the loss then tells you how much it went down, not
#   how far it is from the bottom. Importance weights (log Ẑ, ESS) are the usual check.
# - **Mode collapse is cheap for the loss.** A flow equal to p on a set of probability
#   P_A pays −log P_A: 0.034 nats for the double well's deep well alone, log 2 = 0.69 for
#   half of GMM-40's modes. Nothing in the reverse-KL gradient pulls toward an unseen mode.
# - **Reweighting needs support.** Weights correct how much mass q puts where, never
#   where q puts none: the collapsed GMM-40 flow's log Ẑ is biased low. Always look at
#   where the samples are (how many in each state or mode), not only at the ESS.
# - **The cures have prices.** ML + KL needs samples, which for a molecule come from
#   MCMC (chapter 00) and inherit its blind spots; its λ matters, too small and reverse KL
#   wins again. Annealing needs a ladder whose neighbours overlap: the ESS of the pool at
#   each rung (printed above) is the thing to watch, and a rung with a tiny ESS fits the
#   flow to a handful of samples.
# - **Energies must be differentiable and finite** wherever q samples: a flow that samples
#   two overlapping Lennard-Jones particles meets an energy of 10^24. Chapter 06 deals
#   with that.
#
# ## Summary
# - Reverse KL trains a flow from the energy alone: 𝓛 = E_q[E/kT + log q] = −log Z + KL(q ‖ p),
#   the variational free energy (in kT) above the true one.
# - It is mode seeking: it kept only part of GMM-40's modes at a small cost in loss, and on
#   the double well its loss barely separates a flow with the shallow well from one without
#   (0.034 nats), so whether a run fills it is up to the run.
# - Importance weights w = e^{−E/kT}/q turn a flow into an estimator of free energies: the
#   average weight is an unbiased estimate of Z, its logarithm (log Z, ΔF) is biased at
#   finite n (chapter 07 measures it), and only where q has samples: ESS alone does not show
#   a missing well.
# - Mixing in maximum likelihood, or annealing from a high temperature with reweighted
#   maximum likelihood, covered (nearly) all 40 modes, and annealing gave the double well's
#   ΔF within 0.05 kT.
#
# ## Exercises
# Open `exercises/03_reverse_kl.ipynb` (solutions are for instructors). You write the
# reverse-KL loss and the importance-weighted free-energy difference between two states.
# Each has a check cell that tells you what is wrong.

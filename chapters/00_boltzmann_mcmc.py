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
# # 00 · Boltzmann distributions and MCMC
#
# ## Aim
#
# Every sampler in this course is judged against the same thing: the Boltzmann
# distribution $p(x) \propto e^{-E(x)/kT}$ of a known energy. In this chapter you will
#
# - see how temperature reshapes a distribution, and why barriers make it hard to sample;
# - **measure** how long Metropolis takes to cross a barrier, and how much parallel
#   tempering shortens that, per step and per energy evaluation;
# - meet the metrics used in every later chapter (energy W2, distance histograms, x-W2,
#   Kish ESS, log Z error, mode coverage), each on a case where the right answer is known;
# - load the course's MCMC reference sets for DW-4, LJ-13 and LJ-55, and check them
#   against a physics identity.

# %%
import math

import matplotlib.pyplot as plt
import torch
from IPython.display import display
from tqdm.auto import tqdm

from boltzlab import metrics, plots
from boltzlab.config import describe, set_torch_threads, sizes
from boltzlab.energies import DoubleWell2D, GaussianMixture, dw4, lj13, lj55
from boltzlab.mcmc import integrated_autocorrelation_time, rhat, run_mcmc, run_parallel_tempering
from boltzlab.reference import load_reference, reference_provenance
from boltzlab.tables import table
from boltzlab.widgets import temperature_widget

SEED = 0
torch.manual_seed(SEED)
set_torch_threads()
S = sizes("00")
print(describe(S))

# %% [markdown]
# ## Theory
#
# **Boltzmann distribution.** A configuration $x$ with energy $E(x)$ at temperature $kT$ has
# density
#
# $$p(x) = \frac{e^{-E(x)/kT}}{Z},\qquad Z = \int e^{-E(x)/kT}\,dx,\qquad F = -kT\log Z .$$
#
# $Z$ (the partition function) is almost never known; $F$ is the free energy. Sampling means
# producing $x \sim p$ without knowing $Z$. The probability of a region $A$ (a well, a mode, a
# cluster shape) is $P(A) = e^{-(F_A - F)/kT}$, so free-energy differences *are* log-probability
# ratios: $\Delta F_{AB} = -kT \log(P_B/P_A)$.
#
# **Temperature.** Raising $kT$ flattens $p$: barriers of height $\Delta E$ are crossed at a
# rate that scales like $e^{-\Delta E/kT}$ (Arrhenius). Lowering $kT$ concentrates $p$ in the
# deepest minima.
#
# **Markov chain Monte Carlo.** A Markov chain whose transition kernel $K$ satisfies detailed
# balance, $p(x)K(x\to y) = p(y)K(y\to x)$, leaves $p$ invariant; run long enough, it samples
# $p$ without ever needing $Z$.
#
# - *Random-walk Metropolis (RWM):* propose $y = x + \sigma\xi$, accept with probability
#   $\min\big(1, e^{-(E(y)-E(x))/kT}\big)$.
# - *MALA:* propose $y = x + \tau F(x)/kT + \sqrt{2\tau}\,\xi$ with forces $F=-\nabla E$, and
#   accept with the Metropolis-Hastings ratio that includes $q(x\mid y)/q(y\mid x)$
#   (exercise 1 in `exercises/00_mcmc.ipynb`).
# - *Parallel tempering (PT):* run replicas at $kT_0 < kT_1 < \dots$; neighbours swap
#   configurations with probability $\min\big(1, e^{(1/kT_i - 1/kT_{i+1})(E_i - E_{i+1})}\big)$.
#   Hot replicas cross barriers and hand their configurations down.
#
# **Diagnostics.** Successive MCMC states are correlated. The integrated autocorrelation
# time $\tau_{\text{int}} = 1 + 2\sum_{t\ge1}\rho(t)$ of a scalar (here the energy) says how
# many steps are worth one independent sample; split-$\hat R$ compares the variance within and
# between chains and is close to 1 only when chains agree. Both can miss a mode that *no*
# chain has found: the tunnelling measurement below shows why.

# %% [markdown]
# ## Practice
#
# ### 1. Energy landscapes and temperature
#
# Two 2-D targets used throughout the course: the double well
# $E(x) = x_1^4 - 6x_1^2 + x_1 + \tfrac12 x_2^2$ and GMM-40, a mixture of 40 Gaussians spread
# over $[-40, 40]^2$. Move the slider: at $kT = 1$ the deep well ($x_1<0$) holds 96.7% of the
# mass; as $kT$ grows the two wells even out.

# %%
temperature_widget()

# %%
dw = DoubleWell2D()
gmm = GaussianMixture()
fig, axes = plots.panel_grid(3, panel_size=(4.7, 3.6))
for ax, kT in zip(axes[:2], (1.0, 5.0)):
    plots.density_2d(dw, (-3, 3), (-4, 4), kT=kT, grid=S.landscape_grid, ax=ax)
    p_deep = dw.at_temperature(kT).well_probabilities()[0]
    ax.set_title(f"double well, kT = {kT:g}\nP(deep well) = {p_deep:.3f}")
plots.density_2d(gmm, (-45, 45), (-45, 45), grid=S.landscape_grid, ax=axes[2])
axes[2].set_title("GMM-40, kT = 1")
plt.show()

# %% [markdown]
# The deep-well probability is computed *exactly* by quadrature (the double well is
# separable). Exact samples agree with it:

# %%
p_deep, p_shallow = dw.well_probabilities()
x_exact = dw.sample(S.metric_samples * 10, torch.Generator().manual_seed(SEED), dtype=torch.float64)
frac = float((x_exact[:, 0] < 0).double().mean())
se = math.sqrt(p_deep * (1 - p_deep) / x_exact.shape[0])
print(f"P(deep well): exact {p_deep:.4f}; from {x_exact.shape[0]} exact samples {frac:.4f} ± {se:.4f}")
print(f"free-energy difference between the wells: {dw.well_free_energy_difference():.3f} kT")
assert abs(frac - p_deep) < 5 * se
assert abs(p_deep - 0.967) < 1e-3

# %% [markdown]
# ### 2. Why barriers make MCMC slow: tunnelling times
#
# We start chains from exact samples (so they are at equilibrium from step 0) and count how
# often each chain crosses from one well to the other, core to core ($x_1 < -1$ to
# $x_1 > 1$ or back; see `metrics.count_transitions`). Both samplers use random-walk moves
# with the step size adapted during burn-in; parallel tempering runs a geometric ladder from
# $kT = 1$ to $kT = 10$ and we watch its $kT = 1$ replica. PT pays one energy evaluation per
# replica per step, so we report both per step and per energy evaluation.

# %%
g = torch.Generator().manual_seed(SEED)
x0 = dw.sample(S.tunnelling_chains, g, dtype=torch.float64)
burn = S.tunnelling_steps // 10
rwm = run_mcmc(dw, x0, S.tunnelling_steps + burn, kernel="rwm", step_size=0.5, burn_in=burn,
               generator=g, progress=True)
pt = run_parallel_tempering(dw, x0, S.tunnelling_steps + burn, kT_max=10.0, n_temps=S.pt_temperatures,
                            kernel="rwm", step_size=0.5, burn_in=burn, generator=g, progress=True)


def tunnelling_summary(name, result, replicas):
    """One row of the table: crossings, and the mean time between them per step and per evaluation."""
    crossings = int(metrics.count_transitions(result.samples[..., 0], -1.0, 1.0).sum())
    chain_steps = result.samples.shape[0] * result.samples.shape[1]
    none_seen = f"none seen: > {chain_steps:,}"
    return {"sampler": name, "crossings": crossings, "chain-steps": chain_steps,
            "steps between crossings": chain_steps / crossings if crossings else none_seen,
            "energy evaluations between crossings": chain_steps * replicas / crossings if crossings else none_seen}


tunnelling = [tunnelling_summary("Metropolis (kT = 1)", rwm, 1),
              tunnelling_summary(f"PT, {S.pt_temperatures} replicas", pt, S.pt_temperatures)]
display(table(tunnelling, float_format=",.0f", caption="barrier crossings of the double well, core to core"))
c_rwm, c_pt = (row["crossings"] for row in tunnelling)
print(f"PT swap acceptance between neighbours: {[round(float(a), 2) for a in pt.swap_acceptance]}")
assert c_pt > 10 * max(c_rwm, 1), "parallel tempering should cross the barrier far more often"

# %%
fig, axes = plots.panel_grid(2, panel_size=(4.7, 3.4), sharey=True)
plots.trace_plot(rwm.samples[:, :4, 0], ax=axes[0], ylabel="$x_1$")
axes[0].set_title("Metropolis at kT = 1:\nchains stay in their well")
plots.trace_plot(pt.samples[:, :4, 0], ax=axes[1], ylabel="$x_1$")
axes[1].set_title("parallel tempering, kT = 1 replica:\nswaps carry it across")
plt.show()

# %% [markdown]
# The slow crossings also show in the diagnostics of the energy (the two wells have different
# energies): its integrated autocorrelation time is far longer for Metropolis than for the
# $kT = 1$ replica of parallel tempering, and split-$\hat R$ of $x_1$ is further from 1.
# Section 3 shows a case where these diagnostics see nothing wrong at all.

# %%
diagnostics = {}
rows = []
for name, res in [("Metropolis", rwm), ("PT", pt)]:
    diagnostics[name] = integrated_autocorrelation_time(res.energies)
    rows.append({"sampler": name, "energy IAT (steps)": diagnostics[name], "energy R-hat": rhat(res.energies),
                 "R-hat of x1": rhat(res.samples[..., 0]), "acceptance": float(res.acceptance.float().mean())})
display(table(rows, float_format=".3f", formats={"energy IAT (steps)": ".1f"}))
assert diagnostics["Metropolis"] > 5 * diagnostics["PT"]

# %% [markdown]
# ### 3. The metrics used in the rest of the course
#
# Each metric below is shown on a case where we know the right answer.
#
# **Energy W2.** The 1-D Wasserstein-2 distance between the energy distributions of a
# sampler and of reference samples. We report $W_2$ itself (not $W_2^2$), in units of energy.
# Two independent exact sample sets set the noise floor; samples at the wrong temperature
# are far above it.

# %%
n = S.metric_samples
g = torch.Generator().manual_seed(SEED + 1)
ref = dw.sample(n, g, dtype=torch.float64)
exact_again = dw.sample(n, g, dtype=torch.float64)
too_hot = dw.at_temperature(1.5).sample(n, g, dtype=torch.float64)
# n Metropolis samples drawn at random over all chains and the whole run (same n as the others)
pool = rwm.samples.reshape(-1, 2)
mcmc_kept = pool[torch.randperm(pool.shape[0], generator=g)[:n]]
w2 = {
    "exact vs exact": metrics.energy_w2(dw.energy(exact_again), dw.energy(ref)),
    "Metropolis": metrics.energy_w2(dw.energy(mcmc_kept), dw.energy(ref)),
    "kT = 1.5 (wrong)": metrics.energy_w2(dw.energy(too_hot), dw.energy(ref)),
}
display(table([{"samples": k, "energy W2": v} for k, v in w2.items()], float_format=".3f"))
ax = plots.energy_histogram({"exact (independent)": dw.energy(exact_again), "kT = 1.5": dw.energy(too_hot)},
                            reference=dw.energy(ref), bins=60)
ax.set_title("double well: energy histograms against exact samples")
assert w2["kT = 1.5 (wrong)"] > 3 * w2["exact vs exact"]

# %% [markdown]
# **Importance weights, Kish ESS and log Z.** Given samples from a proposal $q$ with known
# density, $w_i = e^{-E(x_i)/kT}/q(x_i)$ estimates $Z = \mathbb E_q[w]$, and Kish's effective
# sample size $(\sum w)^2/\sum w^2$ (exercise 2) says how many equally weighted samples they
# are worth. A broad Gaussian proposal recovers the exact $\log Z$. A proposal that sits in
# the shallow well only has an ESS of order a hundred, which looks usable, and a confidently
# wrong $\log Z$, dozens of standard errors off: ESS measures weight degeneracy, not whether
# $q$ has found all of $p$.

# %%
log_z_exact = dw.log_z()
g = torch.Generator().manual_seed(SEED + 2)
proposals = {
    "broad N(0, 2^2 I)": (torch.tensor([0.0, 0.0]), 2.0),
    "shallow well only N((1.7, 0), 0.5^2 I)": (torch.tensor([1.7, 0.0]), 0.5),
}
is_results = {}
for name, (mu, s) in proposals.items():
    q = torch.distributions.Independent(torch.distributions.Normal(mu.double(), s), 1)
    xq = q.sample((S.metric_samples * 5,))
    log_w = -dw.energy(xq) / dw.kT - q.log_prob(xq)
    est, err = metrics.log_z_estimate(log_w)
    is_results[name] = (est, err, metrics.kish_ess(log_w), xq.shape[0])
display(table([{"proposal": name, "log Z": f"{est:.3f} ± {err:.3f}", "exact log Z": log_z_exact, "Kish ESS": ess,
                "samples": n_q} for name, (est, err, ess, n_q) in is_results.items()],
              formats={"exact log Z": ".3f", "Kish ESS": ".0f"}))
est, err, _, _ = is_results["broad N(0, 2^2 I)"]
assert abs(est - log_z_exact) < 5 * err + 0.02
est_bad, err_bad, ess_bad, n_bad = is_results["shallow well only N((1.7, 0), 0.5^2 I)"]
assert abs(est_bad - log_z_exact) > 10 * err_bad  # confidently wrong
assert ess_bad > 50  # with an ESS that looks usable

# %% [markdown]
# **Mode coverage (GMM-40).** Assign every sample to its nearest mean; a mode counts as
# covered when it receives at least a fifth of its expected share (see
# `metrics.mode_coverage`). Exact samples cover all 40. MALA chains started in 4 modes
# reach some neighbouring modes (a few GMM-40 means are only a few standard deviations
# apart) but stay far from covering all 40: most modes are tens of standard deviations away.

# %%
g = torch.Generator().manual_seed(SEED + 3)
x_gmm = gmm.sample(S.metric_samples, g, dtype=torch.float64)
start = gmm.means[:4].double().repeat(S.tunnelling_chains // 4, 1)
mala = run_mcmc(gmm, start, S.tunnelling_steps // 4, kernel="mala", step_size=0.5,
                burn_in=S.tunnelling_steps // 20, generator=g, progress=True)
covered_exact, _ = metrics.mode_coverage(x_gmm, gmm.means, gmm.std)
covered_mala, _ = metrics.mode_coverage(mala.samples.reshape(-1, 2), gmm.means, gmm.std)
rhat_mala = rhat(mala.energies)
print(f"modes covered: exact samples {covered_exact}/40, MALA from 4 modes {covered_mala}/40")
print(f"MALA energy R-hat {rhat_mala:.3f}: every mode has the same energy distribution,\n"
      "so the energy cannot tell which modes are missing")
ax = plots.density_2d(gmm, (-45, 45), (-45, 45), grid=S.landscape_grid)
plots.samples_2d(mala.samples.reshape(-1, 2), ax=ax, color="red", label="MALA")
ax.legend(loc="upper right")
assert covered_exact == 40 and covered_mala < 30 and rhat_mala < 1.05

# %% [markdown]
# ### 4. The reference sets: DW-4, LJ-13, LJ-55
#
# For particle systems no exact sampler exists, so the course ships MCMC reference sets
# made by `python -m boltzlab.reference build` with a recorded provenance (seed, chains,
# steps, burn-in, thinning, step size, acceptance, $\hat R$, autocorrelation time, wall time).
# The energies are the literature's benchmark conventions:
#
# - **DW-4**: 4 particles in 2-D, $E = \sum_{i<j} 0.9(d_{ij}-4)^4 - 4(d_{ij}-4)^2$, $kT = 1$.
# - **LJ-13, LJ-55** (3-D): $E = \sum_{i\neq j}\big[d_{ij}^{-12} - 2 d_{ij}^{-6}\big]
#   + \tfrac12\sum_i |x_i - \bar x|^2$ at $kT = 1$. The sum runs over **ordered** pairs, so it
#   is *twice* the usual unique-pair Lennard-Jones energy ($\varepsilon = r_m = 1$): this is
#   standard LJ at reduced temperature 0.5, plus a harmonic tether that keeps the cluster
#   together. `boltzlab.energies.lj_standard(n)` is the usual unique-pair form.
#
# All particle samples live in the centre-of-mass-free subspace ($\sum_i x_i = 0$).

# %%
systems = {"dw4": dw4(), "lj13": lj13(), "lj55": lj55()}
refs = {}
keys = ("sampler", "n_samples", "n_chains", "seed", "n_steps", "burn_in", "thin", "step_size_mean",
        "acceptance_mean", "rhat_energy", "integrated_autocorrelation_time", "wall_time_s")
provenance = {}
for name, energy in systems.items():
    prov = provenance[name] = reference_provenance(name)
    refs[name] = load_reference(name, n=S.reference_samples, generator=torch.Generator().manual_seed(SEED))
    assert prov["rhat_energy"] < 1.01 and prov["n_samples"] >= 10_000
display(table([{"": k.replace("_", " "), **{name: provenance[name][k] for name in systems}} for k in keys],
              caption=f"how the reference sets were made ({S.reference_samples} samples of each loaded here)"))

# %% [markdown]
# **A physics check: the virial identity.** For $p \propto e^{-E/kT}$ on the
# centre-of-mass-free subspace (dimension $d_{\text{eff}} = (n-1)\,d$), integration by parts
# gives $\mathbb E[x\cdot\nabla E(x)] = d_{\text{eff}}\,kT$. The reference sets satisfy it:

# %%
for name, energy in tqdm(systems.items(), desc="virial check"):
    x = refs[name].double()
    v = (x * -energy.forces(x)).sum(-1)
    mean, se_v = float(v.mean()), float(v.std()) / math.sqrt(v.numel())
    print(f"{name}: E[x . grad E] = {mean:.2f} ± {se_v:.2f}, d_eff kT = {energy.effective_dim * energy.kT:.0f}")
    assert abs(mean - energy.effective_dim * energy.kT) < 5 * se_v

# %%
fig, axes = plots.panel_grid(2 * len(systems), ncols=2)  # one row per system
for k, (name, energy) in enumerate(tqdm(systems.items(), desc="histograms")):
    x = refs[name]
    half = x.shape[0] // 2
    plots.energy_histogram({"second half": energy.energy(x[half:])}, reference=energy.energy(x[:half]),
                           bins=60, ax=axes[2 * k], reference_label="first half")
    axes[2 * k].set_title(f"{name}: energies")
    plots.distance_histogram_plot({"second half": x[half:]}, energy.n_particles, energy.spatial_dim,
                                  reference=x[:half], bins=60, ax=axes[2 * k + 1], reference_label="first half")
    axes[2 * k + 1].set_title(f"{name}: interatomic distances")

# %% [markdown]
# **x-W2 and why it is not enough.** The W2 distance between configurations (optimal
# transport on the raw coordinates) saturates in high dimension: even two halves of the
# *same* LJ-13 reference set are far apart, because in 36 dimensions every sample is far
# from every other. A clearly wrong sampler (reference samples jittered by 0.05 per
# coordinate, which wrecks the energies) barely moves x-W2, while the energy W2 explodes.

# %%
x = refs["lj13"]
half = x.shape[0] // 2
a, b = x[:half], x[half:]
jittered = lj13().remove_com(b + 0.05 * torch.randn(b.shape, generator=torch.Generator().manual_seed(SEED)))
gw = torch.Generator().manual_seed(SEED)
xw2_same = metrics.x_w2(a, b, max_samples=1000, generator=gw)
xw2_bad = metrics.x_w2(a, jittered, max_samples=1000, generator=gw)
ew2_same = metrics.energy_w2(lj13().energy(a), lj13().energy(b))
ew2_bad = metrics.energy_w2(lj13().energy(a), lj13().energy(jittered))
display(table([{"metric": "x-W2", "half vs half": xw2_same, "half vs jittered": xw2_bad, "ratio": xw2_bad / xw2_same},
               {"metric": "energy W2", "half vs half": ew2_same, "half vs jittered": ew2_bad,
                "ratio": ew2_bad / ew2_same}], float_format=".3f"))
assert xw2_bad / xw2_same < 1.2 and ew2_bad / ew2_same > 5

# %% [markdown]
# ## Discussion
#
# - **Barriers dominate.** Metropolis at $kT=1$ needs on the order of
#   $e^{\Delta E/kT}$ steps to cross a barrier of height $\Delta E$; the numbers above show it.
#   Parallel tempering turns that into a random walk in temperature, at the price of one
#   energy evaluation per replica. Whether it wins *per energy evaluation* is the honest
#   question, and the one later chapters ask of every neural sampler.
# - **Diagnostics can be fooled.** The energy $\hat R$ of the MALA chains on GMM-40 was
#   close to 1 while they covered only part of the 40 modes. A sampler can only be trusted against
#   something independent: exact quantities where they exist (log Z, well probabilities,
#   mode coverage), physics identities (the virial), or reference sets checked by those.
# - **Metrics have blind spots.** ESS measures weight degeneracy, not coverage (the
#   shallow-well proposal had a usable-looking ESS and a wrong log Z). x-W2 saturates in high
#   dimension. Energy W2 and distance histograms are the sharp tools for particle systems;
#   report W2, not W2², and always next to the noise floor of two reference halves.
#
# ## Summary
#
# - $p(x) \propto e^{-E(x)/kT}$; temperature trades sharpness for ease of sampling.
# - MCMC samples $p$ without $Z$, but crosses barriers at Arrhenius rates; PT helps.
# - Judge samplers by energy W2, distance histograms (W2, TVD), log Z error, mode
#   coverage and ESS on enough samples, each against a known answer or a noise floor.
# - The course's reference sets for DW-4, LJ-13 and LJ-55 pass the virial identity.
#
# ## Exercises
#
# Open `exercises/00_mcmc.ipynb`: (1) write one MALA step; (2) write Kish's ESS from
# log-weights, stably. Each has a check cell that tells you what is wrong.

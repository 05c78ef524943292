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
# # A · Appendix: the GPU kernels
#
# ## Aim
#
# Chapters 05 and 06 call `boltzlab.kernels.mc_score_estimate` thousands of times: it is the
# Monte Carlo score target of DEM/iDEM, and nearly all of their compute. This appendix opens
# it up. You will
#
# - see why the straightforward implementation (autograd through a logsumexp over $B\times K$
#   materialised copies) is slow and memory-hungry, and what replaces it: **analytic forces**,
#   **blocking** and an **online logsumexp**;
# - check every claim against an independent reference, including the Triton kernel itself,
#   run here on the CPU by Triton's interpreter;
# - **measure** time and peak memory of both approaches, live, at your budget's sizes.

# %%
import math
from pathlib import Path

import ipywidgets
import torch
from IPython.display import display
from tqdm.auto import tqdm

import boltzlab.kernels as kernels
from boltzlab.config import budget, describe, set_torch_threads, sizes
from boltzlab.energies import lj13, lj55
from boltzlab.kernels import lj_energy_forces, mc_score_estimate
from boltzlab.kernels.benchmark import BenchCase, benchmark_table, cpu_peak_flops, measure, noisy_points
from boltzlab.kernels.interpret import run_interpreted
from boltzlab.kernels.online_lse import OnlineLSEState, fold_block
from boltzlab.kernels.reference import autograd_score_estimate, dense_pair_energy, reference_score_estimate
from boltzlab.widgets import slider_figure

SEED = 0
torch.manual_seed(SEED)
set_torch_threads()  # the CPU paths are measured with the course's thread count
S = sizes("A")
print(describe(S))

# %% [markdown]
# ## Theory
#
# **The score target.** For a noisy point $x_t$ at noise level $\sigma_t$, DEM estimates the
# score of the smoothed density $p_t = p * \mathcal N(0, \sigma_t^2 I)$ from $K$ perturbed
# copies $x_k = x_t + \sigma_t\varepsilon_k$ (for particle systems $\varepsilon_k$ has its
# centre of mass removed):
#
# $$S_K(x_t) = \nabla_{x_t}\log\frac1K\sum_{k=1}^K e^{-E(x_k)/kT}
#            = \sum_{k=1}^K \underbrace{\frac{e^{l_k}}{\sum_j e^{l_j}}}_{w_k}\,\frac{F(x_k)}{kT},
#   \qquad l_k = -\frac{E(x_k)}{kT},\quad F = -\nabla E.$$
#
# A training step needs it for $B$ points: $B\cdot K$ energy-and-force evaluations, each with
# $N(N-1)/2$ pair interactions. LJ-13 with $B = 512$, $K = 1000$ is 40 million pair
# interactions per call; LJ-55 with $B = 128$, $K = 100$ is 19 million.
#
# **The straightforward implementation** writes the left-hand side literally: materialise the
# $B\times K$ copies, evaluate $E$, take a logsumexp over $K$, and let autograd differentiate
# (the public iDEM code does this per point with `torch.func.vmap(torch.func.grad(...))`).
# Autograd must keep every intermediate of the forward pass for the backward pass: pair
# vectors, distances, powers, all of shape $B\times K\times N^2$. That is gigabytes, and the
# backward pass re-reads all of it.
#
# **Analytic forces.** The Lennard-Jones benchmark energy
# $E = c\sum_{i<j} \epsilon\,[(r_m/d_{ij})^{12} - 2(r_m/d_{ij})^6] + \tfrac{k}{2}\sum_i\lVert x_i - \bar x\rVert^2$
# (with $c = 2$ for the benchmark's ordered pairs) has the force
#
# $$F_i = \sum_{j\ne i} g_{ij}\,(x_i - x_j) - k\,(x_i - \bar x),\qquad
#   g_{ij} = \frac{12\,c\,\epsilon}{d_{ij}^2}\Big[\Big(\frac{r_m}{d_{ij}}\Big)^{12} - \Big(\frac{r_m}{d_{ij}}\Big)^6\Big],$$
#
# which reuses every power computed for the energy: about 30 floating-point operations per
# pair for energy *and* force, with nothing to store. Distances below $d_{\min} = 0.01$ are
# clamped (as in `boltzlab.energies`), so overlapping particles give huge but finite
# energies, around $10^{24}$.
#
# **Blocking.** The kernels never hold all $K$ copies. A Triton *program* owns a few points;
# its tile is (copies) $\times$ (particles $i$) $\times$ (particles $j$), e.g.
# $16\times16\times16$ for LJ-13: it loads $\varepsilon$ for a block of copies, forms
# $x_t + \sigma\varepsilon$, computes all pairs in registers, reduces over $j$ for the forces
# and over $i, j$ for the energy, and moves on to the next block of copies. Each pair is
# evaluated from both ends: twice the arithmetic of using $F_{ji} = -F_{ij}$, but no
# scattered writes and no atomics. On the CPU the same idea is written in PyTorch with the
# copies as the fast (SIMD) axis, and compiled with `torch.compile` when a call is large.
#
# **Online logsumexp.** To combine blocks we keep, per point, the running maximum $m$, the
# running sum of weights $s$ and the running weighted force sum $\mathbf a$, all relative to $m$.
# A block with log-weights $l_k$ and forces $F_k$ updates them as
#
# $$m' = \max\big(m, \max_k l_k\big),\qquad
#   s' = s\,e^{m - m'} + \sum_k e^{l_k - m'},\qquad
#   \mathbf a' = \mathbf a\,e^{m - m'} + \sum_k e^{l_k - m'}\,F_k,$$
#
# and at the end $S_K = \mathbf a / (s\,kT)$ and $\log\frac1K\sum_k e^{l_k} = m + \log s - \log K$.
# Every exponent is $\le 0$, so nothing overflows even for $l_k = -10^{24}$, and the memory is
# $O(B\cdot\dim)$ instead of $O(B\cdot K\cdot\dim)$. The same trick makes FlashAttention work.
#
# **Two estimates from one pass.** iDEM's training target (chapter 06) blends this force form
# with the noise form $\sum_k w_k\,\varepsilon_k/\sigma$, which has the same weights. So the
# kernel keeps one more running sum, $\mathbf n' = \mathbf n\,e^{m - m'} + \sum_k e^{l_k - m'}\,
# \varepsilon_k$, beside $\mathbf a$ (`mc_score_estimate(..., noise_form=True)`). That is
# $\dim$ more multiply-adds per copy against the pair loop's few thousand, so the
# training target costs about what the force form alone costs: measured in
# `benchmarks/README.md`.

# %% [markdown]
# ## Practice
#
# ### 1. Analytic forces are the gradient
#
# `lj_energy_forces` takes any batch of configurations; on CPU tensors it runs the blocked
# PyTorch path, on CUDA tensors the Triton kernel. Its forces must equal $-\nabla E$ from
# autograd (through a plain dense implementation of the same energy):

# %%
pot13 = lj13()
x = noisy_points(BenchCase(13, 8, 1, seed=SEED)).double()
energies, forces = lj_energy_forces(pot13, x, compile=False)
x_grad = x.clone().requires_grad_(True)
(autograd_forces,) = torch.autograd.grad(-dense_pair_energy(pot13, x_grad).sum(), x_grad)
max_error = (forces - autograd_forces).abs().max().item()
print(f"energies of 8 jittered LJ-13 clusters: {energies.numpy().round(2)}")
print(f"max |F_analytic - F_autograd| = {max_error:.2e}  (forces up to {forces.abs().max():.1f})")
assert max_error < 1e-9 * forces.abs().max().item()
assert torch.allclose(energies, pot13.energy(x), rtol=1e-12)

# %% [markdown]
# ### 2. The online logsumexp, and why it is needed
#
# Take $K = 64$ log-weights $l_k = -10^{q}(1 + u_k)$ with $u_k$ uniform in $[0, 1)$: for large $q$
# these are the energies of overlapping particles. The naive softmax, $e^{l_k}/\sum_j e^{l_j}$
# in float32, underflows to $0/0$ once $10^q$ exceeds about 100. The streamed update computes
# the same weighted average in float32 whatever $q$, and whatever the block size. Move the
# sliders: the left panel shows the running maximum $m$ after each block, the right panel
# the three answers.

# %%
def draw_online_lse(fig, log10_scale: float, block: int) -> dict[str, float]:
    """Compare the naive float32 softmax average, the streamed float32 one and the float64 truth."""
    g = torch.Generator().manual_seed(SEED)
    log_w = -(10.0**log10_scale) * (1.0 + torch.rand(1, 64, generator=g, dtype=torch.float64))
    values = torch.linspace(-1.0, 1.0, 64, dtype=torch.float64).reshape(1, 64, 1)
    truth = (torch.softmax(log_w, 1)[..., None] * values).sum(1).item()
    w32 = torch.exp(log_w.float())
    naive = ((w32[..., None] * values.float()).sum(1) / w32.sum(1)).item()
    state = OnlineLSEState.empty(1, 1, torch.float32, "cpu")
    maxima = []
    for k0 in range(0, 64, block):
        state = fold_block(state, log_w[:, k0:k0 + block].float(), values[:, k0:k0 + block].float())
        maxima.append(state.max_log_weight.item())
    streamed = (state.weighted_sum / state.sum_weights[:, None]).item()
    ax_m, ax_v = fig.subplots(1, 2)
    ax_m.plot(range(1, len(maxima) + 1), maxima, "o-")
    ax_m.set_xlabel("blocks folded in")
    ax_m.set_ylabel("running max m")
    ax_m.set_title(f"log-weights ~ -1e{log10_scale:g}, blocks of {block}")
    shown = [0.0 if math.isnan(naive) else naive, streamed, truth]
    ax_v.bar(["naive f32", "streamed f32", "exact f64"], shown, color=["tab:red", "tab:blue", "tab:green"])
    ax_v.set_title(f"naive = {naive:.4g}   streamed = {streamed:.4g}   exact = {truth:.4g}", fontsize=9)
    return {"naive": naive, "streamed": streamed, "exact": truth}


online_widget = slider_figure(
    draw_online_lse, figsize=(9.0, 3.5),
    log10_scale=ipywidgets.FloatSlider(value=1.0, min=0.0, max=24.0, step=0.5, description="log10 |l|"),
    block=ipywidgets.IntSlider(value=8, min=1, max=64, description="block"),
)
online_widget

# %%
for q in (1.0, 3.0, 24.0):
    online_widget.controls["log10_scale"].value = q
    result = online_widget.state
    print(f"log10 |l| = {q:4.1f}: naive {result['naive']:.4g}, streamed {result['streamed']:.4g}, exact {result['exact']:.4g}")
    assert abs(result["streamed"] - result["exact"]) < 1e-5
assert math.isnan(online_widget.state["naive"]), "the naive softmax should fail at log-weights of -1e24"
online_widget.controls["log10_scale"].value = 1.0

# %% [markdown]
# ### 3. The fused estimator against the references
#
# Three implementations on the same noise: the materialising reference (plain softmax over
# all $K$ copies, analytic forces), the autograd estimator, and the streamed one.

# %%
pot55 = lj55()
x_t = noisy_points(BenchCase(55, 4, 1, seed=SEED)).double()
noise = torch.randn(4, 96, pot55.dim, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
streamed = mc_score_estimate(pot55, x_t, 0.05, noise=noise)
reference = reference_score_estimate(pot55, x_t, 0.05, noise)
by_autograd = autograd_score_estimate(pot55, x_t, 0.05, noise)
for label, other in (("reference", reference.score), ("autograd", by_autograd.score)):
    err = ((streamed.score - other).abs().max() / other.abs().max()).item()
    print(f"streamed vs {label}: max relative difference {err:.1e}")
    assert err < 1e-10
print(f"ESS of the weights (out of K = 96): {streamed.ess.numpy().round(1)}; energy evaluations: {streamed.n_energy_evals}")

# %% [markdown]
# ### 4. The Triton kernel, run by Triton's interpreter
#
# Here is the heart of the Triton kernel: the pair sums of a tile of configurations. Triton
# code is Python over *blocks*: `xi[:, :, None] - xi[:, None, :]` is the
# (configurations $\times$ $i$ $\times$ $j$) tile of pair differences, `tl.where` masks the
# diagonal and the padding up to a power of two, and `tl.sum(..., axis=2)` is the reduction
# over $j$ that gives the forces.

# %%
source = (Path(kernels.__file__).parent / "triton_kernels.py").read_text()
start = source.index("@triton.jit\ndef _pair_sums")
print(source[start:source.index("@triton.jit", start + 10)])

# %% [markdown]
# The fused kernel wraps this in a loop over blocks of copies with the online update of
# section 2 (`mc_score_kernel` in the same file). Without a GPU, Triton's interpreter
# (`TRITON_INTERPRET=1`) executes the kernel with NumPy. It must be switched on before Triton
# compiles anything, so `run_interpreted` runs the kernel in a fresh Python process. The
# interpreter is slow per program, so it packs all points into one program.

# %%
x_small = noisy_points(BenchCase(13, 5, 1, seed=SEED))
noise_small = torch.randn(5, 40, pot13.dim, generator=torch.Generator().manual_seed(SEED + 1))
triton_energy, triton_score = run_interpreted([
    {"fn": "lj_energy_forces", "energy": pot13, "args": (x_small,)},
    {"fn": "mc_score_estimate", "energy": pot13, "args": (x_small, 0.1), "kwargs": {"noise": noise_small}},
])
reference_small = reference_score_estimate(pot13, x_small, 0.1, noise_small)
energy_error = ((triton_energy[0] - pot13.energy(x_small)).abs().max() / pot13.energy(x_small).abs().max()).item()
score_error = ((triton_score.score - reference_small.score).abs().max() / reference_small.score.abs().max()).item()
print(f"Triton (interpreted, float32) vs reference: energies {energy_error:.1e}, scores {score_error:.1e}")
assert energy_error < 1e-5 and score_error < 1e-4

# %% [markdown]
# ### 5. What it buys: a live benchmark
#
# Each row runs in a fresh Python process: time per call (best of the timed calls, after a
# warm-up that includes compilation) and peak memory (the most resident memory the calls
# added). Ratios are against the vmap/grad estimator. The sizes come from your budget; the
# compiled row is left out under the `smoke` budget because compiling takes 10-30 s.
# On a shared or busy machine timings vary, so compare rows of one table only.

# %%
peak_flops, peak_note = cpu_peak_flops()
print(f"CPU peak estimate: {peak_note}\n")
rows = (["vmap_grad", "autograd"] if S.include_autograd_baseline else []) + ["torch_eager"]
if budget() != "smoke":
    rows.append("torch_compiled")
live_tables = {}
for n, batch, k in ((13, S.lj13_batch, S.lj13_k), (55, S.lj55_batch, S.lj55_k)):
    case = BenchCase(n, batch, k, seed=SEED)
    results = [measure(case, impl, threads=1, repeats=S.repeats, warmup=1) for impl in tqdm(rows, desc=case.name)]
    live_tables[case.name] = results
    display(benchmark_table(case, results, rows[0], peak_flops))
assert all(r.status == "ok" and r.seconds > 0 for results in live_tables.values() for r in results)

# %% [markdown]
# For reference, the full sizes (LJ-13: $B = 512$, $K = 1000$; LJ-55: $B = 128$, $K = 100$) were
# measured with `benchmarks/bench_score_estimator.py` on the 2-core development machine; the
# run's output is shipped in `benchmarks/results_cpu_2core.json` and shown here:

# %%
shipped = Path(kernels.__file__).resolve().parents[2] / "benchmarks" / "results_cpu_2core.json"
if shipped.exists():
    import json

    from boltzlab.kernels.benchmark import Measurement

    run = json.loads(shipped.read_text())
    print(f"CPU peak estimate of that machine: {run['peak_note']}\n")
    for name, case_fields in run["cases"].items():
        case = BenchCase(**case_fields)
        results = [Measurement(**r) for r in run["results"][name]]
        display(benchmark_table(case, results, "vmap_grad", run["peak_flops"]))
else:
    print("benchmarks/results_cpu_2core.json is not part of this installation")

# %% [markdown]
# ## Discussion
#
# - **Memory is the first wall.** The autograd estimator's memory grows with
#   $B\cdot K\cdot N^2$: at the full LJ-13 size it needs about 10 GB, so on a GPU it forces
#   small batches or small $K$, and $K$ is exactly what controls the bias of the estimator
#   (chapter 05). The streamed estimator's memory does not grow with $K$ at all.
# - **Float32 and huge energies.** With overlapping particles the energies reach $10^{24}$; in
#   float32 they carry absolute rounding errors of $10^{17}$, so two correct implementations
#   disagree wildly in $l_k$ while agreeing on the weights (all on the best copy). The
#   tests compare such cases in relative terms, and the online update never forms
#   $e^{l_k}$ itself.
# - **Threads on a small, shared CPU.** Run the benchmark script with 1 and 2 threads: on a
#   2-core machine that other jobs also use, OpenMP threads wait for each other at every
#   operation, and 2 threads can be far slower than 1. Compiled kernels with reductions
#   suffer most.
# - **Compilation costs time.** `torch.compile` takes 10-30 s per block shape, so the CPU path
#   compiles only calls of at least $10^7$ pair interactions (or when `BOLTZLAB_COMPILE=1`).
# - **GPU tiles.** One tile holds all $N^2$ pairs of a configuration ($64^2$ for LJ-55, padded
#   to a power of two); much larger $N$ would need the $j$ loop split into tiles and
#   neighbour lists, which these kernels do not attempt ($N \le 128$).
# - **How we know it is right.** Every kernel is tested against a plain reference in float32
#   and float64, for several $N$, with blocks that do not divide $B$ or $K$, and the
#   references against `boltzlab.energies` and autograd (`tests/test_kernels.py`).
#
# ## Summary
#
# - The DEM score target is a softmax-weighted average of forces over $K$ perturbed copies.
# - Analytic forces reuse the energy's arithmetic and store nothing; autograd stores
#   everything.
# - Blocking over copies plus an online logsumexp (running max, rescaled sums) gives the
#   exact same answer in $O(B\cdot\dim)$ memory, stable for energies of $10^{24}$.
# - The same algorithm runs as a Triton kernel on GPUs and as blocked, compiled PyTorch on
#   CPUs, behind one function, `mc_score_estimate`.
#
# ## Exercises
#
# Open `exercises/A_online_logsumexp.ipynb`: write the online logsumexp update (section 2's
# equations) yourself. Its check cell streams blocks through your function, tries
# log-weights of $-10^{24}$ and a block of pure padding, and tells you which mistake it sees.

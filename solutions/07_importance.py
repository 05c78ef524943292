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
# # Exercises 07 · Importance sampling
#
# Two estimators every reweighting needs: the Bennett acceptance ratio, which turns samples of
# two states into their free-energy difference, and the bootstrap, which puts an interval on
# log Ẑ. Complete each function where it says `raise NotImplementedError()`, run the cell,
# then run the check cell below it: it tells you what is wrong, specifically. After each check
# a short cell uses *your* function.
#
# Background: chapter 07, section Theory.

# %%
import math

import torch

from boltzlab.config import budget
from boltzlab.energies import DoubleWell2D

SEED = 0
torch.manual_seed(SEED)
torch.set_num_threads(1)
SMOKE = budget() == "smoke"

# %% [markdown]
# ## Exercise 1 · The Bennett acceptance ratio (3 points)
#
# Two states with reduced potentials u_0 and u_1 (energies in units of kT) and the free-energy
# difference ΔF = F_1 − F_0 = −log(Z_1/Z_0). You get Δu = u_1 − u_0 evaluated at n_0 samples of
# state 0 (`du0`) and at n_1 samples of state 1 (`du1`), the same sign convention in both.
# With M = log(n_0/n_1) and the Fermi function f(z) = 1/(1 + e^z), BAR's ΔF solves
#
# $$\sum_{i=1}^{n_0} f(M + \Delta u^{(0)}_i - \Delta F) \;=\; \sum_{j=1}^{n_1} f(-M - \Delta u^{(1)}_j + \Delta F).$$
#
# Hints:
# - log f(z) = −softplus(z) (`torch.nn.functional.softplus`) is exact for any z; compare the two
#   sides through their logs (`torch.logsumexp`), never through exponentials: Δu can be 1000.
# - g(ΔF) = log(left side) − log(right side) increases strictly with ΔF, from −∞ to +∞. Find an
#   interval [lo, hi] with g(lo) < 0 < g(hi) (start anywhere and widen it), then bisect.
# - Return a Python float (or a 0-d tensor) in units of kT.

# %% nbgrader={"grade": false, "grade_id": "bar_free_energy_solution", "locked": false, "schema_version": 3, "solution": true}
def bar_free_energy(du0: torch.Tensor, du1: torch.Tensor) -> float:
    """ΔF = F_1 - F_0 (kT) by BAR; du0 (n0,) and du1 (n1,) hold u_1 - u_0 at samples of states 0 and 1."""
    ### BEGIN SOLUTION
    du0, du1 = du0.double(), du1.double()
    m = math.log(du0.numel() / du1.numel())
    softplus = torch.nn.functional.softplus

    def balance(df: float) -> float:
        left = torch.logsumexp(-softplus(m + du0 - df), dim=0)
        right = torch.logsumexp(-softplus(-m - du1 + df), dim=0)
        return float(left - right)

    centre = float(torch.cat([du0, du1]).median())
    step = 1.0
    while balance(centre - step) > 0 or balance(centre + step) < 0:
        step *= 2.0
    lo, hi = centre - step, centre + step
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if balance(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "bar_free_energy", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch07 import check_bar_free_energy

check_bar_free_energy(bar_free_energy)
### BEGIN HIDDEN TESTS
# instructor tests: swapping the states flips the sign; a shift of u_1 by c shifts ΔF by c
_g = torch.Generator().manual_seed(61)
_x0 = torch.randn(300, generator=_g, dtype=torch.float64)
_x1 = 0.5 + 0.7 * torch.randn(200, generator=_g, dtype=torch.float64)


def _du(x):
    return (x - 0.5) ** 2 / (2 * 0.49) - x**2 / 2


_df = float(bar_free_energy(_du(_x0), _du(_x1)))
assert abs(float(bar_free_energy(-_du(_x1), -_du(_x0))) + _df) < 1e-6
assert abs(float(bar_free_energy(_du(_x0) + 300.0, _du(_x1) + 300.0)) - (_df + 300.0)) < 1e-6
assert abs(_df + math.log(0.7)) < 0.15
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Two 1-D states: u_0 = x²/2 and u_1 = (x − 1)²/(2·0.6²) + 0.5, so that
# ΔF = 0.5 − log 0.6 exactly. Compare your BAR with the two FEP estimates over repeated
# experiments of 200 samples per state: which spreads least?

# %% tags=["uses-exercise"]
exact = 0.5 - math.log(0.6)
g = torch.Generator().manual_seed(SEED)
runs = {"FEP forward": [], "FEP reverse": [], "BAR (yours)": []}
for _ in range(20 if SMOKE else 100):
    x0 = torch.randn(200, generator=g, dtype=torch.float64)
    x1 = 1.0 + 0.6 * torch.randn(200, generator=g, dtype=torch.float64)

    def du(x):
        return (x - 1.0) ** 2 / (2 * 0.36) + 0.5 - x**2 / 2

    runs["FEP forward"].append(-float(torch.logsumexp(-du(x0), 0) - math.log(200)))
    runs["FEP reverse"].append(float(torch.logsumexp(du(x1), 0) - math.log(200)))
    runs["BAR (yours)"].append(float(bar_free_energy(du(x0), du(x1))))
for name, values in runs.items():
    v = torch.tensor(values)
    print(f"{name:12s}: mean error {float(v.mean()) - exact:+.4f}, spread {float(v.std()):.4f}")

# %% [markdown]
# ## Exercise 2 · A bootstrap interval for log Ẑ (3 points)
#
# From log-weights log w_i (i = 1..n) of samples of a proposal q, log Ẑ = log((1/n) Σ w_i).
# The bootstrap repeats the experiment on the data you have: draw n indices **with
# replacement**, recompute log Ẑ on those weights, and do that `n_boot` times. Return
#
# - the estimate log Ẑ from all n weights,
# - the standard deviation of the `n_boot` replicates (the standard error),
# - their 2.5 % and 97.5 % quantiles (a 95 % interval),
#
# as four floats. Draw every random number from `generator` (e.g.
# `torch.randint(n, (n_boot, n), generator=generator)`), so that a rerun gives the same
# answer. Log-weights can be in the thousands: use `torch.logsumexp`.

# %% nbgrader={"grade": false, "grade_id": "log_z_bootstrap_solution", "locked": false, "schema_version": 3, "solution": true}
def log_z_bootstrap(log_w: torch.Tensor, n_boot: int, generator: torch.Generator) -> tuple[float, float, float, float]:
    """(log Ẑ, bootstrap standard error, 2.5 % quantile, 97.5 % quantile) from log-weights (n,)."""
    ### BEGIN SOLUTION
    lw = log_w.double()
    n = lw.numel()
    estimate = float(torch.logsumexp(lw, 0)) - math.log(n)
    picks = torch.randint(n, (n_boot, n), generator=generator)
    replicates = torch.logsumexp(lw[picks], dim=1) - math.log(n)
    low, high = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return estimate, float(replicates.std()), float(low), float(high)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "log_z_bootstrap", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch07 import check_log_z_bootstrap

check_log_z_bootstrap(log_z_bootstrap)
### BEGIN HIDDEN TESTS
# instructor tests: another distribution of weights; the interval holds the estimate; float32 input
_lw = 3.0 + 0.8 * torch.randn(800, generator=torch.Generator().manual_seed(62), dtype=torch.float64)
_est, _se, _lo, _hi = (float(v) for v in log_z_bootstrap(_lw, 1500, torch.Generator().manual_seed(1)))
_exact_se = math.sqrt((math.exp(0.64) - 1) / 800)  # lognormal weights: sd(w)/mean(w) = sqrt(e^{s^2} - 1)
assert abs(_se / _exact_se - 1) < 0.25 and _lo < _est < _hi
assert abs((_hi - _lo) / (2 * 1.96 * _se) - 1) < 0.2
_big = (4000.0 + torch.randn(300, generator=torch.Generator().manual_seed(63))).float()
assert all(math.isfinite(float(v)) for v in log_z_bootstrap(_big, 200, torch.Generator().manual_seed(2)))
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** A Gaussian proposal q = N(0, diag(1.5², 1.5²)) for the double well, whose log Z is
# exact: does your interval cover it? Repeat with a few seeds and count.

# %% tags=["uses-exercise"]
dw = DoubleWell2D()
n = 2_000 if SMOKE else 20_000
covered = 0
for seed in range(5):
    x = 1.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    log_q = -(x**2).sum(-1) / (2 * 1.5**2) - math.log(2 * math.pi * 1.5**2)
    est, se, low, high = log_z_bootstrap(-dw.energy(x) - log_q, 500, torch.Generator().manual_seed(seed))
    covered += low <= dw.log_z() <= high
    print(f"seed {seed}: log Ẑ = {est:.4f} ± {se:.4f}, interval [{low:.4f}, {high:.4f}], exact {dw.log_z():.4f}")
print(f"{covered} of 5 intervals cover the exact log Z")

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
# # Exercise A · The online logsumexp update
#
# From the appendix chapter "The GPU kernels". Write your code where it says
# `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells
# you what is wrong, specifically.

# %%
import math

import torch

from boltzlab.config import set_torch_threads

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## The update (3 points)
#
# The fused score kernel never holds all $K$ log-weights $l_k = -E(x_k)/kT$ of a point at
# once. It walks over blocks of copies and keeps, per point, three running quantities:
#
# $$m = \max_{k\ \text{seen}} l_k,\qquad s = \sum_{k\ \text{seen}} e^{l_k - m},\qquad
#   \mathbf a = \sum_{k\ \text{seen}} e^{l_k - m}\,\mathbf v_k,$$
#
# so that at the end $\mathbf a / s = \sum_k \operatorname{softmax}(l)_k\,\mathbf v_k$ and
# $m + \log s = \log\sum_k e^{l_k}$. Write the update that folds one block in:
#
# * `m` `(B,)`, `s` `(B,)`, `acc` `(B, D)`: the state before the block
#   (the empty state is $m = -\infty$, $s = 0$, $\mathbf a = 0$);
# * `log_w` `(B, k)`: the block's log-weights, possibly $-\infty$ (padding, weight 0);
# * `values` `(B, k, D)`: the block's vectors (the forces, in the kernel).
#
# Return the new `(m, s, acc)`. Never exponentiate anything that can be positive: with
# overlapping particles $|l_k|$ reaches $10^{24}$. And a block of pure padding must not
# produce NaN (think about $e^{m_\text{old} - m_\text{new}}$ when both are $-\infty$).

# %% nbgrader={"grade": false, "grade_id": "online_update_solution", "locked": false, "schema_version": 3, "solution": true}
def online_update(m: torch.Tensor, s: torch.Tensor, acc: torch.Tensor,
                  log_w: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold a block into the running (max, sum of weights, weighted sum).

    m, s: (B,); acc: (B, D); log_w: (B, k); values: (B, k, D). Returns (m', s', acc') with
    m' = max(m, max_k l_k), s' = s e^{m - m'} + sum_k e^{l_k - m'},
    acc' = acc e^{m - m'} + sum_k e^{l_k - m'} v_k.
    """
    ### BEGIN SOLUTION
    new_m = torch.maximum(m, log_w.amax(dim=1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    rescale = torch.exp(m - shift)
    w = torch.exp(log_w - shift[:, None])
    new_s = s * rescale + w.sum(dim=1)
    new_acc = acc * rescale[:, None] + (w[:, :, None] * values).sum(dim=1)
    return new_m, new_s, new_acc
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "online_update", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.config import set_torch_threads
from boltzlab.grading.checks_appendix import check_online_update

check_online_update(online_update)
### BEGIN HIDDEN TESTS
# instructor tests: float32, one copy per block, and agreement with the package's update
from boltzlab.kernels.online_lse import online_lse_update

_g = torch.Generator().manual_seed(99)
_lw = 10 * torch.randn(5, 9, generator=_g)
_v = torch.randn(5, 9, 3, generator=_g)
_m, _s, _a = torch.full((5,), -math.inf), torch.zeros(5), torch.zeros(5, 3)
for _k in range(9):
    _m, _s, _a = online_update(_m, _s, _a, _lw[:, _k:_k + 1], _v[:, _k:_k + 1])
_ref = online_lse_update(torch.full((5,), -math.inf), torch.zeros(5), torch.zeros(5), torch.zeros(5, 3), _lw, _v)
assert torch.allclose(_a / _s[:, None], _ref[3] / _ref[1][:, None], rtol=1e-5, atol=1e-6)
assert torch.allclose(_m + torch.log(_s), _ref[0] + torch.log(_ref[1]), rtol=1e-6, atol=1e-5)
### END HIDDEN TESTS

# %% [markdown]
# ## Use it: the score estimate of a tiny system
#
# With your update, stream 50 perturbed copies of a 1-D point $x_t$ of the double well
# $E(x) = x^4 - 4x^2$ in blocks of 8 and compare with a direct softmax over all copies.

# %% tags=["uses-exercise"]
g = torch.Generator().manual_seed(1)
x_t, sigma = torch.tensor([[0.3]]), 0.5
copies = x_t[:, None, :] + sigma * torch.randn(1, 50, 1, generator=g)  # (1, 50, 1)
energies = (copies**4 - 4 * copies**2).squeeze(-1)
forces = -(4 * copies**3 - 8 * copies)
state = (torch.full((1,), -math.inf), torch.zeros(1), torch.zeros(1, 1))
for k0 in range(0, 50, 8):
    state = online_update(*state, -energies[:, k0:k0 + 8], forces[:, k0:k0 + 8])
streamed = state[2] / state[1][:, None]
direct = (torch.softmax(-energies, 1)[..., None] * forces).sum(1)
print(f"streamed score {streamed.item():.5f}, direct {direct.item():.5f}")
assert torch.allclose(streamed, direct, rtol=1e-5, atol=1e-6)

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
# # Exercise 06 · iDEM: one EGNN layer, and the outer loop's buffer refill
#
# From chapter 06 "iDEM on LJ-13 and LJ-55". Write your code where it says
# `raise NotImplementedError()`, run the cell, then run the check cell below it: it tells
# you what is wrong, specifically.

# %%
import torch

from boltzlab.config import set_torch_threads
from boltzlab.diffusion import GeometricNoiseSchedule, ReplayBuffer, sample_prior
from boltzlab.energies import GaussianMixture, lj13
from boltzlab.estimators import gmm_noised_score
from boltzlab.metrics import mode_coverage
from boltzlab.models import EGNN
from boltzlab.reference import load_reference

set_torch_threads()
# seeded for reproducible checks; the assignment keeps the returned Generator from being displayed
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. One EGNN layer (4 points)
#
# An E(n)-equivariant graph layer on the fully connected graph of $n$ particles updates node
# features $h_i$ and positions $x_i$. For every ordered pair $i \ne j$ with $d_{ij}^2 = |x_i - x_j|^2$:
#
# $$m_{ij} = \phi_e\big([h_i, h_j, d_{ij}^2]\big),\qquad
#   x_i' = x_i + \frac{1}{n-1}\sum_{j\ne i} \frac{x_i - x_j}{\sqrt{d_{ij}^2 + 1}}\,\phi_x(m_{ij}),\qquad
#   h_i' = h_i + \phi_h\Big(\Big[h_i,\ \frac{1}{n-1}\sum_{j \ne i} m_{ij}\Big]\Big).$$
#
# The three networks are given as functions that act on the last axis:
#
# * `phi_e`: `(..., 2H + 1) -> (..., H)`, its input the concatenation $[h_i, h_j, d_{ij}^2]$ in that order;
# * `phi_x`: `(..., H) -> (..., 1)`;
# * `phi_h`: `(..., 2H) -> (..., H)`, or `None` for a layer that leaves $h$ unchanged.
#
# Inputs: `h` of shape `(B, n, H)`, `x` of shape `(B, n, d)`; return `(h', x')` with the same shapes.
# Vectorise over the batch and the pairs (build `(B, n, n, ...)` tensors; no loop over particles
# needed), and leave the pairs $j = i$ out of both sums.

# %% nbgrader={"grade": false, "grade_id": "egnn_layer_solution", "locked": false, "schema_version": 3, "solution": true}
def egnn_layer(h: torch.Tensor, x: torch.Tensor, phi_e, phi_x, phi_h):
    """One EGNN layer: h (B, n, H), x (B, n, d) -> (h' (B, n, H), x' (B, n, d))."""
    ### BEGIN SOLUTION
    B, n, H = h.shape
    rel = x.unsqueeze(2) - x.unsqueeze(1)  # (B, n, n, d), rel[:, i, j] = x_i - x_j
    sq = (rel**2).sum(-1, keepdim=True)  # (B, n, n, 1)
    h_recv = h.unsqueeze(2).expand(B, n, n, H)
    h_send = h.unsqueeze(1).expand(B, n, n, H)
    others = (~torch.eye(n, dtype=torch.bool, device=x.device)).to(x.dtype)[None, :, :, None]
    msg = phi_e(torch.cat([h_recv, h_send, sq], dim=-1)) * others
    step = rel * phi_x(msg) * others / torch.sqrt(sq + 1.0)
    x_out = x + step.sum(dim=2) / (n - 1)
    if phi_h is None:
        return h, x_out
    return h + phi_h(torch.cat([h, msg.sum(dim=2) / (n - 1)], dim=-1)), x_out
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "egnn_layer", "locked": true, "points": 4, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch06 import check_egnn_layer

check_egnn_layer(egnn_layer)
### BEGIN HIDDEN TESTS
# instructor tests: float32, another width and seed, two particles, the last layer of a real EGNN
from boltzlab.models import EGNNLayer

_g = torch.Generator().manual_seed(77)
for _n, _d, _H in ((2, 3, 4), (7, 3, 16), (4, 2, 5)):
    with torch.random.fork_rng():
        torch.manual_seed(_n)
        _layer = EGNNLayer(_H)
    _h, _x = torch.randn(2, _n, _H, generator=_g), torch.randn(2, _n, _d, generator=_g)
    _got = egnn_layer(_h, _x, lambda z, _l=_layer: _l.edge_out(_l.edge_in(z)), _layer.coord_mlp,
                      _layer.node_mlp)
    _want = _layer(_h, _x)
    assert torch.allclose(_got[0], _want[0], atol=1e-5) and torch.allclose(_got[1], _want[1], atol=1e-5)
_net = EGNN(5, 3, hidden=8, n_layers=2, seed=3)
_last = _net.layers[-1]
_h, _x = torch.randn(3, 5, 8, generator=_g), torch.randn(3, 5, 3, generator=_g)
_got = egnn_layer(_h, _x, lambda z: _last.edge_out(_last.edge_in(z)), _last.coord_mlp, None)
assert torch.equal(_got[0], _h) and torch.allclose(_got[1], _last(_h, _x)[1], atol=1e-5)
### END HIDDEN TESTS

# %% [markdown]
# ### Use it: your layer inside an EGNN on LJ-13
#
# Run the first layer of an EGNN score network on LJ-13 configurations with your function, then
# rotate the clusters and run it again: the new positions rotate with them.

# %% tags=["uses-exercise"]
net = EGNN(13, 3, hidden=16, n_layers=2, seed=0)
first = net.layers[0]
x = load_reference("lj13", 8).reshape(8, 13, 3)
h = torch.randn(8, 13, 16, generator=torch.Generator().manual_seed(1))
R, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))


def mine(h, x):
    return egnn_layer(h, x, lambda z: first.edge_out(first.edge_in(z)), first.coord_mlp, first.node_mlp)


with torch.no_grad():
    h1, x1 = mine(h, x)
    h2, x2 = mine(h, x @ R.T)
print(f"|x'(Rx) - R x'(x)| max: {float((x2 - x1 @ R.T).abs().max()):.1e}; |h'(Rx) - h'(x)| max: "
      f"{float((h2 - h1).abs().max()):.1e}")
assert torch.allclose(x2, x1 @ R.T, atol=1e-4) and torch.allclose(h2, h1, atol=1e-4)

# %% [markdown]
# ## 2. The outer loop: refill the replay buffer (3 points)
#
# iDEM's outer loop runs the reverse SDE of the current score model and adds the samples to the
# replay buffer. Write it with Euler-Maruyama, from $t = 1$ to $t = 0$ in `n_steps` equal steps
# $\Delta t = 1/n_\text{steps}$ at the times $t_k = 1 - k\,\Delta t$, $k = 0, \dots, n_\text{steps} - 1$:
#
# $$x \leftarrow P\big(x + g(t_k)^2\, s(x, t_k)\,\Delta t + g(t_k)\sqrt{\Delta t}\; P z\big),\qquad z \sim \mathcal N(0, I),$$
#
# where $P$ is `project` (centre-of-mass removal for particles; `None` means no projection).
# Draw the random numbers in this order with `generator`, so that the check can reproduce them:
# first $x_1$ = `sample_prior(schedule, n, buffer.dim, project=project, generator=generator)`, then one
# `torch.randn(x.shape, generator=generator)` per step. `score(x, t)` takes `x` `(n, dim)` and `t` `(n,)`;
# `schedule.g2(t)` is $g(t)^2$ for a tensor `t`. Add the final states to the buffer with `buffer.add` and
# return them, `(n, dim)`. Write the loop yourself (not `boltzlab.diffusion.reverse_sde_sample`,
# which the check compares with).

# %% nbgrader={"grade": false, "grade_id": "refill_solution", "locked": false, "schema_version": 3, "solution": true}
def refill(buffer: ReplayBuffer, score, schedule: GeometricNoiseSchedule, n: int, n_steps: int,
           project=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the reverse SDE of ``score`` for n samples and add them to ``buffer``: -> (n, dim)."""
    ### BEGIN SOLUTION
    keep = project if project is not None else (lambda v: v)
    x = sample_prior(schedule, n, buffer.dim, project=project, generator=generator)
    dt = 1.0 / n_steps
    with torch.no_grad():
        for k in range(n_steps):
            t = torch.full((n,), 1.0 - k * dt, dtype=x.dtype)
            g2 = schedule.g2(t)[:, None]
            z = keep(torch.randn(x.shape, generator=generator, dtype=x.dtype))
            x = keep(x + g2 * dt * score(x, t) + torch.sqrt(g2 * dt) * z)
    buffer.add(x)
    return x
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "refill", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch06 import check_refill

check_refill(refill)
### BEGIN HIDDEN TESTS
# instructor tests: another seed, one step, LJ-13 with its projection, a buffer that wraps around
from boltzlab.diffusion import reverse_sde_sample

_lj = lj13()
_sched = GeometricNoiseSchedule(0.01, 2.0)


def _pull(x, t):
    return -(x - 0.3) / (1.0 + _sched.variance(t)[:, None])


for _steps in (1, 7):
    _buf = ReplayBuffer(50, _lj.dim)
    _buf.add(torch.zeros(45, _lj.dim))
    _out = refill(_buf, _pull, _sched, 12, _steps, _lj.remove_com, torch.Generator().manual_seed(_steps))
    _g = torch.Generator().manual_seed(_steps)
    _x1 = sample_prior(_sched, 12, _lj.dim, project=_lj.remove_com, generator=_g)
    _want = reverse_sde_sample(_pull, _sched, _x1, _steps, project=_lj.remove_com, generator=_g)
    assert torch.allclose(_out, _want, rtol=1e-4, atol=1e-4)
    assert len(_buf) == 50 and float(_buf.data.abs().sum(-1).gt(0).sum()) == 12  # 5 appended, 7 overwrote the oldest
### END HIDDEN TESTS

# %% [markdown]
# ### Use it: the exact score of GMM-40
#
# GMM-40 noised to level $\sigma_t$ is again a mixture (width $\sqrt{s^2 + \sigma_t^2}$), so its score is exact
# (`gmm_noised_score`). With it, your refill is a perfect sampler: every mode is covered. What
# iDEM has to learn is this score, from energy evaluations alone.

# %% tags=["uses-exercise"]
gmm = GaussianMixture()
schedule = GeometricNoiseSchedule(0.01, 70.0)
buffer = ReplayBuffer(5_000, 2)
samples = refill(buffer, lambda x, t: gmm_noised_score(gmm, x, schedule.std(t)), schedule, 1_000, 100, None,
                 torch.Generator().manual_seed(0))
covered, _ = mode_coverage(samples, gmm.means, gmm.std)
print(f"{len(buffer)} states in the buffer; {covered}/40 modes covered")
assert covered == 40

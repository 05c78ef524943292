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
# # Exercises 02 · Normalizing flows
#
# Two functions at the heart of every flow: the forward pass of an affine coupling layer
# with its log-determinant, and the change-of-variables log-density. Complete each
# function where it says `raise NotImplementedError()`, run the cell, then run the check
# cell below it: it tells you what is wrong, specifically. After each check a short cell
# uses *your* function.
#
# Background: chapter 02, section Theory.

# %%
import math

import torch

from boltzlab import flows
from boltzlab.config import budget
from boltzlab.energies import DoubleWell2D
from boltzlab.training import double_well_exact_samples

SEED = 0
torch.manual_seed(SEED)
torch.set_num_threads(1)  # small networks: one thread is fastest
SMOKE = budget() == "smoke"

# %% [markdown]
# ## Exercise 1 · The affine coupling layer (3 points)
#
# With a binary mask m (1 = keep, 0 = transform) and a network that maps x ⊙ m to a
# log-scale s and a shift t,
#
# $$y = x \odot m + (1 - m) \odot \big(x \odot e^{s} + t\big), \qquad (s, t) = \mathrm{net}(x \odot m),
# \qquad \log\left|\det \frac{\partial y}{\partial x}\right| = \sum_i (1 - m_i)\, s_i .$$
#
# Write the forward pass. `net` is given: call it on x ⊙ m, never on x (why? the check
# will tell you what breaks otherwise). Return y and one log-determinant per sample.

# %% nbgrader={"grade": false, "grade_id": "affine_coupling_forward_solution", "locked": false, "schema_version": 3, "solution": true}
def affine_coupling_forward(x: torch.Tensor, mask: torch.Tensor, net) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling y = x*m + (1-m)*(x*exp(s) + t) with (s, t) = net(x*m).

    x: (n, d) points; mask: (d,) of 0s and 1s; net(h) -> (s, t), each (n, d), for h of shape (n, d).
    Returns y (n, d) and log|det dy/dx| (n,).
    """
    ### BEGIN SOLUTION
    s, t = net(x * mask)
    free = 1 - mask
    y = x * mask + free * (x * torch.exp(s) + t)
    return y, (free * s).sum(-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "affine_coupling_forward", "locked": true, "points": 3, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch02 import check_affine_coupling_forward

check_affine_coupling_forward(affine_coupling_forward)
### BEGIN HIDDEN TESTS
# the package's layer, with its own network, is an independent implementation of the same map
_layer = flows.AffineCoupling([0, 1, 1, 0], hidden=8, zero_init=False).double()
with torch.no_grad():
    for _p in _layer.parameters():
        _p.add_(0.3 * torch.randn(_p.shape, generator=torch.Generator().manual_seed(7), dtype=_p.dtype))
    _x = torch.randn(50, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    _y, _ld = affine_coupling_forward(_x, _layer.mask, _layer.scale_and_shift)
    _y_ref, _ld_ref = _layer(_x)
assert torch.allclose(_y, _y_ref, atol=1e-10) and torch.allclose(_ld, _ld_ref, atol=1e-10)
# float32 input works and a single point keeps its batch dimension
_y32, _ld32 = affine_coupling_forward(_x[:1].float(), _layer.mask.float(), _layer.float().scale_and_shift)
assert _y32.shape == (1, 4) and _ld32.shape == (1,) and _y32.dtype == torch.float32
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Four of your layers with alternating masks and a fixed smooth network bend
# a Gaussian, and the change of variables gives log q of every pushed sample. A density
# must satisfy E_q[1{x ∈ R} / q(x)] = area(R) for any region R inside its support: we
# check it on the unit box around the samples' median (area 1), with its standard error.

# %% tags=["uses-exercise"]
def bend(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A hand-made 'network': s and t are smooth functions of the kept coordinate."""
    kept = h.sum(-1, keepdim=True)  # the only non-zero entry of h = x * mask
    return 0.3 * torch.tanh(kept).expand_as(h), (0.8 * torch.sin(1.5 * kept)).expand_as(h)


masks = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])] * 2
z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
x, log_det = z, torch.zeros(z.shape[0], dtype=torch.float64)
for m in masks:
    x, ld = affine_coupling_forward(x, m.double(), bend)
    log_det = log_det + ld
log_q = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) - log_det  # log q(x) = log N(z) - log|det dx/dz|
in_box = (x - x.median(0).values).abs().max(-1).values < 0.5
terms = in_box / log_q.exp()
print(f"E_q[1(x in box) / q(x)] = {float(terms.mean()):.3f} ± {float(terms.std()) / math.sqrt(x.shape[0]):.3f}; "
      "the box's area is 1")

# %% [markdown]
# ## Exercise 2 · The change-of-variables log-density (2 points)
#
# A flow x = f(z), z ~ N(0, I_d), is given by its inverse: `inverse(x)` returns z = f⁻¹(x)
# and log|det ∂z/∂x|, one per sample. Write
#
# $$\log q(x) = \log \mathcal{N}(z; 0, I) + \log\left|\det \frac{\partial z}{\partial x}\right|,
# \qquad \log \mathcal{N}(z; 0, I) = -\tfrac12 |z|^2 - \tfrac d2 \log 2\pi .$$

# %% nbgrader={"grade": false, "grade_id": "flow_log_prob_solution", "locked": false, "schema_version": 3, "solution": true}
def flow_log_prob(x: torch.Tensor, inverse) -> torch.Tensor:
    """log q(x) for a flow with a standard normal base.

    x: (n, d); inverse(x) -> (z (n, d), log|det dz/dx| (n,)). Returns log q(x), shape (n,).
    """
    ### BEGIN SOLUTION
    z, logdet = inverse(x)
    d = z.shape[-1]
    return -0.5 * (z**2).sum(-1) - 0.5 * d * math.log(2 * math.pi) + logdet
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "flow_log_prob", "locked": true, "points": 2, "schema_version": 3, "solution": false}
from boltzlab.grading.checks_ch02 import check_flow_log_prob

check_flow_log_prob(flow_log_prob)
### BEGIN HIDDEN TESTS
# against the package's flows (independent code), spline and RealNVP, 2-D and 3-D
for _flow in (flows.spline_flow(2, n_layers=3, bound=3.0, zero_init=False, seed=3).double(),
              flows.realnvp(3, n_layers=3, zero_init=False, seed=4).double()):
    _x = 1.5 * torch.randn(40, _flow.dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(flow_log_prob(_x, _flow.inverse), _flow.log_prob(_x), atol=1e-10)
### END HIDDEN TESTS

# %% [markdown]
# **Use it.** Fit a small spline flow to double-well samples (with the package's training
# loop), then evaluate your log-density through the flow's inverse: the held-out negative
# log-likelihood should approach the exact one, and the flow's mass in the deep well
# the exact 0.967.

# %% tags=["uses-exercise"]
dw = DoubleWell2D()
g = torch.Generator().manual_seed(SEED)
train_x, test_x = (double_well_exact_samples(4_000, dw, generator=g) for _ in range(2))
flow = flows.spline_flow(2, n_layers=3, n_bins=8, bound=4.0, hidden=32, loc=train_x.mean(0), scale=train_x.std(0))
flows.train(flow, 100 if SMOKE else 800, batch_size=256, lr=3e-3, data=train_x, seed=SEED)
with torch.no_grad():
    nll_flow = -float(flow_log_prob(test_x, flow.inverse).mean())
    x_flow, _ = flow.sample(20_000, generator=g)
nll_exact = float((dw.energy(test_x.double()) / dw.kT + dw.log_z()).mean())
print(f"held-out NLL: flow {nll_flow:.4f}, exact {nll_exact:.4f} (difference = KL(p||q) estimate)")
print(f"P(deep well): flow {float((x_flow[:, 0] < 0).float().mean()):.4f}, exact {dw.well_probabilities()[0]:.4f}")

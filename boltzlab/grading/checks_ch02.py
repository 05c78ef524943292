r"""Checks for the chapter 02 exercises (normalizing flows).

- :func:`check_affine_coupling_forward`: y = x ⊙ m + (1 - m) ⊙ (x ⊙ exp(s) + t) with
  (s, t) = net(x ⊙ m), and log|det ∂y/∂x| = Σ_i (1 - m_i) s_i;
- :func:`check_flow_log_prob`: log q(x) = log N(z; 0, I) + log|det ∂z/∂x| with (z, log|det|) = inverse(x).

Each check compares with an independent answer (the layer's inverse, autograd's Jacobian,
a Gaussian density written in closed form) and, when the answer is wrong in a way
learners often get it wrong, says which way.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from boltzlab.grading.feedback import CheckFailed, all_passed, call_learner, expect_close, expect_finite, expect_shape, passed

Net = Callable[[Tensor], tuple[Tensor, Tensor]]


def _random_net(dim: int, seed: int) -> Net:
    """A fixed smooth 'network' (s, t) = (tanh(x A), x B + c): every output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    b = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    return lambda h: (torch.tanh(h @ a), h @ b + c)


def _reference_coupling(x: Tensor, mask: Tensor, net: Net) -> tuple[Tensor, Tensor]:
    log_scale, shift = net(mask * x)
    changed = 1 - mask
    return mask * x + changed * (torch.exp(log_scale) * x + shift), (changed * log_scale).sum(-1)


def _coupling_mistakes(x: Tensor, mask: Tensor, net: Net) -> dict[str, tuple[Tensor, Tensor]]:
    """What common wrong versions return, with the sentence that explains each."""
    s_all, t_all = net(x)
    s, t = net(mask * x)
    free = 1 - mask
    y, _ = _reference_coupling(x, mask, net)
    return {
        "the network sees all of x: pass it x * mask, so that s and t depend only on the dimensions "
        "the layer keeps (otherwise the layer cannot be inverted and its Jacobian is not triangular)":
            (x * mask + free * (x * torch.exp(s_all) + t_all), (free * s_all).sum(-1)),
        "the transformation is applied where mask == 1: the kept dimensions (mask 1) pass through "
        "unchanged and the others (mask 0) are scaled and shifted":
            (x * (1 - mask) + mask * (x * torch.exp(s) + t), (mask * s).sum(-1)),
        "x is scaled by s instead of exp(s): the scale is exp(s), so that it is positive and log|det| = Σ s":
            (x * mask + free * (x * s + t), (free * s).sum(-1)),
        "log|det| sums s over all dimensions: only the transformed ones (mask 0) contribute":
            (y, s.sum(-1)),
        "log|det| has the wrong sign: the forward map multiplies by exp(s), so log|det| = +Σ (1 - m) s":
            (y, -(free * s).sum(-1)),
    }


def _diagnose(label: str, got: tuple[Tensor, Tensor], mistakes: dict[str, tuple[Tensor, Tensor]]) -> None:
    for sentence, (y_wrong, ld_wrong) in mistakes.items():
        if torch.allclose(got[0], y_wrong, atol=1e-8) and torch.allclose(got[1], ld_wrong, atol=1e-8):
            raise CheckFailed(f"{label}: {sentence}.")


def _as_pair(label: str, out: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckFailed(f"{label} should return a tuple (y, logdet), got {type(out).__name__}"
                          + (f" of length {len(out)}" if isinstance(out, tuple) else ""))
    return out  # type: ignore[return-value]


def check_affine_coupling_forward(fn: Callable[[Tensor, Tensor, Net], tuple[Tensor, Tensor]]) -> None:
    """Check ``fn(x, mask, net) -> (y, logdet)`` for x ``(n, d)``, mask ``(d,)``, net ``(n, d) -> ((n, d), (n, d))``."""
    name = "affine_coupling_forward"
    for dim, mask_list, seed in ((2, [1, 0], 0), (2, [0, 1], 1), (5, [1, 0, 1, 1, 0], 2)):
        mask = torch.tensor(mask_list, dtype=torch.float64)
        net = _random_net(dim, seed)
        x = torch.randn(7, dim, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        label = f"{name}(x of shape {tuple(x.shape)}, mask={mask_list})"
        y, logdet = _as_pair(label, call_learner(fn, x.clone(), mask, net, name=name))
        expect_shape(f"{label}: y", y, x.shape)
        if isinstance(logdet, Tensor) and tuple(logdet.shape) == x.shape:
            raise CheckFailed(f"{label}: logdet has shape {tuple(logdet.shape)}, one number per dimension; "
                              f"expected ({x.shape[0]},): sum the log-scales over the dimensions (dim=-1)")
        expect_shape(f"{label}: logdet", logdet, (x.shape[0],))
        expect_finite(f"{label}: y", y)
        expect_finite(f"{label}: logdet", logdet)
        y, logdet = y.to(torch.float64), logdet.to(torch.float64)
        kept = mask.bool()
        if not torch.allclose(y[:, kept], x[:, kept], atol=1e-10):
            _diagnose(label, (y, logdet), _coupling_mistakes(x, mask, net))
            raise CheckFailed(f"{label}: y changes the dimensions where mask == 1; those must pass through unchanged")
        y_ref, ld_ref = _reference_coupling(x, mask, net)
        if not (torch.allclose(y, y_ref, atol=1e-8) and torch.allclose(logdet, ld_ref, atol=1e-8)):
            _diagnose(label, (y, logdet), _coupling_mistakes(x, mask, net))
        expect_close(f"{label}: y", y, y_ref, rtol=1e-6, atol=1e-8,
                     hint="y = x * mask + (1 - mask) * (x * exp(s) + t) with (s, t) = net(x * mask)")
        expect_close(f"{label}: logdet", logdet, ld_ref, rtol=1e-6, atol=1e-8,
                     hint="log|det ∂y/∂x| = sum over the transformed dimensions of s")
    passed("y keeps the masked dimensions and scales and shifts the others, for 2-D and 5-D inputs")

    # independent of the reference formula: the log-determinant of autograd's Jacobian
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    net = _random_net(3, 3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    _, logdet = _as_pair(name, call_learner(fn, x.clone(), mask, net, name=name))
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: _as_pair(name, fn(v[None], mask, net))[0][0], x[i])
        expect_close(f"logdet of sample {i}", logdet[i], float(torch.linalg.slogdet(jac).logabsdet), rtol=1e-6, atol=1e-8,
                     hint="compare with log|det| of the Jacobian of your own y: they must agree")
    passed("logdet equals log|det J| of autograd's Jacobian of your y")

    # invertible: undo it with the inverse written independently
    y, _ = _as_pair(name, call_learner(fn, x.clone(), mask, net, name=name))
    s, t = net(y * mask)
    x_back = y * mask + (1 - mask) * (y - t) * torch.exp(-s)
    expect_close("x recovered by the inverse x = y m + (1 - m)(y - t) exp(-s)", x_back, x, rtol=1e-6, atol=1e-8)
    passed("the inverse recovers x, so your layer is invertible")
    all_passed(name)


def _gaussian_inverse(loc: Tensor, scale: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The inverse of x = loc + scale ⊙ z: (z, log|det ∂z/∂x|)."""
    return lambda x: ((x - loc) / scale, -torch.log(scale).sum().expand(x.shape[:-1]))


def check_flow_log_prob(fn: Callable[[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]]], Tensor]) -> None:
    """Check ``fn(x, inverse) -> log q(x)`` for x ``(n, d)`` and ``inverse(x) -> (z (n, d), logdet (n,))``."""
    name = "flow_log_prob"
    for dim, seed in ((2, 0), (3, 1)):
        g = torch.Generator().manual_seed(seed)
        loc = torch.randn(dim, generator=g, dtype=torch.float64)
        scale = 0.5 + torch.rand(dim, generator=g, dtype=torch.float64) * 2
        inverse = _gaussian_inverse(loc, scale)
        x = loc + 2 * torch.randn(6, dim, generator=g, dtype=torch.float64)
        label = f"{name} for a {dim}-D flow x = loc + scale * z"
        got = call_learner(fn, x.clone(), inverse, name=name)
        if isinstance(got, Tensor) and tuple(got.shape) == (6, dim):
            raise CheckFailed(f"{label}: returned shape {tuple(got.shape)}, one value per dimension; "
                              "expected (6,): sum log N over the dimensions of z")
        if isinstance(got, Tensor) and got.ndim == 0:
            raise CheckFailed(f"{label}: returned a single number; expected one log-density per sample, shape (6,) "
                              "(do not sum or average over the samples)")
        expect_shape(label, got, (6,))
        expect_finite(label, got)
        exact = torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)  # closed form, independent
        z, logdet = inverse(x)
        diff = (got.to(torch.float64) - exact)
        if torch.allclose(diff, torch.full_like(diff, 0.5 * dim * math.log(2 * math.pi)), atol=1e-6):
            raise CheckFailed(f"{label}: off by +{0.5 * dim * math.log(2 * math.pi):.4f} = (d/2) log 2π for every "
                              "sample: the standard normal's normalising constant -(d/2) log 2π is missing")
        if torch.allclose(diff, torch.full_like(diff, (dim / 2 - 1) * math.log(2 * math.pi)), atol=1e-6) and dim != 2:
            raise CheckFailed(f"{label}: the normalising constant is -(d/2) log 2π with d = x.shape[-1] = {dim}; "
                              "it looks like d = 2 was hard-coded")
        if torch.allclose(got.to(torch.float64), exact - 2 * logdet, atol=1e-6):
            raise CheckFailed(f"{label}: the log-determinant has the wrong sign: log q(x) = log N(z) + log|det ∂z/∂x|, "
                              "and inverse(x) already returns log|det ∂z/∂x|")
        if torch.allclose(got.to(torch.float64), exact - logdet, atol=1e-6):
            raise CheckFailed(f"{label}: the log-determinant is missing: log q(x) = log N(z) + log|det ∂z/∂x|")
        expect_close(label, got, exact, rtol=1e-6, atol=1e-8,
                     hint="log q(x) = -|z|^2/2 - (d/2) log 2π + logdet with (z, logdet) = inverse(x)")
    passed("log q equals the closed-form Gaussian density of an affine flow in 2-D and 3-D")

    # a density integrates to one: a non-Gaussian 2-D map checked on a grid
    def warp_inverse(x: Tensor) -> tuple[Tensor, Tensor]:
        # z1 = x1, z2 = (x2 - sin(2 x1)) / 0.6: triangular, log|det| = -log 0.6
        z = torch.stack([x[..., 0], (x[..., 1] - torch.sin(2 * x[..., 0])) / 0.6], -1)
        return z, torch.full(x.shape[:-1], -math.log(0.6), dtype=x.dtype)

    n = 300
    axis = torch.linspace(-7, 7, n + 1, dtype=torch.float64)
    centres = 0.5 * (axis[1:] + axis[:-1])
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    log_q = call_learner(fn, grid, warp_inverse, name=name)
    expect_shape(f"{name} on a grid of {grid.shape[0]} points", log_q, (grid.shape[0],))
    mass = float(log_q.to(torch.float64).exp().sum() * (14 / n) ** 2)
    expect_close("∫ q(x) dx on a grid (a curved 2-D flow)", mass, 1.0, rtol=0, atol=1e-3,
                 hint="a density must integrate to one; check the constant and the log-determinant")
    passed(f"q integrates to {mass:.4f} for a curved 2-D flow")
    all_passed(name)

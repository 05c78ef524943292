r"""Coupling flows: layers, a flow built from them, and two builders (chapter 02).

A flow is an invertible map x = f(z) from a standard normal base z ~ N(0, I) to data
space. By the change of variables,

    log q(x) = log N(f^{-1}(x); 0, I) + log |det ∂f^{-1}/∂x|,

and f is a composition f = f_L ∘ ... ∘ f_1 whose log-determinants add up. Every layer
here (a :class:`Bijection`) maps ``(..., dim) -> (..., dim)`` both ways and returns the
log |det J| of the direction it ran, one number per sample, shape ``(...)``:

- :class:`AffineCoupling` (RealNVP): the dimensions where ``mask`` is 1 pass through
  and condition the others, y = x ⊙ exp(s(x_m)) + t(x_m), log|det| = Σ s;
- :class:`SplineCoupling` (neural spline flow): the others go through a monotone
  rational-quadratic spline on [-B, B] whose knots depend on x_m, identity outside;
- :class:`ElementwiseAffine`: x = loc + scale ⊙ z, to put the flow on the data's scale.

:class:`Flow` chains them (``forward``: base to data, ``inverse``: data to base) and
offers ``log_prob(x)`` and ``sample(n) -> (x, log q(x))``. :func:`realnvp` and
:func:`spline_flow` build the two flows of chapter 02 with alternating masks;
:func:`coupling_stages` gives the density after each coupling layer.
Training lives in :mod:`boltzlab.flows.training`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from boltzlab.validation import check_points

__all__ = [
    "FlowInputError",
    "Bijection",
    "ElementwiseAffine",
    "AffineCoupling",
    "SplineCoupling",
    "rational_quadratic_spline",
    "alternating_masks",
    "Flow",
    "coupling_stages",
    "realnvp",
    "spline_flow",
    "standard_normal_log_prob",
]


class FlowInputError(ValueError):
    """Raised for input a flow cannot evaluate: wrong shape, dtype, NaN or inf."""


def _check_points(x: Tensor, dim: int, name: str = "x") -> Tensor:
    check_points(x, dim, name, FlowInputError)
    if not bool(torch.isfinite(x).all()):
        raise FlowInputError(f"{name}: {int((~torch.isfinite(x)).sum())} entries are NaN or infinite")
    return x


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) = -|z|^2 / 2 - (d/2) log 2π: ``(..., d) -> (...)``."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


class Bijection(nn.Module):
    """An invertible map of ``(..., dim)``. ``forward`` runs base -> data, ``inverse`` data -> base;
    each returns ``(output (..., dim), log|det J| of that direction (...))``."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class ElementwiseAffine(Bijection):
    """x = loc + scale ⊙ z, log|det ∂x/∂z| = Σ_i log scale_i. ``loc``, ``scale``: ``(dim,)``.

    Learnable by default; ``scale`` is stored as its logarithm so it stays positive."""

    def __init__(self, loc: Tensor, scale: Tensor, learnable: bool = True) -> None:
        super().__init__()
        loc = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        if loc.ndim != 1 or scale.shape != loc.shape:
            raise ValueError(f"loc and scale must both have shape (dim,), "
                             f"got {tuple(loc.shape)} and {tuple(scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError(f"scale must be positive, got {scale.tolist()}")
        log_scale = scale.log()
        if learnable:
            self.loc, self.log_scale = nn.Parameter(loc.clone()), nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc.clone())
            self.register_buffer("log_scale", log_scale)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logdet = self.log_scale.sum().expand(z.shape[:-1])
        return self.loc + z * self.log_scale.exp(), logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = -self.log_scale.sum().expand(x.shape[:-1])
        return (x - self.loc) * torch.exp(-self.log_scale), logdet


def _mlp(d_in: int, d_out: int, hidden: int, n_hidden: int, zero_last: bool) -> nn.Sequential:
    """A SiLU network d_in -> hidden (x n_hidden) -> d_out; a zero last layer outputs 0,
    which makes a coupling layer start as the identity."""
    sizes = [d_in] + [hidden] * n_hidden
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    last = nn.Linear(sizes[-1], d_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def _check_mask(mask: Tensor | Sequence[int]) -> Tensor:
    m = torch.as_tensor(mask)
    if m.ndim != 1 or not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"mask must be a 1-D sequence of 0s and 1s, got {m.tolist()}")
    if int(m.sum()) in (0, m.numel()):
        raise ValueError(f"mask must keep some dimensions (1) and transform others (0), got {m.tolist()}")
    return m.bool()


class AffineCoupling(Bijection):
    r"""RealNVP affine coupling layer.

    With a binary ``mask`` of shape ``(dim,)`` (1 = pass through and condition, 0 = transform)
    and a network (s, t) = NN(x ⊙ mask) with outputs ``(..., dim)`` each,

        y = x ⊙ m + (1 - m) ⊙ (x ⊙ exp(s) + t),     log|det ∂y/∂x| = Σ_i (1 - m_i) s_i,

    and the inverse x = y ⊙ m + (1 - m) ⊙ (y - t) ⊙ exp(-s) (s, t depend only on y ⊙ m = x ⊙ m).
    The log-scale is soft-clamped, s = c tanh(s_raw / c) with c = ``max_log_scale``, so a
    single layer cannot blow up during training. ``zero_init`` starts it as the identity.
    """

    def __init__(self, mask: Tensor | Sequence[int], hidden: int = 64, n_hidden: int = 2,
                 max_log_scale: float = 3.0, zero_init: bool = True) -> None:
        super().__init__()
        self.register_buffer("mask", _check_mask(mask).to(torch.get_default_dtype()))
        dim = self.mask.numel()
        self.net = _mlp(dim, 2 * dim, hidden, n_hidden, zero_last=zero_init)
        self.max_log_scale = float(max_log_scale)

    def scale_and_shift(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t) from x ⊙ mask ``(..., dim)``: each ``(..., dim)``, zero where the mask keeps x."""
        s_raw, t = self.net(x_kept).chunk(2, dim=-1)
        s = self.max_log_scale * torch.tanh(s_raw / self.max_log_scale)
        free = 1 - self.mask
        return s * free, t * free  # zero where the mask keeps x, so those pass unchanged

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_and_shift(z * self.mask)
        return z * torch.exp(s) + t, s.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.scale_and_shift(x * self.mask)
        return (x - t) * torch.exp(-s), -s.sum(-1)


def rational_quadratic_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Monotone rational-quadratic spline (Durkan et al. 2019), elementwise, with linear tails.

    Shapes: ``x`` ``(...)``; ``widths`` and ``heights`` ``(..., K)`` positive and summing to
    2B along the last axis; ``derivatives`` ``(..., K + 1)`` positive, the slopes at the knots
    (slope 1 at ±B matches the identity tails). The knots are x_0 = -B < ... < x_K = B and
    y_0 = -B < ... < y_K = B. In bin k, with ξ = (x - x_k)/w_k ∈ [0, 1], s_k = h_k / w_k,

        y = y_k + h_k [s_k ξ² + d_k ξ(1-ξ)] / [s_k + (d_{k+1} + d_k - 2 s_k) ξ(1-ξ)],
        dy/dx = s_k² [d_{k+1} ξ² + 2 s_k ξ(1-ξ) + d_k (1-ξ)²] / [s_k + (d_{k+1} + d_k - 2 s_k) ξ(1-ξ)]².

    Outside [-B, B] the map is the identity. ``inverse=True`` solves the quadratic
    a ξ² + b ξ + c = 0 for ξ given y (the stable root 2c / (-b - sqrt(b² - 4ac))).
    Returns ``(output (...), log|d output / d input| (...))``.
    """
    x_knots = torch.nn.functional.pad(torch.cumsum(widths, -1), (1, 0)) - bound
    y_knots = torch.nn.functional.pad(torch.cumsum(heights, -1), (1, 0)) - bound
    inside = (x >= -bound) & (x <= bound)
    # evaluate the spline on a clamped copy so points in the tails never create NaN gradients
    v = x.clamp(-bound, bound)
    knots = y_knots if inverse else x_knots
    n_bins = widths.shape[-1]
    k = (v[..., None] >= knots[..., 1:n_bins]).sum(-1, keepdim=True)  # bin index, (..., 1)

    def at(t: Tensor) -> Tensor:
        return t.gather(-1, k).squeeze(-1)

    x_k, y_k, w, h = at(x_knots), at(y_knots), at(widths), at(heights)
    d_lo, d_hi = at(derivatives[..., :-1]), at(derivatives[..., 1:])
    s = h / w
    if inverse:
        dy = v - y_k
        a = h * (s - d_lo) + dy * (d_hi + d_lo - 2 * s)
        b = h * d_lo - dy * (d_hi + d_lo - 2 * s)
        c = -s * dy
        xi = (2 * c) / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0)))
        out = x_k + xi * w
    else:
        xi = (v - x_k) / w
        xi_1m = xi * (1 - xi)
        out = y_k + h * (s * xi**2 + d_lo * xi_1m) / (s + (d_hi + d_lo - 2 * s) * xi_1m)
    xi = xi.clamp(0, 1)
    xi_1m = xi * (1 - xi)
    denom = s + (d_hi + d_lo - 2 * s) * xi_1m
    log_slope = 2 * torch.log(s) + torch.log(d_hi * xi**2 + 2 * s * xi_1m + d_lo * (1 - xi) ** 2) - 2 * torch.log(denom)
    log_slope = -log_slope if inverse else log_slope
    return torch.where(inside, out, x), torch.where(inside, log_slope, torch.zeros_like(log_slope))


class SplineCoupling(Bijection):
    r"""Rational-quadratic spline coupling layer (neural spline flow).

    The dimensions where ``mask`` is 0 go through :func:`rational_quadratic_spline` with
    ``n_bins`` bins on [-B, B] (B = ``bound``) and the identity outside; its K widths,
    K heights and K - 1 interior slopes per dimension come from a network of x ⊙ mask:

        widths  = 2B [δ + (1 - Kδ) softmax(θ_w)],  heights likewise,
        slopes  = δ + softplus(θ_d + c),  slope 1 at ±B,

    with δ = ``min_bin`` (no bin collapses) and c chosen so θ = 0 gives slope 1: a zero
    network (``zero_init``) makes the layer the identity. log|det| = Σ over transformed dims.
    """

    def __init__(self, mask: Tensor | Sequence[int], n_bins: int = 8, bound: float = 5.0, hidden: int = 64,
                 n_hidden: int = 2, min_bin: float = 1e-3, zero_init: bool = True) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound}")
        if not 0 < min_bin * n_bins < 1:
            raise ValueError(f"min_bin * n_bins must lie in (0, 1), got {min_bin} * {n_bins}")
        self.register_buffer("mask", _check_mask(mask).to(torch.get_default_dtype()))
        dim = self.mask.numel()
        self.n_bins, self.bound, self.min_bin = int(n_bins), float(bound), float(min_bin)
        self.net = _mlp(dim, dim * (3 * n_bins - 1), hidden, n_hidden, zero_last=zero_init)
        self._slope_offset = math.log(math.expm1(1 - min_bin))  # softplus(offset) + min_bin = 1

    def _spline_params(self, x_kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, delta = self.n_bins, self.min_bin
        theta = self.net(x_kept).unflatten(-1, (self.mask.numel(), 3 * k - 1))
        w_raw, h_raw, d_raw = theta.split([k, k, k - 1], dim=-1)
        widths = 2 * self.bound * (delta + (1 - k * delta) * torch.softmax(w_raw, -1))
        heights = 2 * self.bound * (delta + (1 - k * delta) * torch.softmax(h_raw, -1))
        inner = delta + nn.functional.softplus(d_raw + self._slope_offset)
        ones = torch.ones_like(inner[..., :1])
        return widths, heights, torch.cat([ones, inner, ones], -1)

    def _transform(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        widths, heights, slopes = self._spline_params(x * self.mask)
        y, log_slope = rational_quadratic_spline(x, widths, heights, slopes, self.bound, inverse=inverse)
        keep = self.mask.bool()
        return torch.where(keep, x, y), (log_slope * (1 - self.mask)).sum(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, inverse=True)


def alternating_masks(dim: int, n_layers: int) -> list[Tensor]:
    """``n_layers`` masks of shape ``(dim,)`` that keep the first half, then the second half,
    and so on, so every dimension is transformed by every other layer. For dim = 2: [1, 0], [0, 1], ..."""
    if dim < 2:
        raise ValueError(f"coupling layers need dim >= 2, got {dim}")
    first = (torch.arange(dim) < (dim + 1) // 2).long()
    return [first if i % 2 == 0 else 1 - first for i in range(n_layers)]


# ----------------------------------------------------------------------------------------
# The flow
# ----------------------------------------------------------------------------------------


class Flow(nn.Module):
    r"""x = f_L ∘ ... ∘ f_1(z) with z ~ N(0, I_dim); ``layers[0]`` acts first on z.

    ``log_prob(x)`` = log N(z) + Σ_l log|det ∂f_l^{-1}/∂·| along the inverse pass;
    ``sample(n)`` returns x and the same log q(x) from the forward pass (differentiable in the
    parameters: the reparameterisation used by reverse-KL training).
    """

    def __init__(self, layers: Sequence[Bijection], dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.layers = nn.ModuleList(layers)
        self.dim = int(dim)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base to data: ``(..., dim) -> (x (..., dim), log|det ∂x/∂z| (...))``."""
        z = _check_points(z, self.dim, "z")
        logdet = z.new_zeros(z.shape[:-1])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to base, layers in reverse order: ``(..., dim) -> (z (..., dim), log|det ∂z/∂x| (...))``."""
        x = _check_points(x, self.dim)
        logdet = x.new_zeros(x.shape[:-1])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) = log N(f^{-1}(x)) + log|det ∂f^{-1}/∂x|: ``(..., dim) -> (...)``."""
        z, logdet = self.inverse(x)
        return standard_normal_log_prob(z) + logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log-density: ``(x (n, dim), log q(x) (n,))``, with gradients."""
        if n < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        p = self._first_parameter_or_buffer()
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device)
        x, logdet = self.forward(z)
        return x, standard_normal_log_prob(z) - logdet

    def _first_parameter_or_buffer(self) -> Tensor:
        for t in (*self.parameters(), *self.buffers()):
            return t
        return torch.empty(0)


def coupling_stages(flow: Flow) -> list[Flow]:
    """The flows made of the first 0, 1, ..., L coupling layers of ``flow``, each followed by
    the flow's final :class:`ElementwiseAffine` (when it ends with one), so that every stage is
    a normalised density in data coordinates: stage 0 is the scaled base, stage L is ``flow``.
    The stages share ``flow``'s layers (no copies): they show how it transports the density."""
    layers = list(flow.layers)
    tail = [layers.pop()] if layers and isinstance(layers[-1], ElementwiseAffine) else []
    return [Flow(layers[:k] + tail, flow.dim) for k in range(len(layers) + 1)]


def _build(dim: int, loc: Tensor | Sequence[float] | float, scale: Tensor | Sequence[float] | float,
           seed: int, make_layer: Callable[[Tensor], Bijection], n_layers: int) -> Flow:
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the global RNG alone
        torch.manual_seed(seed)
        layers: list[Bijection] = [make_layer(m) for m in alternating_masks(dim, n_layers)]
    loc_t = torch.as_tensor(loc, dtype=torch.get_default_dtype()).expand(dim).clone()
    scale_t = torch.as_tensor(scale, dtype=torch.get_default_dtype()).expand(dim).clone()
    layers.append(ElementwiseAffine(loc_t, scale_t, learnable=True))
    return Flow(layers, dim)


def realnvp(dim: int, n_layers: int = 8, hidden: int = 64, n_hidden: int = 2, loc: float | Sequence[float] = 0.0,
            scale: float | Sequence[float] = 1.0, seed: int = 0, zero_init: bool = True) -> Flow:
    """A RealNVP flow: ``n_layers`` :class:`AffineCoupling` layers with alternating masks,
    then x = loc + scale ⊙ y (:class:`ElementwiseAffine`, learnable) to reach the data's scale.
    With ``zero_init`` the flow starts as N(loc, diag(scale²))."""
    return _build(dim, loc, scale, seed, lambda m: AffineCoupling(m, hidden, n_hidden, zero_init=zero_init), n_layers)


def spline_flow(dim: int, n_layers: int = 6, n_bins: int = 8, bound: float = 5.0, hidden: int = 64, n_hidden: int = 2,
                loc: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0, seed: int = 0,
                zero_init: bool = True) -> Flow:
    """A neural spline flow: ``n_layers`` :class:`SplineCoupling` layers (``n_bins`` bins on
    [-bound, bound]) with alternating masks, then x = loc + scale ⊙ y. Choose ``scale`` so the
    data divided by it lies well inside [-bound, bound]."""
    return _build(dim, loc, scale, seed,
                  lambda m: SplineCoupling(m, n_bins, bound, hidden, n_hidden, zero_init=zero_init), n_layers)

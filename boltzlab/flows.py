r"""Normalizing flows written out for teaching: coupling layers, a flow, and its training.

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
:func:`spline_flow` build the two flows of chapter 02 with alternating masks.

Training (chapters 02 and 03), in :func:`train`:

- maximum likelihood on samples:  L_ML = -E_data[log q(x)]
- reverse KL from the energy alone:  L_KL = E_q[E(x)/kT + log q(x)] = -log Z + KL(q || p)
  (the variational free energy in units of kT, bounded below by -log Z)
- a mix (1 - λ) L_KL + λ L_ML, and a temperature schedule kT_t for L_KL;

and temperature annealing as a curriculum in :func:`train_annealed` (reverse KL at a high
temperature, then maximum likelihood on the flow's own samples reweighted to ever lower
temperatures).

Also here: two grid tools for 2-D flows (:func:`log_prob_on_grid`, :func:`kl_on_grid`)
that give numbers independent of Monte Carlo, and :func:`coupling_stages` (the density
after each coupling layer). Training loops share :func:`boltzlab.training.run_training`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab.energies import Energy
from boltzlab.metrics import grid_2d, kish_ess
from boltzlab.validation import check_points
from boltzlab.training import Evaluation, TrainingHistory, run_training

__all__ = [
    "ladder_table",
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
    "train",
    "annealing_schedule",
    "AnnealingStage",
    "train_annealed",
    "log_prob_on_grid",
    "kl_on_grid",
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


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def annealing_schedule(kT_start: float, kT_end: float, n_steps: int, anneal_fraction: float = 0.7) -> Tensor:
    """Temperatures ``(n_steps,)``: geometric from ``kT_start`` to ``kT_end`` over the first
    ``anneal_fraction`` of the steps, then constant at ``kT_end`` (so the model settles at the target)."""
    if not (kT_start > 0 and kT_end > 0):
        raise ValueError(f"temperatures must be positive, got {kT_start} and {kT_end}")
    if not 0 < anneal_fraction <= 1:
        raise ValueError(f"anneal_fraction must lie in (0, 1], got {anneal_fraction}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    n_anneal = max(1, round(anneal_fraction * n_steps))
    ramp = torch.logspace(math.log10(kT_start), math.log10(kT_end), n_anneal, dtype=torch.float64)
    return torch.cat([ramp, torch.full((n_steps - n_anneal,), float(kT_end), dtype=torch.float64)])


def train(
    flow: Flow,
    n_steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    data: Tensor | None = None,
    energy: Energy | None = None,
    ml_weight: float | None = None,
    data_log_weights: Tensor | None = None,
    kT: float | Tensor | None = None,
    seed: int = 0,
    max_grad_norm: float = 100.0,
    evaluate: Evaluation | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> TrainingHistory:
    r"""Train ``flow`` with Adam (learning rate cosine-decayed from ``lr`` to ``lr``/20).

    The loss at step t is  (1 - λ) L_KL + λ L_ML  with

        L_ML = -(1/B) Σ_b log q(x_b),  x_b a minibatch of ``data`` ``(n, dim)``
               (drawn uniformly, or with probability ∝ exp(``data_log_weights``) ``(n,)``:
               maximum likelihood of the reweighted sample),
        L_KL = (1/B) Σ_b [E(x_b)/kT_t + log q(x_b)],  x_b ~ q (reparameterised samples).

    Give ``data`` only (maximum likelihood, λ = 1), ``energy`` only (reverse KL, λ = 0), or
    both with ``ml_weight`` = λ in (0, 1). ``kT`` is the temperature of L_KL: a number or a
    schedule ``(n_steps,)`` (see :func:`annealing_schedule`); default ``energy.kT``.
    Minibatches and base samples come from a generator seeded with ``seed``, so a run is
    reproducible given the flow's initial parameters.

    Returns a :class:`boltzlab.training.TrainingHistory` with, per step, ``"loss"``, and
    ``"reverse_kl"`` and ``"kT"`` when an energy is used, ``"nll"`` when data are.
    ``evaluate()`` (no arguments, run without gradients after every ``eval_every`` steps
    and after the last) may return more numbers, kept in ``history.evaluations``.
    A loss that becomes NaN or infinite stops training with a ValueError.
    """
    ml_weight = _check_training_request(flow, n_steps, batch_size, data, energy, ml_weight)
    data_probs = None if data_log_weights is None else _sampling_probabilities(data_log_weights, data)
    schedule = _temperatures(kT, energy, n_steps)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps, eta_min=lr / 20)

    def step(t: int) -> dict[str, float]:
        record: dict[str, float] = {}
        loss = torch.zeros(())
        if ml_weight < 1:
            assert energy is not None
            x, log_q = flow.sample(batch_size, generator=generator)
            kl_term = (energy.energy(x) / schedule[t] + log_q).mean()
            loss = loss + (1 - ml_weight) * kl_term
            record.update(reverse_kl=kl_term.item(), kT=float(schedule[t]))
        if ml_weight > 0:
            assert data is not None
            if data_probs is None:
                idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
            else:
                idx = torch.multinomial(data_probs, batch_size, replacement=True, generator=generator)
            ml_term = -flow.log_prob(data[idx]).mean()
            loss = loss + ml_weight * ml_term
            record["nll"] = ml_term.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_decay.step()
        return {"loss": loss.item(), **record}

    return run_training(step, n_steps, progress=progress, desc="training flow", evaluate=evaluate,
                        eval_every=eval_every)


def _check_training_request(flow: Flow, n_steps: int, batch_size: int, data: Tensor | None,
                            energy: Energy | None, ml_weight: float | None) -> float:
    """Validate what :func:`train` was asked to do; returns the weight λ of maximum likelihood."""
    if data is None and energy is None:
        raise ValueError("train needs data (maximum likelihood), an energy (reverse KL), or both")
    if ml_weight is None:
        if data is not None and energy is not None:
            raise ValueError("with both data and an energy, give ml_weight (the weight λ of maximum likelihood)")
        ml_weight = 1.0 if energy is None else 0.0
    if not 0.0 <= ml_weight <= 1.0:
        raise ValueError(f"ml_weight must lie in [0, 1], got {ml_weight}")
    if ml_weight > 0 and data is None:
        raise ValueError(f"ml_weight = {ml_weight} needs data for the maximum-likelihood term")
    if ml_weight < 1 and energy is None:
        raise ValueError(f"ml_weight = {ml_weight} < 1 needs an energy for the reverse-KL term")
    if n_steps < 1 or batch_size < 1:
        raise ValueError(f"n_steps and batch_size must be positive, got {n_steps} and {batch_size}")
    if data is not None:
        _check_points(data, flow.dim, "data")
        if data.ndim != 2:
            raise FlowInputError(f"data: expected shape (n_samples, {flow.dim}), got {tuple(data.shape)}")
    if energy is not None and energy.dim != flow.dim:
        raise ValueError(f"energy {energy.name} has dim {energy.dim} but the flow has dim {flow.dim}")
    return float(ml_weight)


def _sampling_probabilities(log_w: Tensor, data: Tensor | None) -> Tensor:
    """softmax(log_w) in float64: the probability of drawing each data point into a minibatch."""
    if data is None or log_w.shape != data.shape[:1]:
        expected = f"({data.shape[0]},)" if data is not None else "that of data (none given)"
        raise ValueError(f"data_log_weights must have shape {expected}, got {tuple(log_w.shape)}")
    if bool(torch.isnan(log_w).any()) or not bool(torch.isfinite(log_w).any()):
        raise ValueError("data_log_weights contain NaN, or not a single finite weight")
    return torch.softmax(log_w.detach().to(torch.float64), 0)


@dataclass
class AnnealingStage:
    """One rung of :func:`train_annealed`: its temperature, the Kish ESS fraction of the pool
    reweighted to it (NaN for the first rung, trained by reverse KL), its training history, and
    ``samples`` ``(n_record, dim)`` drawn from the flow once the rung was fitted."""

    kT: float
    ess_fraction: float
    history: TrainingHistory
    samples: Tensor


def ladder_table(stages: Sequence[AnnealingStage]):
    """The rungs of :func:`train_annealed` as a :class:`boltzlab.tables.Table`: kT and the pool's
    ESS fraction per rung (the first rung, fitted by reverse KL, has no pool)."""
    from boltzlab.tables import table

    return table([{"rung": k, "kT": s.kT, "ESS / pool": None if math.isnan(s.ess_fraction) else s.ess_fraction}
                  for k, s in enumerate(stages)], float_format=".3f", formats={"kT": ".2f"},
                 caption="annealing ladder (rung 0: reverse KL, no pool)")


def train_annealed(
    flow: Flow,
    energy: Energy,
    kT_ladder: Sequence[float] | Tensor,
    first_steps: int,
    steps_per_stage: int,
    pool_size: int = 10_000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    n_record: int = 2000,
    progress: bool = True,
) -> list[AnnealingStage]:
    r"""Temperature annealing as a curriculum, by reweighted maximum likelihood.

    1. Fit q to p_0 ∝ exp(-E/T_0) at the first (highest) temperature of ``kT_ladder`` by
       reverse KL for ``first_steps`` steps: hot enough, p_0 is one smooth blob, so there
       is nothing to collapse onto.
    2. For each next rung T_k: draw ``pool_size`` samples x ~ q from the current flow, weight
       them toward p_k ∝ exp(-E/T_k),

           log w = -E(x)/T_k - log q(x),

       and fit q to the reweighted pool by maximum likelihood for ``steps_per_stage`` steps
       (:func:`train` with ``data_log_weights``). Maximum likelihood covers mass, so modes
       the pool holds are kept while they sharpen.

    The ladder must decrease to the target temperature; adjacent rungs must be close enough
    that the weights keep a useful effective sample size, which is recorded per stage.
    """
    ladder = [float(t) for t in torch.as_tensor(kT_ladder, dtype=torch.float64).reshape(-1)]
    if len(ladder) < 2 or any(not (t > 0 and math.isfinite(t)) for t in ladder):
        raise ValueError(f"kT_ladder needs at least two positive temperatures, got {ladder}")
    if any(b >= a for a, b in zip(ladder[:-1], ladder[1:])):
        raise ValueError(f"kT_ladder must decrease (hot to cold), got {ladder}")
    if pool_size < batch_size:
        raise ValueError(f"pool_size ({pool_size}) must be at least batch_size ({batch_size})")
    generator = torch.Generator().manual_seed(seed)

    def record() -> Tensor:
        with torch.no_grad():
            return flow.sample(n_record, generator=generator)[0]

    first = train(flow, first_steps, batch_size, lr, energy=energy, kT=ladder[0], seed=seed, progress=False)
    stages = [AnnealingStage(ladder[0], float("nan"), first, record())]
    for k, kT in enumerate(tqdm(ladder[1:], desc="annealing", disable=not progress), start=1):
        with torch.no_grad():
            pool, log_q = flow.sample(pool_size, generator=generator)
            log_w = -energy.energy(pool) / kT - log_q
        history = train(flow, steps_per_stage, batch_size, lr, data=pool, data_log_weights=log_w, seed=seed + k,
                        progress=False)
        stages.append(AnnealingStage(kT, kish_ess(log_w) / pool_size, history, record()))
    return stages


def _temperatures(kT: float | Tensor | None, energy: Energy | None, n_steps: int) -> Tensor:
    if energy is None:
        return torch.full((n_steps,), float("nan"), dtype=torch.float64)
    if kT is None:
        kT = energy.kT
    schedule = torch.as_tensor(kT, dtype=torch.float64)
    if schedule.ndim == 0:
        schedule = schedule.expand(n_steps)
    if schedule.shape != (n_steps,):
        raise ValueError(f"kT must be a number or a schedule of shape ({n_steps},), got shape {tuple(schedule.shape)}")
    if not bool((schedule > 0).all() & torch.isfinite(schedule).all()):
        raise ValueError("every temperature in the kT schedule must be positive and finite")
    return schedule


# ----------------------------------------------------------------------------------------
# Grid tools for 2-D flows
# ----------------------------------------------------------------------------------------


def log_prob_on_grid(flow: Flow, xlim: tuple[float, float], ylim: tuple[float, float],
                     grid: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    """log q on the cell centres of a ``grid × grid`` grid over ``xlim × ylim`` (2-D flows):
    returns ``(xs (grid,), ys (grid,), log_q (grid, grid))`` with ``log_q[j, i]`` at (xs[i], ys[j]),
    computed without gradients."""
    if flow.dim != 2:
        raise ValueError(f"log_prob_on_grid needs a 2-D flow, got dim {flow.dim}")
    xs, ys, points, _ = grid_2d(xlim, ylim, grid)
    points = points.reshape(-1, 2)
    p = flow._first_parameter_or_buffer()
    with torch.no_grad():
        log_q = flow.log_prob(points.to(p.dtype)).to(torch.float64)
    return xs, ys, log_q.reshape(grid, grid)


def kl_on_grid(flow: Flow, energy: Energy, log_z: float, xlim: tuple[float, float], ylim: tuple[float, float],
               grid: int = 400) -> tuple[float, float]:
    r"""KL(q || p) by quadrature for a 2-D flow and a target with known log Z:

        KL = Σ_cells A q(x) [log q(x) - log p(x)],   log p = -E/kT - log Z,

    with A the cell area. Returns ``(KL, mass of q on the window)``; the mass should be
    close to 1, otherwise the window misses part of q and the KL is incomplete.
    Independent of Monte Carlo, so it checks sample-based estimates."""
    if energy.dim != 2:
        raise ValueError(f"kl_on_grid needs a 2-D energy, got dim {energy.dim}")
    xs, ys, log_q = log_prob_on_grid(flow, xlim, ylim, grid)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    log_p = -energy.energy(torch.stack([xx, yy], dim=-1)) / energy.kT - log_z
    area = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    q = log_q.exp()
    return float((q * (log_q - log_p)).sum() * area), float(q.sum() * area)

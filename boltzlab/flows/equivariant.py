r"""A Boltzmann generator for particle systems: equivariant flow matching (chapter 02).

Method: equivariant flow matching (Klein, Krämer & Noé, NeurIPS 2023), a continuous
normalizing flow (CNF) whose vector field is an E(n)- and permutation-equivariant network,
trained by conditional flow matching on reference samples and reweighted to the Boltzmann
distribution with the exact likelihood of the ODE.

**Why a CNF and not a coupling flow.** A coupling flow on Cartesian coordinates splits the
particles into two groups, which breaks permutation symmetry; restoring it needs internal
coordinates (bond lengths and angles), which a cluster of identical particles does not
have in any canonical order. A CNF with an equivariant vector field v (here the course's
:class:`boltzlab.models.EGNN`) pushes an invariant prior to an invariant density: if
v(R x + b, t) = R v(x, t) and v(P x, t) = P v(x, t), then q(R x) = q(x) and q(P x) = q(x)
for every rotation R and permutation P, by construction.

**The centre-of-mass-free subspace.** Configurations x ∈ R^{n d} (particle i at
``x[i d:(i+1) d]``) live in U = {x : Σ_i x_i = 0}, of dimension d_eff = (n - 1) d. Write P for
the orthogonal projection onto U. Every density here is with respect to Lebesgue measure
on U (d_eff-dimensional volume), which is also what the Boltzmann density restricted to U,
p(x) = exp(-E(x)/kT) / Z_U with Z_U = ∫_U exp(-E/kT), is defined against. So the importance
weights

    log w(x) = -E(x)/kT - log q(x),       E_q[w] = Z_U,

are consistent, and ``log Z`` estimates from them are log Z_U.

- prior: p_0 = N(0, σ² P), i.e. z = P ε σ with ε ~ N(0, I_{nd}), with the density on U
  log p_0(z) = -|z|² / (2σ²) - (d_eff / 2) log(2π σ²);
- vector field: v(x, t) = EGNN(x, t), which is centre-of-mass free (Σ_i v_i = 0, so the ODE
  stays in U) and translation invariant;
- likelihood (instantaneous change of variables, Chen et al. 2018): along dx/dt = v(x, t),

      log q_1(x_1) = log p_0(x_0) - ∫_0^1 div_U v(x_t, t) dt,

  where div_U v = tr(Pᵀ J P) = Σ_k b_kᵀ J b_k over an orthonormal basis b_1..b_{d_eff} of U
  (J = ∂v/∂x). For the EGNN, J b = 0 for b ⊥ U (translation invariance) and Pᵀ J = J (the
  output is in U), so div_U v equals the full divergence tr J; computing it over the d_eff
  basis vectors is exact for any field and costs d_eff backward passes instead of n d.

**Exact divergence, not Hutchinson.** Hutchinson's estimator makes log q unbiased but
noisy, and log w = -E/kT - log q turns that noise into a multiplicative log-normal error
on w: E[exp(noise)] > 1, so the self-normalised weights and the ESS are biased in a way that
grows with the noise variance. d_eff is 6 (DW-4) or 36 (LJ-13): the exact trace costs 6 or
36 vector-Jacobian products per field evaluation, affordable for 10^4 samples on a CPU.

**Integrator.** Fixed-step classical Runge-Kutta (RK4) on the augmented state (x, ∫ div v):
the samples and their log-density come from the same discrete map, with an O(h^4) error in
log q that :func:`ode_convergence` measures (the difference between N and 2N steps).

**Training.** Conditional flow matching (Lipman et al. 2023; Tong et al. 2024): with pairs
(x_0, x_1) from a coupling of the prior and the data, t ~ U(0, 1),

    x_t = (1 - t) x_0 + t x_1,   u = x_1 - x_0,   L(θ) = E |v_θ(x_t, t) - u|²,

minimised by v*(x, t) = E[x_1 - x_0 | x_t = x], whose flow maps p_0 to the data distribution.
The coupling (``alignment``):

- ``"none"``: independent pairs;
- ``"ot"``: within each minibatch, the assignment that minimises Σ |x_0 - x_1|²
  (Hungarian algorithm), which straightens the paths (Tong et al. 2024; Pooladian et al. 2023);
- ``"equivariant"``: as ``"ot"`` but with the cost minimised also over rotations and
  permutations of each prior sample (Klein et al. 2023): p_0 is invariant under both, so
  rotating and relabelling the prior samples keeps p_0 and only shortens the paths. The
  permutations are enumerated (n! of them: fine for DW-4's 24, impossible for LJ-13).

What was measured (path lengths, CPU time per step, ESS of equal-cost pilots on DW-4) and
why the shipped configs use ``"ot"`` is recorded beside the configs in
:mod:`boltzlab.flows.particle_training`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab.energies import Energy, remove_com
from boltzlab.flows.coupling import FlowInputError
from boltzlab.models import EGNN

__all__ = [
    "ALIGNMENTS",
    "EquivariantCNF",
    "align_pairs",
    "com_free_basis",
    "com_free_gaussian_log_prob",
    "flow_matching_loss",
    "ode_convergence",
    "sample_com_free_gaussian",
]

ALIGNMENTS = ("none", "ot", "equivariant")
VectorField = Callable[[Tensor, Tensor], Tensor]


def _check_config(x: Tensor, n_particles: int, spatial_dim: int, name: str = "x") -> Tensor:
    dim = n_particles * spatial_dim
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 2 or x.shape[1] != dim:
        what = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise FlowInputError(f"{name}: expected a floating tensor of shape (B, {dim}) for {n_particles} particles "
                             f"in {spatial_dim}-D, got {what}")
    if not bool(torch.isfinite(x).all()):
        raise FlowInputError(f"{name}: {int((~torch.isfinite(x).all(1)).sum())} rows contain NaN or inf")
    return x


def _com_offset(x: Tensor, n_particles: int, spatial_dim: int) -> float:
    return float(x.reshape(x.shape[0], n_particles, spatial_dim).mean(1).abs().max()) if x.shape[0] else 0.0


def com_free_basis(n_particles: int, spatial_dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""An orthonormal basis of the centre-of-mass-free subspace U: ``(d_eff, n d)`` with rows
    b_k, b_k · b_l = δ_kl, and Σ_k b_k b_kᵀ = P = I - (1/n) 1 1ᵀ ⊗ I_d. d_eff = (n - 1) d."""
    if n_particles < 2 or spatial_dim < 1:
        raise FlowInputError(f"need n_particles >= 2 and spatial_dim >= 1, got {n_particles}, {spatial_dim}")
    dim = n_particles * spatial_dim
    proj = remove_com(torch.eye(dim, dtype=torch.float64), n_particles, spatial_dim)
    evals, evecs = torch.linalg.eigh(proj)
    return evecs[:, evals > 0.5].T.contiguous().to(dtype)  # P has eigenvalues 0 (d times) and 1


def sample_com_free_gaussian(n: int, n_particles: int, spatial_dim: int, std: float = 1.0,
                             generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""``n`` draws from N(0, σ² P) on U: z = σ P ε, ε ~ N(0, I_{nd}). Returns ``(n, n d)``."""
    eps = torch.randn(n, n_particles * spatial_dim, generator=generator, dtype=dtype)
    return std * remove_com(eps, n_particles, spatial_dim)


def com_free_gaussian_log_prob(z: Tensor, n_particles: int, spatial_dim: int, std: float = 1.0) -> Tensor:
    r"""log N(z; 0, σ² P) on U: -|z|²/(2σ²) - (d_eff/2) log(2πσ²), ``(B, n d) -> (B,)`` float64.
    Raises if a row of z is not centre-of-mass free (the density is zero off U)."""
    _check_config(z, n_particles, spatial_dim, "z")
    scale = float(z.abs().max()) + 1.0 if z.numel() else 1.0
    if _com_offset(z, n_particles, spatial_dim) > 1e-4 * scale:
        raise FlowInputError("z: not centre-of-mass free; the prior lives on the subspace Σ_i z_i = 0")
    d_eff = (n_particles - 1) * spatial_dim
    z64 = z.to(torch.float64)
    return -0.5 * z64.pow(2).sum(-1) / std**2 - 0.5 * d_eff * math.log(2 * math.pi * std**2)


# ----------------------------------------------------------------------------------------
# the ODE and its likelihood
# ----------------------------------------------------------------------------------------


def _field_and_divergence(field: VectorField, x: Tensor, t: Tensor,
                          basis: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """v(x, t) ``(B, D)`` and div_U v = Σ_k b_kᵀ (∂v/∂x) b_k ``(B,)`` float64 (exact; None
    without a ``basis`` ``(d_eff, D)``)."""
    if basis is None:
        with torch.no_grad():
            return field(x, t), None
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = field(xg, t)
        b = basis.to(v.dtype)
        div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for k in range(b.shape[0]):
            (g,) = torch.autograd.grad((v @ b[k]).sum(), xg, retain_graph=k < b.shape[0] - 1)
            div += (g @ b[k]).to(torch.float64)
    return v.detach(), div


def integrate(field: VectorField, x: Tensor, t0: float, t1: float, n_steps: int, basis: Tensor | None,
              progress: bool = False) -> tuple[Tensor, Tensor]:
    r"""RK4 for dx/dt = v(x, t) from ``t0`` to ``t1`` in ``n_steps`` equal steps, together with
    ∫_{t0}^{t1} div_U v(x_t, t) dt (zeros when ``basis`` is None). ``x`` ``(B, D)`` ->
    ``(x(t1) (B, D), integral (B,) float64)``. Works backwards in time for t1 < t0."""
    h = (t1 - t0) / n_steps
    integral = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    x = x.detach()

    def f(xs: Tensor, t: float) -> tuple[Tensor, Tensor]:
        tt = torch.full((xs.shape[0],), t, dtype=xs.dtype, device=xs.device)
        v, d = _field_and_divergence(field, xs, tt, basis)
        return v, (d if d is not None else torch.zeros_like(integral))

    for k in tqdm(range(n_steps), desc="ODE", disable=not progress, leave=False):
        t = t0 + k * h
        v1, d1 = f(x, t)
        v2, d2 = f(x + 0.5 * h * v1, t + 0.5 * h)
        v3, d3 = f(x + 0.5 * h * v2, t + 0.5 * h)
        v4, d4 = f(x + h * v3, t + h)
        x = x + (h / 6) * (v1 + 2 * v2 + 2 * v3 + v4)
        integral = integral + (h / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(integral).all())):
            raise FlowInputError(f"the ODE diverged at step {k + 1} of {n_steps} (t = {t + h:.4g}): "
                                 f"the vector field returned NaN or inf")
    return x, integral


class EquivariantCNF(nn.Module):
    r"""A continuous normalizing flow on the centre-of-mass-free configurations of
    ``n_particles`` identical particles in ``spatial_dim`` dimensions: ``x (B, n d)``.

    x_1 = Φ(x_0) solves dx/dt = v(x, t) = EGNN(x, t) from t = 0 to 1, x_0 ~ N(0, σ² P)
    (σ = ``prior_std``), and log q(x_1) = log p_0(x_0) - ∫_0^1 div_U v dt (see the module
    docstring for the subspace and why the divergence is exact). The EGNN's options
    (``hidden``, ``n_layers``, ``time_dim``, ``max_period``) are passed through; a small
    ``max_period`` (default 10) keeps v smooth in t, which a fixed-step integrator needs.

    Methods: :meth:`velocity` v(x, t); :meth:`sample` ``n -> (x (n, n d), log q (n,))``;
    :meth:`log_prob` ``x -> log q(x)`` by integrating back to t = 0.
    """

    def __init__(self, n_particles: int, spatial_dim: int, prior_std: float = 1.0, hidden: int = 64,
                 n_layers: int = 4, time_dim: int = 16, max_period: float = 10.0, seed: int | None = 0) -> None:
        super().__init__()
        if not (isinstance(prior_std, (int, float)) and math.isfinite(prior_std) and prior_std > 0):
            raise FlowInputError(f"prior_std must be a positive finite number, got {prior_std!r}")
        self.n_particles, self.spatial_dim = int(n_particles), int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        self.effective_dim = (self.n_particles - 1) * self.spatial_dim
        self.prior_std = float(prior_std)
        self.field = EGNN(n_particles, spatial_dim, hidden=hidden, n_layers=n_layers, time_dim=time_dim,
                          max_period=max_period, seed=seed)
        self.register_buffer("basis", com_free_basis(self.n_particles, self.spatial_dim), persistent=False)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """v(x, t): ``x (B, n d)``, ``t`` a number or ``(B,)`` -> ``(B, n d)``, centre-of-mass free."""
        _check_config(x, self.n_particles, self.spatial_dim)
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        return self.field(x, t)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p_0(z) on U, ``(B, n d) -> (B,)`` float64."""
        return com_free_gaussian_log_prob(z, self.n_particles, self.spatial_dim, self.prior_std)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` prior draws ``(n, n d)`` in the network's dtype."""
        return sample_com_free_gaussian(n, self.n_particles, self.spatial_dim, self.prior_std, generator,
                                        self._dtype())

    @torch.no_grad()
    def sample(self, n: int, n_steps: int = 20, generator: torch.Generator | None = None,
               with_log_prob: bool = True, batch_size: int = 2000,
               progress: bool = False) -> tuple[Tensor, Tensor | None]:
        r"""``n`` samples x = Φ(z), z ~ p_0, with RK4 in ``n_steps`` steps; returns
        ``(x (n, n d), log q(x) (n,) float64)`` (``None`` for log q when ``with_log_prob`` is
        False, which skips the d_eff backward passes per field evaluation)."""
        if not isinstance(n, int) or n < 1:
            raise FlowInputError(f"n must be a positive integer, got {n!r}")
        if not isinstance(n_steps, int) or n_steps < 1:
            raise FlowInputError(f"n_steps must be a positive integer, got {n_steps!r}")
        xs, lqs = [], []
        z_all = self.sample_prior(n, generator)
        chunks = z_all.split(batch_size)
        for z in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) == 1, leave=False):
            x, integral = integrate(self.field, z, 0.0, 1.0, n_steps, self.basis if with_log_prob else None)
            xs.append(x)
            if with_log_prob:
                lqs.append(self.prior_log_prob(z) - integral)
        return torch.cat(xs), (torch.cat(lqs) if with_log_prob else None)

    @torch.no_grad()
    def log_prob(self, x: Tensor, n_steps: int = 20, project: bool = False, batch_size: int = 2000) -> Tensor:
        r"""log q(x) on U, ``(B, n d) -> (B,)`` float64, by integrating the ODE from t = 1 back to
        t = 0: z = Φ^{-1}(x), log q(x) = log p_0(z) - ∫_0^1 div_U v dt. ``x`` must be centre-of-mass
        free, unless ``project`` (then x is projected onto U first: log q is translation invariant)."""
        _check_config(x, self.n_particles, self.spatial_dim)
        if project:
            x = remove_com(x, self.n_particles, self.spatial_dim)
        elif _com_offset(x, self.n_particles, self.spatial_dim) > 1e-4 * (float(x.abs().max()) + 1.0):
            raise FlowInputError("x: not centre-of-mass free; q lives on the subspace Σ_i x_i = 0 "
                                 "(pass project=True to project first)")
        out = []
        for xb in x.to(self._dtype()).split(batch_size):
            z, integral = integrate(self.field, xb, 1.0, 0.0, n_steps, self.basis)
            # integrate() returned ∫_1^0 div dt = -∫_0^1 div dt; the projection removes only
            # round-off drift off U (the field is centre-of-mass free)
            z = remove_com(z, self.n_particles, self.spatial_dim)
            out.append(self.prior_log_prob(z) + integral)
        return torch.cat(out)


def ode_convergence(cnf: EquivariantCNF, n: int, n_steps: int, seed: int = 0) -> dict[str, float]:
    r"""How far ``n_steps`` RK4 steps are from converged: draw the same ``n`` prior samples and
    integrate with N = ``n_steps`` and 2N steps; returns the RMS and maximum differences of
    log q and the RMS difference of x (the error of log w = -E/kT - log q from the solver)."""
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x1, l1 = cnf.sample(n, n_steps, generator=g1)
    x2, l2 = cnf.sample(n, 2 * n_steps, generator=g2)
    assert l1 is not None and l2 is not None
    dl = l1 - l2
    return {"log_q_rms_diff": float(dl.pow(2).mean().sqrt()), "log_q_max_diff": float(dl.abs().max()),
            "x_rms_diff": float((x1 - x2).pow(2).mean().sqrt())}


# ----------------------------------------------------------------------------------------
# flow matching
# ----------------------------------------------------------------------------------------


def _rotation_cost_2d(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """min over rotations R of |R a_j - b_i|² for 2-D point sets a ``(J, n, 2)``, b ``(I, n, 2)``:
    ``(cost (I, J), angle (I, J))``. With c = Σ a·b and s = Σ a × b the best angle is
    atan2(s, c) and the cost |a|² + |b|² - 2 sqrt(c² + s²); c and s are matrix products."""
    a_perp = torch.stack([-a[..., 1], a[..., 0]], -1)                  # a rotated by +90°: a × b = a_perp · b
    bf = b.reshape(b.shape[0], -1)
    c = bf @ a.reshape(a.shape[0], -1).T
    s = bf @ a_perp.reshape(a.shape[0], -1).T
    cost = a.pow(2).sum((-1, -2))[None] + b.pow(2).sum((-1, -2))[:, None] - 2 * torch.sqrt(c * c + s * s)
    return cost, torch.atan2(s, c)


def _kabsch(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """min over proper rotations R of |a Rᵀ - b|² for point sets ``(..., n, d)`` (Kabsch), with R ``(..., d, d)``."""
    h = a.transpose(-1, -2) @ b                                        # (..., d, d) = Σ_i a_i b_iᵀ
    u, _, vh = torch.linalg.svd(h)
    sign = torch.sign(torch.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    fix = torch.ones(*h.shape[:-2], h.shape[-1], dtype=h.dtype, device=h.device)
    fix[..., -1] = sign
    rot = vh.transpose(-1, -2) @ torch.diag_embed(fix) @ u.transpose(-1, -2)
    cost = (a @ rot.transpose(-1, -2) - b).pow(2).sum((-1, -2))
    return cost, rot


def align_pairs(x0: Tensor, x1: Tensor, n_particles: int, spatial_dim: int, alignment: str) -> Tensor:
    r"""Re-pair (and for ``"equivariant"`` rotate and relabel) the prior samples ``x0`` ``(B, n d)``
    to the data ``x1`` ``(B, n d)``; returns the new x0 ``(B, n d)``, row b paired with x1[b].

    ``"none"`` returns x0; ``"ot"`` permutes the rows by the assignment minimising Σ_b |x0 - x1|²;
    ``"equivariant"`` minimises Σ_b min_{R, π} |R π x0 - x1|² over rows and, per pair, over the
    n! particle permutations π and the proper rotations R, then applies the minimising R and π.
    Both leave the prior's distribution unchanged (it is invariant under R and π, and a
    permutation of i.i.d. rows is i.i.d.)."""
    if alignment not in ALIGNMENTS:
        raise FlowInputError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    _check_config(x0, n_particles, spatial_dim, "x0")
    _check_config(x1, n_particles, spatial_dim, "x1")
    if x0.shape != x1.shape:
        raise FlowInputError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if alignment == "none":
        return x0
    from scipy.optimize import linear_sum_assignment

    B = x0.shape[0]
    if alignment == "ot":
        cost = torch.cdist(x1.double(), x0.double()).pow(2)
        _, cols = linear_sum_assignment(cost.numpy())
        return x0[torch.as_tensor(cols)]
    if math.factorial(n_particles) > 720:
        raise FlowInputError(f"alignment='equivariant' enumerates all n! permutations; n = {n_particles} gives "
                             f"{math.factorial(n_particles)}: use 'ot' or 'none' for this system")
    perms = torch.tensor(list(itertools.permutations(range(n_particles))))       # (n!, n)
    a = x0.double().reshape(B, n_particles, spatial_dim)[:, perms]               # (B, n!, n, d)
    b = x1.double().reshape(B, n_particles, spatial_dim)
    n_perm = perms.shape[0]
    if spatial_dim == 2:
        cost, angle = _rotation_cost_2d(a.reshape(B * n_perm, n_particles, 2), b)
        cost, angle = cost.reshape(B, B, n_perm), angle.reshape(B, B, n_perm)     # (B1, B0, n!)
    else:
        a_all = a[None].expand(B, -1, -1, -1, -1)                                # (B1, B0, n!, n, d)
        cost, rot = _kabsch(a_all, b[:, None, None].expand_as(a_all))
    best, k = cost.min(-1)                                                       # (B1, B0)
    _, cols = linear_sum_assignment(best.numpy())
    cols_t = torch.as_tensor(cols)
    rows_t = torch.arange(B)
    kk = k[rows_t, cols_t]
    moved = a[cols_t, kk]                                                        # (B, n, d)
    if spatial_dim == 2:
        th = angle[rows_t, cols_t, kk]
        c, s = torch.cos(th), torch.sin(th)
        rot_b = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    else:
        rot_b = rot[rows_t, cols_t, kk]
    out = moved @ rot_b.transpose(-1, -2)
    return out.reshape(B, -1).to(x0.dtype)


def flow_matching_loss(field: VectorField, x1: Tensor, n_particles: int, spatial_dim: int, prior_std: float,
                       alignment: str = "none", generator: torch.Generator | None = None,
                       t: Tensor | None = None) -> Tensor:
    r"""Conditional flow-matching loss on a minibatch of data ``x1`` ``(B, n d)`` (centre-of-mass free):

        L = (1/B) Σ_b |v(x_t, t_b) - (x_1 - x_0)|²,   x_t = (1 - t_b) x_0 + t_b x_1,

    x_0 ~ N(0, σ² P) paired with x_1 by ``alignment`` (see :func:`align_pairs`), t_b ~ U(0, 1)
    (or the given ``t`` ``(B,)``). A scalar; its minimiser over all fields is
    v*(x, t) = E[x_1 - x_0 | x_t = x], and at v* the loss is the conditional variance
    E |u - E[u | x_t]|², which is not zero (the pairs' paths cross)."""
    _check_config(x1, n_particles, spatial_dim, "x1")
    B = x1.shape[0]
    x0 = sample_com_free_gaussian(B, n_particles, spatial_dim, prior_std, generator, x1.dtype)
    x0 = align_pairs(x0, x1, n_particles, spatial_dim, alignment)
    if t is None:
        t = torch.rand(B, generator=generator, dtype=x1.dtype)
    elif not isinstance(t, Tensor) or t.shape != (B,):
        raise FlowInputError(f"t: expected shape ({B},), got {tuple(getattr(t, 'shape', ()))}")
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    return (field(xt, t.to(x1.dtype)) - (x1 - x0)).pow(2).sum(-1).mean()


def importance_log_weights(cnf: EquivariantCNF, energy: Energy, n: int, n_steps: int = 20,
                           generator: torch.Generator | None = None, batch_size: int = 2000,
                           progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    r"""``n`` flow samples with log w = -E(x)/kT - log q(x) (both densities on U):
    returns ``(x (n, n d), log_q (n,), log_w (n,))``, the last two float64."""
    from boltzlab.importance import sampler_log_weights

    if energy.dim != cnf.dim:
        raise FlowInputError(f"energy {energy.name} has dim {energy.dim}, the flow {cnf.dim}")
    x, log_q = cnf.sample(n, n_steps, generator=generator, batch_size=batch_size, progress=progress)
    assert log_q is not None
    # float64 energies: a near-overlap in a Lennard-Jones sample overflows d^-12 in float32
    return x, log_q, sampler_log_weights(energy, x.double(), log_q)


__all__ += ["importance_log_weights", "integrate"]

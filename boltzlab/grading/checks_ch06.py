"""Checks for the chapter 06 exercises: one EGNN layer, and iDEM's buffer refill.

``egnn_layer(h, x, phi_e, phi_x, phi_h) -> (h', x')`` is compared with
:class:`boltzlab.models.EGNNLayer` holding the same weights (float64), on 3-D and 2-D
particles and on a last layer (``phi_h=None``); a wrong answer is matched against known
mistakes computed by a pair-by-pair loop written here, and otherwise tested for the
symmetries it should have (rotation, reflection, translation, permutation).

``refill(buffer, score, schedule, n, n_steps, project, generator) -> x`` is compared with
:func:`boltzlab.diffusion.sample_prior` followed by
:func:`boltzlab.diffusion.reverse_sde_sample` on the same random numbers, and the buffer must
have grown by exactly those samples; known mistakes of the Euler-Maruyama step are named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from boltzlab.diffusion import (
    GeometricNoiseSchedule,
    ReplayBuffer,
    reverse_sde_sample,
    sample_prior,
)
from boltzlab.energies import GaussianMixture, dw4
from boltzlab.estimators import gmm_noised_score
from boltzlab.grading.feedback import (
    CheckFailed,
    all_passed,
    call_learner,
    expect_close,
    expect_shape,
    passed,
)
from boltzlab.models import EGNNLayer

F64 = torch.float64
LayerFn = Callable[..., Any]

# ----------------------------------------------------------------------------------------
# exercise 1: one EGNN layer
# ----------------------------------------------------------------------------------------


def _layer(hidden: int, seed: int, update_features: bool = True) -> EGNNLayer:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return EGNNLayer(hidden, update_features=update_features).double()


def _networks(layer: EGNNLayer) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Any]:
    """phi_e, phi_x and phi_h of ``layer`` as functions of the last axis."""
    return (lambda z: layer.edge_out(layer.edge_in(z))), layer.coord_mlp, layer.node_mlp


def _pairwise_loop(h: Tensor, x: Tensor, phi_e: Callable, phi_x: Callable, phi_h: Any, *,
                   include_self: bool = False, over_n: bool = False, flip: bool = False,
                   damping: str = "sqrt", plain_distance: bool = False, h_residual: bool = True,
                   x_residual: bool = True, swap: bool = False) -> tuple[Tensor, Tensor]:
    """The layer written one pair at a time, with switches that reproduce common mistakes."""
    n = x.shape[1]
    denom = n if over_n else n - 1
    h_rows, x_rows = [], []
    for i in range(n):
        pulls, messages = [], []
        for j in range(n):
            if j == i and not include_self:
                continue
            v = x[:, i] - x[:, j]
            r2 = v.pow(2).sum(-1, keepdim=True)
            first, second = (h[:, j], h[:, i]) if swap else (h[:, i], h[:, j])
            m = phi_e(torch.cat([first, second, r2.sqrt() if plain_distance else r2], dim=-1))
            messages.append(m)
            shrink = {"sqrt": (r2 + 1.0).sqrt(), "none": torch.ones_like(r2), "d+1": r2.sqrt() + 1.0}[damping]
            pulls.append((-v if flip else v) * phi_x(m) / shrink)
        moved = torch.stack(pulls).sum(0) / denom
        x_rows.append(x[:, i] + moved if x_residual else moved)
        if phi_h is not None:
            update = phi_h(torch.cat([h[:, i], torch.stack(messages).sum(0) / denom], dim=-1))
            h_rows.append(h[:, i] + update if h_residual else update)
    return (torch.stack(h_rows, 1) if phi_h is not None else h), torch.stack(x_rows, 1)


_LAYER_MISTAKES: dict[str, tuple[dict[str, Any], str]] = {
    "include_self": ({"include_self": True},
                     ("your sums include j = i. The self-message m_ii = phi_e([h_i, h_i, 0]) is not zero, so it "
                      "changes h' (x' is unaffected because x_i - x_i = 0): leave the diagonal out, e.g. multiply the "
                      "(B, n, n, ...) messages by 1 - eye(n) before summing over j")),
    "over_n": ({"over_n": True},
               "you divided the sums by n; the layer averages over the n - 1 OTHER particles: divide by n - 1"),
    "flip": ({"flip": True},
             ("the position update points the wrong way: it moves x_i along x_i - x_j (from j towards i), "
              "you used x_j - x_i")),
    "no_damping": ({"damping": "none"},
                   "the factor 1/sqrt(d_ij^2 + 1) is missing from the position update"),
    "d_plus_one": ({"damping": "d+1"},
                   "you divided by d_ij + 1; the layer divides by sqrt(d_ij^2 + 1) (as bounded, and smooth at d = 0)"),
    "plain_distance": ({"plain_distance": True},
                       "phi_e takes the SQUARED distance d_ij^2 as its last input, not d_ij"),
    "no_h_residual": ({"h_residual": False},
                      "h' = h + phi_h([h, mean message]): you returned phi_h(...) without adding h"),
    "no_x_residual": ({"x_residual": False},
                      "x' = x + (mean over j of the weighted differences): you returned the update without adding x"),
    "swap": ({"swap": True},
             "phi_e's input is [h_i, h_j, d_ij^2] with the receiving particle i first; you passed h_j first"),
}


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.to(F64), b.to(F64), rtol=1e-7, atol=1e-9)


def _call_layer(fn: LayerFn, h: Tensor, x: Tensor, nets: tuple, label: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = call_learner(fn, h.clone(), x.clone(), *nets, name="egnn_layer")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise CheckFailed(f"egnn_layer on {label} must return a pair (h', x'), got {type(out).__name__}"
                          + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    h_new = expect_shape(f"h' on {label}", out[0], tuple(h.shape))
    x_new = expect_shape(f"x' on {label}", out[1], tuple(x.shape))
    for name, value in (("h'", h_new), ("x'", x_new)):
        if not bool(torch.isfinite(value).all()):
            raise CheckFailed(f"{name} on {label} contains NaN or inf")
    return h_new, x_new


def _rotation(d: int, generator: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    return q


def _symmetry_report(fn: LayerFn, h: Tensor, x: Tensor, nets: tuple, got: tuple[Tensor, Tensor],
                     label: str) -> str | None:
    """Which symmetry the learner's layer breaks, as a sentence, or None if it keeps them all."""
    g = torch.Generator().manual_seed(5)
    rot = _rotation(x.shape[-1], g)
    shift = torch.randn(x.shape[-1], generator=g, dtype=F64)
    h_r, x_r = _call_layer(fn, h, x @ rot.T + shift, nets, label)
    if not (_close(x_r, got[1] @ rot.T + shift) and _close(h_r, got[0])):
        return ("it is not equivariant under rotations and translations: rotating/translating the input should "
                "rotate/translate x' and leave h' unchanged. Only invariants (h and d_ij^2) may enter the networks, "
                "and positions may move only along differences x_i - x_j")
    perm = torch.randperm(x.shape[1], generator=g)
    h_p, x_p = _call_layer(fn, h[:, perm], x[:, perm], nets, label)
    if not (_close(x_p, got[1][:, perm]) and _close(h_p, got[0][:, perm])):
        return ("it is not permutation equivariant: relabelling the particles should relabel the outputs. "
                "Sum over the partner index j, the same way for every particle")
    return None


def _layer_case(fn: LayerFn, layer: EGNNLayer, h: Tensor, x: Tensor, label: str) -> None:
    nets = _networks(layer)
    with torch.no_grad():
        want_h, want_x = layer(h, x)
    got = _call_layer(fn, h, x, nets, label)
    if _close(got[0], want_h) and _close(got[1], want_x):
        return
    with torch.no_grad():
        for kwargs, message in _LAYER_MISTAKES.values():
            wrong_h, wrong_x = _pairwise_loop(h, x, *nets, **kwargs)
            if _close(got[0], wrong_h) and _close(got[1], wrong_x):
                raise CheckFailed(f"egnn_layer on {label}: {message}.")
    broken = _symmetry_report(fn, h, x, nets, got, label)
    if broken is not None:
        raise CheckFailed(f"egnn_layer on {label} does not match EGNNLayer, and {broken}.")
    hint = "check the formula term by term: m_ij, the 1/(n-1) means, the 1/sqrt(d_ij^2 + 1) factor, the residuals"
    if _close(got[1], want_x):
        hint = "x' is right; h' is off: h' = h + phi_h([h_i, (1/(n-1)) sum_{j != i} m_ij]) (concatenate in that order)"
    elif _close(got[0], want_h):
        hint = "h' is right; x' is off: x_i' = x_i + (1/(n-1)) sum_{j != i} (x_i - x_j) phi_x(m_ij) / sqrt(d_ij^2 + 1)"
    expect_close(f"x' on {label}", got[1], want_x, rtol=1e-7, atol=1e-9, hint=hint)
    expect_close(f"h' on {label}", got[0], want_h, rtol=1e-7, atol=1e-9, hint=hint)


def check_egnn_layer(fn: LayerFn) -> None:
    """Run the learner's ``egnn_layer`` on three cases; raise :class:`CheckFailed` naming the mistake."""
    g = torch.Generator().manual_seed(505)
    layer = _layer(8, seed=1)
    h = torch.randn(3, 5, 8, generator=g, dtype=F64)
    x = 1.5 * torch.randn(3, 5, 3, generator=g, dtype=F64)
    _layer_case(fn, layer, h, x, "5 particles in 3-D (H = 8)")
    passed("h' and x' match boltzlab.models.EGNNLayer with the same weights")
    got = _call_layer(fn, h, x, _networks(layer), "5 particles in 3-D (H = 8)")
    broken = _symmetry_report(fn, h, x, _networks(layer), got, "5 particles in 3-D (H = 8)")
    if broken is not None:
        raise CheckFailed(f"egnn_layer matches EGNNLayer, yet {broken}.")
    passed("equivariant under rotations, reflections, translations and permutations")

    last = _layer(8, seed=2, update_features=False)
    h_last, x_last = _call_layer(fn, h, x, _networks(last), "a last layer (phi_h = None)")
    if not torch.equal(h_last, h):
        raise CheckFailed("with phi_h = None the layer must return h unchanged (the last layer of an EGNN)")
    with torch.no_grad():
        expect_close("x' of a last layer (phi_h = None)", x_last, last(h, x)[1], rtol=1e-7, atol=1e-9)
    passed("phi_h = None leaves h unchanged")

    layer2d = _layer(6, seed=3)
    _layer_case(fn, layer2d, torch.randn(2, 4, 6, generator=g, dtype=F64), 4.0 * torch.randn(2, 4, 2, generator=g,
                dtype=F64), "4 particles in 2-D (DW-4, H = 6)")
    passed("2-D particles")
    all_passed("egnn_layer")


# ----------------------------------------------------------------------------------------
# exercise 2: the buffer refill
# ----------------------------------------------------------------------------------------

RefillFn = Callable[..., Any]
FORBIDDEN = ("reverse_sde_sample", "probability_flow_sample", "sample_model")


def _em_variant(score: Callable, schedule: GeometricNoiseSchedule, n: int, dim: int, n_steps: int,
                project: Callable | None, seed: int, *, drift_sign: float = 1.0, g_power: int = 2,
                noise_dt: bool = False, forward: bool = False, end_of_step: bool = False,
                noise: bool = True) -> Tensor:
    """Euler-Maruyama with switches that reproduce common mistakes (same random numbers)."""
    same = project if project is not None else (lambda v: v)
    gen = torch.Generator().manual_seed(seed)
    state = sample_prior(schedule, n, dim, project=project, generator=gen)
    h = 1.0 / n_steps
    grid = torch.linspace(0.0, 1.0, n_steps + 1) if forward else torch.linspace(1.0, 0.0, n_steps + 1)
    for k in range(n_steps):
        t = grid[k + 1 if end_of_step else k].expand(n)
        coef = schedule.g2(t)[:, None] if g_power == 2 else schedule.g(t)[:, None]
        kick = same(torch.randn(state.shape, generator=gen)) if noise else torch.zeros_like(state)
        spread = schedule.g(t)[:, None] * (h if noise_dt else h**0.5)
        state = same(state + drift_sign * coef * score(state, t) * h + spread * kick)
    return state


_REFILL_MISTAKES: dict[str, tuple[dict[str, Any], str]] = {
    "drift_sign": ({"drift_sign": -1.0},
                   ("the drift has the wrong sign: backwards in time the reverse SDE moves UP the score, "
                    "x <- x + g(t)^2 s(x, t) dt + ...")),
    "g_not_squared": ({"g_power": 1},
                      "the drift uses g(t)^2 (schedule.g2(t)), not g(t)"),
    "noise_dt": ({"noise_dt": True},
                 "the noise term is g(t) sqrt(dt) z: Brownian increments scale like sqrt(dt), not dt"),
    "forward": ({"forward": True},
                "time runs backwards, from t = 1 (the prior) to t = 0 (the target): t_k = 1 - k dt"),
    "end_of_step": ({"end_of_step": True},
                    ("evaluate the score and g at the START of each step, t_k = 1 - k dt for k = 0..n_steps-1; "
                     "you used the end of the step")),
    "no_noise": ({"noise": False},
                 ("the noise term g(t) sqrt(dt) z is missing: without it this is neither the reverse SDE "
                  "nor the probability-flow ODE (whose drift is half as large)")),
}


def _refill_case(fn: RefillFn, score: Callable, schedule: GeometricNoiseSchedule, n: int, dim: int, n_steps: int,
                 project: Callable | None, seed: int, label: str) -> Tensor:
    buffer = ReplayBuffer(10 * n, dim)
    prefill = torch.full((3, dim), 0.25)
    buffer.add(prefill)
    with torch.no_grad():
        got = call_learner(fn, buffer, score, schedule, n, n_steps, project, torch.Generator().manual_seed(seed),
                           name="refill")
    got = expect_shape(f"refill on {label}", got, (n, dim))
    if not bool(torch.isfinite(got).all()):
        raise CheckFailed(f"refill on {label} returned NaN or inf: check the step (dt = 1/n_steps, g(t)^2 dt)")
    if len(buffer) != 3 + n:
        raise CheckFailed(f"refill on {label}: the buffer held 3 states and should hold 3 + {n} after the refill, "
                          f"it holds {len(buffer)}. Add the n final states once, with buffer.add(x)")
    if not torch.equal(buffer.data[:3], prefill):
        raise CheckFailed(f"refill on {label} changed the states already in the buffer: only add, with buffer.add(x)")
    if not torch.allclose(buffer.data[3:], got.to(buffer.data.dtype)):
        raise CheckFailed(f"refill on {label}: the states added to the buffer are not the samples you returned; "
                          "add the final states x (after the last step)")
    if project is not None and not torch.allclose(project(got), got, atol=1e-5):
        off = float((project(got) - got).abs().max())
        raise CheckFailed(f"refill on {label}: the samples leave the subspace that project maps onto (they change by "
                          f"up to {off:.3g} when projected; for particles: they are not centre-of-mass free). Apply "
                          "project to every noise draw and to every new state")
    gen = torch.Generator().manual_seed(seed)
    x1 = sample_prior(schedule, n, dim, project=project, generator=gen)
    want = reverse_sde_sample(score, schedule, x1, n_steps, project=project, generator=gen)
    tol = {"rtol": 1e-4, "atol": 1e-4 * schedule.sigma_max}
    if torch.allclose(got.to(F64), want.to(F64), **tol):
        return got
    for kwargs, message in _REFILL_MISTAKES.values():
        wrong = _em_variant(score, schedule, n, dim, n_steps, project, seed, **kwargs)
        # looser than the pass test: some mistakes blow up, and amplify rounding with them
        if torch.allclose(got.to(F64), wrong.to(F64), rtol=1e-3, atol=tol["atol"]):
            raise CheckFailed(f"refill on {label}: {message}.")
    expect_close(f"refill on {label}", got, want, **tol,
                 hint="draw x_1 = sample_prior(schedule, n, buffer.dim, project=project, generator=generator) first, "
                      "then one torch.randn(x.shape, generator=generator) per step (projected), and step "
                      "x <- project(x + g2 s(x, t) dt + sqrt(g2 dt) z) at t_k = 1 - k dt")
    return got


def check_refill(fn: RefillFn) -> None:
    """Run the learner's ``refill`` on GMM-40 and on DW-4; raise :class:`CheckFailed` naming the mistake."""
    code = getattr(fn, "__code__", None)
    used = set(code.co_names) if code is not None else set()
    if used & set(FORBIDDEN):
        raise CheckFailed(f"refill calls {', '.join(sorted(used & set(FORBIDDEN)))}: write the Euler-Maruyama "
                          "loop yourself (that is the exercise; the check compares with those functions)")
    gmm = GaussianMixture()
    schedule = GeometricNoiseSchedule(0.01, 70.0)
    _refill_case(fn, lambda x, t: gmm_noised_score(gmm, x, schedule.std(t)), schedule, 64, 2, 30, None, 11,
                 "GMM-40 with its exact score (30 steps)")
    passed("the same samples as sample_prior + reverse_sde_sample, added to the buffer")

    target = dw4()
    small = GeometricNoiseSchedule(0.01, 3.0)
    offset = torch.linspace(-1.0, 2.0, target.dim)  # not centre-of-mass free: only the projection removes it

    def pull(x: Tensor, t: Tensor) -> Tensor:
        return -(x - offset) / (1.0 + small.variance(t)[:, None])

    _refill_case(fn, pull, small, 32, target.dim, 15, target.remove_com, 12, "DW-4 with project=remove_com")
    passed("centre-of-mass-free samples for particles")
    all_passed("refill")

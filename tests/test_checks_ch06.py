"""The chapter 06 checks accept correct EGNN layers and refills, and name the mistake in wrong ones."""

from __future__ import annotations

import pytest
import torch

from boltzlab.diffusion import reverse_sde_sample, sample_prior
from boltzlab.grading.checks_ch06 import check_egnn_layer, check_refill
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

# ----------------------------------------------------------------------------------------
# EGNN layer: one implementation with switches for the mistakes (einsum-based, unlike the check's loop)
# ----------------------------------------------------------------------------------------


def _layer(h, x, phi_e, phi_x, phi_h, *, diag=False, norm_by_n=False, sign=1.0, damp="sqrt", d_input="d2",
           h_res=True, x_res=True, receiver_first=True):
    B, n, H = h.shape
    diff = sign * (x[:, :, None] - x[:, None, :])
    d2 = torch.einsum("bijk,bijk->bij", diff, diff)[..., None]
    feature = d2 if d_input == "d2" else d2.sqrt()
    hi, hj = h[:, :, None].expand(B, n, n, H), h[:, None, :].expand(B, n, n, H)
    pair = torch.cat([hi, hj, feature] if receiver_first else [hj, hi, feature], -1)
    keep = torch.ones(n, n, dtype=x.dtype) if diag else 1.0 - torch.eye(n, dtype=x.dtype)
    m = phi_e(pair) * keep[..., None]
    denom = {"sqrt": (d2 + 1).sqrt(), "none": 1.0, "d+1": d2.sqrt() + 1}[damp]
    dx = torch.einsum("bijk,bij->bik", diff, (phi_x(m) / denom)[..., 0] * keep) / (n if norm_by_n else n - 1)
    x_new = x + dx if x_res else dx
    if phi_h is None:
        return h, x_new
    dh = phi_h(torch.cat([h, m.sum(2) / (n if norm_by_n else n - 1)], -1))
    return (h + dh if h_res else dh), x_new


def good_layer(h, x, phi_e, phi_x, phi_h):
    return _layer(h, x, phi_e, phi_x, phi_h)


def good_layer_loop(h, x, phi_e, phi_x, phi_h):
    """Another correct layer: an explicit loop over receivers."""
    n = x.shape[1]
    hs, xs = [], []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        diff = x[:, i : i + 1] - x[:, others]  # (B, n - 1, d)
        d2 = (diff**2).sum(-1, keepdim=True)
        m = phi_e(torch.cat([h[:, i : i + 1].expand_as(h[:, others]), h[:, others], d2], -1))
        xs.append(x[:, i] + (diff * phi_x(m) / torch.sqrt(1 + d2)).mean(1))
        hs.append(h[:, i] if phi_h is None else h[:, i] + phi_h(torch.cat([h[:, i], m.mean(1)], -1)))
    return torch.stack(hs, 1), torch.stack(xs, 1)


def _wrong(**flags):
    def fn(h, x, phi_e, phi_x, phi_h):
        return _layer(h, x, phi_e, phi_x, phi_h, **flags)

    return fn


def absolute_positions(h, x, phi_e, phi_x, phi_h):
    """Adds a term in |x_i|^2 along (1, 1, 1): neither rotation nor translation equivariant."""
    h_new, x_new = good_layer(h, x, phi_e, phi_x, phi_h)
    return h_new, x_new + 0.01 * x.pow(2).sum(-1, keepdim=True)


def particle_index(h, x, phi_e, phi_x, phi_h):
    """Weights each particle by its index: breaks permutation equivariance only."""
    h_new, x_new = good_layer(h, x, phi_e, phi_x, phi_h)
    weight = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
    return h_new, x + (x_new - x) * (1 + 0.1 * weight)


def swapped_outputs(h, x, phi_e, phi_x, phi_h):
    h_new, x_new = good_layer(h, x, phi_e, phi_x, phi_h)
    return x_new, h_new


def updates_h_without_phi_h(h, x, phi_e, phi_x, phi_h):
    """A last layer (phi_h None) that still adds the mean message to h."""
    if phi_h is not None:
        return good_layer(h, x, phi_e, phi_x, phi_h)
    return good_layer(h, x, phi_e, phi_x, lambda z: z[..., h.shape[-1]:])


@pytest.mark.parametrize("fn", [good_layer, good_layer_loop])
def test_correct_layers_pass(fn, capsys):
    check_egnn_layer(fn)
    assert "All checks passed for egnn_layer" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (_wrong(diag=True), "include j = i"),
    (_wrong(norm_by_n=True), "divide by n - 1"),
    (_wrong(sign=-1.0), "wrong way"),
    (_wrong(damp="none"), "1/sqrt\\(d_ij\\^2 \\+ 1\\) is missing"),
    (_wrong(damp="d+1"), "divided by d_ij \\+ 1"),
    (_wrong(d_input="d"), "SQUARED distance"),
    (_wrong(h_res=False), "without adding h"),
    (_wrong(x_res=False), "without adding x"),
    (_wrong(receiver_first=False), "receiving particle i first"),
    (absolute_positions, "not equivariant under rotations and translations"),
    (particle_index, "not permutation equivariant"),
    (swapped_outputs, "shape \\(3, 5, 3\\), expected \\(3, 5, 8\\)"),
    (updates_h_without_phi_h, "return h unchanged"),
])
def test_layer_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_egnn_layer(fn)


def test_layer_untouched_and_bad_return():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_egnn_layer(untouched)
    with pytest.raises(CheckFailed, match="must return a pair"):
        check_egnn_layer(lambda h, x, *nets: x)


# ----------------------------------------------------------------------------------------
# refill
# ----------------------------------------------------------------------------------------


def _euler(buffer, score, schedule, n, n_steps, project, generator, *, sign=1.0, g2=True, sqrt_dt=True,
           reverse=True, at_start=True, with_noise=True, use_project=True, add=1, noise_first=False):
    P = project if (project is not None and use_project) else (lambda v: v)
    if noise_first:
        torch.randn(n, buffer.dim, generator=generator)
    x = sample_prior(schedule, n, buffer.dim, project=project if use_project else None, generator=generator)
    dt = 1.0 / n_steps
    times = torch.linspace(1.0, 0.0, n_steps + 1) if reverse else torch.linspace(0.0, 1.0, n_steps + 1)
    for k in range(n_steps):
        t = times[k if at_start else k + 1].repeat(n)
        a = schedule.g2(t)[:, None] if g2 else schedule.g(t)[:, None]
        b = schedule.g(t)[:, None] * (dt**0.5 if sqrt_dt else dt)
        z = P(torch.randn(x.shape, generator=generator)) if with_noise else 0.0
        x = P(x + sign * a * score(x, t) * dt + b * z)
    for _ in range(add):
        buffer.add(x)
    return x


def good_refill(buffer, score, schedule, n, n_steps, project=None, generator=None):
    return _euler(buffer, score, schedule, n, n_steps, project, generator)


def _wrong_refill(**flags):
    def refill(buffer, score, schedule, n, n_steps, project=None, generator=None):
        return _euler(buffer, score, schedule, n, n_steps, project, generator, **flags)

    return refill


def uses_the_package(buffer, score, schedule, n, n_steps, project=None, generator=None):
    x1 = sample_prior(schedule, n, buffer.dim, project=project, generator=generator)
    x = reverse_sde_sample(score, schedule, x1, n_steps, project=project, generator=generator)
    buffer.add(x)
    return x


def adds_other_states(buffer, score, schedule, n, n_steps, project=None, generator=None):
    x = _euler(buffer, score, schedule, n, n_steps, project, generator, add=0)
    buffer.add(x.flip(0))
    return x


def test_correct_refill_passes(capsys):
    check_refill(good_refill)
    assert "All checks passed for refill" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (_wrong_refill(sign=-1.0), "wrong sign"),
    (_wrong_refill(g2=False), "uses g\\(t\\)\\^2"),
    (_wrong_refill(sqrt_dt=False), "scale like sqrt\\(dt\\)"),
    (_wrong_refill(reverse=False), "time runs backwards"),
    (_wrong_refill(at_start=False), "START of each step"),
    (_wrong_refill(with_noise=False), "noise term .* is missing"),
    (_wrong_refill(use_project=False), "not centre-of-mass free"),
    (_wrong_refill(add=0), "should hold 3 \\+ 64 .* it holds 3"),
    (_wrong_refill(add=2), "it holds 131"),
    (_wrong_refill(noise_first=True), "draw x_1 = sample_prior"),
    (adds_other_states, "not the samples you returned"),
    (uses_the_package, "write the Euler-Maruyama loop yourself"),
])
def test_refill_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_refill(fn)


def test_refill_untouched():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_refill(untouched)

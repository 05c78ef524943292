"""Check for the appendix exercise: the online logsumexp update of the fused score kernel.

The learner writes ``online_update(m, s, acc, log_w, values) -> (m, s, acc)``: fold a block
of log-weights ``log_w`` (B, k) and values (B, k, D) into the running maximum ``m`` (B,),
the running sum of weights ``s`` (B,) and the running weighted sum ``acc`` (B, D), with
weights relative to ``m`` (see :mod:`boltzlab.kernels.online_lse`). The check streams
blocks through it and compares with a direct softmax computed here in float64; when the
answer is wrong it tells which known mistake it matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import CheckFailed, all_passed, call_learner, expect_close, expect_shape, passed

OnlineUpdate = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

F64 = torch.float64


def _stream(update: OnlineUpdate, log_w: Tensor, values: Tensor, blocks: list[slice], name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the given blocks of (log_w, values) into an empty state with ``update``."""
    batch, dim = values.shape[0], values.shape[2]
    m = torch.full((batch,), -math.inf, dtype=log_w.dtype)
    s = torch.zeros(batch, dtype=log_w.dtype)
    acc = torch.zeros(batch, dim, dtype=log_w.dtype)
    for block in blocks:
        out = call_learner(update, m.clone(), s.clone(), acc.clone(), log_w[:, block], values[:, block],
                           name=name, exercise="online_update")
        if not (isinstance(out, tuple) and len(out) == 3):
            raise CheckFailed(f"{name} should return a tuple (m, s, acc), got {type(out).__name__}")
        m, s, acc = out
        expect_shape("m", m, (batch,))
        expect_shape("s", s, (batch,))
        expect_shape("acc", acc, (batch, dim))
    return m, s, acc


def _mistake_variants(m: Tensor, s: Tensor, acc: Tensor, log_w: Tensor, values: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Known wrong updates, so a wrong answer can be named."""
    new_m = torch.maximum(m, log_w.amax(1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    w = torch.exp(log_w - shift[:, None])
    block_acc = (w[..., None] * values).sum(1)
    rescale = torch.exp(m - shift)
    return {
        "no_rescale": (new_m, s + w.sum(1), acc + block_acc),
        "rescale_s_only": (new_m, s * rescale + w.sum(1), acc + block_acc),
        "rescale_acc_only": (new_m, s + w.sum(1), acc * rescale[:, None] + block_acc),
        "inverse_rescale": (new_m, s / rescale + w.sum(1), acc / rescale[:, None] + block_acc),
    }


_MISTAKES = {
    "no_rescale": "when a later block has a larger log-weight the maximum m changes, and everything "
    "summed so far is relative to the old m: multiply s and acc by exp(m_old - m_new) before adding the block",
    "rescale_s_only": "you rescale s by exp(m_old - m_new) but not acc: both running sums are relative to m",
    "rescale_acc_only": "you rescale acc by exp(m_old - m_new) but not s: both running sums are relative to m",
    "inverse_rescale": "the rescaling factor is upside down: old terms shrink when the maximum grows, "
    "so multiply by exp(m_old - m_new) <= 1",
}


def _name_mistake(update: OnlineUpdate, name: str) -> str:
    """Run one two-block case where the maximum grows, and match the answer against known mistakes."""
    g = torch.Generator().manual_seed(11)
    log_w = torch.tensor([[0.0, -1.0, 2.0, 3.0]], dtype=F64)
    values = torch.randn(1, 4, 2, generator=g, dtype=F64)
    first = _stream(update, log_w, values, [slice(0, 2)], name)
    got = call_learner(update, *(t.clone() for t in first), log_w[:, 2:], values[:, 2:],
                       name=name, exercise="online_update")
    for mistake, expected in _mistake_variants(*first, log_w[:, 2:], values[:, 2:]).items():
        if all(torch.allclose(a.to(F64), b, rtol=1e-6, atol=1e-9) for a, b in zip(got, expected)):
            return _MISTAKES[mistake]
    return ("compare your update with the equations: m' = max(m, max_k l_k), "
            "s' = s exp(m - m') + sum_k exp(l_k - m'), acc' = acc exp(m - m') + sum_k exp(l_k - m') v_k")


def check_online_update(update: OnlineUpdate) -> None:
    """Check the learner's online logsumexp update.

    1. shapes, and one block from the empty state (m = -inf, s = 0, acc = 0) against softmax;
    2. many uneven blocks against a direct softmax and logsumexp (naming the mistake if wrong);
    3. log-weights of size 1e24 (overlapping Lennard-Jones particles): finite and still exact;
    4. a first block made only of padding (log-weight -inf) leaves the state at (-inf, 0, 0)
       without NaN, and the next block still gives the right answer.
    """
    name = getattr(update, "__name__", "online_update")
    g = torch.Generator().manual_seed(2025)
    batch, k, dim = 3, 20, 4
    log_w = 3.0 * torch.randn(batch, k, generator=g, dtype=F64)
    values = torch.randn(batch, k, dim, generator=g, dtype=F64)
    weights = torch.softmax(log_w, 1)
    direct = (weights[..., None] * values).sum(1)
    lse = torch.logsumexp(log_w, 1)

    m, s, acc = _stream(update, log_w, values, [slice(0, k)], name)
    expect_close("acc / s after one block", acc / s[:, None], direct, rtol=1e-9, atol=1e-12,
                 hint="from the empty state, acc / s must be the softmax-weighted average of the values")
    expect_close("m + log(s) after one block", m + torch.log(s), lse, rtol=1e-12, atol=1e-12,
                 hint="m is the running maximum of the log-weights and s = sum_k exp(l_k - m)")
    passed("one block from the empty state equals the softmax average")

    blocks = [slice(0, 1), slice(1, 4), slice(4, 11), slice(11, 12), slice(12, k)]
    order = torch.argsort(log_w[0])  # ascending in row 0: the maximum grows with every block
    log_w, values = log_w[:, order], values[:, order]
    m, s, acc = _stream(update, log_w, values, blocks, name)
    try:
        expect_close("acc / s after five uneven blocks", acc / s[:, None], direct, rtol=1e-9, atol=1e-12)
        expect_close("m + log(s) after five uneven blocks", m + torch.log(s), lse, rtol=1e-12, atol=1e-12)
    except CheckFailed as err:
        raise CheckFailed(f"{err} Likely cause: {_name_mistake(update, name)}.") from err
    passed("streaming uneven blocks equals the softmax average and logsumexp")

    huge = -1e24 * (1.0 + torch.rand(batch, k, generator=g, dtype=F64))  # -E/kT with E ~ 1e24
    huge[:, 5] = -1e24  # the most likely copy of every row
    m, s, acc = _stream(update, huge, values, blocks, name)
    for label, value in (("m", m), ("s", s), ("acc", acc)):
        if not bool(torch.isfinite(value).all()):
            raise CheckFailed(f"with log-weights around -1e24 your {label} contains NaN or inf. Hint: exponentiate "
                              "only differences l_k - m_new (which are <= 0), never l_k itself")
    if bool((s <= 0).any()):
        raise CheckFailed("with log-weights around -1e24 your s is 0: every exp(l_k) underflowed. Hint: "
                          "subtract the running maximum first, exp(l_k - m_new), so the largest weight is exp(0) = 1")
    expect_close("acc / s with log-weights around -1e24", acc / s[:, None], values[:, 5], rtol=1e-9, atol=1e-12,
                 hint="all weight belongs to the copy with the largest log-weight")
    passed("log-weights of -1e24 (overlapping particles) stay finite and exact")

    padded = torch.full((batch, 3), -math.inf, dtype=F64)
    m, s, acc = _stream(update, padded, values[:, :3], [slice(0, 3)], name)
    if bool(torch.isnan(m).any() | torch.isnan(s).any() | torch.isnan(acc).any()):
        raise CheckFailed("a block made only of padding (log-weights -inf) gave NaN: with m_old = m_new = -inf, "
                          "exp(m_old - m_new) is exp(-inf + inf) = NaN. Hint: when m_new is -inf, shift by 0 instead")
    expect_close("s after a block of padding", s, torch.zeros(batch, dtype=F64), atol=0.0,
                 hint="padding has weight exp(-inf) = 0")
    out = call_learner(update, m, s, acc, log_w[:, :4], values[:, :4], name=name, exercise="online_update")
    expect_close("acc / s after padding then a block", out[2] / out[1][:, None],
                 (torch.softmax(log_w[:, :4], 1)[..., None] * values[:, :4]).sum(1), rtol=1e-9, atol=1e-12)
    passed("a block of padding (-inf) first leaves no NaN behind")
    all_passed(name)


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {"online_update": ("boltzlab.kernels.online_lse.online_lse_update",)}
write_yourself.register(WRITE_YOURSELF)

"""Check for the chapter 05 exercise: the logsumexp Monte Carlo score estimator.

The learner writes ``mc_score(energy, x_t, sigma, eps) -> (B, dim)``:
S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT with x_k = x_t + sigma eps_k.
The check compares with :func:`boltzlab.estimators.lse_score` in float64 on an easy case,
at kT = 2 (where a missing 1/kT shows), and on two hard inputs where exponentiating
-E/kT directly overflows or underflows; a wrong answer is matched against known mistakes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.energies import DoubleWell2D, Energy, GaussianMixture
from boltzlab.estimators import copy_log_weights_and_forces, draw_eps, lse_score
from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import CheckFailed, all_passed, call_learner, expect_close, expect_shape, passed

ScoreFn = Callable[[Energy, Tensor, float, Tensor], Tensor]
F64 = torch.float64


def _mistake_variants(energy: Energy, x_t: Tensor, sigma: float, eps: Tensor) -> dict[str, Tensor]:
    """Known wrong estimators on the same copies, so a wrong answer can be named."""
    log_w, f = copy_log_weights_and_forces(energy, x_t, torch.full((x_t.shape[0],), sigma, dtype=x_t.dtype), eps)
    kT = energy.kT
    soft = torch.softmax(log_w, 1)[..., None]
    unnormalised = torch.exp(log_w - log_w.amax(1, keepdim=True))[..., None]
    return {
        "unnormalised": (unnormalised * f).sum(1) / kT,
        "no_kT_on_forces": (soft * f).sum(1),
        "no_kT_in_weights": (torch.softmax(log_w * kT, 1)[..., None] * f).sum(1) / kT,
        "no_kT_anywhere": (torch.softmax(log_w * kT, 1)[..., None] * f).sum(1),
        "wrong_sign": -(soft * f).sum(1) / kT,
        "uniform_weights": f.mean(1) / kT,
        "softmax_over_coordinates": (torch.softmax(log_w, 0)[..., None] * f).sum(1) / kT,
    }


_MISTAKES = {
    "unnormalised": "your weights do not sum to one: divide exp(l_k - max_k l_k) by their sum over k "
    "(a softmax over the K copies), otherwise the answer scales with K and the max shift",
    "no_kT_on_forces": "the score is F/kT, not F: divide the weighted forces by kT",
    "no_kT_in_weights": "the log-weights are -E(x_k)/kT: you forgot to divide the energies by kT",
    "no_kT_anywhere": "kT appears twice: log-weights -E/kT and the score F/kT; you used neither",
    "wrong_sign": "the sign is flipped: forces are F = -grad E (energy_and_forces returns them), "
    "and the score is +F/kT, pointing downhill in energy",
    "uniform_weights": "you averaged the forces with equal weights: that is the Jensen 'mean of scores' "
    "estimator, which estimates the gradient of the smoothed log-density, not grad log p_t; weight copy k "
    "by softmax_k(-E(x_k)/kT)",
    "softmax_over_coordinates": "your softmax runs over the wrong axis: normalise over the K copies (dim=1 "
    "of the (B, K) log-weights), not over the batch",
}


def _name_mistake(got: Tensor, energy: Energy, x_t: Tensor, sigma: float, eps: Tensor) -> str:
    for mistake, wrong in _mistake_variants(energy, x_t, sigma, eps).items():
        if torch.allclose(got.to(F64), wrong, rtol=1e-5, atol=1e-8):
            return _MISTAKES[mistake]
    return ("compare with S = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT, x_k = x_t + sigma eps_k, "
            "using energy.energy_and_forces on the (B, K, dim) copies")


def _case(fn: ScoreFn, energy: Energy, x_t: Tensor, sigma: float, eps: Tensor, label: str) -> None:
    expected = lse_score(energy, x_t, sigma, eps)
    got = call_learner(fn, energy, x_t.clone(), sigma, eps.clone(), name="mc_score")
    expect_shape(f"mc_score on {label}", got, tuple(x_t.shape))
    if not bool(torch.isfinite(got).all()):
        raise CheckFailed(
            f"mc_score on {label} returned NaN or inf at {int((~torch.isfinite(got)).any(-1).sum())} of "
            f"{x_t.shape[0]} points. exp(-E/kT) overflows (or all weights underflow to 0, giving 0/0) when "
            "|E/kT| is large. Hint: subtract max_k l_k before exponentiating (torch.softmax or "
            "torch.logsumexp do this for you)."
        )
    if not torch.allclose(got.to(F64), expected, rtol=1e-5, atol=1e-6):
        hint = _name_mistake(got, energy, x_t, sigma, eps)
        expect_close(f"mc_score on {label}", got.to(F64), expected, rtol=1e-5, atol=1e-6, hint=hint)


def check_mc_score(fn: ScoreFn) -> None:
    """Run the learner's ``mc_score`` on four cases; raise :class:`CheckFailed` naming the mistake."""
    g = torch.Generator().manual_seed(404)
    gmm = GaussianMixture()
    x = gmm.sample(6, g, dtype=F64) + 2.0 * torch.randn(6, 2, generator=g, dtype=F64)
    eps = draw_eps(gmm, 6, 32, g, dtype=F64)
    _case(fn, gmm, x, 2.0, eps, "GMM-40 (kT = 1, sigma = 2, K = 32)")
    passed("shape (B, dim) and values on GMM-40 at kT = 1")

    warm = gmm.at_temperature(2.0)
    _case(fn, warm, x, 2.0, eps, "GMM-40 at kT = 2")
    passed("kT enters the weights and the score")

    far = torch.tensor([[300.0, -250.0], [-400.0, 10.0]], dtype=F64)
    _case(fn, gmm, far, 1.0, draw_eps(gmm, 2, 16, g, dtype=F64), "GMM-40 far from every mode (E/kT ~ 1e4)")
    cold = DoubleWell2D().at_temperature(0.01)  # -E/kT about 1080 near the deep minimum: e^1080 = inf
    x_cold = torch.tensor([[-1.75, 0.0], [-1.8, 0.05], [-1.7, -0.05]], dtype=F64)
    _case(fn, cold, x_cold, 0.02, draw_eps(cold, 3, 16, g, dtype=F64), "the double well at kT = 0.01 (-E/kT ~ 1e3)")
    passed("finite and correct where exp(-E/kT) would underflow or overflow (logsumexp)")
    all_passed("mc_score")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {"mc_score": ("boltzlab.estimators.mc_score", "boltzlab.estimators.lse_score")}
write_yourself.register(WRITE_YOURSELF)

"""Checks for the chapter 00 exercises: a MALA step and Kish's effective sample size.

Each check calls the learner's function on chosen inputs, compares with an answer computed
here independently, and when the answer matches a known mistake says which one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.energies import DoubleWell2D, Energy
from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import CheckFailed, all_passed, as_float, call_learner, expect_close, expect_shape, passed

MalaStep = Callable[[Tensor, Energy, float, Tensor, Tensor], tuple[Tensor, Tensor]]


def _mala_variants(x: Tensor, energy: Energy, tau: float, xi: Tensor, log_u: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """The correct MALA step and three common mistakes, on the same noise ``xi`` and ``log_u``."""
    beta = 1.0 / energy.kT
    energies_x, drift_x = energy.energy_and_forces(x)
    proposal = x + tau * beta * drift_x + (2 * tau) ** 0.5 * xi
    energies_y, drift_y = energy.energy_and_forces(proposal)
    # log q(b | a) up to a constant, for the Langevin proposal from a with forces f_a
    forward = -(proposal - x - tau * beta * drift_x).pow(2).sum(-1) / (4 * tau)
    backward = -(x - proposal - tau * beta * drift_y).pow(2).sum(-1) / (4 * tau)
    boltzmann_ratio = beta * (energies_x - energies_y)
    out = {}
    for name, log_acceptance in {
        "correct": boltzmann_ratio + backward - forward,
        "no_hastings": boltzmann_ratio,  # forgot the proposal-density ratio
        "flipped_hastings": boltzmann_ratio - backward + forward,
    }.items():
        took = log_u < log_acceptance
        out[name] = (torch.where(took.unsqueeze(-1), proposal, x), took)
    out["no_accept_reject"] = (proposal, torch.ones_like(log_u, dtype=torch.bool))
    return out


_MISTAKES = {
    "no_hastings": "you accept with exp(-(E(y) - E(x))/kT) only: the proposal is not symmetric, so the "
    "Metropolis-Hastings ratio needs q(x|y)/q(y|x) as well",
    "flipped_hastings": "the proposal ratio is upside down: use q(x|y)/q(y|x), where q(y|x) is the density "
    "of proposing y from x",
    "no_accept_reject": "every proposal is accepted: that is the unadjusted Langevin algorithm (biased); "
    "add the accept/reject step with log_u",
}


def check_mala_step(mala_step: MalaStep) -> None:
    """Check ``mala_step(x, energy, tau, xi, log_u) -> (x_new, accepted)``.

    1. shapes and types on a batch of double-well chains;
    2. the exact step on given noise, against an independent implementation (and, if it is
       wrong, which common mistake it matches);
    3. the double well's deep-well probability (0.967) is preserved when starting from
       exact samples, i.e. the step leaves the Boltzmann distribution invariant.
    """
    g = torch.Generator().manual_seed(2024)
    dw = DoubleWell2D()
    n = 512
    x = dw.sample(n, g, dtype=torch.float64)
    xi = torch.randn(n, 2, generator=g, dtype=torch.float64)
    log_u = torch.log(torch.rand(n, generator=g, dtype=torch.float64))
    tau = 0.05

    out = call_learner(mala_step, x.clone(), dw, tau, xi, log_u, name="mala_step")
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckFailed(f"mala_step should return a tuple (x_new, accepted), got {type(out).__name__}")
    x_new, accepted = out
    expect_shape("x_new", x_new, (n, 2))
    expect_shape("accepted", accepted, (n,))
    if accepted.dtype != torch.bool:
        raise CheckFailed(f"accepted should be a bool tensor (True where the proposal was accepted), got {accepted.dtype}")
    passed("returns x_new (n, d) and accepted (n,) bool")

    variants = _mala_variants(x, dw, tau, xi, log_u)
    want_x, want_acc = variants["correct"]
    if not torch.allclose(x_new.double(), want_x, atol=1e-6, rtol=1e-6):
        for name, (vx, _) in variants.items():
            if name != "correct" and torch.allclose(x_new.double(), vx, atol=1e-6, rtol=1e-6):
                raise CheckFailed(f"mala_step matches a common mistake: {_MISTAKES[name]}.")
        prop = x + tau * dw.forces(x) / dw.kT + math.sqrt(2 * tau) * xi
        moved = ~torch.isclose(x_new.double(), x).all(-1)
        if moved.any() and not torch.allclose(x_new.double()[moved], prop[moved], atol=1e-6):
            raise CheckFailed(
                "where your chains moved, they did not move to the MALA proposal "
                "y = x + tau * F(x)/kT + sqrt(2 tau) xi (F = -grad E, from energy.energy_and_forces)."
            )
        raise CheckFailed(
            f"mala_step accepts {int(accepted.sum())} of {n} proposals, the correct step accepts "
            f"{int(want_acc.sum())}: check the acceptance test log_u < log alpha, with "
            "log alpha = -(E(y) - E(x))/kT + log q(x|y) - log q(y|x)."
        )
    if not torch.equal(accepted.cpu(), want_acc):
        raise CheckFailed("x_new is right but `accepted` does not say which chains accepted their proposal")
    passed(f"exact step on given noise ({int(want_acc.sum())}/{n} accepted, as expected)")

    # invariance: exact samples stay exact after 30 steps (deep-well mass 0.967)
    m = 4000
    z = dw.sample(m, g, dtype=torch.float64)
    for _ in range(30):
        xi = torch.randn(m, 2, generator=g, dtype=torch.float64)
        log_u = torch.log(torch.rand(m, generator=g, dtype=torch.float64))
        z, _ = call_learner(mala_step, z, dw, 0.3, xi, log_u, name="mala_step")
    p, _ = dw.well_probabilities()
    frac = float((z[:, 0] < 0).double().mean())
    se = math.sqrt(p * (1 - p) / m)
    expect_close("deep-well fraction after 30 steps from exact samples", frac, p, rtol=0, atol=5 * se,
                 hint="a correct MALA step leaves the Boltzmann distribution invariant")
    var2 = float(z[:, 1].var())
    expect_close("variance of x2 after 30 steps (exact: kT = 1)", var2, 1.0, rtol=0.15, atol=0)
    passed(f"leaves the Boltzmann distribution invariant (deep-well fraction {frac:.3f}, exact {p:.3f})")
    all_passed("mala_step")


def check_kish_ess(kish_ess: Callable[[Tensor], object]) -> None:
    """Check ``kish_ess(log_w) -> float``: ESS = (sum w)^2 / sum w^2 from log-weights."""
    n = 1000
    ess = as_float("kish_ess(zeros(1000))", call_learner(kish_ess, torch.zeros(n), name="kish_ess"))
    if abs(ess - 1.0) < 1e-6:
        raise CheckFailed("kish_ess returned 1 for 1000 equal weights: that is ESS/n, the normalised ESS; "
                          "return (sum w)^2 / sum w^2 itself, not divided by n")
    expect_close("ESS of 1000 equal weights", ess, float(n), rtol=1e-6,
                 hint="equal weights are as good as independent samples: ESS = n")
    passed("equal weights give n")
    one = torch.full((n,), -50.0)
    one[3] = 0.0
    expect_close("ESS when one weight dominates", call_learner(kish_ess, one, name="kish_ess"), 1.0, rtol=1e-6)
    passed("one dominant weight gives 1")
    g = torch.Generator().manual_seed(7)
    log_w = 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.exp(log_w)
    want = float(w.sum() ** 2 / (w**2).sum())
    got = as_float("kish_ess(log_w)", call_learner(kish_ess, log_w, name="kish_ess"))
    if abs(got - want / n) < 1e-6 or abs(got - 1 / want) < 1e-9:
        raise CheckFailed(f"kish_ess returned {got:.4g}; the ESS of these weights is {want:.4g}: "
                          "return (sum w)^2 / sum w^2 itself, not divided by n and not inverted")
    expect_close("ESS of log-normal weights", got, want, rtol=1e-6,
                 hint="ESS = (sum_i w_i)^2 / sum_i w_i^2 with w_i = exp(log_w_i)")
    passed(f"log-normal weights: {got:.2f}")
    shifted = call_learner(kish_ess, log_w + 1000.0, name="kish_ess")
    if not math.isfinite(as_float("kish_ess(log_w + 1000)", shifted)):
        raise CheckFailed("kish_ess(log_w + 1000) is not finite: exp(1000) overflows. Keep the sums in log space "
                          "(torch.logsumexp of the log-weights, and of twice them) and exponentiate only the final ratio")
    expect_close("ESS after adding 1000 to every log-weight", shifted, want, rtol=1e-6,
                 hint="normalising the weights must not change the ESS")
    passed("stable and shift-invariant for log-weights near 1000")
    all_passed("kish_ess")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {
    "mala_step": ("boltzlab.mcmc.mala_step", "boltzlab.mcmc._mala_move"),
    "kish_ess": ("boltzlab.metrics.kish_ess",),
}
write_yourself.register(WRITE_YOURSELF)

r"""Checks for the chapter 03 exercises (reverse KL and free energy).

- :func:`check_reverse_kl_loss`: L = (1/n) Σ_i [E(x_i)/kT + log q(x_i)], x_i ~ q drawn with
  ``flow.sample`` (with gradients), which equals -log Z + KL(q || p) in expectation;
- :func:`check_free_energy_difference`: ΔF/kT = F_B - F_A = -log(Σ_{i∈B} w_i / Σ_{i∈A} w_i)
  from log-weights, computed with log-sum-exp.

Each check compares with an independent answer (a quadrature KL, exact samples, a hand
computed case) and names the usual mistakes when it recognises them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from boltzlab import flows
from boltzlab.energies import DoubleWell2D, Energy
from boltzlab.training import double_well_exact_samples
from boltzlab.grading.feedback import CheckFailed, all_passed, as_float, call_learner, expect_close, passed

LossFn = Callable[[flows.Flow, Energy, int, torch.Generator], Tensor]


def _small_flow(seed: int) -> flows.Flow:
    """A small RealNVP flow with random (non-identity) weights, in float64."""
    flow = flows.realnvp(2, n_layers=2, hidden=8, scale=[1.5, 1.0], seed=seed, zero_init=False).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def _loss_terms(flow: flows.Flow, energy: Energy, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    x, log_q = flow.sample(n, generator=torch.Generator().manual_seed(seed))
    return x, log_q, energy.energy(x)


def check_reverse_kl_loss(fn: LossFn) -> None:
    """Check ``fn(flow, energy, n_samples, generator) -> loss`` (a 0-d tensor with gradients)."""
    name = "reverse_kl_loss"
    for kT in (1.0, 2.5):
        energy = DoubleWell2D().at_temperature(kT)
        flow = _small_flow(seed=1)
        label = f"{name} on the double well at kT = {kT}"
        got = call_learner(fn, flow, energy, 64, torch.Generator().manual_seed(7), name=name)
        if not isinstance(got, Tensor):
            raise CheckFailed(f"{label} returned a {type(got).__name__}; return the loss as a torch tensor "
                              "(no .item() or float()), so that it can be differentiated")
        if got.numel() != 1:
            raise CheckFailed(f"{label} returned shape {tuple(got.shape)}; the loss is one number: average over the samples")
        if not got.requires_grad:
            raise CheckFailed(f"{label} has no gradient: draw the samples with flow.sample(...) outside torch.no_grad() "
                              "and do not .detach() them; reverse-KL training differentiates through the samples")
        x, log_q, e = _loss_terms(flow, energy, 64, seed=7)
        expected = (e / kT + log_q).mean()
        value = float(got.detach())
        mistakes = {
            "the energy is not divided by kT: p ∝ exp(-E/kT), so the loss is E/kT + log q": (e + log_q).mean(),
            "log q has the wrong sign: the loss is E_q[E/kT + log q] (the entropy term enters as +log q)": (e / kT - log_q).mean(),
            "the energy term has the wrong sign: energy.log_prob(x) is -E/kT, the loss needs +E/kT": (-e / kT + log_q).mean(),
            "you summed over the samples: average them (.mean()), so the loss does not grow with n_samples": (e / kT + log_q).sum(),
        }
        target = float(expected.detach())
        for sentence, wrong_tensor in mistakes.items():
            wrong = float(wrong_tensor.detach())
            if abs(value - wrong) < 1e-6 * (1 + abs(wrong)) and abs(wrong - target) > 1e-6:
                raise CheckFailed(f"{label}: {sentence}.")
        expect_close(label, got.detach(), target, rtol=1e-6, atol=1e-8,
                     hint="x, log_q = flow.sample(n_samples, generator=generator), then mean of E(x)/kT + log_q")
        # the gradient of the learner's loss with respect to the parameters matches
        flow.zero_grad()
        got.backward()
        got_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in flow.parameters()]
        flow.zero_grad()
        expected.backward()
        for (pname, p), g in zip(flow.named_parameters(), got_grads):
            expect_close(f"gradient of your loss w.r.t. {pname}", g, p.grad, rtol=1e-5, atol=1e-8,
                         hint="the gradient must flow through both x (the energy) and log_q")
    passed("the loss and its gradients match E/kT + log q averaged over flow samples, at kT = 1 and 2.5")

    # independent of the formula: E_q[E/kT + log q] = -log Z + KL(q || p), the KL by quadrature
    energy = DoubleWell2D()
    flow = _small_flow(seed=2)
    n, reps = 4000, 5
    values = [as_float(name, call_learner(fn, flow, energy, n, torch.Generator().manual_seed(100 + r), name=name).detach())
              for r in range(reps)]
    mean = sum(values) / reps
    x, log_q, e = _loss_terms(flow, energy, 20_000, seed=3)
    se = float((e + log_q).detach().std()) / math.sqrt(n * reps)
    kl, _ = flows.kl_on_grid(flow, energy, energy.log_z(), (-7, 7), (-9, 9), grid=400)
    expect_close("your loss + log Z (Monte Carlo)", mean + energy.log_z(), kl, rtol=0, atol=5 * se + 1e-3,
                 hint="E_q[E/kT + log q] = -log Z + KL(q||p) holds for any q; your estimate is biased")
    passed(f"loss + log Z = {mean + energy.log_z():.4f} agrees with KL(q||p) = {kl:.4f} from quadrature")
    all_passed(name)


FreeEnergyFn = Callable[[Tensor, Tensor, Tensor], object]


def _reference_delta_f(log_w: Tensor, in_a: Tensor, in_b: Tensor) -> float:
    return float(torch.logsumexp(log_w[in_a], 0) - torch.logsumexp(log_w[in_b], 0))


def check_free_energy_difference(fn: FreeEnergyFn) -> None:
    """Check ``fn(log_w (n,), in_a (n,) bool, in_b (n,) bool) -> ΔF/kT = F_B - F_A``."""
    name = "free_energy_difference"
    # a case by hand: four equal weights, three in A and one in B, so ΔF = -log(1/3) = log 3
    log_w = torch.zeros(4, dtype=torch.float64)
    in_a = torch.tensor([True, True, True, False])
    got = as_float(f"{name} (four equal weights)", call_learner(fn, log_w, in_a, ~in_a, name=name))
    if abs(got) < 1e-9:
        raise CheckFailed(f"{name}: you averaged the weights in each state: with equal weights, three samples in A and "
                          "one in B you gave ΔF = 0, but P_A and P_B are sums of the weights over each state, not means")
    if abs(got + math.log(3)) < 1e-9:
        raise CheckFailed(f"{name}: the sign is flipped: ΔF = F_B - F_A = -log(P_B / P_A); with three equal weights "
                          f"in A and one in B, B is less likely, so ΔF = +log 3 = {math.log(3):.4f}, you gave {got:.4f}")
    expect_close(f"{name} with equal weights, three samples in A and one in B", got, math.log(3), rtol=1e-9, atol=1e-9,
                 hint="ΔF/kT = -log(Σ_B w / Σ_A w)")
    passed("equal weights: ΔF = log 3 for three samples in A against one in B")

    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, generator=g, dtype=torch.float64)
    log_w = 1.5 * torch.randn(400, generator=g, dtype=torch.float64)
    in_a, in_b = x < 0.3, x >= 0.3
    expected = _reference_delta_f(log_w, in_a, in_b)
    got = as_float(name, call_learner(fn, log_w, in_a, in_b, name=name))
    mistakes = {
        "the weights are ignored: P_A and P_B are sums of the weights w_i = exp(log_w_i) over each state, not counts":
            -math.log(float(in_b.sum()) / float(in_a.sum())),
        "you averaged the weights in each state: P_A and P_B are sums over each state (Σ_A w / Σ_all w), not means":
            float(torch.logsumexp(log_w[in_a], 0) - math.log(in_a.sum()) - torch.logsumexp(log_w[in_b], 0) + math.log(in_b.sum())),
        "the sign is flipped: ΔF = F_B - F_A = -log(Σ_B w / Σ_A w)": -expected,
        "log_w was used as if it were w: the weights are exp(log_w)":
            -math.log(float(log_w[in_b].sum() / log_w[in_a].sum())) if float(log_w[in_b].sum() / log_w[in_a].sum()) > 0 else math.nan,
    }
    for sentence, wrong in mistakes.items():
        if math.isfinite(wrong) and abs(got - wrong) < 1e-6 and abs(wrong - expected) > 1e-6:
            raise CheckFailed(f"{name}: {sentence}.")
    expect_close(f"{name} with random weights", got, expected, rtol=1e-6, atol=1e-9, hint="ΔF/kT = -log(Σ_B w / Σ_A w)")
    passed("random weights: matches -log(Σ_B w / Σ_A w)")

    for shift in (800.0, -800.0):
        got_shifted = as_float(f"{name} with log_w shifted by {shift:+g}", call_learner(fn, log_w + shift, in_a, in_b, name=name))
        if not math.isfinite(got_shifted):
            raise CheckFailed(f"{name}: with log-weights around {shift:+g} you returned {got_shifted}: exp({shift:g}) "
                              "over- or underflows. Work in log space: sum the weights of each state with "
                              "torch.logsumexp, never with exp")
        expect_close(f"{name} with log_w shifted by {shift:+g}", got_shifted, expected, rtol=1e-6, atol=1e-6,
                     hint="adding a constant to every log-weight must not change ΔF; use torch.logsumexp")
    passed("stable for log-weights of size 800, as real ones are (use logsumexp)")

    # physics: exact samples of the double well (all weights equal) give its exact ΔF
    dw = DoubleWell2D()
    xs = double_well_exact_samples(200_000, dw, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = as_float(name, call_learner(fn, torch.zeros(xs.shape[0], dtype=torch.float64), xs[:, 0] < 0, xs[:, 0] >= 0, name=name))
    exact = dw.well_free_energy_difference()
    expect_close("ΔF between the double well's wells from 200,000 exact samples", got, exact, rtol=0, atol=0.06)
    passed(f"exact double-well samples give ΔF = {got:.3f} kT (exact {exact:.3f} kT)")
    all_passed(name)

"""Iterative distillation (VIDD, Su et al. 2025, arXiv 2507.00445): soft-optimal weights, the
tilt schedule, roll-in, roll-out, the tilted score target, and the loop. See the package
docstring of :mod:`boltzlab.finetune` for the method."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from boltzlab.diffusion import (
    GeometricNoiseSchedule,
    Projection,
    ScoreFn,
    _identity,
    reverse_sde_sample,
    sample_prior,
)
from boltzlab.finetune._checks import FinetuneInputError, Reward, _positive_float, _positive_int, _tensor
from boltzlab.training import TrainingHistory, run_training

ROLLIN_MODELS = ("student", "pretrained", "mixture")


def soft_optimal_weights(rewards: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    r"""Soft-optimal roll-out weights and the soft value of each roll-in state.

    ``rewards`` of shape ``(B, M)``: r(x_0^(m)) of M completions of each of B states. Returns

        w_bm = exp(r_bm / alpha) / sum_m' exp(r_bm' / alpha)                  shape (B, M)
        V_b  = alpha log( (1/M) sum_m exp(r_bm / alpha) )                     shape (B,)

    both by logsumexp, so rewards of any size are fine. V is the Monte Carlo soft value
    alpha log E_tau[exp(r(x_0)/alpha) | x_t]: it lies between the mean reward (alpha -> inf)
    and the best reward (alpha -> 0).
    """
    r = _tensor(rewards, 2, "rewards", "(B, M)")
    alpha = _positive_float(alpha, "alpha")
    scaled = r / alpha
    lse = torch.logsumexp(scaled, dim=1)
    weights = torch.exp(scaled - lse[:, None])
    value = alpha * (lse - math.log(r.shape[1]))
    return weights, value


def tempering_alphas(n_rounds: int, alpha_total: float = 1.0) -> tuple[float, ...]:
    r"""Per-round alphas alpha_k = n_rounds · alpha_total, so that sum_k 1/alpha_k = 1/alpha_total.

    With a teacher refresh after every round the tilts compose,
    q0 · prod_k exp(r/alpha_k) = q0 · exp(r/alpha_total); for the Boltzmann reward, round k ends
    at the inverse temperature beta0 + (k/K)(beta - beta0) / alpha_total: a tempering curriculum.
    """
    n_rounds = _positive_int(n_rounds, "n_rounds")
    alpha_total = _positive_float(alpha_total, "alpha_total")
    return tuple(n_rounds * alpha_total for _ in range(n_rounds))


def composed_alpha(alphas: Sequence[float]) -> float:
    r"""The alpha of the composed tilt prod_k exp(r/alpha_k) = exp(r/alpha): 1 / sum_k 1/alpha_k."""
    if len(alphas) == 0:
        raise FinetuneInputError("alphas is empty: give one alpha per round")
    return 1.0 / sum(1.0 / _positive_float(a, f"alphas[{k}]") for k, a in enumerate(alphas))


# ----------------------------------------------------------------------------------------
# roll-in, roll-out, target and loss
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def rollin(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    n_steps: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Roll-in states x_t of the reverse SDE of ``score``, each stopped at its own time (on-policy when
    ``score`` is the current student, off-policy when it is another model, e.g. the pretrained one).

    One reverse-SDE trajectory per state on the grid t_j = 1 - j/n_steps; state b is read at a
    uniformly drawn step j_b in {0, ..., n_steps - 1} (so t in {1, ..., 1/n_steps}, never 0).
    Returns ``(x_t (n, dim), t (n,))``.
    """
    n, dim, n_steps = _positive_int(n, "n"), _positive_int(dim, "dim"), _positive_int(n_steps, "n_steps")
    x1 = sample_prior(schedule, n, dim, project=project, generator=generator)
    _, path = reverse_sde_sample(score, schedule, x1, n_steps, project=project, generator=generator,
                                 return_trajectory=True)
    j = torch.randint(n_steps, (n,), generator=generator)
    t = 1.0 - j.to(x1.dtype) / n_steps
    return path[j, torch.arange(n)], t


def rollin_states(
    kind: str,
    student: ScoreFn,
    pretrained: ScoreFn,
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    n_steps: int,
    *,
    student_fraction: float = 0.5,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Roll-in states of iterative distillation from the model(s) that ``kind`` names.

    ``"student"``: all n from the student's reverse SDE (on-policy); ``"pretrained"``: all from the
    pretrained model's (off-policy, the same distribution every round); ``"mixture"``: the first
    ceil(f n) from the student and the rest from the pretrained model, f = ``student_fraction``.
    The mixture keeps states where the pretrained model puts mass (so the distilled score stays
    right there) while following the student where it moves. Each part is :func:`rollin`.
    Returns ``(x_t (n, dim), t (n,), from_student (n,) bool)``.
    """
    if kind not in ROLLIN_MODELS:
        raise FinetuneInputError(f"unknown roll-in model {kind!r}; choose one of {', '.join(ROLLIN_MODELS)}")
    if isinstance(student_fraction, bool) or not isinstance(student_fraction, (int, float)) \
            or not 0.0 <= student_fraction <= 1.0:
        raise FinetuneInputError(f"student_fraction must lie in [0, 1], got {student_fraction!r}")
    n = _positive_int(n, "n")
    n_student = {"student": n, "pretrained": 0}.get(kind, math.ceil(student_fraction * n))
    parts = []
    for is_student, model, count in ((True, student, n_student), (False, pretrained, n - n_student)):
        if count:
            x, t = rollin(model, schedule, count, dim, n_steps, project=project, generator=generator)
            parts.append((x, t, torch.full((count,), is_student, dtype=torch.bool)))
    x_t, t, source = (torch.cat(v) for v in zip(*parts))
    return x_t, t, source


def _score_and_jacobian_diagonal(score: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """s(x, t) and the diagonal ∂s_i/∂x_i, both (B, dim), by one backward pass per coordinate."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = score(xg, t)
        diag = torch.stack([torch.autograd.grad(s[:, i].sum(), xg, retain_graph=i < x.shape[1] - 1)[0][:, i]
                            for i in range(x.shape[1])], dim=1)
    return s.detach(), diag


@torch.no_grad()
def rollout(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    n_steps: int,
    *,
    n_rollouts: int = 1,
    moment_matched: bool = False,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Completions x_0 of the reverse SDE of ``score`` started at (x_t, t), each state its own time.

    Euler-Maruyama like :func:`boltzlab.diffusion.reverse_sde_sample`, but on a per-state time
    grid s_k = t_b (1 - k/n_steps), k = 0..n_steps (states at different times advance
    together), and with the exact integral of g^2 over each step in place of g(s_k)^2 dt:

        x <- x + Δ_k s(x, s_k) + sqrt(Δ_k) z,   Δ_k = sigma_{s_k}^2 - sigma_{s_{k+1}}^2.

    On the geometric schedule g^2 grows like r^{2t}, so g(s_k)^2 dt overstates Δ_k by about
    1 + log(r) dt (38 % for 20 steps from t = 1 with r = 2000). Even with Δ_k the scheme
    spreads the completions too much when the steps are coarse (for a Gaussian target the
    exact noise variance is Δ_k (v + sigma_{s_{k+1}}^2) / (v + sigma_{s_k}^2) < Δ_k), and a too wide
    posterior overstates the tilt estimated from it; the error shrinks only like 1/n_steps.

    ``moment_matched=True`` fixes this: by second-order Tweedie the exact reverse transition
    has mean x + Δ_k s and covariance Δ_k (I + Δ_k ∇s) (for any data distribution), and the
    step draws from the Gaussian with that mean and the diagonal of that covariance, with
    ∂s_i/∂x_i by autograd (one backward pass per coordinate: for low dimension). It is exact
    for Gaussians with diagonal covariance at any step size and much more accurate with
    few steps otherwise.

    ``x_t`` (B, dim), ``t`` (B,) in (0, 1]; returns ``(B, n_rollouts, dim)`` (M = ``n_rollouts``
    independent completions per state).
    """
    x_t = _tensor(x_t, 2, "x_t", "(B, dim)")
    t = _tensor(t, 1, "t", "(B,)")
    if t.shape[0] != x_t.shape[0]:
        raise FinetuneInputError(f"t has {t.shape[0]} times for {x_t.shape[0]} states")
    if bool(((t <= 0) | (t > 1)).any()):
        raise FinetuneInputError("roll-out times must lie in (0, 1]")
    n_steps, m = _positive_int(n_steps, "n_steps"), _positive_int(n_rollouts, "n_rollouts")
    project = project or _identity
    b, dim = x_t.shape
    x = x_t.repeat_interleave(m, dim=0)  # (B M, dim), the M copies of state b are rows b M .. b M + M - 1
    start = t.to(x.dtype).repeat_interleave(m)
    dt = start / n_steps
    for k in range(n_steps):
        s_hi = start - k * dt
        s_lo = (start - (k + 1) * dt).clamp_min(0.0)
        step_var = (schedule.variance(s_hi) - schedule.variance(s_lo))[:, None]  # = ∫ g^2 over the step
        z = project(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        if moment_matched:
            s, jac_diag = _score_and_jacobian_diagonal(score, x, s_hi)
            noise_var = (step_var * (1.0 + step_var * jac_diag)).clamp_min(0.0)
        else:
            s, noise_var = score(x, s_hi), step_var
        x = project(x + step_var * s + noise_var.sqrt() * z)
    return x.reshape(b, m, dim)


def tilted_score_target(
    x_t: Tensor,
    t: Tensor,
    completions: Tensor,
    rewards: Tensor,
    alpha: float,
    schedule: GeometricNoiseSchedule,
    teacher_score: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The distillation target: the noised score of the tilted teacher at (x_t, t).

    Tweedie's formula for the tilted posterior p*(x_0 | x_t) ∝ tau(x_0 | x_t) e^{r(x_0)/alpha}:

        ∇ log (tau · e^{r/alpha})_t (x_t) = ( E_{p*}[x_0 | x_t] - x_t ) / sigma_t^2
                                          = ∇ log tau_t(x_t) + ( E_{p*}[x_0] - E_tau[x_0] ) / sigma_t^2,

    the second line being ∇ log tau_t + ∇V/alpha. From completions x_0^(m) ~ tau(x_0 | x_t) and
    w = :func:`soft_optimal_weights`, the shift of the mean is estimated with a leave-one-out
    baseline,

        Δ = sum_m w_m (x_0^(m) - mean_{m' != m} x_0^(m')) = M/(M-1) · sum_m (w_m - 1/M) x_0^(m),

    which, unlike the plain self-normalised sum_m w_m x_0^(m) - mean_m x_0^(m), has no bias at
    first order in the tilt (the plain one shrinks the tilt by (M-1)/M; over many rounds that
    adds up). The target is then

        target = ( mean_m x_0^(m) + Δ - x_t ) / sigma_t^2                 (no teacher_score)
        target = s_tau(x_t, t) + Δ / sigma_t^2                            (control variate)

    The second form uses the teacher's own score for the untilted part (equal in expectation
    when the teacher is self-consistent); its Monte Carlo noise vanishes as the tilt 1/alpha -> 0,
    while the first form's noise is the posterior spread of x_0 at every tilt (large at large t).

    ``x_t`` (B, dim), ``t`` (B,), ``completions`` (B, M, dim) with M >= 2, ``rewards`` (B, M),
    ``teacher_score`` (B, dim) or None. Returns ``(target (B, dim), value (B,), ess (B,))`` with
    ess = 1 / sum_m w_m^2 the Kish ESS of each state's weights (between 1 and M).
    """
    x_t = _tensor(x_t, 2, "x_t", "(B, dim)")
    t = _tensor(t, 1, "t", "(B,)")
    completions = _tensor(completions, 3, "completions", "(B, M, dim)")
    b, m, dim = completions.shape
    if x_t.shape != (b, dim) or t.shape != (b,) or tuple(rewards.shape) != (b, m):
        raise FinetuneInputError(
            f"inconsistent shapes: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, completions {(b, m, dim)}, "
            f"rewards {tuple(rewards.shape)}; expected ({b}, {dim}), ({b},), (B, M, dim), ({b}, {m})"
        )
    var = schedule.variance(t)
    if bool((var <= 0).any()):
        raise FinetuneInputError("t must be > 0: at t = 0 the noise variance is 0 and the target undefined")
    if m < 2:
        raise FinetuneInputError(f"need M >= 2 completions per state to estimate the tilt, got M = {m}")
    weights, value = soft_optimal_weights(rewards, alpha)
    # leave-one-out baseline: sum_m w_m (x_m - mean_{m' != m} x_m') = M/(M-1) sum_m (w_m - 1/M) x_m
    shift = m / (m - 1) * ((weights - 1.0 / m)[..., None] * completions).sum(1)
    if teacher_score is None:
        target = (completions.mean(1) + shift - x_t) / var[:, None]
    else:
        teacher_score = _tensor(teacher_score, 2, "teacher_score", "(B, dim)")
        if teacher_score.shape != x_t.shape:
            raise FinetuneInputError(f"teacher_score has shape {tuple(teacher_score.shape)}, expected {(b, dim)}")
        target = teacher_score + shift / var[:, None]
    return target, value, 1.0 / weights.pow(2).sum(1)


def score_regression_loss(score: ScoreFn, x_t: Tensor, t: Tensor, target: Tensor,
                          schedule: GeometricNoiseSchedule) -> Tensor:
    r"""L = mean_b sigma_{t_b}^2 || s(x_t, t) - target ||^2 (the weighting of DSM): a scalar."""
    residual = schedule.std(t)[:, None] * (score(x_t, t) - target)
    return residual.pow(2).sum(-1).mean()


# ----------------------------------------------------------------------------------------
# iterative distillation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillationConfig:
    """Sizes and settings of :func:`iterative_distillation`.

    A round is ``collections_per_round`` collections; each collection draws ``n_states``
    roll-in states with ``n_rollouts`` completions each, then takes ``steps_per_collection``
    Adam steps on minibatches of ``batch_size`` of those (state, target) pairs. The teacher is
    refreshed after every round. ``alphas`` (one per round) defaults to
    ``tempering_alphas(n_rounds, alpha_total)``. ``rollin``: which model's reverse SDE makes the
    roll-in states (``"student"``, ``"pretrained"``, or ``"mixture"``: a fraction ``student_fraction``
    from the student, the rest from the pretrained model; :func:`rollin_states`).
    ``control_variate``: use the teacher's score for the untilted part of the target (see
    :func:`tilted_score_target`); ``moment_matched``: moment-matched roll-out steps (see
    :func:`rollout`).
    """

    n_rounds: int = 4
    alpha_total: float = 1.0
    alphas: tuple[float, ...] | None = None
    collections_per_round: int = 2
    n_states: int = 1024
    n_rollouts: int = 16
    steps_per_collection: int = 300
    batch_size: int = 256
    sde_steps: int = 100
    rollout_steps: int = 50
    lr: float = 1e-3
    rollin: str = "student"
    student_fraction: float = 0.5
    control_variate: bool = True
    moment_matched: bool = True

    def __post_init__(self) -> None:
        for name in ("n_rounds", "collections_per_round", "n_states", "n_rollouts", "steps_per_collection",
                     "batch_size", "sde_steps", "rollout_steps"):
            _positive_int(getattr(self, name), name)
        _positive_float(self.alpha_total, "alpha_total")
        _positive_float(self.lr, "lr")
        if isinstance(self.student_fraction, bool) or not isinstance(self.student_fraction, (int, float)) \
                or not 0.0 <= self.student_fraction <= 1.0:
            raise FinetuneInputError(f"student_fraction must lie in [0, 1], got {self.student_fraction!r}")
        if self.rollin not in ROLLIN_MODELS:
            raise FinetuneInputError(f"unknown roll-in model {self.rollin!r}; choose one of {', '.join(ROLLIN_MODELS)}")
        if self.alphas is not None:
            if len(self.alphas) != self.n_rounds:
                raise FinetuneInputError(f"alphas has {len(self.alphas)} entries for {self.n_rounds} rounds")
            composed_alpha(self.alphas)

    def round_alphas(self) -> tuple[float, ...]:
        """alpha_k of each round: ``alphas`` if given, else :func:`tempering_alphas`."""
        return tuple(self.alphas) if self.alphas is not None else tempering_alphas(self.n_rounds, self.alpha_total)

    def score_evaluations(self, dim: int) -> int:
        """Score-network passes spent on sampling (not training), counting a backward pass as
        one: per collection, n_states roll-in trajectories of sde_steps, n_states * n_rollouts
        roll-outs of rollout_steps (1 + dim passes per step when moment-matched), and one
        teacher evaluation per state for the control variate."""
        per_step = 1 + dim if self.moment_matched else 1
        per = self.n_states * (self.sde_steps + self.n_rollouts * self.rollout_steps * per_step
                               + int(self.control_variate))
        return self.n_rounds * self.collections_per_round * per


@dataclass
class DistillationResult:
    """What :func:`iterative_distillation` returns.

    ``model``: the fine-tuned student; ``snapshots[k]``: its ``state_dict`` at the end of round
    k (load into a copy of the pretrained model to evaluate round by round); ``alphas``: alpha
    per round; ``tilts[k]`` = sum_{j<=k} 1/alpha_j, the tilt of q0 that round k targets;
    ``history``: per-step ``loss``, ``weight_ess`` (mean Kish ESS of the roll-out weights of
    the current collection, out of M) and ``value`` (mean soft value).
    """

    model: nn.Module
    snapshots: list[dict[str, Tensor]]
    alphas: tuple[float, ...]
    tilts: list[float]
    history: TrainingHistory = field(default_factory=TrainingHistory)


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def iterative_distillation(
    pretrained: nn.Module,
    reward: Reward,
    schedule: GeometricNoiseSchedule,
    dim: int,
    config: DistillationConfig,
    *,
    project: Projection | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DistillationResult:
    r"""Fine-tune a copy of ``pretrained`` (a score model ``(x, t) -> (B, dim)``) by iterative
    distillation (module docstring): roll-in, roll-out with the teacher, soft-optimal weights,
    score regression onto the tilted target, teacher refresh after each round.

    ``reward``: ``(B, dim) -> (B,)``. The final student targets q0 · exp(r / alpha_total) when
    the per-round alphas compose to alpha_total (the default schedule does). Seeded by ``seed``.
    """
    dim = _positive_int(dim, "dim")
    alphas = config.round_alphas()
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(pretrained).train()
    student.requires_grad_(True)
    frozen_pretrained = _frozen_copy(pretrained)
    teacher = _frozen_copy(pretrained)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    steps_per_round = config.collections_per_round * config.steps_per_collection
    snapshots: list[dict[str, Tensor]] = []
    tilts = [sum(1.0 / a for a in alphas[: k + 1]) for k in range(len(alphas))]
    state: dict[str, Tensor | float] = {}

    def collect(round_k: int) -> None:
        x_t, t, _ = rollin_states(config.rollin, student, frozen_pretrained, schedule, config.n_states, dim,
                                  config.sde_steps, student_fraction=config.student_fraction, project=project,
                                  generator=generator)
        n = config.n_states
        completions = rollout(teacher, schedule, x_t, t, config.rollout_steps, n_rollouts=config.n_rollouts,
                              moment_matched=config.moment_matched, project=project, generator=generator)
        with torch.no_grad():
            rewards = reward(completions.reshape(-1, dim)).reshape(n, config.n_rollouts)
            teacher_score = teacher(x_t, t) if config.control_variate else None
        target, value, ess = tilted_score_target(x_t, t, completions, rewards, alphas[round_k], schedule,
                                                 teacher_score)
        state.update(x_t=x_t, t=t, target=target, ess=float(ess.mean()), value=float(value.mean()))

    def step(k: int) -> dict[str, float]:
        nonlocal teacher
        round_k = k // steps_per_round
        if k > 0 and k % steps_per_round == 0:  # end of a round: snapshot, refresh the teacher
            snapshots.append(copy.deepcopy(student.state_dict()))
            teacher = _frozen_copy(student)
        if k % config.steps_per_collection == 0:
            collect(round_k)
        x_t, t, target = state["x_t"], state["t"], state["target"]
        assert isinstance(x_t, Tensor) and isinstance(t, Tensor) and isinstance(target, Tensor)
        idx = torch.randint(x_t.shape[0], (config.batch_size,), generator=generator)
        loss = score_regression_loss(student, x_t[idx], t[idx], target[idx], schedule)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "weight_ess": float(state["ess"]), "value": float(state["value"])}

    history = run_training(step, config.n_rounds * steps_per_round, progress=progress, desc="iterative distillation")
    snapshots.append(copy.deepcopy(student.state_dict()))
    return DistillationResult(model=student.eval(), snapshots=snapshots, alphas=alphas, tilts=tilts, history=history)

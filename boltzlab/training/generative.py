r"""Losses and training loops for VAEs, GANs and WGANs on samples of a target (chapter 01).

Losses (each a plain function of tensors, checked against independent computations in
``tests/test_training.py``):

- :func:`gaussian_kl_to_standard`  KL(N(mu, diag σ²) || N(0, I)) per latent dimension
- :func:`reparameterize`           z = mu + σ ⊙ ε, ε ~ N(0, I)
- :func:`elbo`                     the evidence lower bound of a :class:`~boltzlab.models.VAE`,
                                   split into reconstruction and KL (β-VAE: weight the KL)
- :func:`gan_discriminator_loss`, :func:`gan_generator_loss`   (non-saturating GAN)
- :func:`wgan_critic_loss`, :func:`wgan_generator_loss`, :func:`gradient_penalty` (WGAN-GP)

Loops: :func:`train_vae`, :func:`train_gan`, :func:`train_wgan`, all built on the generic
:func:`run_training` (a step function called ``n_steps`` times with a tqdm progress bar,
returning a :class:`TrainingHistory`). Every loop takes ``seed``: minibatches and noise
come from one ``torch.Generator`` seeded with it, so a run is reproducible.

Diagnostics of a trained VAE: :func:`latent_usage` (KL per latent dimension, active units).

Reference data: :func:`double_well_exact_samples` (exact samples of
:class:`~boltzlab.energies.DoubleWell2D`; it belongs on that class as ``sample`` and will
move there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab.energies import DoubleWell2D
from boltzlab.models import (
    VAE,
    Critic,
    Discriminator,
    Generator,
    ModelInputError,
    check_batch,
)

__all__ = [
    "ElboTerms",
    "LatentUsage",
    "TrainingHistory",
    "double_well_exact_samples",
    "elbo",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "gaussian_kl_to_standard",
    "gradient_penalty",
    "latent_usage",
    "minibatch",
    "reparameterize",
    "run_training",
    "train_gan",
    "train_vae",
    "train_wgan",
    "wgan_critic_loss",
    "wgan_generator_loss",
]


# ----------------------------------------------------------------------------------------
# reference data
# ----------------------------------------------------------------------------------------


def double_well_exact_samples(
    n: int,
    energy: DoubleWell2D | None = None,
    generator: torch.Generator | None = None,
    grid: int = 200_001,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Exact samples of the 2-D double well ``(n, 2)``: :meth:`DoubleWell2D.sample` of
    ``energy`` (default kT = 1), kept under this name for the chapters that call it."""
    energy = energy if energy is not None else DoubleWell2D()
    if not isinstance(energy, DoubleWell2D):
        raise TypeError(f"double_well_exact_samples samples DoubleWell2D, got {type(energy).__name__}")
    return energy.sample(n, generator=generator, dtype=dtype, grid=grid)


# ----------------------------------------------------------------------------------------
# VAE losses
# ----------------------------------------------------------------------------------------


def gaussian_kl_to_standard(mu: Tensor, log_var: Tensor) -> Tensor:
    r"""KL( N(mu, diag exp(log_var)) || N(0, I) ) per dimension, in closed form:

        KL_j = 1/2 (mu_j^2 + exp(log_var_j) - 1 - log_var_j)   >= 0.

    ``mu``, ``log_var`` of shape ``(B, z_dim)`` -> ``(B, z_dim)``; sum over the last
    dimension for the KL of the whole code.
    """
    if mu.shape != log_var.shape:
        raise ModelInputError(f"mu and log_var must have the same shape, got {tuple(mu.shape)} and {tuple(log_var.shape)}")
    return 0.5 * (mu**2 + torch.exp(log_var) - 1.0 - log_var)


def reparameterize(mu: Tensor, log_var: Tensor, eps: Tensor | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    r"""The reparameterisation trick: z = mu + exp(log_var / 2) ⊙ ε, ε ~ N(0, I).

    z is a differentiable function of (mu, log_var) for a fixed ε, so gradients of
    E_q[f(z)] flow into the encoder. ``mu``, ``log_var``, ``eps``: ``(B, z_dim)``;
    ``eps`` is drawn from ``generator`` when not given. Returns ``(B, z_dim)``.
    """
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
    if eps.shape != mu.shape:
        raise ModelInputError(f"eps has shape {tuple(eps.shape)}, expected {tuple(mu.shape)} like mu")
    return mu + torch.exp(0.5 * log_var) * eps


@dataclass(frozen=True)
class ElboTerms:
    r"""The two terms of the ELBO for a batch, in data units.

    ``reconstruction`` ``(B,)``: a one-sample estimate of E_q[log p(x | z)];
    ``kl`` ``(B, z_dim)``: KL(q(z | x) || p(z)) per latent dimension (closed form).
    ELBO = reconstruction - Σ_j kl_j  <=  log p(x).
    """

    reconstruction: Tensor
    kl: Tensor

    @property
    def elbo(self) -> Tensor:
        """ELBO per sample, ``(B,)``."""
        return self.reconstruction - self.kl.sum(-1)

    def loss(self, beta: float = 1.0) -> Tensor:
        r"""β-VAE loss, a scalar: -mean_b [reconstruction_b - β Σ_j kl_bj] (β = 1: -ELBO)."""
        return -(self.reconstruction - beta * self.kl.sum(-1)).mean()


def elbo(vae: VAE, x: Tensor, eps: Tensor | None = None, generator: torch.Generator | None = None) -> ElboTerms:
    r"""ELBO terms of a :class:`~boltzlab.models.VAE` on data ``x`` ``(B, x_dim)``:

        ELBO(x) = E_{q(z|x)}[log p(x | z)] - KL(q(z | x) || N(0, I))  <=  log p(x),

    the expectation estimated with one reparameterised z = mu + σ ⊙ ε (ε given as
    ``eps`` ``(B, z_dim)`` or drawn from ``generator``). The VAE works on u = (x - loc) /
    scale; the reconstruction term is converted to data units with the Jacobian,
    log p(x | z) = log p(u | z) - Σ log scale, so the ELBO bounds log p(x) of the data.
    """
    check_batch(x, vae.x_dim)
    u = vae.standardizer(x)
    mu, log_var = vae.encoder(u)
    z = reparameterize(mu, log_var, eps, generator)
    reconstruction = vae.decoder.log_prob(u, z) + vae.standardizer.log_det.to(x.dtype)
    return ElboTerms(reconstruction, gaussian_kl_to_standard(mu, log_var))


# ----------------------------------------------------------------------------------------
# GAN losses
# ----------------------------------------------------------------------------------------


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    r"""Discriminator loss, binary cross-entropy with real = 1 and fake = 0:

        L_D = -mean log sigmoid(D(x_real)) - mean log(1 - sigmoid(D(x_fake)))
            = mean softplus(-D(x_real)) + mean softplus(D(x_fake)).

    Logits ``(B,)`` and ``(B',)`` -> scalar. With the optimal D it equals
    2 log 2 - 2 JS(p_data || p_G).
    """
    return nn.functional.softplus(-real_logits).mean() + nn.functional.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    r"""Non-saturating generator loss, L_G = -mean log sigmoid(D(G(z))) = mean softplus(-D(G(z))).

    (The minimax form mean log(1 - sigmoid(D)) has vanishing gradients exactly when the
    discriminator wins, early in training.) Logits ``(B,)`` -> scalar.
    """
    return nn.functional.softplus(-fake_logits).mean()


def wgan_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""WGAN critic loss, mean f(x_fake) - mean f(x_real): its negative estimates W1 when
    f is 1-Lipschitz. Scores ``(B,)``, ``(B',)`` -> scalar (add :func:`gradient_penalty`)."""
    return fake_scores.mean() - real_scores.mean()


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    r"""WGAN generator loss, -mean f(G(z)). Scores ``(B,)`` -> scalar."""
    return -fake_scores.mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     t: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    r"""WGAN-GP penalty (Gulrajani et al. 2017):

        GP = mean_b ( |∇_x f(x̂_b)|_2 - 1 )^2,   x̂_b = t_b x_real,b + (1 - t_b) x_fake,b,

    with t_b ~ U(0, 1) (given as ``t`` ``(B, 1)`` or drawn from ``generator``). ``real``
    and ``fake`` are ``(B, x_dim)``. The gradient is taken with ``create_graph=True`` so
    that GP can be differentiated with respect to the critic's parameters. Returns a scalar.
    """
    if real.shape != fake.shape:
        raise ModelInputError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if t is None:
        t = torch.rand(real.shape[0], 1, generator=generator, dtype=real.dtype).to(real.device)
    if t.shape != (real.shape[0], 1):
        raise ModelInputError(f"t must have shape ({real.shape[0]}, 1), got {tuple(t.shape)}")
    x_hat = (t * real.detach() + (1 - t) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(dim=-1) - 1.0) ** 2).mean()


# ----------------------------------------------------------------------------------------
# the generic loop
# ----------------------------------------------------------------------------------------


@dataclass
class TrainingHistory:
    """What a training run recorded.

    ``values[name]``: one float per step (e.g. ``history["loss"]``);
    ``evaluations[name]``: one float per evaluation, made after the steps in ``eval_steps``
    (e.g. modes covered every 500 steps).
    """

    values: dict[str, list[float]] = field(default_factory=dict)
    eval_steps: list[int] = field(default_factory=list)
    evaluations: dict[str, list[float]] = field(default_factory=dict)

    def record(self, step_values: Mapping[str, float]) -> None:
        for name, value in step_values.items():
            self.values.setdefault(name, []).append(float(value))

    def record_evaluation(self, n_steps_done: int, results: Mapping[str, float]) -> None:
        self.eval_steps.append(int(n_steps_done))
        for name, value in results.items():
            self.evaluations.setdefault(name, []).append(float(value))

    def __getitem__(self, name: str) -> list[float]:
        if name not in self.values:
            raise KeyError(f"no values named {name!r}; recorded: {', '.join(self.values) or 'none'}")
        return self.values[name]

    def final(self, name: str, window: int = 100) -> float:
        """Mean of the last ``window`` values of ``name`` (a less noisy final value)."""
        v = self[name][-window:]
        return float(sum(v) / len(v))


Evaluation = Callable[[], Mapping[str, float]]


def run_training(step: Callable[[int], Mapping[str, float]], n_steps: int, progress: bool = True,
                 desc: str = "training", evaluate: Evaluation | None = None, eval_every: int = 0,
                 postfix_every: int = 50) -> TrainingHistory:
    """Call ``step(k)`` for k = 0 .. n_steps - 1 and record the scalars it returns.

    With ``evaluate`` and ``eval_every = m > 0``, ``evaluate()`` runs (under
    ``torch.no_grad``) after every m-th step and after the last; its results go to
    ``history.evaluations``. Shows a tqdm progress bar (``progress=False`` hides it) with
    the latest values. Stops with a ValueError naming the step and the quantity if a value
    is NaN or infinite (a diverged run should fail loudly, not train on garbage).
    """
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative integer, got {n_steps!r}")
    if evaluate is not None and eval_every < 1:
        raise ValueError(f"evaluate needs eval_every >= 1, got {eval_every}")
    history = TrainingHistory()
    bar = tqdm(range(n_steps), desc=desc, disable=not progress, leave=False)
    for k in bar:
        values = {name: float(v) for name, v in step(k).items()}
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{desc}: {', '.join(bad)} became non-finite at step {k}; lower the learning rate")
        history.record(values)
        if evaluate is not None and ((k + 1) % eval_every == 0 or k + 1 == n_steps):
            with torch.no_grad():
                history.record_evaluation(k + 1, evaluate())
        if progress and k % postfix_every == 0:
            bar.set_postfix({name: f"{v:.3g}" for name, v in values.items()})
    bar.close()
    return history


def minibatch(data: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` rows of ``data`` ``(N, dim)`` drawn uniformly with replacement."""
    idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
    return data[idx.to(data.device)]


def _check_training_data(data: Tensor, dim: int, batch_size: int) -> Tensor:
    check_batch(data, dim, "data")
    if data.shape[0] < 2:
        raise ValueError(f"need at least 2 training samples, got {data.shape[0]}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("training data contain NaN or infinite values")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return data


# ----------------------------------------------------------------------------------------
# VAE training
# ----------------------------------------------------------------------------------------

VaeLoss = Callable[[VAE, Tensor, torch.Generator], Tensor]


def train_vae(
    vae: VAE,
    data: Tensor,
    n_steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    beta: float | Callable[[int], float] = 1.0,
    seed: int = 0,
    progress: bool = True,
    loss_fn: VaeLoss | None = None,
    evaluate: Evaluation | None = None,
    eval_every: int = 0,
) -> TrainingHistory:
    r"""Train ``vae`` on ``data`` ``(N, x_dim)`` with Adam on the β-VAE loss

        L = -mean_b [ E_q log p(x_b | z) - β KL(q(z | x_b) || p(z)) ],

    β a number or a schedule ``beta(step)`` (e.g. a KL warm-up). Records ``loss``,
    ``reconstruction``, ``kl`` (summed over latents, batch means) and ``elbo``.
    ``loss_fn(vae, batch, generator) -> scalar`` replaces the loss (e.g. a learner's ELBO);
    then only ``loss`` is recorded. ``evaluate`` and ``eval_every``: see :func:`run_training`.
    """
    _check_training_data(data, vae.x_dim, batch_size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()

    def step(k: int) -> dict[str, float]:
        batch = minibatch(data, batch_size, g)
        if loss_fn is not None:
            loss = loss_fn(vae, batch, g)
            record = {"loss": loss.detach()}
        else:
            terms = elbo(vae, batch, generator=g)
            b = beta(k) if callable(beta) else beta
            loss = terms.loss(b)
            record = {"loss": loss.detach(), "reconstruction": terms.reconstruction.detach().mean(),
                      "kl": terms.kl.detach().sum(-1).mean(), "elbo": terms.elbo.detach().mean()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return record

    history = run_training(step, n_steps, progress, "VAE", evaluate, eval_every)
    vae.eval()
    return history


@dataclass(frozen=True)
class LatentUsage:
    r"""How much a VAE uses each latent dimension, averaged over data.

    ``kl_per_dim`` ``(z_dim,)``: mean over x of KL(q(z_j | x) || N(0, 1)) in nats;
    ``activity`` ``(z_dim,)``: A_j = Var_x( E_q[z_j | x] ) (Burda et al. 2016);
    ``active_units``: how many A_j exceed ``threshold`` (0.01 by convention).
    Collapsed dimensions have KL ≈ 0 and A ≈ 0: q(z_j | x) = p(z_j) whatever x is.
    """

    kl_per_dim: Tensor
    activity: Tensor
    active_units: int
    threshold: float

    @property
    def kl_total(self) -> float:
        return float(self.kl_per_dim.sum())


@torch.no_grad()
def latent_usage(vae: VAE, x: Tensor, threshold: float = 0.01) -> LatentUsage:
    """KL per latent dimension and active units of ``vae`` on data ``x`` ``(N, x_dim)``, N >= 2."""
    check_batch(x, vae.x_dim)
    if x.shape[0] < 2:
        raise ValueError("latent_usage needs at least 2 samples (it measures a variance over x)")
    mu, log_var = vae.encode(x)
    kl = gaussian_kl_to_standard(mu, log_var).mean(0)
    activity = mu.var(0)
    return LatentUsage(kl.cpu(), activity.cpu(), int((activity > threshold).sum()), threshold)


# ----------------------------------------------------------------------------------------
# GAN and WGAN training
# ----------------------------------------------------------------------------------------


def train_gan(
    generator: Generator,
    discriminator: Discriminator,
    data: Tensor,
    n_steps: int,
    batch_size: int = 256,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    progress: bool = True,
    evaluate: Evaluation | None = None,
    eval_every: int = 0,
) -> TrainingHistory:
    r"""Non-saturating GAN: per step one Adam step of the discriminator on
    :func:`gan_discriminator_loss`, then one of the generator on :func:`gan_generator_loss`.
    ``data`` ``(N, x_dim)``. Records ``d_loss``, ``g_loss`` and ``d_real`` (mean
    sigmoid(D(x_real)), 0.5 when the discriminator cannot tell). ``evaluate`` and
    ``eval_every``: see :func:`run_training`.
    """
    _check_training_data(data, generator.x_dim, batch_size)
    g = torch.Generator().manual_seed(seed)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)

    def step(k: int) -> dict[str, float]:
        real = minibatch(data, batch_size, g)
        with torch.no_grad():
            fake = generator.sample(batch_size, g)
        real_logits = discriminator(real)
        d_loss = gan_discriminator_loss(real_logits, discriminator(fake))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = gan_generator_loss(discriminator(generator.sample(batch_size, g)))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "d_real": torch.sigmoid(real_logits.detach()).mean()}

    return run_training(step, n_steps, progress, "GAN", evaluate, eval_every)


PenaltyFn = Callable[[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor], Tensor]


def train_wgan(
    generator: Generator,
    critic: Critic,
    data: Tensor,
    n_steps: int,
    batch_size: int = 256,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.0, 0.9),
    n_critic: int = 5,
    gp_weight: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    penalty_fn: PenaltyFn = gradient_penalty,
    evaluate: Evaluation | None = None,
    eval_every: int = 0,
) -> TrainingHistory:
    r"""WGAN-GP: per generator step, ``n_critic`` Adam steps of the critic on

        L_f = mean f(x_fake) - mean f(x_real) + λ GP,   λ = ``gp_weight``,

    then one generator step on -mean f(G(z)). ``penalty_fn(critic, real, fake, t)`` computes
    GP at the interpolates t real + (1 - t) fake, t ``(B, 1)`` drawn here (default
    :func:`gradient_penalty`; a learner's version plugs in). Records ``w1`` (the critic's
    estimate mean f(real) - mean f(fake) of W1), ``gp`` and ``g_loss``. ``evaluate`` and
    ``eval_every``: see :func:`run_training`.
    """
    _check_training_data(data, generator.x_dim, batch_size)
    if not isinstance(n_critic, int) or n_critic < 1:
        raise ValueError(f"n_critic must be a positive integer, got {n_critic!r}")
    g = torch.Generator().manual_seed(seed)
    opt_f = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)

    def step(k: int) -> dict[str, float]:
        for _ in range(n_critic):
            real = minibatch(data, batch_size, g)
            with torch.no_grad():
                fake = generator.sample(batch_size, g)
            critic_loss = wgan_critic_loss(critic(real), critic(fake))
            t = torch.rand(batch_size, 1, generator=g).to(real)
            gp = penalty_fn(critic, real, fake, t)
            opt_f.zero_grad(set_to_none=True)
            (critic_loss + gp_weight * gp).backward()
            opt_f.step()
        g_loss = wgan_generator_loss(critic(generator.sample(batch_size, g)))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"w1": -critic_loss.detach(), "gp": gp.detach(), "g_loss": g_loss.detach()}

    return run_training(step, n_steps, progress, "WGAN", evaluate, eval_every)

"""Training loops of the course.

- :mod:`boltzlab.training.generative`  VAE, GAN and WGAN on samples (chapter 01), and the
  generic :func:`run_training` loop with its :class:`TrainingHistory` that every loop shares
- :mod:`boltzlab.training.idem`        iDEM and pDEM from the energy alone (chapter 05): dataclass
  configs per target, resumable checkpoints, an energy-evaluation counter, and
  DistributedDataParallel under ``torchrun`` (``python -m boltzlab train ...``)
"""

from boltzlab.training.generative import (
    ElboTerms,
    Evaluation,
    LatentUsage,
    TrainingHistory,
    double_well_exact_samples,
    elbo,
    gan_discriminator_loss,
    gan_generator_loss,
    gaussian_kl_to_standard,
    gradient_penalty,
    latent_usage,
    minibatch,
    reparameterize,
    run_training,
    train_gan,
    train_vae,
    train_wgan,
    wgan_critic_loss,
    wgan_generator_loss,
)

__all__ = [
    "ElboTerms",
    "Evaluation",
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

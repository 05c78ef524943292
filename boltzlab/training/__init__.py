"""Training loops of the course.

- :mod:`boltzlab.training.generative`  VAE, GAN and WGAN on samples (chapter 01), and the
  generic :func:`run_training` loop with its :class:`TrainingHistory` that every loop shares
- :mod:`boltzlab.training.idem`        iDEM, pDEM and NEM from the energy alone (chapter 06): the
  regression targets, the two loops, the evaluations and an energy-evaluation counter;
  beside it :mod:`~boltzlab.training.idem_config` (dataclass configs, the course and paper
  presets), :mod:`~boltzlab.training.sampler` (the score network and its reverse SDE),
  :mod:`~boltzlab.training.checkpoints` (training state, resume, warm start, loading a
  sampler), :mod:`~boltzlab.training.parallel` (DistributedDataParallel ranks),
  :mod:`~boltzlab.training.compiled` (torch.compile with a fallback, bfloat16 products),
  :mod:`~boltzlab.training.profile` (time per phase), :mod:`~boltzlab.training.mcmc_baseline`
  (MCMC at an equal energy budget) and :mod:`~boltzlab.training.cli`
  (``python -m boltzlab train ...``)
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

r"""Small neural networks for generative models of configurations (chapter 01 onwards).

Every model maps tensors of shape ``(B, dim)`` (a batch of configurations or latent codes)
and is built from :class:`MLP`. Models that see data hold a :class:`Standardizer` so that
their inputs and outputs are in the data's own units while the network works on values
of order one (GMM-40 spans about ±40; an MLP on raw coordinates trains badly).

==============================  ===========================================================
:class:`MLP`                    a plain multilayer perceptron ``(B, in) -> (B, out)``
:class:`Standardizer`           u = (x - loc) / scale and back, with its log-Jacobian
:class:`GaussianEncoder`        q(z | x) = N(mu(x), diag exp(log_var(x)))
:class:`GaussianDecoder`        p(x | z) = N(mean(z), diag sigma^2), sigma learned globally
:class:`AutoregressiveMixtureDecoder`
                                p(x | z) = prod_i sum_k pi_k N(x_i; m_k, s_k^2), each
                                conditional given (z, x_<i): strong enough to model p(x)
                                without z (posterior collapse)
:class:`VAE`                    encoder + decoder + prior N(0, I) + standardizer
:class:`Generator`              GAN generator x = G(z), z ~ N(0, I)
:class:`Discriminator`          GAN discriminator: logits D(x) (probability sigmoid(D(x)))
:class:`Critic`                 WGAN critic: an unbounded score f(x)
:class:`SinusoidalTimeEmbedding`
                                sin/cos features of a diffusion time t in [0, 1]
:class:`ScoreMLP`               time-conditioned score s(x, t) ``(B, dim), (B,) -> (B, dim)``
:class:`EnergyMLP`              time-conditioned energy E(x, t) ``-> (B,)``
:class:`EnergyScore`            s = -∇_x E(x, t) / kT, differentiable for training (NEM)
:class:`EGNNLayer`              one E(n)-equivariant message-passing layer on all pairs
:class:`EGNN`                   E(n) x S_n-equivariant, COM-free score network for particles
==============================  ===========================================================

Every constructor that creates weights takes ``seed``: when given, they are drawn from
``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so two models built
with the same seed are identical and the global random state is left untouched.
Losses and training loops are in :mod:`boltzlab.training`.
"""

from boltzlab.models.blocks import MLP, ModelInputError, Standardizer, check_batch
from boltzlab.models.egnn import EGNN, EGNNLayer
from boltzlab.models.gan import Critic, Discriminator, Generator
from boltzlab.models.score import (
    EnergyMLP,
    EnergyScore,
    ScoreMLP,
    SinusoidalTimeEmbedding,
)
from boltzlab.models.vae import (
    VAE,
    AutoregressiveMixtureDecoder,
    GaussianDecoder,
    GaussianEncoder,
)

__all__ = [
    "ModelInputError",
    "check_batch",
    "MLP",
    "Standardizer",
    "GaussianEncoder",
    "GaussianDecoder",
    "AutoregressiveMixtureDecoder",
    "VAE",
    "Generator",
    "Discriminator",
    "Critic",
    "EGNN",
    "EGNNLayer",
    "EnergyMLP",
    "EnergyScore",
    "ScoreMLP",
    "SinusoidalTimeEmbedding",
]

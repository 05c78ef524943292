"""Budgets: how much work a notebook or command does.

``BOLTZLAB_BUDGET`` selects one of

- ``smoke``  : CI; every notebook in seconds to about a minute on 2 CPU cores,
- ``laptop`` : the default; each chapter in a few minutes on a laptop CPU,
- ``full``   : paper scale, meant for a GPU.

Notebooks never hard-code their sizes: they call :func:`sizes` with their chapter key
and read the fields of the dataclass it returns, e.g.::

    from boltzlab.config import sizes
    S = sizes("00")          # Chapter00Sizes for the current budget
    run_mcmc(..., n_steps=S.tunnelling_steps)

Each chapter's sizes are a frozen dataclass declared below with one instance per budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

BUDGETS: tuple[str, ...] = ("smoke", "laptop", "full")
DEFAULT_BUDGET = "laptop"
ENV_VAR = "BOLTZLAB_BUDGET"


class UnknownBudgetError(ValueError):
    """Raised when ``BOLTZLAB_BUDGET`` (or an argument) names no known budget."""


def check_budget(name: str) -> str:
    """Return ``name`` normalised, or raise :class:`UnknownBudgetError` listing the valid ones."""
    norm = name.strip().lower()
    if norm not in BUDGETS:
        raise UnknownBudgetError(
            f"unknown budget {name!r}: valid budgets are {', '.join(BUDGETS)} "
            f"(set {ENV_VAR} to one of them, or unset it for {DEFAULT_BUDGET!r})"
        )
    return norm


def budget() -> str:
    """The current budget: ``BOLTZLAB_BUDGET`` if set and non-empty, else ``'laptop'``."""
    value = os.environ.get(ENV_VAR, "")
    return check_budget(value) if value.strip() else DEFAULT_BUDGET


# --------------------------------------------------------------------------------------
# Threads: every chapter calls set_torch_threads() in its set-up cell.
# --------------------------------------------------------------------------------------

THREADS_ENV_VAR = "BOLTZLAB_THREADS"
DEFAULT_TORCH_THREADS = 1
"""One thread: the chapters' work is many small tensor operations, where on laptop CPUs more
threads cost more in synchronisation than they gain (measured 10-20x faster with one thread
for compiled kernels with reductions, see the toolchain notes), and CI runs two notebooks
at once on two cores."""


def torch_threads() -> int:
    """The torch thread count for notebooks: ``BOLTZLAB_THREADS`` if set, else one."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not value:
        return DEFAULT_TORCH_THREADS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV_VAR} must be a positive integer, got {value!r}")
    return n


def set_torch_threads() -> int:
    """Set torch's intra-op thread count to :func:`torch_threads` and return it (the one place
    where the chapters choose it)."""
    import torch

    n = torch_threads()
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------
# Per-chapter sizes. Add a dataclass and a triple to _REGISTRY for each chapter.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chapter00Sizes:
    """Chapter 00: Boltzmann distributions and MCMC."""

    landscape_grid: int  # grid points per axis for 2-D density plots
    tunnelling_chains: int  # independent chains for the tunnelling-time measurement
    tunnelling_steps: int  # steps per chain (Metropolis and parallel tempering alike)
    pt_temperatures: int  # replicas in parallel tempering
    metric_samples: int  # samples used to demonstrate the metrics
    reference_samples: int  # samples drawn from the shipped reference sets for plots


@dataclass(frozen=True)
class Chapter01Sizes:
    """Chapter 01: VAE and GAN basics on configurations."""

    n_train: int  # exact reference samples each model is trained on
    n_eval: int  # samples drawn from each model (and fresh exact samples) for the metrics
    batch_size: int  # minibatch size of every training loop
    hidden: int  # width of the two hidden layers of every network
    vae_steps: int  # Adam steps of each VAE (double well and GMM-40)
    gan_steps: int  # generator steps of each non-saturating GAN
    wgan_steps: int  # generator steps of each WGAN-GP (each with n_critic critic steps)
    collapse_steps: int  # steps of the VAE with the autoregressive (too strong) decoder
    beta_steps: int  # steps of each beta-VAE in the beta sweep
    eval_every: int  # steps between mode-coverage evaluations during GMM-40 training
    exercise_steps: int  # steps of the short runs in the exercise notebook
    reweight_samples: int = 20_000  # (x, z) pairs drawn from the double-well VAE for the joint reweighting
    kde_n_max: int = 20_000  # largest number of samples behind a kernel density estimate (sample complexity)
    kde_queries: int = 500  # held-out points at which each KDE's log-density error is measured
    kde_repeats: int = 3  # independent sample sets averaged per (dimension, n)
    manifold_samples: int = 3_000  # reference configurations (DW-4, LJ-13) and toy samples for PCA and TwoNN


@dataclass(frozen=True)
class Chapter02Sizes:
    """Chapter 02: normalizing flows trained by maximum likelihood."""

    n_train: int  # exact samples each flow is trained on (double well and GMM-40)
    n_test: int  # held-out exact samples for the test NLL
    n_eval: int  # samples drawn from each trained flow for mass per well and mode coverage
    batch_size: int  # minibatch size
    hidden: int  # width of the coupling layers' networks
    dw_steps: int  # Adam steps of each flow on the double well
    gmm_steps: int  # Adam steps of each flow on GMM-40
    grid: int  # cells per axis of the grids that plot and integrate densities
    widget_grid: int  # cells per axis of each frame of the coupling-layer widget
    bg_fresh: int  # fresh samples (with their ODE likelihood) drawn from the shipped DW-4 flow


@dataclass(frozen=True)
class Chapter03Sizes:
    """Chapter 03: reverse KL, free energy, mode collapse and its cures."""

    batch_size: int  # flow samples per reverse-KL step (and data per maximum-likelihood step)
    hidden: int  # width of the coupling layers' networks
    dw_steps: int  # reverse-KL steps on the double well
    eval_every: int  # steps between evaluations of the loss against -log Z + KL (double well)
    eval_batch: int  # flow samples per Monte Carlo evaluation of the loss
    anneal_first_steps: int  # reverse-KL steps at the hottest rung of the annealing curriculum
    anneal_stage_steps: int  # maximum-likelihood steps on each colder rung
    pool_size: int  # flow samples reweighted to each rung
    gmm_steps: int  # steps of reverse KL and of ML+KL on GMM-40
    ml_samples: int  # exact GMM-40 samples for the maximum-likelihood term of ML+KL
    n_eval: int  # flow samples for ESS, free energies and mode coverage (at least 1000)
    grid: int  # cells per axis of the quadrature grids (KL(q||p), densities)


@dataclass(frozen=True)
class Chapter04Sizes:
    """Chapter 04: diffusion models from data (denoising score matching on samples)."""

    n_train: int  # exact GMM-40 samples the score network is trained on
    hidden: int  # width of the GMM-40 score network's hidden layers
    gmm_steps: int  # denoising-score-matching Adam steps on GMM-40
    batch_size: int  # minibatch size of both training loops
    n_check: int  # (x_0, t, eps) draws for the DSM = explicit score matching + constant check
    sigmas: tuple[float, ...]  # noise levels where the learned score is compared with the exact one
    n_score_points: int  # exact samples of p_sigma per noise level for that comparison
    n_eval: int  # samples per sampler (and exact samples) for energy W2 and mode coverage
    step_counts: tuple[int, ...]  # reverse-SDE / probability-flow step counts in the sweep
    n_likelihood: int  # exact samples whose probability-flow log-likelihood is computed
    likelihood_steps: tuple[int, ...]  # Heun steps of that likelihood (sweep)
    dw4_steps: int  # denoising-score-matching steps of the DW-4 EGNN
    dw4_hidden: int  # width of the EGNN
    dw4_eval: int  # reverse-SDE samples of DW-4 (and held-out reference samples) for the metrics
    dw4_sde_steps: int  # reverse-SDE steps for DW-4
    widget_grid: int  # cells per axis of the widget's density image


@dataclass(frozen=True)
class Chapter05Sizes:
    """Chapter 05: DEM score estimation."""

    n_points: int  # noisy GMM-40 points at which bias and variance are measured
    n_repeats: int  # independent estimates per point (for bias and variance)
    k_values: tuple[int, ...]  # numbers of copies K in the sweep over K
    sigmas: tuple[float, ...]  # noise levels sigma_t in the sweep over t
    dims: tuple[int, ...]  # dimensions of the cosine-similarity sweep (up to at least 1000)
    dim_points: int  # points per dimension in that sweep
    dim_k: int  # copies K in that sweep
    lj_points: int  # LJ-13 / LJ-55 configurations for the overflow and clipping demos
    lj_k: int  # copies per configuration there
    widget_grid: int  # arrows per axis of the widget's score field


@dataclass(frozen=True)
class Chapter06Sizes:
    """Chapter 06: iDEM on GMM-40, DW-4, LJ-13 and LJ-55 (shipped checkpoints + a short demo run)."""

    demo_outer: int  # outer iterations (buffer refills) of the GMM-40 demonstration run
    demo_inner: int  # regression steps per outer iteration there
    demo_batch: int  # buffer states per regression step there
    demo_n_mc: int  # Monte Carlo copies K per score target there
    demo_refill: int  # reverse-SDE samples added to the buffer per outer iteration there
    demo_sde_steps: int  # Euler-Maruyama steps of each reverse-SDE run there
    demo_eval: int  # samples per evaluation of the demonstration run
    fresh_samples: int  # fresh samples drawn from each loaded model as a live check (LJ-55: a quarter)
    fresh_sde_steps: int  # at most this many reverse-SDE steps for those samples
    yardstick_draws: int  # random 2000-configuration draws of the LJ-13 reference, to show its own noise
    spread_seeds: int  # extra seeds of the shipped DW-4 sampler's evaluation (the spread of one evaluation)
    spread_samples: int  # samples per extra seed there
    equivariance_batch: int  # LJ-13 configurations on which the EGNN's symmetries are measured
    estimator_points: int  # noised DW-4 points at which the regression targets' errors are measured
    estimator_repeats: int  # independent K-copy targets per point there
    estimator_ref_k: int  # copies of the high-K reference target there
    floor_samples: int  # samples per set in the x-W2 saturation demonstration
    corrector_steps: int  # MALA steps of the corrector line (reported apart from plain iDEM)
    widget_samples: int  # GMM-40 samples followed along the reverse SDE in the widget
    widget_sde_steps: int  # reverse-SDE steps of that trajectory
    retrain: bool  # retrain every target with its shipped config and rerun equal-budget MCMC
    hybrid_samples: int  # DW-4 samples per switch level where the Monte Carlo score replaces the network
    hybrid_sde_steps: int  # reverse-SDE steps of those samples
    from_data_samples: int  # LJ-13 reference configurations noised and brought back per noise level
    from_data_steps: int  # reverse-SDE steps per unit of t there (the shipped sampler: 1000)


@dataclass(frozen=True)
class Chapter07Sizes:
    """Chapter 07: importance sampling."""

    n_train: int  # exact samples each maximum-likelihood flow is trained on
    batch_size: int  # minibatch size of every flow training loop
    hidden: int  # width of the coupling layers' networks
    gmm_steps: int  # Adam steps of each GMM-40 flow (all modes, and the collapsed one)
    dw_steps: int  # Adam steps of the double-well flow
    block_first_steps: int  # reverse-KL steps at the hottest rung of the many-well block flow
    block_stage_steps: int  # reweighted maximum-likelihood steps on each colder rung
    pool_size: int  # flow samples reweighted to each rung
    n_eval: int  # proposal samples behind every estimate (at least 1000)
    n_boot: int  # bootstrap replicates
    n_repeats: int  # independent batches in the FEP-versus-BAR comparison
    repeat_size: int  # samples of each state per batch there
    small_draws: int  # 16-sample draws in the ESS pitfall plot
    widget_draws: int  # draws per sample size in the widget
    score_steps: int  # denoising-score-matching steps of the DW-4 score network
    score_hidden: int  # width of its EGNN
    n_diffusion: int  # probability-flow samples that are reweighted
    ode_steps: int  # Heun steps of the probability-flow ODE (sampling and likelihood)
    n_probes: int  # Hutchinson probes per divergence evaluation
    n_exact_check: int  # samples on which Hutchinson is compared with the exact divergence
    n_lj13: int  # probability-flow samples of chapter 06's shipped LJ-13 iDEM sampler
    lj13_ode_steps: int  # Heun steps for those samples and their likelihoods
    n_flow_ref_dw4: int  # held-out DW-4 reference samples whose log q the particle flow computes (reverse FEP, BAR)
    n_flow_ref_lj13: int  # the same for LJ-13 (each costs 36 backward passes per field evaluation)


@dataclass(frozen=True)
class Chapter08Sizes:
    """Chapter 08: reward-guided fine-tuning by iterative distillation."""

    n_data: int  # exact samples at kT0 the model is pretrained on
    hidden: int  # width of the score network's hidden layers
    pretrain_steps: int  # denoising-score-matching steps of pretraining
    pretrain_batch: int  # minibatch size of pretraining
    sde_steps: int  # reverse-SDE steps of every sampler (roll-in, pools, evaluation samples)
    n_rounds: int  # rounds (teacher refreshes) of iterative distillation
    collections_per_round: int  # roll-in/roll-out collections per round
    n_states: int  # roll-in states per collection
    n_rollouts: int  # teacher completions per roll-in state (M)
    rollout_steps: int  # steps of each roll-out
    steps_per_collection: int  # Adam steps on the (state, target) pairs of one collection
    rwr_pool: int  # pretrained samples reweighted by reward-weighted regression
    rwr_steps: int  # denoising-score-matching steps of each reward-weighted regression
    rwr_alphas: tuple[float, ...]  # alphas of the reward-weighted regressions
    bon_ns: tuple[int, ...]  # N of the sampled best-of-N runs
    n_eval: int  # reverse-SDE samples per model for energy W2 and well probabilities
    n_ess: int  # probability-flow samples per model for the Kish ESS (at least 1000)
    grid: int  # cells per axis of the quadrature grid (densities, KL)
    ode_steps: int  # Heun steps of the probability-flow ODE (sampling and likelihood)
    gauss_samples: int  # Gaussian samples for the Monte Carlo check of the closed-form ESS


@dataclass(frozen=True)
class AppendixSizes:
    """Appendix A: the GPU kernels (live benchmark table)."""

    lj13_batch: int
    lj13_k: int
    lj55_batch: int
    lj55_k: int
    repeats: int
    include_autograd_baseline: bool


_REGISTRY: dict[str, dict[str, Any]] = {
    "00": {
        "smoke": Chapter00Sizes(60, 64, 2_000, 6, 500, 1_000),
        "laptop": Chapter00Sizes(200, 256, 20_000, 8, 2_000, 10_000),
        "full": Chapter00Sizes(300, 1_024, 100_000, 12, 10_000, 10_000),
    },
    "01": {
        "smoke": Chapter01Sizes(4_000, 2_000, 256, 32, 300, 300, 100, 300, 150, 100, 60, reweight_samples=4_000,
                                kde_n_max=3_000, kde_queries=200, kde_repeats=1, manifold_samples=1_000),
        "laptop": Chapter01Sizes(20_000, 5_000, 256, 64, 4_000, 4_000, 2_500, 2_000, 2_000, 500, 400,
                                 reweight_samples=20_000, kde_n_max=20_000, kde_queries=500, kde_repeats=3,
                                 manifold_samples=3_000),
        "full": Chapter01Sizes(100_000, 20_000, 512, 128, 30_000, 30_000, 20_000, 10_000, 10_000, 2_000, 2_000,
                               reweight_samples=100_000, kde_n_max=100_000, kde_queries=2_000, kde_repeats=5,
                               manifold_samples=10_000),
    },
    "02": {
        "smoke": Chapter02Sizes(n_train=2_000, n_test=2_000, n_eval=4_000, batch_size=128, hidden=32,
                                dw_steps=150, gmm_steps=200, grid=120, widget_grid=80, bg_fresh=100),
        "laptop": Chapter02Sizes(n_train=20_000, n_test=20_000, n_eval=50_000, batch_size=256, hidden=64,
                                 dw_steps=1_500, gmm_steps=2_000, grid=300, widget_grid=150, bg_fresh=2_000),
        "full": Chapter02Sizes(n_train=100_000, n_test=100_000, n_eval=200_000, batch_size=512, hidden=128,
                               dw_steps=5_000, gmm_steps=10_000, grid=400, widget_grid=200, bg_fresh=10_000),
    },
    "03": {
        "smoke": Chapter03Sizes(batch_size=128, hidden=32, dw_steps=150, eval_every=25, eval_batch=4_000,
                                anneal_first_steps=100, anneal_stage_steps=40, pool_size=2_000, gmm_steps=150,
                                ml_samples=1_000, n_eval=4_000, grid=120),
        "laptop": Chapter03Sizes(batch_size=256, hidden=64, dw_steps=1_500, eval_every=100, eval_batch=50_000,
                                 anneal_first_steps=600, anneal_stage_steps=200, pool_size=20_000, gmm_steps=1_500,
                                 ml_samples=2_000, n_eval=200_000, grid=250),
        "full": Chapter03Sizes(batch_size=512, hidden=128, dw_steps=5_000, eval_every=250, eval_batch=200_000,
                               anneal_first_steps=2_000, anneal_stage_steps=500, pool_size=50_000, gmm_steps=5_000,
                               ml_samples=10_000, n_eval=1_000_000, grid=400),
    },
    "04": {
        "smoke": Chapter04Sizes(n_train=5_000, hidden=64, gmm_steps=1_500, batch_size=256, n_check=4_000,
                                sigmas=(0.1, 1.0, 10.0), n_score_points=1_000, n_eval=1_000, step_counts=(20, 100),
                                n_likelihood=64, likelihood_steps=(10, 40), dw4_steps=300, dw4_hidden=16,
                                dw4_eval=500, dw4_sde_steps=50, widget_grid=60),
        "laptop": Chapter04Sizes(n_train=50_000, hidden=128, gmm_steps=12_000, batch_size=512, n_check=50_000,
                                 sigmas=(0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), n_score_points=5_000, n_eval=5_000,
                                 step_counts=(25, 50, 100, 200, 400), n_likelihood=1_000, likelihood_steps=(25, 50, 100),
                                 dw4_steps=2_500, dw4_hidden=32, dw4_eval=2_000, dw4_sde_steps=200, widget_grid=100),
        "full": Chapter04Sizes(n_train=200_000, hidden=256, gmm_steps=50_000, batch_size=1_024, n_check=200_000,
                               sigmas=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 70.0), n_score_points=20_000,
                               n_eval=20_000, step_counts=(25, 50, 100, 200, 400, 800), n_likelihood=5_000,
                               likelihood_steps=(25, 50, 100, 200), dw4_steps=20_000, dw4_hidden=64,
                               dw4_eval=5_000, dw4_sde_steps=400, widget_grid=120),
    },
    "05": {
        "smoke": Chapter05Sizes(n_points=16, n_repeats=24, k_values=(2, 8, 32, 128), sigmas=(0.3, 1.0, 3.0, 10.0),
                                dims=(2, 10, 100, 1000), dim_points=16, dim_k=128, lj_points=16, lj_k=32,
                                widget_grid=9),
        "laptop": Chapter05Sizes(n_points=64, n_repeats=64, k_values=(2, 4, 8, 16, 32, 64, 128, 256, 512),
                                 sigmas=(0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0),
                                 dims=(2, 5, 10, 30, 100, 300, 1000, 3000), dim_points=64, dim_k=512,
                                 lj_points=64, lj_k=128, widget_grid=15),
        "full": Chapter05Sizes(n_points=256, n_repeats=256, k_values=(2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                               sigmas=(0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0),
                               dims=(2, 5, 10, 30, 100, 300, 1000, 3000, 10000), dim_points=256, dim_k=2048,
                               lj_points=256, lj_k=512, widget_grid=21),
    },
    "06": {
        "smoke": Chapter06Sizes(demo_outer=3, demo_inner=15, demo_batch=128, demo_n_mc=128, demo_refill=256,
                                demo_sde_steps=50, demo_eval=400, fresh_samples=16, fresh_sde_steps=20,
                                yardstick_draws=3, spread_seeds=2, spread_samples=200,
                                equivariance_batch=4, estimator_points=16, estimator_repeats=4,
                                estimator_ref_k=20_000, floor_samples=500, corrector_steps=20, widget_samples=400,
                                widget_sde_steps=200, retrain=False, hybrid_samples=64, hybrid_sde_steps=50,
                                from_data_samples=64, from_data_steps=100),
        "laptop": Chapter06Sizes(demo_outer=10, demo_inner=40, demo_batch=128, demo_n_mc=128, demo_refill=500,
                                 demo_sde_steps=100, demo_eval=1_000, fresh_samples=64, fresh_sde_steps=100,
                                 yardstick_draws=10, spread_seeds=3, spread_samples=2_000,
                                 equivariance_batch=16, estimator_points=32, estimator_repeats=8,
                                 estimator_ref_k=20_000, floor_samples=1_000, corrector_steps=100,
                                 widget_samples=1_000, widget_sde_steps=200, retrain=False, hybrid_samples=1_000,
                                 hybrid_sde_steps=100, from_data_samples=500, from_data_steps=400),
        "full": Chapter06Sizes(demo_outer=40, demo_inner=100, demo_batch=256, demo_n_mc=256, demo_refill=1_000,
                               demo_sde_steps=200, demo_eval=1_000, fresh_samples=1_000, fresh_sde_steps=200,
                               yardstick_draws=10, spread_seeds=5, spread_samples=2_000,
                               equivariance_batch=64, estimator_points=128, estimator_repeats=16,
                               estimator_ref_k=100_000, floor_samples=2_000, corrector_steps=200,
                               widget_samples=2_000, widget_sde_steps=200, retrain=True, hybrid_samples=2_000,
                               hybrid_sde_steps=200, from_data_samples=1_000, from_data_steps=1_000),
    },
    "07": {
        "smoke": Chapter07Sizes(n_train=2_000, batch_size=128, hidden=32, gmm_steps=150, dw_steps=150,
                                block_first_steps=100, block_stage_steps=40, pool_size=2_000, n_eval=4_000, n_boot=200,
                                n_repeats=10, repeat_size=500, small_draws=500, widget_draws=200, score_steps=40,
                                score_hidden=16, n_diffusion=128, ode_steps=10, n_probes=1, n_exact_check=8,
                                n_lj13=32, lj13_ode_steps=8, n_flow_ref_dw4=100, n_flow_ref_lj13=8),
        "laptop": Chapter07Sizes(n_train=20_000, batch_size=256, hidden=64, gmm_steps=2_000, dw_steps=1_500,
                                 block_first_steps=600, block_stage_steps=200, pool_size=20_000, n_eval=50_000,
                                 n_boot=1_000, n_repeats=40, repeat_size=2_000, small_draws=2_000, widget_draws=500,
                                 score_steps=1_000, score_hidden=32, n_diffusion=2_000, ode_steps=50, n_probes=2,
                                 n_exact_check=64, n_lj13=1_000, lj13_ode_steps=40,
                                 n_flow_ref_dw4=2_000, n_flow_ref_lj13=200),
        "full": Chapter07Sizes(n_train=100_000, batch_size=512, hidden=128, gmm_steps=10_000, dw_steps=5_000,
                               block_first_steps=2_000, block_stage_steps=500, pool_size=50_000, n_eval=500_000,
                               n_boot=2_000, n_repeats=100, repeat_size=10_000, small_draws=10_000, widget_draws=2_000,
                               score_steps=10_000, score_hidden=64, n_diffusion=10_000, ode_steps=100, n_probes=4,
                               n_exact_check=256, n_lj13=5_000, lj13_ode_steps=100,
                               n_flow_ref_dw4=5_000, n_flow_ref_lj13=1_000),
    },
    "08": {
        "smoke": Chapter08Sizes(n_data=20_000, hidden=64, pretrain_steps=2_000, pretrain_batch=512, sde_steps=50,
                                n_rounds=2, collections_per_round=1, n_states=2_048, n_rollouts=4, rollout_steps=10,
                                steps_per_collection=200, rwr_pool=4_000, rwr_steps=500, rwr_alphas=(2.0, 1.0),
                                bon_ns=(1, 2, 4, 8), n_eval=2_000, n_ess=1_000, grid=50, ode_steps=30,
                                gauss_samples=20_000),
        "laptop": Chapter08Sizes(n_data=100_000, hidden=128, pretrain_steps=6_000, pretrain_batch=1_024,
                                 sde_steps=100, n_rounds=4, collections_per_round=2, n_states=4_096, n_rollouts=8,
                                 rollout_steps=20, steps_per_collection=300, rwr_pool=20_000, rwr_steps=2_000,
                                 rwr_alphas=(4.0, 2.0, 4.0 / 3.0, 1.0), bon_ns=(1, 2, 4, 8, 16), n_eval=5_000,
                                 n_ess=2_000, grid=80, ode_steps=60, gauss_samples=20_000),
        "full": Chapter08Sizes(n_data=200_000, hidden=128, pretrain_steps=15_000, pretrain_batch=1_024,
                               sde_steps=200, n_rounds=6, collections_per_round=2, n_states=8_192, n_rollouts=8,
                               rollout_steps=30, steps_per_collection=400, rwr_pool=50_000, rwr_steps=5_000,
                               rwr_alphas=(6.0, 3.0, 2.0, 1.5, 1.2, 1.0), bon_ns=(1, 2, 3, 4, 8, 16),
                               n_eval=20_000, n_ess=5_000, grid=120, ode_steps=100, gauss_samples=100_000),
    },
    "A": {
        "smoke": AppendixSizes(16, 64, 4, 16, 1, False),
        "laptop": AppendixSizes(128, 250, 32, 50, 2, True),
        "full": AppendixSizes(512, 1_000, 128, 100, 3, True),
    },
}


def describe(chapter_sizes: Any, width: int = 100) -> str:
    """The current budget and ``chapter_sizes`` (a sizes dataclass) as short lines of
    ``name=value`` pairs, for a chapter's set-up cell (a notebook wraps a long printed line
    mid-word)."""
    import dataclasses
    import textwrap

    pairs = ", ".join(f"{f.name}={getattr(chapter_sizes, f.name)}" for f in dataclasses.fields(chapter_sizes))
    return f"budget: {budget()}\n" + textwrap.fill(pairs, width=width, break_long_words=False,
                                                   break_on_hyphens=False, initial_indent="  ", subsequent_indent="  ")


def sizes(chapter: str, budget_name: str | None = None) -> Any:
    """The sizes dataclass of ``chapter`` (e.g. ``"00"``) under ``budget_name`` or the current budget."""
    if chapter not in _REGISTRY:
        raise KeyError(f"no sizes for chapter {chapter!r}; known: {', '.join(sorted(_REGISTRY))}")
    name = check_budget(budget_name) if budget_name is not None else budget()
    return _REGISTRY[chapter][name]

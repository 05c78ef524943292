"""boltzlab: the package behind the BoltzLab course on neural samplers of Boltzmann distributions.

Modules, one concept each:

- ``validation`` the input checks shared by energies, flows and models
- ``config``     budgets (``BOLTZLAB_BUDGET``) and the sizes every notebook asks for
- ``energies``   target energies E(x) and forces -grad E(x) with p(x) ∝ exp(-E(x)/kT)
- ``mcmc``       Metropolis, MALA and parallel tempering over many chains; diagnostics
- ``minimize``   energy minimisation (L-BFGS) and ideal cluster geometries
- ``reference``  the shipped MCMC reference sets and the command that builds them
- ``models``     small networks: MLPs, VAE encoder/decoders, GAN generator/critic, score
                 networks (time-embedded MLP, EGNN) and energy networks
- ``diffusion``  VE noise schedule, reverse SDE, probability-flow ODE, denoising score matching
                 (loss, Tweedie, training), replay buffer
- ``training``   training loops: VAEs, GANs, WGANs (``generative``), iDEM, pDEM, NEM (``idem``)
- ``flows``      coupling flows (RealNVP, rational-quadratic splines) and their training
- ``estimators`` DEM Monte Carlo score estimators and the exact noised GMM score
- ``importance`` importance weights, ESS, log Z with bootstrap error, FEP/BAR, CNF likelihoods
- ``vae_reweighting`` exact importance weights of a VAE on the joint (x, z)
- ``manifold``   sample complexity of density estimates and the dimension of configurations
                 (KDE error against n and d, TwoNN, PCA spectra, a stiff-bond toy)
- ``finetune``   reward-guided fine-tuning of a diffusion sampler: iterative distillation and
                 the baselines (RWR, best-of-N, policy gradient with KL, reward backpropagation)
- ``metrics``    energy W2, distance histograms, x-W2, Kish ESS, log Z, mode coverage
- ``plots``      histograms, densities, traces
- ``widgets``    ipywidgets used in the chapters
- ``kernels``    Triton kernels and fast CPU paths for LJ forces and the DEM score target
- ``exercises``  builds exercises/ from solutions/
- ``grading``    in-notebook checks and the grading command
"""

__version__ = "0.1.0"

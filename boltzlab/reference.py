r"""The course's own MCMC reference sets for DW-4, LJ-13 and LJ-55, and the command that builds them.

Load a shipped set::

    from boltzlab.reference import load_reference, reference_provenance
    x = load_reference("lj13", n=2000, generator=torch.Generator().manual_seed(0))  # (2000, 39)
    reference_provenance("lj13")["integrated_autocorrelation_time"]

Build them (an instructor's job; each writes boltzlab/data/{name}.npz and {name}.json)::

    python -m boltzlab.reference build {dw4,lj13,lj55,all} [--seed S] [--out DIR]

Every set holds at least 10,000 centre-of-mass-free configurations at kT = 1 in the
benchmark conventions of :mod:`boltzlab.energies` (DW-4: unique pairs; LJ-n: ordered
pairs plus the harmonic tether), stored float32, kept every ``thin`` MCMC steps after a
burn-in, with ``thin`` two to three integrated autocorrelation times of the energy or
more, so that the stored samples are close to independent.

Which sampler: at kT = 1 the benchmark LJ clusters are standard Lennard-Jones at reduced
temperature 0.5, above the solid-liquid transition of LJ-13 and LJ-55 (heat-capacity
peaks near 0.3), and the tether keeps them from evaporating: one liquid-like droplet with
a unimodal energy distribution, which MALA mixes in one to two thousand steps. DW-4 is
different: its energy mixes quickly under MALA, but its structure (two versus four short
pair distances) does not, so it is built with parallel tempering (see :data:`RECIPES`).
The build checks mixing rather than trusting it: it refuses to write a set whose split R-hat of the energy exceeds 1.01, whose thinning
is shorter than two energy autocorrelation times, or whose kept states are still
correlated in the energy or in the mean pair distance (a structural observable).

The sampler evaluates energies through ``torch.compile`` (several times faster on one CPU
thread); the stored energies and every statistic in the provenance are recomputed with
the plain energy in float64.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from boltzlab import mcmc
from boltzlab.energies import PairPotential, dw4, lj13, lj55, remove_com
from boltzlab.minimize import icosahedron_13, mackay_icosahedron_55

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Where the shipped reference sets live (part of the package)."""

log = logging.getLogger("boltzlab.reference")

N_BLOCKS = 10
"""The kept part of a run is cut into this many blocks to check that the energy is stationary."""


# ----------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------


def _dw4_start(n_chains: int, generator: torch.Generator) -> Tensor:
    """Four particles near the corners of a square of side 4 (pair distances near the wells)."""
    square = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]).reshape(-1)
    return square + 0.3 * torch.randn(n_chains, 8, generator=generator)


def _lj13_start(n_chains: int, generator: torch.Generator) -> Tensor:
    return icosahedron_13().float() + 0.05 * torch.randn(n_chains, 39, generator=generator)


def _lj55_start(n_chains: int, generator: torch.Generator) -> Tensor:
    return mackay_icosahedron_55().float() + 0.05 * torch.randn(n_chains, 165, generator=generator)


@dataclass(frozen=True)
class Recipe:
    """How one reference set is made.

    MALA at kT = 1 (``n_temps == 1``), or parallel tempering with MALA moves over a
    geometric ladder of ``n_temps`` temperatures from 1 to ``kT_max`` (only the kT = 1
    replica is kept). Step sizes adapt during ``burn_in`` steps (per chain for MALA, per
    temperature for PT) and are then frozen; ``n_samples / n_chains`` states per chain are
    kept, ``thin`` steps apart. The last three fields are the acceptance checks of a run.
    """

    name: str
    make_energy: Callable[[], PairPotential]
    start: Callable[[int, torch.Generator], Tensor]
    n_chains: int
    burn_in: int
    thin: int
    n_samples: int = 10_000
    step_size: float = 1e-3
    n_temps: int = 1
    kT_max: float = 1.0
    min_thin_over_tau: float = 2.0
    max_rhat: float = 1.01
    max_kept_iat: float = 1.5

    @property
    def kept_per_chain(self) -> int:
        return math.ceil(self.n_samples / self.n_chains)

    @property
    def n_steps(self) -> int:
        return self.burn_in + self.thin * self.kept_per_chain

    @property
    def sampler(self) -> str:
        if self.n_temps == 1:
            return "MALA (Metropolis-adjusted Langevin); per-chain step sizes adapted during burn-in only"
        return (f"parallel tempering, {self.n_temps} temperatures geometric from 1 to {self.kT_max}, MALA moves, "
                "neighbour swaps every step (even and odd pairs in turn); per-temperature step sizes "
                "adapted during burn-in only")


RECIPES: dict[str, Recipe] = {
    "dw4": Recipe("dw4", dw4, _dw4_start, n_chains=100, burn_in=2_000, thin=200, step_size=0.02,
                  n_temps=5, kT_max=4.0),
    "lj13": Recipe("lj13", lj13, _lj13_start, n_chains=100, burn_in=10_000, thin=2_600, step_size=6e-4),
    "lj55": Recipe("lj55", lj55, _lj55_start, n_chains=100, burn_in=30_000, thin=4_000, step_size=2e-4),
}
"""The shipped recipes: 100 chains x 100 kept states = 10,000 samples each.

- DW-4: parallel tempering. Plain MALA mixes the energy quickly (IAT ~130 steps) but
  not the structure: clusters with two versus four short pair distances interconvert
  over thousands of steps (the kept states of a MALA run 400 steps apart had a lag-one
  autocorrelation of 0.68 in that mode and R-hat 1.07). Five replicas up to kT = 4 make
  the pair-distance barrier (about 4.4 kT at kT = 1) cheap to cross; the energy IAT drops
  to ~6 steps, but kept states 50 steps apart were still correlated in the mean pair
  distance (IAT 1.4 kept samples), hence thin = 200.
- LJ-13, LJ-55: MALA; ``thin`` from pilot runs: about three energy IATs for LJ-13 (IAT
  ~820 steps) and 2.4 to 3 for LJ-55 (IAT 1,400 to 1,700 steps, i.e. about 4e7 MALA
  chain-steps for the 10,000 samples), which keeps the single-thread LJ-55 build near 30 to 40
  minutes on a shared 2-core machine.

The build re-measures the IATs and refuses a run that fails the recipe's checks."""


# ----------------------------------------------------------------------------------------
# Fast sampling energy
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CompiledPairPotential(PairPotential):
    """The same pair potential with its energy-and-forces routine run through torch.compile."""

    compiled: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]] | None = field(
        default=None, compare=False, repr=False
    )

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        assert self.compiled is not None
        return self.compiled(x, want_forces)


def compiled_energy(energy: PairPotential) -> PairPotential:
    """``energy`` evaluated through ``torch.compile`` (falls back to eager if compilation fails)."""
    plain = energy

    def plain_call(x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        return PairPotential._energy_and_forces(plain, x, want_forces)

    fast = torch.compile(plain_call, dynamic=False)

    def call(x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        try:
            return fast(x, want_forces)
        except Exception as err:  # noqa: BLE001 -- any compiler failure: fall back, results are unchanged
            log.warning("torch.compile failed (%s); using the eager energy", err)
            return plain_call(x, want_forces)

    values = {f.name: getattr(energy, f.name) for f in fields(energy)}
    return _CompiledPairPotential(**values, compiled=call)


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------


def kept_sample_diagnostics(energy: PairPotential, positions: Tensor, n_chains: int) -> dict[str, float]:
    """Mixing checks that need only the stored set, ``positions`` ``(n_kept * n_chains, dim)``
    in chain-major order: IAT (in kept samples, Geyer) and split R-hat of the energy and of
    the mean pair distance, a structural observable that the energy can be blind to (DW-4's
    two- versus four-short-pair clusters, an LJ cluster's breathing). Decorrelated kept
    samples give IATs near 1 and R-hats near 1."""
    observables = {
        "energy": energy.energy(positions.double()),
        "mean_pair_distance": energy.pair_distances(positions.double()).mean(-1),
    }
    out = {}
    for key, values in observables.items():
        trace = values.reshape(-1, n_chains)
        out[f"kept_iat_{key}"] = mcmc.integrated_autocorrelation_time(trace)
        out[f"kept_rhat_{key}"] = mcmc.rhat(trace)
    return out


def build_reference(
    recipe: Recipe,
    seed: int,
    out_dir: Path = DATA_DIR,
    compile_energy: bool = True,
    check: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run ``recipe``, check it, write ``{name}.npz`` and ``{name}.json`` into ``out_dir``.

    The npz holds ``positions`` (n_samples, dim) float32, COM-free, and ``energies``
    (n_samples,) float32; ``positions[k * n_chains + c]`` is the k-th kept state of chain c.
    Returns the provenance dict (also written as the JSON). With ``check``, a run that
    fails the recipe's checks (split R-hat of the energy trace, thinning in units of the
    energy IAT, IATs of the kept samples) raises ``RuntimeError`` and writes nothing.
    ``command`` is recorded in the provenance (the command line, when called from it).
    """
    torch_threads = torch.get_num_threads()
    energy = recipe.make_energy()
    sampler_energy = compiled_energy(energy) if compile_energy else energy
    generator = torch.Generator().manual_seed(seed)
    x0 = recipe.start(recipe.n_chains, generator)
    log.info("%s: %d chains x %d steps (burn-in %d, thin %d, %d temperatures), seed %d", recipe.name,
             recipe.n_chains, recipe.n_steps, recipe.burn_in, recipe.thin, recipe.n_temps, seed)
    start = time.perf_counter()
    if recipe.n_temps == 1:
        res = mcmc.run_mcmc(sampler_energy, x0, n_steps=recipe.n_steps, kernel="mala", step_size=recipe.step_size,
                            burn_in=recipe.burn_in, thin=recipe.thin, adapt=True, adapt_per_chain=True,
                            generator=generator, progress=progress)
    else:
        res = mcmc.run_parallel_tempering(sampler_energy, x0, n_steps=recipe.n_steps, kT_max=recipe.kT_max,
                                          n_temps=recipe.n_temps, kernel="mala", step_size=recipe.step_size,
                                          burn_in=recipe.burn_in, thin=recipe.thin, adapt=True,
                                          adapt_per_chain=False, generator=generator, progress=progress)
    wall = time.perf_counter() - start

    assert res.energy_trace is not None
    post = res.energy_trace[recipe.burn_in:].double()
    rho = mcmc.autocorrelation(post)
    tau = mcmc.iat_from_autocorrelation(rho)
    r_hat = mcmc.rhat(post)

    positions64 = remove_com(res.samples.double().reshape(-1, energy.dim), energy.n, energy.d_space)
    energies64 = energy.energy(positions64)
    n = positions64.shape[0]
    kept = kept_sample_diagnostics(energy, positions64, recipe.n_chains)
    # the IAT of the kept energies, from the full trace's autocorrelation at multiples of thin
    tau_kept = mcmc.iat_from_autocorrelation(rho[:: recipe.thin])
    se_e = float(energies64.std()) * math.sqrt(max(tau_kept, kept["kept_iat_energy"], 1.0) / n)
    virial = -(positions64 * energy.forces(positions64)).sum(-1)
    tail = res.energy_trace[recipe.burn_in * 3 // 4 : recipe.burn_in].double()
    # stationarity: means of consecutive blocks of the kept run, each with its IAT-based error
    blocks = post[: post.shape[0] // N_BLOCKS * N_BLOCKS].reshape(N_BLOCKS, -1, post.shape[1])
    block_se = math.sqrt(float(post.var()) * tau / blocks[0].numel())
    acc = res.acceptance.reshape(-1, recipe.n_chains)  # (n_temps, n_chains)
    steps = res.step_size.reshape(-1, recipe.n_chains)

    provenance = {
        "name": recipe.name,
        "energy": repr(energy),
        "kT": energy.kT,
        "sampler": recipe.sampler,
        "seed": seed,
        "n_chains": recipe.n_chains,
        "n_steps": recipe.n_steps,
        "burn_in": recipe.burn_in,
        "thin": recipe.thin,
        "n_samples": n,
        "sample_order": "positions[k * n_chains + c] is the k-th kept state of chain c",
        "dtype_sampling": str(x0.dtype),
        "dtype_stored": "float32",
        "n_temps": recipe.n_temps,
        "kT_ladder": res.kT.reshape(-1).tolist(),
        "swap_acceptance": res.swap_acceptance.tolist() if res.swap_acceptance is not None else None,
        "step_size_note": "MALA time step tau in y = x + tau F/kT + sqrt(2 tau) xi",
        "step_size_initial": recipe.step_size,
        "step_size_mean": float(steps[0].mean()),
        "step_size_min": float(steps[0].min()),
        "step_size_max": float(steps[0].max()),
        "step_size_per_temperature": steps.mean(-1).tolist(),
        "acceptance_mean": float(acc[0].mean()),
        "acceptance_min": float(acc[0].min()),
        "acceptance_max": float(acc[0].max()),
        "acceptance_per_temperature": acc.mean(-1).tolist(),
        "target_acceptance": mcmc.TARGET_ACCEPTANCE["mala"],
        "rhat_energy": r_hat,
        "integrated_autocorrelation_time": tau,
        "integrated_autocorrelation_time_unit": (
            "MALA steps; energy trace (kT = 1) after burn-in, pooled over chains, Geyer initial monotone sequence"),
        "thin_over_iat": recipe.thin / tau,
        "iat_of_kept_samples": tau_kept,
        **kept,
        "n_energy_evaluations": res.n_energy_evaluations,
        "n_energy_evaluations_note": "configurations evaluated (energy and forces), all replicas, burn-in included",
        "wall_time_s": wall,
        "torch_version": torch.__version__,
        "torch_threads": torch_threads,
        "compiled_energy": compile_energy,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": command or f"build_reference(RECIPES[{recipe.name!r}], seed={seed})",
        "mean_energy": float(energies64.mean()),
        "mean_energy_se": se_e,
        "mean_energy_se_note": "std / sqrt(n) times sqrt(IAT of the kept samples, the larger of two estimates)",
        "mean_energy_all_steps": float(post.mean()),
        "mean_energy_all_steps_se": mcmc.monte_carlo_standard_error(post),
        "mean_energy_end_of_burn_in": float(tail.mean()) if tail.numel() else None,
        "energy_block_means": [float(b.mean()) for b in blocks],
        "energy_block_se": block_se,
        "virial_mean": float(virial.mean()),
        "virial_se": float(virial.std()) / math.sqrt(n),
        "virial_expected": energy.effective_dim * energy.kT,
    }
    log.info("%s: %s", recipe.name, json.dumps(provenance, indent=1))

    problems = []
    if r_hat > recipe.max_rhat:
        problems.append(f"split R-hat of the energy is {r_hat:.4f} > {recipe.max_rhat}")
    if recipe.thin < recipe.min_thin_over_tau * tau:
        problems.append(f"thin = {recipe.thin} is below {recipe.min_thin_over_tau} x IAT ({tau:.1f} steps)")
    for key in ("kept_iat_energy", "kept_iat_mean_pair_distance"):
        if kept[key] > recipe.max_kept_iat:
            problems.append(f"{key} = {kept[key]:.2f} kept samples > {recipe.max_kept_iat}: kept states are correlated")
    provenance["checks_passed"] = not problems
    if problems and check:
        raise RuntimeError(f"{recipe.name}: not writing an unconverged reference set: " + "; ".join(problems))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"{recipe.name}.npz", positions=positions64.float().numpy(),
                        energies=energies64.float().numpy())
    (out_dir / f"{recipe.name}.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("%s: wrote %s", recipe.name, out_dir / f"{recipe.name}.npz")
    return provenance


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def _path(name: str, suffix: str, data_dir: Path | None) -> Path:
    if name not in RECIPES:
        raise ValueError(f"unknown reference set {name!r}; known sets: {', '.join(RECIPES)}")
    path = (DATA_DIR if data_dir is None else Path(data_dir)) / f"{name}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(
            f"reference set file {path} is missing; build it with "
            f"`python -m boltzlab.reference build {name}` (or reinstall boltzlab with its data)"
        )
    return path


def load_reference(
    name: str, n: int | None = None, generator: torch.Generator | None = None, data_dir: Path | None = None
) -> Tensor:
    """The reference configurations of ``name`` (``"dw4"``, ``"lj13"``, ``"lj55"``): float32
    ``(n, dim)``, COM-free. ``n=None`` returns all of them; otherwise ``n`` of them, drawn
    without replacement with ``generator`` (the first ``n`` when no generator is given)."""
    with np.load(_path(name, ".npz", data_dir)) as data:
        x = torch.from_numpy(data["positions"]).float()
    if n is None:
        return x
    if not 0 < n <= x.shape[0]:
        raise ValueError(f"n must be between 1 and {x.shape[0]} for {name!r}, got {n}")
    if generator is None:
        return x[:n].clone()
    return x[torch.randperm(x.shape[0], generator=generator)[:n]]


def reference_provenance(name: str, data_dir: Path | None = None) -> dict:
    """How the set ``name`` was made (seed, chains, steps, diagnostics...), from its JSON."""
    return json.loads(_path(name, ".json", data_dir).read_text())


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boltzlab.reference",
                                     description="Build the course's MCMC reference sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run MALA and write data/{name}.npz and .json")
    build.add_argument("name", choices=[*RECIPES, "all"])
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    build.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    build.add_argument("--no-compile", action="store_true", help="evaluate energies eagerly")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    names = list(RECIPES) if args.name == "all" else [args.name]
    command = " ".join(["python -m boltzlab.reference", *(sys.argv[1:] if argv is None else argv)])
    for name in names:
        build_reference(RECIPES[name], seed=args.seed, out_dir=args.out, compile_energy=not args.no_compile,
                        progress=not args.no_progress, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

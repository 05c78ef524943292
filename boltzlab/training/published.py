"""The numbers chapter 06 measures its samplers against: the course's targets for the shipped
iDEM checkpoints, and published results with their sources.

Published numbers were measured on other reference and sample sets, some papers report W2 and
some W2^2, with other sample counts: compare orders of magnitude, not digits. Every number here
is W2 (not squared) as its source states it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The targets of the shipped checkpoints (plain sampler: the reverse SDE of the trained model,
# plus LJ-55's negative-time steps where its config has them; no corrector, no resampling), on
# at least 2000 fresh samples against the project's reference sets. metric -> upper bound.
SAMPLER_TARGETS: dict[str, dict[str, float]] = {
    "dw4": {"energy_w2": 0.3},
    "lj13": {"distance_w2": 0.03, "distance_tvd": 0.08, "energy_w2": 3.0},
    "lj55": {"distance_w2": 0.1},
}
TARGET_SAMPLES = 2000  # fresh samples a target is checked on


@dataclass(frozen=True)
class PublishedResult:
    """One published number: ``value`` of ``metric`` for ``method`` on ``target``, from ``source``."""

    target: str
    method: str
    metric: str
    value: float
    source: str
    spread: float | None = None  # +- over seeds, where the source gives it


_BLOG = ("Aggarwal et al., \"A need for a course correction\", ICLR 2025 blog post: the official iDEM "
         "configs re-run, 5 seeds")
_ADJOINT = "Adjoint Sampling (Havens et al., 2025) and ASBS (Liu et al., 2025): the iDEM rows of their tables"

PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("gmm40", "iDEM", "x_w2", 7.4, "Akhound-Sadegh et al., ICML 2024 (the iDEM paper), GMM-40 results"),
    PublishedResult("dw4", "iDEM", "energy_w2", 0.435, _BLOG),
    PublishedResult("lj13", "iDEM", "energy_w2", 5.20, _BLOG, spread=1.79),
    PublishedResult("lj13", "iDEM", "distance_w2", 0.024, _BLOG),
    PublishedResult("lj13", "Metropolis, same energy evaluations", "energy_w2", 0.52, _BLOG),
    PublishedResult("lj13", "Metropolis, same energy evaluations", "distance_w2", 0.003, _BLOG),
    PublishedResult("lj55", "iDEM", "energy_w2", 21.7, _BLOG),
    PublishedResult("lj55", "iDEM", "distance_w2", 0.085, _BLOG),
    PublishedResult("lj13", "iDEM", "energy_w2", 30.8, _ADJOINT),
    PublishedResult("lj55", "iDEM", "energy_w2", 93.5, _ADJOINT),
)


def published_for(target: str) -> list[PublishedResult]:
    """The published results on ``target`` (:data:`PUBLISHED`), in the order listed."""
    return [p for p in PUBLISHED if p.target == target]


def target_verdicts(target: str, values: dict[str, float]) -> list[tuple[str, float, float, bool]]:
    """(metric, value, bound, met) for every target of ``target`` in :data:`SAMPLER_TARGETS`;
    a metric missing from ``values`` is an error (a target is never silently skipped)."""
    if target not in SAMPLER_TARGETS:
        raise KeyError(f"no sampler targets for {target!r}; known: {', '.join(SAMPLER_TARGETS)}")
    out = []
    for metric, bound in SAMPLER_TARGETS[target].items():
        if metric not in values:
            raise KeyError(f"{target}: no {metric!r} among the measured metrics ({', '.join(values)})")
        out.append((metric, float(values[metric]), bound, float(values[metric]) <= bound))
    return out

"""Rewards whose KL-regularised optimum is known: :class:`BoltzmannReward`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from boltzlab.energies import Energy
from boltzlab.finetune._checks import FinetuneInputError, _positive_float


@dataclass(frozen=True)
class BoltzmannReward:
    r"""r(x) = -(1/kT - 1/kT0) E(x): tilting p_kT0 by exp(r) gives p_kT exactly.

    ``energy`` is any :class:`~boltzlab.energies.Energy` (its own kT is ignored). Calling the
    reward on ``x`` of shape ``(B, dim)`` returns ``(B,)``.
    """

    energy: Energy
    kT: float
    kT0: float

    def __post_init__(self) -> None:
        _positive_float(self.kT, "kT")
        _positive_float(self.kT0, "kT0")

    @property
    def coefficient(self) -> float:
        """1/kT - 1/kT0 (positive when fine-tuning towards a colder target)."""
        return 1.0 / self.kT - 1.0 / self.kT0

    def __call__(self, x: Tensor) -> Tensor:
        return -self.coefficient * self.energy.energy(x)

    def tilted_kT(self, tilt: float) -> float:
        r"""kT of p_kT0 · exp(tilt · r): 1 / (1/kT0 + tilt (1/kT - 1/kT0)); tilt = 1 gives kT."""
        beta = 1.0 / self.kT0 + float(tilt) * self.coefficient
        if not beta > 0:
            raise FinetuneInputError(f"tilt {tilt} gives a non-positive inverse temperature {beta}")
        return 1.0 / beta

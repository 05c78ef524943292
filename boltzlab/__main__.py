"""``python -m boltzlab COMMAND ...`` (or the ``boltzlab`` console script).

Commands:

- ``reference build {dw4,lj13,lj55,all}``  build the MCMC reference sets (boltzlab.reference)
- ``exercises {build,check}``               write exercises/ from solutions/ (boltzlab.exercises)
- ``grading grade SUBMISSIONS --out CSV``   grade submitted notebooks (boltzlab.grading)
- ``train TARGET --out DIR [--resume]``      train an iDEM, pDEM or NEM sampler (boltzlab.training.idem)
- ``ablate TARGET --out DIR``                 iDEM ablations at a fixed CPU budget (boltzlab.training.ablation)
- ``train-flow TARGET --out DIR [--auto-resume]``  train the particle flow (boltzlab.flows.particle_training)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "reference": "boltzlab.reference",
    "exercises": "boltzlab.exercises",
    "grading": "boltzlab.grading.grader",
    "train": "boltzlab.training.cli",
    "ablate": "boltzlab.training.ablation",
    "train-flow": "boltzlab.flows.particle_training",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

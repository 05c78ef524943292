"""Every fine-tuning method on the DW-4 tasks, several seeds: JSON records and a markdown table.

    python benchmarks/finetune_compare.py --size small --out benchmarks/finetune_compare_small

A thin wrapper of :mod:`boltzlab.finetune.compare` (``python -m boltzlab.finetune.compare``
does the same); ``--help`` lists the options (methods, tasks, seeds, the tempering target kT).
"""

from __future__ import annotations

import sys

from boltzlab.finetune.compare import main

if __name__ == "__main__":
    sys.exit(main())

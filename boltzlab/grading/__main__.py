"""``python -m boltzlab.grading grade SUBMISSIONS --out scores.csv``."""

import sys

from boltzlab.grading.grader import main

sys.exit(main())

"""Exercise checks for learners and the grading command for instructors.

- :mod:`boltzlab.grading.feedback`: the machinery every check uses (specific messages).
- ``checks_*`` modules: one per chapter, the in-notebook ``check_*`` functions.
- :mod:`boltzlab.grading.grader`: ``python -m boltzlab.grading grade SUBMISSIONS --out scores.csv``.

Learners call a check right below their solution cell, e.g. ``check_kish_ess(kish_ess)``;
it prints what passed and raises :class:`CheckFailed` saying exactly what is wrong.
"""

from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

__all__ = ["CheckFailed", "ExerciseNotAttempted"]

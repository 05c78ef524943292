"""What a learner sees when a check fails: one line with the message (no traceback through
the package), a "write it yourself" when the function only calls the package's version of
the answer, and never a line of the solution that the exercise does not already state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from boltzlab import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 24  # characters of normalised code: longer than any name, shorter than a formula


def _normalise(text: str) -> str:
    """Code and prose alike, without what differs between a formula and how it is written
    (``torch.``, ``float(``, ``, 0)`` reduction arguments, spaces, ``*`` and Markdown's backticks and dollars)."""
    text = text.lower().replace("torch.", "").replace("float(", "")
    text = re.sub(r",\s*(dim=)?0\)", ")", text)
    return re.sub(r"[\s*`$]", "", text)


def _message_strings(path: Path) -> list[str]:
    """Every string literal of a checks module (f-strings with their fields as ``{}``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return found


def test_no_check_message_gives_away_a_solution():
    modules = sorted((ROOT / "boltzlab" / "grading").glob("checks_*.py"))
    leaks = []
    for path in ex.solution_notebooks(ROOT / "solutions"):
        exercise, regions = ex.build_exercise(nbformat.read(path, as_version=4), path.stem)
        # the messages of the checks this notebook runs
        messages = [(m.name, text) for m in modules if f"boltzlab.grading.{m.stem} import" in path.read_text()
                    for text in _message_strings(m)]
        stated = _normalise("\n".join(c.source for c in exercise.cells))  # what the learner is told anyway
        for line in (line for region in regions for line in region):
            code = _normalise(line)
            if code.startswith(("#", "from", "import")) or len(code) < WINDOW:
                continue
            windows = {code[i:i + WINDOW] for i in range(len(code) - WINDOW + 1)}
            windows = {w for w in windows if w not in stated}
            for module, message in messages:
                if any(w in _normalise(message) for w in windows):
                    leaks.append(f"{module}: {message[:80]!r} gives away {path.name}: {line.strip()!r}")
    assert leaks == []


def test_the_leak_test_recognises_a_formula_written_as_prose():
    solution = "return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))"
    prose = "ESS = exp(2 logsumexp(log_w) - logsumexp(2 log_w))"
    code = _normalise(solution)
    assert any(code[i:i + WINDOW] in _normalise(prose) for i in range(len(code) - WINDOW + 1))


@pytest.mark.slow
def test_failed_check_shows_one_line_and_says_write_it_yourself():
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "from boltzlab.grading.checks_ch00 import check_kish_ess\n"
        "from boltzlab.metrics import kish_ess as packaged\n"
        "def kish_ess(log_w):\n    return packaged(log_w)",
        "check_kish_ess(kish_ess)",
        "def kish_ess(log_w):\n    return 1.0\ncheck_kish_ess(kish_ess)",
        "import torch\nprint(round(packaged(torch.zeros(10)), 6))",  # outside a check the package works
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    for index, expected in ((1, "calls boltzlab.metrics.kish_ess, the package's version of what this exercise "
                                "asks you to write: write it yourself"),
                            (2, "kish_ess returned 1 for 1000 equal weights")):
        errors = [o for o in nb.cells[index].outputs if o.output_type == "error"]
        assert len(errors) == 1 and errors[0].ename == "CheckFailed"
        assert expected in errors[0].evalue
        shown = "\n".join(errors[0].traceback)
        assert len(errors[0].traceback) == 1 and "feedback.py" not in shown and "During handling" not in shown
    assert nb.cells[3].outputs[0].text.strip() == "10.0"


def test_every_packaged_answer_is_listed_and_a_wrong_name_is_refused():
    from boltzlab.grading import write_yourself

    write_yourself.install_all()
    listed = {name for exercise in ("mala_step", "kish_ess", "gradient_penalty", "bar_free_energy", "log_z_bootstrap",
                                    "soft_optimal_weights", "online_update", "mc_score")
              for name in write_yourself.forbidden_for(exercise)}
    assert {"boltzlab.mcmc.mala_step", "boltzlab.metrics.kish_ess", "boltzlab.training.generative.gradient_penalty",
            "boltzlab.importance.bar_free_energy", "boltzlab.importance.log_z_bootstrap",
            "boltzlab.finetune.soft_optimal_weights", "boltzlab.kernels.online_lse.online_lse_update"} <= listed
    with pytest.raises(ValueError, match="'boltzlab.metrics.no_such_function', which does not exist"):
        write_yourself.register({"typo": ["boltzlab.metrics.no_such_function"]})

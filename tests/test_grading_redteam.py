"""Red team: hostile submissions against the sandboxed grader.

One grading run over the toy assignment of test_grading.py (``add``: 1 point; ``square``:
3 points, 2 of them in a hidden-tests-only cell) holds an honest notebook, untouched ones before and
after the attackers, and one notebook per attack. Each attacker defines a *correct*
``add`` only when its attack worked (it found the solutions, the instructor's secret, the
score table, a writable package...), and a wrong one otherwise; so "scores 0" means the
attack failed, while the honest row shows that a correct ``add`` does earn its point.
Every test then checks that no file outside the sandbox changed, no process of any
submission survived, and the other rows are what they would be without the attackers.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from boltzlab import exercises as ex
from boltzlab.grading import grader, sandbox
from boltzlab.grading.sandbox import Limits
from test_grading import _solutions, _with

ROOT = Path(__file__).resolve().parents[1]
SECRET_VAR, SECRET = "BOLTZLAB_INSTRUCTOR_SECRET", "s3cr3t-instructor-token"
MARKER = "boltzlab-redteam-survivor"  # in the command line of every process an attacker starts
SOLVED_ADD = "def add(a, b):\n    return a + b\n"
SOLVED_SQUARE = "def square(x):\n    return x * x\n"
TIMEOUT = 40.0

needs_sandbox = pytest.mark.skipif(sandbox.sandbox_problem() is not None,
                                   reason=f"no sandbox here: {sandbox.sandbox_problem()}")


def _add_if(condition: str) -> str:
    """Learner code: ``add`` is right only when ``condition`` (the attack's success) holds."""
    return f"_won = bool({condition})\ndef add(a, b):\n    return a + b if _won else a + b + 1\n"


SILENCE_ERRORS = (
    "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)\n"
    "def add(a, b):\n    raise NotImplementedError()\n"
)
REPLACE_SHOWTRACEBACK = (
    "ip = get_ipython()\nip.showtraceback = lambda *a, **k: None\nip._showtraceback = lambda *a, **k: None\n"
    "def add(a, b):\n    raise NotImplementedError()\n"
)
# Look for the grader's results or score table through /proc and write a full-marks record
# into every file named on any command line.
FORGE_RESULTS = """import os, json, glob
_targets = []
for cmd in glob.glob('/proc/[0-9]*/cmdline'):
    try:
        args = open(cmd, 'rb').read().decode(errors='replace').split('\\0')
    except OSError:
        continue
    _targets += [a for a in args if a.endswith(('.jsonl', '.csv', '.json')) or '--out' in a]
_hit = 0
for t in _targets:
    try:
        with open(t, 'a') as fh:
            fh.write(json.dumps({'grade_id': 'add', 'ok': True}) + '\\n')
        _hit += 1
    except OSError:
        pass
""" + _add_if("_hit")
READ_ENVIRONMENT = "import os\n" + _add_if(f"os.environ.get('{SECRET_VAR}') or any(k.startswith('PYTEST') for k in os.environ)")
# The repository (found from the package) and its solutions, or any solution notebook anywhere.
READ_SOLUTIONS = """import boltzlab, pathlib, os, sys
_repo = pathlib.Path(boltzlab.__file__).resolve().parents[1]
_found = (_repo / 'solutions').exists() or (_repo / '.git').exists()
for _dir, _subdirs, _files in os.walk('/'):
    if _dir.startswith(('/proc', '/sys', '/usr', '/dev', sys.prefix, sys.base_prefix)):
        _subdirs[:] = []  # the interpreter's own trees: large, and read-only binds of the host's
        continue
    _found = _found or any(f == '01_toy.ipynb' or f == 'scores.csv' for f in _files)
""" + _add_if("_found")
# Write into the package (the grader and the checks), the repository, the environment, home.
WRITE_EVERYWHERE = """import boltzlab, boltzlab.grading.grader as g, boltzlab.grading.feedback as f, pathlib, sys
_wrote = 0
_paths = [g.__file__, f.__file__, pathlib.Path(boltzlab.__file__).parents[1] / 'PWNED',
          pathlib.Path(sys.prefix) / 'PWNED', pathlib.Path('/root/PWNED'), pathlib.Path('/etc/PWNED'),
          pathlib.Path(sys.prefix) / 'lib' / 'python3.11' / 'site-packages' / 'PWNED.pth']
for p in _paths:
    try:
        with open(p, 'a') as fh:
            fh.write('\\nimport os; CheckFailed = type(None)\\n')
        _wrote += 1
    except OSError:
        pass
""" + _add_if("_wrote")
# A detached child with an empty environment that outlives the kernel and, later, rewrites
# the score table and feedback it can find.
DETACHED_CHILD = f"""import subprocess, sys
_code = '''
import glob, time
time.sleep(2)
for _ in range(300):
    for p in glob.glob("/tmp/**/*.csv", recursive=True) + glob.glob("/tmp/**/*.md", recursive=True):
        try:
            open(p, "a").write("owned,,,6,6,6,6\\\\n")
        except OSError:
            pass
    time.sleep(0.1)
'''
subprocess.Popen([sys.executable, '-c', _code, '{MARKER}'], start_new_session=True, env={{}},
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def add(a, b):
    return 0
"""
NETWORK = """import socket
try:
    socket.create_connection(('1.1.1.1', 53), timeout=2).close()
    _net = True
except OSError:
    _net = False
""" + _add_if("_net")
FORK_BOMB = f"""import os, time
_n = 0
try:
    while True:
        if os.fork() == 0:
            os.execv('/bin/sleep', ['/bin/sleep', '600', '{MARKER}'])
        _n += 1
except OSError as err:
    print('fork refused after', _n, 'children:', err)
""" + _add_if("_n >= 10_000")
ALLOCATE_10GB = """try:
    _big = bytearray(10 * 2**30)
    _got = True
except MemoryError:
    _got = False
""" + _add_if("_got")
INFINITE_PRINT = "while True:\n    print('spam ' * 2000)\n"

ATTACKS = {
    "custom_exc": SILENCE_ERRORS, "showtraceback": REPLACE_SHOWTRACEBACK, "forge_results": FORGE_RESULTS,
    "environment": READ_ENVIRONMENT, "solutions": READ_SOLUTIONS, "write_everywhere": WRITE_EVERYWHERE,
    "detached_child": DETACHED_CHILD, "network": NETWORK, "fork_bomb": FORK_BOMB, "allocate_10gb": ALLOCATE_10GB,
    "infinite_print": INFINITE_PRINT,
}
LIMITS = Limits(processes=96, output_bytes=2 * 2**20)


def _fingerprint(*folders: Path) -> dict[str, str]:
    """Content hash of every file under ``folders``."""
    out = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _processes_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the honest, untouched and hostile notebooks once; returns what the tests inspect."""
    if sandbox.sandbox_problem() is not None:
        pytest.skip(f"no sandbox here: {sandbox.sandbox_problem()}")
    home = tmp_path_factory.mktemp("redteam")
    sols = _solutions(home)
    ex.build_all(sols, home / "exercises")
    blank = nbformat.read(home / "exercises" / "01_toy.ipynb", as_version=4)
    subs = home / "subs"
    subs.mkdir()
    nbformat.write(_with(blank, add_sol=SOLVED_ADD, square_sol=SOLVED_SQUARE), subs / "a_honest.ipynb")
    nbformat.write(blank, subs / "a_untouched.ipynb")
    for name, code in ATTACKS.items():
        nbformat.write(_with(blank, add_sol=code), subs / f"m_{name}.ipynb")
    nbformat.write(_with(blank, add_sol=SOLVED_ADD, square_sol=SOLVED_SQUARE), subs / "z_honest.ipynb")
    nbformat.write(blank, subs / "z_untouched.ipynb")
    out = home / "scores.csv"
    watched = [home, ROOT / "boltzlab", ROOT / "solutions", Path(sys.prefix) / "bin"]
    before = _fingerprint(*watched)
    # the grader's temporary folders go into a folder of their own, checked empty afterwards
    # (short: the kernel's sockets live there, and socket paths are limited to 107 bytes)
    scratch = Path(tempfile.mkdtemp(prefix="bl-rt-", dir="/tmp"))
    os.environ[SECRET_VAR] = SECRET
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(scratch)
    start = time.perf_counter()
    try:
        grader.grade_folder(subs, sols, out, timeout=TIMEOUT, feedback_dir=home / "feedback", progress=False,
                            limits=LIMITS)
    finally:
        tempfile.tempdir = saved_tempdir
        del os.environ[SECRET_VAR]
    seconds = time.perf_counter() - start
    print(f"red-team grading run: {len(ATTACKS) + 4} notebooks in {seconds:.1f} s")
    rows_then = out.read_text()
    time.sleep(3)  # a surviving child would rewrite the table now
    leftovers = sorted(p.name for p in scratch.iterdir())
    if not leftovers:
        scratch.rmdir()
    feedback = {p.name: p.read_text() for p in (home / "feedback").iterdir()}
    after = _fingerprint(*watched)
    return {"rows": {r["submission"]: r for r in csv.DictReader(out.open())}, "rows_then": rows_then,
            "rows_now": out.read_text(), "before": before, "after": after, "leftovers": leftovers,
            "feedback": feedback, "out": out, "scratch": str(scratch), "seconds": seconds,
            "reports": home / "feedback", "subs": subs}


def _total(graded, name: str) -> float:
    return float(graded["rows"][f"{name}.ipynb"]["total"])


@needs_sandbox
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacker_scores_zero(graded, attack):
    assert _total(graded, f"m_{attack}") == 0, graded["rows"][f"m_{attack}.ipynb"]


@needs_sandbox
def test_other_rows_unchanged(graded):
    rows = graded["rows"]
    for name in ("a_honest", "z_honest"):
        assert (rows[f"{name}.ipynb"]["add"], rows[f"{name}.ipynb"]["square"], rows[f"{name}.ipynb"]["total"]) == ("1", "3", "4")
        assert rows[f"{name}.ipynb"]["status"] == "ok"
    for name in ("a_untouched", "z_untouched"):
        assert rows[f"{name}.ipynb"]["total"] == "0" and rows[f"{name}.ipynb"]["status"] == "ok"
    assert len(rows) == len(ATTACKS) + 4
    assert graded["rows_now"] == graded["rows_then"], "the score table changed after grading ended"


@needs_sandbox
def test_limits_stop_the_resource_attacks(graded):
    rows = graded["rows"]
    assert rows["m_infinite_print.ipynb"]["status"] == "output limit exceeded"
    # the fork bomb and the allocation are refused by the kernel's limits: their cells end
    # (the wrong add fails its test), the notebooks finish, and nothing hangs until the timeout
    for name in ("m_fork_bomb", "m_allocate_10gb"):
        assert rows[f"{name}.ipynb"]["status"] == "ok", rows[f"{name}.ipynb"]
    report = graded["feedback"]["m_custom_exc.md"]
    assert "Total: 0 / 4" in report


@needs_sandbox
def test_no_file_outside_the_sandbox_changed(graded):
    changed = {p for p in graded["before"].keys() | graded["after"].keys()
               if graded["before"].get(p) != graded["after"].get(p)}
    expected = {str(graded["out"])} | {str(p) for p in graded["reports"].iterdir()}
    assert changed <= expected, sorted(changed - expected)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for planted in (ROOT / "PWNED", Path("/root/PWNED"), Path("/etc/PWNED"), Path(sys.prefix) / "PWNED", site / "PWNED.pth"):
        assert not planted.exists(), planted
    assert graded["leftovers"] == [], "the grader left files in its temporary folder"


@needs_sandbox
def test_no_process_survives(graded):
    assert _processes_with(MARKER) == []  # what the attackers started
    assert _processes_with(graded["scratch"]) == []  # the kernels (their connection files lived there)


def test_unavailable_sandbox_is_an_error_not_a_fallback(tmp_path, monkeypatch, capsys):
    sols = _solutions(tmp_path)
    subs = tmp_path / "subs"
    subs.mkdir()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap .* is not installed.*--unsafe"):
        grader.grade_folder(subs, sols, tmp_path / "scores.csv", progress=False)
    assert grader.main(["grade", str(subs), "--solutions", str(sols), "--out", str(tmp_path / "s.csv")]) == 2
    assert "cannot grade safely" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    # --unsafe is the explicit way round: limits only, no sandbox
    ex.build_all(sols, tmp_path / "exercises")
    blank = nbformat.read(tmp_path / "exercises" / "01_toy.ipynb", as_version=4)
    nbformat.write(_with(blank, add_sol=SOLVED_ADD, square_sol=SOLVED_SQUARE), subs / "trusted.ipynb")
    assert grader.main(["grade", str(subs), "--solutions", str(sols), "--out", str(tmp_path / "s.csv"),
                        "--unsafe", "--no-progress"]) == 0
    row = next(csv.DictReader((tmp_path / "s.csv").open()))
    assert (row["submission"], row["total"], row["status"]) == ("trusted.ipynb", "4", "ok")


def test_make_grade_writes_only_git_ignored_defaults():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ngrade:")[1].split("\n\n")[0]
    assert "--out $(OUT) --feedback $(FEEDBACK)" in recipe
    defaults = [re.search(rf"^{var} \?= (\S+)$", makefile, re.M).group(1) for var in ("OUT", "FEEDBACK")]
    assert defaults == ["scores.csv", "feedback"]
    ignored = subprocess.run(["git", "check-ignore", "scores.csv", "feedback/ada.md"], cwd=ROOT,
                             capture_output=True, text=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.stdout.split() == ["scores.csv", "feedback/ada.md"]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="memory_bytes must be positive"):
        Limits(memory_bytes=0)


# Known limit, kept visible: code in the kernel can replace the kernel's own request handler
# and answer "ok" for every later cell. Reading the execute_reply (as nbgrader does) cannot
# tell; it takes running the tests in a process the learner's code cannot reach (follow-up).
# strict: when a change closes this hole the test fails and must become a plain test.
FORGE_REPLIES = """k = get_ipython().kernel
async def _answer_ok(stream, ident, parent):
    k.session.send(stream, 'execute_reply', {'status': 'ok', 'execution_count': 1, 'user_expressions': {},
                   'payload': []}, parent, ident=ident)
    k.session.send(k.iopub_socket, 'status', {'execution_state': 'idle'}, parent, ident=k._topic('status'))
k.shell_handlers['execute_request'] = _answer_ok
def add(a, b):
    raise NotImplementedError()
"""


@needs_sandbox
@pytest.mark.xfail(strict=True, reason="a kernel that rewrites its own message handlers forges its replies")
def test_forged_replies_from_a_rewritten_kernel_handler(tmp_path):
    sols = _solutions(tmp_path)
    ex.build_all(sols, tmp_path / "exercises")
    blank = nbformat.read(tmp_path / "exercises" / "01_toy.ipynb", as_version=4)
    subs = tmp_path / "subs"
    subs.mkdir()
    nbformat.write(_with(blank, add_sol=FORGE_REPLIES), subs / "forger.ipynb")
    grader.grade_folder(subs, sols, tmp_path / "scores.csv", timeout=TIMEOUT, progress=False, limits=LIMITS)
    assert next(csv.DictReader((tmp_path / "scores.csv").open()))["total"] == "0"


@needs_sandbox
def test_a_kernel_that_cannot_start_is_reported_with_its_own_words(tmp_path):
    from boltzlab.grading import runner

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    run = runner.run_notebook(nb, grader.copy_package(tmp_path), 30, Limits(memory_bytes=40 * 2**20))
    assert run.outcomes == {} and run.status.startswith("kernel did not start: it exited with status 1")
    assert "MemoryError" in run.status


@needs_sandbox
def test_cpu_time_limit_stops_a_busy_loop_before_the_wall_clock(tmp_path):
    from boltzlab.grading import runner

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("while True:\n    pass"),
                                         nbformat.v4.new_code_cell("print('never')")])
    start = time.monotonic()
    run = runner.run_notebook(nb, grader.copy_package(tmp_path), 60, Limits(cpu_seconds=6))
    assert run.status.startswith("kernel died") and run.outcomes == {}
    assert time.monotonic() - start < 50

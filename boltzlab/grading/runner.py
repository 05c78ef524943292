"""Execute one prepared notebook in a sandboxed kernel, reading every outcome from the
kernel's messages.

The grader process is the kernel's client: it sends each cell as an ``execute_request``
and decides pass or fail from the ``status`` of the matching ``execute_reply`` (as
nbgrader does), so a notebook that silences its own tracebacks (``set_custom_exc``, a
replaced ``showtraceback``) still fails. Nothing is written to a file the kernel can reach:
the connection file and the kernel's sockets are the only things the grader shares with
the sandbox, in a folder made for this one notebook and deleted afterwards.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from boltzlab.grading import sandbox
from boltzlab.grading.sandbox import Limits

KERNEL_START_SECONDS = 60.0  # interpreter and ipykernel only: torch loads in the first cell
KEPT_TEXT = 4000  # characters of a cell's output kept for the feedback report


@dataclass
class CellOutcome:
    """What the kernel said about one executed cell."""

    status: str  # the execute_reply status: "ok", "error" or "aborted"
    text: str = ""  # stream output, last KEPT_TEXT characters
    error: str = ""  # "ename: evalue" of the error, if any


@dataclass
class NotebookRun:
    """Outcomes by cell index (cells never reached are absent) and how the run ended."""

    outcomes: dict[int, CellOutcome] = field(default_factory=dict)
    status: str = "ok"
    survivors: list[int] = field(default_factory=list)  # pids alive after the sandbox was killed


def _kernel_env() -> dict[str, str]:
    """The whole environment of a submission's kernel: nothing of the instructor's."""
    return {
        "HOME": sandbox.SANDBOX_HOME, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": sandbox.SANDBOX_PACKAGE_ROOT, "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8",
        "BOLTZLAB_BUDGET": "smoke", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "JUPYTER_RUNTIME_DIR": "/tmp/jupyter", "IPYTHONDIR": "/tmp/ipython", "MPLCONFIGDIR": "/tmp/mpl",
    }


class _Budget:
    """Wall-clock deadline and output allowance shared by all cells of one notebook."""

    def __init__(self, timeout: float, output_bytes: int):
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.output_left = output_bytes

    def spend_output(self, n: int) -> bool:
        self.output_left -= n
        return self.output_left >= 0


def _message_size(content: dict) -> int:
    text = content.get("text", "") + content.get("evalue", "") + "".join(content.get("traceback", []))
    data = content.get("data", {})
    return len(text) + sum(len(str(v)) for v in data.values())


def _run_cell(client: BlockingKernelClient, proc, source: str, budget: _Budget) -> tuple[CellOutcome | None, str]:
    """Execute one cell; returns (outcome or None when the run must stop, run status)."""
    msg_id = client.execute(source, silent=False, store_history=True, allow_stdin=False, stop_on_error=False)
    text, error, reply, idle = "", "", None, False
    while reply is None or not idle:
        if time.monotonic() > budget.deadline:
            return None, f"timeout after {budget.timeout:g} s"
        if proc.poll() is not None:
            return None, f"kernel died (exit {proc.returncode}): memory, CPU or file-size limit, or os._exit"
        if reply is None:
            try:
                msg = client.get_shell_msg(timeout=0.01)
                if msg["parent_header"].get("msg_id") == msg_id:
                    reply = msg["content"]
            except queue.Empty:
                pass
        try:
            msg = client.get_iopub_msg(timeout=0.1)
        except queue.Empty:
            continue
        kind, content = msg["msg_type"], msg["content"]
        # every message counts, also those of threads a previous cell left printing
        if not budget.spend_output(_message_size(content)):
            return None, "output limit exceeded"
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if kind == "stream":
            text = (text + content.get("text", ""))[-KEPT_TEXT:]
        elif kind == "error" and not error:
            error = f"{content.get('ename')}: {content.get('evalue')}"
        elif kind == "status" and content.get("execution_state") == "idle":
            idle = True
    if reply.get("status") != "ok" and not error:
        error = f"{reply.get('ename', 'Error')}: {reply.get('evalue', '')}"
    return CellOutcome(reply.get("status", "error"), text, error[:2000]), "ok"


class _ConsoleTail:
    """Reads the kernel's own stdout and stderr (not the cells' output, which comes as
    messages) as it comes, keeping only the end: it says why a kernel did not start, and a
    kernel that writes to its file descriptors forever neither blocks nor fills a disk."""

    def __init__(self, proc: subprocess.Popen, keep: int = KEPT_TEXT):
        self._tail = b""
        self._keep = keep
        threading.Thread(target=self._drain, args=(proc.stdout,), daemon=True).start()

    def _drain(self, pipe) -> None:
        while chunk := pipe.read1(65536):
            self._tail = (self._tail + chunk)[-self._keep:]
        pipe.close()

    def last_lines(self, n: int) -> str:
        return " ".join(self._tail.decode(errors="replace").strip().splitlines()[-n:])


def _wait_for_kernel(client: BlockingKernelClient, proc) -> str | None:
    """Ask for ``kernel_info`` until the kernel answers; returns a problem or None."""
    deadline = time.monotonic() + KERNEL_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"it exited with status {proc.returncode}"
        msg_id = client.kernel_info()
        try:
            while True:
                reply = client.get_shell_msg(timeout=1.0)
                if reply["parent_header"].get("msg_id") == msg_id:
                    return None
        except queue.Empty:
            continue
    return f"no answer in {KERNEL_START_SECONDS:g} s"


def run_notebook(nb: nbformat.NotebookNode, package_root: Path, timeout: float, limits: Limits,
                 unsafe: bool = False) -> NotebookRun:
    """Execute every code cell of ``nb`` in order in a fresh sandboxed kernel.

    Errors do not stop the run. A timeout, a dead kernel or too much output stops it: the
    cells reached keep their outcomes. The sandbox and all its processes are gone on return.
    """
    run = NotebookRun()
    private = Path(tempfile.mkdtemp(prefix="boltzlab-grader-"))  # root-only (0700) parent of:
    shared = private / "kernel"  # the connection file and the kernel's sockets, nothing else
    shared.mkdir()
    conn_file, _ = write_connection_file(str(shared / "kernel.json"), transport="ipc", ip=str(shared / "k"),
                                         key=secrets.token_hex(32).encode())
    os.chmod(conn_file, 0o644)  # readable by the kernel's user inside the sandbox
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", conn_file, "--HistoryManager.enabled=False"]
    proc = sandbox.start(argv, package_root, shared, limits, _kernel_env(), unsafe=unsafe)
    console = _ConsoleTail(proc)
    client = BlockingKernelClient(connection_file=conn_file)
    client.load_connection_file()
    pid_ns = None
    try:
        client.start_channels(hb=False)  # liveness is the process itself, watched below
        problem = _wait_for_kernel(client, proc)
        if problem:
            run.status = f"kernel did not start: {problem}; {console.last_lines(3)}"[:300]
            return run
        pid_ns = None if unsafe else sandbox.pid_namespace(proc)
        budget = _Budget(timeout, limits.output_bytes)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            outcome, status = _run_cell(client, proc, cell.source, budget)
            if outcome is None:
                run.status = status
                break
            run.outcomes[index] = outcome
    finally:
        client.stop_channels()
        pid_ns = pid_ns or (None if unsafe else sandbox.pid_namespace(proc))
        run.survivors = sandbox.stop(proc, pid_ns)
        shutil.rmtree(private, ignore_errors=True)
    return run

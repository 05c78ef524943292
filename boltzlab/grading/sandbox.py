"""Start one submission's kernel inside a sandbox that the grading command builds itself.

Why bubblewrap (Debian's ``bubblewrap``, the ``bwrap`` command):

- it is one small, audited package on any Linux distribution (no daemon, no image to
  build, no network), works for root and, through user namespaces, for ordinary users;
- one command gives everything a hostile notebook must not have: a root file system made
  only of read-only binds (the interpreter, the virtual environment, a copy of the
  package: never the repository, so no ``solutions/``), a fresh ``/proc`` in a private PID
  namespace (the instructor's processes and their command lines are invisible, and every
  process of the submission dies with the namespace's first process), no network, a
  private size-limited ``/tmp`` and home, and ``--clearenv``;
- the alternatives are weaker or heavier here: Docker/Podman need a daemon or images and
  are absent on the course machines; an unprivileged user with ``prlimit`` alone shares
  the file system, the network and ``/proc`` with the grader; ``unshare`` gives the
  namespaces but no way to assemble a read-only file system without scripting mounts.

Resource limits (address space, CPU seconds, processes, file size) are ``setrlimit``
calls made in the child before ``bwrap`` starts; they are inherited by everything inside.
When the grader runs as root, the kernel drops to the ``nobody`` user (uid 65534) with
``setpriv`` (util-linux) inside the sandbox, so that the process limit applies (the kernel
ignores ``RLIMIT_NPROC`` for root) and nothing it does has root's rights on the binds.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
SANDBOX_HOME = "/home/learner"
SANDBOX_PACKAGE_ROOT = "/opt/boltzlab-grading"
MiB = 2**20


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    """What one submission may use. Output is limited by the grader, which reads it."""

    memory_bytes: int = 6 * 1024 * MiB
    cpu_seconds: int = 900
    processes: int = 256
    file_bytes: int = 256 * MiB
    scratch_bytes: int = 512 * MiB  # each of the private /tmp and home (tmpfs, in RAM)
    output_bytes: int = 20 * MiB

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")


def sandbox_problem() -> str | None:
    """Why submissions cannot be sandboxed here, or None when they can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return ("bubblewrap (`bwrap`) is not installed: `apt-get install bubblewrap` (as root: "
                "`make sandbox-deps`), or grade with --unsafe on a machine you can afford to lose")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: it drops the sandboxed kernel to the nobody user"
    probe = subprocess.run(_bwrap_base(Path(sys.prefix)) + ["--", "/bin/true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"bubblewrap cannot create a sandbox here: {probe.stderr.strip()[:300]}"
    return None


def _read_only_trees() -> list[Path]:
    """The interpreter and its environment, outside /usr (which is bound whole)."""
    trees = []
    for p in (Path(sys.base_prefix), Path(sys.prefix)):
        p = p.resolve()
        if p not in trees and not p.is_relative_to("/usr"):
            trees.append(p)
    return trees


def _parents_as_dirs(targets: Sequence[Path]) -> list[str]:
    """``--dir`` for each missing ancestor of the bind targets, readable by the sandbox user
    (bubblewrap would otherwise create them mode 0700, owned by root)."""
    args: list[str] = []
    made: set[Path] = set()
    for target in targets:
        for parent in reversed(target.parents):
            if parent == Path("/") or parent in made or parent.is_relative_to("/usr"):
                continue
            made.add(parent)
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def _bwrap_base(prefix: Path, scratch_bytes: int | None = None) -> list[str]:
    """The file system every sandbox shares: /usr, /etc, a private /tmp (of ``scratch_bytes``
    when given) and the interpreter, read-only."""
    trees = _read_only_trees() if prefix == Path(sys.prefix) else [prefix]
    args = ["bwrap", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in ("bin", "lib", "lib64", "sbin"):  # merged-/usr systems link these; others bind them
        path = Path("/") / top
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    # mounts apply in order: the private /tmp before the interpreter, so that an environment
    # under the host's /tmp (a checkout made with mktemp) is bound on top of it, not hidden
    size = ["--size", str(scratch_bytes)] if scratch_bytes is not None else []
    args += ["--perms", "1777", *size, "--tmpfs", "/tmp"]
    args += _parents_as_dirs(trees)
    for tree in trees:
        args += ["--ro-bind", str(tree), str(tree)]
    return args


def sandbox_command(argv: Sequence[str], package_root: Path, shared_dir: Path, limits: Limits,
                    env: dict[str, str]) -> list[str]:
    """``bwrap`` arguments that run ``argv`` with ``package_root`` at
    :data:`SANDBOX_PACKAGE_ROOT` (read-only) and ``shared_dir`` (kernel connection file and
    sockets) writable at its own path."""
    size = str(limits.scratch_bytes)
    # the private /tmp comes first (in the base), so a shared folder under the host's /tmp is
    # bound on top of it rather than hidden by it
    args = _bwrap_base(Path(sys.prefix), limits.scratch_bytes)
    args += ["--dev", "/dev", "--proc", "/proc"]
    args += _parents_as_dirs([Path(SANDBOX_PACKAGE_ROOT), shared_dir, Path(SANDBOX_HOME)])
    args += ["--ro-bind", str(package_root), SANDBOX_PACKAGE_ROOT, "--bind", str(shared_dir), str(shared_dir),
             "--perms", "1777", "--size", size, "--tmpfs", SANDBOX_HOME, "--chdir", SANDBOX_HOME,
             "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    if os.geteuid() == 0:
        args += ["--", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    else:  # an unprivileged bwrap sets up a user namespace; the kernel keeps the caller's uid
        args += ["--unshare-user"]
    return [*args, "--", *argv]


def _limit_resources(limits: Limits) -> Callable[[], None]:
    """A ``preexec_fn`` that sets the limits in the child, before it runs bwrap."""
    def apply() -> None:
        for which, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu_seconds),
                             (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
    return apply


def start(argv: Sequence[str], package_root: Path, shared_dir: Path, limits: Limits, env: dict[str, str],
          unsafe: bool = False) -> subprocess.Popen:
    """Start ``argv`` sandboxed (or, with ``unsafe``, only under the resource limits, in
    ``shared_dir``, with ``env`` and the package copy first on the path). Its stdout and
    stderr are one pipe, which the caller must keep reading."""
    if unsafe:
        env = {**env, "PYTHONPATH": str(package_root), "HOME": str(shared_dir)}
        cmd, cwd = list(argv), shared_dir
    else:
        if os.geteuid() == 0:  # the kernel runs as nobody and creates its sockets here
            os.chown(shared_dir, NOBODY, NOBODY)
        cmd, cwd = sandbox_command(argv, package_root, shared_dir, limits, env), None
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_limit_resources(limits))


def _namespace_members(pid_ns: str) -> list[int]:
    """Host pids of the processes in the PID namespace ``pid_ns`` (a /proc/PID/ns/pid link)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(entry / "ns" / "pid") == pid_ns:
                members.append(int(entry.name))
        except OSError:
            continue
    return members


def pid_namespace(proc: subprocess.Popen) -> str | None:
    """The PID namespace of the sandbox started as ``proc`` (bwrap's child), if it has one."""
    own = os.readlink("/proc/self/ns/pid")
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            ns = os.readlink(f"/proc/{child}/ns/pid")
            if ns != own:
                return ns
    except OSError:
        return None
    return None


def stop(proc: subprocess.Popen, pid_ns: str | None, grace: float = 5.0) -> list[int]:
    """Kill the sandbox and everything in it; returns pids still alive after ``grace``
    seconds (none expected: the namespace dies with its first process)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if pid_ns is None:
        return []
    deadline = time.monotonic() + grace
    while (left := _namespace_members(pid_ns)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
    return left

r"""Measure the score estimator: time per call, peak memory and throughput, per implementation.

Used by ``benchmarks/bench_score_estimator.py`` and the appendix chapter.

Method. Every measurement runs in a fresh child process (``python -m boltzlab.kernels.benchmark``)
so that memory is not shared between implementations and a crash cannot take the caller down.
The child imports everything, builds the inputs, runs the warm-up calls (compilation
happens there), returns freed heap memory to the OS (glibc ``malloc_trim``, so buffers the
warm-up used are counted again when the timed calls touch them), resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and records the current RSS; after the
timed calls, peak memory = VmHWM - that RSS, i.e. the most resident memory a call needs on top
of its inputs and the loaded code, including PyTorch's and the allocator's overhead
(``tracemalloc`` would see none of PyTorch's allocations). Where clear_refs is unavailable the
child falls back to ru_maxrss, which also includes the warm-up. The time is the best of the
timed calls (a shared machine only ever slows a call down). The parent watches the child and
kills it when the machine's available memory falls under :data:`MIN_FREE_BYTES`, so the
memory-hungry baselines cannot push the machine into swapping or the OOM killer.

Throughput. A call evaluates B * K configurations of N(N-1)/2 unique pairs. The fast paths
evaluate each pair from both ends (no scatter), :data:`FLOP_PER_ORDERED_PAIR` floating-point
operations each, so FLOP/s = 2 * FLOP_PER_ORDERED_PAIR * unique pairs / s. The peak is
cores x clock x SIMD lanes x 2 (FMA) x 2 FMA units (see :func:`cpu_peak_flops`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

FLOP_PER_ORDERED_PAIR = 32
"""Per ordered pair (i, j) in the LJ kernels: 3 (x_i - x_j) + 5 (d^2) + 1 (clamp) + 1 (1/d^2)
+ 3 (s^6) + 4 (u, s^12) + 3 (g) + 5 (clamped-pair branch: compare, max, rsqrt, scale, select;
SIMD lanes execute both sides) + 1 (sum u) + 6 (sum g (x_i - x_j)) = 32; a division, square
root, comparison or select counts as one."""

MIN_FREE_BYTES = 3 * 1024**3
"""The parent kills a measurement when the machine's MemAvailable drops below this."""

IMPLEMENTATIONS: dict[str, str] = {
    "vmap_grad": "vmap/grad autograd (iDEM style)",
    "autograd": "autograd, batched B*K copies",
    "torch_eager": "boltzlab torch path, eager",
    "torch_compiled": "boltzlab torch path, torch.compile",
    "triton": "boltzlab Triton kernels (CUDA)",
    "autograd_cuda": "autograd, batched B*K copies (CUDA)",
    "target_fused": "training target (blended, clipped), fused pass",
    "target_materialised": "training target (blended, clipped), materialised (cf35560)",
}


@dataclass(frozen=True)
class BenchCase:
    """One benchmark problem: LJ-n benchmark energy, B points, K copies, float32."""

    n_particles: int
    batch: int
    n_samples: int
    sigma: float = 0.1
    seed: int = 0

    @property
    def name(self) -> str:
        return f"LJ-{self.n_particles}"

    @property
    def unique_pairs(self) -> int:
        """Unique pair interactions per call: B * K * N (N - 1) / 2."""
        return self.batch * self.n_samples * self.n_particles * (self.n_particles - 1) // 2


@dataclass
class Measurement:
    """Result of one child run; ``status`` is "ok" or says why there are no numbers."""

    implementation: str
    threads: int
    status: str
    seconds: float = math.nan
    all_seconds: list[float] = field(default_factory=list)
    peak_bytes: float = math.nan
    memory_method: str = ""
    device: str = "cpu"


# ----------------------------------------------------------------------------------------
# Child side
# ----------------------------------------------------------------------------------------


def _rss_bytes(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
    return math.nan


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that memory the warm-up
    left behind is faulted in again, and counted, when the timed calls use it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def noisy_points(case: BenchCase) -> Any:
    """x_t (B, 3N), float32: jittered cubic-lattice clusters (spacing 1.1, jitter 0.1), centred."""
    import torch

    from boltzlab.energies import lj_benchmark

    g = torch.Generator().manual_seed(case.seed)
    n = case.n_particles
    side = math.ceil(n ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    x = 1.1 * grid.float().expand(case.batch, n, 3) + 0.1 * torch.randn(case.batch, n, 3, generator=g)
    return lj_benchmark(n).remove_com(x.reshape(case.batch, 3 * n))


TARGET_LOCAL_SCALE = 0.07
"""local_scale of the blended training target in the benchmark (LJ-13's course config)."""
TARGET_MAX_NORM = 20.0
"""Per-particle clipping norm of the training target in the benchmark (the public iDEM configs)."""


def materialised_blended_score(energy: Any, x_t: Any, sigma: Any, eps: Any, local_scale: float) -> Any:
    """The blended training target as boltzlab computed it before the fused pass (commit
    cf35560), kept as the benchmarks' baseline: every copy's energy and forces materialised
    (in chunks of points) by :func:`boltzlab.estimators.copy_log_weights_and_forces`, then the
    softmax, the force form, the noise form and the blend. Shapes as
    :func:`boltzlab.estimators.blended_score`."""
    import torch

    from boltzlab.estimators import blend_forms, copy_log_weights_and_forces
    from boltzlab.kernels.estimate import check_score_inputs
    from boltzlab.kernels.noise import project_noise

    inputs = check_score_inputs(energy, x_t, sigma, None, eps, None)
    noise = project_noise(inputs.noise, energy)
    log_w, forces = copy_log_weights_and_forces(energy, inputs.x_t, inputs.sigma, noise)
    w = torch.softmax(log_w, dim=1)
    force_form = (w[..., None] * forces).sum(dim=1) / energy.kT
    noise_form = (w[..., None] * noise).sum(dim=1) / inputs.sigma[:, None]
    return blend_forms(force_form, noise_form, inputs.sigma, local_scale)


def materialised_mc_score(energy: Any, x_t: Any, sigma: Any, n_samples: int | None = None, *,
                          generator: Any = None, estimator: str = "lse", max_norm: float | None = None,
                          local_scale: float | None = None, **_: Any) -> Any:
    """:func:`boltzlab.estimators.mc_score` as it was before the fused pass, for the training
    targets ("lse" and "blended"): the noise drawn whole by :func:`boltzlab.estimators.draw_eps`
    (the same numbers as the streamed draw), the copies materialised, per-particle clipping."""
    from boltzlab.estimators import clip_score, draw_eps, mc_score

    eps = draw_eps(energy, x_t.shape[0], n_samples, generator, dtype=x_t.dtype, device=x_t.device)
    if estimator != "blended":
        return mc_score(energy, x_t, sigma, eps=eps, estimator=estimator, max_norm=max_norm)
    out = materialised_blended_score(energy, x_t, sigma, eps, local_scale)
    if max_norm is None:
        return out
    return clip_score(out, max_norm, n_particles=energy.n_particles, spatial_dim=energy.spatial_dim)


def _make_call(implementation: str, case: BenchCase) -> Any:
    import torch

    from boltzlab.energies import lj_benchmark
    from boltzlab.kernels import mc_score_estimate
    from boltzlab.kernels.reference import autograd_score_estimate, vmap_grad_score_estimate

    pot = lj_benchmark(case.n_particles)
    device = "cuda" if implementation in ("triton", "autograd_cuda") else "cpu"
    x = noisy_points(case).to(device)
    generator = torch.Generator(device=device).manual_seed(case.seed + 1)
    shape = (case.batch, case.n_samples, pot.dim)

    if implementation == "vmap_grad":
        return lambda: vmap_grad_score_estimate(pot, x, case.sigma, torch.randn(shape, generator=generator))
    if implementation in ("autograd", "autograd_cuda"):
        return lambda: autograd_score_estimate(
            pot, x, case.sigma, torch.randn(shape, generator=generator, device=device)).score
    if implementation in ("torch_eager", "torch_compiled"):
        compile = implementation == "torch_compiled"
        return lambda: mc_score_estimate(pot, x, case.sigma, case.n_samples, generator=generator,
                                         backend="torch", compile=compile).score
    if implementation in ("target_fused", "target_materialised"):
        from boltzlab.estimators import mc_score

        score = mc_score if implementation == "target_fused" else materialised_mc_score
        return lambda: score(pot, x, case.sigma, case.n_samples, generator=generator, estimator="blended",
                             local_scale=TARGET_LOCAL_SCALE, max_norm=TARGET_MAX_NORM)
    if implementation == "triton":
        return lambda: mc_score_estimate(pot, x, case.sigma, case.n_samples, generator=generator,
                                         backend="triton").score
    raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Child entry: time ``spec["implementation"]`` on ``spec["case"]``; returns a Measurement as a dict."""
    import gc

    import torch

    torch.set_num_threads(int(spec["threads"]))
    case = BenchCase(**spec["case"])
    implementation = spec["implementation"]
    call = _make_call(implementation, case)
    on_cuda = implementation in ("triton", "autograd_cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for _ in range(int(spec["warmup"])):
        call()
    sync()
    gc.collect()
    _release_free_heap()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = float(torch.cuda.memory_allocated())
        method = "torch.cuda.max_memory_allocated - allocated before"
    elif _reset_peak_rss():
        base = _rss_bytes("VmRSS")
        method = "VmHWM after clear_refs - VmRSS before"
    else:
        base = _rss_bytes("VmRSS")
        method = "ru_maxrss - VmRSS before (includes warm-up)"
    times = []
    for _ in range(int(spec["repeats"])):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    if on_cuda:
        peak = float(torch.cuda.max_memory_allocated()) - base
    elif method.startswith("VmHWM"):
        peak = _rss_bytes("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - base
    return asdict(Measurement(implementation, int(spec["threads"]), "ok", min(times), times, peak, method,
                              "cuda" if on_cuda else "cpu"))


# ----------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def measure(case: BenchCase, implementation: str, threads: int, repeats: int = 3, warmup: int = 1,
            timeout: float = 900.0) -> Measurement:
    """Run one measurement in a child process (see the module docstring)."""
    spec = {"case": asdict(case), "implementation": implementation, "threads": threads,
            "repeats": repeats, "warmup": warmup}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "boltzlab.kernels.benchmark", "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start = time.monotonic()
    while proc.poll() is None:
        if _mem_available() < MIN_FREE_BYTES:
            proc.kill()
            proc.wait()
            return Measurement(implementation, threads, "killed: the machine ran low on memory")
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            return Measurement(implementation, threads, f"killed: over {timeout:.0f} s")
        time.sleep(0.05)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return Measurement(implementation, threads, f"failed: {last[:200]}")
    return Measurement(**json.loads(lines[-1]))


def cpu_peak_flops() -> tuple[float, str]:
    """Estimated float32 peak of this CPU, FLOP/s, and how it was estimated.

    cores x clock (cpu MHz in /proc/cpuinfo) x lanes (16 with AVX-512, 8 with AVX2) x 2 (an FMA
    is two operations) x 2 (FMA units per core, as on current x86 server cores).
    """
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
    except OSError:
        return math.nan, "unknown (no /proc/cpuinfo)"
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    flags = set((re.findall(r"^flags\s*:\s*(.*)$", info, re.M) or [""])[0].split())
    cores = os.cpu_count() or 1
    lanes, isa = (16, "AVX-512") if "avx512f" in flags else (8, "AVX2") if "avx2" in flags else (4, "SSE")
    if not mhz:
        return math.nan, f"unknown clock ({isa})"
    clock = max(mhz) * 1e6
    peak = cores * clock * lanes * 2 * 2
    return peak, (f"{cores} cores x {clock / 1e9:.2f} GHz x {lanes} fp32 lanes ({isa}) x 2 (FMA) "
                  f"x 2 FMA units = {peak / 1e9:.0f} GFLOP/s")


def _fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def _fmt_bytes(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GB"
    return f"{max(value, 0.0) / 1024**2:.0f} MB"


def fastest(results: list[Measurement], *implementations: str) -> Measurement | None:
    """The fastest successful measurement of one of ``implementations`` (None if there is none)."""
    ok = [r for r in results if r.status == "ok" and r.implementation in implementations]
    return min(ok, key=lambda r: r.seconds) if ok else None


def benchmark_table(case: BenchCase, results: list[Measurement], baseline: str, peak_flops: float):
    """A :class:`boltzlab.tables.Table` (HTML in a notebook, aligned text elsewhere): one row per
    measurement, speed-up and memory ratios against the fastest ``baseline`` row."""
    from boltzlab.tables import table

    base = fastest(results, baseline)
    rows = []
    for r in results:
        row = {"implementation": IMPLEMENTATIONS.get(r.implementation, r.implementation), "threads": r.threads}
        if r.status != "ok":
            rows.append({**row, "time/call": r.status})
            continue
        rate = case.unique_pairs / r.seconds
        flops = 2 * FLOP_PER_ORDERED_PAIR * rate
        fast_path = r.implementation.startswith(("torch", "triton"))
        cpu_share = fast_path and r.device == "cpu" and math.isfinite(peak_flops)
        rows.append({**row, "time/call": _fmt_time(r.seconds), "peak mem": _fmt_bytes(r.peak_bytes),
                     "speed-up": f"{base.seconds / r.seconds:.1f}x" if base else "-",
                     "mem ratio": f"{base.peak_bytes / max(r.peak_bytes, 1.0):.1f}x" if base else "-",
                     "pairs/s": f"{rate:.2e}", "GFLOP/s": f"{flops / 1e9:.1f}" if fast_path else "-",
                     "% peak": f"{100 * flops / peak_flops:.1f}" if cpu_share else "-"})
    columns = ["implementation", "threads", "time/call", "peak mem", "speed-up", "mem ratio", "pairs/s", "GFLOP/s",
               "% peak"]
    caption = (f"{case.name}: B={case.batch}, K={case.n_samples}, float32, "
               f"{case.unique_pairs / 1e6:.1f} M unique pair interactions per call")
    return table(rows, columns=columns, caption=caption)


def format_table(case: BenchCase, results: list[Measurement], baseline: str, peak_flops: float) -> str:
    """The same table as aligned text (for the benchmark scripts' output)."""
    return str(benchmark_table(case, results, baseline, peak_flops))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("internal worker; run benchmarks/bench_score_estimator.py instead")

"""Benchmark the DEM Monte Carlo score estimator against the straightforward autograd version.

    .venv/bin/python benchmarks/bench_score_estimator.py            # LJ-13 B=512 K=1000, LJ-55 B=128 K=100
    .venv/bin/python benchmarks/bench_score_estimator.py --quick    # small sizes, about a minute

For each size it measures, in the same run and each in its own child process:
the iDEM-style vmap/grad estimator, the batched autograd estimator, and boltzlab's streamed
path (eager and torch.compile, 1 and 2 threads; the Triton kernels too when CUDA is present).
It prints time per call, peak memory, speed-up and memory ratio against the vmap/grad
baseline, unique pair interactions per second and achieved FLOP/s against this CPU's peak.
How time and memory are measured: see boltzlab/kernels/benchmark.py.

The full run needs about 10 GB of free memory for the baseline (a watchdog kills it before
the machine runs out) and several minutes. Other people's jobs on a shared machine change
the timings by up to about 2x: compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from boltzlab.kernels.benchmark import BenchCase, Measurement, cpu_peak_flops, fastest, format_table, measure

TARGET_SPEEDUP = 30.0
TARGET_MEMORY_RATIO = 20.0


def plan(quick: bool, threads: list[int], baseline_threads: list[int], skip_vmap: bool) -> list[tuple[str, int, int, int]]:
    """(implementation, threads, warm-up calls, timed calls) in the order they run."""
    base_repeats = 3 if quick else 1  # the full-size baselines take up to a minute per call
    rows = []
    for t in baseline_threads:
        if not skip_vmap:
            rows.append(("vmap_grad", t, 0, base_repeats))
        rows.append(("autograd", t, 0, base_repeats))
    for t in threads:
        rows.append(("torch_eager", t, 1, 3 if quick else 1))
    for t in threads:
        rows.append(("torch_compiled", t, 1, 5))
    if torch.cuda.is_available():
        rows += [("autograd_cuda", 1, 1, 3), ("triton", 1, 2, 10)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (LJ-13 B=64 K=100, LJ-55 B=16 K=20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the points and the noise")
    parser.add_argument("--threads", default="1,2", help="thread counts for boltzlab's path (default 1,2)")
    parser.add_argument("--baseline-threads", default="1,2", help="thread counts for the baselines (default 1,2)")
    parser.add_argument("--skip-vmap", action="store_true", help="leave out the vmap/grad baseline")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    baseline_threads = [int(t) for t in args.baseline_threads.split(",") if t.strip()]
    sizes = [(13, 64, 100), (55, 16, 20)] if args.quick else [(13, 512, 1000), (55, 128, 100)]
    cases = [BenchCase(n, b, k, seed=args.seed) for n, b, k in sizes]
    peak, peak_note = cpu_peak_flops()
    baseline = "autograd" if args.skip_vmap else "vmap_grad"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available; CUDA: {torch.cuda.is_available()}")
    print(f"CPU float32 peak estimate: {peak_note}")
    print("Note: this machine may be shared; timings vary up to ~2x between runs. Ratios come from one run.")
    print("Time: best of the timed calls, after warm-up (compilation) for boltzlab's path. Memory: peak RSS the "
          "calls added (VmHWM after clear_refs), in a fresh process per row.\n")

    record: dict[str, list[dict]] = {}
    verdicts = []
    for case in cases:
        results: list[Measurement] = []
        for implementation, t, warmup, repeats in plan(args.quick, threads, baseline_threads, args.skip_vmap):
            start = time.time()
            print(f"  measuring {case.name} {implementation} ({t} thread{'s' if t > 1 else ''}) ...",
                  file=sys.stderr, flush=True)
            results.append(measure(case, implementation, t, repeats=repeats, warmup=warmup))
            print(f"    done in {time.time() - start:.0f} s: {results[-1].status}", file=sys.stderr, flush=True)
        print(format_table(case, results, baseline, peak))
        print()
        record[case.name] = [asdict(r) for r in results]
        ours = fastest(results, "torch_eager", "torch_compiled")
        for name in dict.fromkeys([baseline, "autograd"]):
            base = fastest(results, name)
            if base is None or ours is None:
                continue
            speed, memory = base.seconds / ours.seconds, base.peak_bytes / max(ours.peak_bytes, 1.0)
            line = (f"{case.name} on this CPU: fastest boltzlab path ({ours.implementation}, {ours.threads} "
                    f"thread(s)) vs fastest {name} ({base.threads} thread(s)): {speed:.0f}x faster, "
                    f"{memory:.0f}x less peak memory")
            if not args.quick:  # the targets are stated for the full sizes
                ok = speed >= TARGET_SPEEDUP and memory >= TARGET_MEMORY_RATIO
                verdicts.append(ok)
                line += (f" (targets {TARGET_SPEEDUP:.0f}x and {TARGET_MEMORY_RATIO:.0f}x: "
                         f"{'met' if ok else 'NOT met'})")
            print(line)
        print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"peak_flops": peak, "peak_note": peak_note, "torch": torch.__version__,
                       "cases": {c.name: asdict(c) for c in cases}, "results": record}, handle, indent=1)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

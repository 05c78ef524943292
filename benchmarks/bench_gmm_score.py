"""Benchmark the DEM score estimate on GMM-40 (chapter 05's inner loop) against its earlier chunking.

    .venv/bin/python benchmarks/bench_gmm_score.py            # B = 4096 points, K = 256 copies
    .venv/bin/python benchmarks/bench_gmm_score.py --quick    # B = 1024

``copy_log_weights_and_forces`` evaluates the B * K copies in chunks of points holding at most
``_MAX_COPY_ELEMENTS`` (point, copy, coordinate) entries. GMM-40's energy builds a (copies, 40, 2)
difference tensor, so chunks of 2^22 entries meant temporaries of hundreds of MB, allocated and
freed per chunk. This script times ``mc_score`` with the shipped cap against 2^22 in the same run,
on one thread, and checks that both give the same estimate. A ratio above 1 means the shipped cap
is faster. Other jobs on a shared machine move the absolute numbers by up to about 2x.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import boltzlab.estimators as estimators
from boltzlab.energies import GaussianMixture

EARLIER_CAP = 1 << 22


def best_of(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--copies", type=int, default=256, help="K, copies per point")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gmm = GaussianMixture()
    batch = 1024 if args.quick else 4096
    points = gmm.sample(batch, torch.Generator().manual_seed(0), dtype=torch.float64)

    def estimate() -> torch.Tensor:
        return estimators.mc_score(gmm, points, 1.0, args.copies, generator=torch.Generator().manual_seed(1))

    shipped_cap = estimators._MAX_COPY_ELEMENTS
    try:
        estimators._MAX_COPY_ELEMENTS = EARLIER_CAP
        t_earlier, s_earlier = best_of(estimate, args.repeats)
    finally:
        estimators._MAX_COPY_ELEMENTS = shipped_cap
    t_shipped, s_shipped = best_of(estimate, args.repeats)
    copies = batch * args.copies
    print(f"mc_score on GMM-40, B = {batch}, K = {args.copies}, float64, one thread; best of {args.repeats}")
    print(f"  cap 2^22 (earlier)   {t_earlier:6.2f} s   {copies / t_earlier / 1e6:5.2f} M copies/s")
    print(f"  cap {shipped_cap} (shipped) {t_shipped:6.2f} s   {copies / t_shipped / 1e6:5.2f} M copies/s")
    print(f"  speed-up {t_earlier / t_shipped:.1f}x; largest difference between the two estimates "
          f"{float((s_earlier - s_shipped).abs().max()):.1e}")


if __name__ == "__main__":
    main()

"""Do two cores make two? One EGNN training step (LJ-13, hidden 64 x 4, compiled, one thread per
process) timed in a process alone, in two independent processes side by side, and on both ranks
of a DDP pair (gloo), so the cost of sharing the machine is told apart from the cost of
communication.

    .venv/bin/python benchmarks/bench_two_cores.py            # B = 128 per process
    .venv/bin/python benchmarks/bench_two_cores.py --batch 64

Prints one line per mode: milliseconds per step on each process (best of 3 x 20 steps).
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, mode: str, batch: int, steps: int, port: int, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    from boltzlab.models import EGNN

    torch.manual_seed(rank)
    net = EGNN(13, 3, hidden=64, n_layers=4, seed=0)
    if mode == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
    forward = torch.compile(model, dynamic=False)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    x, t, y = torch.randn(batch, 39), torch.rand(batch), torch.randn(batch, 39)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        (forward(x, t) - y).pow(2).sum(-1).mean().backward()
        optimizer.step()

    for _ in range(5):  # compile and warm up
        step()
    if mode == "ddp":
        dist.barrier()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    queue.put((rank, best))
    if mode == "ddp":
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="points per process and step")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; EGNN 64 x 4 training step, B = {args.batch} per process")
    for mode, world in (("alone", 1), ("side by side", 2), ("ddp", 2)):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, world, mode, args.batch, args.steps, 29533, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        times = sorted(queue.get() for _ in range(world))
        print(f"{mode:>12s}: " + ", ".join(f"{1e3 * s:.1f} ms" for _, s in times))


if __name__ == "__main__":
    main()

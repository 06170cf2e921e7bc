"""Host roofline: measured memory bandwidth (STREAM-style copy and triad on tensors far larger
than the caches) and fp32 GEMM peak (torch.mm), at the thread count the benchmark uses.
FLOPs of a graph come from torch's FlopCounterMode on the eager module (matmul/conv/sdpa)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _best_and_median(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    fn()  # first touch / warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def memory_bandwidth(threads: int, mib: int = 256, repeats: int = 8) -> dict:
    """GB/s for copy (a = b: 2 arrays of traffic) and triad (a = b + s*c: 3 arrays)."""
    torch.set_num_threads(threads)
    n = mib * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    nbytes = n * 4
    copy_best, copy_med = _best_and_median(lambda: a.copy_(b), repeats)
    triad_best, triad_med = _best_and_median(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    return {"array_mib": mib, "repeats": repeats, "threads": threads,
            "copy_gbs": 2 * nbytes / copy_best / 1e9, "copy_gbs_median": 2 * nbytes / copy_med / 1e9,
            "triad_gbs": 3 * nbytes / triad_best / 1e9, "triad_gbs_median": 3 * nbytes / triad_med / 1e9,
            "bandwidth_gbs": max(2 * nbytes / copy_best, 3 * nbytes / triad_best) / 1e9}


def gemm_peak(threads: int, n: int = 1024, repeats: int = 10) -> dict:
    """fp32 GFLOP/s of an n x n x n torch.mm (2 n^3 FLOPs)."""
    torch.set_num_threads(threads)
    x, y, out = torch.rand(n, n), torch.rand(n, n), torch.empty(n, n)
    best, med = _best_and_median(lambda: torch.mm(x, y, out=out), repeats)
    flops = 2 * n ** 3
    return {"n": n, "repeats": repeats, "threads": threads, "gflops": flops / best / 1e9, "gflops_median": flops / med / 1e9}


@torch.no_grad()
def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def host_roofline(threads: int, quick: bool = False) -> dict:
    """Both ceilings measured back to back in this run; `quick` shrinks them (tests)."""
    bw = memory_bandwidth(threads, mib=32 if quick else 256, repeats=3 if quick else 8)
    mm = gemm_peak(threads, n=256 if quick else 1024, repeats=3 if quick else 10)
    return {"bandwidth": bw, "gemm": mm, "bandwidth_gbs": bw["bandwidth_gbs"], "gemm_gflops": mm["gflops"]}

"""Host roofline, measured at the thread count the benchmark uses.

Bandwidth: a read-bandwidth curve over working-set sizes (an fp32 array of that size summed over
and over, so a size that fits in a cache reads from that cache), plus STREAM-style copy and triad
on arrays far larger than the caches (DRAM). Each decode row is compared with the bandwidth read
at its own bytes per token (`ensure_point` measures that size; `bandwidth_at` interpolates), and
named by the cache level that size fits in (`cache_level`, from the sizes in sysfs).

Compute: the best fp32 GEMM over several kernels and shapes (square torch.mm, the matmul shapes of
the model's own DiT and decoder prefill, torch.bmm of the CFG batch, and ONNX Runtime's MatMul), so
the peak is what the backends' kernels can reach, not one torch.mm size.

A fraction of a ceiling above 1 means the ceiling is wrong (the model of the machine, not the
backend): `fraction` keeps such a number out of the result and returns the flag instead.
FLOPs of a graph come from torch's FlopCounterMode on the eager module (matmul/conv/sdpa)."""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
CURVE_BYTES = [256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]  # 256 MiB: 8x a 32 MiB L3
QUICK_CURVE_BYTES = [256 << 10, 4 << 20, 64 << 20]
MIN_TRAFFIC = 64 << 20  # bytes read per timed sample: small arrays are read several times per sample


def _best_and_median(fn: Callable[[], object], repeats: int, budget_s: float = 0.0,
                     max_repeats: int = 30) -> tuple[float, float]:
    """Best and median of `repeats` timed calls after one warm-up; with `budget_s`, more calls
    (up to max_repeats) while the total stays under it: short probes get many tries, so one
    descheduled thread on a busy machine does not set the number."""
    fn()  # first touch / warm-up
    times: list[float] = []
    while len(times) < repeats or (len(times) < max_repeats and sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


# -- bandwidth -----------------------------------------------------------------------------------
def memory_bandwidth(threads: int, mib: int = 256, repeats: int = 8) -> dict:
    """DRAM GB/s for copy (a = b: 2 arrays of traffic) and triad (a = b + s*c: 3 arrays)."""
    torch.set_num_threads(threads)
    n = mib * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.full((n,), 1.0), torch.full((n,), 2.0)  # fill: far cheaper than rand
    nbytes = n * 4
    copy_best, copy_med = _best_and_median(lambda: a.copy_(b), repeats)
    triad_best, triad_med = _best_and_median(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    return {"array_mib": mib, "repeats": repeats, "threads": threads,
            "copy_gbs": 2 * nbytes / copy_best / 1e9, "copy_gbs_median": 2 * nbytes / copy_med / 1e9,
            "triad_gbs": 3 * nbytes / triad_best / 1e9, "triad_gbs_median": 3 * nbytes / triad_med / 1e9,
            "bandwidth_gbs": max(2 * nbytes / copy_best, 3 * nbytes / triad_best) / 1e9}


def read_bandwidth(threads: int, nbytes: int, repeats: int = 5, budget_s: float = 0.1) -> dict:
    """GB/s of reading an fp32 array of `nbytes` (a sum over a stride-0 repeat of it, so one
    timed call reads at least MIN_TRAFFIC bytes and dispatch overhead does not count), the best
    of `threads` threads and of 1: on a busy machine one thread is not held up by the other."""
    n = max(1024, int(nbytes) // 4)
    x = torch.full((n,), 1.0)
    passes = max(1, MIN_TRAFFIC // (4 * n))
    view = x.expand(passes, n)
    traffic = 4 * n * passes
    runs = []
    for t in dict.fromkeys((threads, 1)):
        torch.set_num_threads(t)
        best, med = _best_and_median(lambda: view.sum(), repeats, budget_s)
        runs.append((traffic / best / 1e9, traffic / med / 1e9, t))
    torch.set_num_threads(threads)
    gbs, med, t = max(runs)
    return {"bytes": 4 * n, "gbs": gbs, "gbs_median": med, "best_threads": t}


def cpu_caches() -> list[dict]:
    """Data/unified caches of CPU 0 from sysfs: level name, bytes, CPUs sharing one instance.
    Empty where sysfs has none (macOS): levels are then not named."""
    out = []
    for d in sorted(CACHE_SYSFS.glob("index*")):
        try:
            kind = (d / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = int((d / "level").read_text())
            size = _size_bytes((d / "size").read_text().strip())
            shared = _cpu_count((d / "shared_cpu_list").read_text().strip())
        except (OSError, ValueError):
            continue
        out.append({"level": f"L{level}", "bytes": size, "shared_by_cpus": shared})
    return sorted(out, key=lambda c: c["bytes"])


def _size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _cpu_count(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def cache_level(nbytes: float, caches: list[dict], threads: int) -> str | None:
    """The smallest level a working set of `nbytes` read by `threads` threads fits in: a private
    cache counts once per thread (threads on separate cores), a shared one once per instance
    used. "DRAM" beyond the last level; None when the caches are unknown."""
    if not caches:
        return None
    for c in caches:
        instances = math.ceil(max(1, threads) / max(1, c["shared_by_cpus"]))
        if nbytes <= c["bytes"] * instances:
            return c["level"]
    return "DRAM"


def bandwidth_at(points: list[dict], nbytes: float) -> float:
    """GB/s at `nbytes` from the curve: the measured point of that size (within 1%), else linear
    in log(size) between its neighbours, else the nearest end; and never less than a larger
    working set read (a smaller one is not slower: a dip is noise, e.g. a descheduled thread)."""
    pts = sorted(points, key=lambda p: p["bytes"])
    if not pts:
        raise ValueError("empty bandwidth curve")
    sizes = [p["bytes"] for p in pts]
    i = bisect.bisect_left(sizes, nbytes)
    larger = max((p["gbs"] for p in pts if p["bytes"] > 1.01 * nbytes), default=0.0)
    near = [pts[j]["gbs"] for j in (i - 1, i) if 0 <= j < len(pts) and abs(sizes[j] - nbytes) <= 0.01 * nbytes]
    if near:
        at = max(near)
    elif i == 0 or i == len(pts):
        at = pts[min(i, len(pts) - 1)]["gbs"]
    else:
        lo, hi = pts[i - 1], pts[i]
        w = (math.log(nbytes) - math.log(lo["bytes"])) / (math.log(hi["bytes"]) - math.log(lo["bytes"]))
        at = lo["gbs"] + w * (hi["gbs"] - lo["gbs"])
    return max(at, larger)


def bandwidth_curve(threads: int, sizes: list[int], repeats: int) -> dict:
    caches = cpu_caches()
    points = [{**read_bandwidth(threads, s, repeats), "source": "curve"} for s in sizes]
    for p in points:
        p["level"] = cache_level(p["bytes"], caches, threads)
    return {"method": "read: sum of an fp32 array of `bytes`, best of at least `repeats` calls at `threads` and at 1 "
                      "thread", "threads": threads,
            "repeats": repeats, "caches": caches, "points": points}


def ensure_point(roof: dict, nbytes: int, label: str) -> dict:
    """The curve's point at `nbytes` (within 1%), measured now if the curve has none: a row's
    ceiling is the bandwidth at the working set it streams, not an interpolation."""
    curve = roof["bandwidth_curve"]
    for p in curve["points"]:
        if abs(p["bytes"] - nbytes) <= 0.01 * nbytes:
            if label not in p.setdefault("rows", []):
                p["rows"].append(label)
            return p
    p = {**read_bandwidth(curve["threads"], nbytes, curve["repeats"]), "source": "row", "rows": [label]}
    p["level"] = cache_level(p["bytes"], curve["caches"], curve["threads"])
    curve["points"] = sorted(curve["points"] + [p], key=lambda q: q["bytes"])
    return p


# -- compute -------------------------------------------------------------------------------------
_MATMUL_ARGS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
                torch.ops.aten.bmm.default: (0, 1)}  # op -> positions of its two matrix operands


class _MatmulShapes(TorchDispatchMode):
    """Records (M, K, N) of every mm/addmm and (B, M, K, N) of every bmm, weighted by FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = _MATMUL_ARGS.get(func)
        if operands is not None:
            x, y = args[operands[0]], args[operands[1]]
            shape = tuple(x.shape) + (y.shape[-1],)
            self.flops[shape] += 2 * math.prod(shape)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def matmul_shapes(fn: Callable[[], object], top: int = 3) -> list[tuple[int, ...]]:
    """The `top` matmul shapes carrying the most FLOPs of `fn`'s eager run."""
    with _MatmulShapes() as mode:
        fn()
    return [s for s, _ in mode.flops.most_common(top)]


def _torch_gemm(shape: tuple[int, ...]) -> tuple[str, Callable[[], object]]:
    if len(shape) == 4:
        b, m, k, n = shape
        x, y, out = torch.rand(b, m, k), torch.rand(b, k, n), torch.empty(b, m, n)
        return "torch.bmm", lambda: torch.bmm(x, y, out=out)
    m, k, n = shape
    x, y, out = torch.rand(m, k), torch.rand(k, n), torch.empty(m, n)
    return "torch.mm", lambda: torch.mm(x, y, out=out)


def _ort_gemm(shape: tuple[int, int, int], threads: int) -> tuple[str, Callable[[], object]] | None:
    """ONNX Runtime (MLAS) MatMul of an input by a constant weight, as the exported linears run."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k, n = shape
    w = numpy_helper.from_array(np.random.rand(k, n).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.rand(m, k).astype(np.float32)}
    return "onnxruntime MatMul", lambda: sess.run(None, feed)


def gemm_peak(threads: int, shapes: dict[str, list[tuple[int, ...]]] | None = None, square: tuple[int, ...] = (256, 1024),
              repeats: int = 10, ort: bool = True) -> dict:
    """fp32 GFLOP/s, the best over kernels x shapes: square torch.mm (n^3), and for each
    `shapes` source (e.g. "dit batch2": its top matmul shapes) torch.mm/bmm and ORT MatMul."""
    torch.set_num_threads(threads)
    jobs = {(n, n, n): "square" for n in square}
    for src, lst in (shapes or {}).items():
        for s in lst:
            jobs.setdefault(tuple(s), src)  # a shape two graphs share is measured once
    cands = []
    for shape, src in jobs.items():
        kernels = [_torch_gemm(shape)]
        if ort and len(shape) == 3 and src != "square":
            kernels.append(_ort_gemm(shape, threads))
        for k in filter(None, kernels):
            best, med = _best_and_median(k[1], repeats, budget_s=0.1)
            flops = 2 * math.prod(shape)
            cands.append({"kernel": k[0], "shape": list(shape), "source": src,
                          "gflops": flops / best / 1e9, "gflops_median": flops / med / 1e9})
    peak = max(cands, key=lambda c: c["gflops"])
    return {"n": max(square), "repeats": repeats, "threads": threads, "gflops": peak["gflops"],
            "gflops_median": peak["gflops_median"], "kernel": peak["kernel"], "shape": peak["shape"],
            "source": peak["source"], "candidates": cands}


@torch.no_grad()
def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def host_roofline(threads: int, quick: bool = False, shapes: dict[str, list[tuple[int, ...]]] | None = None) -> dict:
    """Both ceilings measured back to back in this run; `quick` shrinks them (tests)."""
    bw = memory_bandwidth(threads, mib=32 if quick else 256, repeats=3 if quick else 5)
    curve = bandwidth_curve(threads, QUICK_CURVE_BYTES if quick else CURVE_BYTES, repeats=3 if quick else 5)
    mm = gemm_peak(threads, shapes, square=(256,) if quick else (256, 1024), repeats=3 if quick else 5, ort=not quick)
    return {"bandwidth": bw, "bandwidth_curve": curve, "gemm": mm,
            "bandwidth_gbs": bw["bandwidth_gbs"], "gemm_gflops": mm["gflops"]}


def fraction(out: dict, key: str, raw: float) -> None:
    """out[key] = raw when raw <= 1; above 1 the ceiling under-estimates the machine, so out[key]
    is None, the number stays in out[key + "_raw"] and out["flags"][key] says why."""
    out[f"{key}_raw"] = raw
    ok = raw <= 1.0
    out[key] = raw if ok else None
    if not ok:
        out.setdefault("flags", {})[key] = f"model error: {raw:.1%} > 100% of the measured ceiling"

"""`manzano-edge profile BUNDLE`: where an ExecuTorch graph spends its time, from ETDump.

Two sources, one report (schema `manzano-edge/profile@1`):
- this machine: each graph's XNNPACK `.pte` runs `--runs` times through `executorch.runtime`
  with ETDump enabled, on inputs shaped by the graph declaration (decoder: one decode step at
  cache position `--position`; DiT: the CFG batch of 2);
- a device: ETDump files written by ExecuTorch's runners (`executor_runner --etdump_path`, the
  iOS/Android benchmark apps), passed as `--etdump GRAPH=FILE --device NAME`.

Both are read with ExecuTorch devtools' `Inspector`. Per graph: `Method::execute` median / p90
(the first run is dropped as warm-up) and the op breakdown: every XNNPACK kernel (its name says
its datatypes: `QD8 ... QC8W` is the int8 dynamically quantized GEMM, `QP8`/`QB4W` the 4-bit
one, `F32` float) and every op left on the portable kernels, with calls and ms per run. The
`kernels` summary splits GEMM time into integer and float, which is how a recipe is checked to
really take the integer kernels.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from pathlib import Path

import torch

from manzano_edge.bench.measure import summarize as timing_stats
from manzano_edge.errors import UserError
from manzano_edge.fsutil import atomic_output_dir
from manzano_edge.runtime.bundle import Bundle
from manzano_edge.spec.graphs import GraphSpec, TensorSpec

SCHEMA = "manzano-edge/profile@1"
INTEGER_MARKERS = ("QD8", "QDU8", "QC8W", "QC4W", "QB4W", "QP8", "QS8", "QU8")
# A portable op is traced twice: an OPERATOR_CALL wrapper around its native_call_* event.
SKIPPED_EVENTS = ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")


def synthetic_inputs(spec: GraphSpec, bundle: Bundle, position: int) -> dict[str, torch.Tensor]:
    """Inputs with the declared shapes and valid values; timing does not depend on the values."""
    cfg = bundle.cfg
    gen = torch.Generator().manual_seed(0)
    # Smallest sizes (seq 1: a decode step), except the CFG batch and the decoder's cache length.
    sizes = {name: d.max if name == "batch" else d.min for name, d in spec.dims.items()}
    if "cache_len" in sizes:
        sizes["cache_len"] = min(position + 1, spec.dims["cache_len"].max)
    out = {}
    for t in spec.inputs:
        shape = t.concrete(sizes)
        out[t.name] = _value(t, shape, cfg, gen)
    return out


def _value(t: TensorSpec, shape: tuple[int, ...], cfg, gen: torch.Generator) -> torch.Tensor:
    if t.name == "causal_mask":
        return torch.zeros(shape)  # every cached position visible: the decode step's real work
    if t.dtype.startswith("int"):
        high = cfg.vocab_size if t.name == "tokens" else cfg.vision.codebook_size
        return torch.randint(0, high, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    if t.name == "timestep":
        return torch.rand(shape, generator=gen)
    return torch.randn(shape, generator=gen)


def run_with_etdump(pte: Path, inputs: dict[str, torch.Tensor], spec: GraphSpec, runs: int, etdump: Path,
                    threads: int | None) -> None:
    from manzano_edge.runtime.backends.executorch import runtime

    if threads:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
    program = runtime().load_program(pte, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    args = tuple(inputs[t.name] for t in spec.inputs)
    for _ in range(runs + 1):  # +1: the first run is warm-up, dropped in `summarize`
        method.execute(args)
    program.write_etdump_result_to_file(str(etdump), str(etdump.with_suffix(".debug")))


def summarize(etdump: Path) -> dict:
    """Method::execute stats and the per-op breakdown (ms per run) of one ETDump."""
    from executorch.devtools import Inspector

    try:
        frame = Inspector(etdump_path=str(etdump)).to_dataframe()
    except Exception as exc:  # Inspector raises assorted errors on a file that is not an ETDump
        raise UserError(f"{etdump} is not a readable ETDump ({type(exc).__name__}); pass the .etdp file the "
                        "runner wrote with --etdump_path") from exc
    rows = frame[frame["event_block_name"] == "Execute"]
    execute = next((list(r.raw) for r in rows.itertuples() if r.event_name == "Method::execute"), None)
    if not execute:
        raise UserError(f"{etdump} has no Method::execute events; run the program with ETDump (event tracer) enabled")
    runs = len(execute)
    skip = 1 if runs > 1 else 0
    ops: dict[str, dict] = {}
    for r in rows.itertuples():
        if r.event_name in SKIPPED_EVENTS or r.event_name.startswith("Program::"):
            continue
        name = re.sub(r" #\d+$", "", r.event_name)
        raw = list(r.raw)[skip:]
        op = ops.setdefault(name, {"calls_per_run": 0, "ms_per_run": 0.0, "delegated": bool(r.is_delegated_op)})
        op["calls_per_run"] += 1
        op["ms_per_run"] += sum(raw) / max(1, len(raw))
    delegate_calls = next((list(r.raw)[skip:] for r in rows.itertuples() if r.event_name == "DELEGATE_CALL"), [])
    gemm = {k: v for k, v in ops.items() if "GEMM" in k or "Fully Connected" in k or "Batch Matrix" in k}
    integer = sum(v["ms_per_run"] for k, v in gemm.items() if any(m in k for m in INTEGER_MARKERS))
    return {"execute": timing_stats([ms / 1e3 for ms in execute[skip:]]),
            "delegate_calls_per_run": round(len(delegate_calls) / max(1, runs - skip)) if delegate_calls else 0,
            "kernels": {"integer_gemm_ms": integer, "float_gemm_ms": sum(v["ms_per_run"] for v in gemm.values()) - integer,
                        "portable_ms": sum(v["ms_per_run"] for v in ops.values() if not v["delegated"])},
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms_per_run"]))}


def parse_etdumps(values: list[str], bundle: Bundle) -> dict[str, Path]:
    out = {}
    for item in values:
        graph, sep, path = item.partition("=")
        if not sep or graph not in bundle.specs:
            raise UserError(f"--etdump '{item}': write GRAPH=FILE with GRAPH in {', '.join(bundle.specs)}")
        if not Path(path).is_file():
            raise UserError(f"--etdump {graph}: file {path} does not exist")
        out[graph] = Path(path)
    return out


def profile(bundle_path: str | Path, graphs: list[str] | None, runs: int = 20, threads: int | None = None,
            position: int = 32, etdumps: list[str] | None = None, device: str | None = None) -> dict:
    bundle = Bundle(bundle_path)
    imported = parse_etdumps(etdumps or [], bundle)
    names = list(imported) if imported else (graphs or [g for g in bundle.specs
                                                         if "executorch" in bundle.manifest["graphs"][g]["formats"]])
    results = {}
    with tempfile.TemporaryDirectory(prefix="profile-") as work:
        for name in names:
            entry = bundle.manifest["graphs"].get(name, {}).get("formats", {}).get("executorch")
            if entry is None:
                raise UserError(f"bundle {bundle.path} has no ExecuTorch program for graph '{name}'")
            if name in imported:
                etdump, source = imported[name], f"device: {device or 'unnamed'} ({imported[name].name})"
            else:
                spec = bundle.specs[name]
                etdump = Path(work) / f"{name}.etdp"
                run_with_etdump(bundle.verified_file(entry["file"], entry["sha256"]),
                                synthetic_inputs(spec, bundle, position), spec, runs, etdump, threads)
                source = "this machine (executorch.runtime + ETDump)"
            results[name] = {"source": source, "recipe": entry["recipe"]["name"], "delegates": entry.get("delegates"),
                             **summarize(etdump)}
    return {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "bundle": str(bundle.path), "recipe": bundle.manifest.get("recipe"), "device": device or "this machine",
            "settings": {"runs": runs, "threads": threads, "decode_position": position}, "graphs": results}


def markdown(report: dict, top: int = 12) -> str:
    lines = [f"# ExecuTorch profile: `{Path(report['bundle']).name}` ({report['recipe']}) on {report['device']}", "",
             "| graph | recipe | partitions | execute ms (median / p90) | integer GEMM ms | float GEMM ms | portable ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, g in report["graphs"].items():
        k, e = g["kernels"], g["execute"]
        lines.append(f"| {name} | {g['recipe']} | {g['delegates']} | {e['median_ms']:.3f} / {e['p90_ms']:.3f} "
                     f"| {k['integer_gemm_ms']:.3f} | {k['float_gemm_ms']:.3f} | {k['portable_ms']:.3f} |")
    for name, g in report["graphs"].items():
        lines += ["", f"## {name}: top ops by time ({g['source']})", "", "| op | delegated | calls/run | ms/run |",
                  "|---|---|---:|---:|"]
        for op, v in list(g["ops"].items())[:top]:
            lines.append(f"| {op} | {'XNNPACK' if v['delegated'] else 'portable'} | {v['calls_per_run']} "
                         f"| {v['ms_per_run']:.4f} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "profile.md").write_text(markdown(report))
    return out

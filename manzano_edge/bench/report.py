"""The bench report: JSON (schema `manzano-edge/bench@1`), a Markdown summary and two plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from manzano_edge.errors import UserError

SCHEMA = "manzano-edge/bench@1"
JSON_FILE, MD_FILE = "bench.json", "bench.md"
LATENCY_PNG, DECODE_PNG = "latency_per_graph.png", "decode_tok_s.png"

# key -> type(s) required in every report / every row; docs/guides/benchmarking.md documents the full layout.
TOP = {"schema": str, "created": str, "context": dict, "roofline": dict, "bundles": list, "results": list,
       "comparisons": dict}
ROW = {"label": str, "backend": str, "recipe": str, "bundle": str, "status": str, "files": dict}
OK_ROW = {"threads": dict, "load_s": dict, "load_total_s": float, "latency": dict, "decoder": dict, "diffusion": dict,
          "e2e": dict, "memory": dict, "roofline": dict}
STAT = ("median_ms", "p90_ms", "runs")
NUMBER = (int, float)


def _need(obj: dict, keys: dict, where: str) -> list[str]:
    errs = []
    for k, t in keys.items():
        if k not in obj:
            errs.append(f"{where}: missing '{k}'")
        elif not isinstance(obj[k], NUMBER if t is float else t):
            errs.append(f"{where}: '{k}' is {type(obj[k]).__name__}, expected {t.__name__}")
    return errs


def _stat(value, where: str) -> list[str]:
    if not isinstance(value, dict) or any(not isinstance(value.get(k), NUMBER) for k in STAT):
        return [f"{where}: expected {{median_ms, p90_ms, runs}}"]
    return [] if value["p90_ms"] >= value["median_ms"] >= 0 else [f"{where}: p90 < median or negative"]


def schema_errors(rep: dict) -> list[str]:
    """Everything that makes `rep` not a well-formed bench@1 report (empty list = valid)."""
    errs = _need(rep, TOP, "report")
    if errs:
        return errs
    if rep["schema"] != SCHEMA:
        errs.append(f"schema is {rep['schema']!r}, expected {SCHEMA!r}")
    for k in ("bandwidth_gbs", "gemm_gflops"):
        if not isinstance(rep["roofline"].get(k), NUMBER) or rep["roofline"][k] <= 0:
            errs.append(f"roofline: '{k}' must be a positive number")
    errs += _curve_errors(rep["roofline"])
    errs += _need(rep["context"], {"machine": dict, "tools": dict, "threads": dict, "settings": dict}, "context")
    for i, row in enumerate(rep["results"]):
        where = f"results[{i}]"
        errs += _need(row, ROW, where)
        if row.get("status") not in ("ok", "skipped", "error"):
            errs.append(f"{where}: status must be ok|skipped|error")
        if row.get("status") != "ok":
            if not isinstance(row.get("reason"), str) or not row["reason"]:
                errs.append(f"{where}: a {row.get('status')} row needs a reason")
            continue
        errs += _need(row, OK_ROW, where)
        if errs:
            continue
        errs += [e for case, st in row["latency"].items() for e in _stat(st, f"{where}.latency[{case}]")]
        d = row["decoder"]
        errs += _stat(d.get("ttft_ms"), f"{where}.decoder.ttft_ms")
        for k in ("prefill_tok_s", "decode_tok_s"):
            if not isinstance(d.get(k), NUMBER) or d[k] <= 0:
                errs.append(f"{where}.decoder: '{k}' must be positive")
        errs += _stat(row["e2e"].get("caption_ms"), f"{where}.e2e.caption_ms")
        errs += _stat(row["e2e"].get("text_to_image_ms"), f"{where}.e2e.text_to_image_ms")
        if not isinstance(row["memory"].get("peak_rss_mb"), NUMBER):
            errs.append(f"{where}.memory: missing peak_rss_mb")
        errs += _fraction_errors(row["roofline"], f"{where}.roofline")
    c = rep["comparisons"]
    for k in ("best_vs_eager", "kv_cache_vs_recompute", "decode_roofline", "compute_roofline"):
        if k not in c:
            errs.append(f"comparisons: missing '{k}'")
    return errs


FRACTIONS = ("decode_bandwidth_fraction", "prefill_compute_fraction")  # + dit_batch{1,2}_compute_fraction


def _fraction_errors(rf: dict, where: str) -> list[str]:
    """A fraction is a number; since the bandwidth curve (`*_raw` present) it is at most 1, or
    null with its raw number above 1 and a flag saying the ceiling was wrong."""
    errs = []
    keys = list(FRACTIONS) + [k for k in rf if k.startswith("dit_") and k.endswith("_compute_fraction")]
    for k in keys:
        v, raw = rf.get(k), rf.get(f"{k}_raw")
        if raw is None:  # a report from before the flags: a plain number
            if not isinstance(v, NUMBER):
                errs.append(f"{where}: missing {k}")
        elif not isinstance(raw, NUMBER):
            errs.append(f"{where}: '{k}_raw' must be a number")
        elif v is None:
            if raw <= 1 or not (rf.get("flags") or {}).get(k):
                errs.append(f"{where}: {k} is null without a raw value above 1 and its flag")
        elif not isinstance(v, NUMBER) or v > 1 or v != raw:
            errs.append(f"{where}: {k} must be its raw value, at most 1 (above 1: null and flagged)")
    return errs


def _curve_errors(roof: dict) -> list[str]:
    if "bandwidth_curve" not in roof:  # reports from before the curve
        return []
    pts = roof["bandwidth_curve"].get("points") if isinstance(roof["bandwidth_curve"], dict) else None
    if not pts:
        return ["roofline.bandwidth_curve: needs points"]
    errs = [f"roofline.bandwidth_curve.points[{i}]: needs positive 'bytes' and 'gbs'" for i, p in enumerate(pts)
            if not all(isinstance(p.get(k), NUMBER) and p[k] > 0 for k in ("bytes", "gbs"))]
    gemm = roof.get("gemm", {})
    if not isinstance(gemm.get("kernel"), str) or not gemm.get("candidates"):
        errs.append("roofline.gemm: needs the peak's 'kernel' and its 'candidates'")
    return errs


def check(rep: dict) -> None:
    errs = schema_errors(rep)
    if errs:
        raise UserError(f"bench report is malformed: {errs[0]} (+{len(errs) - 1} more)")


# -- Markdown ------------------------------------------------------------------------------------
def _f(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _ms(stat: dict | None) -> str:
    return "–" if not stat else f"{stat['median_ms']:.1f} / {stat['p90_ms']:.1f}"


def to_markdown(rep: dict) -> str:
    ctx, roof = rep["context"], rep["roofline"]
    m, s = ctx["machine"], ctx["settings"]
    ok = [r for r in rep["results"] if r["status"] == "ok"]
    lines = [f"# manzano-edge bench ({rep['created']})", "",
             f"- machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['platform']}; load average at start "
             f"{_loads(m.get('load_average'))}, at end {_loads(ctx.get('load_average_end'))}",
             f"- threads: {', '.join(f'{k}={v}' for k, v in ctx['threads'].items())}",
             f"- tools: {', '.join(f'{k} {v}' for k, v in ctx['tools'].items())}",
             f"- method: {s['warmup']} warm-up then {s['runs']} timed runs, median / p90; decode {s['decode_tokens']} "
             f"greedy tokens after the caption prefill; text-to-image with {s['flow_steps']} flow steps, "
             f"DiT CFG {s['flow_guidance']}, image-token CFG {s.get('token_guidance', 1.0)}"
             + (" (conditional and unconditional rows as one batch-of-2 decode step)"
                if s.get("token_guidance", 1.0) != 1.0 else ""),
             _roofline_line(roof), ""]
    for b in rep["bundles"]:
        chk = b["reference_check"]
        lines.append(f"- bundle `{b['name']}`: recipe {b['recipe']}, model {b['model'].get('name')} "
                     f"({b['model'].get('parameters', 0) / 1e6:.1f}M params); eager reference: "
                     f"{b['reference'].get('note') or b['reference'].get('path')}"
                     + (f" (checked: {chk['graph']} {chk['psnr_db']:.1f} dB vs {chk['backend']})" if chk.get("checked") else ""))
    lines += ["", "## Summary (median)", "",
              "| backend | recipe | load s | TTFT ms | prefill tok/s | decode tok/s | DiT steps/s (b1 / CFG b2) "
              "| caption ms | text-to-image ms | peak RSS MB | files MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        d, e, df = r["decoder"], r["e2e"], r["diffusion"]
        files = sum(r["files"].values()) / 1e6 if r["files"] else None
        lines.append(f"| {r['backend']}{'/' + r['compute_units'] if r['compute_units'] else ''} | {r['recipe']} "
                     f"| {r['load_total_s']:.2f} | {d['ttft_ms']['median_ms']:.1f} | {d['prefill_tok_s']:.0f} "
                     f"| {d['decode_tok_s']:.1f} | {_f(df.get('batch1', {}).get('steps_per_s'))} / "
                     f"{_f(df.get('batch2', {}).get('steps_per_s'))} | {e['caption_ms']['median_ms']:.0f} "
                     f"| {e['text_to_image_ms']['median_ms']:.0f} | {r['memory']['peak_rss_mb']:.0f} | {_f(files, '.2f')} |")
    lines += _latency_table(ok) + _partition_lines(ok) + _compute_plan_lines(ok)
    lines += _comparison_lines(rep["comparisons"]) + _consistency_lines(ok)
    runtime_notes = dict.fromkeys(r["runtime_note"] for r in ok if r.get("runtime_note"))
    if runtime_notes:
        lines += ["", "## Runtime notes", ""] + [f"- {note}" for note in runtime_notes]
    skipped = [r for r in rep["results"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "## Not measured", ""] + [f"- {r['label']}: {r['status']}: {r['reason']}" for r in skipped]
    lines += ["", "Peak RSS is the worker process's (Python + torch + that backend's runtime and graphs); each backend runs "
              "in its own process. Load time includes the sha256 check of each file. Files: bytes from the manifest.",
              f"![latency per graph]({LATENCY_PNG})", f"![decode tok/s]({DECODE_PNG})", ""]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _roofline_line(roof: dict) -> str:
    bw, g = roof["bandwidth"], roof["gemm"]
    dram = f"DRAM copy {bw['copy_gbs']:.2f}, triad {bw['triad_gbs']:.2f} GB/s ({bw['array_mib']} MiB arrays)"
    if "bandwidth_curve" not in roof:  # a report from before the curve
        return (f"- roofline (measured in this run): memory bandwidth {roof['bandwidth_gbs']:.2f} GB/s ({dram}), "
                f"fp32 GEMM peak {roof['gemm_gflops']:.1f} GFLOP/s (torch.mm {g['n']}^3)")
    curve = roof["bandwidth_curve"]
    pts = ", ".join(f"{_bytes(p['bytes'])} {p['gbs']:.1f}" + (f" ({p['level']})" if p.get("level") else "")
                    for p in curve["points"] if p["source"] == "curve")
    caches = ", ".join(f"{c['level']} {_bytes(c['bytes'])}" + (f" per {c['shared_by_cpus']} CPUs" if c["shared_by_cpus"] > 1
                                                              else " per core") for c in curve["caches"]) or "unknown"
    return (f"- roofline (measured in this run, {curve['threads']} threads): read bandwidth by working-set size, "
            f"GB/s: {pts}; {dram}; caches: {caches}; fp32 GEMM peak {roof['gemm_gflops']:.1f} GFLOP/s "
            f"({g['kernel']} {'x'.join(map(str, g['shape']))}, {g['source']}; best of {len(g['candidates'])} "
            f"kernel x shape candidates)")


def _pct(rec: dict, key: str) -> str:
    """A fraction as a percentage; one above 1 is a wrong ceiling, never shown as a result."""
    v, raw = rec.get(key), rec.get(f"{key}_raw", rec.get(key))
    if raw is None:
        return "–"
    if v is None or raw > 1:
        return f"n/a (model error: {raw:.1%} > 100%)"
    return f"{v:.1%}"


def _loads(x) -> str:
    return "–" if not x else " ".join(f"{v:.2f}" for v in x)


def _latency_table(ok: list[dict]) -> list[str]:
    cases = list(dict.fromkeys(c for r in ok for c in r["latency"]))
    lines = ["", "## Latency per graph, ms (median / p90)", "",
             "| graph | " + " | ".join(r["label"] for r in ok) + " |", "|---|" + "---:|" * len(ok)]
    for c in cases:
        lines.append(f"| {c} | " + " | ".join(_ms(r["latency"].get(c)) for r in ok) + " |")
    lines.append("| load s (per graph) | " + " | ".join(
        ", ".join(f"{g} {v:.2f}" for g, v in r["load_s"].items()) for r in ok) + " |")
    return lines


def _partition_lines(ok: list[dict]) -> list[str]:
    rows = [r for r in ok if r.get("partitions")]
    if not rows:
        return []
    graphs = list(dict.fromkeys(g for r in rows for g in r["partitions"]))
    lines = ["", "## ExecuTorch delegate partitions per graph (fewer = fewer hand-offs to portable kernels)", "",
             "| backend recipe | " + " | ".join(graphs) + " |", "|---|" + "---:|" * len(graphs)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(str(r["partitions"].get(g, "–")) for g in graphs) + " |")
    return lines


def _compute_plan_lines(ok: list[dict]) -> list[str]:
    rows = [r for r in ok if r.get("compute_plan")]
    if not rows:
        return []
    lines = ["", "## Core ML compute plan (ops per device, Core ML's estimate)", ""]
    for r in rows:
        for graph, plan in r["compute_plan"].items():
            what = plan.get("unavailable") or ", ".join(f"{d} {n}" for d, n in sorted(plan["ops_per_device"].items()))
            lines.append(f"- {r['label']} {graph}: {what}")
    return lines


def _comparison_lines(c: dict) -> list[str]:
    lines = ["", "## Comparisons (each measured side by side in this run)", "",
             "**1. Best backend/recipe vs PyTorch eager fp32, same pipeline**", ""]
    for x in c["best_vs_eager"]:
        if "eager_fp32_ms" in x:
            lines.append(f"- {x['pipeline']}: eager fp32 {x['eager_fp32_ms']:.0f} ms, best {x['best']} {x['best_ms']:.0f} ms "
                         f"→ **{x['speedup']:.2f}x**")
        else:
            lines.append(f"- {x['pipeline']}: eager fp32 {x['eager_fp32_tok_s']:.1f}, best {x['best']} "
                         f"{x['best_tok_s']:.1f} → **{x['speedup']:.2f}x**")
    kv = c["kv_cache_vs_recompute"]
    lines += ["", "**2. KV-cache decode vs recomputing the whole sequence (eager fp32)**", ""]
    if kv:
        lines.append(f"- {kv['decode_tokens']} tokens after a {kv['prompt_tokens']}-token prefill: KV cache "
                     f"{kv['kv_cache_ms']['median_ms']:.0f} ms, recompute {kv['recompute_ms']['median_ms']:.0f} ms → "
                     f"**{kv['speedup']:.2f}x** (same greedy tokens: {kv['same_tokens']})")
    lines += ["", "**3. Fraction of the measured roofline**", "",
              "| backend recipe | decode tok/s | bytes/token MB | fits in | ceiling GB/s | achieved GB/s "
              "| decode / bandwidth | prefill GFLOP/s | prefill / GEMM peak | DiT b1 / GEMM peak | DiT b2 / GEMM peak |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    comp = {x["label"]: x for x in c["compute_roofline"]}
    for x in c["decode_roofline"]:
        k = comp.get(x["label"], {})
        lines.append(f"| {x['label']} | {x['decode_tok_s']:.1f} | {x['bytes_per_token'] / 1e6:.2f} | {x.get('level') or '–'} "
                     f"| {_f(x.get('ceiling_gbs'), '.1f')} | {x['achieved_gbs']:.2f} | {_pct(x, 'fraction')} "
                     f"| {_f(k.get('prefill_gflops'))} | {_pct(k, 'prefill_fraction')} "
                     f"| {_pct(k, 'dit_batch1_compute_fraction')} | {_pct(k, 'dit_batch2_compute_fraction')} |")
    lines += ["", "Method. Bytes per decode token: the decoder graph's stored weights (manifest size; eager: fp32 "
              "parameters minus the embedding lookup) plus the fp32 KV cache read at the mean position. The bandwidth "
              "ceiling of a row is the read bandwidth measured in this run at that row's bytes per token (an fp32 "
              "array of that size summed repeatedly, so a working set that fits in a cache is read from it; best of "
              "the configured threads and 1 thread, and never below a larger working set's; \"fits in\" names the "
              "level from the CPU's cache sizes). FLOPs: torch FlopCounterMode on the eager "
              "graph (matmul, conv, attention); the GEMM peak is the best fp32 GFLOP/s over square torch.mm, the "
              "model's own DiT and decoder-prefill matmul shapes (torch.mm/bmm) and ONNX Runtime MatMul. A "
              "fraction above 100% means the ceiling under-estimates what the backend's kernels reach on this "
              "machine (a model error, e.g. a kernel faster than every probe): it is shown as n/a with the raw "
              "number, and in bench.json the fraction is null, the number is in `*_raw` and `flags` says why."]
    return lines


def _consistency_lines(ok: list[dict]) -> list[str]:
    rows = [r for r in ok if "consistency" in r]
    if not rows:
        return []
    lines = ["", "## Same answers as eager", "", "| backend recipe | caption exact match | greedy tokens match "
             "| text-to-image PSNR dB |", "|---|---|---|---:|"]
    for r in rows:
        c = r["consistency"]
        lines.append(f"| {r['label']} | {c['caption_matches_eager']} | {c['greedy_tokens_match_eager']} "
                     f"| {c['image_psnr_db_vs_eager']:.1f} |")
    return lines


# -- plots ---------------------------------------------------------------------------------------
def plot(rep: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rep["results"] if r["status"] == "ok"]
    cases = list(dict.fromkeys(c for r in ok for c in r["latency"]))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(cases)), 4.2))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [r["latency"].get(c, {}).get("median_ms", 0) for c in cases], width, label=r["label"])
    ax.set_xticks([j + width * (len(ok) - 1) / 2 for j in range(len(cases))], cases, rotation=25, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median latency, ms (log scale)")
    ax.set_xlabel("graph [case]")
    ax.set_title("latency per graph and backend (lower is better)")
    fig.tight_layout()  # before the legend, which goes right of the axes (the saved canvas grows to hold it)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
              title="backend recipe", title_fontsize=8)
    fig.savefig(out / LATENCY_PNG, dpi=110, bbox_inches="tight")
    plt.close(fig)
    _plot_decode(plt, ok, out / DECODE_PNG)


def _plot_decode(plt, ok: list[dict], path: Path) -> None:
    """Decode tok/s per row, labelled, with the row's bandwidth roofline (the read bandwidth at
    its bytes per token / those bytes) as a labelled tick: the bar's distance to it is the headroom."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok)), 3.8))
    rates = [r["decoder"]["decode_tok_s"] or 0 for r in ok]
    patches = ax.bar(range(len(ok)), rates, color="tab:blue", label="measured (median)")
    for p, v in zip(patches, rates):
        ax.annotate(f"{v:.1f}", (p.get_x() + p.get_width() / 2, v), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    ceilings = [(i, r["roofline"]["decode_ceiling_gbs"] * 1e9 / r["roofline"]["decode_bytes_per_token"],
                 r["roofline"].get("decode_working_set_level"))
                for i, r in enumerate(ok) if r.get("roofline", {}).get("decode_ceiling_gbs")]
    for n, (i, tok_s, level) in enumerate(ceilings):
        ax.hlines(tok_s, i - 0.42, i + 0.42, colors="black", linestyles="--", linewidth=1.2,
                  label="bandwidth roofline: read GB/s at the\nrow's bytes/token ÷ bytes/token" if n == 0 else None)
        ax.annotate(f"roofline {tok_s:.0f}" + (f" ({level})" if level else ""), (i, tok_s), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
    top = max(rates + [c[1] for c in ceilings] + [1.0])
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(range(len(ok)), [r["label"] for r in ok], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title("decode throughput per backend and recipe (higher is better)")
    fig.tight_layout()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_all(rep: dict, out: Path) -> None:
    errs = schema_errors(rep)
    if errs:  # a bug in the bench, not the user's; keep the (expensive) measurements and say so
        print(f"manzano-edge bench: warning: report does not match {SCHEMA}: {errs[0]} (+{len(errs) - 1} more)",
              file=sys.stderr)
    (out / JSON_FILE).write_text(json.dumps(rep, indent=1) + "\n")
    (out / MD_FILE).write_text(to_markdown(rep))
    if any(r["status"] == "ok" for r in rep["results"]):
        plot(rep, out)

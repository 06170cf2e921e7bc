"""`manzano-edge bench`: every backend x recipe of one or more bundles, side by side with the
PyTorch eager fp32 baseline, in one run on one machine.

Each (bundle, backend) runs in its own worker process (worker.py) so load time and peak RSS are
that backend's own. Example inputs come from spec.examples.real_examples (the same declarations
the exporters traced), computed once here and shared with every worker."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from manzano_edge.bench import report
from manzano_edge.bench.reference import MATCH_DB, load_reference, reference_spec, spec_key
from manzano_edge.bench.roofline import (
    bandwidth_at,
    count_flops,
    ensure_point,
    fraction,
    host_roofline,
    matmul_shapes,
)
from manzano_edge.bench.worker import save_examples
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.export.bundle import tool_versions
from manzano_edge.fsutil import atomic_output_dir
from manzano_edge.metrics import psnr
from manzano_edge.models.manzano import embedded_model_identity
from manzano_edge.runtime.backends import BACKENDS, backend_for_format, get_backend
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.runtime.bundle import Bundle
from manzano_edge.spec.decoding import causal_mask
from manzano_edge.spec.examples import real_examples
from manzano_edge.spec.graphs import GraphKind
from manzano_edge.spec.modules import StatefulDecoder, build_module


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    runs: int = 5
    warmup: int = 1
    threads: dict[str, int] = field(default_factory=dict)  # backend -> threads; missing = default_threads
    default_threads: int = max(1, os.cpu_count() or 1)
    decode_tokens: int = 32
    flow_steps: int = 20
    flow_guidance: float = 2.0  # CFG on: the DiT runs its batch-of-2 graph, as an app would
    token_guidance: float = 1.0  # image-token CFG; != 1 decodes on the bundles' batch-of-2 decoder_cfg
    reference: str | None = None
    seed: int = 0  # the --seed `export --preset` used (random-weight presets)
    overwrite: bool = False
    quick_roofline: bool = False  # smaller roofline arrays (tests)
    log: bool = True

    def threads_for(self, backend: str) -> int:
        return self.threads.get(backend, self.default_threads)


def parse_threads(value: str | None) -> tuple[int | None, dict[str, int]]:
    """'2' -> every backend 2; 'torch=2,ort=1' -> per backend."""
    if not value:
        return None, {}
    try:
        if "=" not in value:
            n = int(value)
            if n < 1:
                raise ValueError
            return n, {}
        per = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in value.split(","))}
    except ValueError as exc:
        raise UserError(f"--threads '{value}' is not N or backend=N[,backend=N]; e.g. --threads 2") from exc
    bad = [k for k, v in per.items() if k not in BACKENDS or v < 1]
    if bad:
        raise UserError(f"--threads: '{bad[0]}' is not a backend with a positive count; backends: {', '.join(BACKENDS)}")
    return None, per


def validate(paths: list[str], opts: BenchOptions) -> list[Bundle]:
    if not paths:
        raise UserError("pass at least one bundle directory (written by `manzano-edge export`)")
    unknown = [b for b in opts.backends if b not in BACKENDS]
    if unknown or not opts.backends:
        raise UserError(f"unknown backend '{unknown[0] if unknown else ''}'; choose from {', '.join(BACKENDS)}")
    for name, value, low in (("--runs", opts.runs, 1), ("--warmup", opts.warmup, 0), ("--decode-tokens", opts.decode_tokens, 1),
                             ("--flow-steps", opts.flow_steps, 1), ("--threads", opts.default_threads, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    return [Bundle(p) for p in paths]


# -- machine context -----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# -- the reference: examples and FLOPs -----------------------------------------------------------
class Reference:
    """Eager fp32 model for a group of bundles: examples for workers, FLOP counts, and a check
    that its weights are the ones the bundle was exported from."""

    def __init__(self, spec: dict, bundle: Bundle, workdir: Path) -> None:
        self.spec = spec
        self.model, tok = load_reference(spec, bundle.tokenizer_json)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.examples = real_examples(self.model, TextCodec(tok, self.model.cfg.text)).per_graph
        self.examples_file = workdir / f"examples-{abs(hash(spec_key(spec)))}.safetensors"
        save_examples(self.examples, self.examples_file)

    def check_bundle(self, bundle: Bundle) -> dict:
        """PSNR of one bundle graph's output against this model's: refuses unrelated weights."""
        graph = next(n for n, s in bundle.specs.items() if s.kind == GraphKind.LATENT_DECODER)
        runnable = [b for f in _formats(bundle, graph) if (b := backend_for_format(f)) and b.runnable_here()[0]]
        if not runnable:
            return {"checked": False, "reason": f"no {graph} in the bundle that runs here to compare with"}
        fmt_backend = runnable[0].name
        spec = bundle.specs[graph]
        x = self.examples[graph][0]
        ref = TorchProgram(spec, build_module(spec, self.model)).run(x)["pixels"]
        out = bundle.program(graph, fmt_backend).run(x)["pixels"]
        db = psnr(ref, out)
        if db < MATCH_DB:
            raise UserError(f"the eager reference does not match bundle {bundle.path} ({graph} {db:.1f} dB); pass "
                            "--reference CHECKPOINT, or --seed with the seed `export --preset` used")
        return {"checked": True, "graph": graph, "backend": fmt_backend, "psnr_db": db}

    def prefill_flops(self, tokens: int) -> int:
        dec = StatefulDecoder(self.model.decoder, last_logits=True).eval()  # as the graphs
        x = torch.zeros(1, tokens, self.model.cfg.decoder.hidden_size)
        return count_flops(lambda: dec(x, causal_mask(0, tokens)))

    def dit_flops(self) -> dict[str, int]:
        return {f"batch{x['latent'].shape[0]}": count_flops(lambda x=x: self.model.dit(x["latent"], x["timestep"],
                                                                                       x["condition"]))
                for x in self.examples["dit"]}

    def matmul_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """The matmul shapes carrying most of the DiT's (CFG batch) and the decoder prefill's
        FLOPs: the GEMM peak is measured at these sizes too."""
        dit = self.examples["dit"][0]
        dec = StatefulDecoder(self.model.decoder, last_logits=True).eval()
        pre = self.examples["decoder"][0]
        return {f"dit batch{dit['latent'].shape[0]}": matmul_shapes(
                    lambda: self.model.dit(dit["latent"], dit["timestep"], dit["condition"])),
                "decoder prefill": matmul_shapes(lambda: dec(pre["inputs_embeds"], pre["causal_mask"]))}

    def decoder_weight_bytes(self) -> int:
        """fp32 bytes of the weights one decode step reads (the embedding table is a lookup)."""
        dec = self.model.decoder
        skip = set() if dec.cfg.tie_word_embeddings else {id(dec.embed_tokens.weight)}
        return sum(p.numel() * p.element_size() for p in dec.parameters() if id(p) not in skip)


def _formats(bundle: Bundle, graph: str) -> dict:
    return bundle.manifest["graphs"].get(graph, {}).get("formats", {})


# -- jobs ----------------------------------------------------------------------------------------
def plan_jobs(bundles: list[Bundle], refs: dict[str, Reference], opts: BenchOptions, workdir: Path) -> list[dict]:
    """One job per (bundle, backend[, compute unit]); the eager baseline once per reference."""
    jobs, seen = [], set()
    recipes = [b.manifest.get("recipe") for b in bundles]
    for bundle in bundles:
        # Two bundles of one recipe (e.g. before/after a graph change): their rows carry the bundle's name.
        named = recipes.count(bundle.manifest.get("recipe")) > 1
        key = spec_key(reference_spec(bundle.cfg, opts.reference, opts.seed))
        ref = refs[key]
        for backend in opts.backends:
            if backend == "torch":
                if key in seen:
                    continue
                seen.add(key)
            units = get_backend(backend).compute_units or (None,)
            for cu in units:
                jobs.append(_job(bundle, backend, cu, ref, opts, workdir, len(jobs), named))
    return jobs


def _job(bundle: Bundle, backend: str, cu: str | None, ref: Reference, opts: BenchOptions, workdir: Path, i: int,
         named: bool = False) -> dict:
    recipe = "fp32" if backend == "torch" else bundle.manifest.get("recipe", "?")
    label = f"{backend}{'/' + cu if cu else ''} {recipe}" + (f" [{bundle.path.name}]" if named and backend != "torch" else "")
    job = {"bundle": str(bundle.path), "backend": backend, "compute_units": cu, "recipe": recipe, "label": label,
           "threads": opts.threads_for(backend), "runs": opts.runs, "warmup": opts.warmup,
           "decode_tokens": opts.decode_tokens, "flow_steps": opts.flow_steps, "flow_guidance": opts.flow_guidance,
           "token_guidance": opts.token_guidance, "reference": ref.spec, "reference_key": spec_key(ref.spec),
           "examples": str(ref.examples_file),
           "image_out": str(workdir / "images" / f"{i:02d}-{backend}{'-' + cu if cu else ''}-{recipe}.png")}
    skip = skip_reason(bundle, backend, opts.token_guidance)
    if skip:
        job["skip"] = skip
    return job


def skip_reason(bundle: Bundle, backend: str, token_guidance: float = 1.0) -> str | None:
    runner = get_backend(backend)
    if runner.format is None:
        return None
    ok, why = runner.runnable_here()
    if not ok:
        return why
    fmt = runner.format
    missing = [g for g in bundle.specs if fmt not in _formats(bundle, g)]
    if missing:
        return f"bundle has no {fmt} files (export --format {fmt})"
    if token_guidance != 1.0 and "decoder_cfg" not in bundle.specs:
        return "--token-guidance needs the batch-of-2 decoder_cfg graph (export --graphs all)"
    return None


def run_worker(job: dict, workdir: Path) -> dict:
    if "skip" in job:
        return {"status": "skipped", "reason": job["skip"]}
    job_file = workdir / "job.json"
    result_file = workdir / "result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "manzano_edge.bench.worker", str(job_file), str(result_file)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"worker exited with {proc.returncode}: {tail[:300]}"}
    return json.loads(result_file.read_text())


# -- derived numbers -----------------------------------------------------------------------------
def file_bytes(bundle: Bundle, backend: str) -> dict[str, int]:
    fmt = get_backend(backend).format
    return {g: f[fmt]["bytes"] for g in bundle.specs if fmt and fmt in (f := _formats(bundle, g))}


def partitions(bundle: Bundle, backend: str) -> dict[str, int]:
    """Delegate partitions per graph, where the manifest records them (ExecuTorch): each boundary
    hands tensors between a delegate and the portable kernels, so fewer is faster."""
    fmt = get_backend(backend).format
    return {g: f[fmt]["delegates"] for g in bundle.specs if fmt in (f := _formats(bundle, g)) and "delegates" in f[fmt]}


def add_roofline(row: dict, ref: Reference, roof: dict, flops_cache: dict) -> None:
    """Decode vs the bandwidth ceiling; prefill and the DiT vs the GEMM ceiling."""
    d, cfg = row["decoder"], ref.model.cfg.decoder
    weights = row["files"].get("decoder") if row["backend"] != "torch" else ref.decoder_weight_bytes()
    mean_past = d["prompt_tokens"] + d["decode_tokens"] / 2
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * mean_past  # fp32 K and V read per step
    per_token = weights + kv
    t = d["prompt_tokens"]
    if t not in flops_cache:
        flops_cache[t] = ref.prefill_flops(t)
    dit = flops_cache.setdefault("dit", ref.dit_flops())
    point = ensure_point(roof, int(per_token), row["label"])  # the read bandwidth at this working set
    ceiling = bandwidth_at(roof["bandwidth_curve"]["points"], point["bytes"])
    peak = roof["gemm_gflops"] * 1e9
    out = {"decode_bytes_per_token": per_token, "decode_weight_bytes": weights, "decode_kv_bytes": kv,
           "decode_achieved_gbs": (d["decode_tok_s"] or 0) * per_token / 1e9,
           "decode_ceiling_gbs": ceiling, "decode_working_set_level": point["level"],
           "prefill_flops": flops_cache[t], "prefill_gflops": flops_cache[t] / (d["prefill_ms"]["median_ms"] / 1e3) / 1e9,
           "compute_peak_gflops": roof["gemm_gflops"], "flags": {}}
    fraction(out, "decode_bandwidth_fraction", out["decode_achieved_gbs"] / ceiling)
    fraction(out, "prefill_compute_fraction", out["prefill_gflops"] * 1e9 / peak)
    for key, stat in row["diffusion"].items():
        achieved = dit[key] * stat["steps_per_s"]
        out[f"dit_{key}_flops"] = dit[key]
        out[f"dit_{key}_gflops"] = achieved / 1e9
        fraction(out, f"dit_{key}_compute_fraction", achieved / peak)
    out["status"] = "model_error" if out["flags"] else "ok"
    row["roofline"] = out


def add_consistency(rows: list[dict], workdir: Path) -> None:
    """Caption exact match and image PSNR of every row against its eager baseline."""
    from PIL import Image

    from manzano_edge.data.images import to_pixels

    base = {r["reference_key"]: r for r in rows if r["backend"] == "torch" and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["reference_key"])
        if r["status"] != "ok" or b is None or r is b:
            continue
        img = [to_pixels(Image.open(workdir / "images" / x["e2e"]["image"]), x["image_size"]) for x in (b, r)]
        r["consistency"] = {"caption_matches_eager": r["e2e"]["caption"] == b["e2e"]["caption"],
                            "image_psnr_db_vs_eager": psnr(img[0], img[1]),
                            "greedy_tokens_match_eager": r["decoder"]["greedy_tokens"] == b["decoder"]["greedy_tokens"]}


def comparisons(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    eager = next((r for r in ok if r["backend"] == "torch"), None)
    others = [r for r in ok if r["backend"] != "torch"]
    out: dict = {"best_vs_eager": [], "kv_cache_vs_recompute": eager.get("kv_cache") if eager else None,
                 "decode_roofline": [], "compute_roofline": []}
    for pipeline, key in (("caption", "caption_ms"), ("text_to_image", "text_to_image_ms")):
        if eager and others:
            best = min(others, key=lambda r: r["e2e"][key]["median_ms"])
            e, b = eager["e2e"][key]["median_ms"], best["e2e"][key]["median_ms"]
            out["best_vs_eager"].append({"pipeline": pipeline, "eager_fp32_ms": e, "best": best["label"], "best_ms": b,
                                         "speedup": e / b})
    if eager and others:
        best = max(others, key=lambda r: r["decoder"]["decode_tok_s"] or 0)
        e, b = eager["decoder"]["decode_tok_s"], best["decoder"]["decode_tok_s"]
        out["best_vs_eager"].append({"pipeline": "decode tok/s", "eager_fp32_tok_s": e, "best": best["label"],
                                     "best_tok_s": b, "speedup": b / e})
    for r in ok:
        rf = r["roofline"]
        out["decode_roofline"].append({"label": r["label"], "decode_tok_s": r["decoder"]["decode_tok_s"],
                                       "bytes_per_token": rf["decode_bytes_per_token"],
                                       "achieved_gbs": rf["decode_achieved_gbs"], "ceiling_gbs": rf["decode_ceiling_gbs"],
                                       "level": rf["decode_working_set_level"],
                                       "fraction": rf["decode_bandwidth_fraction"],
                                       "fraction_raw": rf["decode_bandwidth_fraction_raw"],
                                       "flag": rf["flags"].get("decode_bandwidth_fraction")})
        out["compute_roofline"].append({"label": r["label"], "prefill_gflops": rf["prefill_gflops"],
                                        "prefill_fraction": rf["prefill_compute_fraction"],
                                        "prefill_fraction_raw": rf["prefill_compute_fraction_raw"],
                                        **{k: v for k, v in rf.items() if k.startswith("dit_") and not k.endswith("_flops")},
                                        "flags": {k: v for k, v in rf["flags"].items() if k != "decode_bandwidth_fraction"}})
    return out


# -- the run -------------------------------------------------------------------------------------
def run_bench(paths: list[str], out: str | Path, opts: BenchOptions) -> dict:
    bundles = validate(paths, opts)
    out = Path(out)
    with atomic_output_dir(out, opts.overwrite) as tmp:
        report_dict = _run(bundles, opts, tmp)
        report.write_all(report_dict, tmp)
    return report_dict


def _log(opts: BenchOptions, msg: str) -> None:
    if opts.log:
        print(msg, file=sys.stderr, flush=True)


def _run(bundles: list[Bundle], opts: BenchOptions, tmp: Path) -> dict:
    (tmp / "images").mkdir()
    started = machine()
    torch.set_num_threads(opts.default_threads)
    refs: dict[str, Reference] = {}
    bundle_info = []
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        workdir = Path(work)
        for b in bundles:
            spec = reference_spec(b.cfg, opts.reference, opts.seed)
            key = spec_key(spec)
            if key not in refs:
                _log(opts, f"reference: eager fp32 from {spec.get('path') or spec.get('note') or key}")
                refs[key] = Reference(spec, b, workdir)
            bundle_info.append({"path": str(b.path.resolve()), "name": b.path.name, "recipe": b.manifest.get("recipe"),
                                "model": b.manifest.get("model"),
                                "reference": {**spec, "sha256": (refs[key].model.source or {}).get("sha256")},
                                "reference_check": refs[key].check_bundle(b),
                                "files": {g: {fmt: f["bytes"] for fmt, f in _formats(b, g).items()} for g in b.specs}})
        _log(opts, f"roofline: read bandwidth per working-set size and GEMM peak at {opts.default_threads} threads")
        shapes = {f"{src} ({ref.model.cfg.name})" if len(refs) > 1 else src: s
                  for ref in refs.values() for src, s in ref.matmul_shapes().items()}
        roof = host_roofline(opts.default_threads, quick=opts.quick_roofline, shapes=shapes)
        jobs = plan_jobs(bundles, refs, opts, tmp)
        rows, flops = [], {}
        for i, job in enumerate(jobs, 1):
            _log(opts, f"[{i}/{len(jobs)}] {job['label']} ({Path(job['bundle']).name})" + (" skipped" if "skip" in job else ""))
            result = run_worker(job, workdir)
            bundle = next(b for b in bundles if str(b.path) == job["bundle"])
            row = {"label": job["label"], "backend": job["backend"], "compute_units": job["compute_units"],
                   "recipe": job["recipe"], "bundle": bundle.path.name, "reference_key": job["reference_key"],
                   "image_size": bundle.cfg.vision.image_size, "files": file_bytes(bundle, job["backend"]),
                   "partitions": partitions(bundle, job["backend"]), **result}
            if row["status"] == "ok":
                add_roofline(row, refs[job["reference_key"]], roof, flops)
                row["runtime_note"] = get_backend(job["backend"]).runtime_note
            else:
                _log(opts, f"    {row['status']}: {row['reason']}")
            rows.append(row)
        # Every row's working set is on the curve now: compute the ceilings from the whole curve, so a
        # row's ceiling does not depend on the order the rows ran in.
        for row in rows:
            if row["status"] == "ok":
                add_roofline(row, refs[row["reference_key"]], roof, flops)
    add_consistency(rows, tmp)
    return {"schema": report.SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "context": {"machine": started, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                        "tools": tool_versions(), "embedded_model": embedded_model_identity(),
                        "threads": {b: opts.threads_for(b) for b in opts.backends},
                        "settings": {"runs": opts.runs, "warmup": opts.warmup, "decode_tokens": opts.decode_tokens,
                                     "flow_steps": opts.flow_steps, "flow_guidance": opts.flow_guidance,
                                     "token_guidance": opts.token_guidance}},
            "roofline": roof, "bundles": bundle_info, "results": rows, "comparisons": comparisons(rows)}

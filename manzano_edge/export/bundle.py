"""`manzano-edge export`: every graph x format into one verified bundle directory.

OUT/
  manifest.json           per graph x format: file, sha256, bytes, I/O spec, recipe, parity, tool versions;
                          the stock runners' files (`runners`) and the app-side pipeline (`pipeline`)
  config.json, tokenizer.json, generation_config.json, preprocessor_config.json
  coreml/<graph>.mlpackage
  coreml-llm/decoder.mlpackage    the decoder in Apple's Core ML LLM convention (export/coreml_llm.py)
  onnx/<graph>.onnx
  onnx-genai/                     onnxruntime-genai's folder (export/onnx_genai.py)
  executorch/<graph>.pte          XNNPACK
  executorch-coreml/<graph>.pte   Core ML delegate (runs on Apple hardware only)
  executorch-llm/model.pte        ExecuTorch's LLM runners' program (export/executorch_llm.py)

Each graph is checked against eager PyTorch on real inputs (scenes, a real prompt, a
prefill then 16 decode steps). Everything is written to a temporary directory and renamed
at the end; if any graph fails to convert or misses its parity bar, nothing is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.export import EXPORTERS
from manzano_edge.export.base import Entry, GraphJob, check_dependency, get_exporter
from manzano_edge.export.plan import QuantPlan, plan_quantization
from manzano_edge.fsutil import atomic_output_dir, path_digest
from manzano_edge.models.manzano import CONFIG_FILE, TOKENIZER_FILE, Manzano, embedded_model_identity
from manzano_edge.quant.overrides import LAYERED_GRAPHS
from manzano_edge.quant.recipes import (
    SUPPORT,
    RecipeConfig,
    W8A8Config,
    check_supported,
    default_w8a8_modes,
    is_float,
)
from manzano_edge.quiet import third_party_output
from manzano_edge.runtime.bundle import MANIFEST_FILE, NULL_CONDITION_FILE
from manzano_edge.spec.contract import (
    GENERATION_CONFIG_FILE,
    PREPROCESSOR_CONFIG_FILE,
    generation_config,
    pipeline_contract,
    preprocessor_config,
)
from manzano_edge.spec.examples import real_examples
from manzano_edge.spec.graphs import GraphSpec, graph_specs

MANIFEST = MANIFEST_FILE
SCHEMA = "manzano-edge/bundle@1"
TOOLS = ("torch", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "onnxscript", "coreai-torch",
         "coreai-opt", "coreai-core", "numpy", "manzano-edge")


LARGE_MODEL_BYTES = 100 * 2**20  # weights above this (the small preset and up) are collected after every graph


class ExportFailed(UserError):
    exit_code = 1


@dataclass
class ExportOptions:
    formats: list[str]
    recipe: str | RecipeConfig = "fp32"  # a name, or a config object (quant/recipes.py)
    graphs: list[str] | None = None
    coreml_precision: str = "fp16"  # Core ML compute precision for float recipes
    coreml_target: str = "iOS18"  # Core ML minimum deployment target (export/coreml.py TARGETS)
    overwrite: bool = False
    decode_steps: int = 16
    show_progress: bool = True
    parity: bool = True  # False: structure only (for random-weight, paper-sized presets)
    keep_float: str | None = None  # "lm_head,layers.0,graph:vae_decoder" (quant/overrides.py)
    calibration_samples: int = 8  # generated calibration samples (static w8a8)
    calibration_file: str | None = None  # safetensors <graph>.<sample>.<input>, replaces the generated ones
    w8a8_mode: dict[str, str] = field(default_factory=default_w8a8_modes)
    bundled_io: bool = False  # also write ExecuTorch bundled programs (.bpte) for on-device runners
    # ExecuTorch decoder KV cache: "llm-ops" (llama::update_cache + custom_sdpa; the device runner
    # must link ExecuTorch's custom_ops) or "slice" (slice-assigned cache, core kernels only, slower)
    executorch_kv_cache: str = "llm-ops"
    # Also write the Core ML-delegate .pte next to the XNNPACK one; off saves the memory its lowering
    # takes on paper-sized models (docs/results/export-costs.md).
    executorch_coreml: bool = True


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# -- the bundle ----------------------------------------------------------------------------------
def validate_options(opts: ExportOptions, specs: dict[str, GraphSpec]) -> list[str]:
    for fmt in opts.formats:
        exporter = get_exporter(fmt)
        check_supported(fmt, opts.recipe)
        check_dependency(exporter)
        exporter.check_options(opts)
    if list(opts.graphs or []) == ["all"]:
        return list(specs)
    graphs = list(opts.graphs or [n for n, spec in specs.items() if not spec.optional])
    unknown = [g for g in graphs if g not in specs]
    if unknown:
        raise UserError(f"unknown graph '{unknown[0]}'; choose from {', '.join(specs)} or all")
    return graphs


def export_bundle(model: Manzano, tokenizer_json: str, out: str | Path, opts: ExportOptions) -> dict:
    """Export `model`'s graphs to every format of `opts` as one verified bundle directory `out`;
    returns the manifest. Nothing is written unless every graph converts and meets its bar."""
    out = Path(out)
    opts = resolve_recipe(opts)
    specs = graph_specs(model.cfg)
    graphs = validate_options(opts, specs)
    with atomic_output_dir(out, opts.overwrite) as tmp:
        for fmt in opts.formats:
            for folder in EXPORTERS[fmt].folders(opts):
                (tmp / folder).mkdir()
        codec = TextCodec(tokenizer_json, model.cfg.text)
        for p in model.parameters():
            p.requires_grad_(False)
        examples = real_examples(model, codec, decode_steps=opts.decode_steps).per_graph
        plan = plan_quantization(model, codec, specs, graphs, opts)
        if plan and plan.automatic and opts.show_progress:
            print(f"export: {describe_automatic(plan)}", file=sys.stderr)
        entries: list[Entry] = []
        jobs: dict[str, dict[str, GraphJob]] = {fmt: {} for fmt in opts.formats}
        # A conversion's FX graphs hold reference cycles over copies of the weights: on a large model
        # they must be freed before the next graph's conversion (docs/results/export-costs.md). A full
        # collection walks the whole heap, converters included (CHANGELOG, "Test suite"), so a small
        # model, whose copies are a few MB, leaves it to Python's own collector.
        large = sum(p.numel() * p.element_size() for p in model.parameters()) > LARGE_MODEL_BYTES
        tasks = [(fmt, g) for fmt in opts.formats for g in graphs]
        bar = tqdm(tasks, desc="export", unit="graph", disable=not opts.show_progress, dynamic_ncols=True)
        for fmt, name in bar:
            bar.set_description(f"export {name} -> {fmt}")
            t0 = time.time()
            job = GraphJob(specs[name], model, examples[name], tmp,
                           plan.recipe_for(name, fmt) if plan else opts.recipe, opts, plan)
            jobs[fmt][name] = job
            new = _export_graph(job, fmt)
            for e in new:
                e.seconds = round(time.time() - t0, 2)
                e.exporter = fmt
            entries.extend(new)
            if large:
                gc.collect()
        runners = _finish_formats(tmp, opts, jobs, entries, tokenizer_json)
        manifest = build_manifest(model, opts, entries, plan)
        if runners:
            manifest["runners"] = runners
        failed = [f"{e.graph}/{e.fmt}" + (f" ({e.error})" if e.error else "") for e in entries if not e.passed]
        failed += [f"{name} {', '.join(r['failed'])}" for name, r in runners.items() if r.get("status") == "failed"]
        if failed:
            print_summary(manifest)
            names = ", ".join(failed)
            raise ExportFailed(f"parity check failed for {names}; nothing was written to {out}"
                               + _parity_fix_hint(opts.recipe, sorted({e.graph for e in entries if not e.passed})))
        _write_bundle_files(model, tokenizer_json, tmp, manifest)
    return manifest


def _finish_formats(tmp: Path, opts: ExportOptions, jobs: dict[str, dict[str, GraphJob]], entries: list[Entry],
                    tokenizer_json: str) -> dict:
    """Each format's files that span graphs (the stock runners' programs and configs), by runner."""
    runners: dict = {}
    for fmt in opts.formats:
        if not jobs[fmt]:
            continue
        try:
            with third_party_output():
                runners.update(EXPORTERS[fmt].finish_bundle(tmp, jobs[fmt], entries, tokenizer_json))
        except UserError:
            raise
        except Exception as exc:  # the converters raise anything; name the format and the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportFailed(f"the {fmt} runner files failed to convert: {type(exc).__name__}: {first[:300]}") from exc
    return runners


def resolve_recipe(opts: ExportOptions) -> ExportOptions:
    """`recipe` may be a config object (`W8A8Config(activation_mode="static")`, torchao's style) or its
    name; the rest of the export works on the name and the per-format w8a8 modes."""
    if not isinstance(opts.recipe, RecipeConfig):
        return opts
    config = opts.recipe
    modes = dict(opts.w8a8_mode)
    if isinstance(config, W8A8Config) and config.activation_mode:
        modes = {fmt: config.activation_mode for fmt in opts.formats}
    return dataclasses.replace(opts, recipe=config.name, w8a8_mode=modes)


def _write_bundle_files(model: Manzano, tokenizer_json: str, tmp: Path, manifest: dict) -> None:
    """Everything besides the graphs: config, tokenizer, the DiT's null condition, the pipeline
    contract's Hugging Face-style files, the manifest last."""
    cfg = model.cfg
    cfg.save(tmp / CONFIG_FILE)
    (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
    # The DiT's learned "no condition" vector: the runtime needs it for classifier-free guidance.
    save_file({"null_condition": model.dit.null_cond.detach().contiguous()}, str(tmp / NULL_CONDITION_FILE))
    (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    (tmp / PREPROCESSOR_CONFIG_FILE).write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
    manifest["pipeline"] = pipeline_contract(cfg, TOKENIZER_FILE, NULL_CONDITION_FILE)
    manifest["extras"] = {key: _file_record(tmp, name) for key, name in (
        ("null_condition", NULL_CONDITION_FILE), ("generation_config", GENERATION_CONFIG_FILE),
        ("preprocessor_config", PREPROCESSOR_CONFIG_FILE))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _file_record(root: Path, name: str) -> dict:
    digest, size = path_digest(root / name)
    return {"file": name, "sha256": digest, "bytes": size}


def _export_graph(job: GraphJob, fmt: str) -> list[Entry]:
    """One graph through one exporter; a converter's failure becomes one line naming graph, format and cause."""
    name = job.spec.name
    try:
        with third_party_output():  # converters print per-pass progress bars and warnings
            return EXPORTERS[fmt].export(job)
    except UserError:
        raise
    except MemoryError as exc:
        raise ExportFailed(f"graph '{name}' ran out of memory converting to {fmt}; export one format at a "
                           "time (--format) on a machine with more RAM") from exc
    except Exception as exc:  # the converters raise anything; name graph, format and the op/cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportFailed(f"graph '{name}' failed to convert to {fmt}: {type(exc).__name__}: {first[:300]}") from exc


def _parity_fix_hint(recipe: str, graphs: list[str]) -> str:
    """The next step after a failed parity check: a quantized graph usually misses the bar because of
    a few sensitive layers (docs/guides/quantization-and-validation.md: the w4 decoder passes with lm_head float)."""
    if is_float(recipe):
        return ""
    layered = [g for g in graphs if g in LAYERED_GRAPHS]
    whole = [g for g in graphs if g not in LAYERED_GRAPHS]
    hints = []
    if layered:
        hints.append(f"find the layers to keep float with `manzano-edge sensitivity --recipe {recipe} --graphs "
                     f"{','.join(layered)} -o REPORT_DIR` and pass its proposal as --keep-float")
    if whole:
        hints.append(f"keep {', '.join(whole)} float with --keep-float {','.join('graph:' + g for g in whole)}")
    return "; " + "; ".join(hints)


def build_manifest(model: Manzano, opts: ExportOptions, entries: list[Entry], plan: QuantPlan | None = None) -> dict:
    graphs: dict[str, dict] = {}
    specs = graph_specs(model.cfg)
    for e in entries:
        g = graphs.setdefault(e.graph, {"family": specs[e.graph].family, "formats": {}})
        fmt = e.exporter or e.fmt
        recipe = plan.recipe_for(e.graph, fmt) if plan else opts.recipe
        how = e.how or SUPPORT[(fmt, recipe)].how
        info = e.extra.pop("quantization", {})
        rec = {"name": recipe, "how": how, **(plan.manifest(e.graph, fmt, info) if plan else {})}
        status = entry_status(e)
        g["formats"][e.fmt] = {"file": e.file, "sha256": e.sha256, "bytes": e.bytes, "recipe": rec,
                               "export_seconds": e.seconds, "parity": e.parity, "status": status,
                               "passed": e.passed if status in CHECKED else None, **e.extra}
    return {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model.cfg.name, "config": CONFIG_FILE, "tokenizer": TOKENIZER_FILE,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "source": model.source or {"checkpoint": None, "note": "not loaded from a checkpoint"},
                      "embedded_model": embedded_model_identity()},
            "recipe": opts.recipe, "coreml_compute_precision": opts.coreml_precision,
            **({"quantization": {"keep_float": plan.keep.to_json(), "w8a8_mode": plan.modes,
                                 "kept_float_automatically": automatic_json(plan),
                                 "calibration": plan.calibration_source or "none (no static activations)",
                                 "calibration_samples": plan.calibration_samples}}
               if plan else {}),
            "tools": tool_versions(), "graphs": graphs}


# What an entry's numbers were checked with: `passed` is true or false only for the checked ones.
VERIFIED, EMULATED, LOWERED, NOT_CHECKED, FAILED = "verified", "emulated", "lowered, not run", "not checked", "failed"
CHECKED = (VERIFIED, EMULATED, FAILED)


def entry_status(e: Entry) -> str:
    """verified (its runtime ran it), emulated (a stand-in ran it), lowered, not run (nothing here runs
    it), not checked (--no-parity), or failed."""
    if not e.parity:
        return LOWERED
    if e.parity.get("skipped"):
        return NOT_CHECKED
    if not e.passed:
        return FAILED
    return EMULATED if e.parity.get("emulated") and "predict" not in e.parity else VERIFIED


def status_counts(manifest: dict) -> dict[str, int]:
    """How many files of the bundle have each status."""
    counts: dict[str, int] = {}
    for g in manifest["graphs"].values():
        for f in g["formats"].values():
            counts[f["status"]] = counts.get(f["status"], 0) + 1
    return counts


def automatic_json(plan: QuantPlan) -> dict[str, dict[str, str]]:
    """graph -> format -> why the recipe left it float."""
    out: dict[str, dict[str, str]] = {}
    for (graph, fmt), why in plan.automatic.items():
        out.setdefault(graph, {})[fmt] = why
    return out


def describe_automatic(plan: QuantPlan) -> str:
    """One line: the graphs the recipe cannot quantize, kept float (and how to be refused instead)."""
    graphs = automatic_json(plan)
    listed = " and ".join(f"{g} ({', '.join(fmts)})" for g, fmts in graphs.items())
    return (f"keeping {listed} float: {plan.recipe} has none of the layers it quantizes there "
            "(name a graph in --graphs to be refused instead)")


def print_summary(manifest: dict) -> None:
    print(f"\n{'graph':<14} {'format':<18} {'size':>10} {'parity':>16} {'time s':>7}  verified by")
    for name, g in manifest["graphs"].items():
        for fmt, f in g["formats"].items():
            p = f["parity"]
            if f["status"] == LOWERED:
                parity = "lowered, not run"
            elif f["status"] == NOT_CHECKED:
                parity = "not checked"
            else:
                db = min([x for x in (p.get("psnr_db"), p.get("min_step_psnr_db")) if x is not None], default=None)
                parity = f"{db:.1f} dB" if db is not None else f"ids {p['id_agreement']:.2f}"
                parity += " FAIL" if f["status"] == FAILED else " (emulated)" if f["status"] == EMULATED else ""
            size = f"{f['bytes'] / 1e6:.2f} MB"
            print(f"{name:<14} {fmt:<18} {size:>10} {parity:>16} {f['export_seconds']:>7.1f}  {f['verified_by']}")
    for name, runner in manifest.get("runners", {}).items():
        where = f"{runner['folder']}/ ({runner.get('status', 'verified by its graphs above')})" if runner.get("folder") \
            else f"not written: {runner['not_written']}"
        where += f"; {runner['note']}" if runner.get("note") else ""
        print(f"{name}: {where}")
    counts = status_counts(manifest)
    print(", ".join(f"{counts[s]} {s}" for s in (VERIFIED, EMULATED, LOWERED, NOT_CHECKED, FAILED) if counts.get(s)))

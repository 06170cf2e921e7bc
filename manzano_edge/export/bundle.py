"""`manzano-edge export`: every graph x format into one verified bundle directory.

OUT/
  manifest.json           per graph x format: file, sha256, bytes, I/O spec, recipe, parity, tool versions
  config.json, tokenizer.json
  coreml/<graph>.mlpackage
  onnx/<graph>.onnx
  executorch/<graph>.pte          XNNPACK
  executorch-coreml/<graph>.pte   Core ML delegate (runs on Apple hardware only)

Each graph is checked against eager PyTorch on real inputs (scenes, a real prompt, a
prefill then 16 decode steps). Everything is written to a temporary directory and renamed
at the end; if any graph fails to convert or misses its parity bar, nothing is written.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.export import coreml, executorch, onnx
from manzano_edge.export.common import GraphProgram, TorchProgram, build_module, path_digest
from manzano_edge.export.spec import GraphSpec, graph_specs, real_examples
from manzano_edge.fsutil import abort_output_dir, begin_output_dir, commit_output_dir
from manzano_edge.metrics import compare
from manzano_edge.models.manzano import CONFIG_FILE, TOKENIZER_FILE, Manzano
from manzano_edge.quant import calibration as calib
from manzano_edge.quant import coreml_ptq, onnx_ptq, xnnpack_ptq
from manzano_edge.quant.overrides import (
    LAYERED_GRAPHS,
    KeepFloat,
    check_all_matched,
    parse_keep_float,
    resolve_layers,
)
from manzano_edge.quant.recipes import DEFAULT_W8A8_MODE, FLOAT_RECIPES, FORMATS, SUPPORT, check_mode, check_supported

MANIFEST = "manifest.json"
NULL_CONDITION_FILE = "diffusion_null_condition.safetensors"
SCHEMA = "manzano-edge/bundle@1"
PARITY_DB = {"fp32": 60.0, "fp16": 40.0}
QUANT_SANITY_DB = 20.0  # quantized graphs: catches silently-wrong lowering; `validate` applies the real bars
TOOLS = ("torch", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "onnxscript", "numpy",
         "manzano-edge")


class ExportFailed(UserError):
    exit_code = 1


EXECUTORCH_KV_CACHES = ("llm-ops", "slice")


@dataclass
class ExportOptions:
    formats: list[str]
    recipe: str = "fp32"
    graphs: list[str] | None = None
    coreml_precision: str = "fp16"  # Core ML compute precision for float recipes
    overwrite: bool = False
    decode_steps: int = 16
    show_progress: bool = True
    parity: bool = True  # False: structure only (for random-weight, paper-sized presets)
    keep_float: str | None = None  # "lm_head,layers.0,graph:vae_decoder" (quant/overrides.py)
    calibration_samples: int = 8  # generated calibration samples (static w8a8)
    calibration_file: str | None = None  # safetensors <graph>.<sample>.<input>, replaces the generated ones
    w8a8_mode: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_W8A8_MODE))
    bundled_io: bool = False  # also write ExecuTorch bundled programs (.bpte) for on-device runners
    # ExecuTorch decoder KV cache: "llm-ops" (llama::update_cache + custom_sdpa; the device runner
    # must link ExecuTorch's custom_ops) or "slice" (slice-assigned cache, core kernels only, slower)
    executorch_kv_cache: str = "llm-ops"
    # Also write the Core ML-delegate .pte next to the XNNPACK one. Off helps paper-sized models on
    # 24 GB: the 0.9B DiT's CoreMLBackend lowering ran out of memory after the other graphs
    # (README "The paper-sized preset").
    executorch_coreml: bool = True


@dataclass
class Entry:
    graph: str
    fmt: str
    file: str = ""
    sha256: str = ""
    bytes: int = 0
    seconds: float = 0.0
    parity: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    passed: bool = True
    error: str = ""


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_format_dependency(fmt: str) -> None:
    module = {"coreml": "coremltools", "onnx": "onnxruntime", "executorch": "executorch"}[fmt]
    try:
        __import__(module)
    except ImportError as exc:
        raise UserError(f"format '{fmt}' needs {module}, which is not installed; "
                        "pip install 'manzano-edge[export]'") from exc


# -- parity --------------------------------------------------------------------------------------
def run_parity(spec: GraphSpec, reference: GraphProgram, candidate: GraphProgram,
               examples: list[dict[str, torch.Tensor]]) -> dict:
    """Feed the same inputs to both; stateful graphs get the examples as one sequence."""
    reference.reset()
    candidate.reset()
    refs: dict[str, list[torch.Tensor]] = {t.name: [] for t in spec.outputs}
    outs: dict[str, list[torch.Tensor]] = {t.name: [] for t in spec.outputs}
    step_db = []
    for example in examples:
        if not spec.states:
            reference.reset()
            candidate.reset()
        r, o = reference.run(example), candidate.run(example)
        for t in spec.outputs:
            refs[t.name].append(r[t.name].float().flatten())
            outs[t.name].append(o[t.name].float().flatten())
        if spec.states:
            step_db.append(compare(r[spec.outputs[0].name], o[spec.outputs[0].name])["psnr_db"])
    result: dict = {"outputs": {}, "examples": len(examples)}
    for t in spec.outputs:
        ref, out = torch.cat(refs[t.name]), torch.cat(outs[t.name])
        if t.dtype.startswith("int"):
            result["outputs"][t.name] = {"agreement": float((ref == out).float().mean())}
        else:
            result["outputs"][t.name] = compare(ref, out)
    float_db = [m["psnr_db"] for m in result["outputs"].values() if "psnr_db" in m]
    agreement = [m["agreement"] for m in result["outputs"].values() if "agreement" in m]
    result["psnr_db"] = min(float_db) if float_db else None
    result["id_agreement"] = min(agreement) if agreement else None
    if spec.states:
        result["decode_steps"] = len(examples) - 1
        result["min_step_psnr_db"] = min(step_db)
        vocab = spec.outputs[0].shape[-1]
        same = [torch.equal(a.view(-1, vocab).argmax(-1), b.view(-1, vocab).argmax(-1))
                for a, b in zip(refs[spec.outputs[0].name], outs[spec.outputs[0].name])]
        result["greedy_match"] = sum(same) / len(same)
    return result


SKIPPED = {"skipped": "export --no-parity: structure checked, numerics not compared"}


def parity_bar(recipe: str, fp16_compute: bool) -> tuple[float, float]:
    """(min PSNR dB, min id agreement) an exported graph must reach."""
    # Integer outputs (FSQ ids) can flip where a value sits on a rounding boundary, even between
    # two fp32 implementations (XNNPACK vs eager differ by ~1e-4), so ids get a near-exact bar.
    if recipe in FLOAT_RECIPES:
        if fp16_compute or recipe == "fp16":
            return PARITY_DB["fp16"], 0.9
        return PARITY_DB["fp32"], 0.95
    return QUANT_SANITY_DB, 0.5


def judge(entry: Entry, recipe: str, fp16_compute: bool) -> None:
    if entry.parity.get("skipped"):
        return
    db_bar, id_bar = parity_bar(recipe, fp16_compute)
    p = entry.parity
    entry.parity["bar_db"] = db_bar
    worst = min([x for x in (p.get("psnr_db"), p.get("min_step_psnr_db")) if x is not None], default=None)
    entry.passed = (worst is None or worst >= db_bar) and (p.get("id_agreement") is None or p["id_agreement"] >= id_bar)


@dataclass
class QuantPlan:
    """What a quantized export needs per graph: the recipe, layers kept float, calibration."""

    recipe: str
    keep: KeepFloat
    modes: dict[str, str]
    calibration: dict[str, list] = field(default_factory=dict)
    calibration_source: str = ""
    calibration_samples: int | None = None  # generated (seeded, so validate can rebuild them); None for a file
    layer_modules: dict[tuple[str, bool], list[str]] = field(default_factory=dict)  # (graph, explicit) -> names

    def recipe_for(self, graph: str) -> str:
        return "fp32" if graph in self.keep.graphs else self.recipe

    def keep_modules(self, spec: GraphSpec, model: Manzano, explicit_state: bool) -> list[str]:
        key = (spec.name, explicit_state)
        if key not in self.layer_modules:
            module = build_module(spec, model, explicit_state)
            self.layer_modules[key] = resolve_layers(module, self.keep).modules
        return self.layer_modules[key]

    def manifest(self, graph: str, fmt: str, info: dict) -> dict:
        out = {"name": self.recipe_for(graph), "requested": self.recipe}
        if graph in self.keep.graphs:
            out["kept_float"] = f"--keep-float graph:{graph}"
        # Every backend resolves per-layer overrides through keep_modules, so they are recorded
        # here once (validate's Core ML w8a8 rebuild reads them back).
        kept_layers = sorted({n for (g, _), names in self.layer_modules.items() if g == graph for n in names})
        details = {**info, **({"kept_float_layers": kept_layers} if kept_layers else {})}
        if details:
            out["details"] = details
        if not self.keep.empty:
            out["keep_float"] = self.keep.to_json()
        return out


def plan_quantization(model: Manzano, codec: TextCodec, specs: dict[str, GraphSpec], graphs: list[str],
                      opts: ExportOptions) -> QuantPlan | None:
    if opts.recipe in FLOAT_RECIPES:
        if opts.keep_float:
            raise UserError(f"--keep-float only applies to quantized recipes; '{opts.recipe}' is float already")
        return None
    keep = parse_keep_float(opts.keep_float, list(specs))
    modes = {fmt: check_mode(fmt, opts.w8a8_mode.get(fmt, DEFAULT_W8A8_MODE[fmt])) for fmt in opts.formats}
    plan = QuantPlan(opts.recipe, keep, modes)
    matched: set[str] = set()
    for name in graphs:
        if name not in keep.graphs:
            matched |= resolve_layers(build_module(specs[name], model, False), keep).matched_items
    check_all_matched(keep, matched, [g for g in graphs if g not in keep.graphs])
    needs_calibration = opts.recipe == "w8a8" and any(modes.get(f) == "static" for f in opts.formats)
    if needs_calibration:
        if opts.calibration_file:
            plan.calibration = calib.from_file(opts.calibration_file, specs)
            plan.calibration_source = f"file {Path(opts.calibration_file).name}"
        else:
            plan.calibration = calib.generated(model, codec, opts.calibration_samples)
            plan.calibration_samples = opts.calibration_samples
            plan.calibration_source = f"generated: {opts.calibration_samples} samples (seeds from {calib.CALIBRATION_SEED})"
        for name in graphs:
            if name not in keep.graphs:
                if not plan.calibration.get(name):
                    raise UserError(f"calibration data has no samples for graph '{name}'")
                calib.check_shapes(specs[name], plan.calibration[name])
    return plan


def _cannot_quantize(spec: GraphSpec, fmt: str, recipe: str, why: str) -> UserError:
    return UserError(f"recipe '{recipe}' cannot quantize graph '{spec.name}' on {fmt}: {why}; keep it float with "
                     f"--keep-float graph:{spec.name} or leave it out with --graphs")


def _check_smaller(entry: Entry, float_bytes: int) -> None:
    entry.extra["float_bytes"] = float_bytes
    if entry.bytes >= float_bytes:
        entry.passed = False
        entry.error = f"quantized file ({entry.bytes} B) is not smaller than the float one ({float_bytes} B)"


# -- per format ----------------------------------------------------------------------------------
def export_onnx(spec, model, examples, out: Path, recipe: str, check: bool = True,
                plan: QuantPlan | None = None) -> Entry:
    entry = Entry(spec.name, "onnx")
    path = out / "onnx" / f"{spec.name}{onnx.SUFFIX}"
    module = build_module(spec, model, explicit_state=True)
    if recipe in FLOAT_RECIPES:
        onnx.export(spec, module, examples[0], path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / path.name
            onnx.export(spec, module, examples[0], float_path)
            mode = plan.modes["onnx"] if recipe == "w8a8" else "nbits"
            info = onnx_ptq.quantize(spec, float_path, path, recipe, mode, plan.calibration.get(spec.name),
                                     plan.keep_modules(spec, model, True))
            if not onnx_ptq.quantized_anything(info):
                why = "MatMulNBits covers MatMul weights only" if mode == "nbits" else \
                    f"no {'/'.join(info['op_types'])} node with constant weights"
                raise _cannot_quantize(spec, "onnx", recipe, why)
            entry.extra["quantization"] = info
            float_bytes = path_digest(float_path)[1]
    if not check:
        entry.parity = dict(SKIPPED)
    else:
        entry.parity = run_parity(spec, TorchProgram(spec, build_module(spec, model, False)),
                                  onnx.OrtProgram(spec, path), examples)
    # The smallest graph also runs in ONNX's own reference interpreter (float only: it has no
    # com.microsoft kernels such as MatMulNBits).
    if check and spec.name == "code_features" and recipe in FLOAT_RECIPES:
        ref = run_parity(spec, TorchProgram(spec, build_module(spec, model, False)),
                         onnx.ReferenceProgram(spec, path), examples)
        entry.extra["reference_evaluator_psnr_db"] = ref["psnr_db"]
    entry.extra["io"] = spec.manifest_io(explicit_state=True)
    entry.extra["opset"] = onnx.OPSET
    entry.extra["verified_by"] = "onnxruntime"
    judge(entry, recipe, fp16_compute=False)
    entry = _finish(entry, path, out)
    if recipe not in FLOAT_RECIPES:
        _check_smaller(entry, float_bytes)
    return entry


def export_executorch(spec, model, examples, out: Path, recipe: str, check: bool = True,
                      plan: QuantPlan | None = None, bundled_io: bool = False, kv_cache: str = "llm-ops",
                      coreml_delegate: bool = True) -> list[Entry]:
    entries = []
    xnn = Entry(spec.name, "executorch")
    path = out / "executorch" / f"{spec.name}{executorch.SUFFIX}"
    module = build_module(spec, model, False, executorch=kv_cache == "llm-ops")
    if spec.states:  # a stateful graph without an in-place build keeps the slice-assigned cache
        xnn.extra["kv_cache"] = kv_cache if spec.build_executorch else "slice"
    if recipe in FLOAT_RECIPES:
        xnn.extra.update(executorch.export(spec, module, examples[0], path, "xnnpack"))
    else:
        _quantized_xnnpack(spec, model, module, examples, path, recipe, plan, xnn)
    # Parity against the graph's reference build (the decoder's slice-assigned cache), so an
    # ExecuTorch-only variant is checked against the module every other format exports.
    xnn.parity = dict(SKIPPED) if not check else run_parity(
        spec, TorchProgram(spec, build_module(spec, model, False)), executorch.EtProgram(spec, path), examples)
    xnn.extra["io"] = {**spec.manifest_io(explicit_state=False), "states": executorch.state_io(spec, module)}
    del module
    xnn.extra["backend"] = "xnnpack"
    xnn.extra["verified_by"] = "executorch.runtime"
    judge(xnn, recipe, fp16_compute=False)
    if bundled_io:
        bpte = path.with_suffix(executorch.BUNDLED_SUFFIX)
        info = executorch.write_bundled_program(spec, path, examples[0], bpte)
        digest, size = path_digest(bpte)
        xnn.extra["bundled_program"] = {"file": str(bpte.relative_to(out)), "sha256": digest, "bytes": size, **info}
    entries.append(_finish(xnn, path, out))
    gc.collect()  # FX graphs hold reference cycles: free the XNNPACK program's weight copies now
    if recipe not in FLOAT_RECIPES:
        _check_smaller(xnn, xnn.extra.pop("_float_bytes"))
        return entries  # the Core ML delegate program is float-only here; Core ML recipes go through `coreml`
    if not coreml_delegate:
        return entries
    apple = Entry(spec.name, "executorch-coreml")
    path = out / "executorch-coreml" / f"{spec.name}{executorch.SUFFIX}"
    apple.extra.update(executorch.export(spec, build_module(spec, model, False), examples[0], path, "coreml"))
    apple.extra["io"] = spec.manifest_io(explicit_state=False)
    apple.extra["backend"] = "coreml"
    apple.extra["verified_by"] = "structure only: CoreMLBackend runs on Apple hardware"
    entries.append(_finish(apple, path, out))
    return entries


def _quantized_xnnpack(spec, model, module, examples, path: Path, recipe: str, plan: QuantPlan, entry: Entry) -> None:
    mode = plan.modes["executorch"] if recipe == "w8a8" else "8da4w"
    program, info = xnnpack_ptq.quantize(spec, module, examples[0], recipe, mode, plan.calibration.get(spec.name),
                                         plan.keep_modules(spec, model, False))
    partitioner = executorch.xnnpack_partitioner(dynamic_quant=mode in ("dynamic", "8da4w"))
    buffer, delegates, graph = executorch.lower_program(program, partitioner)
    info["delegation"] = xnnpack_ptq.delegation(graph)
    entry.extra["non_delegated_ops"] = executorch.non_delegated_ops(graph)
    if info["delegation"]["quant_ops_delegated"] == 0:
        raise _cannot_quantize(spec, "executorch", recipe, "no quantized op ends up inside an XNNPACK delegate "
                               f"({info['delegation']['quant_ops_not_delegated']} left on portable kernels)")
    path.write_bytes(buffer)
    entry.extra.update({"delegates": delegates, "quantization": info})
    # An fp32 .pte is its float weights plus a small program: compare against that.
    entry.extra["_float_bytes"] = sum(t.numel() * 4 for t in module.state_dict().values() if t.is_floating_point())


def export_coreml(spec, model, examples, out: Path, recipe: str, fp16: bool, check: bool = True,
                  plan: QuantPlan | None = None) -> Entry:
    entry = Entry(spec.name, "coreml")
    path = out / "coreml" / f"{spec.name}{coreml.SUFFIX}"
    module = build_module(spec, model, False)
    if recipe == "w8a8":
        return _export_coreml_w8a8(spec, model, module, examples, out, path, plan, check, entry)
    fp16 = fp16 or recipe == "fp16"
    mlmodel = coreml.convert(spec, module, examples[0], fp16=fp16 if recipe in FLOAT_RECIPES else True)
    if recipe not in FLOAT_RECIPES:
        kept = plan.keep_modules(spec, model, False) if plan else []
        mlmodel = coreml.compress(mlmodel, recipe, kept)
        entry.extra["quantization"] = {"tool": "coremltools.optimize.coreml"}
    mlmodel.save(str(path))
    info = coreml.structure(path)
    problems = coreml.verify_structure(spec, info)
    if problems:
        raise RuntimeError("structure differs from the declaration: " + "; ".join(problems))
    weights = coreml.stored_weights(mlmodel)
    compute_fp16 = fp16 or recipe not in FLOAT_RECIPES
    emu, replaced, total = coreml.emulated_module(module, weights, fp16=compute_fp16)
    if check:
        entry.parity = run_parity(spec, TorchProgram(spec, module), coreml.EmulatedProgram(spec, emu, compute_fp16),
                                  examples)
        entry.parity["emulated"] = True
    else:
        entry.parity = dict(SKIPPED)
    entry.extra.update({"io": spec.manifest_io(explicit_state=False), "ops": info["ops"],
                        "op_count": info["op_count"], "states": info["states"],
                        "compute_precision": "fp16" if compute_fp16 else "fp32",
                        "weights_emulated": f"{replaced}/{total}",
                        "verified_by": "emulation (PyTorch with Core ML's stored weights and precision)"})
    if recipe not in FLOAT_RECIPES:
        entry.extra["decompression"] = coreml.decompression_errors(module, weights, recipe)
    _predict_parity(spec, module, path, examples, check, entry)
    judge(entry, recipe, fp16_compute=compute_fp16)
    if "decompression" in entry.extra and not entry.extra["decompression"]["ok"]:
        entry.passed = False
    return _finish(entry, path, out)


def _predict_parity(spec, module, path: Path, examples, check: bool, entry: Entry) -> None:
    """On macOS, the real .mlpackage through predict; elsewhere, say why not."""
    ok, why = coreml.predict_available()
    if ok and check:
        entry.parity["predict"] = run_parity(spec, TorchProgram(spec, module), coreml.CoreMLProgram(spec, path),
                                             examples)
        entry.extra["verified_by"] = "coremltools predict"
    else:
        entry.extra["predict_skipped"] = why


def _export_coreml_w8a8(spec, model, module, examples, out: Path, path: Path, plan: QuantPlan, check: bool,
                        entry: Entry) -> Entry:
    """Calibrated in PyTorch (coreml_ptq), converted, then checked: the mlprogram must carry
    activation quantize/dequantize ops, and the emulation is the quantized PyTorch graph itself."""
    program, quantized, info = coreml_ptq.w8a8(spec, module, examples[0], plan.calibration.get(spec.name),
                                               plan.keep_modules(spec, model, False))
    mlmodel = coreml.convert_program(spec, program, fp16=True)
    del program
    mlmodel.save(str(path))
    structure = coreml.structure(path)
    problems = coreml.verify_structure(spec, structure)
    if problems:
        raise RuntimeError("structure differs from the declaration: " + "; ".join(problems))
    info["activation_quant_ops"] = coreml_ptq.activation_quant_ops(structure["ops"])
    if info["activation_quant_ops"] == 0:
        raise _cannot_quantize(spec, "coreml", "w8a8", "the converted mlprogram has no quantize/dequantize op, "
                               "so it would run float")
    # The emulation stands for the mlprogram only if the conversion kept every activation scale.
    if not coreml_ptq.same_scales(coreml_ptq.graph_activation_scales(quantized),
                                  coreml_ptq.mlprogram_activation_scales(mlmodel._mil_program)):
        raise RuntimeError("the mlprogram's activation scales differ from the calibrated PyTorch graph's")
    entry.parity = dict(SKIPPED) if not check else {
        **run_parity(spec, TorchProgram(spec, module), coreml.EmulatedProgram(spec, quantized, fp16=False), examples),
        "emulated": True}
    entry.extra.update({"io": spec.manifest_io(explicit_state=False), "ops": structure["ops"],
                        "op_count": structure["op_count"], "states": structure["states"], "compute_precision": "fp16",
                        "quantization": info,
                        "verified_by": "emulation (the pt2e-quantized PyTorch graph: Core ML's weights and activation "
                                       "scales, fp32 between quantize/dequantize where Core ML computes fp16)"})
    _predict_parity(spec, module, path, examples, check, entry)
    judge(entry, "w8a8", fp16_compute=True)
    entry = _finish(entry, path, out)
    # Core ML stores float weights as fp16: int8 must come in well under that.
    _check_smaller(entry, sum(t.numel() * 2 for t in module.state_dict().values() if t.is_floating_point()))
    return entry


def _finish(entry: Entry, path: Path, out: Path) -> Entry:
    entry.file = str(path.relative_to(out))
    entry.sha256, entry.bytes = path_digest(path)
    side = sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())  # ONNX external weights (> 2 GB)
    if side:
        entry.extra["external_data"] = []
        for p in side:
            digest, size = path_digest(p)
            entry.extra["external_data"].append({"file": str(p.relative_to(out)), "sha256": digest, "bytes": size})
            entry.bytes += size
    return entry


# -- the bundle ----------------------------------------------------------------------------------
def validate_options(opts: ExportOptions, specs: dict[str, GraphSpec]) -> list[str]:
    for fmt in opts.formats:
        if fmt not in FORMATS:
            raise UserError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
        check_supported(fmt, opts.recipe)
        check_format_dependency(fmt)
    if opts.coreml_precision not in ("fp16", "fp32"):
        raise UserError(f"unknown Core ML compute precision '{opts.coreml_precision}'; choose fp16 or fp32")
    if opts.executorch_kv_cache not in EXECUTORCH_KV_CACHES:
        raise UserError(f"unknown ExecuTorch KV cache '{opts.executorch_kv_cache}'; "
                        f"choose from {', '.join(EXECUTORCH_KV_CACHES)}")
    if list(opts.graphs or []) == ["all"]:
        return list(specs)
    graphs = list(opts.graphs or [n for n, spec in specs.items() if not spec.optional])
    unknown = [g for g in graphs if g not in specs]
    if unknown:
        raise UserError(f"unknown graph '{unknown[0]}'; choose from {', '.join(specs)} or all")
    return graphs


def export_bundle(model: Manzano, tokenizer_json: str, out: str | Path, opts: ExportOptions) -> dict:
    out = Path(out)
    specs = graph_specs(model.cfg)
    graphs = validate_options(opts, specs)
    tmp = begin_output_dir(out, opts.overwrite)
    try:
        for fmt in opts.formats:
            (tmp / fmt).mkdir()
            if fmt == "executorch" and opts.executorch_coreml:
                (tmp / "executorch-coreml").mkdir()
        codec = TextCodec(tokenizer_json, model.cfg.text)
        for p in model.parameters():
            p.requires_grad_(False)
        examples = real_examples(model, codec, decode_steps=opts.decode_steps).per_graph
        plan = plan_quantization(model, codec, specs, graphs, opts)
        entries: list[Entry] = []
        tasks = [(fmt, g) for fmt in opts.formats for g in graphs]
        bar = tqdm(tasks, desc="export", disable=not opts.show_progress, dynamic_ncols=True)
        for fmt, name in bar:
            bar.set_description(f"export {name} -> {fmt}")
            spec = specs[name]
            t0 = time.time()
            recipe = plan.recipe_for(name) if plan else opts.recipe
            try:
                if fmt == "onnx":
                    new = [export_onnx(spec, model, examples[name], tmp, recipe, opts.parity, plan)]
                elif fmt == "executorch":
                    new = export_executorch(spec, model, examples[name], tmp, recipe, opts.parity, plan,
                                            bundled_io=opts.bundled_io, kv_cache=opts.executorch_kv_cache,
                                            coreml_delegate=opts.executorch_coreml)
                else:
                    new = [export_coreml(spec, model, examples[name], tmp, recipe,
                                         fp16=opts.coreml_precision == "fp16" or recipe != opts.recipe,
                                         check=opts.parity, plan=plan)]
            except UserError:
                raise
            except MemoryError as exc:
                raise ExportFailed(f"graph '{name}' ran out of memory converting to {fmt}; export one format at a "
                                   "time (--format) on a machine with more RAM") from exc
            except Exception as exc:  # the converters raise anything; name graph, format and the op/cause
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportFailed(f"graph '{name}' failed to convert to {fmt}: {type(exc).__name__}: {first[:300]}") \
                    from exc
            for e in new:
                e.seconds = round(time.time() - t0, 2)
            entries.extend(new)
            gc.collect()
        manifest = build_manifest(model, opts, entries, plan)
        failed = [e for e in entries if not e.passed]
        if failed:
            print_summary(manifest)
            names = ", ".join(f"{e.graph}/{e.fmt}" + (f" ({e.error})" if e.error else "") for e in failed)
            raise ExportFailed(f"parity check failed for {names}; nothing was written to {out}"
                               + _parity_fix_hint(opts.recipe, sorted({e.graph for e in failed})))
        model.cfg.save(tmp / CONFIG_FILE)
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        # The DiT's learned "no condition" vector: the runtime needs it for classifier-free guidance.
        null_file = tmp / NULL_CONDITION_FILE
        save_file({"null_condition": model.dit.null_cond.detach().contiguous()}, str(null_file))
        digest, size = path_digest(null_file)
        manifest["extras"] = {"null_condition": {"file": NULL_CONDITION_FILE, "sha256": digest, "bytes": size}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        commit_output_dir(tmp, out)
    except BaseException:
        abort_output_dir(tmp)
        raise
    return manifest


def _parity_fix_hint(recipe: str, graphs: list[str]) -> str:
    """The next step after a failed parity check: a quantized graph usually misses the bar because of
    a few sensitive layers (v15's w4 decoder: 26.6 dB all int4, 42.0 dB with lm_head float)."""
    if recipe in FLOAT_RECIPES:
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
        recipe = plan.recipe_for(e.graph) if plan else opts.recipe
        how = SUPPORT[(e.fmt.split("-")[0], recipe)].how
        if e.fmt == "coreml" and recipe in FLOAT_RECIPES:
            how = f"mlprogram, {e.extra['compute_precision']} compute"
        info = e.extra.pop("quantization", {})
        rec = {"name": recipe, "how": how, **(plan.manifest(e.graph, e.fmt, info) if plan else {})}
        g["formats"][e.fmt] = {"file": e.file, "sha256": e.sha256, "bytes": e.bytes, "recipe": rec,
                               "export_seconds": e.seconds, "parity": e.parity, "passed": e.passed, **e.extra}
    return {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model.cfg.name, "config": CONFIG_FILE, "tokenizer": TOKENIZER_FILE,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "recipe": opts.recipe, "coreml_compute_precision": opts.coreml_precision,
            **({"quantization": {"keep_float": plan.keep.to_json(), "w8a8_mode": plan.modes,
                                 "calibration": plan.calibration_source or "none (no static activations)",
                                 "calibration_samples": plan.calibration_samples}}
               if plan else {}),
            "tools": tool_versions(), "graphs": graphs}


def print_summary(manifest: dict) -> None:
    print(f"\n{'graph':<14} {'format':<18} {'size':>10} {'parity':>16} {'time s':>7}  verified by")
    for name, g in manifest["graphs"].items():
        for fmt, f in g["formats"].items():
            p = f["parity"]
            if not p:
                parity = "lowered only"
            elif p.get("skipped"):
                parity = "skipped"
            else:
                db = min([x for x in (p.get("psnr_db"), p.get("min_step_psnr_db")) if x is not None], default=None)
                parity = f"{db:.1f} dB" if db is not None else f"ids {p['id_agreement']:.2f}"
                parity += "" if f["passed"] else " FAIL"
            size = f"{f['bytes'] / 1e6:.2f} MB"
            print(f"{name:<14} {fmt:<18} {size:>10} {parity:>16} {f['export_seconds']:>7.1f}  {f['verified_by']}")

"""The decoder in Apple's Core ML LLM convention (`Convention.APPLE_LLM`), which the Core ML exporter
writes to `coreml-llm/decoder.mlpackage`: the I/O that swift-transformers' `LanguageModel` and the
app code of Apple's "On Device Llama 3.1 with Core ML" drive.

One multifunction model, its weights stored once for both functions:
- `main`, the default function (the one swift-transformers loads): `inputIds` int32 [1, T];
- `inputs_embeds`: `inputsEmbeds` fp16 [1, T, D], for prompts with spliced image rows.

Both take the fp16 additive `causalMask` [1, 1, T, E] (E = past + T), keep the cache in the fp16
states `keyCache` / `valueCache`, and return fp16 `logits` [1, T, V] of every new position. Each
function is one flexible-shape step for prefill and decode, as the bundle's own Core ML decoder.

Checked on Linux by emulation (Core ML's stored weights, fp16 compute, in PyTorch), as the other
Core ML files; on macOS also through `predict` (`AppleLLMProgram`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from manzano_edge.data.text import TextCodec
from manzano_edge.export import coreml
from manzano_edge.export.base import Entry, GraphJob, RunnerProgram
from manzano_edge.export.parity import SKIPPED, judge, run_parity, token_steps_parity
from manzano_edge.fsutil import path_digest
from manzano_edge.quant.recipes import is_float
from manzano_edge.runtime.backends.coreml import AppleLLMProgram, EmulatedProgram, predict_available
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.decoding import causal_mask
from manzano_edge.spec.graphs import Convention, Dim, GraphSpec, GraphVariant
from manzano_edge.spec.modules import LastPositionLogits, build_module
from manzano_edge.spec.tracing import variant_dynamic_shapes, variant_example

FOLDER = "coreml-llm"
RUNNER = "coreml-llm"
GRAPH = "decoder"
FILE = "decoder.mlpackage"
DEFAULT_FUNCTION = "main"
PARITY_PROMPT = "a red circle and a blue square"  # the token-id function's prefill at export
FUNCTIONS = {"main": Convention.APPLE_LLM, "inputs_embeds": Convention.APPLE_LLM_EMBEDS}
DOCS = {"inputIds": "token ids of the T new positions",
        "inputsEmbeds": "embeddings of the T new positions (text, spliced image rows, or one token)",
        "causalMask": "additive fp16 mask [1, 1, T, E]: 0 where key k <= past + q, -inf elsewhere; E = past + T",
        "logits": "next-token logits of every new position (row T - 1 predicts the next token)",
        "keyCache": "keys of every layer (state)", "valueCache": "values of every layer (state)"}


def unsupported(recipe: str) -> str | None:
    """Why this file cannot carry `recipe` (None: it can)."""
    if recipe == "w8a8":
        return ("Core ML w8a8 calibrates the decoder graph's embeddings input, and the token-id function has no "
                "calibration of its own; this folder takes a weight-only recipe (w8, w4, palette4)")
    return None


def _convert_function(job: GraphJob, variant: GraphVariant, recipe: str):
    """One function as a single-function mlprogram: converted at fp16 compute (Core ML states are fp16),
    compressed by the recipe, its inputs renamed to the convention's names. Returns it, with its
    emulation (the converted module with the stored weights, fp16) and how many tensors that replaced."""
    ct = coreml._ct()
    spec, model = job.spec, job.model
    module = variant.build(model).eval()
    with torch.no_grad():
        program = torch.export.export(module, variant_example(spec, variant),
                                      dynamic_shapes=variant_dynamic_shapes(spec, variant, module), strict=False)
    mlmodel = coreml.convert_program(variant, program, fp16=True, target=job.opts.coreml_target)
    if not is_float(recipe):
        mlmodel = coreml.compress(mlmodel, recipe, job.plan.keep_modules(spec, model) if job.plan else [])
    emulated, replaced, total = coreml.emulated_module(module, coreml.stored_weights(mlmodel), fp16=True)
    if replaced == 0:
        raise RuntimeError("the Core ML LLM decoder's stored weights match none of the decoder's")
    proto = mlmodel.get_spec()
    for feature, want in zip(list(proto.description.input), variant.inputs):
        if feature.name != want.name:  # torch.export names inputs after the forward's (snake-case) arguments
            ct.utils.rename_feature(proto, feature.name, want.name)
    return ct.models.MLModel(proto, weights_dir=mlmodel.weights_dir, skip_model_load=True), emulated, f"{replaced}/{total}"


def _describe(path: Path, spec: GraphSpec, model_name: str, recipe: str, target: str) -> None:
    """coremltools' metadata (`coreml.describe`), then a description of every function's I/O and states
    (a multifunction model keeps them per function)."""
    ct = coreml._ct()
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    coreml.describe(mlmodel, spec, model_name, recipe, target)
    mlmodel.short_description = (f"{model_name} decoder step in Apple's Core ML LLM convention: functions "
                                 f"{', '.join(FUNCTIONS)} ({recipe}, fp16 compute, {target})")
    mlmodel.user_defined_metadata["manzano-edge.convention"] = "Apple Core ML LLM (swift-transformers LanguageModel)"
    for function in mlmodel._spec.description.functions:
        for feature in (*function.input, *function.output, *function.state):
            feature.shortDescription = DOCS[feature.name]
    described = path.with_name(f".described-{path.name}")  # MLModel.save cannot write over its own package
    mlmodel.save(str(described))
    shutil.rmtree(path)
    described.rename(path)


def structure_problems(path: Path, variants: dict[str, GraphVariant]) -> list[str]:
    """Mismatches between the multifunction package and the convention (empty: none): the default
    function, each function's input and output names and dtypes, flexible ranges, and states."""
    ct = coreml._ct()
    proto = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    kinds = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    functions = {f.name: f for f in proto.description.functions}
    problems = [] if proto.description.defaultFunctionName == DEFAULT_FUNCTION else \
        [f"default function is {proto.description.defaultFunctionName!r}, not {DEFAULT_FUNCTION!r}"]
    for name, variant in variants.items():
        function = functions.get(name)
        if function is None:
            problems.append(f"function {name} missing")
            continue
        for kind, declared, found in (("input", variant.inputs, function.input), ("output", variant.outputs, function.output),
                                      ("state", variant.states, function.state)):
            got = {f.name: f for f in found}
            for t in declared:
                feature = got.get(t.name)
                array = None if feature is None else \
                    (feature.type.stateType.arrayType if kind == "state" else feature.type.multiArrayType)
                if array is None:
                    problems.append(f"{name}: {kind} {t.name} missing")
                elif kinds.Name(array.dataType).lower() != t.dtype:
                    problems.append(f"{name}: {kind} {t.name} is {kinds.Name(array.dataType).lower()}, declared {t.dtype}")
                elif kind == "input":
                    upper = [r.upperBound for r in array.shapeRange.sizeRanges] or list(array.shape)
                    want = [d.max if isinstance(d, Dim) else d for d in t.shape]
                    if upper != want:
                        problems.append(f"{name}: input {t.name} allows up to {upper}, declared {want}")
                elif kind == "state" and list(array.shape) != list(t.concrete({})):
                    problems.append(f"{name}: state {t.name} is {list(array.shape)}, declared {list(t.concrete({}))}")
    return problems


def _parity(job: GraphJob, steps: dict[str, torch.nn.Module], tokens: torch.Tensor) -> dict[str, dict]:
    """Each function by emulation: `inputs_embeds` on the export's examples through the graph's own
    I/O, `main` on `tokens` (a prefill, then greedy decode steps)."""
    spec, model = job.spec, job.model
    embeds = EmulatedProgram(spec, LastPositionLogits(steps["inputs_embeds"], (torch.float16, torch.float16)), fp16=True)
    ids_step = steps["main"]
    ids_step.reset()

    def run_ids(ids: torch.Tensor, past: int) -> torch.Tensor:
        with torch.no_grad():
            return ids_step(ids.int(), causal_mask(past, ids.shape[1]).half())[:, -1:]

    return {"inputs_embeds": {**run_parity(spec, TorchProgram(spec, build_module(spec, model)), embeds, job.examples),
                              "emulated": True},
            "main": {**token_steps_parity(spec, model, tokens, run_ids), "emulated": True}}


def write_file(out: Path, job: GraphJob, tokenizer_json: str) -> dict:
    """`out/coreml-llm/decoder.mlpackage` and the manifest's record of it."""
    ct = coreml._ct()
    recipe, target = job.recipe, job.opts.coreml_target
    why = unsupported(recipe)
    if why:
        return {"folder": None, "not_written": why}
    t0 = time.time()
    folder = out / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / FILE
    variants = {name: job.spec.variants[convention] for name, convention in FUNCTIONS.items()}
    steps, single_bytes = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        descriptor = ct.utils.MultiFunctionDescriptor()
        for name, variant in variants.items():
            mlmodel, steps[name], emulated = _convert_function(job, variant, recipe)
            single = Path(tmp) / f"{name}.mlpackage"
            mlmodel.save(str(single))
            single_bytes += path_digest(single)[1]
            descriptor.add_function(str(single), src_function_name="main", target_function_name=name)
        descriptor.default_function_name = DEFAULT_FUNCTION
        if path.exists():
            shutil.rmtree(path)
        ct.utils.save_multifunction(descriptor, str(path))
    _describe(path, job.spec, job.model.cfg.name, recipe, target)
    problems = structure_problems(path, variants)
    if problems:
        raise RuntimeError("the Core ML LLM decoder differs from Apple's convention: " + "; ".join(problems))
    digest, size = path_digest(path)
    record = {"folder": FOLDER, "files": [{"file": f"{FOLDER}/{FILE}", "sha256": digest, "bytes": size}],
              "recipe": recipe, "deployment_target": target, "compute_precision": "fp16",
              "default_function": DEFAULT_FUNCTION, "separate_functions_bytes": single_bytes,
              "weights_emulated": emulated,
              "functions": {name: {"io": v.manifest_io(job.spec.variant_dims)} for name, v in variants.items()},
              "export_seconds": round(time.time() - t0, 2),
              "verified_by": "emulation (PyTorch with Core ML's stored weights and precision)"}
    ok, why = predict_available()
    if not ok:
        record["predict_skipped"] = why
    if not job.check:
        record.update({"status": "not checked", "failed": [], "parity": dict(SKIPPED)})
        return record
    failed = []
    codec = TextCodec(tokenizer_json, job.model.cfg.text)
    tokens = torch.tensor([[job.model.cfg.text.bos_id, *codec.encode(PARITY_PROMPT)]])
    for name, parity in _parity(job, steps, tokens).items():
        probe = Entry(GRAPH, FOLDER, parity=parity)
        judge(probe, recipe, fp16_compute=True)
        record["functions"][name]["parity"] = parity
        if not probe.passed:
            failed.append(f"{name} ({parity.get('min_step_psnr_db')} dB, greedy match {parity.get('greedy_match')})")
    if ok:
        predicted = run_parity(job.spec, TorchProgram(job.spec, build_module(job.spec, job.model)),
                               AppleLLMProgram(job.spec, path, function="inputs_embeds"), job.examples)
        record["functions"]["inputs_embeds"]["predict_parity"] = predicted
        record["verified_by"] = "coremltools predict (inputs_embeds); emulation (main)"
        probe = Entry(GRAPH, FOLDER, parity=predicted)
        judge(probe, recipe, fp16_compute=True)
        if not probe.passed:
            failed.append(f"inputs_embeds through predict ({predicted['min_step_psnr_db']} dB)")
    record.update({"status": "failed" if failed else "emulated", "failed": failed})
    return record


def runner_programs(bundle, spec: GraphSpec) -> list[RunnerProgram]:
    """The file's `inputs_embeds` function behind the decoder's own I/O, for `validate` where Core ML
    runs (macOS): `validate` scores a stock-runner file only on its own runtime."""
    record = bundle.manifest.get("runners", {}).get(RUNNER, {})
    if spec.name != GRAPH or not record.get("folder") or not predict_available()[0]:
        return []
    (entry,) = record["files"]
    path = bundle.verified_file(entry["file"], entry["sha256"])
    return [RunnerProgram(f"{FOLDER}:inputs_embeds", spec, AppleLLMProgram(spec, path, function="inputs_embeds"),
                          record["recipe"], entry["bytes"])]

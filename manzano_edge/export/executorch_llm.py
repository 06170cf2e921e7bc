"""The program the ExecuTorch exporter writes for ExecuTorch's stock LLM runners (`TextLLMRunner`,
`MultimodalRunner`; `llama_main`, the Android JNI layer and iOS's ExecuTorchLLM wrap them):
`executorch-llm/model.pte` with one method per graph (`Convention.STOCK_LLM_RUNNER`: vision_encoder,
token_embedding, text_decoder, and `forward` for the text runner), the runners' metadata methods,
and `tokenizer.json` in the form their loader reads.

Each method is checked against the reference build of its graph through `executorch.runtime`,
over a prefill and the export's decode steps for the decoder methods.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from manzano_edge.data.text import runner_tokenizer, with_joint_vocabulary
from manzano_edge.export.base import Entry, GraphJob, RunnerProgram
from manzano_edge.export.parity import judge, run_parity, token_steps_parity
from manzano_edge.fsutil import path_digest
from manzano_edge.quant.recipes import GROUP_SIZE, is_float
from manzano_edge.runtime.backends.executorch import RunnerMethodProgram, runtime
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import Convention, GraphSpec, GraphVariant
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.tracing import variant_dynamic_shapes

FOLDER = "executorch-llm"
RUNNER = "executorch-llm-runner"
PROGRAM_FILE = "model.pte"
TOKENIZER_FILE = "tokenizer.json"
# method -> (graph, convention); the multimodal runner's three, then the text runner's `forward`.
METHODS = {"vision_encoder": ("tokenizer", Convention.STOCK_LLM_RUNNER),
           "token_embedding": ("embed_tokens", Convention.STOCK_LLM_RUNNER),
           "text_decoder": ("decoder", Convention.STOCK_LLM_RUNNER),
           "forward": ("decoder", Convention.STOCK_TEXT_RUNNER)}
GRAPHS = ("tokenizer", "embed_tokens", "decoder")
# The runners' mode names for the recipes this program implements (torchao on every Linear).
RECIPES = {"fp32": "float32", "w4": "torchao 8da4w: int4 weights group 32, int8 dynamic activations",
           "w8a8": "torchao 8da8w: int8 per-channel weights, int8 dynamic per-token activations"}


# What a static-w8a8 export writes here: ExecuTorch's LLM export quantizes the runners' program with
# torchao's dynamic-activation recipes, and the `forward` method's token inputs have no calibration.
STATIC_NOTE = ("w8a8 here is ExecuTorch's LLM recipe, torchao 8da8w (dynamic per-token activations); "
               "--xnnpack-w8a8 static applies to executorch/*.pte")


def unsupported(recipe: str) -> str | None:
    """Why this program cannot carry `recipe` (None: it can)."""
    if recipe not in RECIPES:
        return f"recipe {recipe} has no ExecuTorch implementation"
    return None


def metadata(cfg) -> dict:
    """The runners' constant methods. They read the context from `get_max_seq_len` and stop at
    `get_eos_ids` (their tokenizer's guess is wrong for this vocabulary)."""
    context = cfg.decoder.max_position_embeddings - 1
    return {"get_max_seq_len": context, "get_max_context_len": context, "get_bos_id": cfg.text.bos_id,
            "get_eos_ids": [cfg.text.eos_id], "use_kv_cache": True, "enable_dynamic_shape": True,
            "use_sdpa_with_kv_cache": True, "get_vocab_size": cfg.vocab_size}


def llm_runner_tokenizer(tokenizer_json: str, cfg) -> str:
    """The bundle's BPE in the form the runners' tokenizer loader reads: no normalizer (it rejects
    NFKC; the app passes `data.text.runner_text(text)`), no prefix space, a <bos> post-processor (so
    `GenerationConfig.num_bos` works), and one special token per id up to the model's vocabulary (the
    runners pick among the tokenizer's vocab_size logits only, so image codes need ids of their own)."""
    tok = runner_tokenizer(tokenizer_json)
    bos = next(t["content"] for t in tok["added_tokens"] if t["id"] == cfg.text.bos_id)
    piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [piece, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [piece, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {bos: {"id": bos, "ids": [cfg.text.bos_id], "tokens": [bos]}}}
    return json.dumps(with_joint_vocabulary(tok, cfg.vocab_size, cfg.image_token_offset), ensure_ascii=False)


def _method_module(spec: GraphSpec, variant: GraphVariant, model, recipe: str, keep: list[str]) -> nn.Module:
    module = variant.build(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if is_float(recipe):
        return module
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    module = copy.deepcopy(module)
    config = (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))
              if recipe == "w4" else
              Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    skip = set(keep)
    quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in skip)
    return module


def _example(variant: GraphVariant, cfg) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a 4-position prefill at input_pos 0, a zero uint8 image."""
    args = []
    for t in variant.inputs:
        shape = t.concrete({"seq": 4})
        if t.name == "input_pos":
            args.append(torch.tensor([0]))
        elif t.dtype == "uint8":
            args.append(torch.zeros(shape, dtype=torch.uint8))
        elif t.dtype.startswith("int"):
            args.append(torch.ones(shape, dtype=torch.int64))
        else:
            args.append(torch.zeros(shape))
    return tuple(args)


def build(specs: dict[str, GraphSpec], model, recipes: dict[str, str], keep: dict[str, list[str]], path: Path) -> dict:
    """Export the four methods, each graph's with its own recipe, into one XNNPACK program at `path`;
    returns what was lowered."""
    from executorch.exir import EdgeCompileConfig

    from manzano_edge.export import executorch as lowering  # the format's module, which imports this one

    to_edge_transform_and_lower, BackendConfig, SymShapePass = lowering.exir()
    programs = {}
    for method, (graph, convention) in METHODS.items():
        spec = specs[graph]
        variant = spec.variants[convention]
        module = _method_module(spec, variant, model, recipes[graph], keep.get(graph, []))
        dims = variant_dynamic_shapes(spec, variant, module)
        with torch.no_grad():
            programs[method] = torch.export.export(module, _example(variant, model.cfg), dynamic_shapes=dims, strict=False)
    # The variants read the cache position from input_pos at run time: ExecuTorch checks those
    # data-dependent sizes when it runs, not as edge-IR shape invariants.
    partitioner = lowering.xnnpack_partitioner(any(not is_float(r) for r in recipes.values()))
    edge = to_edge_transform_and_lower(programs, partitioner=partitioner if isinstance(partitioner, list) else [partitioner],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                       constant_methods=metadata(model.cfg))
    path.write_bytes(edge.to_executorch(BackendConfig(sym_shape_eval_pass=SymShapePass())).buffer)
    return {"metadata": metadata(model.cfg), "how": {m: RECIPES[recipes[g]] for m, (g, _) in METHODS.items()}}


def check(specs: dict[str, GraphSpec], model, jobs: dict[str, GraphJob], path: Path) -> dict[str, dict]:
    """Parity of each method against its graph's reference build, through executorch.runtime."""
    out = {}
    for method, (graph, convention) in METHODS.items():
        spec, job = specs[graph], jobs[graph]
        if convention == Convention.STOCK_TEXT_RUNNER:
            out[method] = token_step_parity(spec, model, path, jobs["embed_tokens"].examples[0]["tokens"])
        else:
            checked = spec.float_outputs()
            out[method] = run_parity(checked, TorchProgram(checked, build_module(spec, model)),
                                     RunnerMethodProgram(checked, path, method), job.examples)
    return out


def token_step_parity(spec: GraphSpec, model, path: Path, tokens: torch.Tensor, steps: int = 8) -> dict:
    """`forward` (token ids + input_pos) against the reference decoder on the same tokens' embeddings."""
    method = runtime().load_program(path).load_method("forward")
    return token_steps_parity(spec, model, tokens, lambda ids, past: method.execute([ids, torch.tensor([past])])[0],
                              steps)


def write_program(out: Path, tokenizer_json: str, jobs: dict[str, GraphJob]) -> dict:
    """The runners' program and tokenizer in `out/executorch-llm/`, and the manifest's record of them."""
    missing = [g for g in GRAPHS if g not in jobs]
    if missing:
        return {"folder": None, "not_written": f"it needs the graphs {', '.join(missing)}: add them to --graphs"}
    job, model = jobs["decoder"], jobs["decoder"].model
    recipes = {g: jobs[g].recipe for g in GRAPHS}  # --keep-float graph:X keeps that graph's methods float
    for recipe in recipes.values():
        why = unsupported(recipe)
        if why:
            return {"folder": None, "not_written": why}
    folder = out / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / PROGRAM_FILE
    specs = {g: jobs[g].spec for g in GRAPHS}
    keep = {g: jobs[g].plan.keep_modules(specs[g], model) if jobs[g].plan else [] for g in GRAPHS}
    t0 = time.time()
    info = build(specs, model, recipes, keep, path)
    (folder / TOKENIZER_FILE).write_text(llm_runner_tokenizer(tokenizer_json, model.cfg))
    files = []
    for name in (PROGRAM_FILE, TOKENIZER_FILE):
        digest, size = path_digest(folder / name)
        files.append({"file": f"{FOLDER}/{name}", "sha256": digest, "bytes": size})
    static = any(r == "w8a8" and jobs[g].w8a8_mode("executorch") == "static" for g, r in recipes.items())
    record = {"folder": FOLDER, "files": files, "recipes": recipes, **info,
              **({"w8a8_mode": "dynamic", "note": STATIC_NOTE} if static else {}),
              "methods": {m: {"graph": g, "io": specs[g].variants[c].manifest_io(specs[g].variant_dims)}
                          for m, (g, c) in METHODS.items()},
              "export_seconds": round(time.time() - t0, 2), "verified_by": "executorch.runtime"}
    failed = []
    float_bytes = _float_weight_bytes(model, GRAPHS)
    if any(not is_float(r) for r in recipes.values()) and files[0]["bytes"] >= float_bytes:
        failed.append(f"program ({files[0]['bytes']} B) not smaller than its float weights ({float_bytes} B)")
    if job.check:
        for method, parity in check(specs, model, jobs, path).items():
            probe = Entry(METHODS[method][0], FOLDER, parity=parity)
            judge(probe, recipes[METHODS[method][0]], fp16_compute=False)
            record["methods"][method]["parity"] = parity
            if not probe.passed:
                failed.append(f"{method} ({parity.get('min_step_psnr_db', parity.get('psnr_db'))} dB)")
        record["status"] = "failed" if failed else "verified"
    else:
        record["status"] = "failed" if failed else "not checked"
    record["failed"] = failed
    return record


def method_programs(bundle, spec: GraphSpec) -> list[RunnerProgram]:
    """The runner program's methods that take graph `spec`'s inputs, for `validate`. `forward` (token
    ids in) is `token_embedding` then `text_decoder` on the same weights; export checks it
    (`token_step_parity`)."""
    record = bundle.manifest.get("runners", {}).get(RUNNER, {})
    if not record.get("folder"):
        return []
    program = next(f for f in record["files"] if f["file"].endswith(PROGRAM_FILE))
    path = bundle.verified_file(program["file"], program["sha256"])
    checked = spec.float_outputs()
    return [RunnerProgram(f"{FOLDER}:{method}", checked, RunnerMethodProgram(checked, path, method),
                          record["recipes"][graph], program["bytes"])
            for method, (graph, convention) in METHODS.items()
            if graph == spec.name and convention == Convention.STOCK_LLM_RUNNER]


def _float_weight_bytes(model, graphs: tuple[str, ...]) -> int:
    """fp32 bytes of the weights the program's methods use (the decoder's once: its two methods share them)."""
    parts = {"tokenizer": model.tokenizer, "embed_tokens": model.decoder.embed_tokens, "decoder": model.decoder}
    seen = {id(p): p.numel() * 4 for g in graphs for p in parts[g].parameters()}
    return sum(seen.values())

"""Export parity: each exported graph against eager PyTorch on real inputs, and the bar it must reach.

The real accuracy bars are `validate`'s; these catch a conversion that is wrong (float recipes
near-exact, quantized ones a sanity bar that silently-wrong lowering misses by far)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from manzano_edge.export.base import Entry
from manzano_edge.metrics import compare
from manzano_edge.quant.recipes import is_float
from manzano_edge.runtime.backends import GraphProgram
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.decoding import causal_mask
from manzano_edge.spec.graphs import GraphSpec
from manzano_edge.spec.modules import build_module

PARITY_DB = {"fp32": 60.0, "fp16": 40.0}
QUANT_SANITY_DB = 20.0  # quantized graphs: catches silently-wrong lowering; `validate` applies the real bars
SKIPPED = {"skipped": "export --no-parity: structure checked, numerics not compared"}


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


def parity_bar(recipe: str, fp16_compute: bool) -> tuple[float, float]:
    """(min PSNR dB, min id agreement) an exported graph must reach."""
    # Integer outputs (FSQ ids) can flip where a value sits on a rounding boundary, even between
    # two fp32 implementations (XNNPACK vs eager differ by ~1e-4), so ids get a near-exact bar.
    if is_float(recipe):
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


def token_steps_parity(spec: GraphSpec, model, tokens: torch.Tensor,
                       step: Callable[[torch.Tensor, int], torch.Tensor], steps: int = 8) -> dict:
    """A token-ids step (`step(ids [1, T], past) -> last-position logits`) against the reference
    decoder on the same tokens' embeddings: a prefill of `tokens`, then `steps` greedy decode steps."""
    reference = TorchProgram(spec, build_module(spec, model))
    reference.reset()
    ids, past, results, same = tokens.long(), 0, [], 0
    for _ in range(steps + 1):
        t = ids.shape[1]
        want = reference.run({"inputs_embeds": model.decoder.embed_tokens(ids),
                              "causal_mask": causal_mask(past, t)})["logits"]
        got = step(ids, past).float()
        results.append(compare(want, got)["psnr_db"])
        same += int(torch.equal(want.argmax(-1), got.argmax(-1)))
        past += t
        ids = want.argmax(-1).view(1, 1)
    return {"psnr_db": min(results), "min_step_psnr_db": min(results), "decode_steps": steps,
            "greedy_match": same / (steps + 1), "examples": steps + 1}

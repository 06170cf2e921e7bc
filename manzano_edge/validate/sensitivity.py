"""`manzano-edge sensitivity`: which layers does a recipe hurt, and what should stay float.

Each graph is run in eager PyTorch with torchao fake quantization on the recipe's grid (the one
`qat` trains on and XNNPACK runs: int8 per-channel or int4 group-32 weights, int8 per-token
dynamic activations), switched on for one unit at a time: one Linear (`--granularity layer`)
or one block (`block`: every Linear under `layers.N` / `blocks.N`). The graph's outputs on real
validation inputs are compared with the float graph (PSNR as DESIGN §5; for the decoder also
top-1 agreement under teacher forcing where float is decisive, as `validate` gates it), and
units are ranked by what they cost.

The proposal is greedy: quantize every unit, then keep the most sensitive units float, one at a
time, until the graph meets the target (or nothing is left to keep). Its `keep_float` list is in
`export --keep-float` syntax. Conv layers (VAE decoder, ViT stem) are not analysed: the fake
quantizers cover Linear only. The proposal is an eager-PyTorch estimate on the XNNPACK grid;
`export` + `validate` measure the real backends (ORT's dynamic activations use one scale per
tensor, a coarser grid).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano
from manzano_edge.quant.overrides import LAYERED_GRAPHS
from manzano_edge.quant.qat import QAT_RECIPES, prepare
from manzano_edge.quant.recipes import PSNR_BAR_DB, recipe_config
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.graphs import GraphSpec, graph_specs
from manzano_edge.spec.modules import build_module

SCHEMA = "manzano-edge/sensitivity@1"
PREPARE_GRAPH = {"tokenizer": "tokenizer", "code_features": "tokenizer", "decoder": "decoder", "dit": "dit"}
GRANULARITIES = ("layer", "block")


@dataclass
class Target:
    psnr_db: float = PSNR_BAR_DB
    top1: float = 0.99


def _fake_quantized(module: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return {n: m for n, m in module.named_modules() if isinstance(m, FakeQuantizedLinear)}


def _used(module: nn.Module, layers: dict[str, nn.Module], spec: GraphSpec, seqs: list) -> dict[str, nn.Module]:
    """Only the layers the graph runs (code_features owns the discrete adapter but never calls
    its `to_code`): quantizing a layer that never runs would rank as free."""
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda *_, name=name: called.add(name)) for name, m in layers.items()]
    try:
        _set_enabled(layers, set())
        program = TorchProgram(spec, module)
        program.reset()
        with torch.no_grad():
            for step in seqs[0]:
                program.run(step)
    finally:
        for h in hooks:
            h.remove()
    return {n: m for n, m in layers.items() if n in called}


def _set_enabled(layers: dict[str, nn.Module], names: set[str]) -> None:
    for name, m in layers.items():
        m.activation_fake_quantizer.enabled = name in names
        m.weight_fake_quantizer.enabled = name in names


def units_of(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Unit -> its Linear names: every Linear alone, or grouped under its first `.<digits>` block."""
    units: dict[str, list[str]] = {}
    for name in names:
        key = name
        if granularity == "block":
            m = re.match(r"(.*?\.\d+)(\.|$)", name)
            key = m.group(1) if m else name
        units.setdefault(key, []).append(name)
    return units


def _score(spec: GraphSpec, reference: dict, candidate: TorchProgram, seqs: list) -> dict:
    """Worst float-output PSNR, integer-output agreement and (decoder) top-1, as `validate` computes them."""
    from manzano_edge.validate.core import output_metrics
    from manzano_edge.validate.core import run_sequences as _run

    metrics = output_metrics(spec, reference, _run(candidate, spec, seqs))
    score: dict = {"psnr_db": min(metrics[t.name]["psnr_db"] for t in spec.outputs if not t.dtype.startswith("int"))}
    score.update({f"{t.name}_agreement": metrics[t.name]["agreement"] for t in spec.outputs if t.dtype.startswith("int")})
    if spec.name == "decoder":
        tf = metrics["teacher_forcing"]  # validate's gated value: agreement where float is decisive
        score["top1"] = tf["decisive_top1_agreement"] if tf["decisive_positions"] else tf["top1_agreement"]
    return score


def _meets(score: dict, target: Target) -> bool:
    return score["psnr_db"] >= target.psnr_db and score.get("top1", 1.0) >= target.top1


def analyse_graph(model: Manzano, spec: GraphSpec, recipe: str, seqs: list, granularity: str, target: Target,
                  show: bool = True) -> dict:
    from manzano_edge.validate.core import run_sequences as _run

    reference = _run(TorchProgram(spec, build_module(spec, model)), spec, seqs)
    fq_model = copy.deepcopy(model)
    prepare(fq_model, recipe, (PREPARE_GRAPH[spec.name],))
    module = build_module(spec, fq_model)
    layers = _used(module, _fake_quantized(module), spec, seqs)
    if not layers:
        raise UserError(f"sensitivity: graph {spec.name} has no Linear layer to quantize")
    candidate = TorchProgram(spec, module)
    units = units_of(list(layers), granularity)
    rows = []
    for unit, names in tqdm(units.items(), desc=f"sensitivity {spec.name}", unit="layer", disable=not show, leave=False):
        _set_enabled(layers, set(names))
        rows.append({"unit": unit, "layers": names, **_score(spec, reference, candidate, seqs)})
    # Most sensitive first: lowest top-1 (decoder), then lowest PSNR.
    rows.sort(key=lambda r: (r.get("top1", 1.0), r["psnr_db"]))
    everything = set(layers)
    _set_enabled(layers, everything)
    all_quantized = _score(spec, reference, candidate, seqs)
    keep: list[str] = []
    after = all_quantized
    for row in rows:
        if _meets(after, target):
            break
        keep.append(row["unit"])
        _set_enabled(layers, everything - {n for u in keep for n in units[u]})
        after = _score(spec, reference, candidate, seqs)
    _set_enabled(layers, set())
    return {"graph": spec.name, "units": rows, "all_quantized": all_quantized,
            "proposal": {"keep_float": keep, "after": after, "meets_target": _meets(after, target),
                         "kept_fraction": len(keep) / len(units)}}


def sensitivity(model: Manzano, codec: TextCodec, recipe: str, graphs: list[str], samples: int = 4,
                granularity: str = "layer", target: Target | None = None, source: str = "embedded default",
                show: bool = True) -> dict:
    from manzano_edge.validate.core import validation_examples

    if recipe not in QAT_RECIPES:
        raise UserError(f"sensitivity: unknown recipe '{recipe}'; choose from {', '.join(QAT_RECIPES)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"sensitivity: unknown granularity '{granularity}'; choose from {', '.join(GRANULARITIES)}")
    bad = [g for g in graphs if g not in LAYERED_GRAPHS]
    if bad or not graphs:
        raise UserError(f"sensitivity: unknown graph '{bad[0] if bad else ''}'; choose from {', '.join(LAYERED_GRAPHS)} "
                        "(vae_decoder and embed_tokens have no Linear layers)")
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    target = target or Target(psnr_db=recipe_config(recipe).psnr_bar_db)
    specs = graph_specs(model.cfg)
    seqs = validation_examples(model, codec, samples, decode_steps=8)
    results = [analyse_graph(model, specs[g], recipe, seqs[g], granularity, target, show) for g in graphs]
    keep = [u for r in results for u in r["proposal"]["keep_float"]]
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": source,
        "recipe": recipe,
        "grid": "torchao fake quantization, XNNPACK grid (eager PyTorch estimate)",
        "granularity": granularity,
        "samples": samples,
        "target": {"psnr_db": target.psnr_db, "top1": target.top1},
        "graphs": results,
        "keep_float": ",".join(keep),
    }


# -- report ----------------------------------------------------------------------------------------
def write_report(report: dict, out, overwrite: bool = False):
    """report.json, report.md and sensitivity.png, all at once (temp directory, then rename)."""
    import json
    from pathlib import Path

    from manzano_edge.fsutil import atomic_output_dir

    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot(report, tmp / "sensitivity.png")
        (tmp / "report.md").write_text(markdown(report))
    return out


def _score_text(score: dict) -> str:
    text = f"{score['psnr_db']:.1f} dB"
    text += "".join(f", {k.removesuffix('_agreement')} agreement {v:.3f}" for k, v in score.items()
                    if k.endswith("_agreement"))
    return text + (f", top-1 {score['top1']:.3f}" if "top1" in score else "")


def markdown(report: dict, top: int = 10) -> str:
    t = report["target"]
    lines = [f"# Sensitivity: recipe {report['recipe']} ({report['granularity']} granularity)", "",
             f"Checkpoint: {report['checkpoint']}. Grid: {report['grid']}. {report['samples']} validation samples "
             f"per graph. Target: PSNR >= {t['psnr_db']} dB, decoder top-1 >= {t['top1']}.", "",
             "| graph | all quantized | proposal: keep float | after | meets target |", "|---|---|---|---|---|"]
    for g in report["graphs"]:
        p = g["proposal"]
        lines.append(f"| {g['graph']} | {_score_text(g['all_quantized'])} | {', '.join(p['keep_float']) or '-'} | "
                     f"{_score_text(p['after'])} | {'yes' if p['meets_target'] else 'NO'} |")
    lines += ["", f"Export with: `--keep-float {report['keep_float']}`" if report["keep_float"]
              else "Nothing needs to stay float.", "", "![sensitivity](sensitivity.png)", ""]
    for g in report["graphs"]:
        lines += [f"## {g['graph']}: the {min(top, len(g['units']))} most sensitive units (only that unit quantized)",
                  "", "| unit | PSNR dB | top-1 |", "|---|---|---|"]
        for row in g["units"][:top]:
            top1 = f"{row['top1']:.3f}" if "top1" in row else "-"
            lines.append(f"| {row['unit']} | {row['psnr_db']:.1f} | {top1} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path, top: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = report["graphs"]
    fig, axes = plt.subplots(1, len(graphs), figsize=(4.2 * len(graphs), 4.2), squeeze=False)
    for ax, g in zip(axes[0], graphs):
        rows = g["units"][:top][::-1]
        kept = set(g["proposal"]["keep_float"])
        ax.barh(range(len(rows)), [r["psnr_db"] for r in rows],
                color=["tab:red" if r["unit"] in kept else "tab:blue" for r in rows])
        ax.set_yticks(range(len(rows)), [r["unit"][-28:] for r in rows], fontsize=6)
        ax.axvline(report["target"]["psnr_db"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("output PSNR dB, only this unit quantized")
        ax.set_title(f"{g['graph']} ({report['recipe']}); red = proposed float", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Quantization-aware training: `manzano-edge qat CHECKPOINT --recipe w8a8|w4 -o RUN`.

Fake quantization comes from torchao (`QATConfig` with explicit `IntxFakeQuantizeConfig`s) on
every Linear of the chosen graphs, on the grid the recipe exports to:

| recipe | weights (fake-quantized)        | activations (fake-quantized)        |
|--------|---------------------------------|-------------------------------------|
| w8a8   | int8 symmetric per-channel      | int8 asymmetric, dynamic per-token  |
| w4     | int4 symmetric per-group of 32  | int8 asymmetric, dynamic per-token  |

That is the XNNPACK grid exactly (pt2e dynamic per-channel int8, and torchao 8da4w). ORT's
dynamic w8a8 uses one activation scale per tensor, a coarser grid than the one trained; its w4
(MatMulNBits) keeps activations float, a finer one.

The objective is distillation from the float checkpoint (a frozen copy) rather than the task
loss: what `validate` measures, and what users feel, is agreement with the float reference, and
task-loss fine-tuning drifts away from it. The data (procedural scenes and prompts) and the loop
(`train.loop.run_stage`: resumable, DDP under torchrun) are the ones `train` uses.

After training the fake quantizers are removed (`QATConfig(step="convert")` without a base
config gives plain Linear layers back), so the run writes an ordinary float checkpoint whose
weights sit where the recipe's grid wants them; `export --recipe` then applies the same grid.
Conv layers (ViT stem/patch embedding, VAE decoder) are not fake-quantized (torchao's QAT covers
Linear only) and get PTQ at export; the VAE decoder is therefore not a QAT graph.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.data.batches import Example, generation_batch, splice_image_embeddings, understanding_batch
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import Manzano, load_checkpoint, save_checkpoint
from manzano_edge.models.vision_tokenizer import spatial_to_channel
from manzano_edge.quant.overrides import matches
from manzano_edge.quant.recipes import GROUP_SIZE
from manzano_edge.train.loop import StageBudget
from manzano_edge.train.stages import DIT_FOREGROUND_WEIGHT, foreground_weight, freeze

QAT_RECIPES = ("w8a8", "w4")
QAT_GRAPHS = ("tokenizer", "decoder", "dit")  # graphs with Linear layers (code_features trains with tokenizer)
QAT_STEPS = {"tokenizer": 150, "decoder": 200, "dit": 200}
# Low learning rates: the weights only have to move onto the grid, not learn anything new. At 5e-5
# Adam moves a weight by up to ~7% of a median int8 grid step per step, and w8a8 QAT at that rate
# ended further from float than PTQ; int4's step is 16x coarser, so w4 takes 5e-5.
QAT_LR = {"w8a8": 2e-6, "w4": 5e-5}
RECORD_FILE = "qat.json"


@dataclass
class QATRunConfig:
    recipe: str = "w8a8"
    graphs: tuple[str, ...] = QAT_GRAPHS
    keep_float: tuple[str, ...] = ()
    seed: int = 0
    save_every: int = 100
    # None: QAT_STEPS at the recipe's QAT_LR.
    stages: dict[str, StageBudget] | None = None

    def __post_init__(self) -> None:
        if self.stages is None:
            lr = QAT_LR.get(self.recipe, QAT_LR["w4"])
            self.stages = {g: StageBudget(steps=n, batch_size=16, lr=lr, warmup=20) for g, n in QAT_STEPS.items()}

    def validate(self) -> QATRunConfig:
        if self.recipe not in QAT_RECIPES:
            raise UserError(f"qat: unknown recipe '{self.recipe}'; choose from {', '.join(QAT_RECIPES)} "
                            "(float recipes need no QAT; w8 and palette4 are weight-only PTQ)")
        bad = [g for g in self.graphs if g not in QAT_GRAPHS]
        if bad or not self.graphs:
            raise UserError(f"qat: unknown graph '{bad[0] if bad else ''}'; choose from {', '.join(QAT_GRAPHS)} "
                            "(vae_decoder is all convolutions, which torchao QAT does not cover; it keeps PTQ)")
        return self

    def scaled(self, steps: int) -> QATRunConfig:
        """Same recipe, `steps` steps per graph (tests and quick runs)."""
        stages = {k: dataclasses.replace(v, steps=steps, warmup=min(v.warmup, max(1, steps // 2)))
                  for k, v in self.stages.items()}
        return dataclasses.replace(self, stages=stages)


# -- fake quantization -------------------------------------------------------------------------
def fake_quant_configs(recipe: str):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    if recipe == "w8a8":
        weights = IntxFakeQuantizeConfig(torch.int8, granularity=PerAxis(0), is_symmetric=True)
    else:
        weights = IntxFakeQuantizeConfig(torch.int4, granularity=PerGroup(GROUP_SIZE), is_symmetric=True)
    return activations, weights


def graph_modules(model: Manzano, graph: str) -> dict[str, nn.Module]:
    """The Manzano sub-modules each QAT graph owns, by qualified-name prefix."""
    if graph == "tokenizer":
        return {"tokenizer": model.tokenizer}
    if graph == "decoder":
        return {"decoder": model.decoder}
    return {"dit": model.dit}


def prepare(model: Manzano, recipe: str, graphs: tuple[str, ...], keep_float: tuple[str, ...] = ()) -> list[str]:
    """Swap the chosen graphs' Linear layers for torchao FakeQuantizedLinear; returns their names."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activations, weights = fake_quant_configs(recipe)
    swapped: list[str] = []
    matched: set[str] = set()
    for graph in graphs:
        for prefix, module in graph_modules(model, graph).items():
            def wanted(m: nn.Module, fqn: str, prefix: str = prefix) -> bool:
                if not isinstance(m, nn.Linear):
                    return False
                full = f"{prefix}.{fqn}"
                hits = [item for item in keep_float if matches(full, item)]
                matched.update(hits)
                if hits:
                    return False
                if recipe == "w4" and m.in_features % GROUP_SIZE:
                    raise UserError(f"qat w4: '{full}' has in_features {m.in_features}, not a multiple of {GROUP_SIZE}; "
                                    f"keep it float with --keep-float {fqn}")
                swapped.append(full)
                return True

            quantize_(module, QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
                      filter_fn=wanted)
    missing = [item for item in keep_float if item not in matched]
    if missing:
        raise UserError(f"--keep-float: no Linear layer named '{missing[0]}' in the QAT graphs {', '.join(graphs)}")
    return swapped


def finalize(model: Manzano) -> None:
    """Remove the fake quantizers: plain nn.Linear layers holding the QAT-trained weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: _is_fake_quantized(m))


def _is_fake_quantized(m: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return isinstance(m, FakeQuantizedLinear)


def count_fake_quantized(model: nn.Module) -> int:
    return sum(_is_fake_quantized(m) for m in model.modules())


# -- distillation stages (forward(examples, rng) -> loss, logs, as train.stages) ----------------
def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE relative to the teacher's power: 1/SQNR, comparable across outputs of any scale."""
    return ((student - teacher) ** 2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over the positions the mask keeps."""
    kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _top1(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> float:
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
    return float((agree * mask).sum() / mask.sum().clamp_min(1.0))


class DecoderDistill(nn.Module):
    """The decoder on the `train` decoder stage's understanding + generation batches, matched to
    the float decoder's logits at every real position."""

    def __init__(self, student: Manzano, teacher: Manzano, codec: TextCodec) -> None:
        super().__init__()
        self.cfg, self.codec = student.cfg, codec
        freeze(student.tokenizer)
        self.decoder, self.teacher = student.decoder, teacher

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        t, n = self.cfg.text, self.cfg.vision.num_image_tokens
        half = (len(examples) * 5) // 8
        und, gen = examples[:half], examples[half:]
        tok = self.teacher.tokenizer
        with torch.no_grad():
            pixels = torch.stack([ex.pixels for ex in examples])
            features = tok.encoder(pixels)
            ids = tok.discrete.fsq.codes_to_indices(tok.discrete.codes(features[half:]))
            ub = understanding_batch(und, self.codec, self.cfg)
            image_embeds = tok.continuous(features[:half])[ub["image_index"]]
            und_embeds = splice_image_embeddings(self.teacher.decoder.embed(ub["tokens"]), image_embeds)
            gb = generation_batch([ex.prompt for ex in gen], ids, self.codec, self.cfg, rng)
            teacher_und = self.teacher.decoder(inputs_embeds=und_embeds)
            teacher_gen = self.teacher.decoder(tokens=gb["tokens"])
        # Real positions: every non-pad token, plus the N image slots (pad ids carrying embeddings).
        und_len = (ub["tokens"] != t.pad_id).sum(1) + n
        gen_len = (gb["tokens"] != t.pad_id).sum(1)
        und_mask = (torch.arange(ub["tokens"].shape[1])[None] < und_len[:, None]).float()
        gen_mask = (torch.arange(gb["tokens"].shape[1])[None] < gen_len[:, None]).float()
        student_und = self.decoder(inputs_embeds=und_embeds)
        student_gen = self.decoder(tokens=gb["tokens"])
        und_kl = masked_kl(student_und, teacher_und, und_mask)
        gen_kl = masked_kl(student_gen, teacher_gen, gen_mask)
        return und_kl + gen_kl, {"kl_und": und_kl.item(), "kl_gen": gen_kl.item(),
                                 "top1": _top1(student_gen, teacher_gen, gen_mask)}


class TokenizerDistill(nn.Module):
    """Both tokenizer branches and the code-features adapter against the float tokenizer: the
    continuous embeddings, the pre-FSQ code latents (rounding them would hide the error until a
    code flips) and the features of the float model's codes (the `code_features` graph)."""

    def __init__(self, student: Manzano, teacher: Manzano, codec: TextCodec) -> None:
        super().__init__()
        self.tokenizer, self.teacher = student.tokenizer, teacher
        self.grid = student.tokenizer.discrete.grid

    def _code_latents(self, tokenizer: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return tokenizer.discrete.to_code(spatial_to_channel(features, self.grid))

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([ex.pixels for ex in examples])
        ref = self.teacher.tokenizer
        with torch.no_grad():
            t_features = ref.encoder(pixels)
            t_embeds = ref.continuous(t_features)
            t_latents = self._code_latents(ref, t_features)
            t_ids = ref.discrete.fsq.codes_to_indices(ref.discrete.fsq.quantize(t_latents))
            t_cond = ref.discrete.ids_to_features(t_ids)
        features = self.tokenizer.encoder(pixels)
        embeds = normalized_mse(self.tokenizer.continuous(features), t_embeds)
        latents = normalized_mse(self._code_latents(self.tokenizer, features), t_latents)
        cond = normalized_mse(self.tokenizer.discrete.ids_to_features(t_ids), t_cond)
        return embeds + latents + cond, {"embeds": embeds.item(), "latents": latents.item(), "cond": cond.item()}


class DiTDistill(nn.Module):
    """The DiT's velocity against the float DiT's, on the `train` DiT stage's inputs (logit-normal
    timesteps, 10% null condition, foreground-weighted cells)."""

    def __init__(self, student: Manzano, teacher: Manzano, codec: TextCodec) -> None:
        super().__init__()
        self.dit, self.teacher = student.dit, teacher
        # Frozen: the bundle stores it and `validate` uses it to recognise the float reference.
        self.dit.null_cond.requires_grad_(False)
        self.scale = student.cfg.vae.scaling_factor

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([ex.pixels for ex in examples])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        ref = self.teacher
        with torch.no_grad():
            cond = ref.tokenizer.discrete.ids_to_features(ref.tokenizer.image_to_ids(pixels))
            latent = ref.vae.encoder(pixels)[0] * self.scale
            weight = foreground_weight(pixels, latent.shape[-1], strength=DIT_FOREGROUND_WEIGHT)
            b = latent.shape[0]
            noise = torch.randn(latent.shape, generator=gen)
            t = torch.sigmoid(torch.randn(b, generator=gen))
            x_t = (1 - t)[:, None, None, None] * noise + t[:, None, None, None] * latent
            drop = torch.rand(b, generator=gen) < 0.1
            cond = torch.where(drop[:, None, None], ref.dit.unconditional(b, cond.shape[1]), cond)
            target = ref.dit(x_t, t, cond)
        err = (self.dit(x_t, t, cond) - target) ** 2 * weight
        loss = err.mean() / (target.pow(2) * weight).mean().clamp_min(1e-12)
        return loss, {"nmse": loss.item()}


DISTILL = {"tokenizer": TokenizerDistill, "decoder": DecoderDistill, "dit": DiTDistill}


def train_only_fake_quantized(stage: nn.Module) -> int:
    """Only the fake-quantized Linear layers learn; embeddings, norms, position embeddings and
    every float-exported graph stay exactly the float reference's. (The first measured w8a8 run
    trained everything: `embed_tokens`, a float graph, drifted to 56.7 dB of the reference.)"""
    for p in stage.parameters():
        p.requires_grad_(False)
    trainable = 0
    for m in stage.modules():
        if _is_fake_quantized(m):  # the teacher was copied before `prepare`: it has none
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                trainable += p.numel()
    return trainable


# -- the run -------------------------------------------------------------------------------------
def qat(checkpoint: str | None, run_dir: str | Path, qcfg: QATRunConfig, show: bool = True) -> Path:
    """Fine-tune `checkpoint` with fake quantization; returns `run_dir/checkpoint`. `show=False`: no progress bars."""
    from manzano_edge.data.batches import SceneSource
    from manzano_edge.train.loop import (
        TrainConfig,
        barrier,
        dist_info,
        maybe_init_distributed,
        run_stage,
    )

    qcfg.validate()
    maybe_init_distributed()
    rank, world = dist_info()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path = run_dir / RECORD_FILE
    if record_path.exists():
        previous = json.loads(record_path.read_text())["config"]
        if previous["recipe"] != qcfg.recipe or tuple(previous["graphs"]) != tuple(qcfg.graphs):
            raise UserError(f"{run_dir} holds a QAT run for recipe {previous['recipe']} on {previous['graphs']}; "
                            "use a fresh run directory")
    torch.manual_seed(qcfg.seed)
    model, tokenizer_json = load_checkpoint(checkpoint)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    swapped = prepare(model, qcfg.recipe, qcfg.graphs, qcfg.keep_float)
    codec = TextCodec(tokenizer_json, model.cfg.text)
    # fp32: the fake quantizers round like FSQ does, and the distillation targets sit at the 35 dB level;
    # bf16 (8 bits of mantissa) would move values across int8 steps before they are rounded.
    tcfg = TrainConfig(seed=qcfg.seed, save_every=qcfg.save_every, precision="fp32")
    if rank == 0:
        record_path.write_text(json.dumps({"config": dataclasses.asdict(qcfg)}, indent=2) + "\n")

    def make_source(seed: int) -> SceneSource:
        return SceneSource(model.cfg.vision.image_size, seed)

    stages = []
    for graph in qcfg.graphs:
        stage = DISTILL[graph](model, teacher, codec)
        train_only_fake_quantized(stage)
        stages.append(run_stage(f"qat-{graph}", stage, qcfg.stages[graph], run_dir, tcfg, make_source, show=show))
    finalize(model)
    final = run_dir / "checkpoint"
    if rank == 0:
        meta = {"qat_recipe": qcfg.recipe, "qat_graphs": ",".join(qcfg.graphs),
                "qat_source": str(checkpoint or "embedded default")}
        save_checkpoint(model, final, tokenizer_json, metadata=meta)
        record = {"config": dataclasses.asdict(qcfg), "source": meta["qat_source"], "world_size": world,
                  "fake_quantized_linears": len(swapped), "stages": stages}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    barrier()
    return final

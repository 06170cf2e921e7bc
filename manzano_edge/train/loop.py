"""`manzano-edge train`: the staged training loop (single process or DDP under torchrun).

State lives in a run directory:
  tokenizer.json            the BPE, trained first
  stage-<name>/state.safetensors + progress.json   resumable per-stage state (weights + AdamW)
  model/                    the full model after the last finished stage (checkpoint format)
  checkpoint/               the final checkpoint, written when every stage is done
Everything is safetensors; optimizer state is flattened into tensors, never pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from manzano_edge.config import ModelConfig, preset
from manzano_edge.data.batches import FolderSource, SceneSource
from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Manzano,
    load_checkpoint,
    load_state,
    load_weights_into,
    save_checkpoint,
)
from manzano_edge.train.stages import (
    STAGES,
    DecoderStage,
    DiTStage,
    TokenizerStage,
    VAEStage,
    freeze,
    measure_latent_scale,
)


@dataclass
class StageBudget:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    decay: bool = True  # cosine to 0.1 x lr after warmup; False keeps lr constant


@dataclass
class SceneData:
    """What the procedural scene source draws for one stage (ignored for a user's --data-dir)."""

    questions_per_image: int = 3
    # Share of "is there a <colour> <shape>?" distractors that differ from a real object in one
    # attribute. Stage 2 only: in stage 1 the same data weakens the tokenizer's captions.
    hard_negative_rate: float = 0.0
    # Chance that a scene has two objects (None: 1 or 2, uniformly). Stage 2b ("binding") only: only
    # two-object questions teach binding, and they help as a fine-tune, not from scratch in stage 2.
    two_object_share: float | None = None
    # Share of scenes drawn with a loose layout (scenes.LOOSE_*: anywhere in the cell, sizes 0.065-0.14,
    # stretched up to 1.5:1), like a user's own drawing resized to the square input. Understanding
    # stages only: the VAE and DiT render what the decoder generates, mostly canonical layouts.
    loose_share: float = 0.0
    # Question kind (scenes.QUESTION_KINDS) -> how many times likelier than an unlisted kind; empty
    # draws every kind equally. Decoder stages only.
    question_weights: dict[str, float] = field(default_factory=dict)


# The measured runs behind these defaults are in CHANGELOG.md, "Measured history behind the defaults".

# Stage 2b's mix: after the long stage 1 the decoder loses the questions that find an object by its colour
# *and* shape; 3x in stage 2b brings them back, while 3x in stage 2 too slows generation's learning.
SEARCH_QUESTIONS = {"where": 3.0, "exists": 3.0}

# Generation-loss weight per decoder stage (DecoderStage): the long stage 1's codes are harder to predict,
# so stage 2 weighs generation 2x; stage 2b keeps 1, since 2 there costs VQA.
GENERATION_WEIGHT = {"decoder": 2.0, "binding": 1.0}

PRECISIONS = ("bf16-mixed", "fp32")
# Parts `--freeze` keeps fixed in every stage (e.g. a pretrained vision tower while its adapters train).
FREEZABLE = {"vit": lambda model: model.tokenizer.encoder, "decoder": lambda model: model.decoder}


@dataclass
class TrainConfig:
    preset: str = "tiny"
    seed: int = 0
    save_every: int = 200
    # "bf16-mixed": each stage's forward runs under CPU bf16 autocast; weights, AdamW state and losses
    # stay fp32. On this machine's AVX512-BF16 cores a step takes 0.56-0.64x the fp32 time. The frozen
    # ViT and discrete adapter still run in fp32 (`stages.frozen_precision`), so the image ids a stage
    # learns from are the ones inference computes.
    precision: str = "bf16-mixed"
    frozen: tuple[str, ...] = ()
    stages: dict[str, StageBudget] = field(default_factory=lambda: {
        # A short warmup and a long schedule read loose scenes and a user's drawings better; longer still loses "no".
        "tokenizer": StageBudget(steps=3000, batch_size=32, lr=1e-3, warmup=5),
        "decoder": StageBudget(steps=3000, batch_size=32, lr=1e-3),
        # A brief fine-tune on stage 2's output: 1200 steps bind better than 600.
        "binding": StageBudget(steps=1200, batch_size=32, lr=3e-4, warmup=0, decay=False),
        # The fewest full-size steps tried at which the VAE alone keeps every colour (fewer decode purple as blue).
        "vae": StageBudget(steps=1200, batch_size=16, lr=1e-3),
        # Within 0.01 of 3000 steps on both image paths at about 2 minutes less; 2000 scores far lower.
        "dit": StageBudget(steps=2400, batch_size=32, lr=5e-4),
    })
    generation_weight: dict[str, float] = field(default_factory=lambda: dict(GENERATION_WEIGHT))
    scene_data: dict[str, SceneData] = field(default_factory=lambda: {
        # Loose scenes reach only the continuous adapter in stage 1 (TokenizerStage), since on the codes they
        # cost shape; a quarter of scenes loose keeps the decoder's yes/no answers, half loses them.
        "tokenizer": SceneData(loose_share=0.25),
        "decoder": SceneData(questions_per_image=4, hard_negative_rate=0.5, loose_share=0.3),
        "binding": SceneData(questions_per_image=4, hard_negative_rate=0.5, two_object_share=0.8, loose_share=0.3,
                             question_weights=dict(SEARCH_QUESTIONS)),
    })

    def scaled(self, factor: float) -> TrainConfig:
        """Shrink every stage's step count (quick runs and tests)."""
        stages = {k: dataclasses.replace(v, steps=max(1, int(v.steps * factor)), warmup=min(v.warmup, 5))
                  for k, v in self.stages.items()}
        return dataclasses.replace(self, stages=stages)

    def validate(self) -> TrainConfig:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        unknown = [part for part in self.frozen if part not in FREEZABLE]
        if unknown:
            raise UserError(f"cannot freeze {unknown[0]!r}; choose from {', '.join(FREEZABLE)}")
        return self


# -- distributed ---------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def maybe_init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- optimizer state as tensors --------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"optim.{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_stage_state(stage_dir: Path, module: nn.Module, opt: torch.optim.Optimizer, step: int, done: bool) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    weights = {f"module.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tmp = stage_dir / "state.safetensors.tmp"
    save_file({**weights, **opt_tensors}, tmp, metadata={"optimizer": json.dumps(opt_meta)})
    os.replace(tmp, stage_dir / "state.safetensors")
    (stage_dir / "progress.json").write_text(json.dumps({"step": step, "done": done}) + "\n")


def load_stage_state(stage_dir: Path, module: nn.Module, opt: torch.optim.Optimizer) -> int:
    progress = json.loads((stage_dir / "progress.json").read_text())
    path = stage_dir / "state.safetensors"
    tensors = load_state(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["optimizer"])
    module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    missing = set(module.state_dict()) - set(module_state)
    if missing:
        raise UserError(f"cannot resume from {stage_dir}: it was written for a different model ({sorted(missing)[:2]} "
                        "missing); start a fresh run directory")
    module.load_state_dict(module_state)
    load_optimizer_tensors(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta)
    return int(progress["step"])


def autocast_for(precision: str) -> AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def warn_if_bf16_is_emulated(precision: str) -> None:
    if precision == "bf16-mixed" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("this CPU has no native bf16, so --precision bf16-mixed is emulated and slow; "
                      "try --precision fp32", stacklevel=2)


# -- the loop ---------------------------------------------------------------------------------
def lr_at(step: int, budget: StageBudget) -> float:
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    if not budget.decay:
        return budget.lr
    progress = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# Fixed per stage (not the position in STAGES), so adding a stage leaves the others' seeds alone.
STAGE_SEED_OFFSET = {"tokenizer": 1, "decoder": 2, "vae": 3, "dit": 4, "binding": 5}


def stage_seed(seed: int, stage: str) -> int:
    """Torch's global RNG is reseeded per stage (training-only heads, VAE sampling noise), so a stage
    trains the same whether it runs in one process after the others, alone with --stages, or resumed."""
    return seed * 1_000_003 + STAGE_SEED_OFFSET[stage]


def build_stage(name: str, model: Manzano, codec: TextCodec, tcfg: TrainConfig) -> nn.Module:
    if name == "tokenizer":
        return TokenizerStage(model, codec)
    if name in ("decoder", "binding"):
        return DecoderStage(model, codec, generation_weight=tcfg.generation_weight.get(name, 1.0))
    if name == "vae":
        return VAEStage(model)
    return DiTStage(model)


def run_stage(name: str, stage: nn.Module, budget: StageBudget, run_dir: Path, tcfg: TrainConfig,
              make_source, show: bool = True) -> dict:
    """Train `stage` (forward(examples, rng) -> loss, logs) for `budget`; resumable from run_dir/stage-<name>.
    Shared by `train` and `qat`; `show=False` hides the progress bar."""
    rank, world = dist_info()
    warn_if_bf16_is_emulated(tcfg.precision)
    stage.train()
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=budget.lr, betas=(0.9, 0.95), weight_decay=0.01)
    stage_dir = run_dir / f"stage-{name}"
    start = load_stage_state(stage_dir, stage, opt) if (stage_dir / "progress.json").exists() else 0
    wrapped = nn.parallel.DistributedDataParallel(stage) if world > 1 else stage
    source = make_source(tcfg.seed * 1_000_003 + rank * 7_919 + start + 1)
    per_rank = max(1, budget.batch_size // world)
    logs: dict = {}
    t0 = time.time()
    bar = tqdm(range(start, budget.steps), desc=f"train {name}", initial=start, total=budget.steps,
               unit="step", disable=rank != 0 or not show, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, budget)
        examples = [source.sample() for _ in range(per_rank)]
        rng = np.random.default_rng((tcfg.seed, rank, step))
        with autocast_for(tcfg.precision):
            loss, logs = wrapped(examples, rng)
        if not torch.isfinite(loss):
            raise RuntimeError(f"stage {name}: loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
        last = step + 1 == budget.steps
        if (step + 1) % tcfg.save_every == 0 or last:
            if rank == 0:
                save_stage_state(stage_dir, stage, opt, step + 1, done=last)
            barrier()
    return {"stage": name, "steps": budget.steps, "resumed_from": start, "seconds": round(time.time() - t0, 1),
            "final_losses": logs}


def stage_done(run_dir: Path, name: str) -> bool:
    progress = run_dir / f"stage-{name}" / "progress.json"
    return progress.exists() and json.loads(progress.read_text()).get("done", False)


def prepare_tokenizer(run_dir: Path, cfg: ModelConfig, seed: int) -> str:
    path = run_dir / TOKENIZER_FILE
    if not path.exists():
        tok = train_bpe(cfg.text.text_vocab_size, domain_corpus(seed=seed))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tok.to_str())
        os.replace(tmp, path)
    return path.read_text()


def start_from_checkpoint(run_dir: Path, checkpoint: str | Path) -> None:
    """Seed a fresh run directory with a checkpoint's config, weights and tokenizer (e.g. one with an
    imported decoder), so that its stages train from there instead of from scratch."""
    model, tokenizer_json = load_checkpoint(checkpoint)
    save_checkpoint(model, run_dir / "model", tokenizer_json)
    (run_dir / TOKENIZER_FILE).write_text(tokenizer_json)


def train(run_dir: str | Path, tcfg: TrainConfig, cfg: ModelConfig | None = None, data_dir: str | None = None,
          captions: str | None = None, stages: tuple[str, ...] = STAGES, show: bool = True,
          init: str | Path | None = None) -> Path:
    """Run (or resume) every stage; returns the final checkpoint directory. `show=False`: no progress bars.
    `init`: a checkpoint a fresh run starts from (a resumed run keeps its own weights)."""
    tcfg.validate()
    maybe_init_distributed()
    rank, world = dist_info()
    if world > 1:  # split the cores between ranks; a single process keeps torch's default (honours OMP_NUM_THREADS)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = run_dir / "model"
    if init is not None and not (model_dir / CONFIG_FILE).exists():
        if rank == 0:
            start_from_checkpoint(run_dir, init)
        barrier()
    if (model_dir / CONFIG_FILE).exists():
        cfg = ModelConfig.load(model_dir / CONFIG_FILE)
    cfg = (cfg or preset(tcfg.preset)).validate()
    torch.manual_seed(tcfg.seed)
    model = Manzano(cfg)
    if (model_dir / WEIGHTS_FILE).exists():
        load_weights_into(model, load_state(model_dir / WEIGHTS_FILE), str(model_dir))
    tokenizer_json = prepare_tokenizer(run_dir, cfg, tcfg.seed) if rank == 0 else None
    barrier()
    tokenizer_json = tokenizer_json or (run_dir / TOKENIZER_FILE).read_text()
    codec = TextCodec(tokenizer_json, cfg.text)

    def source_for(stage: str):
        def make_source(seed: int):
            if data_dir or captions:
                if not (data_dir and captions):
                    raise UserError("--data-dir and --captions go together: a folder of images and a JSONL of captions")
                return FolderSource(data_dir, captions, cfg.vision.image_size, seed)
            data = tcfg.scene_data.get(stage, SceneData())
            return SceneSource(cfg.vision.image_size, seed, data.questions_per_image, data.hard_negative_rate,
                               data.two_object_share, data.loose_share, data.question_weights)
        return make_source

    if rank == 0:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(tcfg), indent=2) + "\n")
    report = []
    for name in stages:
        if stage_done(run_dir, name):
            continue
        torch.manual_seed(stage_seed(tcfg.seed, name))
        stage = build_stage(name, model, codec, tcfg)
        for part in tcfg.frozen:
            freeze(FREEZABLE[part](model))
        report.append(run_stage(name, stage, tcfg.stages[name], run_dir, tcfg, source_for(name), show=show))
        if name == "vae":
            model.cfg.vae.scaling_factor = measure_latent_scale(model, cfg.vision.image_size)
        if rank == 0:
            save_checkpoint(model, model_dir, tokenizer_json)
        barrier()
    final = run_dir / "checkpoint"
    if rank == 0:
        save_checkpoint(model, final, tokenizer_json)
        log = run_dir / "train_log.json"
        history = json.loads(log.read_text()) if log.exists() else []
        log.write_text(json.dumps(history + report, indent=2) + "\n")
    barrier()
    return final

"""The training stages as modules whose forward(batch) returns the loss.

Each stage wraps the parts of `Manzano` it trains and freezes the rest, following the
paper: (1) tokenizer with a small helper LM through a randomly chosen adapter per sample;
(2) the unified decoder with the ViT and discrete adapter frozen, then (2b, "binding") the
same stage again, briefly, on two-object scenes at a constant lower learning rate; (3) VAE,
then (4) DiT on frozen discrete tokens. Wrapping each stage in one module is what lets the same
loop run under DDP.

Departure from the paper, on purpose: stage 1 adds an auxiliary pixel-reconstruction loss
through the discrete branch (a small conv decoder, discarded after training). Trained on
captions/VQA alone, the tiny tokenizer's codes carried too little shape to generate from
(TRAINING-NOTES.md, fact 3). Stages 1 and 2 also add a scene-parsing loss: a linear head
(discarded too) reads each 3x3 scene position's shape and colour from the continuous adapter's output,
with labels parsed from the example's own description (`scenes.cell_labels`), so it needs no
annotation beyond the caption a user's JSONL already has. Where the image tokens are the 3x3
scene cells (the tiny preset), stage 1 also asks each token's code for its own cell
(`CellParseHead`): the codes are all the DiT and the generating decoder ever see.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from manzano_edge.config import DecoderConfig, ModelConfig
from manzano_edge.data import scenes
from manzano_edge.data.batches import (
    IGNORE,
    Example,
    generation_batch,
    splice_image_embeddings,
    text_batch,
    understanding_batch,
    weighted_lm_loss,
)
from manzano_edge.data.text import TextCodec
from manzano_edge.models.decoder import LlamaDecoder
from manzano_edge.models.dit import flow_matching_loss
from manzano_edge.models.manzano import Manzano

# "binding" (stage 2b) fine-tunes the decoder again, on two-object scenes at a constant lower rate.
STAGES = ("tokenizer", "decoder", "binding", "vae", "dit")


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class CodePixelDecoder(nn.Module):
    """Training-only: FSQ code grid [B, N, d] -> pixels at 1/2 resolution, so the codes must
    carry shape (at 1/3 resolution a small triangle and circle differ by a few pixels and the
    loss barely asked for shape)."""

    DOWNSAMPLE = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.side = int(round(cfg.vision.num_image_tokens ** 0.5))
        factor = (cfg.vision.image_size // self.DOWNSAMPLE) // self.side
        factors = []
        while factor % 2 == 0 and factor > 1:
            factors.append(2)
            factor //= 2
        if factor > 1:
            factors.append(factor)
        widths = [128, 96, 64, 48, 32, 32][: len(factors) + 1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.vision.code_dim, widths[0], 3, padding=1), nn.SiLU()]
        for f, prev, nxt in zip(factors, widths, widths[1:]):
            layers += [nn.Upsample(scale_factor=f, mode="nearest"), nn.Conv2d(prev, nxt, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(widths[len(factors)], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, n, d = codes.shape
        return torch.tanh(self.net(codes.transpose(1, 2).reshape(b, d, self.side, self.side)))

    def target(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(pixels, self.DOWNSAMPLE)


class _ParseLogits(nn.Module):
    """Shared by the parse heads: logits over (empty + shapes) then (empty + colours), split in two."""

    shapes, colors = 1 + len(scenes.SHAPES), 1 + len(scenes.COLORS)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits[..., : self.shapes], logits[..., self.shapes:]


class SceneParseHead(_ParseLogits):
    """Training-only: image tokens [B, N, D] -> for each of the 3x3 scene positions, logits
    over (empty + shapes) and (empty + colours). One Linear over the flattened token grid, so
    the adapter must make shape *linearly* readable: trained through the helper LM alone,
    the continuous adapter's output let an MLP probe read shape in 61% of occupied cells
    (86% in the ViT features), and the decoder then never learned shape at all."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cells = len(scenes.POSITIONS)
        self.proj = nn.Linear(cfg.vision.num_image_tokens * cfg.decoder.hidden_size,
                              self.cells * (self.shapes + self.colors))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.proj(tokens.flatten(1)).view(-1, self.cells, self.shapes + self.colors))


class CellParseHead(_ParseLogits):
    """Training-only, for a 3x3 token grid (one token per scene cell): each code feature [B, 9, D]
    -> its own cell's (empty + shapes) and (empty + colours) logits, one Linear shared by every
    token. It makes the *code* of each token name its object's shape: under the pixel loss alone
    the 9-token codes spent their ~10 bits on colour, size and jitter, and two shapes got
    identical ids in 158 of 200 scenes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.decoder.hidden_size, self.shapes + self.colors)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.proj(tokens))


def one_token_per_cell(cfg: ModelConfig) -> bool:
    return cfg.vision.num_image_tokens == len(scenes.POSITIONS)


def scene_labels(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[B, 9] shape and colour labels from each example's prompt/caption (`scenes.cell_labels`);
    rows whose text does not pin the whole scene are IGNORE. None when no row has labels."""
    rows = [scenes.cell_labels(ex.prompt) for ex in examples]
    if all(r is None for r in rows):
        return None
    cells = len(scenes.POSITIONS)
    shape = torch.tensor([r[0] if r else [IGNORE] * cells for r in rows])
    color = torch.tensor([r[1] if r else [IGNORE] * cells for r in rows])
    return shape, color


def scene_parse_loss(head: SceneParseHead | CellParseHead, tokens: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> torch.Tensor:
    shape_logits, color_logits = head(tokens)
    if labels is None:  # keep every parameter in the graph (DDP) at zero cost
        return 0.0 * (shape_logits.sum() + color_logits.sum())
    shape, color = labels
    return (F.cross_entropy(shape_logits.flatten(0, 1), shape.flatten(), ignore_index=IGNORE)
            + F.cross_entropy(color_logits.flatten(0, 1), color.flatten(), ignore_index=IGNORE))


FOREGROUND_WEIGHT = 30.0
# Milder for the DiT: at 30x it drew objects into background cells, whose errors cost little.
DIT_FOREGROUND_WEIGHT = 4.0


def foreground_weight(pixels: torch.Tensor, size: int | None = None, strength: float = FOREGROUND_WEIGHT) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 1, size, size]: 1 on the background, 1 + 30 where a pixel
    differs from the image's border colour. Objects cover ~5% of a scene: every reconstruction
    loss here (codes, VAE, DiT) learned to draw only the background under a plain mean."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]  # [B, 3, 1, 1]
    foreground = ((pixels - background).abs().sum(1, keepdim=True) > 0.15).float()
    if size is not None and size != pixels.shape[-1]:
        foreground = F.adaptive_max_pool2d(foreground, size)  # a latent cell touching an object counts
    return 1.0 + strength * foreground


def foreground_weighted_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2, weighted by `foreground_weight`."""
    weight = foreground_weight(target)
    err = (recon - target).abs() + (recon - target) ** 2
    return (err * weight).mean() / weight.mean()


FSQ_RANGE = 2.5


def fsq_range_loss(z: torch.Tensor) -> torch.Tensor:
    """Keeps FSQ's pre-tanh inputs where tanh still has a gradient. Without it whole code channels
    saturated early and stayed dead (gradient ~1e-8), leaving every token with the same code.
    tanh(2.5) already reaches the outermost level, so the bound costs no codes."""
    return F.relu(z.abs() - FSQ_RANGE).pow(2).mean()


def helper_lm_config(cfg: ModelConfig) -> DecoderConfig:
    # Same width as the real decoder (the adapters project to it), fewer layers; thrown away after stage 1.
    d = cfg.decoder
    return DecoderConfig(hidden_size=d.hidden_size, num_hidden_layers=2, num_attention_heads=d.num_attention_heads,
                         num_key_value_heads=d.num_key_value_heads, intermediate_size=d.intermediate_size,
                         max_position_embeddings=d.max_position_embeddings)


def frozen_precision() -> torch.autocast:
    """The frozen ViT and discrete adapter run in fp32 even under bf16 autocast: bf16 before FSQ's
    rounding flipped 0.56% of image ids (4.7% of images had one), so the decoder and DiT would learn
    from ids that inference never computes."""
    return torch.autocast("cpu", enabled=False)


class TokenizerStage(nn.Module):
    def __init__(self, model: Manzano, codec: TextCodec, recon_weight: float = 2.0, scene_weight: float = 3.0,
                 code_parse_weight: float = 1.0) -> None:
        super().__init__()
        self.cfg, self.codec = model.cfg, codec
        self.recon_weight, self.scene_weight, self.code_parse_weight = recon_weight, scene_weight, code_parse_weight
        self.tokenizer = model.tokenizer
        self.helper_lm = LlamaDecoder(helper_lm_config(model.cfg), model.cfg.text.text_vocab_size)
        self.pixel_decoder = CodePixelDecoder(model.cfg)
        self.continuous_parse = SceneParseHead(model.cfg)
        # Per token, and only where tokens and scene cells coincide: parsing the flattened code features hurts reconstruction.
        self.code_parse = CellParseHead(model.cfg) if one_token_per_cell(model.cfg) else None

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        batch = understanding_batch(examples, self.codec, self.cfg)
        # Loose scenes are for understanding: the continuous adapter reads them, while the codes and
        # all that is scored on them (reconstruction, per-cell parse, the helper LM's discrete half)
        # see the canonical twin. Loose scenes on the codes too cost them shape.
        canonical = torch.stack([ex.generation_target for ex in examples])
        loose = torch.tensor([i for i, ex in enumerate(examples) if ex.generation_pixels is not None], dtype=torch.long)
        features = self.tokenizer.encoder(torch.cat([canonical, batch["pixels"][loose]]))
        features, loose_features = features[:len(examples)], features[len(examples):]
        continuous = self.tokenizer.continuous(features.index_copy(0, loose, loose_features))
        z = self.tokenizer.discrete.project(features)
        codes = self.tokenizer.discrete.fsq.quantize(z)
        discrete = self.tokenizer.discrete.codes_to_features(codes)
        # One adapter per sample, picked at random (paper); both are computed so DDP sees every param used.
        use_discrete = torch.from_numpy(rng.random(len(examples)) < 0.5)[:, None, None]
        image_embeds = torch.where(use_discrete, discrete, continuous)[batch["image_index"]]
        embeds = splice_image_embeddings(self.helper_lm.embed(batch["tokens"]), image_embeds)
        lm_loss = weighted_lm_loss(self.helper_lm(inputs_embeds=embeds), batch["targets"], batch["weights"])
        recon, target = self.pixel_decoder(codes), self.pixel_decoder.target(canonical)
        if recon.shape != target.shape:
            recon = F.interpolate(recon, size=target.shape[-2:], mode="bilinear", align_corners=False)
        recon_loss = foreground_weighted_loss(recon, target)
        range_loss = fsq_range_loss(z)
        labels = scene_labels(examples)
        scene_loss = self.scene_weight * scene_parse_loss(self.continuous_parse, continuous, labels)
        logs = {"lm": lm_loss.item(), "recon": recon_loss.item(), "range": range_loss.item(),
                "scene": scene_loss.item()}
        loss = lm_loss + self.recon_weight * recon_loss + range_loss + scene_loss
        if self.code_parse is not None:
            code_loss = self.code_parse_weight * scene_parse_loss(self.code_parse, discrete, labels)
            loss, logs["code_parse"] = loss + code_loss, code_loss.item()
        return loss, logs


class DecoderStage(nn.Module):
    """Unified decoder on understanding + generation + text, ViT and discrete adapter frozen.
    The continuous adapter trains with the decoder and keeps stage 1's scene-parsing loss
    (a fresh head), so it cannot trade away the shape it was made to carry.

    `generation_weight` scales the image-token loss against the understanding loss: codes from a
    longer stage 1 are harder to predict, and at 1 text-to-image fell to 0.63 (loop.GENERATION_WEIGHT)."""

    def __init__(self, model: Manzano, codec: TextCodec, scene_weight: float = 1.0,
                 generation_weight: float = 1.0) -> None:
        super().__init__()
        self.cfg, self.codec = model.cfg, codec
        self.scene_weight, self.generation_weight = scene_weight, generation_weight
        freeze(model.tokenizer.encoder)
        freeze(model.tokenizer.discrete)
        self.encoder, self.discrete = model.tokenizer.encoder, model.tokenizer.discrete
        self.continuous = model.tokenizer.continuous
        self.continuous_parse = SceneParseHead(model.cfg)
        self.decoder = model.decoder

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        half = (len(examples) * 5) // 8  # understanding is the harder task: it gets 5/8 of the batch
        und, gen = examples[:half], examples[half:]
        pixels = torch.stack([ex.pixels for ex in und] + [ex.generation_target for ex in gen])
        with torch.no_grad(), frozen_precision():
            features = self.encoder(pixels)
            ids = self.discrete.fsq.codes_to_indices(self.discrete.codes(features[half:]))
        ub = understanding_batch(und, self.codec, self.cfg)
        continuous = self.continuous(features[:half])
        scene_loss = scene_parse_loss(self.continuous_parse, continuous, scene_labels(und))
        image_embeds = continuous[ub["image_index"]]
        embeds = splice_image_embeddings(self.decoder.embed(ub["tokens"]), image_embeds)
        und_loss = weighted_lm_loss(self.decoder(inputs_embeds=embeds), ub["targets"], ub["weights"])
        gb = generation_batch([ex.prompt for ex in gen], ids, self.codec, self.cfg, rng)
        gen_loss = weighted_lm_loss(self.decoder(tokens=gb["tokens"]), gb["targets"], gb["weights"])
        texts = [f"{ex.question} {ex.answer}" if rng.random() < 0.5 else ex.prompt for ex in und[: max(1, half // 4)]]
        tb = text_batch(texts, self.codec, self.cfg)
        txt_loss = weighted_lm_loss(self.decoder(tokens=tb["tokens"]), tb["targets"], tb["weights"])
        loss = und_loss + self.generation_weight * gen_loss + 0.25 * txt_loss + self.scene_weight * scene_loss
        return loss, {"und": und_loss.item(), "gen": gen_loss.item(), "text": txt_loss.item(),
                      "scene": scene_loss.item()}


class VAEStage(nn.Module):
    """Foreground-weighted like the tokenizer's reconstruction head: with a plain mean the VAE
    decoded every latent to background and reconstructions through tokens scored 0."""

    KL_WEIGHT = 1e-4

    def __init__(self, model: Manzano) -> None:
        super().__init__()
        self.vae = model.vae

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([ex.pixels for ex in examples])
        recon, kl = self.vae.reconstruct(pixels)
        recon_loss = foreground_weighted_loss(recon, pixels)
        return recon_loss + self.KL_WEIGHT * kl, {"recon": recon_loss.item(), "kl": kl.item()}


class DiTStage(nn.Module):
    def __init__(self, model: Manzano) -> None:
        super().__init__()
        freeze(model.tokenizer)
        freeze(model.vae)
        self.tokenizer, self.vae, self.dit = model.tokenizer, model.vae, model.dit
        self.scale = model.cfg.vae.scaling_factor

    def forward(self, examples: list[Example], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([ex.pixels for ex in examples])
        with torch.no_grad():
            with frozen_precision():
                ids = self.tokenizer.image_to_ids(pixels)
                cond = self.tokenizer.discrete.ids_to_features(ids)
            # The VAE encoder, the costliest frozen part (96 of ~110 ms per batch in fp32), stays under
            # autocast: nothing rounds its output, and bf16 moves the latents by 0.7% (relative norm).
            latent = self.vae.encoder(pixels)[0].float() * self.scale
            weight = foreground_weight(pixels, latent.shape[-1], strength=DIT_FOREGROUND_WEIGHT)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        loss = flow_matching_loss(self.dit, latent, cond, generator=gen, weight=weight)
        return loss, {"flow": loss.item()}


@torch.no_grad()
def measure_latent_scale(model: Manzano, image_size: int, n: int = 256, seed: int = 1234) -> float:
    rng = np.random.default_rng(seed)
    from manzano_edge.data.images import to_pixels

    pixels = torch.cat([to_pixels(scenes.render(scenes.sample_scene(rng), image_size), image_size) for _ in range(n)])
    mean, _ = model.vae.encoder(pixels)
    return float(1.0 / mean.std().clamp_min(1e-6))

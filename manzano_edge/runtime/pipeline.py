"""Understanding and text-to-image pipelines over a `GraphRunner`.

All loops live here, never in a graph: autoregressive decoding with the stateful KV cache,
sampling (temperature / top-k / top-p), classifier-free guidance for image tokens (the
conditional and unconditional sequences decode as one batch of 2, left-padded and masked)
and for the flow-matching steps (one DiT call on a batch of 2), and the VAE decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from manzano_edge.config import ModelConfig
from manzano_edge.data.batches import UNDERSTANDING_IMAGE_SLOT
from manzano_edge.data.images import to_image, to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.runtime.graphs import GraphRunner
from manzano_edge.spec.decoding import (
    DEFAULT_FLOW_STEPS,
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION_FIXED_TOKENS,
    NEG_INF,
    UNDERSTANDING_FIXED_TOKENS,
    codes_only_mask,
    decode,
    euler_step,
    flow_timesteps,
    generation_layout,
    guidance_rows,
    guided_logits,
    guided_velocity,
    left_pad,
    padded_causal_mask,
    text_only_mask,
    understanding_layout,
)

SEED_MAX = (1 << 63) - 1


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    token_guidance: float = 1.0  # CFG scale on image-token logits; 1 = off (no uncond pass)
    flow_steps: int = DEFAULT_FLOW_STEPS
    flow_guidance: float = 1.0  # CFG scale on the DiT velocity; 1 = off

    MAX_FLOW_STEPS = 1000

    def validate(self) -> SamplingConfig:
        """Refuse settings that would reach the graphs as NaN or crash the sampler."""
        for name in ("temperature", "top_p", "token_guidance", "flow_guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"sampling {name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        check_int("top_k", self.top_k, 0, 1 << 31)
        check_int("flow steps", self.flow_steps, 1, self.MAX_FLOW_STEPS)
        return self


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)
    return logits


def sample_token(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> ids [B]."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits / s.temperature, s.top_k, s.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Pipeline:
    def __init__(self, graphs: GraphRunner, cfg: ModelConfig, codec: TextCodec) -> None:
        self.g, self.cfg, self.codec = graphs, cfg, codec
        self.max_len = cfg.decoder.max_position_embeddings
        # Understanding may only emit text; generation may only emit image codes.
        self.text_only = text_only_mask(cfg)
        self.codes_only = codes_only_mask(cfg)

    # -- input checks ------------------------------------------------------------------------
    def pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        size = self.cfg.vision.image_size
        if isinstance(image, Image.Image):
            if min(image.size) < 1:
                raise UserError(f"the image is empty ({image.size[0]}x{image.size[1]} pixels); pass a real image")
            return to_pixels(image, size)
        if not isinstance(image, torch.Tensor):
            raise UserError(f"image must be a PIL image or a float32 tensor [1, 3, {size}, {size}], "
                            f"got {type(image).__name__}")
        if image.shape != (1, 3, size, size) or image.dtype != torch.float32:
            raise UserError(f"image tensor must be float32 [1, 3, {size}, {size}] in [-1, 1], got "
                            f"{str(image.dtype)[6:]} {list(image.shape)}; pass a PIL image to have it converted")
        if not torch.isfinite(image).all():
            raise UserError("image tensor contains NaN or Inf values; pass finite pixels in [-1, 1]")
        return image

    def prompt_ids(self, prompt: str, room: int) -> list[int]:
        """A prompt's text ids, refused with one line when empty or longer than `room` tokens."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("the prompt is empty; pass some text, e.g. --prompt \"what color is the circle?\"")
        ids = self.codec.encode(prompt)
        if len(ids) > room:
            raise UserError(f"the prompt is {len(ids)} tokens but only {room} fit in the {self.max_len}-token context; "
                            "shorten it")
        return ids

    # -- understanding -------------------------------------------------------------------------
    def understand(self, image: Image.Image | torch.Tensor, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   sampling: SamplingConfig | None = None, seed: int = 0) -> str:
        return self.codec.decode(self.understand_ids(image, prompt, max_new_tokens, sampling, seed))

    def understand_ids(self, image: Image.Image | torch.Tensor, prompt: str,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: SamplingConfig | None = None,
                       seed: int = 0) -> list[int]:
        """The answer's token ids (without the stop token)."""
        s = (sampling or SamplingConfig(temperature=0.0)).validate()
        check_int("max_new_tokens", max_new_tokens, 0, self.max_len)
        check_int("seed", seed, 0, SEED_MAX)
        embeds = self.understanding_embeds(image, prompt)
        self.g.decoder_reset(1)
        logits = self.g.decoder_step(embeds, padded_causal_mask([0], 0, embeds.shape[1]))[:, -1]
        past = embeds.shape[1]
        gen = torch.Generator().manual_seed(seed)
        return decode(self.g.decoder_step, self.g.embed_tokens, logits, past, min(max_new_tokens, self.max_len - past),
                      pick=lambda x: sample_token(x + self.text_only, s, gen), stop_id=self.cfg.text.eos_id,
                      max_len=self.max_len)

    def understanding_embeds(self, image: Image.Image | torch.Tensor, prompt: str) -> torch.Tensor:
        """The understanding prefill [1, T, D]: the prompt layout with the image's embeddings spliced in."""
        n = self.cfg.vision.num_image_tokens
        question = self.prompt_ids(prompt, self.max_len - n - UNDERSTANDING_FIXED_TOKENS - 1)
        before_ids, after_ids = understanding_layout(self.cfg.text, question)
        image_embeds = self.g.vision_embeddings(self.pixels(image))
        before = self.g.embed_tokens(torch.tensor([before_ids]))
        assert before.shape[1] == UNDERSTANDING_IMAGE_SLOT
        after = self.g.embed_tokens(torch.tensor([after_ids]))
        return torch.cat([before, image_embeds, after], dim=1)

    # -- generation ------------------------------------------------------------------------------
    def generation_prompt_ids(self, prompt: str) -> list[int]:
        """Validate a text-to-image prompt (room for <bos>, <img_start>, N codes, <img_end>)."""
        return self.prompt_ids(prompt, self.max_len - self.cfg.vision.num_image_tokens - GENERATION_FIXED_TOKENS)

    def generate_ids(self, prompt: str, sampling: SamplingConfig | None = None, seed: int = 0,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prompt -> N image-code ids [1, N], sampled between <img_start> and <img_end>."""
        s = (sampling or SamplingConfig()).validate()
        check_int("seed", seed, 0, SEED_MAX)
        t = self.cfg.text
        cond = generation_layout(t, self.generation_prompt_ids(prompt))
        guided = s.token_guidance != 1.0
        rows = guidance_rows(cond, t.bos_id, t.img_start_id) if guided else [cond]
        tokens, pad = left_pad(rows, t.pad_id)
        width = tokens.shape[1]
        self.g.decoder_reset(len(rows))
        logits = self.g.decoder_step(self.g.embed_tokens(tokens), padded_causal_mask(pad, 0, width))[:, -1]
        gen = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return sample_token((guided_logits(x, s.token_guidance) if guided else x) + self.codes_only, s, gen)

        count = [0]

        def on_token(token: int, _step: dict) -> None:
            count[0] += 1
            if progress:
                progress(count[0])

        ids = decode(self.g.decoder_step, self.g.embed_tokens, logits, width, self.cfg.vision.num_image_tokens,
                     pick=pick, pad=pad, on_token=on_token)
        return torch.tensor([[i - self.cfg.image_token_offset for i in ids]])

    def render_ids(self, ids: torch.Tensor, sampling: SamplingConfig | None = None, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Image-code ids [1, N] -> pixels [1, 3, H, W]: flow-matching Euler steps, then the VAE decoder."""
        s = (sampling or SamplingConfig()).validate()
        check_int("seed", seed, 0, SEED_MAX)
        n = self.cfg.vision.num_image_tokens
        if not isinstance(ids, torch.Tensor) or ids.shape != (1, n) or ids.dtype not in (torch.int32, torch.int64):
            raise UserError(f"image-code ids must be an int64 tensor [1, {n}], got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        if ids.min() < 0 or ids.max() >= self.cfg.vision.codebook_size:
            raise UserError(f"image-code ids must lie in [0, {self.cfg.vision.codebook_size})")
        c, h = self.cfg.vae.latent_channels, self.cfg.latent_size
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((1, c, h, h), generator=gen)
        cond = self.g.code_features(ids)
        guided = s.flow_guidance != 1.0
        if guided:
            cond = torch.cat([cond, self.g.null_condition(1, ids.shape[1])])
        steps = max(1, s.flow_steps)
        for i, timestep in enumerate(flow_timesteps(steps)):
            t = torch.full((2 if guided else 1,), timestep)
            v = self.g.denoise(torch.cat([x, x]) if guided else x, t, cond)
            if guided:
                v = guided_velocity(v, s.flow_guidance)
            x = euler_step(x, v, steps)
            if progress:
                progress(i + 1)
        return self.g.vae_decode(x / self.cfg.vae.scaling_factor).clamp(-1, 1)

    def generate(self, prompt: str, sampling: SamplingConfig | None = None, seed: int = 0) -> Image.Image:
        ids = self.generate_ids(prompt, sampling, seed)
        return to_image(self.render_ids(ids, sampling, seed))

    def reconstruct(self, image: Image.Image | torch.Tensor, sampling: SamplingConfig | None = None,
                    seed: int = 0) -> torch.Tensor:
        """Image -> discrete ids -> DiT -> VAE: what the generation branch can express."""
        return self.render_ids(self.g.image_ids(self.pixels(image)), sampling, seed)

    def edit(self, image: Image.Image, instruction: str) -> Image.Image:
        raise UserError("image editing is not supported by this checkpoint: it was not trained on edit pairs")

"""Real example inputs per graph (scenes from the generator, real prompts and the model's own
decodes): the trace example, the parity inputs, calibration and the benchmark's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.models.manzano import Manzano
from manzano_edge.spec.decoding import (
    causal_mask,
    decode,
    generation_layout,
    guidance_rows,
    guided_logits,
    left_pad,
    padded_causal_mask,
)
from manzano_edge.spec.modules import StatefulDecoder

EXAMPLE_TOKEN_GUIDANCE = 3.0


def guided_steps(model: Manzano, prompt_ids: list[int], decode_steps: int) -> list[dict[str, torch.Tensor]]:
    """decoder_cfg's steps, as the runtime feeds them: [prompt, unconditional prompt] left-padded
    into one batch, then each guided greedy token fed to both rows."""
    t = model.cfg.text
    tokens, pad = left_pad(guidance_rows(prompt_ids, t.bos_id, t.img_start_id), t.pad_id)
    width = tokens.shape[1]
    steps = [{"inputs_embeds": model.decoder.embed(tokens), "causal_mask": padded_causal_mask(pad, 0, width)}]
    decoder = StatefulDecoder(model.decoder, batch_size=2, last_logits=True).eval()
    logits = decoder(**steps[0])[:, -1]
    decode(decoder, model.decoder.embed, logits, width, decode_steps + 1,
           pick=lambda x: guided_logits(x, EXAMPLE_TOKEN_GUIDANCE).argmax(-1), pad=pad,
           on_token=lambda _, step: steps.append(step) if step else None)
    return steps


@dataclass
class Examples:
    """Real inputs per graph (scenes from the generator, real prompts): the trace example is
    the first, parity runs over all. The decoder's entry is a sequence of steps: a prefill
    followed by decode steps fed with the model's own greedy tokens."""

    per_graph: dict[str, list[dict[str, torch.Tensor]]]


@torch.no_grad()
def real_examples(model: Manzano, codec: TextCodec, decode_steps: int = 16, seed: int = 7) -> Examples:
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    scene_list = [scenes.sample_scene(rng) for _ in range(2)]
    pixels = [to_pixels(scenes.render(s, cfg.vision.image_size), cfg.vision.image_size) for s in scene_list]
    embeds, ids = model.tokenizer(pixels[0])
    prompt = scenes.generation_prompt(scene_list[1], rng)
    t = cfg.text
    tokens = torch.tensor([generation_layout(t, codec.encode(prompt))], dtype=torch.int32)
    prefill = model.decoder.embed(tokens.long())
    steps = [{"inputs_embeds": prefill, "causal_mask": causal_mask(0, prefill.shape[1])}]
    stateful = StatefulDecoder(model.decoder).eval()
    logits = stateful(prefill, steps[0]["causal_mask"])[:, -1]
    decode(stateful, model.decoder.embed, logits, prefill.shape[1], decode_steps + 1,
           on_token=lambda _, step: steps.append(step) if step else None)
    cfg_steps = guided_steps(model, tokens[0].tolist(), decode_steps)
    cond = model.tokenizer.discrete.ids_to_features(ids)
    latent = model.vae.encoder(pixels[1])[0] * cfg.vae.scaling_factor
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    x_t = 0.5 * noise + 0.5 * latent
    return Examples({
        "tokenizer": [{"pixels": p} for p in pixels],
        "embed_tokens": [{"tokens": tokens}],
        "decoder": steps,
        "decoder_cfg": cfg_steps,
        "code_features": [{"image_ids": ids.to(torch.int32)}],
        # The CFG batch of 2 comes first: tracing with batch 1 would make torch.export
        # specialise the dynamic batch dim to 1 (0/1 specialisation).
        "dit": [{"latent": torch.cat([x_t, noise]), "timestep": torch.tensor([0.5, 0.1]),
                 "condition": torch.cat([cond, model.dit.unconditional(1, cond.shape[1])])},
                {"latent": x_t, "timestep": torch.tensor([0.5]), "condition": cond}],
        "vae_decoder": [{"latent": latent / cfg.vae.scaling_factor}],
    })

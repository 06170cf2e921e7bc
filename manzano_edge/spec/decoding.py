"""The prompt and decoding contract, written once: prompt layouts, logit masks, the rows and
formula of image-token guidance, and the greedy/sampled decoding loop over a decoder step.

The pipeline, the benchmark, validation and the export's example inputs all decode through
these functions, so an app that follows them (and the manifest that states them) decodes what
the Python runtime decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from manzano_edge.config import DEFAULT_FLOW_STEPS, DEFAULT_MAX_NEW_TOKENS, ModelConfig, TextConfig
from manzano_edge.models.decoder import causal_mask

NEG_INF = float("-inf")

# (inputs_embeds [B, T, D], causal_mask [B, 1, T, E]) -> last-position logits [B, 1, V]
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, T] -> embeddings [B, T, D]
PickFn = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> the next token [1], shared by every row

__all__ = ["causal_mask", "padded_causal_mask", "left_pad", "guidance_rows", "guided_logits", "text_only_mask",
           "codes_only_mask", "understanding_layout", "generation_layout", "UNDERSTANDING_FIXED_TOKENS",
           "GENERATION_FIXED_TOKENS", "greedy", "decode", "flow_timesteps", "guided_velocity", "euler_step",
           "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_FLOW_STEPS"]



# -- prompt layouts --------------------------------------------------------------------------------
# Understanding: <bos> <img_start> [N image embeddings] <img_end> question <sep>, then the answer.
UNDERSTANDING_FIXED_TOKENS = 4
# Text-to-image: <bos> prompt <img_start>, then N image codes (and <img_end>).
GENERATION_FIXED_TOKENS = 3


def understanding_layout(text: TextConfig, question: Sequence[int]) -> tuple[list[int], list[int]]:
    """The token ids before and after the image embeddings of an understanding prompt."""
    return [text.bos_id, text.img_start_id], [text.img_end_id, *question, text.sep_id]


def generation_layout(text: TextConfig, prompt: Sequence[int]) -> list[int]:
    """A text-to-image prompt: the image codes follow its last token."""
    return [text.bos_id, *prompt, text.img_start_id]


# -- logit masks -----------------------------------------------------------------------------------
def text_only_mask(cfg: ModelConfig) -> torch.Tensor:
    """Additive [V] mask for understanding: text tokens only, and no special token but <eos>."""
    t = cfg.text
    mask = torch.zeros(cfg.vocab_size)
    mask[cfg.image_token_offset:] = NEG_INF
    mask[[t.pad_id, t.bos_id, t.sep_id, t.img_start_id, t.img_end_id]] = NEG_INF
    return mask


def codes_only_mask(cfg: ModelConfig) -> torch.Tensor:
    """Additive [V] mask for text-to-image: image codes only."""
    mask = torch.full((cfg.vocab_size,), NEG_INF)
    mask[cfg.image_token_offset:] = 0.0
    return mask


def padded_causal_mask(pad: list[int], past: int, new: int) -> torch.Tensor:
    """[B, 1, new, past+new] additive mask; row b hides its first pad[b] (left-padding) keys.

    A padding query still sees itself: a fully masked softmax row is NaN, and NaN keys/values
    would poison the real rows even though they are masked (0 * NaN = NaN)."""
    q = torch.arange(past, past + new)[:, None]
    k = torch.arange(past + new)[None, :]
    base = torch.where(k <= q, 0.0, float("-inf"))
    rows = [base.masked_fill((k < p) & (k != q), float("-inf")) if p else base for p in pad]
    return torch.stack(rows)[:, None]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Token rows of different lengths -> ([B, W] left-padded, pad count per row): a batch whose
    rows end together, so they decode in lockstep (classifier-free guidance)."""
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    return torch.tensor([[pad_id] * p + r for p, r in zip(pad, rows)]), pad


def guidance_rows(cond: list[int], bos_id: int, img_start_id: int) -> list[list[int]]:
    """Image-token CFG's two prompts: the conditional one, and the unconditional one with no text
    (`<bos><img_start>`, as trained). Row 0 is conditional."""
    return [cond, [bos_id, img_start_id]]


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """[2, V] logits of `guidance_rows` -> [1, V]: uncond + scale * (cond - uncond)."""
    return logits[1:] + scale * (logits[:1] - logits[1:])


# -- the decoding loop -----------------------------------------------------------------------------
def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first row's top token [1]."""
    return logits[:1].argmax(-1)


def decode(step: StepFn, embed: EmbedFn, logits: torch.Tensor, past: int, count: int, pick: PickFn = greedy,
           pad: Sequence[int] = (0,), stop_id: int | None = None, max_len: int | None = None,
           on_token: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> list[int]:
    """Up to `count` tokens after a prefill whose last-position logits [B, V] are `logits` and
    whose cache holds `past` positions. Each picked token is fed to every row (a guided batch
    decodes in lockstep); no decoder step runs after the last token. Stops early at `stop_id`
    (not returned) or when the cache of `max_len` positions is full. `on_token(token, step)`
    sees each token and the step inputs that followed it ({} after the last)."""
    rows, out = logits.shape[0], []
    for i in range(count):
        token = pick(logits)
        if stop_id is not None and token.item() == stop_id:
            break
        out.append(int(token.item()))
        if i + 1 == count or (max_len is not None and past + 1 > max_len - 1):
            if on_token:
                on_token(out[-1], {})
            break
        inputs = {"inputs_embeds": embed(token.view(1, 1).expand(rows, 1)),
                  "causal_mask": padded_causal_mask(list(pad), past, 1)}
        if on_token:
            on_token(out[-1], inputs)
        logits = step(inputs["inputs_embeds"], inputs["causal_mask"])[:, -1]
        past += 1
    return out


# -- the flow-matching loop ------------------------------------------------------------------------
# The DiT predicts a velocity from noise (t = 0) towards the latent (t = 1); Euler steps on a
# uniform grid integrate it.
def flow_timesteps(steps: int) -> list[float]:
    """The timesteps the DiT is evaluated at: i / steps for i in [0, steps)."""
    return [i / steps for i in range(steps)]


def guided_velocity(velocity: torch.Tensor, scale: float) -> torch.Tensor:
    """[2, ...] velocities (row 0 conditional, row 1 on the null condition) -> [1, ...]:
    uncond + scale * (cond - uncond)."""
    return velocity[1:] + scale * (velocity[:1] - velocity[1:])


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, steps: int) -> torch.Tensor:
    return latent + velocity / steps

"""Use a local Hugging Face SigLIP or CLIP vision tower (config.json + *.safetensors, the
`SiglipVisionModel` / `CLIPVisionModel` layout, or the vision half of a full SigLIP/CLIP checkpoint)
as the hybrid tokenizer's ViT. The STC fold and both adapters stay, freshly initialised: train them
with `manzano-edge train --init CKPT --stages tokenizer,...`, the encoder frozen or not.

The tower's pixel normalisation is folded into the patch embedding, so the ViT keeps taking [-1, 1]
pixels (exact: the patchify convolution has no padding). A different image size interpolates the
position embedding as transformers' `interpolate_pos_encoding` does. Every tensor is accounted for:
the only ones left out are the pooled-output parts (SigLIP's attention-pooling head, CLIP's
post-layernorm), which patch features never reach; the import names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from manzano_edge.config import STC_FACTOR, VisionConfig
from manzano_edge.errors import UserError
from manzano_edge.models.hf_decoder import read_hf_weights
from manzano_edge.models.vit import ViTEncoder

# model_type -> (layout switches, pixel mean/std when the directory has no preprocessor_config.json)
TOWERS = {
    "siglip_vision_model": ({"class_token": False, "pre_norm": False, "final_norm": True}, (0.5,) * 3, (0.5,) * 3),
    "clip_vision_model": ({"class_token": True, "pre_norm": True, "final_norm": False},
                          (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
PATCH_BIAS = {"siglip_vision_model": True, "clip_vision_model": False}  # transformers' CLIP: bias=False
FULL_MODELS = {"siglip": "siglip_vision_model", "siglip2": None, "clip": "clip_vision_model"}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
# Parts that only the pooled output (image-text contrastive head) reads.
POOLED_ONLY = {"siglip_vision_model": ("head.",), "clip_vision_model": ("post_layernorm.", "visual_projection.")}
# A full SigLIP/CLIP checkpoint's text half and contrastive logit parameters.
TEXT_HALF = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
BLOCK_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.q_proj": "attn.q",
               "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v", "self_attn.out_proj": "attn.proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


@dataclasses.dataclass
class VisionTower:
    """What `read_vision_tower` found: the ViT config at the requested size, its weights (ours),
    and the checkpoint tensors deliberately left out."""

    config: VisionConfig
    state: dict[str, torch.Tensor]
    left_out: list[str]


def tower_config(raw: dict) -> tuple[str, dict]:
    """(vision model_type, the vision config dict) of a vision-only or a full SigLIP/CLIP config.json."""
    model_type = raw.get("model_type")
    if model_type in FULL_MODELS and "vision_config" in raw:
        if FULL_MODELS[model_type] is None:
            raise UserError(f"config.json describes a '{model_type}' model (NaFlex patches); import a SigLIP or CLIP "
                            "vision tower")
        return FULL_MODELS[model_type], raw["vision_config"]
    if model_type not in TOWERS:
        raise UserError(f"config.json describes a '{model_type}' model; the tokenizer's ViT imports "
                        f"{', '.join(TOWERS)} towers (SiglipVisionModel, CLIPVisionModel)")
    return model_type, raw


def vision_config_from_hf(raw: dict, image_size: int | None, fsq_levels: list[int]) -> VisionConfig:
    model_type, v = tower_config(raw)
    switches = TOWERS[model_type][0]
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise UserError(f"the tower's hidden_act is '{act}'; the ViT computes {', '.join(ACTIVATIONS)}")
    try:
        width, heads, patch = v["hidden_size"], v["num_attention_heads"], v["patch_size"]
        cfg = VisionConfig(image_size=image_size or v["image_size"], patch_size=patch, width=width,
                           layers=v["num_hidden_layers"], heads=heads, fsq_levels=list(fsq_levels),
                           intermediate_size=v["intermediate_size"], hidden_act=ACTIVATIONS[act],
                           layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)), **switches)
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc}; is this a SigLIP or CLIP vision tower?") from exc
    if v.get("num_channels", 3) != 3:
        raise UserError(f"the tower takes {v['num_channels']} channels; the ViT takes RGB")
    return cfg


def pixel_normalisation(directory: Path, model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = directory / "preprocessor_config.json"
    mean, std = TOWERS[model_type][1:]
    if path.is_file():
        raw = json.loads(path.read_text())
        mean, std = raw.get("image_mean", mean), raw.get("image_std", std)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def fold_normalisation(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                       std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding weights that take [-1, 1] pixels x where the tower took (x/2 + 1/2 - mean) / std."""
    scale = (0.5 / std)[None, :, None, None]
    shift = ((0.5 - mean) / std)[None, :, None, None]
    return weight * scale, bias + (weight * shift).sum(dim=(1, 2, 3))


def interpolate_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, D] patch position embeddings of a square grid -> [grid*grid, D], bicubic (transformers' method)."""
    old = int(round(pos.shape[0] ** 0.5))
    if old * old != pos.shape[0]:
        raise UserError(f"the tower's {pos.shape[0]} patch positions are not a square grid")
    if old == grid:
        return pos
    square = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return square.permute(0, 2, 3, 1).reshape(grid * grid, -1)


def tower_to_vit_state(hf: dict[str, torch.Tensor], cfg: VisionConfig, model_type: str,
                       mean: torch.Tensor, std: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our ViT's state dict from the tower's tensors, and the names of those left out (pooled-only)."""
    hf = {k.removeprefix("vision_model."): v.float() for k, v in hf.items() if not k.startswith(TEXT_HALF)}
    left_out = sorted(k for k in hf if k.startswith(POOLED_ONLY[model_type]))
    taken = set(left_out)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"the vision checkpoint lacks '{name}'; is it a complete {model_type} tower?")
        taken.add(name)
        return hf[name]

    state = {}
    weight = take("embeddings.patch_embedding.weight")
    bias = take("embeddings.patch_embedding.bias") if PATCH_BIAS[model_type] else torch.zeros(weight.shape[0])
    state["patch_embed.weight"], state["patch_embed.bias"] = fold_normalisation(weight, bias, mean, std)
    pos = take("embeddings.position_embedding.weight")
    if cfg.class_token:
        state["class_embed"] = take("embeddings.class_embedding")
        pos = torch.cat([pos[:1], interpolate_positions(pos[1:], cfg.grid)])
    else:
        pos = interpolate_positions(pos, cfg.grid)
    state["pos_embed"] = pos[None]
    norms = {"pre_layrnorm": "pre_norm"} if cfg.pre_norm else {}
    norms |= {"post_layernorm": "norm"} if cfg.final_norm else {}
    for theirs, ours in norms.items():
        for part in ("weight", "bias"):
            state[f"{ours}.{part}"] = take(f"{theirs}.{part}")
    for i in range(cfg.layers):
        for theirs, ours in BLOCK_NAMES.items():
            for part in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{part}"] = take(f"encoder.layers.{i}.{theirs}.{part}")
    unused = sorted(set(hf) - taken)
    if unused:
        raise UserError(f"vision tensor '{unused[0]}' maps to nothing in the ViT ({len(unused)} unmapped); "
                        f"is config.json's num_hidden_layers right, or is this not a {model_type} tower?")
    return state, left_out


def read_vision_tower(directory: str | Path, image_size: int | None, fsq_levels: list[int],
                      pixel_multiple: int = 1) -> VisionTower:
    """The tower at `image_size` (None: its own); `pixel_multiple`: what the rest of the model needs the
    image size to divide by (the VAE's downsampling times the DiT's patch)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; pass a local Hugging Face SigLIP or CLIP directory")
    raw = json.loads((directory / "config.json").read_text())
    model_type, _ = tower_config(raw)
    cfg = vision_config_from_hf(raw, image_size, fsq_levels)
    step = math.lcm(cfg.patch_size * STC_FACTOR, pixel_multiple)
    if cfg.image_size % step:
        below = cfg.image_size // step * step
        sizes = " or ".join(str(n) for n in (below, below + step) if n > 0)
        raise UserError(f"image size {cfg.image_size} does not fit the tower: it must be a multiple of {step} (patch "
                        f"{cfg.patch_size} x the STC fold's {STC_FACTOR}, and the VAE/DiT's {pixel_multiple}); "
                        f"pass --image-size {sizes}")
    hf = read_hf_weights(directory)
    mean, std = pixel_normalisation(directory, model_type)
    state, left_out = tower_to_vit_state(hf, cfg, model_type, mean, std)
    return VisionTower(cfg, state, left_out)


def load_vision_tower(encoder: ViTEncoder, tower: VisionTower) -> None:
    expected = encoder.state_dict()
    for name, tensor in tower.state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"vision tensor '{name}' has shape {tuple(tensor.shape)}, the config implies "
                            f"{tuple(expected[name].shape)}")
    encoder.load_state_dict(tower.state, strict=True)

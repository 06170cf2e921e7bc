"""The whole MANZANO-style model and its checkpoint format.

A checkpoint is a directory: `config.json` (ModelConfig), `model.safetensors` (weights,
never pickle) and `tokenizer.json` (Hugging Face tokenizers). Loading checks every tensor
name and shape against the config, so a truncated or mismatched checkpoint fails with one
clear line instead of a half-initialised model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from manzano_edge.config import ModelConfig
from manzano_edge.errors import UserError
from manzano_edge.fsutil import atomic_output_dir, path_digest
from manzano_edge.models.decoder import LlamaDecoder
from manzano_edge.models.dit import DiT
from manzano_edge.models.vae import VAE
from manzano_edge.models.vision_tokenizer import HybridTokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
EMBEDDED_DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "tiny"


class Manzano(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.tokenizer = HybridTokenizer(cfg)
        self.decoder = LlamaDecoder(cfg.decoder, cfg.vocab_size)
        self.dit = DiT(cfg)
        self.vae = VAE(cfg.vae)
        # Where the weights came from ({"checkpoint", "sha256"} of the weights file); None: not loaded
        # from a checkpoint (a random-weight preset). Manifests and reports record it.
        self.source: dict | None = None

    def image_ids_to_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.cfg.image_token_offset

    def tokens_to_image_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens - self.cfg.image_token_offset


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (lm_head = embed_tokens) are stored once, as Hugging Face does.
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if id(tensor) in seen or tensor.data_ptr() in seen:
            continue
        seen.update({id(tensor), tensor.data_ptr()})
        state[name] = tensor.detach().contiguous()
    return state


def save_checkpoint(model: Manzano, out_dir: Path, tokenizer_json: str, dtype: torch.dtype = torch.float32,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write config/weights/tokenizer to a temp dir next to `out_dir`, then rename: never half-written.
    Replaces an existing `out_dir` (callers that must not, check first)."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        model.cfg.save(tmp / CONFIG_FILE)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _unique_state(model).items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt", **(metadata or {})})
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
    return out_dir


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"weights file not found: {path}") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}); re-download or re-train it") from exc


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    tied = {k for k in expected if k.endswith("lm_head.weight")} if getattr(model, "cfg", None) and \
        model.cfg.decoder.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"checkpoint {source} does not match its config ({detail}); "
                        "use the config.json saved with these weights")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"checkpoint {source}: '{name}' has shape {tuple(tensor.shape)} but the config expects "
                            f"{tuple(expected[name].shape)}; use the config.json saved with these weights")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)


def resolve_checkpoint(path: str | Path | None) -> Path:
    path = Path(path) if path else EMBEDDED_DEFAULT
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; pass a directory written by `manzano-edge train`")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file; pass the directory holding config.json and model.safetensors")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).exists():
            raise UserError(f"checkpoint {path} has no {name}; pass a directory written by `manzano-edge train`")
    return path


def embedded_model_identity() -> dict:
    """The embedded default's identity: its config name and the sha256 of its weights file, e.g.
    {"name": "tiny", "sha256": "3f2a..."} (`manzano-edge --version`; for manifests and reports)."""
    return dict(_embedded_identity())


@functools.lru_cache(maxsize=1)
def _embedded_identity() -> tuple[tuple[str, str], ...]:
    digest, _ = path_digest(EMBEDDED_DEFAULT / WEIGHTS_FILE)
    return (("name", ModelConfig.load(EMBEDDED_DEFAULT / CONFIG_FILE).name), ("sha256", digest))


def load_checkpoint(path: str | Path | None = None) -> tuple[Manzano, str]:
    """Load (model in eval mode, tokenizer.json text). `None` means the embedded default."""
    path = resolve_checkpoint(path)
    cfg = ModelConfig.load(path / CONFIG_FILE)
    model = Manzano(cfg)
    load_weights_into(model, load_state(path / WEIGHTS_FILE), str(path))
    tokenizer_json = (path / TOKENIZER_FILE).read_text()
    try:
        vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{path / TOKENIZER_FILE} is not a Hugging Face tokenizer.json ({exc})") from exc
    if vocab > cfg.text.text_vocab_size:
        raise UserError(f"tokenizer.json has {vocab} tokens but the config reserves {cfg.text.text_vocab_size}; "
                        "the checkpoint's files do not belong together")
    model.source = checkpoint_identity(path)
    return model.eval(), tokenizer_json


def checkpoint_identity(path: Path) -> dict:
    """{"checkpoint": path or "embedded default", "sha256": of the weights file}."""
    if Path(path).resolve() == EMBEDDED_DEFAULT.resolve():
        return {"checkpoint": "embedded default", "sha256": embedded_model_identity()["sha256"]}
    return {"checkpoint": str(Path(path).resolve()), "sha256": path_digest(Path(path) / WEIGHTS_FILE)[0]}

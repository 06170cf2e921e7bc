"""SigLIP and CLIP vision towers imported as the tokenizer's ViT, against transformers on the same random
in-process weights (nothing downloaded); composing them with an imported decoder; the refusals."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from manzano_edge.cli import main  # noqa: E402
from manzano_edge.errors import UserError  # noqa: E402
from manzano_edge.models.hf_vision import TOWERS, read_vision_tower  # noqa: E402
from manzano_edge.models.vit import ViTEncoder  # noqa: E402
from manzano_edge.train.compose import import_model  # noqa: E402

RELATIVE_BAR = 1e-4
FSQ = [8, 5, 5, 5]
TOWER_SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                   image_size=48, patch_size=8)
KINDS = {
    "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel, "siglip_vision_model"),
    "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel, "clip_vision_model"),
}


def tower(kind: str, **shape):
    config_cls, model_cls, _ = KINDS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TOWER_SHAPE, **shape})).eval()
    with torch.no_grad():  # norms and biases away from their init so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    return model


def saved(kind: str, path, **shape):
    model = tower(kind, **shape)
    model.save_pretrained(path)
    return model


def hf_pixels(kind: str, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's own input for our [-1, 1] pixels (its image processor's normalisation)."""
    mean, std = (torch.tensor(v)[None, :, None, None] for v in TOWERS[KINDS[kind][2]][1:])
    return ((pixels + 1) / 2 - mean) / std


def patch_features(kind: str, hf, pixels: torch.Tensor, **kw) -> torch.Tensor:
    out = hf(pixel_values=hf_pixels(kind, pixels), **kw).last_hidden_state
    return out[:, 1:] if kind == "clip" else out  # CLIP's class token is not a patch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kind", list(KINDS))
def test_patch_features_match_transformers(kind, tmp_path):
    hf = saved(kind, tmp_path / kind)
    imported = read_vision_tower(tmp_path / kind, None, FSQ)
    vit = ViTEncoder(imported.config)
    vit.load_state_dict(imported.state, strict=True)
    pixels = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        error = relative_error(vit.eval()(pixels), patch_features(kind, hf, pixels))
    assert error <= RELATIVE_BAR, f"{kind}: {error:.2e}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_another_image_size_interpolates_positions_as_transformers(kind, tmp_path):
    hf = saved(kind, tmp_path / kind)
    imported = read_vision_tower(tmp_path / kind, 72, FSQ)  # grid 6 -> 9
    assert imported.config.grid == 9
    vit = ViTEncoder(imported.config)
    vit.load_state_dict(imported.state, strict=True)
    pixels = torch.rand(1, 3, 72, 72, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        error = relative_error(vit.eval()(pixels), patch_features(kind, hf, pixels, interpolate_pos_encoding=True))
    assert error <= RELATIVE_BAR, f"{kind}: {error:.2e}"


def test_a_full_siglip_checkpoint_gives_its_vision_half(tmp_path):
    vision = {k: v for k, v in TOWER_SHAPE.items()}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
    full.save_pretrained(tmp_path / "full")
    imported = read_vision_tower(tmp_path / "full", None, FSQ)
    assert imported.left_out and all(name.startswith("head.") for name in imported.left_out)
    torch.testing.assert_close(imported.state["blocks.1.attn.q.weight"],
                               full.vision_model.encoder.layers[1].self_attn.q_proj.weight)


def test_compose_a_qwen2_decoder_and_a_siglip_tower(tmp_path, tiny_codec, capsys):
    from manzano_edge.models.manzano import load_checkpoint

    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2))
    qwen.save_pretrained(tmp_path / "qwen2")
    (tmp_path / "qwen2" / "tokenizer.json").write_text(tiny_codec.tok.to_str())
    hf = saved("siglip", tmp_path / "siglip")
    out = tmp_path / "ckpt"
    assert main(["import", "--decoder", str(tmp_path / "qwen2"), "--vision", str(tmp_path / "siglip"),
                 "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "not used: 11 tensors of the tower's pooled-output head (head)" in printed
    model, _ = load_checkpoint(out)
    assert model.cfg.decoder.attention_bias and model.cfg.vision.width == 64
    pixels = torch.rand(1, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        features = model.tokenizer.encoder(pixels)
        assert relative_error(features, patch_features("siglip", hf, pixels)) <= RELATIVE_BAR
        embeds, ids = model.tokenizer(pixels)  # both adapters run on the imported tower
    assert embeds.shape == (1, model.cfg.vision.num_image_tokens, 64) and ids.shape == (1, 4)


def test_a_tower_alone_keeps_the_presets_decoder_and_gets_the_bpe_train_would_build(tmp_path):
    from manzano_edge.config import preset

    hf = saved("clip", tmp_path / "clip")
    imported = import_model(vision=tmp_path / "clip", image_size=96)
    model = imported.model
    assert model.cfg.decoder == preset("tiny").decoder and model.cfg.vision.grid == 12
    assert json.loads(imported.tokenizer_json)["model"]["type"] == "BPE"
    assert imported.left_out == ["post_layernorm.bias", "post_layernorm.weight"]
    pixels = torch.rand(1, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        ref = patch_features("clip", hf, pixels, interpolate_pos_encoding=True)
        assert relative_error(model.tokenizer.encoder(pixels), ref) <= RELATIVE_BAR


def test_bad_towers_are_refused_in_one_line(tmp_path):
    saved("siglip", tmp_path / "grid5", image_size=40)
    with pytest.raises(UserError, match=r"image size 40 does not fit the tower: it must be a multiple of 24 .*"
                                        r"pass --image-size 24 or 48"):
        read_vision_tower(tmp_path / "grid5", None, FSQ)
    with pytest.raises(UserError, match=r"multiple of 48 \(patch 8 x the STC fold's 3, and the VAE/DiT's 16\); "
                                        r"pass --image-size 48 or 96"):
        read_vision_tower(tmp_path / "grid5", 50, FSQ, pixel_multiple=16)
    with pytest.raises(UserError, match="pass --image-size 48 or 96"):  # the tiny preset's VAE and DiT: 16
        import_model(vision=tmp_path / "grid5", image_size=72)
    saved("siglip", tmp_path / "narrow", hidden_size=48, num_attention_heads=2)
    with pytest.raises(UserError, match=r"vision.width=48 is not a multiple of 32"):
        import_model(vision=tmp_path / "narrow")
    raw = json.loads((tmp_path / "grid5" / "config.json").read_text())
    (tmp_path / "grid5" / "config.json").write_text(json.dumps({**raw, "model_type": "dinov2"}))
    with pytest.raises(UserError, match="'dinov2' model; the tokenizer's ViT imports siglip_vision_model"):
        read_vision_tower(tmp_path / "grid5", 48, FSQ)
    (tmp_path / "grid5" / "config.json").write_text(json.dumps({**raw, "hidden_act": "relu"}))
    with pytest.raises(UserError, match="hidden_act is 'relu'"):
        read_vision_tower(tmp_path / "grid5", 48, FSQ)
    with pytest.raises(UserError, match="nothing to import"):
        import_model()

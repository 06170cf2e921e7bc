import pytest
import torch

from manzano_edge.config import ModelConfig, preset
from manzano_edge.errors import UserError
from manzano_edge.models.decoder import causal_mask
from manzano_edge.models.fsq import FSQ
from manzano_edge.models.manzano import Manzano
from manzano_edge.models.vision_tokenizer import spatial_to_channel
from manzano_edge.spec.decoding import padded_causal_mask
from manzano_edge.spec.modules import InPlaceKVDecoder, StatefulDecoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Manzano(preset("tiny")).eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_presets_validate_and_roundtrip_json(tmp_path):
    for name in ("tiny", "small", "manzano-300m"):
        cfg = preset(name)
        cfg.save(tmp_path / f"{name}.json")
        assert ModelConfig.load(tmp_path / f"{name}.json") == cfg


def test_preset_sizes_match_their_purpose():
    small = preset("small")
    with torch.device("meta"):
        assert 10e6 < n_params(Manzano(small)) < 100e6
        paper = Manzano(preset("manzano-300m"))
    assert 250e6 < n_params(paper.decoder) < 350e6
    assert 250e6 < n_params(paper.tokenizer.encoder) < 350e6  # ViT-L class
    assert 0.7e9 < n_params(paper.dit) < 1.1e9
    assert preset("manzano-300m").vision.codebook_size == 64000


def test_config_rules_are_enforced():
    cfg = preset("tiny")
    cfg.decoder.intermediate_size = 688  # 688 % 32 != 0: int4 group-32 lowering would fail later
    with pytest.raises(UserError, match="multiple of 32"):
        cfg.validate()
    cfg = preset("tiny")
    cfg.vision.image_size = 64  # 8x8 grid cannot be folded 3x3
    with pytest.raises(UserError, match="divisible by 3"):
        cfg.validate()
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")


def test_spatial_to_channel_folds_3x3_blocks():
    grid, c = 6, 2
    feats = torch.arange(grid * grid * c, dtype=torch.float32).view(1, grid * grid, c)
    out = spatial_to_channel(feats, grid)
    assert out.shape == (1, 4, 9 * c)
    # token 1 is the top-middle 3x3 block: patches (rows 0..2, cols 3..5)
    expected = torch.cat([feats[0, r * grid + col] for r in range(3) for col in range(3, 6)])
    torch.testing.assert_close(out[0, 1], expected)


def test_fsq_ids_roundtrip_and_cover_codebook():
    fsq = FSQ([8, 5, 5, 5])
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(ids)
    assert codes.abs().max() <= 1
    torch.testing.assert_close(fsq.codes_to_indices(codes), ids)
    z = torch.randn(4, 16, 4, requires_grad=True)
    q = fsq.quantize(z)
    q.sum().backward()  # straight-through: gradients reach z
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert ((fsq.codes_to_indices(q) >= 0) & (fsq.codes_to_indices(q) < 1000)).all()


def test_tokenizer_branches(model):
    size, n = model.cfg.vision.image_size, model.cfg.vision.num_image_tokens
    assert n == 9  # tiny: 144 px, 9x9 patches folded 3x3 -> one token per scene cell
    px = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        cont, ids = model.tokenizer(px)
        feats = model.tokenizer.discrete.ids_to_features(ids)
    assert cont.shape == (2, n, 256) and ids.shape == (2, n) and ids.dtype == torch.int64
    assert feats.shape == (2, n, 256)


@pytest.mark.parametrize("decoder_cls", [StatefulDecoder, InPlaceKVDecoder])
def test_cached_decoders_match_full_forward(model, decoder_cls):
    """Every KV-cache build (eager/Core ML slice assignment, ExecuTorch's llama kernels) gives the
    full forward's logits step by step, and a reset gives the same prefill again."""
    cached = decoder_cls(model.decoder).eval()
    tokens = torch.randint(0, 400, (1, 30))
    with torch.no_grad():
        full = model.decoder(tokens=tokens)
        out = [cached(model.decoder.embed(tokens[:, :10]), causal_mask(0, 10))]
        out += [cached(model.decoder.embed(tokens[:, i:i + 1]), causal_mask(i, 1)) for i in range(10, 30)]
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-4)
        cached.reset()
        torch.testing.assert_close(cached(model.decoder.embed(tokens[:, :10]), causal_mask(0, 10)), full[:, :10],
                                   atol=1e-5, rtol=1e-4)
        # The exported graphs' build: the last position's row only, prefill and decode alike.
        last = decoder_cls(model.decoder, last_logits=True).eval()
        torch.testing.assert_close(last(model.decoder.embed(tokens[:, :10]), causal_mask(0, 10)), full[:, 9:10],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(last(model.decoder.embed(tokens[:, 10:11]), causal_mask(10, 1)), full[:, 10:11],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [lambda d: StatefulDecoder(d, batch_size=2),
                                   lambda d: InPlaceKVDecoder(d, batch_size=2)], ids=["slice-cache", "llm-kernels"])
def test_left_padded_batch_matches_unpadded_rows(model, build):
    """Batched CFG decodes a padded unconditional row next to the conditional one (the eager /
    Core ML / ONNX build, and ExecuTorch's, which runs custom_sdpa once per row)."""
    long, short = torch.randint(0, 400, (1, 9)), torch.randint(0, 400, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    with torch.no_grad():
        b2 = build(model.decoder)
        out = b2(model.decoder.embed(batch), padded_causal_mask([0, 5], 0, 9))
        nxt = b2(model.decoder.embed(torch.tensor([[7], [7]])), padded_causal_mask([0, 5], 9, 1))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0], model.decoder(tokens=long)[0], atol=1e-5, rtol=1e-4)
        # RoPE is relative, so a left-shifted row gives the same logits as the unpadded one
        ref = model.decoder(tokens=torch.cat([short, torch.tensor([[7]])], 1))
        torch.testing.assert_close(out[1, -1], ref[0, -2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(nxt[1, -1], ref[0, -1], atol=1e-4, rtol=1e-4)


def test_diffusion_shapes(model):
    cfg = model.cfg
    latent = torch.randn(2, 8, cfg.latent_size, cfg.latent_size)
    with torch.no_grad():
        v = model.dit(latent, torch.tensor([0.1, 0.9]), torch.randn(2, cfg.vision.num_image_tokens, 256))
        px = model.vae.decoder(latent)
    size = cfg.vision.image_size
    assert v.shape == latent.shape and px.shape == (2, 3, size, size) and px.abs().max() <= 1


def test_dit_condition_resampling():
    from manzano_edge.models.dit import token_to_patch_matrix

    nearest = token_to_patch_matrix(9, 9, "nearest")  # tiny: 3x3 tokens over 9x9 latent patches
    assert ((nearest == 0) | (nearest == 1)).all() and (nearest.sum(1) == 1).all()
    owner = nearest.argmax(1).view(9, 9)  # each token conditions exactly the 3x3 patches of its cell
    assert owner.tolist() == [[3 * (r // 3) + c // 3 for c in range(9)] for r in range(9)]
    bilinear = token_to_patch_matrix(9, 9, "bilinear")
    assert torch.allclose(bilinear.sum(1), torch.ones(81)) and (bilinear[2] > 0).sum() == 2  # edge patches blend
    assert preset("tiny").dit.cond_resample == "nearest" and preset("small").dit.cond_resample == "bilinear"
    older = preset("tiny").to_dict()
    del older["dit"]["cond_resample"]  # configs saved before the option keep what they were trained with
    assert ModelConfig.from_dict(older).dit.cond_resample == "bilinear"
    cfg = preset("tiny")
    cfg.dit.cond_resample = "cubic"
    with pytest.raises(UserError, match="cond_resample"):
        cfg.validate()

"""Decoder parity with transformers' LlamaForCausalLM on the same (random, in-process) weights."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from manzano_edge.config import DecoderConfig  # noqa: E402
from manzano_edge.errors import UserError  # noqa: E402
from manzano_edge.models.decoder import LlamaDecoder, causal_mask  # noqa: E402
from manzano_edge.models.hf_llama import decoder_config_from_hf, hf_to_decoder_state, import_llama  # noqa: E402
from manzano_edge.spec.modules import StatefulDecoder  # noqa: E402


def tiny_hf_llama(tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                                   attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tie):
    hf = tiny_hf_llama(tie)
    dcfg = decoder_config_from_hf(hf.config.to_dict())
    ours = LlamaDecoder(dcfg, hf.config.vocab_size)
    missing, unexpected = ours.load_state_dict(hf_to_decoder_state(hf.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} if tie else not missing
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens=tokens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_stateful_prefill_then_decode_matches_transformers():
    hf = tiny_hf_llama()
    ours = LlamaDecoder(decoder_config_from_hf(hf.config.to_dict()), 300)
    ours.load_state_dict(hf_to_decoder_state(hf.state_dict()))
    stateful = StatefulDecoder(ours).eval()
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        prefill = stateful(ours.embed(tokens[:, :12]), causal_mask(0, 12))
        steps = [stateful(ours.embed(tokens[:, i:i + 1]), causal_mask(i, 1)) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), ref, atol=2e-5, rtol=1e-4)


def test_import_llama_directory(tmp_path, tiny_codec):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path / "llama")  # safetensors by default, all local
    (tmp_path / "llama" / "tokenizer.json").write_text(tiny_codec.tok.to_str())
    model, tok_json = import_llama(tmp_path / "llama", base_preset="tiny")
    cfg = model.cfg
    assert cfg.decoder.hidden_size == 64 and cfg.decoder.num_hidden_layers == 2
    assert cfg.vocab_size == cfg.text.text_vocab_size + cfg.vision.codebook_size
    assert json.loads(tok_json)["added_tokens"][-1]["content"] == "<img_end>"
    tokens = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # The original vocabulary's logits are unchanged by the extension.
        torch.testing.assert_close(model.decoder(tokens=tokens)[..., :300], hf(tokens).logits, atol=2e-5, rtol=1e-4)


def test_import_llama_refuses_bad_directories(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"type": "llama3"}}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="rope_scaling"):
        import_llama(tmp_path)
    with pytest.raises(UserError, match="lacks"):
        decoder_config_from_hf({"model_type": "llama", "hidden_size": 64})


def test_decoder_config_field_names_follow_llamaconfig():
    hf = transformers.LlamaConfig().to_dict()
    hf_fields = set(hf) | set(hf.get("rope_parameters") or {})  # transformers 5 nests rope_theta
    assert set(DecoderConfig.__dataclass_fields__) <= hf_fields

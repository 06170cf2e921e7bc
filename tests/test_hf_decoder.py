"""Imported decoders against transformers, on the same random in-process weights: Llama (tied or not,
biases, head_dim, scaled RoPE), Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms). Full forward, and
prefill + decode through every KV-cache build the exporters use; every tensor of a checkpoint accounted for."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from manzano_edge.cli import main  # noqa: E402
from manzano_edge.config import DecoderConfig, TextConfig  # noqa: E402
from manzano_edge.errors import UserError  # noqa: E402
from manzano_edge.models.decoder import LlamaDecoder, causal_mask  # noqa: E402
from manzano_edge.models.hf_decoder import (  # noqa: E402
    decoder_config_from_hf,
    decoder_to_hf_state,
    hf_config,
    hf_to_decoder_state,
    load_hf_decoder_state,
)
from manzano_edge.spec import modules  # noqa: E402
from manzano_edge.train.compose import import_model  # noqa: E402

# Relative error bar: max |ours - transformers| / max |transformers|.
RELATIVE_BAR = 1e-4
VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager",
             bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama-biases-head_dim": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                              {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
    "linear-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": LINEAR_ROPE}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"head_dim": 32, "sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen2-yarn": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"rope_parameters": YARN_ROPE}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


def hf_model(arch: str):
    """A random transformers model; biases and norm gains drawn away from their zero/one init so a
    dropped or misplaced one shows in the logits."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SHAPE, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.5)
    return model


def ours_from(hf) -> LlamaDecoder:
    decoder = LlamaDecoder(decoder_config_from_hf(hf.config.to_dict()), VOCAB)
    load_hf_decoder_state(decoder, hf_to_decoder_state(hf.state_dict()), "in-process")
    return decoder.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_full_forward_matches_transformers(arch):
    hf = hf_model(arch)
    ours = ours_from(hf)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = hf(tokens).logits, ours(tokens=tokens)
    assert relative_error(out, ref) <= RELATIVE_BAR, f"{arch}: {relative_error(out, ref):.2e}"


def _stepper(variant: str, decoder: LlamaDecoder):
    """(embeds [1,T,D], start) -> last-position logits [1,1,V], through one deployment KV-cache build."""
    if variant == "explicit":
        step = modules.ExplicitKVDecoder(decoder, last_logits=True)
        shape = (decoder.cfg.num_hidden_layers, 1, decoder.cfg.num_key_value_heads, 64, decoder.cfg.head_dim)
        cache = [torch.zeros(shape), torch.zeros(shape)]

        def run(x, start):
            logits, cache[0], cache[1] = step(x, causal_mask(start, x.shape[1]), *cache)
            return logits
        return run
    if variant == "per_layer":
        step = modules.PerLayerKVDecoder(decoder)
        empty = torch.zeros(1, decoder.cfg.num_key_value_heads, 0, decoder.cfg.head_dim)
        past = [empty] * (2 * decoder.cfg.num_hidden_layers)

        def run(x, start):
            logits, *past[:] = step(x, torch.ones(1, start + x.shape[1], dtype=torch.int64), *past)
            return logits
        return run
    if variant == "positioned":
        step = modules.PositionedKVDecoder(decoder, takes_tokens=False)
        return lambda x, start: step(x, torch.tensor([start]))
    build = {"stateful": lambda: modules.StatefulDecoder(decoder, last_logits=True),
             "inplace": lambda: modules.InPlaceKVDecoder(decoder, last_logits=True)}[variant]
    step = build()
    return lambda x, start: step(x, causal_mask(start, x.shape[1]))[:, -1:]


@pytest.mark.parametrize("arch", ["llama-biases-head_dim", "qwen2", "qwen3", "llama3-rope", "qwen2-yarn"])
@pytest.mark.parametrize("variant", ["stateful", "inplace", "explicit", "per_layer", "positioned"])
def test_prefill_then_decode_matches_transformers(arch, variant):
    hf = hf_model(arch)
    ours = ours_from(hf)
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    run = _stepper(variant, ours)
    with torch.no_grad():
        ref = hf(tokens).logits[:, 11:]
        outs = [run(ours.embed(tokens[:, :12]), 0)]
        outs += [run(ours.embed(tokens[:, i:i + 1]), i) for i in range(12, 30)]
    out = torch.cat(outs, dim=1)
    assert relative_error(out, ref) <= RELATIVE_BAR, f"{arch}/{variant}: {relative_error(out, ref):.2e}"


def test_qwen2_biases_are_loaded_not_dropped():
    """The silent failure this guards against: Qwen2's q/k/v biases skipped at load."""
    hf = hf_model("qwen2")
    ours = ours_from(hf)
    attn = ours.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    torch.testing.assert_close(attn.k_proj.bias, hf.model.layers[0].self_attn.k_proj.bias)


def save_hf_directory(hf, path, codec) -> None:
    hf.save_pretrained(path)  # safetensors, all local
    (path / "tokenizer.json").write_text(codec.tok.to_str())


def test_import_a_qwen2_directory_keeps_every_tensor(tmp_path, tiny_codec):
    hf = hf_model("qwen2")
    save_hf_directory(hf, tmp_path / "qwen2", tiny_codec)
    imported = import_model(decoder=tmp_path / "qwen2", base_preset="tiny")
    model, tok_json = imported.model, imported.tokenizer_json
    cfg = model.cfg
    assert cfg.decoder.attention_bias and not cfg.decoder.attention_out_bias and cfg.decoder.tie_word_embeddings
    assert cfg.vocab_size == cfg.text.text_vocab_size + cfg.vision.codebook_size
    assert json.loads(tok_json)["added_tokens"][-1]["content"] == "<img_end>"
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the original vocabulary's logits are unchanged by the extension
        out, ref = model.decoder(tokens=tokens)[..., :VOCAB], hf(tokens).logits
    assert relative_error(out, ref) <= RELATIVE_BAR


def test_import_cli_writes_a_checkpoint_that_loads(tmp_path, tiny_codec, capsys):
    from manzano_edge.models.manzano import load_checkpoint

    save_hf_directory(hf_model("qwen3"), tmp_path / "qwen3", tiny_codec)
    assert main(["import", "--decoder", str(tmp_path / "qwen3"), "-o", str(tmp_path / "ckpt"), "--quiet"]) == 0
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.cfg.decoder.qk_norm and model.cfg.decoder.head_dim == 32
    assert "train -o RUN --init" in capsys.readouterr().out
    # A second import over the written checkpoint is refused before any work, and leaves it as it was.
    assert main(["import", "--decoder", str(tmp_path / "qwen3"), "-o", str(tmp_path / "ckpt"), "--quiet"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "ckpt")[0].cfg.decoder.qk_norm


def test_a_leftover_tensor_is_refused_by_name(tmp_path, tiny_codec):
    """A Qwen2 checkpoint whose config.json claims Llama: the biases have nowhere to go."""
    hf = hf_model("qwen2")
    save_hf_directory(hf, tmp_path / "m", tiny_codec)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(UserError, match=r"'layers\.0\.self_attn\.k_proj\.bias' maps to nothing.*bias"):
        import_model(tmp_path / "m")


def test_a_missing_tensor_is_refused_by_name():
    hf = hf_model("qwen3")
    state = hf_to_decoder_state(hf.state_dict())
    del state["layers.1.self_attn.k_norm.weight"]
    decoder = LlamaDecoder(decoder_config_from_hf(hf.config.to_dict()), VOCAB)
    with pytest.raises(UserError, match=r"lacks 'layers\.1\.self_attn\.k_norm\.weight'"):
        load_hf_decoder_state(decoder, state, "ckpt")


def test_stale_rope_buffers_and_untied_heads_are_checked():
    hf = hf_model("llama-tied")
    decoder = LlamaDecoder(decoder_config_from_hf(hf.config.to_dict()), VOCAB)
    state = hf_to_decoder_state(hf.state_dict())
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older checkpoints carry this buffer
    with pytest.raises(UserError, match="rotary_emb.inv_freq differs"):
        load_hf_decoder_state(decoder, state, "ckpt")
    state.pop("layers.0.self_attn.rotary_emb.inv_freq")
    state["lm_head.weight"] = torch.randn(VOCAB, 64)
    with pytest.raises(UserError, match="lm_head.weight differs from embed_tokens"):
        load_hf_decoder_state(decoder, state, "ckpt")


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "gemma"}, "'gemma' model; the decoder imports llama, mistral, qwen2, qwen3"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"}}, "'longrope' is not implemented"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"model_type": "llama", "max_position_embeddings": 64,
      "rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}},
     "dynamic NTK RoPE rescales past position 32"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_position_embeddings": 64},
     "sliding-window attention"),
    ({"model_type": "llama", "hidden_size": 64}, "lacks 'num_hidden_layers'"),
])
def test_configs_that_do_not_map_are_refused_in_one_line(raw, message):
    with pytest.raises(UserError, match=message) as err:
        decoder_config_from_hf(raw)
    assert "\n" not in str(err.value)


def test_legacy_rope_scaling_spelling_reads_the_same():
    """Configs written before transformers 5 keep rope_theta and rope_scaling at the top level."""
    legacy = {"model_type": "llama", **{k: v for k, v in SHAPE.items() if k != "attn_implementation"},
              "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = decoder_config_from_hf(legacy)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 2.0


def test_bad_directories_are_refused(tmp_path, tiny_codec):
    with pytest.raises(UserError, match="no config.json"):
        import_model(tmp_path)
    hf = hf_model("llama")
    save_hf_directory(hf, tmp_path / "m", tiny_codec)
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text(tiny_codec.tok.to_str())
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin is a pickle, which is never loaded"):
        import_model(tmp_path / "m")


def test_end_of_text_comes_from_either_config_file_or_the_import_says_it_is_missing(tmp_path, tiny_codec):
    save_hf_directory(hf_model("qwen2"), tmp_path / "m", tiny_codec)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, "eos_token_id": None, "bos_token_id": None}))
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    text = import_model(tmp_path / "m").model.cfg.text
    assert text.eos_id == text.bos_id == text.pad_id == 2
    (tmp_path / "m" / "generation_config.json").unlink()
    with pytest.raises(UserError, match="neither config.json nor generation_config.json gives eos_token_id"):
        import_model(tmp_path / "m")


def test_a_vocabulary_that_overflows_the_config_is_refused(tmp_path, tiny_codec):
    hf = hf_model("llama")
    save_hf_directory(hf, tmp_path / "m", tiny_codec)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v
             for k, v in hf_to_decoder_state(hf.state_dict()).items()}
    state["model.embed_tokens.weight"] = torch.randn(VOCAB + 50, 64)
    save_file(state, tmp_path / "m" / "model.safetensors")
    out = tmp_path / "ckpt"
    assert main(["import", "--decoder", str(tmp_path / "m"), "-o", str(out)]) == 2
    assert not out.exists()


def test_decoder_config_field_names_follow_transformers():
    """Field names are transformers' own, except the switches for what a model_type hard-codes."""
    hf_fields = set()
    for config_cls, _, _ in ARCHITECTURES.values():
        raw = config_cls().to_dict()
        hf_fields |= set(raw) | set(raw.get("rope_parameters") or {})
    hf_fields |= {"rope_scaling"}  # transformers < 5's name for the scaling dict
    assert set(DecoderConfig.__dataclass_fields__) - hf_fields == {"attention_out_bias", "qk_norm"}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama-biases-head_dim", "llama3-rope", "mistral"])
def test_a_decoder_written_as_hugging_face_loads_in_transformers_with_the_same_logits(arch):
    """`export-hf`'s mapping: the architecture that computes the decoder exactly, in transformers' names."""
    ours = ours_from(hf_model(arch))
    raw = hf_config(ours.cfg, TextConfig(), VOCAB)
    config = transformers.AutoConfig.for_model(**raw, attn_implementation="eager")
    back = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = back.load_state_dict(decoder_to_hf_state(ours), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if ours.cfg.tie_word_embeddings else set())
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(back(tokens).logits, ours(tokens=tokens)) <= RELATIVE_BAR


def test_export_hf_writes_the_embedded_decoder_over_the_joint_vocabulary(tiny, tmp_path):
    from tokenizers import Tokenizer

    model, _ = tiny
    assert main(["export-hf", "-o", str(tmp_path / "hf"), "--quiet"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(hf(tokens).logits, model.decoder(tokens=tokens)) <= RELATIVE_BAR
    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == model.cfg.vocab_size
    assert tokenizer.token_to_id("<img_0>") == model.cfg.image_token_offset
    assert main(["export-hf", "-o", str(tmp_path / "hf")]) == 2  # not over an existing directory

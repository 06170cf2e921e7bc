"""Imported decoders and vision towers against transformers on random in-process weights (nothing
downloaded): the decoders' full forward and a prefill of 12 then 18 single-token decode steps through every
KV-cache build, the towers' patch features at their own size and interpolated to another, in max abs and
relative error (max |ours - transformers| / max |transformers|). Also the Qwen2 case of issue 35 as the
previous import loaded it (q/k/v biases dropped). Usage: python docs/results/hf-decoder-parity.py
Results: docs/results/hf-decoder-parity.md."""
import torch
import transformers

from manzano_edge.models.decoder import LlamaDecoder, causal_mask
from manzano_edge.models.hf_decoder import decoder_config_from_hf, hf_to_decoder_state, load_hf_decoder_state
from manzano_edge.spec import modules

torch.set_num_threads(2)
VOCAB = 300
# The probe: hidden 128, 2 layers, biases (and norm gains) drawn at std 0.5.
SHAPE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager")
CASES = {
    "Llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "Llama, tied, attention+MLP biases, head_dim 64": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 64}),
    "Llama 3 RoPE scaling": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "Mistral, head_dim 64": (transformers.MistralConfig, transformers.MistralForCausalLM,
                             {"head_dim": 64, "sliding_window": None}),
    "Qwen2 (q/k/v biases)": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "Qwen2, YaRN RoPE": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}}),
    "Qwen3 (q/k norms), head_dim 64": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 64}),
}


def hf_model(config_cls, model_cls, extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(**SHAPE, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.5)
    return model


def errors(out, ref):
    diff = float((out - ref).abs().max())
    return diff, diff / float(ref.abs().max())


def cached_logits(step_kind, decoder, tokens):
    cfg = decoder.cfg
    if step_kind == "explicit":
        step, shape = modules.ExplicitKVDecoder(decoder, last_logits=True), (
            cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 64, cfg.head_dim)
        cache = [torch.zeros(shape), torch.zeros(shape)]

        def run(x, start):
            logits, cache[0], cache[1] = step(x, causal_mask(start, x.shape[1]), *cache)
            return logits
    elif step_kind == "per_layer":
        step = modules.PerLayerKVDecoder(decoder)
        past = [torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim)] * (2 * cfg.num_hidden_layers)

        def run(x, start):
            logits, *past[:] = step(x, torch.ones(1, start + x.shape[1], dtype=torch.int64), *past)
            return logits
    elif step_kind == "positioned":
        step = modules.PositionedKVDecoder(decoder, takes_tokens=False)

        def run(x, start):
            return step(x, torch.tensor([start]))
    else:
        step = (modules.StatefulDecoder if step_kind == "stateful" else modules.InPlaceKVDecoder)(
            decoder, last_logits=True)

        def run(x, start):
            return step(x, causal_mask(start, x.shape[1]))
    outs = [run(decoder.embed(tokens[:, :12]), 0)]
    outs += [run(decoder.embed(tokens[:, i:i + 1]), i) for i in range(12, tokens.shape[1])]
    return torch.cat(outs, dim=1)


def vision_rows():
    import tempfile
    from pathlib import Path

    from manzano_edge.models.hf_vision import TOWERS, read_vision_tower
    from manzano_edge.models.vit import ViTEncoder

    towers = {"SigLIP": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel, "siglip_vision_model"),
              "CLIP": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel, "clip_vision_model")}
    print("\n| vision tower | at 48 px (grid 6): max abs | relative | interpolated to 72 px (grid 9): max abs | relative |")
    print("|---|---|---|---|---|")
    for name, (config_cls, model_cls, kind) in towers.items():
        torch.manual_seed(0)
        hf = model_cls(config_cls(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=48, patch_size=8)).eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.normal_(0.0 if pname.endswith("bias") else 1.0, 0.3)
        directory = Path(tempfile.mkdtemp())
        hf.save_pretrained(directory)
        mean, std = (torch.tensor(v)[None, :, None, None] for v in TOWERS[kind][1:])
        cells = []
        for size in (48, 72):
            tower = read_vision_tower(directory, size, [8, 5, 5, 5])
            vit = ViTEncoder(tower.config).eval()
            vit.load_state_dict(tower.state)
            pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
            with torch.no_grad():
                ref = hf(pixel_values=((pixels + 1) / 2 - mean) / std, interpolate_pos_encoding=size != 48).last_hidden_state
                cells.append(errors(vit(pixels), ref[:, 1:] if kind == "clip_vision_model" else ref))
        print(f"| {name} | {cells[0][0]:.1e} | {cells[0][1]:.1e} | {cells[1][0]:.1e} | {cells[1][1]:.1e} |")


def main():
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    print("| architecture | full forward: max abs | relative | cached decode, worst of 5 builds: max abs | relative |")
    print("|---|---|---|---|---|")
    for name, case in CASES.items():
        hf = hf_model(*case)
        ours = LlamaDecoder(decoder_config_from_hf(hf.config.to_dict()), VOCAB)
        load_hf_decoder_state(ours, hf_to_decoder_state(hf.state_dict()), name)
        with torch.no_grad():
            ref = hf(tokens).logits
            full = errors(ours(tokens=tokens), ref)
            cached = max((errors(cached_logits(kind, ours, tokens), ref[:, 11:])
                          for kind in ("stateful", "inplace", "explicit", "per_layer", "positioned")),
                         key=lambda e: e[1])
        print(f"| {name} | {full[0]:.1e} | {full[1]:.1e} | {cached[0]:.1e} | {cached[1]:.1e} |")
    hf = hf_model(*CASES["Qwen2 (q/k/v biases)"])
    raw = {**hf.config.to_dict(), "model_type": "llama"}  # the previous import: no biases, loaded non-strictly
    old = LlamaDecoder(decoder_config_from_hf(raw), VOCAB)
    old.load_state_dict({k: v for k, v in hf_to_decoder_state(hf.state_dict()).items() if not k.endswith("bias")})
    with torch.no_grad():
        ref = hf(tokens).logits
        print(f"\nQwen2 as the previous import loaded it (biases dropped): max abs {errors(old(tokens=tokens), ref)[0]:.2f} "
              f"on logits of max magnitude {float(ref.abs().max()):.2f}")


if __name__ == "__main__":
    main()
    vision_rows()

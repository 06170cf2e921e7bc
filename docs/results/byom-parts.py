"""Random Qwen2 decoder and SigLIP tower directories for docs/results/byom-export.md, built in-process
(nothing downloaded). Usage: python docs/results/byom-parts.py DIR"""
import sys, torch, transformers
from pathlib import Path
from manzano_edge.models.manzano import load_checkpoint
root = Path(sys.argv[1])
torch.manual_seed(0)
_, tok = load_checkpoint(None)  # the embedded model's BPE stands in for the checkpoint's tokenizer.json
import json
vocab = json.loads(tok)
n = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
    vocab_size=n, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2))
with torch.no_grad():
    for name, p in qwen.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.5)
qwen.save_pretrained(root / "qwen2")
(root / "qwen2" / "tokenizer.json").write_text(tok)
siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=144, patch_size=16))
siglip.save_pretrained(root / "siglip")
print("vocab", n)

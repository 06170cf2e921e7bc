"""The whole path on an imported model: a random Qwen2 decoder (q/k/v biases) and a random SigLIP tower,
built in-process, composed by `manzano-edge import`, a few adapter steps with the tower frozen, then the
graphs the imported parts make (tokenizer, decoder) exported w8a8 to ONNX (the float graph and the
quantized one each at their parity bar) and validated. The same modules go through every other exporter
unchanged; the all-format fp32 and w8a8 run of a larger composition is a documented command with its
numbers (docs/results/byom-export.md), kept out of the suite for its time."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from manzano_edge.cli import main  # noqa: E402
from manzano_edge.export.bundle import ExportOptions, export_bundle  # noqa: E402
from manzano_edge.models.manzano import load_checkpoint  # noqa: E402
from manzano_edge.train.loop import STAGES, StageBudget, TrainConfig, train  # noqa: E402

GRAPHS = ["tokenizer", "decoder"]


@pytest.fixture(scope="module")
def composed(tmp_path_factory, tiny_codec):
    root = tmp_path_factory.mktemp("byom")
    torch.manual_seed(0)
    vocab = tiny_codec.tok.get_vocab_size(with_added_tokens=True)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1))  # logits with margins, so that validate's top-1 check has tokens to count
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    qwen.save_pretrained(root / "qwen2")
    (root / "qwen2" / "tokenizer.json").write_text(tiny_codec.tok.to_str())
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=48,
        patch_size=8)).save_pretrained(root / "siglip")
    assert main(["import", "--decoder", str(root / "qwen2"), "--vision", str(root / "siglip"), "-o",
                 str(root / "ckpt"), "--quiet"]) == 0
    budget = {name: StageBudget(steps=2, batch_size=4, lr=1e-3, warmup=1) for name in STAGES}
    train(root / "run", TrainConfig(frozen=("vit",), stages=budget, precision="fp32"), init=root / "ckpt",
          stages=("tokenizer",), show=False)
    return root


def test_the_composed_model_exports_quantizes_and_validates(composed, tmp_path):
    model, tok = load_checkpoint(composed / "run" / "checkpoint")
    assert model.cfg.decoder.attention_bias and model.cfg.vision.width == 64 and not model.cfg.vision.conv_stem
    manifest = export_bundle(model, tok, composed / "w8a8", ExportOptions(formats=["onnx"], recipe="w8a8",
                                                                          graphs=GRAPHS, show_progress=False))
    for name in GRAPHS:  # the float export and the quantized file both ran at their parity bars
        entry = manifest["graphs"][name]["formats"]["onnx"]
        assert entry["passed"] is True and entry["status"] == "verified", (name, entry["parity"])
    code = main(["validate", str(composed / "w8a8"), "-o", str(tmp_path / "report"), "--reference",
                 str(composed / "run" / "checkpoint"), "--no-end-to-end", "--quiet"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {r["graph"] for r in report["graphs"]} == set(GRAPHS)
    assert code == 0 and report["passed"], [(r["graph"], r["format"], r["checks"]) for r in report["graphs"]]

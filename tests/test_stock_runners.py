"""The bundle's stock-runner layouts load in the runtimes apps embed and answer as manzano-edge does:
onnxruntime-genai opens `onnx-genai/` as it is (model type phi3v), token for token."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.export import onnx_genai
from manzano_edge.runtime.backends.ort import StockVlmProgram
from manzano_edge.runtime.bundle import Bundle, BundleGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig
from manzano_edge.spec.decoding import padded_causal_mask

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is installed by `make test` (the [export] extra)")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def genai(bundle):
    return load_example("genai_app").GenaiApp(bundle[0])


@pytest.fixture(scope="module")
def pipe(tiny, bundle):
    model, tok = tiny
    b = Bundle(bundle[0])
    return Pipeline(BundleGraphs(b, "ort"), b.cfg, TextCodec(tok, model.cfg.text))


def test_genai_captions_and_answers_token_for_token(genai, pipe):
    rng = np.random.default_rng(21)
    size = pipe.cfg.vision.image_size
    for i in range(4):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene, size)
        question = "describe the image." if i == 0 else scenes.question_answer(scene, rng)[0]
        want = pipe.understand_ids(to_pixels(image, size), question)
        assert genai.caption_ids(image, question) == want, question
        assert genai.caption(image, question) == pipe.codec.decode(want)


def test_genai_draws_the_same_codes_through_set_logits(genai, pipe):
    for prompt in ("a red circle at the top left", "draw a yellow square on the right and a blue circle on the left"):
        want = pipe.generate_ids(prompt, SamplingConfig(temperature=0.0))
        assert genai.image_codes(prompt) == want[0].tolist(), prompt


def test_genai_tokenizer_reads_as_tokenizers_after_the_app_prepares_text(genai, pipe):
    from manzano_edge.data.text import domain_corpus

    texts = [*domain_corpus(60), "Describe THE image.", "ﬁve Ｓquares?", "  two  spaces "]
    for text in texts:
        assert genai.encode(text) == pipe.codec.encode(text), text
        assert genai.encode(text) == [int(i) for i in genai.tokenizer.encode(onnx_genai.prepare_text(text))]


def test_genai_folder_is_in_the_manifest_and_checked(bundle, tmp_path):
    manifest = json.loads((bundle[0] / "manifest.json").read_text())
    runner = manifest["runners"]["onnxruntime-genai"]
    assert runner["model_type"] == "phi3v"
    config = json.loads((bundle[0] / "onnx-genai" / "genai_config.json").read_text())
    for section, graph in runner["graphs"].items():
        entry = manifest["graphs"][graph]["formats"]["onnx-genai"]
        assert entry["file"] == f"onnx-genai/{config['model'][section]['filename']}"
        assert entry["status"] == "verified" and entry["parity"]["psnr_db"] >= 60
    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    (copy / "onnx-genai" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="onnx-genai/tokenizer_config.json does not match its manifest checksum"):
        Bundle(copy).verify_checksums()


def test_stock_decoder_matches_the_reference_over_prefill_and_decode(tiny, bundle):
    """The per-layer cache grows by concatenation from empty, as onnxruntime-genai feeds it."""
    model, _ = tiny
    b = Bundle(bundle[0])
    spec = b.specs["decoder"]
    program = StockVlmProgram(spec, bundle[0] / "onnx-genai" / "decoder.onnx")
    reference = BundleGraphs(b, "ort")
    reference.decoder_reset(1)
    width = model.cfg.decoder.hidden_size
    x = torch.randn(1, 11, width)
    got = program.run({"inputs_embeds": x, "causal_mask": padded_causal_mask([0], 0, 11)})["logits"]
    want = reference.decoder_step(x, padded_causal_mask([0], 0, 11))
    assert (got - want).abs().max() < 1e-4
    for past in range(11, 15):
        x = torch.randn(1, 1, width)
        got = program.run({"inputs_embeds": x, "causal_mask": padded_causal_mask([0], past, 1)})["logits"]
        want = reference.decoder_step(x, padded_causal_mask([0], past, 1))
        assert (got - want).abs().max() < 1e-4
    with pytest.raises(UserError, match="takes one unpadded row"):
        program.run({"inputs_embeds": torch.randn(1, 2, width), "causal_mask": padded_causal_mask([1], 0, 2)})


def test_splicing_embedding_puts_the_kth_feature_at_the_kth_slot(bundle, tiny):
    import onnxruntime as ort

    model, _ = tiny
    session = ort.InferenceSession(str(bundle[0] / "onnx-genai" / "embedding.onnx"))
    width = model.cfg.decoder.hidden_size
    ids = np.array([[1, 4, -1, -1, -1, 5, 7, 3]], np.int64)
    features = np.random.default_rng(0).standard_normal((3, width)).astype(np.float32)
    out = session.run(None, {"input_ids": ids, "image_features": features})[0]
    table = model.decoder.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(out[0, 2:5], features)
    np.testing.assert_allclose(out[0, [0, 1, 5, 6, 7]], table[[1, 4, 5, 7, 3]])
    text_only = session.run(None, {"input_ids": ids[:, :2], "image_features": np.zeros((0, width), np.float32)})[0]
    np.testing.assert_allclose(text_only[0], table[[1, 4]])


def test_the_genai_folder_names_what_it_misses(tiny, tmp_path):
    from manzano_edge.export.base import Entry

    model, tok = tiny
    folder = tmp_path / onnx_genai.FOLDER
    folder.mkdir()
    some = [Entry("decoder", "onnx"), Entry("embed_tokens", "onnx")]
    record = onnx_genai.write_folder(tmp_path, model.cfg, tok, some)
    assert record == {"folder": None, "not_written": "it needs the graphs tokenizer: add them to --graphs"}
    assert not folder.exists()
    # Static w8a8 exports the reference graphs but not their variants (they have no calibration of their own).
    folder.mkdir()
    record = onnx_genai.write_folder(tmp_path, model.cfg, tok, [*some, Entry("tokenizer", "onnx"),
                                                                   Entry("tokenizer", onnx_genai.FOLDER)])
    assert record["folder"] is None and "--w8a8-mode onnx=dynamic" in record["not_written"]
    assert "(embed_tokens, decoder)" in record["not_written"]

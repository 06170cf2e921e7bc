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
from manzano_edge.data.text import TextCodec, runner_text
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
def pipe(tiny):
    """manzano-edge's own pipeline on the float reference the bundle was exported from."""
    from manzano_edge.runtime.graphs import TorchGraphs

    model, tok = tiny
    return Pipeline(TorchGraphs(model), model.cfg, TextCodec(tok, model.cfg.text))


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
        assert genai.encode(text) == [int(i) for i in genai.tokenizer.encode(runner_text(text))]


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
    some = [Entry(g, fmt) for g in ("decoder", "embed_tokens") for fmt in ("onnx", onnx_genai.FOLDER)]
    record = onnx_genai.write_folder(tmp_path, model.cfg, tok, some)
    assert record == {"folder": None, "not_written": "it needs the graphs tokenizer: add them to --graphs"}
    assert not folder.exists()


def test_static_w8a8_calibrates_the_genai_graphs_in_their_own_layout(tiny, bundle, pipe, tmp_path):
    """Static w8a8 of the runner's files, as `export --onnx-w8a8 static` quantizes them: the session
    bundle's float variant files run over the calibration prompts behind the graph's own I/O
    (`StockVlmProgram`: per-layer cache, integer mask), QDQ on the weighted MatMul/Conv inputs. The
    decoder keeps float's tokens, and onnxruntime-genai loads the files and captions as the toolkit."""
    from functools import partial

    from manzano_edge.export.parity import QUANT_SANITY_DB, run_parity
    from manzano_edge.quant import calibration, onnx_ptq
    from manzano_edge.runtime.backends.torch import TorchProgram
    from manzano_edge.spec.examples import real_examples
    from manzano_edge.spec.graphs import graph_specs
    from manzano_edge.spec.modules import build_module

    model, tok = tiny
    codec = TextCodec(tok, model.cfg.text)
    specs, examples = graph_specs(model.cfg), real_examples(model, codec).per_graph
    samples = calibration.generated(model, codec, 2)
    root = tmp_path / "static"
    shutil.copytree(bundle[0] / onnx_genai.FOLDER, root / onnx_genai.FOLDER)
    shutil.copy(bundle[0] / "manifest.json", root / "manifest.json")
    for graph, file in (("tokenizer", "vision.onnx"), ("decoder", "decoder.onnx")):
        spec, path = specs[graph], root / onnx_genai.FOLDER / file
        info = onnx_ptq.quantize(spec, bundle[0] / onnx_genai.FOLDER / file, path, "w8a8", "static",
                                 samples[graph], [], partial(StockVlmProgram, spec))
        assert info["calibration_steps"] == sum(len(s) for s in samples[graph]) > 2, info
        assert info["integer_ops"]["ops"].get("QuantizeLinear", 0) > 0, info
        checked = spec.float_outputs()
        parity = run_parity(checked, TorchProgram(checked, build_module(spec, model)), StockVlmProgram(spec, path),
                            examples[graph])
        assert min(x for x in (parity["psnr_db"], parity.get("min_step_psnr_db")) if x is not None) >= QUANT_SANITY_DB
        assert parity.get("greedy_match", 1.0) == 1.0, (graph, parity)
    size = model.cfg.vision.image_size
    image = scenes.render(scenes.sample_scene(np.random.default_rng(3)), size)
    want = pipe.understand_ids(to_pixels(image, size), "describe the image.")
    assert load_example("genai_app").GenaiApp(root).caption_ids(image, "describe the image.") == want


# -- ExecuTorch's LLM runners ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def et_runner(bundle):
    pytest.importorskip("executorch.extension.llm.runner", reason="executorch is installed by `make test`")
    from pytorch_tokenizers.pytorch_tokenizers_cpp import HFTokenizer

    from manzano_edge.spec.modules import load_executorch_cache_ops

    load_executorch_cache_ops()  # the runners' llama:: kernels (a C++ app links ExecuTorch's custom_ops)
    folder = bundle[0] / "executorch-llm"
    tokenizer = HFTokenizer()
    tokenizer.load(str(folder / "tokenizer.json"))
    pieces = {}
    for i in range(tokenizer.vocab_size()):
        try:
            pieces.setdefault(tokenizer.decode(i), i)
        except (UnicodeDecodeError, RuntimeError):
            continue  # a lone UTF-8 continuation byte: not a piece a callback can carry
    return folder / "model.pte", folder / "tokenizer.json", pieces


def runner_tokens(runner, inputs, config, pieces: dict[str, int], eos: int) -> list[int]:
    """The runners hand their callback decoded pieces, not ids: map them back, drop the stop token."""
    got: list[str] = []
    runner.reset()
    runner.generate(inputs, config, got.append)
    ids = [pieces[p] for p in got]
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_executorch_multimodal_runner_captions_token_for_token(et_runner, pipe):
    from executorch.extension.llm.runner import (
        GenerationConfig,
        MultimodalRunner,
        make_image_input,
        make_text_input,
        make_token_input,
    )
    from tokenizers import Tokenizer

    from manzano_edge.data.text import runner_text
    from manzano_edge.spec.decoding import understanding_layout

    program, tokenizer, pieces = et_runner
    runner = MultimodalRunner(str(program), str(tokenizer))
    special = {i: t.content for i, t in Tokenizer.from_file(str(tokenizer)).get_added_tokens_decoder().items()}
    cfg, size = pipe.cfg, pipe.cfg.vision.image_size
    rng = np.random.default_rng(8)
    for i in range(3):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene, size)
        question = "describe the image." if i == 0 else scenes.question_answer(scene, rng)[0]
        before, after = understanding_layout(cfg.text, pipe.codec.encode(question))
        u8 = torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8)).permute(2, 0, 1).contiguous()
        config = GenerationConfig(echo=False, max_new_tokens=48, temperature=0.0)
        got = runner_tokens(runner, [make_token_input(before), make_image_input(u8), make_token_input(after)],
                            config, pieces, cfg.text.eos_id)
        assert got == pipe.understand_ids(to_pixels(image, size), question), question
        # As the Swift and Kotlin APIs take it (text only): the special tokens as their strings.
        text = [make_text_input(special[before[0]] + special[before[1]]), make_image_input(u8),
                make_text_input(special[after[0]] + runner_text(question) + special[after[-1]])]
        assert runner_tokens(runner, text, config, pieces, cfg.text.eos_id) == got, question


def test_executorch_text_runner_decodes_token_for_token(et_runner, tiny):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.spec.decoding import decode

    model, tok = tiny
    program, tokenizer, pieces = et_runner
    codec, eos = TextCodec(tok, model.cfg.text), model.cfg.text.eos_id
    graphs = TorchGraphs(model)
    runner = TextLLMRunner(str(program), str(tokenizer))
    for prompt in ("a red circle at the top left", "What do you see?"):
        ids = [model.cfg.text.bos_id, *codec.encode(prompt)]
        graphs.decoder_reset(1)
        logits = graphs.decoder_step(graphs.embed_tokens(torch.tensor([ids])), padded_causal_mask([0], 0, len(ids)))[:, -1]
        want = decode(graphs.decoder_step, graphs.embed_tokens, logits, len(ids), 24, stop_id=eos)  # no mask: the runner has none
        got = runner_tokens(runner, runner_text(prompt),
                            GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0, num_bos=1), pieces, eos)
        assert got == want, prompt


def test_executorch_program_methods_draw_the_toolkits_codes(et_runner, pipe):
    """Text-to-image needs the codes-only mask, which the runners cannot apply: the app calls the
    program's token_embedding and text_decoder methods itself (ExecuTorch's Module API) and masks."""
    from manzano_edge.runtime.backends.executorch import runtime

    program_path, _, _ = et_runner
    program = runtime().load_program(program_path)
    embed, step = program.load_method("token_embedding"), program.load_method("text_decoder")
    contract = json.loads((program_path.parents[1] / "manifest.json").read_text())["pipeline"]["text_to_image"]
    mask = torch.full((pipe.cfg.vocab_size,), float("-inf"))
    for lo, hi in contract["allowed_ids"]:
        mask[lo:hi] = 0
    for prompt in ("a red circle at the top left", "a blue square on the right"):
        ids = [pipe.cfg.text.bos_id, *pipe.codec.encode(prompt), pipe.cfg.text.img_start_id]
        logits = step.execute([embed.execute([torch.tensor([ids])])[0], torch.tensor([0])])[0]
        past, codes = len(ids), []
        for _ in range(contract["image_tokens"]):
            token = int((logits.view(-1) + mask).argmax())
            codes.append(token - pipe.cfg.image_token_offset)
            logits = step.execute([embed.execute([torch.tensor([[token]])])[0], torch.tensor([past])])[0]
            past += 1
        assert codes == pipe.generate_ids(prompt, SamplingConfig(temperature=0.0))[0].tolist(), prompt
        program = runtime().load_program(program_path)  # a fresh method: the cache starts empty again
        embed, step = program.load_method("token_embedding"), program.load_method("text_decoder")


def test_executorch_runner_program_is_in_the_manifest_and_checked(bundle):
    runner = bundle[1]["runners"]["executorch-llm-runner"]
    assert runner["status"] == "verified" and runner["folder"] == "executorch-llm"
    for method, record in runner["methods"].items():
        parity = record["parity"]
        assert min(x for x in (parity["psnr_db"], parity.get("min_step_psnr_db")) if x is not None) >= 60, method
    assert {f["file"] for f in runner["files"]} == {"executorch-llm/model.pte", "executorch-llm/tokenizer.json"}

"""Core AI (.aimodel): every graph converts and is checked by *running* it in coreai-core's runtime,
the runtime runs the pipeline as eager PyTorch does, the recipes compress what they claim, and a
graph that drifts from eager fails its parity. Skipped, with the reason, where coreai-core has no wheel."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.export.base import GraphJob, get_exporter
from manzano_edge.export.bundle import ExportOptions, export_bundle
from manzano_edge.export.parity import PARITY_DB
from manzano_edge.runtime.backends.coreai import (
    PLATFORMS,
    SPECIALIZES,
    CoreAIProgram,
    platform_supported,
    runnable,
    specialization,
)
from manzano_edge.runtime.bundle import Bundle, BundleGraphs
from manzano_edge.runtime.graphs import TorchGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig
from manzano_edge.spec.modules import StatefulDecoder

needs_coreai = pytest.mark.skipif(not runnable()[0], reason=f"Core AI does not run here: {runnable()[1]}")


@needs_coreai
def test_every_graph_runs_in_core_ai_at_float_parity(coreai_bundle):
    _, manifest = coreai_bundle
    for name, graph in manifest["graphs"].items():
        entry = graph["formats"]["coreai"]
        assert entry["status"] == "verified" and entry["passed"], (name, entry.get("error"))
        assert entry["file"] == f"coreai/{name}.aimodel"
        assert entry["verified_by"].startswith("coreai-core runtime"), name
        assert entry["parity"]["psnr_db"] >= PARITY_DB["fp32"], (name, entry["parity"])
        assert entry["asset"]["producer"].startswith("coreai-core"), name
    decoder = manifest["graphs"]["decoder"]["formats"]["coreai"]
    # Prefill, then decode steps that read the cache the previous steps wrote in Core AI state.
    assert decoder["parity"]["decode_steps"] >= 16 and decoder["parity"]["greedy_match"] == 1.0
    assert decoder["functions"] == ["main"] and [s["name"] for s in decoder["io"]["states"]] == ["k_cache", "v_cache"]
    # The DiT's batch is dynamic: one static function per batch size, both checked.
    dit = manifest["graphs"]["dit"]["formats"]["coreai"]
    assert dit["functions"] == ["batch_1", "batch_2"] and dit["parity"]["examples"] == 2
    assert manifest["graphs"]["tokenizer"]["formats"]["coreai"]["parity"]["id_agreement"] == 1.0


@needs_coreai
def test_the_pipeline_on_core_ai_answers_and_draws_as_eager_pytorch(tiny, coreai_bundle):
    model, tok = tiny
    codec = TextCodec(tok, model.cfg.text)
    torch_pipe = Pipeline(TorchGraphs(model), model.cfg, codec)
    coreai = Pipeline(BundleGraphs(Bundle(coreai_bundle[0]), "coreai"), model.cfg, codec)
    rng = np.random.default_rng(5)
    size = model.cfg.vision.image_size
    images = [to_pixels(scenes.render(scenes.sample_scene(rng), size), size) for _ in range(3)]
    drawn = Image.new("RGB", (200, 160), (240, 240, 240))
    ImageDraw.Draw(drawn).ellipse((40, 30, 140, 130), fill=(255, 140, 0))  # a user's picture, any size
    for image in [*images, drawn]:
        assert coreai.understand(image, "describe the image.") == torch_pipe.understand(image, "describe the image.")
    s = SamplingConfig(temperature=0.0, flow_steps=8, flow_guidance=2.0)
    ids = torch_pipe.generate_ids("a red circle at the top left", s)
    assert torch.equal(coreai.generate_ids("a red circle at the top left", s), ids)
    ref = torch_pipe.render_ids(ids, s, seed=1)
    assert (coreai.render_ids(ids, s, seed=1) - ref).abs().max() < 1e-3


class ShiftedCacheDecoder(StatefulDecoder):
    """The reference decoder with its cache written one row late: prefill matches, decode drifts."""

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t

        def write(layer, k, v):
            self.k_cache[layer:layer + 1, :, :, start + 1:end + 1] = k.unsqueeze(0)
            self.v_cache[layer:layer + 1, :, :, start + 1:end + 1] = v.unsqueeze(0)
            return self.k_cache[layer, :, :, :end], self.v_cache[layer, :, :, :end]

        return self.decoder(inputs_embeds=inputs_embeds, start=start, mask=causal_mask, kv_writer=write,
                            last_only=self.last_logits)


@needs_coreai
def test_a_decoder_that_drifts_from_eager_fails_core_ai_parity(micro, tmp_path, monkeypatch):
    """The export's parity runs the converted graph over prefill and decode steps: a cache written
    in the wrong place (exactly the failure a graph-state conversion can introduce) is caught."""
    from manzano_edge.export import coreai
    from manzano_edge.spec.examples import real_examples
    from manzano_edge.spec.graphs import graph_specs

    model, tok = micro
    spec = graph_specs(model.cfg)["decoder"]
    examples = real_examples(model, TextCodec(tok, model.cfg.text), decode_steps=4).per_graph["decoder"]
    built = iter([ShiftedCacheDecoder(model.decoder, last_logits=True).eval()])
    reference_build = coreai.build_module
    monkeypatch.setattr(coreai, "build_module", lambda s, m: next(built, None) or reference_build(s, m))
    (tmp_path / "coreai").mkdir()
    job = GraphJob(spec, model, examples, tmp_path, "fp32", ExportOptions(formats=["coreai"]))
    entry = get_exporter("coreai").export(job)[0]
    assert not entry.passed and entry.parity["min_step_psnr_db"] < PARITY_DB["fp32"], entry.parity


@needs_coreai
def test_weight_recipes_compress_every_graph_they_name_and_run(tiny, tmp_path):
    model, tok = tiny
    manifest = export_bundle(model, tok, tmp_path / "w4", ExportOptions(formats=["coreai"], recipe="w4",
                                                                        graphs=["decoder", "code_features"],
                                                                        show_progress=False))
    for name, graph in manifest["graphs"].items():
        entry = graph["formats"]["coreai"]
        details = entry["recipe"]["details"]
        assert entry["passed"] and details["compressed_weights"] > 0, name
        assert entry["bytes"] < entry["float_bytes"] / 4, name  # int4 weights, not a silent float file
        assert entry["parity"]["psnr_db"] >= 20, name
    assert manifest["graphs"]["decoder"]["formats"]["coreai"]["parity"]["greedy_match"] == 1.0


@needs_coreai
def test_fp16_assets_take_and_keep_fp16(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "fp16"
    manifest = export_bundle(model, tok, out, ExportOptions(formats=["coreai"], recipe="fp16",
                                                            graphs=["code_features"], show_progress=False))
    entry = manifest["graphs"]["code_features"]["formats"]["coreai"]
    assert entry["io_dtype"] == "float16" and entry["passed"]
    assert PARITY_DB["fp16"] <= entry["parity"]["psnr_db"] < PARITY_DB["fp32"] + 60  # fp16 numbers, not fp32 ones
    program = Bundle(out).program("code_features", "coreai")
    fn = program.functions["main"]
    assert fn.desc.output_descriptor("condition").dtype == "float16"


@needs_coreai
def test_a_recipe_that_compresses_nothing_is_refused_with_the_reason(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(UserError, match="palette4.*embed_tokens.*not divisible by channel_group_size.*--keep-float"):
        export_bundle(model, tok, tmp_path / "p4", ExportOptions(formats=["coreai"], recipe="palette4",
                                                                 graphs=["embed_tokens"], show_progress=False))
    assert not (tmp_path / "p4").exists()


def test_layer_overrides_and_unsupported_platforms_are_refused_in_one_line(tmp_path, monkeypatch):
    exporter = get_exporter("coreai")
    with pytest.raises(UserError, match="--keep-float lm_head: .*layers float only under w8a8"):
        exporter.check_options(ExportOptions(formats=["coreai"], recipe="w4", keep_float="lm_head"))
    monkeypatch.setattr("platform.system", lambda: "Linux")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    ok, why = platform_supported()
    assert not ok and why == f"Core AI needs {PLATFORMS}; this is Linux aarch64"
    with pytest.raises(UserError, match="format 'coreai' cannot convert here: Core AI needs Linux x86_64"):
        exporter.check_options(ExportOptions(formats=["coreai"]))
    with pytest.raises(UserError, match="the coreai backend cannot run here: Core AI needs"):
        CoreAIProgram(None, tmp_path)


@needs_coreai
def test_validate_scores_core_ai_by_execution_and_says_it_is_no_device_measurement(coreai_bundle, tmp_path):
    from manzano_edge.validate.core import Settings, Thresholds, validate

    report = validate(coreai_bundle[0], None, Thresholds(), Settings(samples=1, greedy_tokens=4, end_to_end=False),
                      show=False).report
    rows = [r for r in report["graphs"] if r["format"] == "coreai"]
    assert rows and all(r["passed"] and not r["emulated"] for r in rows)
    assert all(r["verified_by"].startswith("coreai-core runtime") for r in rows)
    assert any("not a device measurement" in note for note in report["notes"])


@needs_coreai
def test_w8a8_quantizes_layer_inputs_and_keeps_the_named_layers_float(tiny, tmp_path):
    model, tok = tiny
    manifest = export_bundle(model, tok, tmp_path / "w8a8", ExportOptions(
        formats=["coreai"], recipe="w8a8", graphs=["code_features"], keep_float="mlp.fc1", calibration_samples=1,
        show_progress=False))
    entry = manifest["graphs"]["code_features"]["formats"]["coreai"]
    assert entry["passed"] and entry["parity"]["psnr_db"] >= 35, entry["parity"]
    # The graph computes through two MLP layers: fc2 quantizes its input (one quantize op, so not a
    # silent float program), the kept fc1 does not (two ops if the override were ignored).
    assert entry["recipe"]["details"]["activation_quant_ops"] == 1
    assert entry["recipe"]["details"]["compressed_weights"] == 1


@pytest.mark.skipif(SPECIALIZES, reason="Apple's Core AI framework is here: compute units are real choices")
def test_a_compute_unit_off_apples_framework_is_refused_in_one_line():
    assert specialization(None) is None and specialization("ALL") is None  # Core AI's own placement
    with pytest.raises(UserError, match="compute unit 'GPU' needs Apple's Core AI framework \\(macOS 27\\+\\)"):
        specialization("GPU")

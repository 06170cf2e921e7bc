"""QAT: the fake quantization is the export grid, is really active, and a run writes a float
checkpoint that export and validate accept as coming from the same reference."""

import copy

import pytest
import torch
from torch import nn

from manzano_edge.cli import main
from manzano_edge.errors import UserError
from manzano_edge.quant import qat
from manzano_edge.quant.recipes import GROUP_SIZE


def _torchao_ptq(linear: nn.Linear, recipe: str) -> nn.Module:
    """The same Linear through torchao's real (not fake) quantization on the recipe's XNNPACK grid."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype, granularity = (torch.int8, PerAxis(0)) if recipe == "w8a8" else (torch.int4, PerGroup(GROUP_SIZE))
    holder = nn.Sequential(copy.deepcopy(linear))
    quantize_(holder, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity))
    return holder


@pytest.mark.parametrize("recipe", ["w8a8", "w4"])
def test_fake_quant_matches_the_export_grid_and_is_active(tiny, recipe):
    model, _ = tiny
    model = copy.deepcopy(model)
    original = copy.deepcopy(model.decoder.layers[0].mlp.down_proj)
    swapped = qat.prepare(model, recipe, ("decoder",))
    fake = model.decoder.layers[0].mlp.down_proj
    assert "decoder.layers.0.mlp.down_proj" in swapped and qat._is_fake_quantized(fake)
    x = torch.randn(3, 7, original.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, sim, real = original(x), fake(x), _torchao_ptq(original, recipe)(x)
    err = lambda a: float((a - ref).pow(2).mean() / ref.pow(2).mean())  # noqa: E731
    assert err(sim) > (1e-6 if recipe == "w8a8" else 1e-4), "fake quantization is not active (silently float)"
    # Fake and real quantization agree far more closely than either agrees with float.
    assert float((sim - real).pow(2).mean() / ref.pow(2).mean()) < 0.05 * err(sim)
    qat.finalize(model)
    assert qat.count_fake_quantized(model) == 0
    assert type(model.decoder.layers[0].mlp.down_proj) is nn.Linear


def test_keep_float_and_w4_alignment(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    swapped = qat.prepare(model, "w4", ("decoder",), keep_float=("lm_head",))
    assert "decoder.lm_head" not in swapped and not qat._is_fake_quantized(model.decoder.lm_head)
    with pytest.raises(UserError, match="no Linear layer named 'lm_haed'"):
        qat.prepare(copy.deepcopy(tiny[0]), "w8a8", ("decoder",), keep_float=("lm_haed",))


def test_qat_run_writes_a_checkpoint_validate_accepts(tiny, tmp_path):
    from safetensors import safe_open

    from manzano_edge.models.manzano import WEIGHTS_FILE, load_checkpoint

    run = tmp_path / "qat"
    cfg = qat.QATRunConfig(recipe="w8a8", graphs=("decoder", "dit")).scaled(2)
    cfg.stages = {k: type(v)(steps=2, batch_size=4, lr=1e-3, warmup=1) for k, v in cfg.stages.items()}
    final = qat.qat(None, run, cfg)
    model, _ = load_checkpoint(final)
    source = tiny[0]
    assert qat.count_fake_quantized(model) == 0
    with safe_open(str(final / WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["qat_recipe"] == "w8a8"
    # Trained graphs moved, the others did not, and the DiT null condition (validate's proof
    # that a bundle came from this reference) is untouched.
    assert not torch.equal(model.decoder.layers[0].mlp.down_proj.weight, source.decoder.layers[0].mlp.down_proj.weight)
    assert not torch.equal(model.dit.final.weight, source.dit.final.weight)
    assert torch.equal(model.tokenizer.continuous.mlp.fc1.weight, source.tokenizer.continuous.mlp.fc1.weight)
    assert torch.equal(model.dit.null_cond, source.dit.null_cond)
    # Only the quantized Linear layers learn: embeddings (a float graph) and norms stay the reference's.
    assert torch.equal(model.decoder.embed_tokens.weight, source.decoder.embed_tokens.weight)
    assert torch.equal(model.decoder.norm.weight, source.decoder.norm.weight)
    record = (run / qat.RECORD_FILE).read_text()
    assert '"qat-decoder"' in record and '"fake_quantized_linears"' in record
    # The run directory belongs to this recipe: resuming it as another one is refused.
    with pytest.raises(UserError, match="fresh run directory"):
        qat.qat(None, run, qat.QATRunConfig(recipe="w4", graphs=("decoder", "dit")).scaled(1))


@pytest.mark.parametrize("args, message", [
    (["--recipe", "w8"], "unknown recipe 'w8'"),
    (["--recipe", "w8a8", "--graphs", "vae_decoder"], "unknown graph 'vae_decoder'"),
    (["--recipe", "w8a8", "--train-steps", "0"], "--train-steps must be at least 1"),
])
def test_bad_qat_options_fail_cleanly(tmp_path, capsys, args, message):
    assert main(["qat", "-o", str(tmp_path / "run"), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_sensitivity_ranks_layers_and_proposes_an_override_export_accepts(tiny, tiny_codec):
    from manzano_edge.quant.overrides import parse_keep_float, resolve_layers
    from manzano_edge.spec.graphs import graph_specs
    from manzano_edge.spec.modules import build_module
    from manzano_edge.validate.sensitivity import Target, sensitivity

    model, tok = tiny
    from manzano_edge.data.text import TextCodec

    codec = TextCodec(tok, model.cfg.text)
    easy = sensitivity(model, codec, "w4", ["code_features"], samples=1, target=Target(psnr_db=0.0), show=False)
    graph = easy["graphs"][0]
    psnrs = [u["psnr_db"] for u in graph["units"]]
    assert psnrs == sorted(psnrs) and len(psnrs) == 2  # discrete.mlp.fc1/fc2, most sensitive first
    assert all(0 < p < 200 for p in psnrs), "a fake-quantized layer left the output exact: quantization inactive"
    assert graph["proposal"]["keep_float"] == [] and graph["proposal"]["meets_target"]
    hard = sensitivity(model, codec, "w4", ["code_features"], samples=1, target=Target(psnr_db=150.0), show=False)
    proposal = hard["graphs"][0]["proposal"]
    # Everything kept float is the float graph again: exact, so the target is met only then.
    assert len(proposal["keep_float"]) == 2 and proposal["after"]["psnr_db"] == 200.0
    assert hard["graphs"][0]["all_quantized"]["psnr_db"] < min(psnrs) + 1e-6
    spec = graph_specs(model.cfg)["code_features"]
    keep = parse_keep_float(hard["keep_float"], list(graph_specs(model.cfg)))
    assert len(resolve_layers(build_module(spec, model), keep).modules) == 2


def test_sensitivity_cli_writes_report_or_fails_in_one_line(tmp_path, capsys):
    import json

    out = tmp_path / "sens"
    assert main(["sensitivity", "--recipe", "w8a8", "--graphs", "code_features", "--samples", "1", "-o", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "manzano-edge/sensitivity@1" and (out / "sensitivity.png").stat().st_size > 0
    assert "code_features" in (out / "report.md").read_text()
    assert main(["sensitivity", "--recipe", "w8a8", "--graphs", "vae_decoder", "-o", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "unknown graph 'vae_decoder'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_each_recipe_has_its_own_default_learning_rate():
    # w8a8 at w4's 5e-5 ended further from float than PTQ (v4): its grid step is 16x finer.
    w8, w4 = qat.QATRunConfig(recipe="w8a8"), qat.QATRunConfig(recipe="w4")
    assert {b.lr for b in w8.stages.values()} == {qat.QAT_LR["w8a8"]} == {2e-6}
    assert {b.lr for b in w4.stages.values()} == {qat.QAT_LR["w4"]} == {5e-5}
    assert w8.scaled(3).stages["decoder"].lr == 2e-6 and set(w8.stages) == set(qat.QAT_GRAPHS)

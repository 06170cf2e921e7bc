"""`manzano-edge validate`: report schema, thresholds -> exit code, and clean refusals."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from manzano_edge.cli import main
from manzano_edge.models.decoder import causal_mask
from manzano_edge.spec.graphs import graph_specs
from manzano_edge.spec.modules import StatefulDecoder
from manzano_edge.validate.core import (
    SCHEMA,
    Thresholds,
    judge_e2e,
    judge_graph,
    ssim,
    teacher_forced,
    teacher_forcing,
)

FAST = ["--samples", "1", "--greedy-tokens", "16", "--no-end-to-end", "--quiet"]


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def report(quant_bundle, tmp_path_factory):
    bundle, _ = quant_bundle["onnx"]
    out = tmp_path_factory.mktemp("validate") / "report"
    code = main(["validate", str(bundle), "-o", str(out), *FAST])
    return code, out, json.loads((out / "report.json").read_text())


def test_teacher_forcing_scores_the_positions_of_a_last_logits_decoder(tiny):
    """The decoder graph returns one row per call; validate splits each prompt so the prefill's
    last position and every later one are scored, and the rows are the full forward's."""
    model, _ = tiny
    tokens = torch.randint(0, 400, (1, 9))
    embeds = model.decoder.embed(tokens)
    step = {"inputs_embeds": model.decoder.embed(torch.tensor([[5]])), "causal_mask": causal_mask(9, 1)}
    steps = teacher_forced([{"inputs_embeds": embeds, "causal_mask": causal_mask(0, 9)}, step])
    assert [s["inputs_embeds"].shape[1] for s in steps] == [4, 1, 1, 1, 1, 1, 1]
    dec = StatefulDecoder(model.decoder, last_logits=True).eval()
    with torch.no_grad():
        rows = torch.cat([dec(**s) for s in steps], 1)
        full = model.decoder(tokens=torch.cat([tokens, torch.tensor([[5]])], 1))
    torch.testing.assert_close(rows, full[:, 3:], atol=1e-5, rtol=1e-4)


def test_report_is_well_formed(report):
    code, out, rep = report
    assert rep["schema"] == SCHEMA and rep["bundle"]["recipe"] == "w8a8"
    # The decoder's onnxruntime-genai graph is in the bundle (and scored) although its folder is not
    # complete without the tokenizer graphs.
    assert {(r["graph"], r["format"]) for r in rep["graphs"]} == {("decoder", "onnx"), ("decoder_cfg", "onnx"),
                                                                   ("code_features", "onnx"), ("decoder", "onnx-genai")}
    dec = next(r for r in rep["graphs"] if (r["graph"], r["format"]) == ("decoder", "onnx"))
    m = dec["metrics"]
    assert set(m["logits"]) >= {"psnr_db", "sqnr_db", "cosine"}
    assert 0.0 <= m["teacher_forcing"]["top1_agreement"] <= 1.0 and m["teacher_forcing"]["kl"] >= 0.0
    assert m["greedy"]["tokens"] >= 16 and m["greedy"]["prompts"] == 1
    tf = m["teacher_forcing"]
    assert tf["tie_nats"] == Thresholds().top1_tie_nats and 0 < tf["decisive_positions"] <= tf["positions"]
    assert {c["name"] for c in dec["checks"]} == {"logits PSNR dB", "top-1 agreement (float margin >= 0.3 nats)"}
    assert rep["passed"] == all(r["passed"] for r in rep["graphs"])
    assert code == (0 if rep["passed"] else 1)
    text = (out / "report.md").read_text()
    assert "| decoder | onnx | w8a8 |" in text and (out / "graphs_psnr.png").stat().st_size > 1000


def _logits(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor([rows])]  # one sequence of len(rows) positions


def test_top1_gate_skips_float_near_ties_but_counts_decisive_flips():
    """A flip where float itself is split (p 0.53 vs 0.47, a 0.11-nat lead, as measured on v15's
    ONNX w8a8 decoder) is int8 noise; a flip where float is sure is a real error."""
    ref = _logits([2.0, 1.886, -5.0], [6.0, 0.0, 0.0], [0.0, 5.0, 0.0])
    tie_flip = _logits([1.95, 1.96, -5.0], [6.0, 0.0, 0.0], [0.0, 5.0, 0.0])
    tf = teacher_forcing(ref, tie_flip, tie_nats=0.3)
    assert tf["top1_agreement"] == pytest.approx(2 / 3) and tf["flips_at_ties"] == 1
    assert tf["decisive_positions"] == 2 and tf["decisive_top1_agreement"] == 1.0
    real_flip = _logits([2.0, 1.886, -5.0], [0.0, 6.0, 0.0], [0.0, 5.0, 0.0])
    tf = teacher_forcing(ref, real_flip, tie_nats=0.3)
    assert tf["decisive_top1_agreement"] == 0.5 and tf["flips_at_ties"] == 0
    every = teacher_forcing(ref, tie_flip, tie_nats=0.0)  # the validate@1 gate
    assert every["decisive_positions"] == 3 and every["decisive_top1_agreement"] == every["top1_agreement"]


def test_top1_gate_fails_when_float_is_never_decisive(tiny):
    """Nothing to judge is not a pass: the check gets no value and fails."""
    spec = graph_specs(tiny[0].cfg)["decoder"]
    flat = _logits([1.0, 1.0, 0.0])
    tf = teacher_forcing(flat, flat, tie_nats=0.3)
    assert tf["decisive_positions"] == 0 and tf["decisive_top1_agreement"] is None
    row = {"metrics": {"logits": {"psnr_db": 200.0}, "teacher_forcing": tf}}
    judge_graph(row, spec, "w8a8", Thresholds())
    assert not row["passed"] and [c["value"] for c in row["checks"] if c["name"].startswith("top-1")] == [None]


def test_w8a8_onnx_meets_default_bars(report):
    _, _, rep = report
    for r in rep["graphs"]:
        for c in r["checks"]:
            assert c["passed"], (r["graph"], c)


def test_failed_threshold_exits_nonzero(quant_bundle, tmp_path, capsys):
    bundle, _ = quant_bundle["onnx"]
    code, err = run(["validate", str(bundle), "-o", str(tmp_path / "r"), "--thresholds", "psnr_db=150",
                     "--format", "onnx", *FAST], capsys)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert code == 1 and not rep["passed"] and "threshold failed" in err
    failed = [c for r in rep["graphs"] for c in r["checks"] if not c["passed"]]
    assert failed and all(c["bar"] == 150 for c in failed)


def _copy(quant_bundle, tmp_path):
    src, _ = quant_bundle["onnx"]
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("no_manifest", "has no manifest.json"),
    ("checksum", "does not match its manifest checksum"),
    ("recipe", "unknown recipe 'int3'"),
    ("reference", "does not match the bundle"),
    ("threshold", "unknown threshold 'psnr'"),
    ("token_guidance", "--token-guidance needs the bundle's batch-of-2 decoder_cfg graph"),
])
def test_bad_input_is_one_line_and_writes_nothing(quant_bundle, tmp_path, capsys, damage, message):
    bundle = _copy(quant_bundle, tmp_path)
    extra = []
    if damage == "no_manifest":
        (bundle / "manifest.json").unlink()
    elif damage == "checksum":
        with open(bundle / "onnx" / "code_features.onnx", "ab") as fh:
            fh.write(b"\0")
    elif damage == "recipe":
        m = json.loads((bundle / "manifest.json").read_text())
        m["recipe"] = "int3"
        (bundle / "manifest.json").write_text(json.dumps(m))
    elif damage == "reference":
        from manzano_edge.models.manzano import EMBEDDED_DEFAULT

        ref = tmp_path / "ref"
        shutil.copytree(EMBEDDED_DEFAULT, ref)
        from safetensors.torch import load_file, save_file

        weights = load_file(str(ref / "model.safetensors"))
        weights["dit.null_cond"] = weights["dit.null_cond"] + 1  # same config, different weights
        save_file(weights, str(ref / "model.safetensors"))
        extra = ["--reference", str(ref)]
    elif damage == "token_guidance":  # an end-to-end run with guidance, on a bundle without decoder_cfg
        m = json.loads((bundle / "manifest.json").read_text())
        del m["graphs"]["decoder_cfg"]
        (bundle / "manifest.json").write_text(json.dumps(m))
        extra = ["--token-guidance", "2"]
    else:
        extra = ["--thresholds", "psnr=3"]
    out = tmp_path / "report"
    fast = [a for a in FAST if a != "--no-end-to-end"] if damage == "token_guidance" else FAST
    code, err = run(["validate", str(bundle), "-o", str(out), *fast, *extra], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".report*"))


def test_thresholds_and_e2e_judgement():
    th = Thresholds.parse("psnr_db=30,e2e_drop_w4=5")
    assert th.graph_db("w8a8") == 30 and th.e2e_drop("w4") == 5 and th.e2e_drop("w8a8") == 1
    row = {"float": {"understanding_accuracy": 0.80, "shapes_eval": 0.50},
           "bundle": {"understanding_accuracy": 0.785, "shapes_eval": 0.50}}
    judge_e2e(row, "w8a8", Thresholds())
    assert not row["passed"] and row["drop_points"]["understanding_accuracy"] == pytest.approx(1.5)
    judge_e2e(row, "w4", Thresholds())
    assert row["passed"]
    # One image in 100 is exactly the 1-point bar (floating point made it 1.0000000000000009 and failed)
    row = {"float": {"understanding_accuracy": 0.5, "shapes_eval": 0.22},
           "bundle": {"understanding_accuracy": 0.5, "shapes_eval": 0.21}}
    judge_e2e(row, "w8a8", Thresholds())
    assert row["passed"] and row["drop_points"]["shapes_eval"] == 1.0


def test_ssim():
    a = torch.rand(1, 3, 32, 32) * 2 - 1
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, -a) < 0.2


def test_coreml_w8a8_from_a_qat_checkpoint_is_emulated_from_it(tiny, tmp_path, capsys):
    """A fine-tuned (QAT) checkpoint calibrates to other activation scales than the float
    reference. Validate refuses to emulate its Core ML w8a8 file from the reference alone, and
    with --exported-from rebuilds the scales from the fine-tuned weights while still scoring
    against the float reference."""
    from manzano_edge.export.bundle import ExportOptions, export_bundle
    from manzano_edge.models.manzano import save_checkpoint

    model, tok = tiny
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # Linear weights only, as QAT trains them (the DiT null condition stays)
        for m in tuned.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.3 * m.weight.std() * torch.randn(m.weight.shape, generator=gen))
    save_checkpoint(tuned, tmp_path / "qat", tok)
    export_bundle(tuned, tok, tmp_path / "b", ExportOptions(formats=["coreml"], recipe="w8a8", graphs=["code_features"],
                                                            calibration_samples=1, show_progress=False))
    args = ["validate", str(tmp_path / "b"), "--samples", "1", "--no-end-to-end", "--quiet"]
    code, err = run([*args, "-o", str(tmp_path / "r1")], capsys)
    assert code == 2 and "--exported-from" in err and not (tmp_path / "r1").exists()
    code, err = run([*args, "-o", str(tmp_path / "r2"), "--exported-from", str(tmp_path / "qat")], capsys)
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    from manzano_edge.models.manzano import embedded_model_identity

    assert report["reference"] == {"checkpoint": "embedded default", "matches_bundle": True,
                                   "exported_from": str(tmp_path / "qat"), "embedded_model": embedded_model_identity(),
                                   "sha256": embedded_model_identity()["sha256"]}
    (row,) = report["graphs"]
    psnr = row["metrics"]["condition"]["psnr_db"]
    # Scored against the float model: the tuning noise dominates. Against the tuned model it
    # would be the int8 error alone, ~56 dB for this graph.
    assert row["emulated"] and 20 < psnr < 45, row
    assert code == (0 if report["passed"] else 1)


def test_plots_read_with_an_exact_match_graph(tmp_path):
    """An exact-match graph (PSNR capped at 200 dB) is drawn capped and labelled, not as the
    axis top that squashes the 40-60 dB bars; both plots are written."""
    from matplotlib import image

    from manzano_edge.metrics import EXACT_DB
    from manzano_edge.validate.report import plot

    def graph(name, db):
        return {"graph": name, "format": "onnx", "recipe": "w8a8", "metrics": {"out": {"psnr_db": db}},
                "checks": [{"name": "out PSNR dB", "value": db, "bar": 35.0, "passed": db >= 35.0}], "passed": db >= 35.0}

    drops = {"understanding_accuracy": 0.0, "shapes_eval": 2.5}
    e2e = {"format": "onnx", "recipe": "w8a8", "float": {}, "bundle": {}, "drop_points": drops, "passed": False,
           "checks": [{"name": f"{k} drop (points)", "value": v, "bar": 1.0, "passed": v <= 1.0} for k, v in drops.items()]}
    rep = {"bundle": {"recipe": "w8a8"}, "end_to_end": [e2e],
           "graphs": [graph("embed_tokens", EXACT_DB), graph("decoder", 47.3), graph("dit", 33.2)]}
    assert plot(rep, tmp_path) == ["graphs_psnr.png", "end_to_end.png"]
    for name in ("graphs_psnr.png", "end_to_end.png"):
        assert image.imread(tmp_path / name).shape[0] > 200


def test_validate_scores_the_stock_runners_files_on_their_runtimes(bundle, tmp_path):
    """The onnxruntime-genai graphs and the LLM-runner program's methods get their own rows, run on
    onnxruntime and ExecuTorch against the same reference (the language-model graphs only, to keep
    it short: the others have no runner files)."""
    from manzano_edge.validate.core import Settings, validate

    out, manifest = bundle
    trimmed = tmp_path / "b"
    trimmed.mkdir()
    for item in out.iterdir():
        (trimmed / item.name).symlink_to(item) if item.is_dir() else shutil.copy(item, trimmed / item.name)
    graphs = ("tokenizer", "embed_tokens", "decoder")
    kept = copy.deepcopy(manifest)
    kept["graphs"] = {g: {**manifest["graphs"][g], "formats": {f: e for f, e in manifest["graphs"][g]["formats"].items()
                                                               if f != "coreml"}} for g in graphs}
    (trimmed / "manifest.json").unlink()
    (trimmed / "manifest.json").write_text(json.dumps(kept))
    report = validate(trimmed, None, Thresholds(), Settings(samples=1, greedy_tokens=8, end_to_end=False),
                      show=False).report
    rows = {(r["graph"], r["format"]): r for r in report["graphs"]}
    runner_rows = {("tokenizer", "onnx-genai"), ("embed_tokens", "onnx-genai"), ("decoder", "onnx-genai"),
                   ("tokenizer", "executorch-llm:vision_encoder"), ("embed_tokens", "executorch-llm:token_embedding"),
                   ("decoder", "executorch-llm:text_decoder")}
    assert set(rows) == {(g, f) for g in graphs for f in ("onnx", "executorch")} | runner_rows
    for key in runner_rows:
        row = rows[key]
        assert row["passed"] and not row["emulated"] and row["recipe"] == "fp32", (key, row["checks"])
        assert "image_ids" not in row["metrics"]  # the runners' vision graphs compute the understanding branch only
    assert rows[("decoder", "onnx-genai")]["metrics"]["greedy"]["exact_match"] == 1.0
    assert rows[("decoder", "executorch-llm:text_decoder")]["metrics"]["greedy"]["exact_match"] == 1.0
    assert report["passed"]

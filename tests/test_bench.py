"""`manzano-edge bench` runs on a bundle and writes a well-formed report. Never a timing assertion:
benchmarks are a command, these tests check structure and the same-answers columns."""

import copy
import json

import pytest

from manzano_edge.bench.report import SCHEMA, schema_errors
from manzano_edge.bench.run import BenchOptions, parse_threads, run_bench
from manzano_edge.cli import main
from manzano_edge.errors import UserError


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    code = main(["bench", str(bundle[0]), "-o", str(out), "--runs", "1", "--warmup", "0", "--decode-tokens", "3",
                 "--flow-steps", "2", "--threads", "2", "--token-guidance", "2", "--quiet"])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_report_is_well_formed(report):
    out, rep = report
    assert rep["schema"] == SCHEMA
    assert schema_errors(rep) == []
    for name in ("bench.md", "latency_per_graph.png", "decode_tok_s.png"):
        assert (out / name).stat().st_size > 0
    status = {r["label"]: r["status"] for r in rep["results"]}
    assert status["torch fp32"] == status["ort fp32"] == status["executorch fp32"] == "ok", status
    coreml = [r for r in rep["results"] if r["backend"] == "coreml"]
    assert {r["compute_units"] for r in coreml} == {"CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"}
    assert all(r["status"] == "ok" or r["reason"] for r in coreml)
    assert rep["context"]["threads"]["ort"] == 2 and rep["context"]["machine"]["cpu_model"]
    assert rep["bundles"][0]["reference_check"]["psnr_db"] > 40  # the embedded model is what the bundle holds
    # image-token CFG ran on the bundle's batch-of-2 decoder, and its latency row is reported
    assert rep["context"]["settings"]["token_guidance"] == 2.0
    assert all(any(k.startswith("decoder_cfg[decode") for k in r["latency"]) for r in rep["results"] if r["status"] == "ok")


def test_report_has_the_three_comparisons(report):
    _, rep = report
    c = rep["comparisons"]
    assert {x["pipeline"] for x in c["best_vs_eager"]} == {"caption", "text_to_image", "decode tok/s"}
    kv = c["kv_cache_vs_recompute"]
    assert kv["same_tokens"] and kv["speedup"] > 0
    assert {x["label"] for x in c["decode_roofline"]} == {"torch fp32", "ort fp32", "executorch fp32"}
    assert all(0 < x["fraction"] for x in c["decode_roofline"])


def test_fp32_backends_give_the_eager_answers(report):
    _, rep = report
    for r in rep["results"]:
        if r["status"] == "ok" and r["backend"] != "torch":
            assert r["consistency"]["caption_matches_eager"], r["label"]
            assert r["consistency"]["greedy_tokens_match_eager"], r["label"]
            assert r["consistency"]["image_psnr_db_vs_eager"] >= 40, r["label"]


def test_schema_check_catches_broken_reports(report):
    _, rep = report
    broken = copy.deepcopy(rep)
    del broken["roofline"]
    assert schema_errors(broken)
    broken = copy.deepcopy(rep)
    ok = next(r for r in broken["results"] if r["status"] == "ok")
    ok["latency"]["tokenizer"] = {"median_ms": 5.0, "p90_ms": 1.0, "runs": 1}
    assert any("p90" in e for e in schema_errors(broken))
    broken["results"].append({"label": "x", "backend": "ort", "recipe": "fp32", "bundle": "b", "status": "skipped",
                              "files": {}})
    assert any("reason" in e for e in schema_errors(broken))


def test_bad_bench_input(bundle, tmp_path):
    with pytest.raises(UserError, match="manifest"):
        run_bench([str(tmp_path)], tmp_path / "o", BenchOptions())
    with pytest.raises(UserError, match="backend"):
        run_bench([str(bundle[0])], tmp_path / "o", BenchOptions(backends=["tflite"]))
    with pytest.raises(UserError, match="--runs"):
        run_bench([str(bundle[0])], tmp_path / "o", BenchOptions(runs=0))
    with pytest.raises(UserError, match="threads"):
        parse_threads("ort=two")
    assert parse_threads("torch=1,ort=2") == (None, {"torch": 1, "ort": 2})
    assert main(["bench", str(bundle[0]), "-o", str(tmp_path / "o"), "--backends", "torch,gpu"]) == 2
    assert not (tmp_path / "o").exists()


def test_profile_here_and_import_a_device_etdump(bundle, tmp_path, capsys):
    from manzano_edge.bench.profile import SCHEMA as PROFILE_SCHEMA
    from manzano_edge.bench.profile import run_with_etdump, synthetic_inputs
    from manzano_edge.runtime.bundle import Bundle

    path, manifest = bundle
    out = tmp_path / "prof"
    assert main(["profile", str(path), "--graphs", "code_features,decoder", "--runs", "3", "-o", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["schema"] == PROFILE_SCHEMA and set(report["graphs"]) == {"code_features", "decoder"}
    dec = report["graphs"]["decoder"]
    assert dec["execute"]["runs"] == 3 and dec["execute"]["median_ms"] > 0
    assert dec["kernels"]["float_gemm_ms"] > 0 and dec["kernels"]["integer_gemm_ms"] == 0  # an fp32 bundle
    assert any(v["delegated"] for v in dec["ops"].values()) and dec["delegates"] == \
        manifest["graphs"]["decoder"]["formats"]["executorch"]["delegates"]
    # A device's ETDump (here: one written the way a runner writes it) imports into the same report.
    b = Bundle(path)
    spec = b.specs["code_features"]
    etdp = tmp_path / "device.etdp"
    run_with_etdump(b.path / b.entry("code_features", "executorch")["file"], synthetic_inputs(spec, b, 32), spec, 4, etdp,
                    None)
    imported = tmp_path / "imported"
    assert main(["profile", str(path), "--etdump", f"code_features={etdp}", "--device", "test phone", "-o",
                 str(imported)]) == 0
    report = json.loads((imported / "profile.json").read_text())
    assert report["device"] == "test phone" and report["graphs"]["code_features"]["execute"]["runs"] == 4
    assert "test phone" in report["graphs"]["code_features"]["source"]
    capsys.readouterr()
    assert main(["profile", str(path), "--etdump", f"nope={etdp}", "-o", str(tmp_path / "x")]) != 0
    assert main(["profile", str(path), "--etdump", f"decoder={path / 'manifest.json'}", "-o", str(tmp_path / "y")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "GRAPH=FILE" in err[0] and "not a readable ETDump" in err[1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

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
                 "--flow-steps", "2", "--threads", "2", "--quiet"])
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

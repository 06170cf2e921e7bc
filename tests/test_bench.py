"""`manzano-edge bench` runs on a bundle and writes a well-formed report. Never a timing assertion:
benchmarks are a command, these tests check structure and the same-answers columns."""

import copy
import json
import re

import pytest
import torch

from manzano_edge.bench.report import SCHEMA, schema_errors, to_markdown
from manzano_edge.bench.roofline import bandwidth_at, cache_level, cpu_caches, ensure_point, fraction, matmul_shapes
from manzano_edge.bench.run import BenchOptions, comparisons, parse_threads, run_bench
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
    assert all(0 < x["fraction_raw"] for x in c["decode_roofline"])
    # each row's ceiling is the read bandwidth at its own bytes per token, named by cache level
    curve = rep["roofline"]["bandwidth_curve"]
    assert [p["bytes"] for p in curve["points"]] == sorted(p["bytes"] for p in curve["points"])
    for x in c["decode_roofline"]:
        point = next(p for p in curve["points"] if x["label"] in p.get("rows", []))
        assert x["ceiling_gbs"] == bandwidth_at(curve["points"], point["bytes"]) >= point["gbs"]
        assert x["level"] == point["level"]
        assert abs(point["bytes"] - x["bytes_per_token"]) <= 0.01 * x["bytes_per_token"]
        if x["flag"] is None:
            assert x["fraction"] == x["fraction_raw"] <= 1
        else:
            assert x["fraction"] is None and x["fraction_raw"] > 1
    gemm = rep["roofline"]["gemm"]
    assert gemm["gflops"] == max(k["gflops"] for k in gemm["candidates"]) == rep["roofline"]["gemm_gflops"]
    assert {k["kernel"] for k in gemm["candidates"]} >= {"torch.mm", "onnxruntime MatMul"}
    assert {k["source"] for k in gemm["candidates"]} >= {"square", "dit batch2", "decoder prefill"}


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


def test_bandwidth_at_a_size_reads_the_curve():
    pts = [{"bytes": 1 << 20, "gbs": 100.0}, {"bytes": 4 << 20, "gbs": 50.0}, {"bytes": 64 << 20, "gbs": 20.0}]
    assert bandwidth_at(pts, 1 << 20) == 100.0 and bandwidth_at(pts, (4 << 20) * 1.005) == 50.0  # measured
    assert bandwidth_at(pts, 2 << 20) == pytest.approx(75.0)  # halfway in log(size)
    assert bandwidth_at(pts, 16 << 20) == pytest.approx(35.0)
    assert bandwidth_at(pts, 1 << 10) == 100.0 and bandwidth_at(pts, 1 << 34) == 20.0  # the nearest end
    assert bandwidth_at(list(reversed(pts)), 2 << 20) == pytest.approx(75.0)
    dip = pts + [{"bytes": 16 << 20, "gbs": 5.0}]  # slower than a larger working set: noise, not the ceiling
    assert bandwidth_at(dip, 16 << 20) == 20.0 and bandwidth_at(dip, 32 << 20) == 20.0


def test_cache_level_names_the_smallest_level_a_working_set_fits_in():
    caches = [{"level": "L1", "bytes": 32 << 10, "shared_by_cpus": 1},
              {"level": "L2", "bytes": 512 << 10, "shared_by_cpus": 1},
              {"level": "L3", "bytes": 32 << 20, "shared_by_cpus": 2}]
    assert cache_level(48 << 10, caches, threads=2) == "L1"  # a private cache per thread
    assert cache_level(48 << 10, caches, threads=1) == "L2"
    assert cache_level(800 << 10, caches, threads=2) == "L2"
    assert cache_level(800 << 10, caches, threads=1) == "L3"
    assert cache_level(28e6, caches, threads=2) == "L3"  # the small decoder's w8a8 weights
    assert cache_level(110e6, caches, threads=2) == "DRAM"  # its fp32 weights
    assert cache_level(1e6, [], threads=2) is None  # unknown caches (no sysfs)
    for c in cpu_caches():  # this machine's, if it has sysfs
        assert c["level"].startswith("L") and c["bytes"] > 0 and c["shared_by_cpus"] >= 1


def test_a_fraction_above_one_is_flagged_never_a_result(report):
    out = {}
    fraction(out, "decode_bandwidth_fraction", 0.5)
    fraction(out, "prefill_compute_fraction", 1.218)
    assert out["decode_bandwidth_fraction"] == out["decode_bandwidth_fraction_raw"] == 0.5
    assert out["prefill_compute_fraction"] is None and out["prefill_compute_fraction_raw"] == 1.218
    assert list(out["flags"]) == ["prefill_compute_fraction"] and "121.8% > 100%" in out["flags"]["prefill_compute_fraction"]
    # A report where every fraction is above 1: the JSON holds nulls and flags, the Markdown no percentage > 100%.
    _, rep = report
    rep = copy.deepcopy(rep)
    for r in rep["results"]:
        if r["status"] == "ok":
            rf = r["roofline"]
            for k in [k for k in rf if k.endswith("_fraction")]:
                fraction(rf, k, 1.218)
    c = comparisons(rep["results"])
    assert all(x["fraction"] is None and x["flag"] for x in c["decode_roofline"])
    assert all(x["prefill_fraction"] is None and x["flags"] for x in c["compute_roofline"])
    rep["comparisons"] = c
    assert schema_errors(rep) == []
    md = to_markdown(rep)
    assert md.count("n/a (model error: 121.8% > 100%)") == 4 * len(c["decode_roofline"])
    shown = [float(p) for p in re.findall(r"([0-9.]+)%", re.sub(r"n/a \(model error: [^)]*\)", "", md))]
    assert shown and max(shown) <= 100
    # an unflagged fraction above 1 is malformed
    ok = next(r for r in rep["results"] if r["status"] == "ok")
    ok["roofline"]["decode_bandwidth_fraction"] = 1.218
    assert any("at most 1" in e for e in schema_errors(rep))


def test_ensure_point_measures_a_rows_working_set_once():
    roof = {"bandwidth_curve": {"threads": 1, "repeats": 2, "caches": [], "points": [
        {"bytes": 1 << 20, "gbs": 1.0, "source": "curve", "level": None}]}}
    p = ensure_point(roof, 300_000, "row a")
    assert p["source"] == "row" and p["rows"] == ["row a"] and abs(p["bytes"] - 300_000) < 8 and p["gbs"] > 0
    assert ensure_point(roof, 300_002, "row b") is p and p["rows"] == ["row a", "row b"]
    assert [q["bytes"] for q in roof["bandwidth_curve"]["points"]] == [p["bytes"], 1 << 20]


def test_matmul_shapes_of_a_linear_stack():
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8, bias=False))
    x = torch.rand(2, 5, 16)
    assert matmul_shapes(lambda: net(x)) == [(10, 16, 64), (10, 64, 8)]  # most FLOPs first
    q = torch.rand(3, 5, 4)
    assert matmul_shapes(lambda: torch.bmm(q, q.transpose(1, 2)), top=1) == [(3, 5, 4, 5)]


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

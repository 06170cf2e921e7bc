"""`manzano-edge demo`: the main job on the embedded default model, end to end.

Writes everything to a temporary directory next to OUT and renames it at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from manzano_edge.data import scenes
from manzano_edge.data.images import to_image, to_pixels
from manzano_edge.eval.evaluate import EvalConfig, evaluate
from manzano_edge.eval.shapes_eval import detect
from manzano_edge.export import FORMATS
from manzano_edge.export.bundle import ExportOptions, export_bundle
from manzano_edge.fsutil import atomic_output_dir
from manzano_edge.models.manzano import Manzano
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig


def run_demo(pipe: Pipeline, out: Path, overwrite: bool = False, eval_size: int = 40,
             export: tuple[Manzano, str] | None = None, checkpoint: str | None = None, show: bool = True) -> dict:
    """`export` = (model, tokenizer.json) to also export a bundle to every format, validate an
    int8 (w8a8) ONNX bundle against the float model (`checkpoint`; None = embedded) and
    benchmark the float bundle against eager PyTorch. `show=False` hides the export's progress bar."""
    with atomic_output_dir(out, overwrite) as tmp:
        t0 = time.time()
        size = pipe.cfg.vision.image_size
        rng = np.random.default_rng(2026)
        scene = scenes.sample_scene(rng)
        scenes.render(scene, size).save(tmp / "input.png")
        pixels = to_pixels(scenes.render(scene, size), size)
        caption = pipe.understand(pixels, "describe the image.")
        question, answer = scenes.question_answer(scene, rng)
        reply = pipe.understand(pixels, question)
        prompt = "a red circle at the top left and a blue square at the bottom right"
        greedy = SamplingConfig(temperature=0.0)
        image = to_image(pipe.render_ids(pipe.generate_ids(prompt, greedy), seed=0))
        image.save(tmp / "generated.png")
        found = detect(image)
        # Greedy, as `manzano-edge eval` and `generate` default to, for the quick eval and the image alike.
        metrics = evaluate(pipe, EvalConfig(vqa=eval_size, captions=eval_size // 2, generation=eval_size // 2,
                                            reconstruction=eval_size // 2, drawings=eval_size // 2,
                                            sampling=greedy), show=False)
        summary = {
            "caption": {"image": "input.png", "truth": scenes.caption(scene), "output": caption},
            "vqa": {"question": question, "truth": answer, "output": reply},
            "generate": {"prompt": prompt, "image": "generated.png",
                         "detected": [vars(f) for f in found],
                         "passed": scenes.scene_matches(scenes.parse_objects(prompt), found)},
            "quick_eval": {"vqa_accuracy": metrics["understanding"]["vqa_accuracy"],
                           "caption_accuracy": metrics["understanding"]["caption_accuracy"],
                           "shapes_eval": metrics["generation"]["shapes_eval"],
                           "reconstruction_shapes_eval": metrics["reconstruction"]["shapes_eval"],
                           "drawings_caption_accuracy": metrics["drawings"]["caption_accuracy"],
                           "samples": eval_size, "sampling": metrics["settings"]["sampling"]},
            "seconds": 0.0,
        }
        if export is not None:
            opts = ExportOptions(formats=list(FORMATS), recipe="fp32", show_progress=show)
            manifest = export_bundle(*export, tmp / "bundle", opts)
            summary["export"] = {f"{g}/{fmt}": {"bytes": f["bytes"], "status": f["status"], "passed": f["passed"],
                                                "psnr_db": (f["parity"] or {}).get("psnr_db")}
                                 for g, graph in manifest["graphs"].items() for fmt, f in graph["formats"].items()}
            summary["validate_w8a8"] = validate_int8(*export, tmp, checkpoint)
            summary["bench"] = quick_bench(tmp)
        summary["seconds"] = round(time.time() - t0, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        retarget_reports(tmp, Path(out))
    return summary


def retarget_reports(tmp: Path, out: Path) -> None:
    """The reports were written while everything sat in the temporary directory; make the paths
    they record the final ones (OUT/bundle, not .OUT.tmp-XXXX/bundle)."""
    old, new = str(tmp.resolve()), str(out.resolve())
    for report in (*tmp.rglob("*.json"), *tmp.rglob("*.md")):
        if report.name == "manifest.json" or any(part.endswith((".mlpackage", ".aimodel")) for part in report.parts):
            continue  # graph files and their manifests record no path
        text = report.read_text()
        if old in text:
            report.write_text(text.replace(old, new))


def validate_int8(model: Manzano, tokenizer_json: str, tmp: Path, checkpoint: str | None) -> dict:
    """ONNX w8a8 (dynamic, the default) of every graph but the embedding lookup, validated
    against the float model with the default thresholds; report in validate-w8a8/."""
    from manzano_edge.validate.core import Settings, Thresholds, validate
    from manzano_edge.validate.report import failed_checks, write_report

    export_bundle(model, tokenizer_json, tmp / "bundle-w8a8", ExportOptions(
        formats=["onnx"], recipe="w8a8", keep_float="graph:embed_tokens", show_progress=False))
    result = validate(tmp / "bundle-w8a8", checkpoint, Thresholds(),
                      # 100 images: with a few, one borderline image flipping its detector verdict fails the 1-point bar.
                      Settings(samples=2, vqa=12, captions=6, generation=100), show=False)
    write_report(result.report, tmp / "validate-w8a8")
    graphs = {r["graph"]: min((m["psnr_db"] for m in r["metrics"].values() if isinstance(m, dict) and "psnr_db" in m),
                              default=None) for r in result.report["graphs"] if r["recipe"] == "w8a8"}
    decoder = next(r for r in result.report["graphs"] if r["graph"] == "decoder")
    failed = [f"{graph}: {c['name']} {c['value']:.3g} (bar {c['bar']:g})" for graph, _, c in failed_checks(result.report)]
    return {"passed": result.passed, "report": "validate-w8a8/report.md", "min_psnr_db": graphs,
            "decoder_top1": decoder["metrics"]["teacher_forcing"]["decisive_top1_agreement"], "failed_checks": failed}


def quick_bench(tmp: Path) -> dict:
    """The fp32 bundle on eager PyTorch, ONNX Runtime and ExecuTorch: 3 runs each (a smoke run of
    `manzano-edge bench`; docs/bench-small/ holds the real measurement)."""
    from manzano_edge.bench.report import MD_FILE
    from manzano_edge.bench.run import BenchOptions, run_bench

    report = run_bench([str(tmp / "bundle")], tmp / "bench", BenchOptions(
        backends=["torch", "ort", "executorch"], runs=3, warmup=1, decode_tokens=16, flow_steps=10,
        quick_roofline=True, log=False))
    rows = {r["backend"]: r for r in report["results"] if r["status"] == "ok"}
    return {"report": f"bench/{MD_FILE}",
            "decode_tok_s": {b: r["decoder"]["decode_tok_s"] for b, r in rows.items()},
            "text_to_image_ms": {b: r["e2e"]["text_to_image_ms"]["median_ms"] for b, r in rows.items()}}


def print_summary(summary: dict, out: Path) -> None:
    from manzano_edge.validate.report import format_value  # the report's number formatting, "n/a" for None

    c, v, g, q = summary["caption"], summary["vqa"], summary["generate"], summary["quick_eval"]
    print(f"caption   truth: {c['truth']}\n          model: {c['output']}")
    print(f"vqa       {v['question']} -> {v['output']} (truth: {v['truth']})")
    print(f"generate  '{g['prompt']}' -> {out / g['image']} ({'passed' if g['passed'] else 'failed'} ShapesEval)")
    print(f"quick eval on {q['samples']} held-out scenes: VQA {q['vqa_accuracy']:.2f}, caption {q['caption_accuracy']:.2f}, "
          f"ShapesEval {q['shapes_eval']:.2f}, reconstruction ShapesEval {q['reconstruction_shapes_eval']:.2f}, "
          f"captions of PIL drawings {q['drawings_caption_accuracy']:.2f}")
    if "export" in summary:
        ex = summary["export"]
        counts = {st: sum(v["status"] == st for v in ex.values()) for st in ("verified", "emulated", "lowered, not run")}
        dbs = [v["psnr_db"] for v in ex.values() if v["psnr_db"] is not None and v["status"] == "verified"]
        print(f"export    {len(ex)} graph x format files: {counts['verified']} verified by running them "
              f"(worst {min(dbs):.1f} dB), {counts['emulated']} emulated (Core ML off macOS), "
              f"{counts['lowered, not run']} lowered, not run (Core ML delegate) -> {out / 'bundle'}")
        v = summary["validate_w8a8"]
        worst = min((db for db in v["min_psnr_db"].values() if db is not None), default=float("nan"))
        print(f"int8      ONNX w8a8 vs float: {'PASSED' if v['passed'] else 'FAILED'} (worst graph {worst:.1f} dB, "
              f"decoder top-1 {format_value(v['decoder_top1'], 3)}) -> {out / v['report']}")  # n/a: never decisive
        for check in v["failed_checks"]:
            print(f"          failed {check}")
        b = summary["bench"]
        tok = ", ".join(f"{k} {v:.0f}" if v else f"{k} n/a" for k, v in b["decode_tok_s"].items())
        t2i = ", ".join(f"{k} {v:.0f} ms" for k, v in b["text_to_image_ms"].items())
        print(f"bench     decode tok/s: {tok}; text-to-image: {t2i} (3 runs; -> {out / b['report']})")
    print(f"wrote {out} in {summary['seconds']} s")

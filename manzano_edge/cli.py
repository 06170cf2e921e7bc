"""`manzano-edge` command line. Every user error prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from manzano_edge.errors import UserError


def _write_atomic(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"output directory {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pipeline(checkpoint: str | None, bundle: str | None = None, backend: str = "torch"):
    """Eager PyTorch on a checkpoint (`--backend torch`), or a bundle's graphs on ort/executorch/coreml."""
    from manzano_edge.data.text import TextCodec
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.runtime.pipeline import Pipeline

    if backend != "torch":
        from manzano_edge.runtime.bundle import Bundle, BundleGraphs

        if not bundle:
            raise UserError(f"--backend {backend} runs an exported bundle; pass --bundle DIR (see `manzano-edge export`)")
        b = Bundle(bundle)
        return Pipeline(BundleGraphs(b, backend), b.cfg, TextCodec(b.tokenizer_json, b.cfg.text))
    model, tokenizer_json = load_checkpoint(checkpoint)
    return Pipeline(TorchGraphs(model), model.cfg, TextCodec(tokenizer_json, model.cfg.text))


def _sampling(args):
    from manzano_edge.runtime.pipeline import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          token_guidance=args.token_guidance, flow_steps=args.steps, flow_guidance=args.guidance)


def cmd_train(args) -> None:
    from manzano_edge.train.loop import STAGES, TrainConfig, train

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    tcfg = TrainConfig(preset=args.preset, seed=args.seed, precision=args.precision)
    if args.steps_scale != 1.0:
        tcfg = tcfg.scaled(args.steps_scale)
    final = train(args.output, tcfg, data_dir=args.data_dir, captions=args.captions, stages=stages)
    print(f"checkpoint: {final}")


def cmd_qat(args) -> None:
    from manzano_edge.quant.qat import QATRunConfig, qat

    qcfg = QATRunConfig(recipe=args.recipe, seed=args.seed,
                        graphs=tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
                        keep_float=tuple(k.strip() for k in (args.keep_float or "").split(",") if k.strip()))
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        qcfg = qcfg.scaled(args.steps)
    if args.lr is not None:
        if not args.lr > 0:
            raise UserError(f"--lr must be positive, got {args.lr}")
        qcfg.stages = {k: dataclasses.replace(v, lr=args.lr) for k, v in qcfg.stages.items()}
    final = qat(args.checkpoint, args.output, qcfg.validate())
    print(f"checkpoint: {final}  (export it with: manzano-edge export {final} --recipe {args.recipe} -o BUNDLE)")


def cmd_sensitivity(args) -> None:
    from manzano_edge.data.text import TextCodec
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.quant.overrides import LAYERED_GRAPHS
    from manzano_edge.quant.sensitivity import Target, sensitivity, write_report

    model, tok = load_checkpoint(args.checkpoint)
    graphs = [g.strip() for g in (args.graphs or ",".join(LAYERED_GRAPHS)).split(",") if g.strip()]
    target = Target(psnr_db=args.target_psnr if args.target_psnr is not None else
                    (35.0 if args.recipe == "w8a8" else 20.0), top1=args.target_top1)
    report = sensitivity(model, TextCodec(tok, model.cfg.text), args.recipe, graphs, samples=args.samples,
                         granularity=args.granularity, target=target, source=args.checkpoint or "embedded default",
                         show=not args.quiet)
    write_report(report, args.output, overwrite=args.overwrite)
    for g in report["graphs"]:
        p = g["proposal"]
        print(f"{g['graph']:>14}: all quantized {g['all_quantized']['psnr_db']:.1f} dB -> keep "
              f"{len(p['keep_float'])} float -> {p['after']['psnr_db']:.1f} dB "
              f"({'meets' if p['meets_target'] else 'MISSES'} target)")
    print(f"--keep-float {report['keep_float'] or '(none needed)'}; wrote {args.output}/report.json, report.md")


def cmd_eval(args) -> None:
    from manzano_edge.eval.evaluate import EvalConfig, evaluate

    pipe = _pipeline(args.checkpoint)
    report = evaluate(pipe, EvalConfig(vqa=args.vqa, captions=args.captions, generation=args.generation,
                                       reconstruction=args.reconstruction, drawings=args.drawings, seed=args.seed,
                                       sampling=_sampling(args)))
    u, g, r, d = report["understanding"], report["generation"], report["reconstruction"], report["drawings"]
    rows = [("VQA accuracy", u["vqa_accuracy"], args.vqa), ("caption accuracy", u["caption_accuracy"], args.captions),
            ("understanding (VQA+caption)", u["understanding_accuracy"], args.vqa + args.captions),
            ("ShapesEval (text-to-image)", g["shapes_eval"], args.generation),
            ("ShapesEval (reconstruction)", r["shapes_eval"], args.reconstruction),
            ("reconstruction PSNR dB", r["pixel_psnr_db"], args.reconstruction),
            ("ShapesEval (VAE round trip)", (r["vae_round_trip"] or {}).get("shapes_eval"),
             args.reconstruction if r["vae_round_trip"] else 0),
            ("caption accuracy (PIL drawings)", d["caption_accuracy"], args.drawings)]
    for name, value, samples in rows:
        print(f"{name:<30} {value:8.3f}" if samples else f"{name:<30} {'not run':>8}")
    if args.json:
        _write_atomic(Path(args.json), lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
        print(f"wrote {args.json}")
    if args.grid:
        from manzano_edge.eval.evaluate import sample_grid

        _write_atomic(Path(args.grid), lambda p: sample_grid(pipe, p, seed=args.seed, sampling=_sampling(args)))
        print(f"wrote {args.grid}")


def cmd_probe_codes(args) -> None:
    from manzano_edge.eval.code_probe import code_probe
    from manzano_edge.models.manzano import load_checkpoint

    if args.controlled < 1 or args.train < 10 or args.test < 10:
        raise UserError("probe-codes needs --controlled >= 1, --train >= 10 and --test >= 10 scenes")
    model, _ = load_checkpoint(args.checkpoint)
    report = code_probe(model, args.controlled, args.train, args.test, args.seed)
    c, p, u = report["controlled"], report["probe"], report["understanding_probe"]
    print(f"FSQ levels {report['fsq_levels']}, {c['tokens']} tokens per image")
    print(f"controlled: two shapes share all ids in {c['scenes_with_two_shapes_on_identical_ids']}/{c['scenes']} "
          f"scenes; {c['mean_differing_tokens_per_shape_pair']:.2f} tokens differ per shape pair")
    print(f"shape probe on the codes: held-out accuracy {p['test_accuracy']:.3f} (train {p['train_accuracy']:.3f}, "
          f"chance {p['chance']:.3f})")
    print(f"shape probe on the understanding tokens (trained on loose scenes): held-out loose scenes "
          f"{u['loose_test_accuracy']:.3f}, canonical scenes {u['canonical_test_accuracy']:.3f}, "
          f"a user's drawings {u['drawings_accuracy']:.3f} (train {u['train_accuracy']:.3f})")
    if args.json:
        _write_atomic(Path(args.json), lambda f: Path(f).write_text(json.dumps(report, indent=2) + "\n"))
        print(f"wrote {args.json}")


def cmd_caption(args) -> None:
    from manzano_edge.data.images import load_image

    image = load_image(args.image)
    pipe = _pipeline(args.checkpoint, args.bundle, args.backend)
    print(pipe.understand(image, args.prompt, max_new_tokens=args.max_new_tokens))


def cmd_generate(args) -> None:
    from tqdm import tqdm

    from manzano_edge.data.images import to_image

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"output {out} must end in .png or .jpg")
    pipe = _pipeline(args.checkpoint, args.bundle, args.backend)
    pipe.generation_prompt_ids(args.prompt)  # fail on a bad prompt before any progress output
    s = _sampling(args)
    n = pipe.cfg.vision.num_image_tokens
    with tqdm(total=n + s.flow_steps, desc="generate", disable=args.quiet) as bar:
        ids = pipe.generate_ids(args.prompt, s, args.seed, progress=lambda i: bar.update(1))
        image = to_image(pipe.render_ids(ids, s, args.seed, progress=lambda i: bar.update(1)))
    _write_atomic(out, image.save)
    print(f"wrote {out}")


def cmd_import_llama(args) -> None:
    from manzano_edge.models.hf_llama import import_llama
    from manzano_edge.models.manzano import save_checkpoint

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite or choose another")
    model, tokenizer_json = import_llama(args.directory, base_preset=args.preset, seed=args.seed)
    save_checkpoint(model, out, tokenizer_json)
    print(f"wrote {out} (decoder from {args.directory}, vocab {model.cfg.vocab_size}); "
          f"train the vision/diffusion parts with: manzano-edge train -o RUN --preset {args.preset}")


def cmd_export(args) -> None:
    from manzano_edge.export.bundle import ExportOptions, export_bundle, print_summary
    from manzano_edge.quant.recipes import FORMATS, RECIPES, parse_list

    opts = ExportOptions(formats=parse_list(args.format, FORMATS, "format"), recipe=args.recipe,
                         graphs=args.graphs.split(",") if args.graphs else None,
                         coreml_precision=args.coreml_precision, overwrite=args.overwrite,
                         show_progress=not args.quiet, parity=not args.no_parity, keep_float=args.keep_float,
                         calibration_samples=args.calibration_samples, calibration_file=args.calibration,
                         w8a8_mode=_w8a8_modes(args), bundled_io=args.bundled_io,
                         executorch_kv_cache=args.executorch_kv_cache,
                         executorch_coreml=not args.no_executorch_coreml)
    if args.recipe not in RECIPES:
        raise UserError(f"unknown recipe '{args.recipe}'; choose from {', '.join(RECIPES)}")
    model, tokenizer_json = _load_for_export(args)
    manifest = export_bundle(model, tokenizer_json, args.output, opts)
    print_summary(manifest)
    print(f"wrote {args.output}")


def _w8a8_modes(args) -> dict[str, str]:
    from manzano_edge.quant.recipes import DEFAULT_W8A8_MODE, check_mode

    modes = dict(DEFAULT_W8A8_MODE)
    if args.onnx_w8a8:
        modes["onnx"] = check_mode("onnx", args.onnx_w8a8)
    if args.xnnpack_w8a8:
        modes["executorch"] = check_mode("executorch", args.xnnpack_w8a8)
    return modes


def cmd_validate(args) -> None:
    from manzano_edge.quant.recipes import FORMATS, parse_list
    from manzano_edge.validate.core import Settings, Thresholds, validate
    from manzano_edge.validate.report import write_report

    th = Thresholds.parse(args.thresholds)
    st = Settings(samples=args.samples, greedy_tokens=args.greedy_tokens, vqa=args.vqa, captions=args.captions,
                  generation=args.generation, flow_steps=args.steps, token_guidance=args.token_guidance,
                  flow_guidance=args.guidance, seed=args.seed,
                  formats=parse_list(args.format, FORMATS, "format") if args.format else None,
                  end_to_end=not args.no_end_to_end)
    if min(st.samples, st.greedy_tokens, st.vqa + st.captions, st.generation) < 1 and st.end_to_end:
        raise UserError("--samples, --greedy-tokens, --generation and --vqa + --captions must be at least 1")
    result = validate(args.bundle, args.reference, th, st, show=not args.quiet, exported_from=args.exported_from)
    write_report(result.report, args.output, overwrite=args.overwrite)
    print(f"validation {'PASSED' if result.passed else 'FAILED'}; wrote {args.output}/report.json, report.md")
    if not result.passed:
        raise ThresholdFailed("a validation threshold failed; see report.md")


class ThresholdFailed(UserError):
    exit_code = 1


def _load_for_export(args):
    """A checkpoint, the embedded default, or (--preset) a randomly initialised preset for
    export/latency work on shapes that have no trained weights."""
    import torch

    from manzano_edge.config import preset
    from manzano_edge.models.manzano import EMBEDDED_DEFAULT, TOKENIZER_FILE, Manzano, load_checkpoint

    if args.preset:
        if args.checkpoint:
            raise UserError("pass either a CHECKPOINT or --preset (random weights), not both")
        torch.manual_seed(args.seed)
        return Manzano(preset(args.preset)).eval(), (EMBEDDED_DEFAULT / TOKENIZER_FILE).read_text()
    return load_checkpoint(args.checkpoint)


def cmd_bench(args) -> None:
    from manzano_edge.bench.report import MD_FILE
    from manzano_edge.bench.run import BenchOptions, parse_threads, run_bench
    from manzano_edge.quant.recipes import parse_list

    default, per = parse_threads(args.threads)
    opts = BenchOptions(backends=parse_list(args.backends, ("torch", "ort", "executorch", "coreml"), "backend"),
                        runs=args.runs, warmup=args.warmup, threads=per, decode_tokens=args.decode_tokens,
                        flow_steps=args.flow_steps, flow_guidance=args.guidance, token_guidance=args.token_guidance,
                        reference=args.reference, seed=args.seed,
                        overwrite=args.overwrite, log=not args.quiet)
    if default:
        opts.default_threads = default
    report = run_bench(args.bundles, args.output, opts)
    if not args.quiet:
        print((Path(args.output) / MD_FILE).read_text())
    bad = [r["label"] for r in report["results"] if r["status"] == "error"]
    print(f"wrote {args.output}" + (f" ({len(bad)} backend(s) failed: {', '.join(bad)})" if bad else ""))


def cmd_profile(args) -> None:
    from manzano_edge.bench.profile import markdown, profile, write

    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    report = profile(args.bundle, graphs, runs=args.runs, threads=args.threads, position=args.position,
                     etdumps=args.etdump, device=args.device)
    write(report, args.output, overwrite=args.overwrite)
    print(markdown(report, top=6))
    print(f"wrote {args.output}/profile.json, profile.md")


def cmd_demo(args) -> None:
    from manzano_edge.data.text import TextCodec
    from manzano_edge.demo import print_summary, run_demo
    from manzano_edge.models.manzano import load_checkpoint
    from manzano_edge.runtime.graphs import TorchGraphs
    from manzano_edge.runtime.pipeline import Pipeline

    out = Path(args.output)
    model, tok = load_checkpoint(args.checkpoint)
    pipe = Pipeline(TorchGraphs(model), model.cfg, TextCodec(tok, model.cfg.text))
    summary = run_demo(pipe, out, overwrite=args.overwrite, eval_size=args.eval_size,
                       export=None if args.no_export else (model, tok), checkpoint=args.checkpoint)
    print_summary(summary, out)


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--token-guidance", type=float, default=1.0, help="CFG scale for image tokens (1 = off)")
    p.add_argument("--steps", type=int, default=20, help="flow-matching steps")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale for the DiT (1 = off)")


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="an exported bundle directory (for --backend ort|executorch|coreml)")
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "executorch", "coreml"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manzano-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) every stage of a preset")
    p.add_argument("-o", "--output", default="runs/tiny", help="run directory (resumes if it exists)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    p.add_argument("--precision", default="bf16-mixed",
                   help="bf16-mixed (CPU bf16 autocast, fp32 weights; default) | fp32 (for CPUs without native bf16)")
    p.add_argument("--stages", help="comma-separated subset of tokenizer,decoder,binding,vae,dit (in that order)")
    p.add_argument("--data-dir", help="folder of your images (with --captions)")
    p.add_argument("--captions", help="JSONL: {\"image\": \"a.png\", \"caption\": \"...\"} per line")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning (distillation from the float model) for a recipe")
    p.add_argument("checkpoint", nargs="?", help="float checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--recipe", required=True, help="w8a8 | w4")
    p.add_argument("-o", "--output", required=True, help="run directory (resumes if it exists); writes OUTPUT/checkpoint")
    p.add_argument("--graphs", default="tokenizer,decoder,dit", help="comma-separated subset of tokenizer,decoder,dit")
    p.add_argument("--steps", type=int, help="steps per graph (default: tokenizer 150, decoder 200, dit 200)")
    p.add_argument("--lr", type=float, help="peak learning rate for every graph (default: w8a8 2e-6, w4 5e-5)")
    p.add_argument("--keep-float", help="Linear layers to leave unquantized, as for export (e.g. lm_head,layers.0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_qat)

    p = sub.add_parser("sensitivity", help="rank layers by the accuracy a recipe costs; propose --keep-float")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--recipe", required=True, help="w8a8 | w4")
    p.add_argument("-o", "--output", required=True, help="report directory: report.json, report.md, sensitivity.png")
    p.add_argument("--graphs", help="comma-separated subset of tokenizer,decoder,code_features,dit")
    p.add_argument("--granularity", default="layer", help="layer (each Linear) | block (layers.N / blocks.N)")
    p.add_argument("--samples", type=int, default=4, help="validation samples per graph")
    p.add_argument("--target-psnr", type=float, help="dB per graph output (default 35 for w8a8, 20 for w4)")
    p.add_argument("--target-top1", type=float, default=0.99,
                   help="decoder top-1 agreement where float decides by >= 0.3 nats (validate's gate)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("profile", help="ExecuTorch op breakdown from ETDump, here or from a device's ETDump files")
    p.add_argument("bundle")
    p.add_argument("-o", "--output", required=True, help="report directory: profile.json, profile.md")
    p.add_argument("--graphs", help="comma-separated graphs to run here (default: every ExecuTorch graph)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, help="XNNPACK threads (default: ExecuTorch's)")
    p.add_argument("--position", type=int, default=32, help="decoder: KV-cache length of the profiled decode step")
    p.add_argument("--etdump", action="append", help="import a device run instead: GRAPH=FILE.etdp (repeatable)")
    p.add_argument("--device", help="device name for imported ETDumps (e.g. 'Pixel 8, XNNPACK 4 threads')")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("probe-codes", help="how much shape the image codes and understanding tokens carry (single-object scenes)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--controlled", type=int, default=200, help="scenes rendered once per shape")
    p.add_argument("--train", type=int, default=4000, help="scenes the MLP probe trains on")
    p.add_argument("--test", type=int, default=800, help="held-out scenes it is scored on")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_probe_codes)

    p = sub.add_parser("eval", help="caption/VQA accuracy and ShapesEval on held-out scenes")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--grid", help="also write a PNG grid of held-out prompts and generated images")
    p.add_argument("--vqa", type=int, default=400)
    p.add_argument("--captions", type=int, default=200)
    p.add_argument("--generation", type=int, default=150)
    p.add_argument("--reconstruction", type=int, default=150)
    p.add_argument("--drawings", type=int, default=100,
                   help="captions of shapes drawn with PIL on canvases of any size (a user's own pictures)")
    p.add_argument("--seed", type=int, default=0)
    _add_sampling(p, temperature=0.0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="answer a prompt about an image")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="describe the image.")
    p.add_argument("--checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=48)
    _add_backend(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("generate", help="text-to-image")
    p.add_argument("--prompt", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint")
    p.add_argument("--quiet", action="store_true")
    _add_sampling(p, temperature=0.0)
    _add_backend(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export graphs to Core ML / ONNX / ExecuTorch as one verified bundle")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--format", default="coreml,onnx,executorch", help="comma-separated: coreml,onnx,executorch")
    p.add_argument("--recipe", default="fp32", help="fp32|fp16|w8|w8a8|w4|palette4")
    p.add_argument("--graphs", help="comma-separated graphs, or 'all' (default: every graph but the optional "
                                    "decoder_cfg, the batch-of-2 decoder that --token-guidance needs)")
    p.add_argument("--coreml-precision", default="fp16", help="Core ML compute precision for float recipes")
    p.add_argument("--preset", help="export a randomly initialised preset instead of a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the numeric parity check (structure only); for random-weight paper-sized presets")
    p.add_argument("--bundled-io", action="store_true",
                   help="also write ExecuTorch bundled programs (.bpte: inputs + expected outputs) for on-device runners")
    p.add_argument("--keep-float", help="quantized recipes: keep layers/graphs float, e.g. lm_head,graph:vae_decoder")
    p.add_argument("--calibration-samples", type=int, default=8, help="generated calibration samples (static w8a8)")
    p.add_argument("--calibration", help="safetensors file of <graph>.<sample>.<input> calibration tensors")
    p.add_argument("--onnx-w8a8", help="ONNX w8a8 activations: dynamic (default) | static (QDQ, calibrated)")
    p.add_argument("--xnnpack-w8a8", help="ExecuTorch w8a8 activations: dynamic (default) | static (calibrated)")
    p.add_argument("--executorch-kv-cache", default="llm-ops",
                   help="ExecuTorch decoder cache: llm-ops (default; llama::update_cache + custom_sdpa, the device "
                        "runner must link ExecuTorch's custom_ops) | slice (core kernels only, slower)")
    p.add_argument("--no-executorch-coreml", action="store_true",
                   help="write only the XNNPACK .pte, not the Core ML-delegate one (lowering the paper-sized DiT "
                        "through CoreMLBackend after the other graphs ran out of 24 GB of RAM)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="accuracy of a bundle vs its float reference, per graph and end to end")
    p.add_argument("bundle")
    p.add_argument("--reference", help="float checkpoint the bundle came from (default: the embedded tiny model)")
    p.add_argument("--exported-from", help="checkpoint the bundle was exported from, if not --reference (a QAT run's "
                                           "checkpoint): Core ML w8a8 emulation rebuilds its activation scales from it")
    p.add_argument("-o", "--output", required=True, help="report directory: report.json, report.md, plots")
    p.add_argument("--thresholds", help="e.g. psnr_db=35,top1=0.99,top1_tie_nats=0.3,e2e_drop_w8a8=1,e2e_drop_w4=3,psnr_db_w4=20 "
                   "(top1 is judged where float's top token leads by >= top1_tie_nats; 0 judges every position)")
    p.add_argument("--format", help="comma-separated subset of the bundle's formats")
    p.add_argument("--samples", type=int, default=4, help="validation samples per graph")
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--vqa", type=int, default=24)
    p.add_argument("--captions", type=int, default=12)
    p.add_argument("--generation", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="flow-matching steps in end-to-end generation")
    p.add_argument("--token-guidance", type=float, default=1.0,
                   help="image-token CFG in end-to-end generation (1 = off; else the bundle needs decoder_cfg)")
    p.add_argument("--guidance", type=float, default=1.0, help="DiT CFG in end-to-end generation (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-end-to-end", action="store_true", help="per-graph metrics only")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("demo", help="the main job on the embedded model: caption, generate, evaluate")
    p.add_argument("-o", "--output", default="out/demo")
    p.add_argument("--checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval-size", type=int, default=40)
    p.add_argument("--no-export", action="store_true", help="skip the export to Core ML / ONNX / ExecuTorch")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import-llama", help="use a local Hugging Face Llama checkpoint as the decoder backbone")
    p.add_argument("directory")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--preset", default="tiny", help="preset for the vision and diffusion parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_llama)
    p = sub.add_parser("bench", help="latency, throughput, memory and roofline of bundles vs eager PyTorch")
    p.add_argument("bundles", nargs="+", help="bundle directories (one per recipe) written by `manzano-edge export`")
    p.add_argument("-o", "--output", required=True, help="report directory: bench.json, bench.md, plots")
    p.add_argument("--backends", default="torch,ort,executorch,coreml",
                   help="comma-separated: torch (eager fp32 baseline), ort, executorch, coreml (macOS)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median and p90)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs before each measurement")
    p.add_argument("--threads", help="N for every backend, or per backend: torch=2,ort=2,executorch=2 "
                                     "(default: all logical CPUs)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens decoded after the caption prefill")
    p.add_argument("--flow-steps", type=int, default=20, help="flow-matching steps in the text-to-image run")
    p.add_argument("--guidance", type=float, default=2.0, help="DiT CFG scale in the text-to-image run (1 = off)")
    p.add_argument("--token-guidance", type=float, default=1.0,
                   help="image-token CFG scale in the text-to-image run (1 = off); other values decode both rows as "
                        "one batch-of-2 step of the bundle's decoder_cfg graph (export --graphs all)")
    p.add_argument("--reference", help="checkpoint the bundles were exported from (eager fp32 baseline); default: the "
                                       "embedded model, or the preset re-created with --seed")
    p.add_argument("--seed", type=int, default=0, help="the --seed `export --preset` used")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"manzano-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("manzano-edge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

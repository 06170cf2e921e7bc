"""Measure one (bundle, backend[, Core ML compute unit]) in its own process, so load time and
peak RSS belong to that backend alone. Run by `run.py` as
`python -m manzano_edge.bench.worker JOB.json RESULT.json`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from manzano_edge.bench.measure import current_rss_mb, peak_rss_mb, summarize, time_fn
from manzano_edge.bench.reference import load_reference
from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.runtime.backends import GraphProgram, get_backend
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.runtime.bundle import Bundle, BundleGraphs
from manzano_edge.runtime.graphs import GraphRunner, TorchGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig
from manzano_edge.spec.decoding import causal_mask, decode
from manzano_edge.spec.graphs import GraphKind, GraphSpec
from manzano_edge.spec.modules import build_module

EXAMPLES_SEP = "."


# -- examples shared by every worker (written once by run.py from spec.examples.real_examples) ----
def save_examples(per_graph: dict[str, list[dict[str, torch.Tensor]]], path: Path) -> None:
    from safetensors.torch import save_file

    flat = {EXAMPLES_SEP.join((g, str(i), k)): v.contiguous() for g, steps in per_graph.items()
            for i, step in enumerate(steps) for k, v in step.items()}
    save_file(flat, str(path))


def load_examples(path: Path) -> dict[str, list[dict[str, torch.Tensor]]]:
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in load_file(str(path)).items():
        g, i, name = key.split(EXAMPLES_SEP, 2)
        out.setdefault(g, {}).setdefault(int(i), {})[name] = value
    return {g: [steps[i] for i in sorted(steps)] for g, steps in out.items()}


def load_backend(job: dict, bundle: Bundle) -> tuple[GraphRunner, dict[str, GraphProgram], dict[str, float]]:
    load_s: dict[str, float] = {}
    if job["backend"] == "torch":
        t0 = time.perf_counter()
        model, _ = load_reference(job["reference"], bundle.tokenizer_json)
        for p in model.parameters():
            p.requires_grad_(False)
        load_s["checkpoint"] = time.perf_counter() - t0
        programs = {}
        for name, spec in bundle.specs.items():
            t0 = time.perf_counter()
            programs[name] = TorchProgram(spec, build_module(spec, model))
            load_s[name] = time.perf_counter() - t0
        return TorchGraphs(model), programs, load_s
    programs = {}
    for name in bundle.specs:  # includes sha256 verification of the file, as an app would do it once
        t0 = time.perf_counter()
        programs[name] = bundle.program(name, job["backend"], job["threads"], job.get("compute_units") or "ALL")
        load_s[name] = time.perf_counter() - t0
    return BundleGraphs.from_programs(bundle, programs), programs, load_s


# -- per-graph latency ---------------------------------------------------------------------------
def graph_latency(specs: dict[str, GraphSpec], programs: dict[str, GraphProgram], examples: dict,
                  warmup: int, runs: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, prog in programs.items():
        ex = examples[name]
        if specs[name].states:  # decoder: prefill from an empty cache, then one decode step
            prefill, step = ex[0], ex[1]
            t = prefill["inputs_embeds"].shape[1]
            out[f"{name}[prefill T={t}]"] = time_fn(lambda p=prog, x=prefill: p.run(x), warmup, runs, setup=prog.reset)
            prog.reset()
            prog.run(prefill)
            # the same decode step re-writes the same cache slot: identical work each run
            out[f"{name}[decode E={step['causal_mask'].shape[-1]}]"] = time_fn(lambda p=prog, x=step: p.run(x), warmup, runs)
        elif specs[name].kind == GraphKind.DENOISER_STEP:  # the CFG batch of 2 and the unguided batch of 1
            for x in ex:
                out[f"dit[batch={x['latent'].shape[0]}]"] = time_fn(lambda p=prog, x=x: p.run(x), warmup, runs)
        else:
            out[name] = time_fn(lambda p=prog, x=ex[0]: p.run(x), warmup, runs)
    return out


# -- decoder throughput --------------------------------------------------------------------------
def decode_once(g: GraphRunner, pipe: Pipeline, pixels: torch.Tensor, question: str, n: int) -> dict:
    """Greedy decode of exactly n tokens (no EOS stop: random weights must still produce n)."""
    t0 = time.perf_counter()
    embeds = pipe.understanding_embeds(pixels, question)
    g.decoder_reset(1)
    t1 = time.perf_counter()
    logits = g.decoder_step(embeds, causal_mask(0, embeds.shape[1]))[:, -1]
    logits.argmax(-1)  # the first token ends the time to first token
    t2 = time.perf_counter()
    tokens = decode(g.decoder_step, g.embed_tokens, logits, embeds.shape[1], n + 1)
    t3 = time.perf_counter()
    return {"ttft": t2 - t0, "prefill": t2 - t1, "decode": t3 - t2, "prompt_tokens": embeds.shape[1], "tokens": tokens}


def decoder_throughput(g, pipe, pixels, question, n, warmup, runs) -> dict:
    for _ in range(warmup):
        decode_once(g, pipe, pixels, question, n)
    samples = [decode_once(g, pipe, pixels, question, n) for _ in range(max(1, runs))]
    ttft, prefill, decode = (summarize([s[k] for s in samples]) for k in ("ttft", "prefill", "decode"))
    t = samples[0]["prompt_tokens"]
    return {"prompt_tokens": t, "decode_tokens": n, "ttft_ms": ttft, "prefill_ms": prefill, "decode_ms": decode,
            "prefill_tok_s": t / (prefill["median_ms"] / 1e3),
            "decode_tok_s": n / (decode["median_ms"] / 1e3) if n else None, "greedy_tokens": samples[0]["tokens"]}


@torch.no_grad()
def recompute_decode(model, embeds: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Greedy decode of n tokens with no KV cache: every step re-runs the whole sequence (the
    vocabulary projection for the last position only, as the cached graphs do)."""
    dec = model.decoder
    logits = dec(inputs_embeds=embeds, last_only=True)[:, -1]
    token = logits.argmax(-1)
    tokens, seq = [token.item()], embeds
    t0 = time.perf_counter()
    for _ in range(n):
        seq = torch.cat([seq, dec.embed(token[:, None])], dim=1)
        token = dec(inputs_embeds=seq, last_only=True)[:, -1].argmax(-1)
        tokens.append(token.item())
    return time.perf_counter() - t0, tokens


def kv_cache_comparison(g: TorchGraphs, pipe, pixels, question, n, warmup, runs) -> dict:
    """Same process, same threads, same tokens: stateful KV cache vs recomputing everything."""
    embeds = pipe.understanding_embeds(pixels, question)
    cached, recompute, same = [], [], True
    for i in range(warmup + max(1, runs)):
        c = decode_once(g, pipe, pixels, question, n)
        r, r_tokens = recompute_decode(g.model, embeds, n)
        same = same and c["tokens"] == r_tokens
        if i >= warmup:
            cached.append(c["decode"])
            recompute.append(r)
    c_stat, r_stat = summarize(cached), summarize(recompute)
    return {"decode_tokens": n, "prompt_tokens": embeds.shape[1], "kv_cache_ms": c_stat, "recompute_ms": r_stat,
            "speedup": r_stat["median_ms"] / c_stat["median_ms"], "same_tokens": same}


# -- diffusion and end to end --------------------------------------------------------------------
def diffusion_rate(g: GraphRunner, examples: dict, warmup: int, runs: int) -> dict:
    out = {}
    for x in examples["dit"]:
        b = x["latent"].shape[0]
        stat = time_fn(lambda x=x: g.denoise(x["latent"], x["timestep"], x["condition"]), warmup, runs)
        out[f"batch{b}"] = {**stat, "steps_per_s": 1e3 / stat["median_ms"]}
    return out


def end_to_end(pipe: Pipeline, pixels, question, prompt, job: dict, image_out: Path) -> dict:
    warmup, runs = job["warmup"], job["runs"]
    answers: list[str] = []
    cap = time_fn(lambda: answers.append(pipe.understand(pixels, question, max_new_tokens=job["decode_tokens"])),
                  warmup, runs)
    s = SamplingConfig(temperature=0.0, flow_steps=job["flow_steps"], flow_guidance=job["flow_guidance"],
                       token_guidance=job.get("token_guidance", 1.0))
    images: list = []
    t2i = time_fn(lambda: images.append(pipe.generate(prompt, s, seed=0)), warmup, runs)
    images[-1].save(image_out)
    return {"caption_ms": cap, "caption": answers[-1], "caption_tokens": len(pipe.codec.encode(answers[-1])),
            "text_to_image_ms": t2i, "image": image_out.name, "sampling": {"flow_steps": s.flow_steps,
                                                                          "flow_guidance": s.flow_guidance,
                                                                          "token_guidance": s.token_guidance,
                                                                          "temperature": s.temperature}}


def scene_inputs(cfg, seed: int) -> tuple[torch.Tensor, str, str]:
    rng = np.random.default_rng(seed)
    scene, other = scenes.sample_scene(rng), scenes.sample_scene(rng)
    pixels = to_pixels(scenes.render(scene, cfg.vision.image_size), cfg.vision.image_size)
    question = scenes.caption_question(rng)
    return pixels, question, scenes.generation_prompt(other, rng)


def run_job(job: dict) -> dict:
    rss_start = current_rss_mb()
    threads = get_backend(job["backend"]).apply_threads(job["threads"])
    bundle = Bundle(job["bundle"])
    cfg = bundle.cfg
    graphs, programs, load_s = load_backend(job, bundle)
    codec = TextCodec(bundle.tokenizer_json, cfg.text)
    pipe = Pipeline(graphs, cfg, codec)
    examples = load_examples(Path(job["examples"]))
    pixels, question, prompt = scene_inputs(cfg, job.get("scene_seed", 0))
    w, r = job["warmup"], job["runs"]
    n = min(job["decode_tokens"], pipe.max_len - 1 - pipe.understanding_embeds(pixels, question).shape[1])
    result = {"threads": threads, "load_s": load_s, "load_total_s": sum(load_s.values()),
              "latency": graph_latency(bundle.specs, programs, examples, w, r),
              "decoder": decoder_throughput(graphs, pipe, pixels, question, n, w, r),
              "diffusion": diffusion_rate(graphs, examples, w, r),
              "e2e": end_to_end(pipe, pixels, question, prompt, job, Path(job["image_out"])),
              "inputs": {"question": question, "prompt": prompt}}
    if job["backend"] == "torch":
        result["kv_cache"] = kv_cache_comparison(graphs, pipe, pixels, question, n, w, r)
    if get_backend(job["backend"]).compute_units:
        result["compute_plan"] = compute_plans(programs)
    result["memory"] = {"rss_at_start_mb": rss_start, "peak_rss_mb": peak_rss_mb(),
                        "note": "whole worker process (Python + torch + this backend's runtime and graphs)"}
    return result


def compute_plans(programs: dict[str, GraphProgram]) -> dict[str, dict]:
    """Core ML's per-graph compute plan (which ops it puts on the Neural Engine / GPU / CPU for
    this compute unit). MLComputePlan needs macOS 14.4+; older systems record why it is missing."""
    plans: dict[str, dict] = {}
    for name, program in programs.items():
        inner = getattr(program, "program", program)
        try:
            plans[name] = inner.compute_plan()
        except Exception as exc:  # an OS without MLComputePlan raises from the native proxy
            plans[name] = {"unavailable": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return plans


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = {"status": "ok", **run_job(job)}
    except UserError as exc:
        result = {"status": "error", "reason": str(exc)}
    Path(argv[1]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""MatMulNBits accuracy_level 0 vs 4 on one float ONNX decoder: export parity and the median decode
step through OrtProgram (2 threads). Usage: python docs/results/onnx-accuracy-level.py BUNDLE/onnx/decoder.onnx
(a float bundle's reference decoder). Results: docs/results/onnx-accuracy-level.md."""
import sys, time, shutil, tempfile, torch, numpy as np
from pathlib import Path
import onnx
torch.set_num_threads(2)
from manzano_edge.models.manzano import load_checkpoint
from manzano_edge.data.text import TextCodec
from manzano_edge.export.parity import run_parity
from manzano_edge.quant import onnx_ptq
from manzano_edge.runtime.backends.ort import OrtProgram
from manzano_edge.runtime.backends.torch import TorchProgram
from manzano_edge.spec.examples import real_examples
from manzano_edge.spec.graphs import graph_specs
from manzano_edge.spec.modules import build_module
from manzano_edge.spec.decoding import causal_mask
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
src = Path(sys.argv[1])
model, tok = load_checkpoint(None)
spec = graph_specs(model.cfg)["decoder"]
ex = real_examples(model, TextCodec(tok, model.cfg.text)).per_graph["decoder"]
ref = TorchProgram(spec, build_module(spec, model))
def timed(path, n=200):
    p = OrtProgram(spec, path, threads=2)
    w = model.cfg.decoder.hidden_size
    p.run({"inputs_embeds": torch.randn(1, 16, w), "causal_mask": causal_mask(0, 16)})
    ts = []
    for i in range(n):
        x = {"inputs_embeds": torch.randn(1, 1, w), "causal_mask": causal_mask(16 + (i % 100), 1)}
        t = time.perf_counter(); p.run(x); ts.append(time.perf_counter() - t)
        if 16 + (i % 100) >= 110: p.reset(); p.run({"inputs_embeds": torch.randn(1, 16, w), "causal_mask": causal_mask(0, 16)})
    return float(np.median(ts)) * 1e3
print("fp32", "ms/step %.3f" % timed(src))
for bits in (4, 8):
    for level in (0, 4):
        out = Path(f"/tmp/s4/acc_w{bits}_l{level}.onnx")
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=level, op_types_to_quantize=("MatMul",))
        q.process(); q.model.save_model_to_file(str(out), use_external_data_format=False)
        par = run_parity(spec, ref, OrtProgram(spec, out), ex)
        print(f"w{bits} level{level}", "ms/step %.3f" % timed(out), "psnr %.1f min_step %.1f greedy %.2f" % (par["psnr_db"], par["min_step_psnr_db"], par["greedy_match"]), flush=True)

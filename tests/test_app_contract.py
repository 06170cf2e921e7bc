"""The bundle's pipeline contract is complete: `examples/app_loop.py`, which reads only the manifest and
runs the ONNX graphs with numpy + onnxruntime + tokenizers, in a process that cannot import torch or
manzano_edge, captions and draws what `manzano-edge` itself does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.metrics import psnr
from manzano_edge.runtime.bundle import Bundle, BundleGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig
from manzano_edge.spec.contract import allowed_ranges
from manzano_edge.spec.decoding import codes_only_mask, text_only_mask

APP_LOOP = Path(__file__).resolve().parents[1] / "examples" / "app_loop.py"
# Runs the app loop's functions in a process where `import torch` and `import manzano_edge` fail.
DRIVER = """
import json, sys
sys.modules["torch"] = None
sys.modules["manzano_edge"] = None
import importlib.util
spec = importlib.util.spec_from_file_location("app_loop", sys.argv[1])
app_loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app_loop)
import numpy as np
from PIL import Image
job = json.load(open(sys.argv[2]))
app = app_loop.App(app_loop.AppBundle(job["bundle"], threads=2))
out = {"captions": [app.caption(Image.open(p), q) for p, q in job["captions"]], "images": []}
for g in job["generate"]:
    codes = app.image_codes(g["prompt"], g["token_guidance"])
    pixels = app.render(codes, np.load(g["noise"]), g["flow_steps"], g["guidance"])
    np.save(g["out"], pixels)
    out["images"].append({"codes": codes.tolist(), "pixels": g["out"]})
out["modules"] = sorted(m for m in ("torch", "manzano_edge") if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ort_pipe(tiny, bundle):
    model, tok = tiny
    b = Bundle(bundle[0])
    return Pipeline(BundleGraphs(b, "ort"), b.cfg, TextCodec(tok, model.cfg.text))


def run_app_loop(job: dict, tmp_path: Path) -> dict:
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(APP_LOOP), str(job_file)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_app_loop_without_torch_captions_and_draws_as_manzano_edge(bundle, ort_pipe, tmp_path):
    size = ort_pipe.cfg.vision.image_size
    rng = np.random.default_rng(11)
    captions = []
    for i in range(3):
        scene = scenes.sample_scene(rng)
        path = tmp_path / f"scene{i}.png"
        scenes.render(scene, size).save(path)
        captions.append((str(path), "describe the image." if i == 0 else scenes.question_answer(scene, rng)[0]))
    # A picture nobody generated: PIL-drawn at another size, with alpha (composited on white by the contract).
    from PIL import Image, ImageDraw

    drawn = Image.new("RGBA", (200, 160), (0, 0, 0, 0))
    ImageDraw.Draw(drawn).ellipse((20, 20, 90, 90), fill=(220, 30, 30, 255))
    drawn.save(tmp_path / "drawn.png")
    captions.append((str(tmp_path / "drawn.png"), "what color is the circle?"))

    settings = [("a red circle at the top left", SamplingConfig(temperature=0.0)),
                ("a blue square on the right", SamplingConfig(temperature=0.0, flow_steps=8, flow_guidance=2.0,
                                                                token_guidance=3.0))]
    generate, expected = [], []
    c, h = ort_pipe.cfg.vae.latent_channels, ort_pipe.cfg.latent_size
    for i, (prompt, s) in enumerate(settings):
        # The runtime's noise for this seed (an app draws its own; the contract fixes only its law).
        noise = torch.randn((1, c, h, h), generator=torch.Generator().manual_seed(i))
        np.save(tmp_path / f"noise{i}.npy", noise.numpy())
        generate.append({"prompt": prompt, "noise": str(tmp_path / f"noise{i}.npy"), "flow_steps": s.flow_steps,
                         "guidance": s.flow_guidance, "token_guidance": s.token_guidance,
                         "out": str(tmp_path / f"pixels{i}.npy")})
        ids = ort_pipe.generate_ids(prompt, s)
        expected.append((ids, ort_pipe.render_ids(ids, s, seed=i)))

    got = run_app_loop({"bundle": str(bundle[0]), "captions": captions, "generate": generate}, tmp_path)

    assert got["modules"] == []
    want = [ort_pipe.understand(Image.open(p), q) for p, q in captions]
    assert got["captions"] == want
    for (ids, pixels), image in zip(expected, got["images"]):
        assert image["codes"] == ids.tolist()
        assert psnr(pixels, torch.from_numpy(np.load(image["pixels"]))) >= 40


def test_app_loop_refuses_a_bundle_without_the_contract(bundle, tmp_path):
    broken = tmp_path / "old"
    broken.mkdir()
    manifest = json.loads((bundle[0] / "manifest.json").read_text())
    del manifest["pipeline"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, str(APP_LOOP), str(broken), "caption", "--image", "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"app_loop: error: {broken / 'manifest.json'} has no manzano-edge/pipeline@1 pipeline contract; "
        "re-export the bundle"]


def test_contract_masks_are_the_runtime_masks(bundle):
    b = Bundle(bundle[0])
    contract = b.manifest["pipeline"]
    vocab = contract["vocabulary"]["size"]
    for ranges, mask in ((contract["understanding"]["allowed_ids"], text_only_mask(b.cfg)),
                         (contract["text_to_image"]["allowed_ids"], codes_only_mask(b.cfg))):
        rebuilt = torch.full((vocab,), float("-inf"))
        for lo, hi in ranges:
            rebuilt[lo:hi] = 0
        assert torch.equal(rebuilt, mask)
        assert allowed_ranges(mask) == ranges


def test_hf_preprocessor_config_gives_the_runtime_pixels(bundle):
    """transformers' CLIPImageProcessor, configured by the bundle's preprocessor_config.json alone."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    b = Bundle(bundle[0])
    processor = CLIPImageProcessor.from_pretrained(str(bundle[0]))
    size = b.cfg.vision.image_size
    image = scenes.render(scenes.sample_scene(np.random.default_rng(5)), 200)
    for img in (image.resize((size, size)), image, Image.new("L", (50, 70), 128)):
        ours = to_pixels(img, size)
        theirs = torch.from_numpy(processor(images=img, return_tensors="np")["pixel_values"])
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max() <= 1e-5


def test_contract_files_are_in_the_manifest_and_checked(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert set(manifest["extras"]) == {"null_condition", "generation_config", "preprocessor_config"}
    gen = json.loads((copy / "generation_config.json").read_text())
    assert gen["eos_token_id"] == manifest["pipeline"]["understanding"]["stop_ids"][0]
    (copy / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 7}))
    with pytest.raises(UserError, match="generation_config.json does not match its manifest checksum"):
        Bundle(copy).verify_checksums()

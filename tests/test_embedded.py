"""The trained tiny model that ships in the repo, through the public API and CLI.

The issue-2 targets (caption/VQA >= 90%, ShapesEval >= 0.70, reconstruction ShapesEval >= 0.85)
are met by the current embedded model (docs/eval-tiny.json, v16): VQA 0.940, captions 0.980,
ShapesEval 0.99, reconstruction 0.98. (v15: 0.920 / 0.987 / 0.95 / 0.93; v13: 0.930 / 1.000 /
0.99 / 1.00.) The target tests run on held-out subsets; the floors below them catch a regression
in one attribute before it moves a target. A user's PIL drawings caption at 0.950 over 600
(0.935 on seed 0's 200, 0.958 on seed 1's 400; v15 0.920 / 0.925) against 0.980-1.000 for scenes.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from manzano_edge.cli import main
from manzano_edge.data import scenes
from manzano_edge.data.images import to_pixels
from manzano_edge.data.text import TextCodec
from manzano_edge.errors import UserError
from manzano_edge.eval.evaluate import eval_drawings, eval_generation, eval_reconstruction, eval_understanding
from manzano_edge.eval.shapes_eval import detect
from manzano_edge.models.manzano import EMBEDDED_DEFAULT, WEIGHTS_FILE, load_checkpoint
from manzano_edge.runtime.graphs import TorchGraphs
from manzano_edge.runtime.pipeline import Pipeline, SamplingConfig


@pytest.fixture(scope="module")
def pipe():
    model, tok = load_checkpoint(None)
    return Pipeline(TorchGraphs(model), model.cfg, TextCodec(tok, model.cfg.text))


def test_embedded_checkpoint_is_small_safetensors():
    assert (EMBEDDED_DEFAULT / WEIGHTS_FILE).stat().st_size <= 25 * 2**20


@pytest.fixture(scope="module")
def understanding(pipe):
    return eval_understanding(pipe, n_vqa=80, n_captions=20, seed=1, show=False)


def test_understanding_regression_floor(understanding):
    # Measured on 300 held-out questions / 150 captions (v16): count 1.00, shape 0.98, color 0.89,
    # position 0.89, yes 1.00, no 0.96, captions 0.980 (v15: color 0.92, position 0.80, yes 0.93).
    # This 80/20 subset: color 0.68, position 0.93, shape 1.00, no 1.00, yes 1.00, captions 0.95
    # (v15: color 0.86, position 0.79, yes 0.88, captions 1.00). Colour is v16's one regression:
    # on two-object scenes it names the other object's colour more often (color 0.77 / 0.79 on
    # seeds 1 / 2 against v15's 0.83 / 0.90; README, "What changed in v16"). The floor sits under
    # it to catch a further fall, not to claim v15's level.
    assert understanding["vqa_by_answer_kind"]["color"] >= 0.65, understanding
    assert understanding["vqa_by_answer_kind"]["position"] >= 0.75, understanding
    assert understanding["vqa_by_answer_kind"]["no"] >= 0.5, understanding
    assert understanding["caption_accuracy"] >= 0.9, understanding
    assert understanding["vqa_by_answer_kind"]["count"] >= 0.85, understanding
    assert understanding["vqa_by_answer_kind"]["shape"] >= 0.75, understanding


def test_understanding_meets_the_target(understanding):
    # 300 questions / 150 captions (docs/eval-tiny.json): VQA 0.940, captions 0.980; seeds 1 / 2:
    # 0.903 / 0.910. This 80/20 subset: 0.900 (72 of 80, at the bar) / 0.95. (v15: 0.920 / 0.987,
    # subset 0.9125 / 1.00; v13: 0.930 / 1.000.)
    assert understanding["vqa_accuracy"] >= 0.9 and understanding["caption_accuracy"] >= 0.9


def test_generation_draws_the_requested_colors_where_asked(pipe):
    # Regression floor: on 100 held-out prompts (v16) ShapesEval 0.99 with position 1.00, color
    # 1.00, shape 0.99 (v15: 0.95, shape 0.97; v13: 0.99); these 12: 1.00.
    summary = eval_generation(pipe, 12, seed=1, sampling=SamplingConfig(temperature=0), show=False)
    assert summary["position"] >= 0.9 and summary["color"] >= 0.9 and summary["shape"] >= 0.85, summary
    assert summary["shapes_eval"] >= 0.75, summary


def test_generation_on_held_out_prompts(pipe):
    # These 20: 0.95 (v16; v15 to v12: 1.00); 100 prompts: 0.99 (v15: 0.95, v13: 0.99).
    summary = eval_generation(pipe, 20, seed=1, sampling=SamplingConfig(temperature=0), show=False)
    assert summary["shapes_eval"] >= 0.7, summary


@pytest.fixture(scope="module")
def reconstruction(pipe):
    return eval_reconstruction(pipe, 20, seed=1, sampling=None, show=False)


def test_reconstruction_through_the_codes_regression_floor(reconstruction):
    # Image -> ids -> code features -> DiT -> VAE. 100 scenes (v16): 0.98, shape 0.99, 23.2 dB
    # (v15: 0.93, 23.0 dB; v13: 1.00, 21.6 dB); these 20: 0.95, 22.5 dB (v15: 1.00, 22.2 dB).
    assert reconstruction["position"] >= 0.9 and reconstruction["shape"] >= 0.85, reconstruction
    assert reconstruction["color"] >= 0.95 and reconstruction["pixel_psnr_db"] >= 20, reconstruction


def test_the_vae_alone_keeps_every_attribute(reconstruction):
    # The ceiling of reconstruction and text-to-image: v11's VAE (600 steps) decoded purple as
    # blue and scored 0.78 on 100 scenes, capping both paths; v12's to v14's (1800 steps) and v15's
    # and v16's (1200) score 1.00.
    assert reconstruction["vae_round_trip"]["shapes_eval"] >= 0.95, reconstruction["vae_round_trip"]


def test_reconstruction_meets_the_target(reconstruction):
    assert reconstruction["shapes_eval"] >= 0.85, reconstruction


def users_drawing() -> Image.Image:
    img = Image.new("RGB", (300, 200), "white")  # not square, not the model size, plain background
    ImageDraw.Draw(img).ellipse([30, 20, 80, 70], fill=(215, 35, 35))
    return img


def test_a_users_own_drawing_color(pipe):
    # A 300x200 PIL drawing (not a rendered scene, not the model size) with the training phrasing.
    assert "red" in pipe.understand(users_drawing(), "what color is the circle?")


def test_a_users_own_wording_color(pipe):
    # British spelling and a "have" question: the v4 model answered 'left'. These wordings are in
    # the training templates since v5, so this checks the drawing more than unseen wording.
    assert "red" in pipe.understand(users_drawing(), "Which colour does the circle have?")


def test_a_users_own_drawing_caption(pipe):
    # Squeezed from 300x200 to the model's square input, the circle becomes an upright ellipse:
    # v7 and v10 called it a triangle; v6 and v11-v16 a circle (run s13d, not shipped: a square).
    caption = pipe.understand(users_drawing(), "Tell me what is in this image")
    assert [(o.shape, o.color, o.position) for o in scenes.parse_objects(caption)] == [("circle", "red", "top left")]


@pytest.fixture(scope="module")
def drawings(pipe):
    return eval_drawings(pipe, 40, seed=1, show=False)


def test_users_drawings_caption_as_well_as_scenes(drawings):
    # "As well as generated scenes": scenes caption at 0.980-1.000, so within a few points of that.
    # `eval --drawings` (v16): 0.935 on seed 0's 200, 0.958 on seed 1's 400 (v15: 0.920 / 0.925,
    # a strict xfail here; v13: 0.875, v12: 0.280); these 40: 0.975 (v15: 0.925). The 3000-step
    # stage 1 closed the gap (README, "What changed in v16").
    assert drawings["caption_accuracy"] >= 0.95, drawings


def test_the_committed_report_describes_the_embedded_model(pipe):
    # docs/eval-tiny.json is what the README quotes: its understanding rows must be this model's.
    report = json.loads((Path(__file__).parents[1] / "docs" / "eval-tiny.json").read_text())
    settings = report["settings"]
    measured = eval_understanding(pipe, n_vqa=settings["vqa"], n_captions=settings["captions"],
                                  seed=settings["seed"], show=False)
    for key in ("vqa_accuracy", "caption_accuracy", "vqa_by_answer_kind"):
        assert measured[key] == pytest.approx(report["understanding"][key]), key


def test_user_wording_generates_what_was_asked(pipe):
    # "please paint", "one", "corner": v11 drew a circle here; v12 to v14 draw the square.
    image = pipe.generate("Please paint one blue square in the lower right corner", SamplingConfig(temperature=0))
    found = detect(image)
    assert [(f.shape, f.color, f.position) for f in found] == [("square", "blue", "bottom right")]


def test_seeded_generation_is_reproducible(pipe):
    s = SamplingConfig(temperature=1.0, top_k=20)
    a = np.asarray(pipe.generate("a green triangle in the center", s, seed=5))
    b = np.asarray(pipe.generate("a green triangle in the center", s, seed=5))
    assert np.array_equal(a, b)


def test_bad_prompts(pipe):
    size = pipe.cfg.vision.image_size
    px = to_pixels(scenes.render(scenes.sample_scene(np.random.default_rng(0)), size), size)
    with pytest.raises(UserError, match="empty"):
        pipe.understand(px, "   ")
    with pytest.raises(UserError, match="context"):
        pipe.generate("red " * 400)
    with pytest.raises(UserError, match="NaN"):
        pipe.understand(px * float("nan"), "what color is it?")
    with pytest.raises(UserError, match="editing is not supported"):
        pipe.edit(Image.new("RGB", (96, 96)), "make it blue")


def test_cli_caption_and_generate(pipe, tmp_path, capsys):
    img = tmp_path / "in.png"
    size = pipe.cfg.vision.image_size
    scenes.render(scenes.Scene((scenes.SceneObject("triangle", "green", "center"),)), size).save(img)
    assert main(["caption", "--image", str(img), "--prompt", "what color is the shape in the center?"]) == 0
    assert "green" in capsys.readouterr().out
    out = tmp_path / "g.png"
    assert main(["generate", "--prompt", "a yellow circle at the top", "--seed", "3", "-o", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (size, size)


@pytest.mark.parametrize("argv,message", [
    (["caption", "--image", "/no/such.png"], "image not found"),
    (["caption", "--image", "{bad}", "--prompt", "x"], "not a valid image"),
    (["caption", "--image", "{gray}", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt", "", "-o", "{out}"], "prompt is empty"),
    (["generate", "--prompt", "red " * 400, "-o", "{out}"], "context"),
    (["generate", "--prompt", "a red circle", "-o", "{tmp}/g.gif"], "must end in .png"),
    (["caption", "--image", "{gray}", "--checkpoint", "{tmp}"], "has no config.json"),
    (["probe-codes", "--train", "5", "--json", "{tmp}/p.json"], "--train >= 10"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    Image.new("L", (40, 30), 200).save(tmp_path / "gray.png")  # grayscale, odd size: accepted
    fill = {"bad": str(tmp_path / "bad.png"), "gray": str(tmp_path / "gray.png"), "out": str(tmp_path / "o.png"),
            "tmp": str(tmp_path)}
    before = set(tmp_path.iterdir())
    code = main([a.format(**fill) if "{" in a else a for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert set(tmp_path.iterdir()) == before


def test_every_fsq_channel_of_the_shipped_tokenizer_is_alive(pipe):
    # A v4 tokenizer had one FSQ channel stuck at a single level and another at two of five
    # (saturated tanh, no gradient), so 64 scenes used ~31 codes; stage 1 now bounds the range.
    model = pipe.g.model
    rng = np.random.default_rng(7)
    size = model.cfg.vision.image_size
    pixels = torch.cat([to_pixels(scenes.render(scenes.sample_scene(rng), size), size) for _ in range(64)])
    with torch.no_grad():
        codes = model.tokenizer.discrete.codes(model.tokenizer.encoder(pixels.to(next(model.parameters()).dtype)))
    levels_used = [codes[..., k].unique().numel() for k in range(codes.shape[-1])]
    assert all(n >= 3 for n in levels_used), levels_used


def test_the_shipped_codes_carry_shape(tmp_path, capsys):
    # The README's diagnosis of the image scores. Full size (200 / 4000 / 800, 3000 probe steps): v14's (and v15's)
    # 3x3 codes give two shapes identical ids in 0/200 scenes (1.40 tokens differ) and a probe reads shape at 1.000
    # (v13: 0/200, 1.65, 0.995); v10's 4x4 codes: 7/200 and 0.71. At this size and 1000 probe steps (the probes
    # train for over 100 epochs): 0/30, 1.60, 0.983; 3000 steps: 1.000.
    out = tmp_path / "probe.json"
    assert main(["probe-codes", "--controlled", "30", "--train", "1500", "--test", "300", "--probe-steps", "1000",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shape probe on the codes" in printed and "a user's drawings" in printed
    report = json.loads(out.read_text())
    controlled, probe = report["controlled"], report["probe"]
    assert report["probe_steps"] == 1000
    assert controlled["tokens"] == 9 and controlled["scenes_with_two_shapes_on_identical_ids"] == 0
    assert 1.0 <= controlled["mean_differing_tokens_per_shape_pair"] < 3  # the object's own token, and no more
    assert probe["test_accuracy"] >= 0.95, probe
    # The same probe on the understanding tokens, trained on loose scenes. Full size, v14 and v15: canonical 1.000,
    # held-out loose 0.952, a user's drawings 0.944 (the decoder captions them at 0.920; v13: 1.000 /
    # 0.935 / 0.901, captions 0.875); at this size (1000 steps) 1.000 / 0.980 / 0.980. Across runs the decoder's
    # drawing captions stayed within 0.05 below it (s13d: probe 0.801, captions 0.765; s14a: 0.754,
    # 0.750), so the gap to scenes shows in the tokens.
    understanding = report["understanding_probe"]
    assert understanding["canonical_test_accuracy"] >= 0.97, understanding
    assert understanding["loose_test_accuracy"] >= 0.8 and understanding["drawings_accuracy"] >= 0.8, understanding


def test_cli_eval_writes_json_and_marks_parts_it_did_not_run(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--vqa", "6", "--captions", "2", "--generation", "0", "--reconstruction", "2", "--drawings", "3",
            "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"ShapesEval \(text-to-image\) +not run", printed) and "nan" not in printed
    report = json.loads(out.read_text())
    assert report["generation"]["prompts"] == 0 and report["reconstruction"]["prompts"] == 2
    assert report["reconstruction"]["pixel_psnr_db"] > 10 and 0 <= report["understanding"]["vqa_accuracy"] <= 1
    assert report["schema"] == "manzano-edge/eval@1" and report["reconstruction"]["vae_round_trip"]["prompts"] == 2
    assert re.search(r"ShapesEval \(VAE round trip\) +[01]\.\d{3}", printed), printed
    assert report["drawings"]["drawings"] == 3 and len(report["drawings"]["examples"]) == 3
    assert re.search(r"caption accuracy \(PIL drawings\) +[01]\.\d{3}", printed), printed
    assert report["settings"]["drawings"] == 3


def test_the_python_eval_defaults_to_greedy_like_the_cli(pipe, monkeypatch):
    # EvalConfig's default sampled at temperature 1 until v14, while `manzano-edge eval` decoded greedily.
    from manzano_edge.eval.evaluate import EvalConfig, evaluate

    used, generate = [], pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda prompt, sampling=None, seed=0: (
        used.append(sampling), generate(prompt, sampling, seed=seed))[1])
    report = evaluate(pipe, EvalConfig(vqa=0, captions=0, generation=1, reconstruction=0, drawings=0), show=False)
    assert [s.temperature for s in used] == [0.0] and report["settings"]["sampling"]["temperature"] == 0.0


def test_demo_without_export_writes_its_summary_and_scores_like_eval(pipe, tmp_path, capsys):
    # The main job's first half (`make demo` adds export, int8 validation and a smoke bench).
    from manzano_edge.demo import print_summary, run_demo

    out = tmp_path / "demo"
    summary = run_demo(pipe, out, eval_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["generated.png", "input.png", "summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary directory left behind
    assert json.loads((out / "summary.json").read_text()) == summary
    q = summary["quick_eval"]
    # Greedy like `manzano-edge eval`, so the demo's quick numbers are the first prompts of eval's stream.
    assert q["sampling"]["temperature"] == 0.0
    greedy = eval_generation(pipe, 2, seed=0, sampling=SamplingConfig(temperature=0), show=False)
    assert q["shapes_eval"] == greedy["shapes_eval"]
    print_summary(summary, out)
    assert "quick eval on 4 held-out scenes" in capsys.readouterr().out
    with pytest.raises(UserError, match="not empty"):
        run_demo(pipe, out, eval_size=4)

"""The training loop: every stage runs, resumes from safetensors state, and runs under torchrun/DDP."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from manzano_edge.models.manzano import load_checkpoint
from manzano_edge.train.loop import StageBudget, train

MICRO = textwrap.dedent("""
    from manzano_edge.config import DecoderConfig, DiTConfig, ModelConfig, VAEConfig, VisionConfig
    from manzano_edge.train.loop import STAGES, StageBudget, TrainConfig

    def micro_config():
        return ModelConfig(
            name="micro",
            vision=VisionConfig(image_size=48, patch_size=8, width=32, layers=1, heads=2, fsq_levels=[5, 5]),
            decoder=DecoderConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=128, max_position_embeddings=96),
            dit=DiTConfig(width=32, depth=1, heads=2),
            vae=VAEConfig(latent_channels=8, channels=[8, 16, 32]),
        ).validate()

    def micro_budget(steps=2):
        return TrainConfig(save_every=1, stages={name: StageBudget(steps=steps, batch_size=4, lr=1e-3, warmup=1)
                                                 for name in STAGES})
""")
namespace: dict = {}
exec(MICRO, namespace)
micro_config, micro_budget = namespace["micro_config"], namespace["micro_budget"]


def test_all_stages_train_and_write_a_loadable_checkpoint(tmp_path):
    final = train(tmp_path / "run", micro_budget(), cfg=micro_config())
    model, _ = load_checkpoint(final)
    assert model.cfg.name == "micro" and model.cfg.vae.scaling_factor != 1.0  # measured after the VAE stage
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [e["stage"] for e in log] == ["tokenizer", "decoder", "binding", "vae", "dit"]
    assert all(all(v == v for v in e["final_losses"].values()) for e in log)  # no NaN losses
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.bin"))


def test_resume_continues_from_saved_step(tmp_path):
    run = tmp_path / "run"
    tcfg = micro_budget(steps=2)
    train(run, tcfg, cfg=micro_config(), stages=("tokenizer",))
    before = load_checkpoint(run / "model")[0].tokenizer.encoder.patch_embed.weight.clone()
    # Extend the stage: it must pick up at step 2 with the saved weights and AdamW state.
    tcfg.stages["tokenizer"] = StageBudget(steps=4, batch_size=4, lr=1e-3, warmup=1)
    progress = run / "stage-tokenizer" / "progress.json"
    progress.write_text(json.dumps({"step": 2, "done": False}))
    train(run, tcfg, stages=("tokenizer",))
    log = json.loads((run / "train_log.json").read_text())
    assert log[-1]["resumed_from"] == 2 and log[-1]["steps"] == 4
    after = load_checkpoint(run / "model")[0].tokenizer.encoder.patch_embed.weight
    assert not torch.equal(before, after)


@pytest.mark.slow
def test_a_run_starts_from_a_checkpoint_and_keeps_frozen_parts_fixed(tmp_path):
    """`train --init CKPT --freeze vit` (an imported tower): the adapters train, the ViT does not."""
    import dataclasses

    start = train(tmp_path / "base", micro_budget(steps=1), cfg=micro_config(), stages=("tokenizer",))
    base, _ = load_checkpoint(start)
    final = train(tmp_path / "run", dataclasses.replace(micro_budget(steps=2), frozen=("vit",)), init=start,
                  stages=("tokenizer",))
    after, _ = load_checkpoint(final)
    for name, tensor in base.tokenizer.encoder.state_dict().items():
        assert torch.equal(tensor, after.tokenizer.encoder.state_dict()[name]), name
    assert not torch.equal(base.tokenizer.continuous.mlp.fc1.weight, after.tokenizer.continuous.mlp.fc1.weight)
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (start / "tokenizer.json").read_text()


def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(MICRO + textwrap.dedent(f"""
        from manzano_edge.train.loop import train
        train({str(tmp_path / 'run')!r}, micro_budget(steps=3), cfg=micro_config())
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert model.cfg.name == "micro"
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert len(log) == 5  # only rank 0 writes the log


def test_reconstruction_losses_weight_the_objects():
    # Objects cover ~5% of a scene; under a plain mean every decoder learned background only.
    import numpy as np

    from manzano_edge.config import preset
    from manzano_edge.data import scenes
    from manzano_edge.data.images import to_pixels
    from manzano_edge.models.dit import DiT, flow_matching_loss
    from manzano_edge.train.stages import FOREGROUND_WEIGHT, foreground_weight

    scene = scenes.Scene((scenes.SceneObject("circle", "red", "top left"),))
    pixels = to_pixels(scenes.render(scene, 96), 96)
    w = foreground_weight(pixels)
    assert set(w.unique().tolist()) == {1.0, 1.0 + FOREGROUND_WEIGHT}
    heavy = (w > 1).float()
    assert 0.01 < heavy.mean() < 0.2 and heavy[..., :32, :32].sum() == heavy.sum()  # only the top-left object
    coarse = foreground_weight(pixels, 12)
    assert coarse.shape == (1, 1, 12, 12) and coarse[..., :4, :4].max() > 1 and coarse[..., 6:, 6:].max() == 1

    cfg = preset("tiny")
    dit = DiT(cfg)
    latent = torch.randn(2, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    cond = torch.randn(2, cfg.vision.num_image_tokens, cfg.decoder.hidden_size)
    args = dict(cond_dropout=0.0)
    plain = flow_matching_loss(dit, latent, cond, torch.Generator().manual_seed(0), **args)
    ones = torch.ones(2, 1, cfg.latent_size, cfg.latent_size)
    ones = flow_matching_loss(dit, latent, cond, torch.Generator().manual_seed(0), weight=ones, **args)
    assert torch.allclose(plain, ones)
    np.testing.assert_array_less(0, plain.item())


@pytest.mark.slow
def test_qat_under_torchrun(tmp_path):
    """`qat` runs the same loop under DDP (fake-quantized linears inside DistributedDataParallel)."""
    from manzano_edge.config import preset
    from manzano_edge.data.text import domain_corpus, train_bpe
    from manzano_edge.models.manzano import Manzano, save_checkpoint

    cfg = micro_config()
    torch.manual_seed(0)
    source = save_checkpoint(Manzano(cfg), tmp_path / "micro",
                             train_bpe(preset("tiny").text.text_vocab_size, domain_corpus(200)).to_str())
    script = tmp_path / "ddp_qat.py"
    script.write_text(textwrap.dedent(f"""
        from manzano_edge.quant.qat import QATRunConfig, qat
        from manzano_edge.train.loop import StageBudget
        cfg = QATRunConfig(recipe="w4", save_every=1)
        cfg.stages = {{k: StageBudget(steps=2, batch_size=4, lr=1e-3, warmup=1) for k in cfg.stages}}
        qat({str(source)!r}, {str(tmp_path / 'qat')!r}, cfg)
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    model, _ = load_checkpoint(tmp_path / "qat" / "checkpoint")
    record = json.loads((tmp_path / "qat" / "qat.json").read_text())
    assert record["world_size"] == 2 and [s["stage"] for s in record["stages"]] == ["qat-tokenizer", "qat-decoder",
                                                                                    "qat-dit"]
    original, _ = load_checkpoint(source)
    assert not torch.equal(model.decoder.lm_head.weight, original.decoder.lm_head.weight)
    assert torch.equal(model.dit.null_cond, original.dit.null_cond)


def test_fsq_range_loss_is_free_inside_the_range_and_pulls_saturated_codes_back():
    from manzano_edge.models.fsq import FSQ
    from manzano_edge.train.stages import FSQ_RANGE, fsq_range_loss

    fsq = FSQ([8, 5, 5, 5])
    # The bound costs no codes: z = +-FSQ_RANGE already reaches each channel's outermost levels.
    edges = fsq.codes_to_indices(fsq.quantize(torch.tensor([[-FSQ_RANGE] * 4, [FSQ_RANGE] * 4])))
    assert edges.tolist() == [0, fsq.codebook_size - 1]
    inside = torch.linspace(-FSQ_RANGE, FSQ_RANGE, 64).reshape(16, 4)
    assert fsq_range_loss(inside) == 0
    saturated = torch.full((4, 4), -10.0, requires_grad=True)  # tanh'(-10) ~ 1e-8: no other loss moves it
    fsq_range_loss(saturated).backward()
    assert (saturated.grad < 0).all()  # gradient descent moves it up, back towards the range


def test_a_stage_trains_the_same_alone_or_after_the_others(tmp_path):
    # Each stage reseeds torch's RNG (`stage_seed`): before, stage 2's fresh scene-parsing head
    # took whatever state stage 1 left, so `--stages decoder` on a copied run gave other weights.
    from safetensors.torch import load_file

    one_go = train(tmp_path / "a", micro_budget(), cfg=micro_config())
    train(tmp_path / "b", micro_budget(), cfg=micro_config(), stages=("tokenizer",))
    split = train(tmp_path / "b", micro_budget(), cfg=micro_config(), stages=("decoder", "binding", "vae", "dit"))
    a, b = load_file(one_go / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from manzano_edge.train.loop import STAGE_SEED_OFFSET, STAGES

    assert set(STAGE_SEED_OFFSET) == set(STAGES) and len(set(STAGE_SEED_OFFSET.values())) == len(STAGES)


def test_tiny_image_tokens_coincide_with_the_scene_cells():
    # The tiny tokenizer's 3x3 tokens are the scene's 3x3 positions, so a token holds one whole
    # object and stage 1 can ask each token's code for its own cell's shape (`CellParseHead`).
    import torch.nn.functional as F

    from manzano_edge.config import preset
    from manzano_edge.data import scenes
    from manzano_edge.data.images import to_pixels
    from manzano_edge.train.stages import CellParseHead, foreground_weight, one_token_per_cell

    cfg = preset("tiny")
    assert one_token_per_cell(cfg) and not one_token_per_cell(preset("small"))
    side, size = 3, cfg.vision.image_size
    for cell, position in enumerate(scenes.POSITIONS):
        for shape in scenes.SHAPES:  # the largest, most displaced object still falls in its token
            obj = scenes.SceneObject(shape, "red", position, size=0.125, jitter=(0.025, -0.025))
            fg = foreground_weight(to_pixels(scenes.render(scenes.Scene((obj,)), size), size)) > 1
            per_token = F.avg_pool2d(fg.float(), size // side).flatten()
            assert per_token.argmax() == cell and per_token[cell] / per_token.sum() > 0.97, (position, shape)
    head = CellParseHead(cfg)
    shape_logits, color_logits = head(torch.randn(2, cfg.vision.num_image_tokens, cfg.decoder.hidden_size))
    assert shape_logits.shape == (2, 9, 1 + len(scenes.SHAPES)) and color_logits.shape == (2, 9, 1 + len(scenes.COLORS))



def test_bf16_mixed_autocasts_the_forward_and_keeps_weights_fp32(tmp_path):
    from manzano_edge.errors import UserError
    from manzano_edge.train.loop import TrainConfig, run_stage

    class Probe(torch.nn.Module):  # records the dtype its linear computes in
        def __init__(self):
            super().__init__()
            self.linear, self.seen = torch.nn.Linear(32, 32), []

        def forward(self, examples, rng):
            out = self.linear(torch.stack(examples))
            self.seen.append(out.dtype)
            return out.float().pow(2).mean(), {}

    class Source:
        def sample(self):
            return torch.randn(32)

    budget = StageBudget(steps=2, batch_size=4, lr=1e-3, warmup=1)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("fp32", torch.float32)):
        probe = Probe()
        run_stage("probe", probe, budget, tmp_path / precision, TrainConfig(precision=precision), lambda seed: Source())
        assert probe.seen == [dtype, dtype]
        assert probe.linear.weight.dtype == torch.float32  # master weights and AdamW state stay fp32
    with pytest.raises(UserError, match="unknown precision 'fp16'; choose from bf16-mixed, fp32"):
        TrainConfig(precision="fp16").validate()


def test_frozen_image_ids_are_computed_in_fp32_under_bf16_autocast(monkeypatch):
    # bf16 before FSQ's rounding flips ids near level boundaries (0.56% of ids on v12); the decoder's
    # generation targets and the DiT's condition must be the ids inference computes, bit for bit.
    from manzano_edge.data.batches import SceneSource
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe
    from manzano_edge.models.manzano import Manzano
    from manzano_edge.train import stages
    from manzano_edge.train.loop import autocast_for

    torch.manual_seed(0)
    cfg = micro_config()
    model = Manzano(cfg)
    source = SceneSource(cfg.vision.image_size, seed=3)
    examples = [source.sample() for _ in range(64)]
    pixels = torch.stack([ex.pixels for ex in examples])
    with torch.no_grad():
        reference = model.tokenizer.image_to_ids(pixels)
        with autocast_for("bf16-mixed"):
            assert not torch.equal(model.tokenizer.image_to_ids(pixels), reference)  # the hazard is real here

    seen = {}
    real_generation_batch = stages.generation_batch

    def capture_ids(prompts, ids, *args):
        seen["decoder"] = ids
        return real_generation_batch(prompts, ids, *args)

    def capture_cond(dit, latent, cond, **kwargs):
        seen["dit"] = cond
        return latent.sum() * 0

    monkeypatch.setattr(stages, "generation_batch", capture_ids)
    monkeypatch.setattr(stages, "flow_matching_loss", capture_cond)
    codec = TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(seed=0)).to_str(), cfg.text)
    rng = __import__("numpy").random.default_rng(0)
    with autocast_for("bf16-mixed"):
        stages.DecoderStage(model, codec)(examples, rng)
        stages.DiTStage(model)(examples, rng)
    half = len(examples) * 5 // 8
    assert torch.equal(seen["decoder"], reference[half:])
    assert torch.equal(seen["dit"], model.tokenizer.discrete.ids_to_features(reference))


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp16"], "unknown precision 'fp16'; choose from bf16-mixed, fp32"),
    (["--stages", "vae,difusion"], "unknown stage 'difusion'; choose from tokenizer, decoder, binding, vae, dit"),
    (["--freeze", "vision"], "cannot freeze 'vision'; choose from vit, decoder"),
])
def test_bad_train_options_fail_cleanly_and_write_nothing(tmp_path, capsys, args, message):
    from manzano_edge.cli import main

    out = tmp_path / "run"
    code = main(["train", "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_loose_scenes_train_generation_on_their_canonical_twin(monkeypatch):
    # Loose layouts are for understanding: with a loose scene's own codes as the generation target,
    # a prompt's target codes blurred over sizes and stretches and text-to-image fell from 0.96
    # to 0.21 (run s13c). The generation half of a decoder batch must target the canonical twin.
    from manzano_edge.data.batches import SceneSource
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe
    from manzano_edge.models.manzano import Manzano
    from manzano_edge.train import stages

    torch.manual_seed(0)
    cfg = micro_config()
    model = Manzano(cfg)
    examples = [SceneSource(cfg.vision.image_size, seed=4, loose_share=1.0).sample() for _ in range(16)]
    assert all(ex.generation_pixels is not None for ex in examples)
    seen = {}
    real_generation_batch = stages.generation_batch

    def capture_ids(prompts, ids, *args):
        seen["ids"] = ids
        return real_generation_batch(prompts, ids, *args)

    monkeypatch.setattr(stages, "generation_batch", capture_ids)
    codec = TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(seed=0)).to_str(), cfg.text)
    stages.DecoderStage(model, codec)(examples, np.random.default_rng(0))
    gen = examples[len(examples) * 5 // 8:]
    with torch.no_grad():
        twin_ids = model.tokenizer.image_to_ids(torch.stack([ex.generation_pixels for ex in gen]))
        own_ids = model.tokenizer.image_to_ids(torch.stack([ex.pixels for ex in gen]))
    assert torch.equal(seen["ids"], twin_ids) and not torch.equal(twin_ids, own_ids)


def test_stage_one_shows_loose_scenes_to_the_continuous_adapter_and_their_twin_to_the_codes():
    # Loose scenes on both stage-1 paths (run s13b) cost the codes shape: reconstruction 0.92 -> 0.47.
    from manzano_edge.data.batches import SceneSource
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe
    from manzano_edge.models.manzano import Manzano
    from manzano_edge.train import stages

    torch.manual_seed(0)
    cfg = micro_config()
    model = Manzano(cfg).eval()
    source = SceneSource(cfg.vision.image_size, seed=4, loose_share=0.5)
    examples = [source.sample() for _ in range(12)]
    loose = [ex.generation_pixels is not None for ex in examples]
    assert any(loose) and not all(loose)
    seen = {}

    def record(name, fn):
        return lambda x: fn(seen.setdefault(name, x))

    stage = stages.TokenizerStage(model, TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(seed=0)).to_str(), cfg.text))
    model.tokenizer.continuous.forward = record("continuous_in", model.tokenizer.continuous.forward)
    model.tokenizer.discrete.project = record("codes_in", model.tokenizer.discrete.project)
    stage.pixel_decoder.target = record("target_in", stage.pixel_decoder.target)
    stage(examples, np.random.default_rng(0))
    with torch.no_grad():
        own = model.tokenizer.encoder(torch.stack([ex.pixels for ex in examples]))
        twin = model.tokenizer.encoder(torch.stack([ex.generation_target for ex in examples]))
    torch.testing.assert_close(seen["continuous_in"], own)
    torch.testing.assert_close(seen["codes_in"], twin)
    assert not torch.allclose(own, twin)
    torch.testing.assert_close(seen["target_in"], torch.stack([ex.generation_target for ex in examples]))


def test_each_decoder_stage_weights_its_generation_loss_as_configured():
    # Stage 2 weights the image-token loss 2x (loop.GENERATION_WEIGHT): without it, codes from the
    # 3000-step stage 1 drew text-to-image at 0.63. The weight must reach the loss, stage by stage.
    from manzano_edge.data.batches import SceneSource
    from manzano_edge.data.text import TextCodec, domain_corpus, train_bpe
    from manzano_edge.models.manzano import Manzano
    from manzano_edge.train import stages
    from manzano_edge.train.loop import GENERATION_WEIGHT, TrainConfig, build_stage

    torch.manual_seed(0)
    cfg = micro_config()
    model = Manzano(cfg)
    examples = [SceneSource(cfg.vision.image_size, seed=5).sample() for _ in range(8)]
    codec = TextCodec(train_bpe(cfg.text.text_vocab_size, domain_corpus(seed=0)).to_str(), cfg.text)
    tcfg = TrainConfig()
    assert tcfg.generation_weight == GENERATION_WEIGHT == {"decoder": 2.0, "binding": 1.0}

    def loss_and_logs(build, *args):
        torch.manual_seed(1)  # the scene-parse head is fresh per stage: same init for every weight
        stage = build(*args)
        with torch.no_grad():
            return stage(examples, np.random.default_rng(0))

    base, logs = loss_and_logs(stages.DecoderStage, model, codec)
    for name, weight in GENERATION_WEIGHT.items():
        loss, _ = loss_and_logs(build_stage, name, model, codec, tcfg)
        assert loss.item() == pytest.approx(base.item() + (weight - 1.0) * logs["gen"], rel=1e-5), name

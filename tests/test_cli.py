"""The command line's shared behaviour (issue 34): fast, nothing here exports, trains or runs a model."""

import argparse
import dataclasses
import importlib.metadata
import json
import shutil

import pytest
from PIL import Image

from manzano_edge.cli import build_parser, main
from manzano_edge.cli.common import BUNDLE_BACKEND_PREFERENCE, finish_args
from manzano_edge.errors import UserError

# The least each command parses with.
MINIMAL = {
    "train": [], "qat": ["--recipe", "w8a8", "-o", "r"], "sensitivity": ["--recipe", "w8a8", "-o", "r"],
    "profile": ["b", "-o", "r"], "probe-codes": [], "eval": [], "caption": ["--image", "x.png"],
    "generate": ["--prompt", "p", "-o", "x.png"], "export": ["-o", "b"], "export-hf": ["-o", "h"],
    "validate": ["b", "-o", "r"], "demo": [],
    "import": ["--decoder", "d", "-o", "r"], "import-llama": ["d", "-o", "r"], "bench": ["b", "-o", "r"],
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    finish_args(args)
    return args


def errors(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# -- 1. --bundle without --backend --------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return str(path)


def fake_bundle(root, formats: list[str]):
    """A bundle directory that parses (manifest, config, tokenizer) but holds no graph files."""
    from manzano_edge.models.manzano import CONFIG_FILE, EMBEDDED_DEFAULT, TOKENIZER_FILE

    root.mkdir()
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        shutil.copy(EMBEDDED_DEFAULT / name, root / name)
    entries = {f: {"file": f"decoder.{f}", "sha256": "0" * 64} for f in formats}
    (root / "manifest.json").write_text(json.dumps({"graphs": {"decoder": {"formats": entries}}}))
    return str(root)


def not_runnable(monkeypatch, *names):
    from manzano_edge.runtime.backends import BACKENDS

    for name in names:
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], runnable_here=lambda: (False, "not here")))


def test_the_preference_order_names_every_bundle_backend():
    from manzano_edge.runtime.backends import BACKENDS

    assert BUNDLE_BACKEND_PREFERENCE == ("executorch", "ort", "coreai", "coreml")
    assert set(BUNDLE_BACKEND_PREFERENCE) == {n for n, b in BACKENDS.items() if b.format}


@pytest.mark.parametrize("formats, unrunnable, chosen", [
    (["coreml", "onnx", "executorch"], (), "executorch"),
    (["onnx", "coreml"], (), "ort"),
    (["executorch", "onnx"], ("executorch",), "ort"),
    (["coreml"], (), "coreml"),
])
def test_bundle_without_backend_runs_on_its_best_backend_and_says_so(tmp_path, capsys, monkeypatch, image, formats,
                                                                     unrunnable, chosen):
    if chosen == "coreml":
        from manzano_edge.runtime.backends import BACKENDS

        monkeypatch.setitem(BACKENDS, "coreml", dataclasses.replace(BACKENDS["coreml"], runnable_here=lambda: (True, "")))
    not_runnable(monkeypatch, *unrunnable)
    bundle = fake_bundle(tmp_path / "b", formats)
    code, err = errors(["caption", "--image", image, "--bundle", bundle], capsys)
    # The fake bundle has no graph files: the run stops at the first one, after the choice is named.
    assert code == 2 and len(err) == 2, err
    assert err[0] == f"manzano-edge: running bundle {bundle} on {chosen} (pass --backend to choose)"
    assert err[1].startswith("manzano-edge: error: ") and "re-export" in err[1]


def test_quiet_hides_the_chosen_backend(tmp_path, capsys, image):
    bundle = fake_bundle(tmp_path / "b", ["onnx"])
    code, err = errors(["caption", "--image", image, "--bundle", bundle, "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "error" in err[0], err


def test_a_bundle_nothing_here_runs_is_refused(tmp_path, capsys, monkeypatch, image):
    not_runnable(monkeypatch, "coreml")
    bundle = fake_bundle(tmp_path / "b", ["coreml"])
    code, err = errors(["caption", "--image", image, "--bundle", bundle], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"none of bundle {bundle}'s formats (coreml) runs here (coreml: not here)" in err[0]
    assert "re-export it with --format executorch,onnx" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["caption", "--image", "{image}", "--bundle", "{bundle}", "--backend", "torch"],
     "--bundle runs exported graphs; drop --backend torch or --bundle"),
    (["caption", "--image", "{image}", "--bundle", "{missing}"], "bundle directory {missing} does not exist"),
    (["caption", "--image", "{image}", "--bundle", "{missing}", "--backend", "ort"], "bundle directory {missing} does not exist"),
    (["generate", "--prompt", "a red circle", "-o", "{tmp}/o.png", "--bundle", "{missing}"],
     "bundle directory {missing} does not exist"),
    (["caption", "--image", "{image}", "--bundle", "{image}"], "is a file"),
    (["caption", "--image", "{image}", "--backend", "ort"], "--backend ort runs an exported bundle; pass --bundle DIR"),
])
def test_bundle_misuse_is_one_line(tmp_path, capsys, image, argv, message):
    fill = {"image": image, "bundle": fake_bundle(tmp_path / "b", ["onnx"]), "missing": str(tmp_path / "nope"),
            "tmp": str(tmp_path)}
    code, err = errors([a.format(**fill) for a in argv], capsys)
    assert code == 2 and len(err) == 1 and message.format(**fill) in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_backend_defaults_to_none_and_help_says_what_none_means():
    args = parse(["caption", *MINIMAL["caption"]])
    assert args.backend is None and args.bundle is None
    text = subparsers()["generate"].format_help()
    assert "executorch, ort, coreai, coreml" in " ".join(text.split())


# -- 2. --version -------------------------------------------------------------------------------
def test_version_names_the_package_and_the_embedded_model(capsys):
    from manzano_edge.fsutil import path_digest
    from manzano_edge.models.manzano import EMBEDDED_DEFAULT, WEIGHTS_FILE, embedded_model_identity

    identity = embedded_model_identity()
    digest, _ = path_digest(EMBEDDED_DEFAULT / WEIGHTS_FILE)
    assert identity == {"name": "tiny", "sha256": digest}
    identity["name"] = "changed"  # a copy: the cached identity stays
    assert embedded_model_identity()["name"] == "tiny"
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.splitlines() == [f"manzano-edge {importlib.metadata.version('manzano-edge')}",
                                                    f"embedded model: tiny (sha256 {digest[:12]})"]


# -- 3. --help: defaults, examples, a help string for every option ---------------------------------
def test_every_command_has_examples_and_help_for_every_option(capsys):
    commands = subparsers()
    assert set(commands) == set(MINIMAL)
    for name, p in commands.items():
        assert f"manzano-edge {name} " in (p.epilog or ""), name
        assert [a.dest for a in p._actions if a.help is None] == [], name
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exc.value.code == 0 and "examples:\n  manzano-edge " in out, name
        assert "(default: None)" not in out and "(default: False)" not in out, name


@pytest.mark.parametrize("name, shown", [
    ("export", "(default: fp32)"), ("caption", "(default: 48)"), ("validate", "(default: 10)"),
    ("train", "(default: runs/tiny)"), ("bench", "(default: 5)"),
])
def test_help_shows_defaults(name, shown):
    assert shown in " ".join(subparsers()[name].format_help().split())


# -- 4. --quiet and --verbose ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MINIMAL))
def test_every_command_takes_quiet_and_verbose(name):
    args = parse([name, *MINIMAL[name]])
    assert args.quiet is False and args.verbose is False
    args = parse([name, *MINIMAL[name], "--quiet", "--verbose"])
    assert args.quiet is True and args.verbose is True


# -- 5. --flow-steps (and qat's --train-steps); --steps is a deprecated alias ---------------------
@pytest.mark.parametrize("name, dest, new, default", [
    ("generate", "flow_steps", "--flow-steps", 20), ("eval", "flow_steps", "--flow-steps", 20),
    ("validate", "flow_steps", "--flow-steps", 10), ("bench", "flow_steps", "--flow-steps", 20),
    ("qat", "train_steps", "--train-steps", None),
])
def test_one_name_for_steps_and_the_old_one_still_works(name, dest, new, default):
    assert getattr(parse([name, *MINIMAL[name]]), dest) == default
    args = parse([name, *MINIMAL[name], new, "3"])
    assert getattr(args, dest) == 3 and not getattr(args, "deprecation_notes", None)
    text = subparsers()[name].format_help()
    assert new in text
    if name != "bench":
        args = parse([name, *MINIMAL[name], "--steps", "4"])
        assert getattr(args, dest) == 4 and args.deprecation_notes == [f"--steps is deprecated; use {new}"]
        assert "--steps " not in text


def test_the_deprecation_note_is_one_line_before_the_run(tmp_path, capsys):
    code, err = errors(["generate", "--prompt", "a red circle", "-o", str(tmp_path / "o.gif"), "--steps", "3"], capsys)
    assert code == 2 and err == ["manzano-edge: --steps is deprecated; use --flow-steps",
                                 f"manzano-edge: error: output {tmp_path / 'o.gif'} must end in .png or .jpg"]
    code, err = errors(["qat", "-o", str(tmp_path / "run"), "--recipe", "w8a8", "--steps", "0"], capsys)
    assert code == 2 and err == ["manzano-edge: --steps is deprecated; use --train-steps",
                                 "manzano-edge: error: --train-steps must be at least 1, got 0"]
    assert not (tmp_path / "run").exists()


# -- 6. --checkpoint everywhere ---------------------------------------------------------------------
POSITIONAL = ("qat", "sensitivity", "eval", "export", "probe-codes")


@pytest.mark.parametrize("name", [*POSITIONAL, "caption", "generate", "demo", "validate", "bench"])
def test_every_command_that_takes_a_checkpoint_takes_checkpoint(name):
    assert parse([name, *MINIMAL[name]]).checkpoint is None
    args = parse([name, *MINIMAL[name], "--checkpoint", "runs/x/checkpoint"])
    assert args.checkpoint == "runs/x/checkpoint" and not getattr(args, "deprecation_notes", None)


@pytest.mark.parametrize("name", POSITIONAL)
def test_a_positional_checkpoint_still_works_with_a_note(name):
    args = parse([name, "runs/x/checkpoint", *MINIMAL[name]])
    assert args.checkpoint == "runs/x/checkpoint" and not hasattr(args, "checkpoint_positional")
    assert args.deprecation_notes == ["passing the checkpoint as a positional argument is deprecated; use --checkpoint"]
    assert parse([name, "runs/x/", *MINIMAL[name], "--checkpoint", "runs/x"]).checkpoint == "runs/x"  # the same one
    with pytest.raises(UserError, match="two checkpoints given: runs/x .positional. and --checkpoint runs/y"):
        parse([name, "runs/x", *MINIMAL[name], "--checkpoint", "runs/y"])


@pytest.mark.parametrize("name", ["validate", "bench"])
def test_reference_is_an_alias_of_checkpoint(name):
    args = parse([name, *MINIMAL[name], "--reference", "runs/x/checkpoint"])
    assert args.checkpoint == "runs/x/checkpoint" and not getattr(args, "deprecation_notes", None)


def test_checkpoint_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, err = errors(["probe-codes", str(missing)], capsys)
    assert code == 2 and err == ["manzano-edge: passing the checkpoint as a positional argument is deprecated; "
                                 "use --checkpoint", f"manzano-edge: error: checkpoint not found: {missing}; "
                                 "pass a directory written by `manzano-edge train`"]
    code, err = errors(["eval", str(missing), "--checkpoint", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "two checkpoints given" in err[0], err


def test_bundle_and_checkpoint_together_are_refused(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (96, 96), "white").save(tmp_path / "x.png")
    code = main(["caption", "--image", str(tmp_path / "x.png"), "--bundle", str(tmp_path), "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--bundle" in err[0] and "--checkpoint" in err[0]

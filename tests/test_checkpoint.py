import json
import pickle

import pytest
import torch

from manzano_edge.config import preset
from manzano_edge.errors import UserError
from manzano_edge.models.manzano import WEIGHTS_FILE, Manzano, load_checkpoint, save_checkpoint


@pytest.fixture()
def ckpt(tmp_path, tiny_codec):
    torch.manual_seed(0)
    model = Manzano(preset("tiny")).eval()
    return model, save_checkpoint(model, tmp_path / "ckpt", tiny_codec.tok.to_str())


def test_roundtrip_is_exact(ckpt):
    model, path = ckpt
    loaded, _ = load_checkpoint(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupt_weights_are_refused(ckpt):
    _, path = ckpt
    (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_checkpoint(path)


def test_pickle_is_never_loaded(ckpt):
    model, path = ckpt
    (path / WEIGHTS_FILE).write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(UserError, match="safetensors"):
        load_checkpoint(path)


def test_mismatched_config_is_refused(ckpt):
    _, path = ckpt
    raw = json.loads((path / "config.json").read_text())
    raw["decoder"]["num_hidden_layers"] = 6
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="does not match its config"):
        load_checkpoint(path)
    raw["decoder"]["num_hidden_layers"] = 4
    raw["decoder"]["intermediate_size"] = 1024
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="has shape"):
        load_checkpoint(path)


def test_missing_and_garbage_files(tmp_path, ckpt):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    _, path = ckpt
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        load_checkpoint(path)


def test_save_is_atomic(tmp_path):
    """A failure after the weights are written (here: a bad tokenizer) leaves nothing behind."""
    model = Manzano(preset("tiny"))
    with pytest.raises(TypeError):
        save_checkpoint(model, tmp_path / "out", tokenizer_json=None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []

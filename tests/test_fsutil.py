"""Atomic outputs: temp dirs of interrupted runs are cleaned up, live ones never; atomic files."""

import json
import os
import socket
import subprocess
import time

import pytest

from manzano_edge.errors import UserError
from manzano_edge.fsutil import (
    OWNER_FILE,
    STALE_AFTER_S,
    atomic_file,
    atomic_output_dir,
    begin_output_dir,
    commit_output_dir,
)


def _left_temp(parent, name, pid=None):
    """A temp dir as `begin_output_dir` makes it, with some work in it (pid None: no owner file)."""
    tmp = parent / f".{name}.tmp-abcd1234"
    (tmp / "graphs").mkdir(parents=True)
    (tmp / "graphs" / "decoder.onnx").write_bytes(b"half written")
    if pid is not None:
        (tmp / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    return tmp


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_of_a_dead_run_is_removed_with_one_line(tmp_path, capsys):
    pid = _dead_pid()
    stale = _left_temp(tmp_path, "out", pid)
    tmp = begin_output_dir(tmp_path / "out", overwrite=False)
    assert not stale.exists() and tmp.exists() and tmp.name.startswith(".out.tmp-")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"manzano-edge: removed stale temporary {stale} left by an interrupted run (pid {pid})"]
    commit_output_dir(tmp, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temp_of_a_live_run_is_kept(tmp_path, capsys):
    live = _left_temp(tmp_path, "out", os.getpid())
    recent = tmp_path / ".out.tmp-efgh5678"  # no owner file yet, but just created
    recent.mkdir()
    other = _left_temp(tmp_path, "other", _dead_pid())  # another OUT's temp is not this run's business
    tmp = begin_output_dir(tmp_path / "out", overwrite=False)
    assert live.exists() and (live / "graphs" / "decoder.onnx").exists() and recent.exists() and other.exists()
    assert capsys.readouterr().err == "" and tmp.exists()


def test_old_temp_without_owner_file_is_removed(tmp_path, capsys):
    old = _left_temp(tmp_path, "out")  # e.g. left by a version that wrote no owner file
    past = time.time() - STALE_AFTER_S - 60
    for p in [old / "graphs" / "decoder.onnx", old / "graphs", old]:
        os.utime(p, (past, past))
    begin_output_dir(tmp_path / "out", overwrite=True)
    assert not old.exists() and "(pid unknown)" in capsys.readouterr().err


def test_committed_output_has_no_owner_file(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, overwrite=False) as tmp:
        owner = json.loads((tmp / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        begin_output_dir(out, overwrite=False)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "a").write_text("1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file(tmp_path):
    path = tmp_path / "report.json"
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".report.json.") and tmp.suffix == ".json"
        tmp.write_text("new")
        assert not path.exists()
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]

    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]

    with pytest.raises(UserError, match="output directory .*missing does not exist; create it first"):
        with atomic_file(tmp_path / "missing" / "x.png"):
            pass

"""Atomic outputs: build in a temporary sibling, rename at the end.

A temporary output directory holds an owner file (pid, host, start time) while its run writes;
the next run into the same OUT removes the temporaries of runs that died (`kill -9`, a crash),
never one whose process is still alive.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from manzano_edge.errors import UserError

OWNER_FILE = ".owner.json"  # in a temporary output dir while its run writes; removed before the rename
STALE_AFTER_S = 3600.0  # a temporary with no owner file, untouched this long, is taken for an interrupted run's
_TMP_NAME = re.compile(r"[a-z0-9_]+")  # what tempfile.mkdtemp appends to the prefix


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) terminates the process there; assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def _stale_owner(tmp: Path) -> str | None:
    """Who left `tmp` ("pid N" / "pid unknown") if its run is certainly over; None if it may still be writing."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31:
        # Another host's pid cannot be checked from here (a shared file system): keep its temporary.
        if owner.get("host") != socket.gethostname() or _pid_alive(pid):
            return None
        return f"pid {pid}"
    # No readable owner file: a run killed between creating the directory and writing the file (or
    # by a version that wrote none, or one just renaming it into place). Only an old one is stale.
    return "pid unknown" if time.time() - _newest_mtime(tmp) > STALE_AFTER_S else None


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporaries beside OUT (`.OUT.tmp-*`) that interrupted runs left; returns them."""
    out = Path(out)
    prefix, removed = _tmp_prefix(out), []
    try:
        siblings = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for tmp in siblings:
        if not (tmp.name.startswith(prefix) and _TMP_NAME.fullmatch(tmp.name[len(prefix):])):
            continue
        try:
            if tmp.is_symlink() or not tmp.is_dir():
                continue
            owner = _stale_owner(tmp)
        except OSError:
            continue
        if owner is None:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            print(f"manzano-edge: removed stale temporary {tmp} left by an interrupted run ({owner})", file=sys.stderr)
            removed.append(tmp)
    return removed


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file at OUT, or a non-empty OUT unless overwrite: a command can call it before its work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite or choose another")


def begin_output_dir(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty OUT (unless overwrite) or an unwritable parent; return a temp dir beside OUT."""
    out = Path(out)
    check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
        try:
            (tmp / OWNER_FILE).write_text(json.dumps(_owner()) + "\n")
        except OSError:
            abort_output_dir(tmp)
            raise
        return tmp
    except OSError as exc:
        raise UserError(f"cannot write to {out.parent} ({exc.strerror}); choose a writable output directory") from exc


def commit_output_dir(tmp: Path, out: Path) -> None:
    out = Path(out)
    (Path(tmp) / OWNER_FILE).unlink(missing_ok=True)  # OUT holds only what the run wrote
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def abort_output_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """`with atomic_file(PATH) as tmp:` write tmp (same directory, same suffix); it replaces PATH only
    if the block succeeds, and is removed on any exception: never a half-written file."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"output directory {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """`with atomic_output_dir(OUT, overwrite) as tmp:` write into tmp; OUT appears only if the block succeeds."""
    tmp = begin_output_dir(out, overwrite)
    try:
        yield tmp
        commit_output_dir(tmp, out)
    except BaseException:
        abort_output_dir(tmp)
        raise


def path_digest(path: Path) -> tuple[str, int]:
    """sha256 and byte size of a file, or of a directory (.mlpackage) over its sorted files."""
    h, size = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        size += f.stat().st_size
    return h.hexdigest(), size

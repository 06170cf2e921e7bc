"""Atomic output directories: build in a temporary sibling, rename at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manzano_edge.errors import UserError


def begin_output_dir(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty OUT (unless overwrite) or an unwritable parent; return a temp dir beside OUT."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite or choose another")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write to {out.parent} ({exc.strerror}); choose a writable output directory") from exc


def commit_output_dir(tmp: Path, out: Path) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def abort_output_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


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

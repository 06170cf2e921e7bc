"""Third-party output (converter progress bars, import-time warnings, native runtime logs) kept off
the terminal unless asked for: the terminal shows the tool's own progress and results.

The command line turns this on (`--verbose` turns it off); the Python API leaves every library's
output as it is unless `configure(verbose=False)` is called. Output is captured at the file
descriptor level, so native (C++) logs are caught as well as Python's.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"verbose": True, "depth": 0}
NOISY_LOGGERS = ("coremltools", "torch.onnx", "onnxscript", "onnx_ir", "torchao", "executorch", "root")


def configure(verbose: bool) -> None:
    """verbose=False: `third_party_output()` blocks swallow what libraries print."""
    _state["verbose"] = verbose


def is_verbose() -> bool:
    return bool(_state["verbose"])


@contextmanager
def third_party_output() -> Iterator[None]:
    """Run a block whose libraries print (converters, runtimes) without their output reaching the
    terminal, unless verbose. Nested blocks capture once."""
    if _state["verbose"] or _state["depth"]:
        yield
        return
    _state["depth"] += 1
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sink.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _state["depth"] -= 1

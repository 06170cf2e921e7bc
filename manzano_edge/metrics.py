"""Accuracy metrics, defined exactly as DESIGN.md §5 (tools disagree, so this is the one place).

- PSNR: 20*log10(max|ref| / RMSE(ref, out)), as Apple's ml-stable-diffusion and Qualcomm AI Hub.
- SQNR: 10*log10(||ref||^2 / ||ref - out||^2).
- cosine similarity of the flattened tensors.
An exact match reports PSNR/SQNR as +inf (JSON: null is avoided; we cap at 200 dB).
"""

from __future__ import annotations

import math

import numpy as np
import torch

EXACT_DB = 200.0


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def psnr(ref, out) -> float:
    r, o = _np(ref), _np(out)
    rmse = math.sqrt(float(np.mean((r - o) ** 2)))
    peak = float(np.max(np.abs(r)))
    if rmse == 0.0:
        return EXACT_DB
    return min(EXACT_DB, 20.0 * math.log10(max(peak, 1e-30) / rmse))


def sqnr(ref, out) -> float:
    r, o = _np(ref), _np(out)
    noise = float(np.sum((r - o) ** 2))
    return EXACT_DB if noise == 0.0 else min(EXACT_DB, 10.0 * math.log10(max(float(np.sum(r**2)), 1e-30) / noise))


def cosine(ref, out) -> float:
    r, o = _np(ref), _np(out)
    denom = float(np.linalg.norm(r) * np.linalg.norm(o))
    return 1.0 if denom == 0.0 and np.array_equal(r, o) else float(np.dot(r, o) / max(denom, 1e-30))


def compare(ref, out) -> dict[str, float]:
    return {"psnr_db": psnr(ref, out), "sqnr_db": sqnr(ref, out), "cosine": cosine(ref, out)}

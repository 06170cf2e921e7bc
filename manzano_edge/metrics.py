"""Accuracy metrics, defined exactly as DESIGN.md §5 (tools disagree, so this is the one place).

- PSNR: 20*log10(max|ref| / RMSE(ref, out)), as Apple's ml-stable-diffusion and Qualcomm AI Hub.
- SQNR: 10*log10(||ref||^2 / ||ref - out||^2).
- cosine similarity of the flattened tensors.
- SSIM: mean over 7x7 windows (Wang et al. constants), images in [-1, 1].
- image PSNR (`image_psnr`): 10*log10(data_range^2 / MSE), the fixed-peak definition `eval` reports.
An exact match reports PSNR/SQNR as +inf (JSON: null is avoided; we cap at 200 dB).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


def image_psnr(ref, out, data_range: float = 2.0) -> float:
    """Image PSNR with a fixed peak: 10*log10(data_range^2 / MSE), MSE floored at 1e-12 (so at most
    about 126 dB for the default range, never EXACT_DB).

    Unlike `psnr` (DESIGN §5, for comparing a graph's outputs with the float model's), whose peak
    is the reference's own max|ref|, the peak here is the pixels' full range: 2 for images in
    [-1, 1]. That is the usual image-quality convention, so `eval`'s `pixel_psnr_db` on
    reconstructions does not depend on how bright each scene is and reads like published image
    PSNRs. For a reference with max|ref| = 1 it is `psnr` + 20*log10(2) (about 6.02 dB). The MSE is
    taken in the inputs' own dtype (float32 for eval's tensors), as `eval` always computed it.
    """
    mse = float(((out - ref) ** 2).mean())
    return float(10 * np.log10(data_range**2 / max(mse, 1e-12)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over 7x7 windows (Wang et al. constants), images in [-1, 1] -> [0, 1]."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    c1, c2 = 0.01**2, 0.03**2

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 7, 1)

    mu_a, mu_b = pool(a), pool(b)
    var_a, var_b = pool(a * a) - mu_a**2, pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())

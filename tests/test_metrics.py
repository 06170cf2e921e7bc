"""The metric definitions (DESIGN.md §5) pinned on small known examples."""

import math

import numpy as np
import pytest
import torch

from manzano_edge.metrics import EXACT_DB, compare, cosine, image_psnr, psnr, sqnr, ssim


def test_exact_match_caps_at_200_db():
    x = torch.randn(2, 3, 5)
    assert psnr(x, x) == EXACT_DB == 200.0 and sqnr(x, x) == 200.0 and cosine(x, x) == pytest.approx(1.0)
    assert compare(torch.zeros(4), torch.zeros(4)) == {"psnr_db": 200.0, "sqnr_db": 200.0, "cosine": 1.0}


def test_psnr_sqnr_cosine_on_a_known_example():
    ref, out = np.array([1.0, -2.0, 3.0, 0.0]), np.array([1.0, -2.0, 2.0, 0.0])
    # error [0, 0, 1, 0]: MSE 0.25, RMSE 0.5; max|ref| 3; ||ref||^2 14; ||out|| 3; ref . out 11
    assert psnr(ref, out) == pytest.approx(20 * math.log10(3 / 0.5))  # 15.56 dB
    assert sqnr(ref, out) == pytest.approx(10 * math.log10(14 / 1))  # 11.46 dB
    assert cosine(ref, out) == pytest.approx(11 / (math.sqrt(14) * 3))
    assert psnr(torch.tensor(ref), torch.tensor(out)) == psnr(ref, out)  # tensors and arrays alike


def test_ssim_of_an_image_with_itself_is_one():
    a = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert 0 < ssim(a, noisy) < 0.99


def test_image_psnr_is_the_fixed_peak_definition_eval_reports():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    ref[0, 0, 0, 0] = 1.0  # max|ref| = 1: the data range (2) is twice psnr's peak
    out = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    mse = float(((out - ref) ** 2).mean())
    assert image_psnr(ref, out) == float(10 * np.log10(4.0 / mse))  # eval's formula, bit for bit
    assert image_psnr(ref, out) - psnr(ref, out) == pytest.approx(20 * math.log10(2), abs=1e-4)  # 6.02 dB
    assert image_psnr(ref, out, data_range=1.0) == pytest.approx(image_psnr(ref, out) - 20 * math.log10(2))
    assert image_psnr(ref, ref) == pytest.approx(10 * math.log10(4 / 1e-12))  # floored MSE, not EXACT_DB

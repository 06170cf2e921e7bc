"""Building blocks shared by the ViT, the decoder and the DiT.

Written so XNNPACK delegates as much of each graph as it can (TOOLCHAIN.md §2): every op left
on the portable kernels between two delegated ones splits the graph into another partition,
and the hand-offs cost time (docs/results/xnnpack-delegation.md has the counts and what is still left out):
- attention is explicit bmm + softmax, not F.scaled_dot_product_attention (F.sdpa decomposes
  into `_safe_softmax`'s eq/any/where, which XNNPACK does not take);
- views write their one dynamic size as -1 (`dims`): XNNPACK rejects symbolic reshapes;
- norms compute their means with `mean_last`, the one `mean` form XNNPACK takes (a keepdim
  mean over the two innermost dims of a 4-D tensor); `native_layer_norm` is never delegated.
The same code converts unchanged to Core ML and ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dims(*sizes: int | torch.SymInt) -> list[int]:
    """A view/reshape shape with its one dynamic (symbolic) size written as -1: XNNPACK's reshape
    takes a single inferred dim and no symbolic sizes. Eager sizes are all ints: unchanged."""
    symbolic = [i for i, d in enumerate(sizes) if not isinstance(d, int)]
    out = list(sizes)
    if len(symbolic) == 1:
        out[symbolic[0]] = -1
    return out


def mean_last(x: torch.Tensor) -> torch.Tensor:
    """x.mean(-1, keepdim=True), for [B, N, D] inputs as a 4-D [B, N, D, 1] mean over the two
    innermost dims: XNNPACK lowers that to global average pooling and delegates it."""
    if x.dim() != 3:
        return x.mean(-1, keepdim=True)
    b, n, _ = x.shape
    # view, not squeeze: XNNPACK takes view_copy but not squeeze_copy.
    return x.unsqueeze(-1).mean(dim=(-2, -1), keepdim=True).view(dims(b, n, 1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, T, hd], k/v: [B, Hkv, S, hd] (Hkv divides H), mask: additive [1 or B, 1, T, S].

    3-D bmm over [B*H, T, hd]: a 4-D matmul decomposes into expand_copy + bmm, and XNNPACK does
    not take expand_copy. Grouped-query k/v are repeated per query head (Hugging Face's
    repeat_kv); that copy sits next to the KV-cache reads, which stay outside the delegate anyway.
    (Folding the query groups into the sequence axis instead made torch.export emit an
    unprovable stride guard on the dynamic length.)"""
    b, h, t, hd = q.shape
    groups = h // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = k.shape[2]
    scores = torch.bmm(q.reshape(dims(b * h, t, hd)), k.reshape(dims(b * h, s, hd)).transpose(1, 2))
    scores = scores * (1.0 / math.sqrt(hd))
    if mask is not None:
        if mask.shape[0] == 1:  # the graphs' case: broadcast over B*H without a 4-D view
            scores = scores + mask[:, 0]
        else:
            scores = (scores.view(b, h, t, s) + mask).view(b * h, t, s)
    out = torch.bmm(torch.softmax(scores.float(), dim=-1).to(q.dtype), v.reshape(dims(b * h, s, hd)))
    return out.view(dims(b, h, t, hd))


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with fused-free q/k/v projections (each a plain Linear, so
    every weight quantizes per channel on its own)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(dims(b, n, self.heads, x.shape[-1] // self.heads)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context)))
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(dims(b, n, out.shape[1] * out.shape[3])))


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The ViT/DiT MLP activations by config name (`config.VIT_ACTIVATIONS`); quick_gelu is CLIP's."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act: str = "gelu_tanh") -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in fp32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(mean_last(x * x) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm (same parameters and state-dict keys) with means XNNPACK delegates."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - mean_last(x)
        y = centred * torch.rsqrt(mean_last(centred * centred) + self.eps)
        return y if self.weight is None else y * self.weight + self.bias


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Timestep embedding as in DiT/ADM: t [B] float -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

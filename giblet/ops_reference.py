"""Plain PyTorch versions of giblet's native operators.

For tests and benchmarks only: the model never calls these. Each is the
straightforward formula (gathers materialized, dense weights, autograd
through ordinary ops), with the same signature as its ``giblet.ops`` twin.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from giblet.ops import ACTIVATIONS, Onsets, _onsets


def gather_project(
    table: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    rows = table[index.clamp(min=0)].to(weight.dtype) * scale + shift  # (B, S, D), materialized
    out = F.linear(rows, weight, bias)
    return torch.where((index >= 0).unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _centres(rate: float, onsets: torch.Tensor, window: float, n_out: int) -> torch.Tensor:
    k = torch.arange(n_out, dtype=torch.float64, device=onsets.device)
    return torch.floor((onsets[:, None] + (k + 0.5) * window / n_out) * rate)


def grid_index(n_samples: int, rate: float, onsets: Onsets, window: float, n_out: int) -> torch.Tensor:
    device = onsets.device if isinstance(onsets, torch.Tensor) else torch.device("cpu")
    position = _centres(rate, _onsets(onsets, device), window, n_out)
    inside = (position >= 0) & (position < n_samples)
    return torch.where(inside, position, torch.full_like(position, -1)).to(torch.int64)


def resample_codes(codes: torch.Tensor, rate: float, onsets: Onsets, window: float, n_out: int, pad: int) -> torch.Tensor:
    if codes.dim() != 2:
        raise ValueError(f"resample_codes: codes must be (n_q, T), got {tuple(codes.shape)}")
    position = grid_index(codes.shape[1], rate, _onsets(onsets, codes.device), window, n_out)  # (N, n_out)
    gathered = codes.to(torch.int64)[:, position.clamp(min=0)]  # (n_q, N, n_out)
    gathered = torch.where(position >= 0, gathered, torch.full_like(gathered, pad))
    return gathered.permute(1, 0, 2).contiguous()


def grid_weights(n_samples: int, rate: float, onsets: Onsets, window: float, n_out: int) -> torch.Tensor:
    """Dense ``(N * n_out, n_samples)`` float64 overlap weights, rows normalised to sum 1 (or all 0)."""
    onsets = _onsets(onsets, torch.device("cpu"))
    k = torch.arange(n_out, dtype=torch.float64)
    start = (onsets[:, None] + k * window / n_out).reshape(-1, 1)
    stop = (onsets[:, None] + (k + 1) * window / n_out).reshape(-1, 1)
    t = torch.arange(n_samples, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(stop, (t + 1) / rate) - torch.maximum(start, t / rate)).clamp(min=0)
    total = overlap.sum(1, keepdim=True)
    return torch.where(total > 0, overlap / total.clamp(min=1e-300), torch.zeros_like(overlap))


def grid_average(values: torch.Tensor, rate: float, onsets: Onsets, window: float, n_out: int) -> torch.Tensor:
    onsets = _onsets(onsets, torch.device("cpu"))
    weights = grid_weights(values.shape[0], rate, onsets, window, n_out).to(values.device, values.dtype)
    return (weights @ values).reshape(onsets.shape[0], n_out, values.shape[1])


def bottleneck(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    activation: str = "identity",
) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = F.gelu(out)
    elif activation == "tanh":
        out = torch.tanh(out)
    return out if mask is None else out * mask

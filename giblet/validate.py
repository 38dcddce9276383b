"""Checks to run before any GPU time is spent.

For now: which build of the native extension is loaded, and each op run once
against its plain PyTorch reference (forward and, where the op has one,
backward) on every device the build supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from giblet import ops
from giblet import ops_reference as ref


@dataclass
class OpCheck:
    op: str
    device: str
    max_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance


def _max_error(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    error = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return float("inf")
        if g.numel():
            error = max(error, (g.double() - w.double()).abs().max().item())
    return error


def _forward_backward(fn: Callable, inputs: Tuple, grad_inputs: Tuple[int, ...]) -> List[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(i in grad_inputs) if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    if not grad_inputs:
        return [out]
    grad_out = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    return [out, *torch.autograd.grad(out, [leaves[i] for i in grad_inputs], grad_out)]


def _cases(device: torch.device):
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 256, (64, 300), dtype=torch.uint8, generator=g).to(device)
    index = torch.randint(-1, 64, (4, 24), generator=g).to(device)
    weight = (torch.randn(32, 300, generator=g) * 0.05).to(device)
    bias = torch.randn(32, generator=g).to(device)
    codes = torch.randint(0, 1024, (8, 2000), generator=g).to(device)
    onsets = torch.arange(-2, 18, dtype=torch.float64).to(device) * 1.5
    mel = torch.randn(600, 16, generator=g).to(device)
    x = torch.randn(8, 64, generator=g).to(device)
    units = (torch.randn(500, 64, generator=g) * 0.1).to(device)
    unit_bias = torch.randn(500, generator=g).to(device)
    mask = (torch.rand(500, generator=g) > 0.1).to(device)
    return [
        ("gather_project", ops.gather_project, ref.gather_project, (table, index, weight, bias, 1 / 255, -0.5), (2, 3), 1e-4),
        ("grid_index", ops.grid_index, ref.grid_index, (2000, 25.0, onsets, 1.5, 38), (), 0.0),
        ("resample_codes", ops.resample_codes, ref.resample_codes, (codes, 75.0, onsets, 1.5, 112, 1024), (), 0.0),
        ("grid_average", ops.grid_average, ref.grid_average, (mel, 22050 / 512, onsets, 1.5, 8), (0,), 1e-5),
        ("bottleneck", ops.bottleneck, ref.bottleneck, (x, units, unit_bias, mask, "gelu"), (0, 1, 2), 1e-4),
    ]


def devices() -> List[torch.device]:
    """The devices this build can run on here."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available() and ops.build_info()["cuda_kernels"]:
        found.append(torch.device("cuda"))
    return found


def check_ops() -> List[OpCheck]:
    """Every op once against its reference, on every device."""
    results = []
    for device in devices():
        for name, fused, reference, inputs, grad_inputs, tolerance in _cases(device):
            got = _forward_backward(fused, inputs, grad_inputs)
            want = _forward_backward(reference, inputs, grad_inputs)
            results.append(OpCheck(name, device.type, _max_error(got, want), tolerance))
    return results

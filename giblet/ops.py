"""giblet's native operators, with autograd and fake (meta) kernels.

The kernels live in ``csrc/`` (CPU: ``csrc/cpu``, CUDA: ``csrc/cuda``) and are
declared once in ``csrc/ops.cpp`` as ``torch.ops.giblet.*``. This module gives
them Python signatures, gradients (``torch.library.register_autograd``) and
shape functions (``torch.library.register_fake``) so that they work under
``torch.compile(fullgraph=True)``.

There is no silent fallback: if the extension is not built, importing this
module fails with the command that builds it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

try:
    from giblet import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"giblet's native extension giblet._C could not be loaded ({error}). "
        "Build it with `make install` (or `python setup.py build_ext --inplace` in the repository root)."
    ) from error

__all__ = [
    "ACTIVATIONS",
    "gather_project",
    "grid_index",
    "resample_codes",
    "grid_average",
    "bottleneck",
    "build_info",
]

ACTIVATIONS = ("identity", "gelu", "tanh")

_ops = torch.ops.giblet
Onsets = Union[torch.Tensor, Sequence[float]]


def _onsets(onsets: Onsets, device: torch.device) -> torch.Tensor:
    """Window onsets as float64 seconds on ``device`` (times are never float32)."""
    return torch.as_tensor(onsets, dtype=torch.float64, device=device).reshape(-1)


def build_info() -> dict:
    """What this build of the extension holds: its devices and the torch it runs with."""
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("giblet::bottleneck", "CUDA")
    return {
        "extension": _C.__file__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_kernels": torch._C._dispatch_has_kernel_for_dispatch_key("giblet::bottleneck", "CPU"),
        "cuda_kernels": cuda_kernels,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- gather_project


def gather_project(
    table: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Project the table rows named by ``index``: ``(B, S, P)``.

    ``out[b, s] = weight @ (table[index[b, s]].to(weight.dtype) * scale + shift) + bias``,
    exactly 0 where ``index[b, s] == -1``. ``table (T, D)`` is uint8, float16,
    bfloat16, float32 or float64 (frames stay uint8 in memory: pass
    ``scale=1/255`` to dequantize on the fly); ``weight (P, D)``; ``bias (P,)``.
    Rows named by several slots are projected once, and the gathered
    ``(B, S, D)`` input is never materialized.
    """
    out, _rows, _slot_to_row = _ops.gather_project(table, index, weight, bias, float(scale), float(shift))
    return out


@torch.library.register_fake("giblet::gather_project")
def _gather_project_fake(table, index, weight, bias, scale, shift):
    torch._check(index.dim() == 2, lambda: f"gather_project: index must be 2-D (B, S), got {tuple(index.shape)}")
    torch._check(weight.dim() == 2, lambda: f"gather_project: weight must be 2-D (P, D), got {tuple(weight.shape)}")
    out = weight.new_empty((index.shape[0], index.shape[1], weight.shape[0]))
    # The plan: the number of unique rows depends on the values of index. Plain meta tensors (shapes
    # only, e.g. a model built under torch.device("meta")) have no data-dependent sizes: there it
    # takes its upper bound, one row per slot.
    if index.device.type == "meta":
        n_unique = index.numel()
    else:
        n_unique = torch.library.get_ctx().new_dynamic_size()
    rows = index.new_empty((n_unique,), dtype=torch.int64)
    slot_to_row = index.new_empty(index.shape, dtype=torch.int64)
    return out, rows, slot_to_row


@torch.library.register_fake("giblet::gather_project_backward")
def _gather_project_backward_fake(grad_out, table, rows, slot_to_row, weight, scale, shift, table_requires_grad):
    grad_table = table.new_empty(table.shape) if table_requires_grad else table.new_empty((0,))
    return grad_table, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


def _gather_project_setup(ctx, inputs, output):
    table, index, weight, bias, scale, shift = inputs
    _out, rows, slot_to_row = output
    # The forward's plan (unique rows, each slot's row), so that the backward neither plans nor syncs.
    ctx.save_for_backward(table, rows, slot_to_row, weight)
    ctx.scale, ctx.shift = scale, shift


def _gather_project_backward(ctx, grad_out, _grad_rows, _grad_slot_to_row):
    table, rows, slot_to_row, weight = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[0] and table.is_floating_point()
    grad_table, grad_weight, grad_bias = _ops.gather_project_backward(
        grad_out.contiguous(), table, rows, slot_to_row, weight, ctx.scale, ctx.shift, table_grad
    )
    return (
        grad_table if table_grad else None,
        None,
        grad_weight if ctx.needs_input_grad[2] else None,
        grad_bias if ctx.needs_input_grad[3] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "giblet::gather_project", _gather_project_backward, setup_context=_gather_project_setup
)


# --------------------------------------------------------------------------- TR grid


def grid_index(n_samples: int, rate: float, onsets: Onsets, window: float, n_out: int) -> torch.Tensor:
    """Sample index under the centre of each of ``n_out`` sub-intervals of each window.

    Window ``i`` covers ``[onsets[i], onsets[i] + window)`` seconds. Returns int64
    ``(N, n_out)``: ``floor((onsets[i] + (k + 0.5) * window / n_out) * rate)``, or -1
    outside ``[0, n_samples)``. Computed in float64 from each onset, so there is no
    drift however many TRs there are.
    """
    device = onsets.device if isinstance(onsets, torch.Tensor) else torch.device("cpu")
    return _ops.grid_index(int(n_samples), float(rate), _onsets(onsets, device), float(window), int(n_out))


@torch.library.register_fake("giblet::grid_index")
def _grid_index_fake(n_samples, rate, onsets, window, n_out):
    return onsets.new_empty((onsets.shape[0], n_out), dtype=torch.int64)


def resample_codes(
    codes: torch.Tensor, rate: float, onsets: Onsets, window: float, n_out: int, pad: int
) -> torch.Tensor:
    """EnCodec codes ``(n_q, T)`` at the ``grid_index`` positions: int64 ``(N, n_q, n_out)``, ``pad`` outside."""
    codes = torch.as_tensor(codes)
    return _ops.resample_codes(codes, float(rate), _onsets(onsets, codes.device), float(window), int(n_out), int(pad))


@torch.library.register_fake("giblet::resample_codes")
def _resample_codes_fake(codes, rate, onsets, window, n_out, pad):
    torch._check(codes.dim() == 2, lambda: f"resample_codes: codes must be (n_q, T), got {tuple(codes.shape)}")
    return codes.new_empty((onsets.shape[0], codes.shape[0], n_out), dtype=torch.int64)


def grid_average(values: torch.Tensor, rate: float, onsets: Onsets, window: float, n_out: int) -> torch.Tensor:
    """Average of frames ``(T, C)`` over each sub-interval, weighted by exact overlap: ``(N, n_out, C)``.

    Frame ``t`` covers ``[t / rate, (t + 1) / rate)``. A sub-interval that no frame
    overlaps is 0; one partly outside the stream averages the frames it overlaps.
    """
    return _ops.grid_average(values, float(rate), _onsets(onsets, values.device), float(window), int(n_out))


@torch.library.register_fake("giblet::grid_average")
def _grid_average_fake(values, rate, onsets, window, n_out):
    torch._check(values.dim() == 2, lambda: f"grid_average: values must be (T, C), got {tuple(values.shape)}")
    return values.new_empty((onsets.shape[0], n_out, values.shape[1]))


@torch.library.register_fake("giblet::grid_average_backward")
def _grid_average_backward_fake(grad_out, n_samples, rate, onsets, window, n_out):
    return grad_out.new_empty((n_samples, grad_out.shape[2]))


def _grid_average_setup(ctx, inputs, output):
    values, rate, onsets, window, n_out = inputs
    ctx.save_for_backward(onsets)
    ctx.grid = (values.shape[0], rate, window, n_out)


def _grid_average_backward(ctx, grad_out):
    (onsets,) = ctx.saved_tensors
    n_samples, rate, window, n_out = ctx.grid
    grad = _ops.grid_average_backward(grad_out.contiguous(), n_samples, rate, onsets, window, n_out)
    return grad, None, None, None, None


torch.library.register_autograd("giblet::grid_average", _grid_average_backward, setup_context=_grid_average_setup)


# --------------------------------------------------------------------------- bottleneck


def bottleneck(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    activation: str = "identity",
) -> torch.Tensor:
    """Layer 7: ``act(x @ weight.T + bias) * mask``, ``(B, V)``.

    ``mask (V,)`` bool, True = unit kept. A lesioned unit outputs exactly 0 and
    passes no gradient to its weight row, its bias or to ``x``; on the CPU its
    weight row is not even read. ``activation`` is one of identity, gelu, tanh.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck: activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    out, _pre = _ops.bottleneck(x, weight, bias, mask, activation)
    return out


def _pre_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("giblet::bottleneck")
def _bottleneck_fake(x, weight, bias, mask, activation):
    torch._check(x.dim() == 2, lambda: f"bottleneck: x must be 2-D (B, K), got {tuple(x.shape)}")
    out = x.new_empty((x.shape[0], weight.shape[0]))
    pre_shape = (0,) if activation == "identity" else (x.shape[0], weight.shape[0])
    return out, x.new_empty(pre_shape, dtype=_pre_dtype(x))


@torch.library.register_fake("giblet::bottleneck_backward")
def _bottleneck_backward_fake(grad_out, x, weight, pre, mask, activation, bias_requires_grad):
    grad_bias = x.new_empty((weight.shape[0],) if bias_requires_grad else (0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


def _bottleneck_setup(ctx, inputs, output):
    x, weight, bias, mask, activation = inputs
    ctx.save_for_backward(x, weight, output[1], mask)
    ctx.activation = activation


def _bottleneck_backward(ctx, grad_out, _grad_pre):
    x, weight, pre, mask = ctx.saved_tensors
    bias_grad = ctx.needs_input_grad[2]
    grad_x, grad_weight, grad_bias = _ops.bottleneck_backward(
        grad_out.contiguous(), x, weight, pre, mask, ctx.activation, bias_grad
    )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if bias_grad else None,
        None,
        None,
    )


torch.library.register_autograd("giblet::bottleneck", _bottleneck_backward, setup_context=_bottleneck_setup)


# --------------------------------------------------------------------------- autocast

# Under bf16/fp16 autocast the fused ops run in float32 (their kernels accumulate in
# float32 anyway): floating inputs are cast up, integer and uint8 tables untouched, and
# the layers around them keep autocast's lower precision.
for _name in ("gather_project", "grid_average", "bottleneck"):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(f"giblet::{_name}", _device_type, torch.float32)

"""bottleneck (layer 7): act(x @ weight.T + bias) * mask, lesioned units silent in both directions."""

import pytest
import torch

from giblet import ops
from giblet import ops_reference as ref

TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2), torch.float16: (1e-2, 5e-3)}
# 5 rows take the CPU's streaming kernel, 80 rows the GEMM path.
BATCHES = [5, 80]


def leaves(batch, features, units, dtype, device, with_bias=True):
    x = torch.randn(batch, features, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(units, features, device=device) / features**0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(units, device=device).to(dtype).requires_grad_(True) if with_bias else None
    return x, weight, bias


def forward_backward(fn, x, weight, bias, mask, activation):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    out = fn(inputs[0], inputs[1], inputs[2], mask, activation)
    grad_out = torch.linspace(-2, 2, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)
    return out, grads


@pytest.mark.parametrize("activation", ["identity", "gelu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference_forward_and_backward(device, activation, dtype, batch):
    x, weight, bias = leaves(batch, 37, 53, dtype, device)
    mask = torch.rand(53, device=device) > 0.25
    out, grads = forward_backward(ops.bottleneck, x, weight, bias, mask, activation)
    ref_out, ref_grads = forward_backward(ref.bottleneck, x, weight, bias, mask, activation)
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == (batch, 53)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("batch", BATCHES)
def test_without_bias_and_mask(device, batch):
    x, weight, _ = leaves(batch, 20, 30, torch.float32, device, with_bias=False)
    out, grads = forward_backward(ops.bottleneck, x, weight, None, None, "gelu")
    ref_out, ref_grads = forward_backward(ref.bottleneck, x, weight, None, None, "gelu")
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["identity", "gelu", "tanh"])
@pytest.mark.parametrize("batch", BATCHES)
def test_lesioned_units_are_silent_and_pass_no_gradient(device, activation, batch):
    x, weight, bias = leaves(batch, 16, 40, torch.float32, device)
    mask = torch.ones(40, dtype=torch.bool, device=device)
    lesioned = torch.tensor([0, 7, 8, 9, 39], device=device)
    mask[lesioned] = False
    out = ops.bottleneck(x, weight, bias, mask, activation)
    assert torch.equal(out[:, lesioned], torch.zeros(batch, 5, device=device))
    grad_x, grad_weight, grad_bias = torch.autograd.grad(out, (x, weight, bias), torch.randn_like(out))
    assert torch.equal(grad_weight[lesioned], torch.zeros(5, 16, device=device))
    assert torch.equal(grad_bias[lesioned], torch.zeros(5, device=device))
    assert grad_weight[mask].abs().sum(1).min() > 0
    # x receives gradient only through the kept units: its gradient is the one
    # of the same layer with the lesioned rows removed.
    kept = mask.nonzero().squeeze(1)
    out_kept = ref.bottleneck(x, weight[kept], bias[kept], None, activation)
    (grad_x_kept,) = torch.autograd.grad(out_kept.sum(), (x,))
    (grad_x_all,) = torch.autograd.grad(ops.bottleneck(x, weight, bias, mask, activation).sum(), (x,))
    torch.testing.assert_close(grad_x_all, grad_x_kept, atol=1e-5, rtol=1e-5)


def test_cpu_never_reads_lesioned_rows():
    # The CPU streaming kernel skips lesioned rows: NaN weights there change nothing.
    x, weight, bias = leaves(4, 16, 12, torch.float32, "cpu")
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 5]] = False
    clean = ops.bottleneck(x, weight, bias, mask)
    poisoned_weight = weight.detach().clone()
    poisoned_weight[[2, 5]] = float("nan")
    poisoned_weight.requires_grad_(True)
    out = ops.bottleneck(x, poisoned_weight, bias, mask)
    assert torch.equal(out, clean)
    grad_x, grad_weight = torch.autograd.grad(out.sum(), (x, poisoned_weight))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_weight).all()


def test_all_units_lesioned(device):
    x, weight, bias = leaves(3, 8, 6, torch.float32, device)
    out = ops.bottleneck(x, weight, bias, torch.zeros(6, dtype=torch.bool, device=device), "tanh")
    assert torch.equal(out, torch.zeros(3, 6, device=device))
    grad_x, grad_weight = torch.autograd.grad(out.sum(), (x, weight))
    assert torch.equal(grad_x, torch.zeros_like(grad_x)) and torch.equal(grad_weight, torch.zeros_like(grad_weight))


@pytest.mark.parametrize("activation", ["identity", "gelu", "tanh"])
def test_gradcheck_float64(device, activation):
    x, weight, bias = leaves(3, 6, 9, torch.float64, device)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool, device=device)
    assert torch.autograd.gradcheck(lambda a, w, b: ops.bottleneck(a, w, b, mask, activation), (x, weight, bias))


# --------------------------------------------------------------------------- bad input


def test_unknown_activation_is_rejected_in_python_and_in_the_kernel():
    x, weight, _ = leaves(2, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"activation must be one of identity, gelu, tanh; got 'relu'"):
        ops.bottleneck(x, weight, activation="relu")
    with pytest.raises(RuntimeError, match=r"activation must be one of identity, gelu, tanh; got 'relu'"):
        torch.ops.giblet.bottleneck(x, weight, None, None, "relu")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, w: (x[0], w, None, None), r"x must be 2-D \(B, K\), got shape \[4\]"),
        (lambda x, w: (x, w[:, :3], None, None), r"weight has shape \[3, 3\] but x has K=4 features; expected weight \(V, 4\)"),
        (lambda x, w: (x, w.double(), None, None), r"weight has dtype Double but x has dtype Float; expected the same dtype"),
        (lambda x, w: (x, w, torch.zeros(2), None), r"bias has shape \[2\]; expected \(3,\)"),
        (lambda x, w: (x, w, None, torch.ones(3)), r"mask must be bool \(True = unit kept\), got Float"),
        (lambda x, w: (x, w, None, torch.ones(4, dtype=torch.bool)), r"mask has shape \[4\]; expected \(3,\), one entry per unit"),
        (lambda x, w: (x.long(), w.long(), None, None), r"x must be float32, float64, float16 or bfloat16, got Long"),
    ],
)
def test_bad_input_messages(make, message):
    x, weight = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match=message):
        ops.bottleneck(*make(x, weight))


def test_backward_rejects_a_pre_activation_of_the_wrong_shape():
    x, weight, grad_out = torch.zeros(4, 8), torch.zeros(5, 8), torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match=r"pre has shape \[4, 4\]; expected \(4, 5\), the pre-activation that bottleneck returned"):
        torch.ops.giblet.bottleneck_backward(grad_out, x, weight, torch.zeros(4, 4), None, "gelu", True)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", BATCHES)
def test_identity_without_mask_is_the_linear_layer(device, with_bias, dtype, batch):
    # The bias is added by the GEMM (addmm); with identity and nothing lesioned nothing else runs.
    x, weight, bias = leaves(batch, 24, 31, dtype, device, with_bias=with_bias)
    out, grads = forward_backward(ops.bottleneck, x, weight, bias, None, "identity")
    ref_out, ref_grads = forward_backward(ref.bottleneck, x, weight, bias, None, "identity")
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == (batch, 31)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol * 10)
    _, pre = torch.ops.giblet.bottleneck(x, weight, bias, None, "identity")
    assert pre.shape == (0,)


@pytest.mark.parametrize("batch", BATCHES)
def test_pre_activation_holds_the_bias_and_zero_for_lesioned_units(device, batch):
    x, weight, bias = leaves(batch, 12, 9, torch.float64, device)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool, device=device)
    out, pre = torch.ops.giblet.bottleneck(x, weight, bias, mask, "tanh")
    expected = torch.where(mask, x @ weight.t() + bias, torch.zeros((), dtype=torch.float64, device=device))
    torch.testing.assert_close(pre, expected)
    torch.testing.assert_close(out, torch.tanh(expected))

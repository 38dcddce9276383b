"""The ops under torch.compile(fullgraph=True): fake kernels, autograd registration, no graph breaks."""

import pytest
import torch

from giblet import ops


def sample_calls(device):
    """(op, args) for every operator, with inputs that need gradients where it has them."""
    table = torch.randn(12, 8, device=device, requires_grad=True)
    frames = torch.randint(0, 256, (12, 8), dtype=torch.uint8, device=device)
    index = torch.tensor([[0, 3, -1], [3, 11, 2]], device=device)
    weight = torch.randn(5, 8, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    onsets = torch.tensor([-0.5, 0.0, 1.5, 3.0], dtype=torch.float64, device=device)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False], device=device)
    g = torch.ops.giblet
    return {
        "gather_project": (g.gather_project.default, (table, index, weight, bias, 0.5, 0.1)),
        "gather_project_uint8": (g.gather_project.default, (frames, index, weight, None, 1 / 255, 0.0)),
        "grid_index": (g.grid_index.default, (100, 25.0, onsets, 1.5, 6)),
        "resample_codes": (g.resample_codes.default, (torch.randint(0, 9, (4, 300), device=device), 75.0, onsets, 1.5, 5, 9)),
        "grid_average": (g.grid_average.default, (torch.randn(90, 3, device=device, requires_grad=True), 43.0, onsets, 1.5, 4)),
        "bottleneck_identity": (g.bottleneck.default, (x, weight, bias, mask, "identity")),
        "bottleneck_gelu": (g.bottleneck.default, (x, weight, bias, mask, "gelu")),
        "bottleneck_tanh": (g.bottleneck.default, (x, weight, None, None, "tanh")),
    }


@pytest.mark.parametrize("name", list(sample_calls("cpu")))
def test_opcheck(device, name):
    """torch.library.opcheck: schema, fake kernel, autograd registration and dispatch agree."""
    op, args = sample_calls(device)[name]
    torch.library.opcheck(op, args)


def model_step(frames, index, weight, bias, codes, onsets, values, mask, bottleneck_weight):
    """All ops in one graph, as the model uses them."""
    projected = ops.gather_project(frames, index, weight, bias, scale=1 / 255)
    positions = ops.grid_index(codes.shape[1], 75.0, onsets, 1.5, 4)
    resampled = ops.resample_codes(codes, 75.0, onsets, 1.5, 4, pad=-1)
    mel = ops.grid_average(values, 43.0, onsets, 1.5, 4)
    features = projected.flatten(1) + mel.flatten(1).sum(1, keepdim=True)
    brain = ops.bottleneck(features, bottleneck_weight, None, mask, "gelu")
    return brain.square().mean() + positions.sum() * 0 + resampled.sum() * 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(device, backend):
    torch._dynamo.reset()
    frames = torch.randint(0, 256, (20, 16), dtype=torch.uint8, device=device)
    index = torch.tensor([[0, 1, 2], [2, 3, -1]], device=device)
    weight = torch.randn(4, 16, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    codes = torch.randint(0, 9, (2, 400), device=device)
    onsets = torch.tensor([0.0, 1.5], dtype=torch.float64, device=device)
    values = torch.randn(200, 3, device=device, requires_grad=True)
    mask = torch.tensor([True, False, True, True, True, False, True], device=device)
    bottleneck_weight = torch.randn(7, 12, device=device, requires_grad=True)
    args = (frames, index, weight, bias, codes, onsets, values, mask, bottleneck_weight)

    eager = model_step(*args)
    eager_grads = torch.autograd.grad(eager, (weight, bias, values, bottleneck_weight))
    compiled = torch.compile(model_step, fullgraph=True, backend=backend)(*args)
    compiled_grads = torch.autograd.grad(compiled, (weight, bias, values, bottleneck_weight))
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)

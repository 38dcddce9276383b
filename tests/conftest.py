"""Shared fixtures: every op test runs on each device; CUDA cases skip, saying so, without a GPU."""

import pytest
import torch

import giblet.ops  # noqa: F401  (fails loudly if the extension is not built)

NO_GPU = "CUDA test skipped: no CUDA GPU on this machine (torch.cuda.is_available() is False)"


def _device_params():
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
    ]


@pytest.fixture(params=_device_params())
def device(request):
    if request.param == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("giblet::bottleneck", "CUDA"):
        pytest.fail("a CUDA GPU is present but giblet._C was built without CUDA kernels: rebuild with GIBLET_CUDA=1")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

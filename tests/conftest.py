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


# --------------------------------------------------------------------------- data fixtures (synthesized once per session)

STORE_SETTINGS = {
    "audio": {"features": ["mel", "codes"], "encodec_model": "random", "bandwidth_kbps": 6.0},
    "window": {"lookback_s": 8.0, "hrf_length_s": 20.0},
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A `tiny` synthetic dataset in the Sherlock layout (read-only: copy it before changing anything)."""
    from giblet.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_config():
    from giblet.config import from_dict

    return from_dict(STORE_SETTINGS, "test settings")


@pytest.fixture(scope="session")
def tiny_store(tiny_data, tiny_config, tmp_path_factory):
    from giblet.data.store import prepare

    return prepare(tiny_data, tiny_config, tmp_path_factory.mktemp("stores") / "tiny", progress=False)

"""TR-grid resampling: grid_index, resample_codes, grid_average.

Boundaries come from exact times, never from rounded per-TR counts: 25 fps
gives 37.5 frames per 1.5 s TR and EnCodec's 75 Hz gives 112.5 codes.
"""

from fractions import Fraction
import math

import pytest
import torch

from giblet import ops
from giblet import ops_reference as ref

TR = 1.5
N_TRS = 2000
RATES = {"video 25 fps": 25.0, "EnCodec 75 Hz": 75.0, "mel 22050/512 Hz": 22050 / 512}


def exact_index(onset, k, window, n_out, rate, n_samples):
    """floor((onset + (k + 0.5) * window / n_out) * rate) in exact rational arithmetic."""
    position = math.floor((Fraction(onset) + (k + Fraction(1, 2)) * Fraction(window) / n_out) * Fraction(rate))
    return position if 0 <= position < n_samples else -1


@pytest.mark.parametrize("rate", RATES.values(), ids=RATES.keys())
def test_grid_index_has_no_drift_over_2000_trs(device, rate):
    n_out = 38
    n_samples = int(N_TRS * TR * rate)
    onsets = torch.arange(N_TRS, dtype=torch.float64, device=device) * TR
    got = ops.grid_index(n_samples, rate, onsets, TR, n_out).cpu()
    for tr in (0, 1, 2, 999, 1998, 1999):
        want = [exact_index(tr * TR, k, TR, n_out, rate, n_samples) for k in range(n_out)]
        assert got[tr].tolist() == want, f"TR {tr}"
    # Every TR starts where the exact clock says, not where a per-TR count would put it.
    first = got[:, 0]
    expected_first = torch.tensor([exact_index(i * TR, 0, TR, n_out, rate, n_samples) for i in range(N_TRS)])
    assert torch.equal(first, expected_first)


def test_grid_index_25fps_windows():
    # 1.5 s at 25 fps is 37.5 frames: TR 0 covers frames 0..37, TR 1 starts in frame 37.
    index = ops.grid_index(1000, 25.0, [0.0, 1.5], 1.5, 3)
    assert index.tolist() == [[6, 18, 31], [43, 56, 68]]


def test_grid_index_is_minus_one_outside_the_stream(device):
    onsets = torch.tensor([-1.5, -0.5, 0.0, 9.0, 10.0], dtype=torch.float64, device=device)
    got = ops.grid_index(100, 10.0, onsets, 1.0, 4).cpu()
    assert got.tolist() == [
        [-1, -1, -1, -1],
        [-1, -1, 1, 3],
        [1, 3, 6, 8],
        [91, 93, 96, 98],
        [-1, -1, -1, -1],
    ]
    assert torch.equal(got, ref.grid_index(100, 10.0, onsets.cpu(), 1.0, 4))


@pytest.mark.parametrize("code_dtype", [torch.int16, torch.int32, torch.int64])
def test_resample_codes_matches_reference(device, code_dtype):
    codes = torch.randint(0, 1024, (8, 3000), device=device).to(code_dtype)
    onsets = torch.arange(-3, 30, dtype=torch.float64, device=device) * TR
    got = ops.resample_codes(codes, 75.0, onsets, TR, 112, pad=1024)
    assert got.dtype == torch.int64 and got.shape == (33, 8, 112)
    assert torch.equal(got, ref.resample_codes(codes, 75.0, onsets, TR, 112, 1024))
    # Windows before the stream start are all pad; the codebook axis is kept intact.
    assert torch.equal(got[:2], torch.full_like(got[:2], 1024))
    assert torch.equal(got[3, :, 0], codes[:, 0].long())


def test_resample_codes_non_contiguous(device):
    codes = torch.randint(0, 1024, (500, 4), device=device).t()  # (4, 500), column-major
    onsets = torch.arange(5, dtype=torch.float64, device=device)
    got = ops.resample_codes(codes, 75.0, onsets, 1.0, 10, pad=-7)
    assert torch.equal(got, ref.resample_codes(codes, 75.0, onsets, 1.0, 10, -7))


def test_resample_codes_rejects_a_batch_axis():
    codes = torch.zeros(1, 8, 100, dtype=torch.int64)  # EnCodec's encoder output
    with pytest.raises(RuntimeError, match=r"codes has shape \[1, 8, 100\] with a batch axis; expected \(n_q, T\): drop the batch axis"):
        ops.resample_codes(codes, 75.0, [0.0], 1.5, 4, pad=0)


def test_resample_codes_rejects_float_codes():
    with pytest.raises(RuntimeError, match=r"codes must be int16, int32 or int64, got Float"):
        ops.resample_codes(torch.zeros(8, 100), 75.0, [0.0], 1.5, 4, pad=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_average_matches_exact_overlap_weights(device, dtype):
    values = torch.randn(400, 16, device=device, dtype=dtype)
    rate = 22050 / 512
    onsets = torch.arange(-2, 8, dtype=torch.float64, device=device) * TR  # partly before the stream
    got = ops.grid_average(values, rate, onsets, TR, 7)
    want = ref.grid_average(values, rate, onsets, TR, 7)
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)


def test_grid_average_of_a_constant_is_the_constant_where_covered(device):
    values = torch.full((100, 3), 2.5, device=device, dtype=torch.float64)
    got = ops.grid_average(values, 10.0, [-0.25, 0.0, 9.75], 0.5, 2).cpu()
    # [-0.25, 0) is before the stream: 0. [9.75, 10.0) is covered, [10.0, 10.25) is not.
    assert got[0, 0].tolist() == [0.0] * 3
    assert got[0, 1].tolist() == [2.5] * 3
    assert got[1].flatten().tolist() == [2.5] * 6
    assert got[2, 0].tolist() == [2.5] * 3 and got[2, 1].tolist() == [0.0] * 3


def test_grid_average_weights_by_fractional_overlap():
    # [0.05, 0.25) at 10 Hz overlaps frame 0 for 0.05 s, frame 1 for 0.1 s and frame 2 for 0.05 s.
    values = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    got = ops.grid_average(values, 10.0, [0.05], 0.2, 1)
    assert got.item() == pytest.approx((0.05 * 1 + 0.1 * 2 + 0.05 * 4) / 0.2)


def test_grid_average_gradcheck(device):
    values = torch.randn(60, 3, dtype=torch.float64, device=device, requires_grad=True)
    onsets = torch.tensor([-0.3, 0.0, 0.7, 5.5], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda v: ops.grid_average(v, 10.0, onsets, 0.9, 4), (values,))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.grid_index(10, 0.0, [0.0], 1.0, 2), r"rate must be a positive number of samples per second, got 0"),
        (lambda: ops.grid_index(10, 25.0, [0.0], -1.0, 2), r"window must be a positive duration in seconds, got -1"),
        (lambda: ops.grid_index(10, 25.0, [0.0], 1.0, 0), r"n_out must be at least 1, got 0"),
        (lambda: ops.grid_average(torch.zeros(10), 25.0, [0.0], 1.0, 2), r"values must be 2-D \(T, C\) of feature frames, got shape \[10\]"),
        (lambda: ops.grid_average(torch.zeros(10, 2, dtype=torch.int64), 25.0, [0.0], 1.0, 2), r"values must be float32, float64, float16 or bfloat16, got Long"),
        (lambda: torch.ops.giblet.grid_index(10, 25.0, torch.zeros(2), 1.0, 2), r"onsets must be float64 seconds, got Float"),
        (lambda: ops.grid_average(torch.zeros(10, 2), 25.0, [0.0, float("nan")], 1.0, 2), r"onsets must be finite seconds, got onsets\[1\] = nan"),
        (lambda: ops.grid_index(10, 25.0, [float("inf")], 1.0, 2), r"onsets must be finite seconds, got onsets\[0\] = inf"),
    ],
)
def test_bad_grid_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()

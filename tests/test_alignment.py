"""One clock: causal HRF, FIR delays, exact TR grids without drift, overlap instead of stretching."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from giblet import ops
from giblet.data.alignment import HRF_KINDS, align, canonical_hrf, convolve_hrf, fir_delays, tr_onsets, window_counts
from giblet.data.splits import split_blocks
from giblet.errors import DataError


@pytest.mark.parametrize("kind", HRF_KINDS)
def test_an_impulse_peaks_5_to_6_s_later_and_never_before(kind):
    dt = 0.1
    impulse = np.zeros(600)
    at = 200  # 20 s
    impulse[at] = 1.0
    response = convolve_hrf(impulse, dt, kind)
    assert np.all(response[:at] == 0.0), "the response starts before its cause"
    peak_delay = (np.argmax(response) - at) * dt
    assert 4.5 <= peak_delay <= 6.0
    assert canonical_hrf(dt, kind=kind)[0] == 0.0


@pytest.mark.parametrize("kind", HRF_KINDS)
def test_hrf_at_the_tr_grid_is_causal_for_an_impulse_at_tr_50(kind):
    # The old system's impulse at TR 50 peaked at TR 44.
    impulse = np.zeros(120)
    impulse[50] = 1.0
    response = convolve_hrf(impulse, 1.5, kind)
    assert np.argmax(response) in (53, 54)  # 4.5-6 s later at TR 1.5 s
    assert np.all(response[:50] == 0.0)


def test_convolution_is_linear_and_works_on_many_columns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = convolve_hrf(x, 1.5)
    assert y.shape == x.shape
    np.testing.assert_allclose(y[:, 2], convolve_hrf(x[:, 2], 1.5), atol=1e-10)
    # Direct causal sum for one column.
    kernel = canonical_hrf(1.5)
    direct = np.array([sum(kernel[k] * x[t - k, 0] for k in range(min(t + 1, kernel.size))) for t in range(300)])
    np.testing.assert_allclose(y[:, 0], direct, atol=1e-9)


def test_fir_delays_see_only_the_past():
    x = np.arange(1, 7, dtype=float)[:, None]
    stacked = fir_delays(x, [0, 1, 3])
    np.testing.assert_array_equal(stacked[:, 0], x[:, 0])
    np.testing.assert_array_equal(stacked[:, 1], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(stacked[:, 2], [0, 0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="causal"):
        fir_delays(x, [-1])


RATES = {"25 fps": Fraction(25), "23.976 fps": Fraction(24000, 1001), "EnCodec 75 Hz": Fraction(75)}


@pytest.mark.parametrize("name", list(RATES))
def test_grid_index_at_tr_1975_is_within_half_a_sample_of_exact(name):
    rate = RATES[name]
    tr = Fraction(3, 2)
    n_out = 48
    lookback = Fraction(10)
    window = lookback + tr
    n_samples = int(2000 * tr * rate) + 10
    onsets = tr_onsets(1976, 1.5) - 10.0
    index = ops.grid_index(n_samples, float(rate), torch.from_numpy(onsets), float(window), n_out).numpy()
    t = 1975
    for k in range(n_out):
        centre = t * tr - lookback + (k + Fraction(1, 2)) * window / n_out
        exact = int(np.floor(centre * rate))
        assert index[t, k] == exact
        sample_centre = (Fraction(int(index[t, k])) + Fraction(1, 2)) / rate
        assert abs(sample_centre - centre) <= Fraction(1, 2) / rate


@pytest.mark.parametrize("name", list(RATES))
def test_per_tr_counts_come_from_exact_times_and_do_not_drift(name):
    rate = float(RATES[name])
    n_trs = 1976
    onsets = tr_onsets(n_trs, 1.5)
    n_samples = int(np.ceil(n_trs * 1.5 * rate))
    low, high = window_counts(rate, onsets, 1.5, n_samples)
    per_tr = 1.5 * rate
    assert (low, high) == (int(np.floor(per_tr)), int(np.ceil(per_tr))) or low == high == per_tr
    # The first sample of TR 1975 is where exact time says, while rounding each TR's count drifts.
    first_exact = int(np.ceil(1975 * 1.5 * rate - 1e-9))
    first_grid = ops.grid_index(n_samples, rate, torch.tensor([1975 * 1.5]), 1.5, 1).item()
    assert abs(first_grid - first_exact) <= int(np.ceil(per_tr / 2)) + 1
    rounded_total = 1975 * int(round(per_tr))
    if per_tr != round(per_tr):
        assert abs(rounded_total - first_exact) > 1, "the drift the exact grid avoids"


def test_overlap_is_used_and_a_longer_scan_is_dropped_not_stretched():
    a = align(1426.0, 1976, 1.5)
    assert (a.first_tr, a.n_trs) == (0, 950)
    assert a.fmri_beyond_s == pytest.approx(1976 * 1.5 - 1426.0)
    assert any("dropped scan TRs 950-1975" in note for note in a.notes)
    np.testing.assert_allclose(a.onsets()[949], 949 * 1.5)


def test_stimulus_onset_offsets_the_clock():
    a = align(300.0, 210, 1.5, stimulus_onset_s=3.0)
    assert a.first_tr == 2
    assert a.onsets()[0] == 0.0
    assert a.onsets()[-1] + 1.5 <= 300.0


def test_a_movie_longer_than_the_scan_beyond_tolerance_fails_naming_both():
    with pytest.raises(DataError) as error:
        align(1426.0, 600, 1.5, max_stimulus_beyond_s=30.0, stimulus_source="movie.m4v", fmri_source="s1.nii.gz")
    message = str(error.value)
    assert "movie.m4v" in message and "s1.nii.gz" in message and "alignment.max_stimulus_beyond_s" in message
    align(1426.0, 940, 1.5, max_stimulus_beyond_s=30.0)  # 16 s over: tolerated


def test_a_scan_longer_than_the_movie_fails_only_with_a_limit():
    with pytest.raises(DataError, match="max_fmri_beyond_s"):
        align(1426.0, 1976, 1.5, max_fmri_beyond_s=10.0)


def test_splits_are_contiguous_blocks_separated_by_gaps():
    blocks, gap_trs = split_blocks(950, 1.5, 0.1, 0.1, gap_s=42.0, min_gap_s=42.0)
    assert gap_trs == 28
    assert blocks["train"][0] == 0 and blocks["test"][1] == 950
    assert blocks["val"][0] - blocks["train"][1] == gap_trs
    assert blocks["test"][0] - blocks["val"][1] == gap_trs
    assert blocks["test"][1] - blocks["test"][0] == 95
    with pytest.raises(DataError, match="lookback_s"):
        split_blocks(950, 1.5, 0.1, 0.1, gap_s=5.0, min_gap_s=42.0)
    with pytest.raises(DataError, match="cannot hold"):
        split_blocks(60, 1.5, 0.1, 0.1, gap_s=42.0, min_gap_s=42.0)

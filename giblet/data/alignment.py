"""One clock in seconds: TR onsets, the stimulus/fMRI overlap, the canonical HRF and FIR delays.

Stimulus time 0 is the first video frame. The scan starts ``stimulus_onset_s``
seconds *before* the movie does (the movie began that many seconds into the scan),
so TR ``t`` of the scan starts at stimulus time ``t * tr - stimulus_onset_s``.
Nothing is ever time-stretched: when the movie and the scan differ in length,
the overlap is used, what was dropped is reported, and a mismatch beyond the
tolerance is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
from scipy.signal import lfilter
from scipy.stats import gamma

from giblet.errors import DataError

HRF_KINDS = ("glover", "spm")
# Both canonical responses have settled to < 1% of their peak by 32 s (SPM's kernel length).
HRF_LENGTH_S = 32.0


def hrf_value(seconds: np.ndarray, kind: str = "glover") -> np.ndarray:
    """The canonical haemodynamic response at ``seconds`` after an impulse; 0 for t <= 0 (causal).

    ``glover``: Glover (1999), peak at 5.4 s, undershoot at 10.8 s (ratio 0.35).
    ``spm``: SPM's double gamma, peak at 5 s, undershoot at 15 s (ratio 1/6).
    """
    t = np.asarray(seconds, dtype=np.float64)
    positive = np.where(t > 0, t, 0.0)
    if kind == "glover":
        peak1, width1, peak2, width2, ratio = 5.4, 5.2, 10.8, 7.35, 0.35
        a1 = 8.0 * math.log(2.0) * peak1**2 / width1**2
        b1 = width1**2 / (8.0 * math.log(2.0) * peak1)
        a2 = 8.0 * math.log(2.0) * peak2**2 / width2**2
        b2 = width2**2 / (8.0 * math.log(2.0) * peak2)
        with np.errstate(divide="ignore", invalid="ignore"):
            first = (positive / peak1) ** a1 * np.exp(-(positive - peak1) / b1)
            second = (positive / peak2) ** a2 * np.exp(-(positive - peak2) / b2)
        response = first - ratio * second
    elif kind == "spm":
        response = gamma.pdf(positive, 6.0) - gamma.pdf(positive, 16.0) / 6.0
    else:
        raise ValueError(f"unknown HRF kind {kind!r}; expected one of {', '.join(HRF_KINDS)}")
    return np.where(t > 0, response, 0.0)


def canonical_hrf(dt: float, length_s: float = HRF_LENGTH_S, kind: str = "glover") -> np.ndarray:
    """The HRF sampled every ``dt`` seconds from 0 to ``length_s``, scaled to a peak of 1.

    ``kernel[k]`` is the response ``k * dt`` seconds after the impulse; ``kernel[0]`` is 0,
    so convolving with it can never move a response earlier than its cause.
    """
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}")
    kernel = hrf_value(np.arange(int(math.ceil(length_s / dt)) + 1) * dt, kind)
    return kernel / kernel.max()


def convolve_hrf(signal: np.ndarray, dt: float, kind: str = "glover", length_s: float = HRF_LENGTH_S) -> np.ndarray:
    """Causal convolution along axis 0: ``out[t] = sum_k kernel[k] * signal[t - k]``, same length."""
    signal = np.asarray(signal, dtype=np.float64)
    # A direct FIR filter: exact zeros before an impulse (an FFT leaves 1e-17 there).
    return lfilter(canonical_hrf(dt, length_s, kind), [1.0], signal, axis=0)


def fir_delays(features: np.ndarray, delays: Sequence[int]) -> np.ndarray:
    """Stack delayed copies of ``features (T, F)``: columns ``[x[t - d] for d in delays]``, zeros before the start.

    Delays are in samples (TRs) and must be >= 0: row ``t`` only sees the past and present.
    """
    features = np.asarray(features)
    if features.ndim == 1:
        features = features[:, None]
    if any(d < 0 for d in delays):
        raise ValueError(f"FIR delays must be >= 0 (causal), got {list(delays)}")
    n, width = features.shape
    out = np.zeros((n, width * len(delays)), dtype=features.dtype)
    for j, d in enumerate(delays):
        if d < n:
            out[d:, j * width : (j + 1) * width] = features[: n - d]
    return out


def tr_onsets(n_trs: int, tr_s: float, stimulus_onset_s: float = 0.0, first_tr: int = 0) -> np.ndarray:
    """Stimulus-clock start of TRs ``first_tr .. first_tr + n_trs - 1``, float64, each computed from its index."""
    return (first_tr + np.arange(n_trs, dtype=np.float64)) * tr_s - stimulus_onset_s


def window_counts(rate: float, onsets: np.ndarray, window_s: float, n_samples: int) -> tuple:
    """Fewest and most stream samples starting inside ``[onset, onset + window)`` over the TRs, from exact times.

    Sample ``i`` starts at ``i / rate``; samples outside ``[0, n_samples)`` are not counted.
    """
    onsets = np.asarray(onsets, dtype=np.float64)
    first = np.clip(np.ceil(onsets * rate - 1e-9), 0, n_samples)
    stop = np.clip(np.ceil((onsets + window_s) * rate - 1e-9), 0, n_samples)
    counts = (stop - first).astype(np.int64)
    return int(counts.min()), int(counts.max())


@dataclass
class Alignment:
    """Which scan TRs the stimulus covers, and what was dropped on each side."""

    tr_s: float
    stimulus_onset_s: float
    stimulus_duration_s: float
    fmri_trs: int
    first_tr: int  # first scan TR used
    n_trs: int  # TRs used: first_tr .. first_tr + n_trs - 1
    fmri_beyond_s: float  # scan time after the end of the stimulus (dropped)
    stimulus_beyond_s: float  # stimulus time after the end of the scan (dropped)
    notes: List[str] = field(default_factory=list)
    subject_trs: List[int] = field(default_factory=list)  # store TRs each subject has (fewer when cut short)

    def onsets(self) -> np.ndarray:
        return tr_onsets(self.n_trs, self.tr_s, self.stimulus_onset_s, self.first_tr)


def align(
    stimulus_duration_s: float,
    fmri_trs: int,
    tr_s: float,
    stimulus_onset_s: float = 0.0,
    max_stimulus_beyond_s: float = 30.0,
    max_fmri_beyond_s: Optional[float] = None,
    stimulus_source: str = "stimulus",
    fmri_source: str = "fMRI",
) -> Alignment:
    """Use the TRs whose whole interval lies inside the stimulus; fail beyond the tolerances.

    A scan that runs past the end of the movie is common (Sherlock's files hold
    1,976 TRs, the movie file covers ~950); those TRs are dropped and reported,
    and only fail when ``max_fmri_beyond_s`` is set and exceeded. A movie that
    runs past the end of the scan by more than ``max_stimulus_beyond_s`` means the
    files do not belong together, and fails.
    """
    if tr_s <= 0:
        raise DataError(fmri_source, f"TR is {tr_s} s", expected="a positive TR in seconds")
    if stimulus_duration_s <= 0:
        raise DataError(stimulus_source, f"duration is {stimulus_duration_s} s", expected="a positive duration")
    eps = 1e-6
    first_tr = max(0, int(math.ceil((stimulus_onset_s - eps) / tr_s)))
    # TR t is usable when [t*tr - onset, (t+1)*tr - onset) lies inside [0, duration].
    last_stop = int(math.floor((stimulus_duration_s + stimulus_onset_s + eps) / tr_s))
    stop_tr = min(fmri_trs, last_stop)
    n_trs = max(0, stop_tr - first_tr)
    scan_end = fmri_trs * tr_s - stimulus_onset_s
    fmri_beyond = max(0.0, scan_end - stimulus_duration_s)
    stimulus_beyond = max(0.0, stimulus_duration_s - scan_end)
    notes = []
    if first_tr:
        notes.append(f"dropped scan TRs 0-{first_tr - 1}: before the stimulus starts ({stimulus_onset_s:g} s into the scan)")
    if stop_tr < fmri_trs:
        notes.append(
            f"dropped scan TRs {stop_tr}-{fmri_trs - 1} ({fmri_trs - stop_tr} TRs, {fmri_beyond:.1f} s): "
            f"after the stimulus ends at {stimulus_duration_s:.2f} s"
        )
    if stimulus_beyond > eps:
        notes.append(f"stimulus after the last TR ({stimulus_beyond:.2f} s) is not used")
    if stimulus_beyond > max_stimulus_beyond_s:
        raise DataError(
            stimulus_source,
            f"the stimulus lasts {stimulus_duration_s:.2f} s but the scan ({fmri_source}: {fmri_trs} TRs x {tr_s:g} s, "
            f"stimulus onset {stimulus_onset_s:g} s) ends at {scan_end:.2f} s: {stimulus_beyond:.2f} s of stimulus has no fMRI",
            expected=f"at most alignment.max_stimulus_beyond_s = {max_stimulus_beyond_s:g} s",
            fix="check that the movie and the scans belong together, or raise alignment.max_stimulus_beyond_s",
        )
    if max_fmri_beyond_s is not None and fmri_beyond > max_fmri_beyond_s:
        raise DataError(
            fmri_source,
            f"the scan runs {fmri_beyond:.2f} s past the end of the stimulus ({stimulus_source}, {stimulus_duration_s:.2f} s)",
            expected=f"at most alignment.max_fmri_beyond_s = {max_fmri_beyond_s:g} s",
            fix="raise alignment.max_fmri_beyond_s, or set it to null to drop the extra TRs",
        )
    if n_trs == 0:
        raise DataError(
            fmri_source,
            f"no TR overlaps the stimulus (onset {stimulus_onset_s:g} s, {fmri_trs} TRs x {tr_s:g} s, stimulus {stimulus_duration_s:.2f} s)",
            expected="a scan that overlaps the movie",
            fix="check alignment.stimulus_onset_s",
        )
    return Alignment(tr_s, stimulus_onset_s, stimulus_duration_s, fmri_trs, first_tr, n_trs, fmri_beyond, stimulus_beyond, notes)

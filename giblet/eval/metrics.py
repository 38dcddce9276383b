"""Scores per voxel over time: Pearson r, leave-one-subject-out noise ceilings, ridge baselines.

Every correlation here is per voxel *over time* (TRs), never across voxels within a TR.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
from scipy.stats import t as student_t

from giblet.data.fmri import pearson_r  # noqa: F401  (defined with the series it scores; scored from here)


def _present(subjects: np.ndarray, present) -> np.ndarray:
    if present is None:
        return np.ones(subjects.shape[:2], dtype=bool)
    present = np.asarray(present, dtype=bool)
    if present.shape != subjects.shape[:2]:
        raise ValueError(f"present has shape {present.shape}; expected (subjects, TRs) = {subjects.shape[:2]}")
    return present


def mean_subject_r(prediction: np.ndarray, subjects: np.ndarray, present=None) -> np.ndarray:
    """Per voxel, the mean over subjects of r between ``prediction (T, V)`` and each subject's ``(T, V)`` series,
    each over the TRs it has (``present (S, T)`` bool; default all). A subject with fewer than 3 TRs is left out."""
    present = _present(subjects, present)
    kept = [s for s in range(subjects.shape[0]) if present[s].sum() >= 3]
    if not kept:
        raise ValueError("no subject has 3 or more TRs in this block")
    return np.mean([pearson_r(prediction[present[s]], subjects[s][present[s]]) for s in kept], axis=0)


def noise_ceiling(subjects: np.ndarray, present=None) -> np.ndarray:
    """Leave-one-subject-out intersubject correlation per voxel: ``(S, T, V) -> (V,)``.

    For each subject, r between its series and the mean of the others; averaged over
    subjects. It estimates how well the shared (stimulus-driven) signal can predict one
    subject, the ceiling for a model's per-subject r. With ``present (S, T)`` bool (subjects cut
    short), each TR's mean is over the other subjects that have it, and each subject's r is over its TRs
    that at least one other subject has.
    """
    subjects = np.asarray(subjects, dtype=np.float64)
    n = subjects.shape[0]
    if n < 2:
        raise ValueError("a leave-one-subject-out noise ceiling needs at least 2 subjects")
    present = _present(subjects, present)
    weights = present[:, :, None].astype(np.float64)
    total, count = (subjects * weights).sum(axis=0), present.sum(axis=0)
    rs = []
    for s in range(n):
        others = count - present[s]
        rows = present[s] & (others > 0)
        if rows.sum() < 3:
            continue
        rest = (total[rows] - subjects[s][rows] * weights[s][rows]) / others[rows, None]
        rs.append(pearson_r(subjects[s][rows], rest))
    return np.mean(rs, axis=0)


BOOTSTRAP_BLOCK_S = 12.0  # about the span of the haemodynamic response: TRs closer than this are not independent
BOOTSTRAP_RESAMPLES = 1000


def paired_difference(first: np.ndarray, second: np.ndarray, target: np.ndarray, groups: Dict[str, np.ndarray],
                      block_trs: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      scales: Optional[Dict[str, float]] = None) -> Dict[str, Dict[str, object]]:
    """How much better ``first`` predicts ``target`` than ``second`` does (all ``(T, V)``), per voxel group: the
    difference of their mean r over the group's voxels (``groups``: name -> ``(V,)`` bool), with a 95% interval
    from a block bootstrap of the TRs: both predictions are scored on the same resampled TRs, so the block's own
    luck counts once. The TRs are cut into contiguous blocks of ``block_trs`` (some a TR longer where ``T`` does
    not divide); a resample draws as many blocks with replacement. ``scales[group]``, where given, divides that
    group's figures (e.g. the noise-free signal's mean r there, for fractions of that ceiling). The TRs of a
    held-out block are one sample of the movie: an interval that holds 0 says the block cannot tell the two
    apart, whatever the sign of the difference.
    """
    if first.shape != target.shape or second.shape != target.shape:
        raise ValueError(f"predictions {first.shape} and {second.shape} must match the target {target.shape}")
    n_trs = target.shape[0]
    n_blocks = max(2, n_trs // max(1, int(block_trs)))
    if n_trs < 2 * 3:
        raise ValueError(f"{n_trs} TRs: too few for a block bootstrap (at least 6, 2 blocks of 3)")
    used = np.any(np.stack(list(groups.values())), axis=0)
    series = [np.asarray(x[:, used], dtype=np.float64) for x in (first, second, target)]
    series = [x - x.mean(axis=0) for x in series]  # centred once: the sums below lose nothing to large means
    a, b, t = series
    blocks = np.array_split(np.arange(n_trs), n_blocks)
    lengths = np.array([len(block) for block in blocks], dtype=np.float64)
    # Per block, the sums a Pearson r is made of: a resample's sums are a weighted sum of its blocks'.
    stats = np.stack([np.stack([x[block].sum(axis=0) for x in (a, b, t, a * a, b * b, t * t, a * t, b * t)]) for block in blocks])

    def mean_difference(weights: np.ndarray) -> Dict[str, np.ndarray]:
        """``weights (R, blocks)``: how often each block is drawn -> per group, each resample's difference."""
        sums = np.einsum("rk,ksv->rsv", weights, stats)
        n = (weights @ lengths)[:, None]
        sa, sb, st, saa, sbb, stt, sat, sbt = (sums[:, i] for i in range(8))
        var_t = n * stt - st * st

        def r(s_x, s_xx, s_xt):
            denominator = np.sqrt(np.clip(n * s_xx - s_x * s_x, 0, None) * np.clip(var_t, 0, None))
            with np.errstate(invalid="ignore", divide="ignore"):
                value = (n * s_xt - s_x * st) / denominator
            return np.where(denominator > 0, value, 0.0)

        delta = r(sa, saa, sat) - r(sb, sbb, sbt)
        return {name: delta[:, members[used]].mean(axis=1) for name, members in groups.items()}

    observed = mean_difference(np.ones((1, n_blocks)))
    rng = np.random.default_rng(seed)
    draws: Dict[str, List[np.ndarray]] = {name: [] for name in groups}
    for start in range(0, resamples, 25):  # 25 resamples at a time: (25, 8, voxels) float64, 140 MB at Sherlock size
        count = min(25, resamples - start)
        picks = rng.integers(0, n_blocks, size=(count, n_blocks))
        weights = np.stack([np.bincount(row, minlength=n_blocks) for row in picks]).astype(np.float64)
        for name, values in mean_difference(weights).items():
            draws[name].append(values)
    # A t interval on the blocks: the resamples' spread, widened by blocks / (blocks - 1) (the bootstrap's shortfall
    # in variance) and times Student's t with blocks - 1 degrees of freedom. On simulated blocks of 60 TRs in 7
    # blocks, two equally good predictions: it holds 0 for 0.975 of them; the resamples' 2.5-97.5 percentiles, 0.905.
    quantile = float(student_t.ppf(0.975, n_blocks - 1))
    out: Dict[str, Dict[str, object]] = {}
    for name in groups:
        scale = (scales or {}).get(name, 1.0)
        difference = float(observed[name][0])
        half_width = quantile * float(np.concatenate(draws[name]).std(ddof=1)) * math.sqrt(n_blocks / (n_blocks - 1))
        out[name] = {"difference": difference / scale,
                     "interval_95": [(difference - half_width) / scale, (difference + half_width) / scale],
                     "blocks": n_blocks, "block_trs": int(block_trs), "resamples": resamples}
    return out


def format_lead(versus: Optional[dict], digits: int = 3) -> str:
    """``+0.004 [-0.006, +0.013]``: a ``paired_difference`` result's difference and 95% interval; "-" without one."""
    if not versus:
        return "-"
    low, high = versus["interval_95"]
    return f"{versus['difference']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"

"""Scores per voxel over time: Pearson r, leave-one-subject-out noise ceilings, ridge baselines.

Every correlation here is per voxel *over time* (TRs), never across voxels within a TR.
"""

from __future__ import annotations

import numpy as np


def pearson_r(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-column Pearson r over rows: ``(T, V), (T, V) -> (V,)``; 0 where either column is constant."""
    p = np.asarray(prediction, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p = p - p.mean(axis=0)
    t = t - t.mean(axis=0)
    denominator = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / denominator
    return np.where(denominator > 0, r, 0.0)


def noise_ceiling(subjects: np.ndarray) -> np.ndarray:
    """Leave-one-subject-out intersubject correlation per voxel: ``(S, T, V) -> (V,)``.

    For each subject, r between its series and the mean of the others; averaged over
    subjects. It estimates how well the shared (stimulus-driven) signal can predict one
    subject, the ceiling for a model's per-subject r.
    """
    subjects = np.asarray(subjects, dtype=np.float64)
    n = subjects.shape[0]
    if n < 2:
        raise ValueError("a leave-one-subject-out noise ceiling needs at least 2 subjects")
    total = subjects.sum(axis=0)
    return np.mean([pearson_r(subjects[s], (total - subjects[s]) / (n - 1)) for s in range(n)], axis=0)

"""Scores per voxel over time: Pearson r, leave-one-subject-out noise ceilings, ridge baselines.

Every correlation here is per voxel *over time* (TRs), never across voxels within a TR.
"""

from __future__ import annotations

import numpy as np

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

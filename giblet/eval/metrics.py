"""Scores per voxel over time: Pearson r, leave-one-subject-out noise ceilings, ridge baselines.

Every correlation here is per voxel *over time* (TRs), never across voxels within a TR.
"""

from __future__ import annotations

import numpy as np

# Defined with the series they score (the trainer reads the ceiling too); scored from here.
from giblet.data.fmri import noise_ceiling, pearson_r, subjects_present  # noqa: F401


def mean_subject_r(prediction: np.ndarray, subjects: np.ndarray, present=None) -> np.ndarray:
    """Per voxel, the mean over subjects of r between ``prediction (T, V)`` and each subject's ``(T, V)`` series,
    each over the TRs it has (``present (S, T)`` bool; default all). A subject with fewer than 3 TRs is left out."""
    present = subjects_present(subjects, present)
    kept = [s for s in range(subjects.shape[0]) if present[s].sum() >= 3]
    if not kept:
        raise ValueError("no subject has 3 or more TRs in this block")
    return np.mean([pearson_r(prediction[present[s]], subjects[s][present[s]]) for s in kept], axis=0)



"""The linear models fit on a store: on its training TRs, against the group-mean response by default.

``fit_splits`` fits any of the estimators of ``giblet.linear.ridge`` and predicts splits (``giblet evaluate``'s
baselines); ``linear_prior`` is what training starts from (the linear branch, the linear teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from giblet.data.fmri import pearson_r
from giblet.data.store import Store
from giblet.linear.ridge import BANDED_SEARCH, BandedRidge

def _target(store: Store, target: Optional[np.ndarray]) -> np.ndarray:
    return np.asarray(store.fmri_mean(), dtype=np.float32) if target is None else target


def fit_splits(store: Store, estimator, X, splits: Sequence[str] = ("test",),
               target: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Fit ``estimator`` on the train TRs of ``X`` (per-TR features of every store TR, or a dict of blocks for
    ``BandedRidge``) and ``target`` (``(TRs, voxels)``; default: the group mean); its float32 predictions for
    each of ``splits`` (``train``: the in-sample fit). The fitted estimator is left in ``estimator``; one with an
    HRF whose ``preshift_trs`` is None takes the store's ``alignment.preshift_trs``."""
    target = _target(store, target)
    if hasattr(estimator, "preshift_trs") and estimator.preshift_trs is None:
        estimator.preshift_trs = store.preshift_trs
    estimator.fit(X, target, rows=slice(*store.splits["train"]))
    return {split: estimator.predict(X, rows=slice(*store.splits[split])) for split in splits}


def banded_ridge(store: Store, parts: Dict[str, np.ndarray], hrf: Optional[str], splits: Sequence[str] = ("test",),
                 target: Optional[np.ndarray] = None, n_iter: int = BANDED_SEARCH, seed: int = 0
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """The ``ridge_banded`` baseline: ``BandedRidge`` on the blocks of ``regressor_parts`` through ``hrf`` (None:
    the blocks are regressors already), fit as ``fit_splits`` fits. Returns the predictions for each of
    ``splits`` and the mean share of each block's kernel weight over the voxels."""
    model = BandedRidge(store.tr_s, hrf, n_iter, seed, preshift_trs=store.preshift_trs)
    predictions = fit_splits(store, model, parts, splits, target)
    return predictions, model.block_shares_


def banded_linear_map(store: Store, parts: Dict[str, np.ndarray], hrf: str, target: Optional[np.ndarray] = None,
                      n_iter: int = BANDED_SEARCH, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``banded_ridge``'s fit as one linear map ``(weight (features, voxels), bias (voxels,))`` float32 on
    ``hrf_regressors(store, parts, hrf)``: ``BandedRidge.linear_map``."""
    model = BandedRidge(store.tr_s, hrf, n_iter, seed, preshift_trs=store.preshift_trs)
    model.fit(parts, _target(store, target), rows=slice(*store.splits["train"]))
    return model.linear_map()


@dataclass(frozen=True)
class LinearPrior:
    """What training starts from. ``weight (features, voxels)``, ``bias (voxels,)`` float32: the banded ridge as
    one linear map on ``hrf_regressors`` (``model.set_linear_branch``), None without a branch. ``fit`` and
    ``cross_fit (train TRs, voxels)`` float32: the banded ridge's in-sample fit of the training TRs and its
    cross-fitted predictions of them (``BandedRidge.predict_cross_fitted``: each TR predicted by a refit that did
    not see it); ``fit - cross_fit`` is what the branch gives a training TR beyond what it gives a new one
    (``WindowDataset.offset_targets``), ``cross_fit`` the teacher (``WindowDataset.blend_targets``). ``shares``:
    the banded ridge's block weight shares. ``reliability (voxels,)`` float32: each voxel's Pearson r between
    ``cross_fit`` and the target on the training TRs, how well the stimulus predicts it out of sample (the
    decoder's gain, ``model.set_decoder_gain``). ``block_weights``: ``{block: (voxels,)}``, each voxel's share of
    kernel weight per block (``BandedRidge.block_weights_``; ``model.set_stream_gate``). All None when neither a branch nor a teacher asked for the fit."""

    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    fit: Optional[np.ndarray]
    cross_fit: Optional[np.ndarray]
    shares: Optional[Dict[str, float]]
    reliability: Optional[np.ndarray] = None
    block_weights: Optional[Dict[str, np.ndarray]] = None


def linear_prior(store: Store, parts: Dict[str, np.ndarray], hrf: str, branch: bool = True, teacher: bool = True,
                 target: Optional[np.ndarray] = None, n_iter: int = BANDED_SEARCH, seed: int = 0) -> LinearPrior:
    """The linear branch (``branch``) and the linear teacher's fit (``teacher``) for the blocks ``parts``
    (``regressor_parts``) through ``hrf``: one banded ridge, fit on the train TRs of ``target`` (default: the
    group mean), when either needs it.

    The branch is its ``linear_map()``; ``fit`` its ``predict`` on the training TRs (the kernel form, as
    ``banded_ridge`` predicts; ``hrf_regressors @ weight + bias`` differs from it by the float32 rounding of the
    kernels, ~1e-4 of the spread). Seeded: every process computes the same prior from the same store.
    """
    weight = bias = fit = cross_fit = shares = reliability = block_weights = None
    if branch or teacher:
        train = slice(*store.splits["train"])
        y = _target(store, target)
        banded = BandedRidge(store.tr_s, hrf, n_iter, seed, preshift_trs=store.preshift_trs).fit(parts, y, rows=train)
        shares = banded.block_shares_
        block_weights = dict(zip(parts, banded.block_weights_))
        if branch:
            weight, bias = banded.linear_map()
        fit = banded.predict(parts, rows=train)
        cross_fit = banded.predict_cross_fitted(y, rows=train)
        reliability = cross_fitted_r(y[train], cross_fit)
    return LinearPrior(weight, bias, fit, cross_fit, shares, reliability, block_weights)


def cross_fitted_r(target: np.ndarray, cross_fit: np.ndarray, block: int = 8192) -> np.ndarray:
    """Per-voxel Pearson r of ``cross_fit`` with ``target`` (both ``(TRs, voxels)``), float32; computed ``block``
    voxels at a time, so the float64 copies stay small at Sherlock size (85,810 voxels)."""
    out = np.empty(target.shape[1], dtype=np.float32)
    for first in range(0, target.shape[1], block):
        columns = slice(first, first + block)
        out[columns] = pearson_r(cross_fit[:, columns], target[:, columns])
    return out

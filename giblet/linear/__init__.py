"""Linear encoding models of the fMRI from fixed per-TR stimulus features.

``regressors``: the features (``regressor_parts``) and their HRF convolution (``hrf_convolve``, ``hrf_regressors``;
advanced by ``alignment.preshift_trs`` for scans already shifted earlier, ``Store.preshift_trs``).
``ridge``: the estimators on plain arrays (``FirRidge``, ``HrfRidge``, ``BandedRidge``).
``fits``: the same fit on a store's training TRs (``giblet evaluate``'s baselines, ``linear_prior`` for training).
Nothing here reads a model: the layer sits below ``giblet.models``.
"""

from giblet.linear.fits import LinearPrior, banded_linear_map, banded_ridge, fit_splits, linear_prior
from giblet.linear.regressors import convolve_parts, hrf_convolve, hrf_regressors, regressor_parts
from giblet.linear.ridge import BANDED_SEARCH, BandedRidge, FirRidge, HrfRidge

__all__ = [
    "BANDED_SEARCH", "BandedRidge", "FirRidge", "HrfRidge", "LinearPrior", "banded_linear_map",
    "banded_ridge", "convolve_parts", "fit_splits", "hrf_convolve", "hrf_regressors", "linear_prior", "regressor_parts",
]

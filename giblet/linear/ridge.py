"""Linear encoding models on plain arrays, in himalaya's style: ``fit(X, Y)``, ``predict(X)``, ``coef_``.

``X`` holds per-TR features ``(TRs, features)`` (``BandedRidge``: a dict of named blocks), ``Y`` the
responses ``(TRs, voxels)`` on the same rows. Each model filters the features in time (FIR delays or the
canonical HRF) over the whole series it is given, so a row sees the TRs before it (and, for responses already
shifted earlier by P TRs, ``preshift_trs``, the HRF models see the P TRs after it); to fit on one part of a
continuous series and predict another, pass the whole series and select the part with ``rows`` (a slice or
index array; default all rows). Features are standardized on the fit rows; predictions are float32.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from giblet.data.alignment import fir_delays
from giblet.linear.regressors import convolve_parts, hrf_convolve

# Shrinkages tried by the single-kernel ridges (FIR, HRF).
RIDGE_ALPHAS = np.logspace(-1, 6, 15)
# Shrinkages and block weightings tried per voxel by the banded ridge's random search.
BANDED_ALPHAS = np.logspace(-4, 4, 17)
BANDED_SEARCH = 20

Rows = Union[None, slice, np.ndarray]


def _rows(rows: Rows) -> Union[slice, np.ndarray]:
    return slice(None) if rows is None else rows


class _KernelRidge:
    """himalaya's KernelRidgeCV (linear kernel, no intercept, the shrinkage per voxel by cross-validation over
    ``alphas``) on the features after ``_filter``, each column standardized on the fit rows."""

    def __init__(self, alphas: Optional[Sequence[float]] = None):
        self.alphas = RIDGE_ALPHAS if alphas is None else np.asarray(alphas)

    def _filter(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit(self, X: np.ndarray, Y: np.ndarray, rows: Rows = None):
        """Fit on ``rows`` of ``X (TRs, features)`` and ``Y (TRs, voxels)``; returns self."""
        from himalaya.kernel_ridge import KernelRidgeCV

        x = self._filter(X)[_rows(rows)]
        std = x.std(axis=0)
        self.mean_, self.scale_ = x.mean(axis=0), np.where(std > 0, std, 1.0)
        self.model_ = KernelRidgeCV(alphas=self.alphas, kernel="linear")
        self.model_.fit((x - self.mean_) / self.scale_, np.asarray(Y)[_rows(rows)])
        return self

    def predict(self, X: np.ndarray, rows: Rows = None) -> np.ndarray:
        """Predictions ``(rows, voxels)`` float32 for ``rows`` of ``X``."""
        x = self._filter(X)[_rows(rows)]
        return np.asarray(self.model_.predict((x - self.mean_) / self.scale_), dtype=np.float32)

    @property
    def coef_(self) -> np.ndarray:
        """Weights ``(filtered features, voxels)`` float64 on the filtered, unstandardized features:
        ``filtered @ coef_ + intercept_`` is the prediction."""
        return np.asarray(self.model_.get_primal_coef(), dtype=np.float64) / self.scale_[:, None]

    @property
    def intercept_(self) -> np.ndarray:
        """``(voxels,)`` float64: what standardizing on the fit rows subtracts, as a bias."""
        return -(self.mean_ @ self.coef_)


class FirRidge(_KernelRidge):
    """Kernel ridge on FIR-delayed features: each feature at ``0 .. delays`` TRs before the row, a time course
    learned per feature (``delays`` 0: a plain ridge on the features as given). ``coef_`` rows: delay-major,
    ``[x[t - d] for d in 0..delays]``."""

    def __init__(self, delays: int = 0, alphas: Optional[Sequence[float]] = None):
        super().__init__(alphas)
        self.delays = delays

    def _filter(self, X: np.ndarray) -> np.ndarray:
        return fir_delays(X, list(range(self.delays + 1)))


class HrfRidge(_KernelRidge):
    """Kernel ridge on the features through the canonical HRF ``hrf`` (``glover`` or ``spm``) at a TR of
    ``tr_s`` seconds: one weight per feature, its time course assumed. ``preshift_trs``: the responses were
    already shifted earlier by that many TRs (``hrf_convolve``); None: the store's ``alignment.preshift_trs``
    when ``fit_splits`` fits it, else 0."""

    def __init__(self, tr_s: float, hrf: str = "glover", alphas: Optional[Sequence[float]] = None,
                 preshift_trs: Optional[int] = None):
        super().__init__(alphas)
        self.tr_s, self.hrf, self.preshift_trs = tr_s, hrf, preshift_trs

    def _filter(self, X: np.ndarray) -> np.ndarray:
        return hrf_convolve(X, self.tr_s, self.hrf, self.preshift_trs or 0)


class BandedRidge:
    """Banded (multiple-kernel) ridge: one kernel per named block of ``X`` (through the canonical HRF ``hrf``
    at ``tr_s``, advanced by ``preshift_trs`` for responses already shifted earlier, None: as ``HrfRidge``;
    ``hrf`` None: the blocks are per-TR regressors already, used as they are).

    Each voxel gets its own weight per block and its own shrinkage, both chosen by 5-fold cross-validation
    on the fit rows (himalaya's MultipleKernelRidgeCV, random search over ``n_iter`` block weightings seeded
    with ``seed``, shrinkages ``alphas``): a voxel that only hears is not diluted by 400 text dimensions, as
    it is in a single kernel. Blocks are standardized on the fit rows and scaled so that each kernel has a
    mean diagonal of 1 (the search weighs blocks, not their widths); a column constant over the fit rows is
    left out. The responses are centred on their fit-row mean, the intercept.

    After ``fit``: ``block_weights_ (blocks, voxels)``, each voxel's share of kernel weight per block (a column
    sums to 1), ``block_shares_`` (``{name: its mean over the voxels}``), ``linear_map()`` and ``coef_`` /
    ``intercept_`` (the same map).
    """

    def __init__(self, tr_s: Optional[float] = None, hrf: Optional[str] = None, n_iter: int = BANDED_SEARCH,
                 seed: int = 0, alphas: Optional[Sequence[float]] = None, preshift_trs: Optional[int] = None):
        if hrf is not None and tr_s is None:
            raise ValueError(f"BandedRidge with hrf={hrf!r} needs tr_s, the seconds between rows")
        self.tr_s, self.hrf, self.n_iter, self.seed, self.preshift_trs = tr_s, hrf, n_iter, seed, preshift_trs
        self.alphas = BANDED_ALPHAS if alphas is None else np.asarray(alphas)

    def _regressors(self, name: str, part: np.ndarray) -> np.ndarray:
        # Through convolve_parts: exactly the float32 regressors a linear branch reads, so linear_map applies to them.
        if self.hrf is None:
            return np.asarray(part, dtype=np.float32).astype(np.float64)
        return convolve_parts({name: part}, self.tr_s, self.hrf, self.preshift_trs or 0).astype(np.float64)

    def _standardized(self, regressors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if list(regressors) != list(self.scales_):
            raise ValueError(f"blocks {list(regressors)}; expected the blocks the model was fit on, {list(self.scales_)}")
        return {name: ((x - self.scales_[name][0]) / self.scales_[name][1]).astype(np.float32) for name, x in regressors.items()}

    def fit(self, X: Dict[str, np.ndarray], Y: np.ndarray, rows: Rows = None) -> "BandedRidge":
        """Fit on ``rows`` of the blocks ``X`` (``{name: (TRs, features)}``) and ``Y (TRs, voxels)``; returns self."""
        from himalaya.kernel_ridge import MultipleKernelRidgeCV

        rows = _rows(rows)
        regressors = {name: self._regressors(name, part) for name, part in X.items()}
        self.scales_ = {}
        for name, x in regressors.items():
            mean, std = x[rows].mean(axis=0), x[rows].std(axis=0)
            constant = std <= 1e-6 * np.maximum(np.abs(mean), 1e-3)  # to float32 precision
            self.scales_[name] = (mean, np.where(constant, np.inf, std) * math.sqrt(x.shape[1]))
        self.fit_blocks_ = {name: x[rows] for name, x in self._standardized(regressors).items()}
        y = np.asarray(Y)[rows]
        self.offset_ = y.mean(axis=0)
        self.model_ = MultipleKernelRidgeCV(
            kernels="precomputed", solver="random_search", random_state=self.seed,
            solver_params=dict(n_iter=self.n_iter, alphas=self.alphas, progress_bar=False),
        )
        self.model_.fit(np.stack([x @ x.T for x in self.fit_blocks_.values()]), (y - self.offset_).astype(np.float32))
        deltas = np.asarray(self.model_.deltas_, dtype=np.float64)  # (blocks, voxels), log kernel weights
        shares = np.exp(deltas - deltas.max(axis=0))
        self.block_weights_ = shares / shares.sum(axis=0)
        self.block_shares_ = {name: float(share) for name, share in zip(X, self.block_weights_.mean(axis=1))}
        return self

    def predict_cross_fitted(self, Y: np.ndarray, rows: Rows = None, folds: int = 5, gap: int = 5) -> np.ndarray:
        """Out-of-fold predictions ``(fit rows, voxels)`` float32 of the fit rows: the fit rows cut into ``folds``
        contiguous blocks, each predicted by the ridge refit on the others (less ``gap`` rows each side of the
        block, as the response's autocorrelation would leak it) with each voxel's block weights and shrinkage as
        ``fit`` chose them. ``Y`` and ``rows`` as given to ``fit``. What the fit misses on new data, where the
        in-sample fit has already absorbed part of the noise."""
        y = np.asarray(Y)[_rows(rows)]
        n = next(iter(self.fit_blocks_.values())).shape[0]
        if y.shape != (n, self.offset_.size):
            raise ValueError(f"responses of shape {y.shape} at these rows; expected the {n} fit rows x {self.offset_.size} voxels given to fit")
        if folds < 2 or n < folds * (2 * gap + 2):
            raise ValueError(f"{n} fit rows cannot be cut into {folds} folds with a gap of {gap} rows")
        kernels = np.stack([x.astype(np.float64) @ x.T.astype(np.float64) for x in self.fit_blocks_.values()])
        deltas = np.asarray(self.model_.deltas_, dtype=np.float64)  # (blocks, voxels)
        # Voxels share a handful of (block weights, shrinkage) choices of the random search: one solve per choice.
        choices, group = np.unique(deltas.T, axis=0, return_inverse=True)
        group = group.reshape(-1)
        # float32 out and float64 one choice at a time: no float64 copy of every voxel's responses (490 MB at
        # Sherlock size's 716 x 85,810, on each process).
        out = np.empty(y.shape, dtype=np.float32)
        edges = np.linspace(0, n, folds + 1).round().astype(int)
        for c, log_weights in enumerate(choices):
            voxels = np.flatnonzero(group == c)
            kernel = np.tensordot(np.exp(log_weights), kernels, axes=1)
            responses = y[:, voxels].astype(np.float64)  # once per choice: y[keep] would copy every voxel per fold
            for start, stop in zip(edges[:-1], edges[1:]):
                keep = np.r_[0:max(start - gap, 0), min(stop + gap, n):n]
                target = responses[keep]
                mean = target.mean(axis=0)
                dual = np.linalg.solve(kernel[np.ix_(keep, keep)] + np.eye(keep.size), target - mean)
                out[start:stop, voxels] = kernel[start:stop][:, keep] @ dual + mean
        return out

    def predict(self, X: Dict[str, np.ndarray], rows: Rows = None) -> np.ndarray:
        """Predictions ``(rows, voxels)`` float32 for ``rows`` of the blocks ``X``, in kernel form."""
        blocks = self._standardized({name: self._regressors(name, part) for name, part in X.items()})
        kernels = np.stack([blocks[name][_rows(rows)] @ fit.T for name, fit in self.fit_blocks_.items()])
        return (np.asarray(self.model_.predict(kernels), dtype=np.float32) + self.offset_).astype(np.float32)

    def linear_map(self) -> Tuple[np.ndarray, np.ndarray]:
        """The fit as one linear map on the blocks' regressors side by side (through the HRF, as the model's
        linear branch reads them): ``(weight (features, voxels), bias (voxels,))`` float32, so that
        ``regressors @ weight + bias`` is ``predict`` up to the float32 rounding of its kernels."""
        dual = np.asarray(self.model_.dual_coef_, dtype=np.float64)  # (fit rows, voxels)
        weights = np.exp(np.asarray(self.model_.deltas_, dtype=np.float64))  # (blocks, voxels)
        columns, bias = [], self.offset_.astype(np.float64)
        for i, (name, x) in enumerate(self.fit_blocks_.items()):
            # Prediction = sum over blocks of exp(delta) K_block(new, fit) @ dual; K = x_new x_fit^T.
            w = (x.T.astype(np.float64) @ dual) * weights[i]  # on the standardized block
            mean, scale = self.scales_[name]
            w = w / scale[:, None]  # on the raw regressors (a constant one has scale inf: weight 0)
            bias = bias - mean @ w
            columns.append(w)
        return np.concatenate(columns, axis=0).astype(np.float32), bias.astype(np.float32)

    @property
    def coef_(self) -> np.ndarray:
        """``linear_map()``'s weight (computed on each access)."""
        return self.linear_map()[0]

    @property
    def intercept_(self) -> np.ndarray:
        """``linear_map()``'s bias (computed on each access)."""
        return self.linear_map()[1]

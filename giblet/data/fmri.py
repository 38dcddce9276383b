"""fMRI: 4-D NIfTI subjects, the shared voxel mask, voxel time series, train-only z-scoring and the per-voxel
correlation over time that every score and fit quality uses.

A Sherlock subject is 61x73x61x1976 int16 (about 1 GB as float32), so data are read in
their stored dtype and scaled in float32; no float64 copy of a 4-D array is ever made.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from giblet.errors import DataError
from giblet.progress import bar

PathLike = Union[str, Path]

VALIDITY_RULE = (
    "a voxel is valid in a subject when its value is finite at every TR and not constant over time "
    "(temporal standard deviation > 1e-6 x max(1, |temporal mean|))"
)

# Relative tolerance under which a temporal standard deviation counts as "constant";
# float32 rounding of a constant series leaves a std of about 1e-7 x |mean|.
CONSTANT_TOLERANCE = 1e-6

# Bytes of float64 work space per chunk in valid_voxels and zscore.
_CHUNK_BYTES = 64 * 2**20

_UNREADABLE = (ImageFileError, HeaderDataError, gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError)

_TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


@dataclass(frozen=True)
class FmriInfo:
    """What the header of one 4-D NIfTI says; ``tr_s`` is in seconds."""

    path: str
    shape: Tuple[int, int, int, int]
    n_trs: int
    tr_s: float
    affine: np.ndarray
    dtype: str


def _open(path: Path):
    if not path.is_file():
        raise DataError(path, "fMRI file not found", expected="a 4-D NIfTI (.nii or .nii.gz)",
                        fix="check the data folder and data.fmri")
    try:
        return nib.load(str(path))
    except _UNREADABLE as error:
        raise DataError(path, f"could not read the NIfTI header ({type(error).__name__}: {error})",
                        expected="a valid NIfTI file (.nii or gzip-compressed .nii.gz)") from error


def probe_nifti(path: PathLike) -> FmriInfo:
    """Read the header only (no voxel data) and check it describes a 4-D series with a positive TR.

    The TR is ``zooms[3]``; when the header's time unit is milliseconds (or microseconds)
    it is converted to seconds.
    """
    path = Path(path)
    image = _open(path)
    shape = tuple(int(size) for size in image.shape)
    if len(shape) != 4:
        raise DataError(path, f"image is {len(shape)}-D with shape {shape}", expected="a 4-D (X, Y, Z, time) image")
    if shape[3] < 1:
        raise DataError(path, f"image has {shape[3]} volumes", expected="at least one volume (TR)")
    zooms = image.header.get_zooms()
    tr_s = float(zooms[3]) if len(zooms) > 3 else math.nan
    try:
        time_unit = image.header.get_xyzt_units()[1]
    except (AttributeError, KeyError):
        time_unit = "unknown"
    tr_s *= _TIME_UNIT_SECONDS.get(time_unit, 1.0)
    if not (math.isfinite(tr_s) and tr_s > 0):
        raise DataError(path, f"TR is {tr_s!r}", expected="TR in seconds in zooms[3] (a positive number)",
                        fix="set pixdim[4] in the NIfTI header to the TR, e.g. with nibabel's header.set_zooms")
    return FmriInfo(path=str(path), shape=shape, n_trs=shape[3], tr_s=tr_s,
                    affine=np.asarray(image.affine, dtype=np.float64), dtype=str(image.get_data_dtype()))


def _read_data_error(path: Path, error: BaseException) -> DataError:
    action = "decompress" if path.name.lower().endswith(".gz") else "read"
    kind = "gzip NIfTI" if action == "decompress" else "NIfTI with all its volumes"
    return DataError(path, f"could not {action} the image data ({type(error).__name__}: {error})",
                     expected=f"a valid {kind}")


def _read_subject(path: Path, n_trs: Optional[int] = None, voxels: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 data of one subject: (X, Y, Z, T), or (T, V) when ``voxels`` (a 3-D bool mask) is given.

    Masking and truncation happen on the stored dtype, before scaling, so only what is kept becomes float32.
    """
    info = probe_nifti(path)
    if n_trs is not None and not 1 <= n_trs <= info.n_trs:
        raise DataError(path, f"has {info.n_trs} TRs, {n_trs} were requested",
                        expected=f"between 1 and {info.n_trs} TRs")
    image = nib.load(str(path))
    proxy = image.dataobj
    try:
        stored = proxy.get_unscaled()
    except _UNREADABLE as error:
        raise _read_data_error(path, error) from error
    if n_trs is not None and n_trs < info.n_trs:
        stored = stored[..., :n_trs]
    if voxels is not None:
        # NIfTI data are in Fortran order, so (X*Y*Z, T) in Fortran order transposes for free to a C-ordered
        # (T, X*Y*Z); taking columns from it gives the (T, V) result with no transpose copy of the masked data.
        by_time = stored.reshape(-1, stored.shape[-1], order="F").T
        columns = np.ravel_multi_index(np.nonzero(voxels), voxels.shape, order="F")
        try:
            stored = np.asarray(np.take(by_time, columns, axis=1))  # in memory now, even when taken from a memmap
        except _UNREADABLE as error:
            raise _read_data_error(path, error) from error
        del by_time  # a view of the whole stored series; dropping it frees that series before scaling
    slope = float(getattr(proxy, "slope", 1.0))
    intercept = float(getattr(proxy, "inter", 0.0))
    # get_unscaled of a .nii is a copy-on-write memmap; reusing it in place would tie the result to the file.
    reusable = stored.dtype == np.float32 and stored.flags.writeable and not isinstance(stored, np.memmap)
    try:
        data = stored if reusable else stored.astype(np.float32)
    except _UNREADABLE as error:  # a truncated .nii is only discovered when the memmap is read
        raise _read_data_error(path, error) from error
    if slope != 1.0:
        data *= np.float32(slope)
    if intercept != 0.0:
        data += np.float32(intercept)
    return data


def load_subject(path: PathLike) -> np.ndarray:
    """One subject's series as float32 (X, Y, Z, T), with the header's scl_slope/scl_inter applied."""
    return _read_subject(Path(path))


def valid_voxels(data: np.ndarray) -> np.ndarray:
    """bool (X, Y, Z): voxels that pass :data:`VALIDITY_RULE` in this (X, Y, Z, T) series."""
    if data.ndim != 4:
        raise ValueError(f"expected an (X, Y, Z, T) array, got shape {data.shape}")
    size_x, size_y, size_z, size_t = data.shape
    valid = np.zeros((size_x, size_y, size_z), dtype=bool)
    slices_per_chunk = max(1, _CHUNK_BYTES // max(1, size_x * size_y * size_t * 8))
    with np.errstate(invalid="ignore", over="ignore"):
        for first in range(0, size_z, slices_per_chunk):
            slab = data[:, :, first:first + slices_per_chunk, :]
            finite = np.isfinite(slab).all(axis=-1)
            mean = slab.mean(axis=-1, dtype=np.float64)
            std = slab.std(axis=-1, dtype=np.float64)
            varies = std > CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean))
            valid[:, :, first:first + slices_per_chunk] = finite & varies
    return valid


def subjects_required(min_fraction: float, n_subjects: int) -> int:
    """How many subjects a voxel must be valid in to enter the shared mask."""
    return max(1, math.ceil(min_fraction * n_subjects - 1e-9))


def shared_mask(
    paths: Sequence[PathLike],
    min_fraction: float = 1.0,
    n_trs: Optional[int] = None,
    progress: bool = True,
) -> Tuple[np.ndarray, List[int]]:
    """The shared mask: voxels valid in at least ceil(min_fraction x n_subjects) subjects.

    Every header is checked (same grid and affine) before any data is read; subjects are
    then loaded one at a time, truncated to (at most) the first ``n_trs`` TRs when given.
    Returns (bool mask (X, Y, Z), number of valid voxels per subject).
    """
    paths = [Path(path) for path in paths]
    if not paths:
        raise DataError(None, "no fMRI files were given", expected="at least one subject's 4-D NIfTI")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction (fmri.min_subject_fraction) must be in (0, 1], got {min_fraction}")
    infos = [probe_nifti(path) for path in paths]
    first = infos[0]
    for info in infos[1:]:
        if info.shape[:3] != first.shape[:3]:
            raise DataError(info.path, f"voxel grid is {info.shape[:3]}",
                            expected=f"the first subject's grid {first.shape[:3]} ({first.path})")
        if not np.allclose(info.affine, first.affine, rtol=0, atol=1e-4):
            raise DataError(info.path, f"affine is {info.affine.round(4).tolist()}",
                            expected=f"the first subject's affine {first.affine.round(4).tolist()} ({first.path})",
                            fix="resample every subject to one space before preparing")
    # The small epsilon keeps e.g. 0.3 x 10 = 3.0000000000000004 from demanding 4 subjects.
    required = subjects_required(min_fraction, len(paths))
    valid_subject_count = np.zeros(first.shape[:3], dtype=np.int32)
    valid_per_subject: List[int] = []
    with bar("fMRI mask", total=len(paths), show=progress) as progress_bar:
        for path, info in zip(paths, infos):
            valid = valid_voxels(_read_subject(path, None if n_trs is None else min(n_trs, info.n_trs)))
            n_valid = int(valid.sum())
            if n_valid == 0:
                raise DataError(path, "no voxel has finite, non-constant values",
                                expected="a 4-D series where at least some voxels vary over time",
                                fix="remove or replace this subject")
            valid_subject_count += valid
            valid_per_subject.append(n_valid)
            progress_bar.advance(1)
    mask = valid_subject_count >= required
    if not mask.any():
        raise DataError(None, f"no voxel is valid in at least {required} of {len(paths)} subjects",
                        expected="subjects whose valid voxels overlap",
                        fix="lower fmri.min_subject_fraction")
    return mask, valid_per_subject


def extract(path: PathLike, mask: np.ndarray, n_trs: Optional[int] = None) -> np.ndarray:
    """(T, V) float32 time series of the ``mask`` voxels, voxels in the C order of ``mask``."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.ndim != 3:
        raise ValueError(f"mask must be a 3-D bool array, got {mask.dtype} with shape {mask.shape}")
    info = probe_nifti(path)
    if info.shape[:3] != mask.shape:
        raise DataError(path, f"voxel grid is {info.shape[:3]}", expected=f"the mask's grid {mask.shape}")
    return _read_subject(path, n_trs, voxels=mask)


def _rows(series: np.ndarray, train_trs) -> np.ndarray:
    """Row indices selected by a slice, a bool index of length T or integer indices."""
    n_rows = series.shape[0]
    if isinstance(train_trs, slice):
        rows = np.arange(n_rows)[train_trs]
    else:
        index = np.asarray(train_trs)
        if index.dtype == bool:
            if index.shape != (n_rows,):
                raise ValueError(f"a bool train_trs must have length {n_rows} (one per TR), got shape {index.shape}")
            rows = np.flatnonzero(index)
        elif np.issubdtype(index.dtype, np.integer):
            rows = np.arange(n_rows)[index.ravel()]
        else:
            raise ValueError(f"train_trs must be a slice, a bool mask or integer indices, got {index.dtype}")
    if rows.size == 0:
        raise ValueError("train_trs selects no TR; z-scoring needs at least one training TR")
    return rows


def zscore(series: np.ndarray, train_trs) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score each voxel of a (T, V) series with the mean and std of the training TRs only.

    Test TRs never influence the statistics. Non-finite training values are left out of
    the statistics; voxels constant within the training TRs (std <= 1e-6 x max(1, |mean|))
    and non-finite results become 0. Returns (z float32 (T, V), mean (V,), std (V,)) with
    population std (ddof=0), both float32.
    """
    series = np.asarray(series)
    if series.ndim != 2:
        raise ValueError(f"expected a (T, V) series, got shape {series.shape}")
    rows = _rows(series, train_trs)
    n_trs, n_voxels = series.shape
    z = np.empty((n_trs, n_voxels), dtype=np.float32)
    means = np.empty(n_voxels, dtype=np.float32)
    stds = np.empty(n_voxels, dtype=np.float32)
    voxels_per_chunk = max(1, _CHUNK_BYTES // max(1, n_trs * 8))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for first in range(0, n_voxels, voxels_per_chunk):
            columns = slice(first, first + voxels_per_chunk)
            block = series[:, columns].astype(np.float64)
            train = block[rows]
            finite = np.isfinite(train)
            n_finite = finite.sum(axis=0)
            mean = np.where(finite, train, 0.0).sum(axis=0) / np.maximum(n_finite, 1)
            deviation = np.where(finite, train - mean, 0.0)
            std = np.sqrt((deviation * deviation).sum(axis=0) / np.maximum(n_finite, 1))
            varies = std > CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean))
            block -= mean
            block /= np.where(varies, std, 1.0)
            block[:, ~varies] = 0.0
            block[~np.isfinite(block)] = 0.0
            z[:, columns] = block
            means[columns] = mean
            stds[columns] = std
    return z, means, stds


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


def space_of(path: PathLike) -> str:
    """``mni`` when the NIfTI's sform or qform code is 4 (MNI152), else ``scanner``: which template a map may be
    drawn on. Reads the header only."""
    header = nib.load(str(path)).header
    return "mni" if 4 in (int(header["sform_code"]), int(header["qform_code"])) else "scanner"


def write_mask(mask: np.ndarray, affine: np.ndarray, path: PathLike) -> None:
    """Save a 3-D bool mask as a uint8 NIfTI (1 = kept voxel) with the subjects' affine."""
    mask = np.asarray(mask)
    affine = np.asarray(affine, dtype=np.float64)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.set_data_dtype(np.uint8)
    # Both forms carry the affine, so every reader (sform- or qform-first) sees the same space.
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def load_mask(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """(bool mask (X, Y, Z), 4x4 affine) from a mask NIfTI; any non-zero voxel is kept."""
    path = Path(path)
    image = _open(path)
    if len(image.shape) != 3:
        raise DataError(path, f"mask is {len(image.shape)}-D with shape {tuple(image.shape)}", expected="a 3-D mask")
    try:
        values = np.asanyarray(image.dataobj)
    except _UNREADABLE as error:
        raise _read_data_error(path, error) from error
    return np.asarray(values != 0) & np.isfinite(values), np.asarray(image.affine, dtype=np.float64)

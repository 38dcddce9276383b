"""Images on a store's voxel grid, and per-voxel values back to images (after nilearn's masker).

A store's grid is its boolean mask ``(X, Y, Z)`` and 4x4 affine (``store.mask()``); the
mask's voxels in C order are the store's voxels, layer 7's units and the columns of every
per-voxel array. Anything that takes a ``grid`` here takes a store or a ``(mask, affine)`` pair.

Reading an image onto the grid (ROIs, label images) follows one policy:

- an image on the same grid (same shape, affine within 1e-3) is used as is;
- an image on another grid (shape or affine differ) is resampled onto the store's grid by
  nearest neighbour through the two affines, with a ``GridWarning`` that names the file
  and both grids: each store voxel takes the value of the image voxel nearest to its
  centre (ties round up); store voxels outside the image's field of view get 0;
- a voxel is inside when its label is > 0 (0, negative values, NaN and infinities are outside);
- a 3-D image, or 4-D with one volume; anything else, an unreadable file, or an image
  with no voxel inside the store's mask is a ``DataError`` naming the file.

``load_labels`` returns the label of every mask voxel in mask order (int64, 0 = outside);
``load_roi`` is its ``> 0`` case (bool), for any values, integer or not. ``to_volume`` /
``save_volume`` put per-voxel values ``(V,)`` or ``(V, T)`` back on the grid (0 outside the
mask), ``from_volume`` takes them out again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from giblet.errors import DataError

PathLike = Union[str, Path]
Grid = Tuple[np.ndarray, np.ndarray]

AFFINE_TOLERANCE = 1e-3  # mm: affines closer than this are the same grid
_TIE = 1e-6  # a voxel centre halfway between two image voxels takes the upper one, whatever the rounding error


class GridWarning(UserWarning):
    """An image on another grid was resampled onto the store's grid by nearest neighbour."""


def grid_of(source) -> Grid:
    """``(mask bool (X, Y, Z), affine float64 (4, 4))`` of a store (anything with ``.mask()``) or a ``(mask, affine)`` pair."""
    mask, affine = source.mask() if hasattr(source, "mask") and callable(source.mask) else source
    mask, affine = np.asarray(mask, dtype=bool), np.asarray(affine, dtype=np.float64)
    if mask.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"a grid is a 3-D mask and a 4x4 affine, got shapes {mask.shape} and {affine.shape}")
    return mask, affine


def _describe(shape, affine: np.ndarray) -> str:
    return f"shape {tuple(int(n) for n in shape)}, affine {np.round(affine, 3).tolist()}"


# --------------------------------------------------------------------------- images onto the grid


def read_on_grid(path: PathLike, grid, kind: str = "image") -> np.ndarray:
    """The 3-D image at ``path`` on the store's grid: float64 ``(X, Y, Z)``, NaN kept, by the module's policy.

    ``kind`` names the image in messages ("ROI", "label image").
    """
    import nibabel as nib

    path = Path(path)
    mask, affine = grid_of(grid)
    expected = f"a 3-D NIfTI {kind} (.nii or .nii.gz)"
    if not path.is_file():
        raise DataError(path, f"{kind} file not found", expected=expected)
    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(path, f"{kind} is {len(image.shape)}-D with shape {tuple(image.shape)}",
                            expected="a 3-D image (or 4-D with a single volume)")
        values = np.asarray(np.asanyarray(image.dataobj), dtype=np.float64).reshape(shape)
        image_affine = np.asarray(image.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as error:  # nibabel, gzip and zlib raise many types for unreadable files
        raise DataError(path, f"could not read the {kind} ({type(error).__name__}: {error})", expected=expected) from None
    if shape == mask.shape and np.allclose(image_affine, affine, rtol=0, atol=AFFINE_TOLERANCE):
        return values
    warnings.warn(
        f"{path}: {kind} grid ({_describe(shape, image_affine)}) differs from the store's grid "
        f"({_describe(mask.shape, affine)}); resampled onto the store's grid by nearest neighbour",
        GridWarning, stacklevel=3,
    )
    return resample_nearest(values, image_affine, mask.shape, affine)


def resample_nearest(values: np.ndarray, affine: np.ndarray, shape: Tuple[int, int, int], target_affine: np.ndarray) -> np.ndarray:
    """``values (I, J, K)`` with ``affine`` on the grid ``shape`` / ``target_affine``, by nearest neighbour.

    Each target voxel takes the value of the source voxel nearest to its centre's position
    in the source's voxel space (ties round up); outside the source's field of view, 0.
    """
    values = np.asarray(values)
    to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    rotation, shift = to_source[:3, :3], to_source[:3, 3]
    out = np.zeros(tuple(shape), dtype=np.float64)
    j, k = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    jk = np.stack([j.ravel(), k.ravel()], axis=1).astype(np.float64)
    bounds = np.array(values.shape[:3])
    for i in range(shape[0]):  # a slab at a time: a whole grid of coordinates can be large
        ijk = np.c_[np.full(len(jk), float(i)), jk]
        source = np.floor(ijk @ rotation.T + shift + 0.5 + _TIE).astype(np.int64)
        inside = np.all((source >= 0) & (source < bounds), axis=1)
        slab = np.zeros(len(jk), dtype=np.float64)
        slab[inside] = values[tuple(source[inside].T)]
        out[i] = slab.reshape(shape[1], shape[2])
    return out


def _inside(values: np.ndarray, mask: np.ndarray, path: PathLike, kind: str) -> np.ndarray:
    """Bool ``(V,)``: the mask voxels whose value is > 0 (NaN and infinities are outside); none is a DataError."""
    values = np.asarray(values)
    with np.errstate(invalid="ignore"):
        positive = (values > 0) & np.isfinite(values)
    inside = positive[mask]
    if not inside.any():
        raise DataError(path, f"{kind} has no voxel inside the store's mask ({int(positive.sum())} voxels > 0 on the "
                        f"store's grid, none of them among its {int(mask.sum())} mask voxels)",
                        expected=f"at least one {kind} voxel > 0 inside the mask")
    return inside


def labels_in_mask(values: np.ndarray, grid, path: PathLike, kind: str = "label image") -> np.ndarray:
    """int64 ``(V,)``: the label of each mask voxel in mask order, 0 where the value is <= 0 or NaN.

    ``values`` is an image already on the grid (``read_on_grid``). Labels > 0 that are not
    whole numbers, or none inside the mask, are a ``DataError`` naming ``path``.
    """
    mask, _ = grid_of(grid)
    inside = _inside(values, mask, path, kind)
    labels = np.asarray(values)[mask][inside]
    fractional = labels != np.round(labels)
    if fractional.any():
        raise DataError(path, f"{kind} holds non-integer labels (e.g. {float(labels[fractional][0])!r} in "
                        f"{int(fractional.sum())} mask voxels)", expected="whole-number labels (> 0 inside, 0 outside)",
                        fix="round the image, or read it as an ROI (every value > 0 is inside)")
    out = np.zeros(int(mask.sum()), dtype=np.int64)
    out[inside] = labels.astype(np.int64)
    return out


def load_labels(path: PathLike, grid, kind: str = "label image") -> np.ndarray:
    """int64 ``(V,)``: the labels of a label NIfTI at the store's mask voxels, in mask order (0 = outside)."""
    return labels_in_mask(read_on_grid(path, grid, kind), grid, path, kind)


def roi_in_mask(values: np.ndarray, grid, path: PathLike, kind: str = "ROI") -> np.ndarray:
    """Bool ``(V,)``: the mask voxels whose value (already on the grid) is > 0; none is a ``DataError``."""
    mask, _ = grid_of(grid)
    return _inside(values, mask, path, kind)


def load_roi(path: PathLike, grid, kind: str = "ROI") -> np.ndarray:
    """Bool ``(V,)``: the store's mask voxels inside an ROI NIfTI (value > 0, any value), in mask order."""
    return roi_in_mask(read_on_grid(path, grid, kind), grid, path, kind)


# --------------------------------------------------------------------------- values back onto the grid


def to_volume(values: np.ndarray, mask: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Mask-ordered values ``(V,)`` or ``(V, T)`` onto the grid: ``(X, Y, Z)`` or ``(X, Y, Z, T)``, 0 outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(values)
    if values.ndim not in (1, 2) or values.shape[0] != int(mask.sum()):
        raise ValueError(f"values of shape {values.shape}; expected ({int(mask.sum())},) or ({int(mask.sum())}, T), "
                         "one row per mask voxel")
    out = np.zeros(mask.shape + values.shape[1:], dtype=dtype)
    out[mask] = values
    return out


def load_values(path: PathLike, grid, kind: str = "image") -> np.ndarray:
    """The per-voxel values ``(V,)`` (store order) of the 3-D image at ``path``, read by ``read_on_grid``'s policy:
    what ``save_volume`` wrote, read back."""
    return from_volume(read_on_grid(path, grid, kind), grid_of(grid)[0])


def from_volume(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask voxels of ``(X, Y, Z)`` or ``(X, Y, Z, T)``: ``(V,)`` or ``(V, T)`` in mask order."""
    mask = np.asarray(mask, dtype=bool)
    volume = np.asarray(volume)
    if volume.shape[:3] != mask.shape or volume.ndim not in (3, 4):
        raise ValueError(f"volume of shape {volume.shape}; expected {mask.shape} or {mask.shape + ('T',)}")
    return volume[mask]


def save_volume(values: np.ndarray, grid, path: PathLike, tr_s: Optional[float] = None, dtype=np.float32) -> Path:
    """Write ``to_volume(values)`` as a NIfTI with the store's affine (atomically); ``tr_s``: the 4th zoom of a series."""
    import nibabel as nib

    mask, affine = grid_of(grid)
    path = Path(path)
    data = to_volume(values, mask, dtype)
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    if tr_s is not None and data.ndim == 4:
        image.header.set_zooms(tuple(image.header.get_zooms()[:3]) + (float(tr_s),))
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # the same extension: nibabel compresses by the name
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

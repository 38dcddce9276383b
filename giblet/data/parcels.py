"""Parcels on a store's voxel grid: random contiguous blobs (nulls for region tests), size classes, cube atlases.

Every per-voxel array here is in the store's voxel order: the mask's voxels in C order,
``np.flatnonzero(mask)`` / ``mask[mask]`` (as ``giblet.data.volume.from_volume``/``to_volume``).

- ``random_contiguous_parcels(mask, size, count, seed)``: ``count`` random parcels of exactly
  ``size`` face-connected mask voxels, grown as compact blobs; bool ``(count, V)``.
- ``size_classes(sizes, ratio)``: parcel sizes grouped into bins spanning at most a factor
  ``ratio``, so parcels of similar size share one null (drawn at the class's size).
- ``cube_atlas(mask, cube)``: the grid cut into ``cube``^3 cubes, one label per cube that
  holds mask voxels (1..K in C order of the cubes), 0 outside the mask.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

# The six face neighbours (6-connectivity), in the order of the neighbour table's columns.
FACE_OFFSETS = np.array([(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)], dtype=np.int64)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"a mask is a 3-D volume, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def neighbour_table(mask: np.ndarray) -> np.ndarray:
    """int32 ``(V, 6)``: for each mask voxel (store order), the mask index of each face neighbour, -1 outside the mask."""
    mask = _as_mask(mask)
    index = np.full(tuple(n + 2 for n in mask.shape), -1, dtype=np.int32)  # padded: no neighbour beyond the grid
    index[1:-1, 1:-1, 1:-1][mask] = np.arange(int(mask.sum()), dtype=np.int32)
    ijk = np.argwhere(mask) + 1  # C order: the same order as mask[mask]
    table = np.empty((len(ijk), len(FACE_OFFSETS)), dtype=np.int32)
    for column, offset in enumerate(FACE_OFFSETS):
        moved = ijk + offset
        table[:, column] = index[moved[:, 0], moved[:, 1], moved[:, 2]]
    return table


def random_contiguous_parcels(mask: np.ndarray, size: int, count: int, seed: int = 0) -> np.ndarray:
    """Bool ``(count, V)``: ``count`` random contiguous parcels of exactly ``size`` mask voxels each.

    Columns are the mask's voxels in store order (C order, ``mask[mask]``). Each parcel grows
    from a random seed voxel through face neighbours (6-connectivity) inside the mask: the
    frontier (the parcel's unvisited in-mask neighbours) is taken in random order, one
    uniformly drawn frontier voxel at a time, so parcels come out as compact blobs. A seed
    whose connected component holds fewer than ``size`` voxels is never used (seeds are drawn
    uniformly among the voxels of large-enough components, the same as drawing again on a
    miss). Deterministic for a ``seed``; parcels may overlap one another.

    ``ValueError`` if ``size`` < 1 or > V, ``count`` < 0, or no connected component of the
    mask holds ``size`` voxels (the message names the size and the largest component).
    """
    mask = _as_mask(mask)
    n_voxels = int(mask.sum())
    size, count = int(size), int(count)
    if size < 1 or size > n_voxels:
        raise ValueError(f"parcel size {size} is outside 1..{n_voxels} (the mask's voxel count)")
    if count < 0:
        raise ValueError(f"parcel count must be >= 0, got {count}")
    components, _ = ndimage.label(mask)  # the default structure is face connectivity
    component_of = components[mask] - 1
    component_sizes = np.bincount(component_of)
    if component_sizes.max() < size:
        raise ValueError(f"no connected component of the mask (face connectivity) holds {size} voxels: "
                         f"the largest has {int(component_sizes.max())} of the mask's {n_voxels}")
    eligible = np.flatnonzero(component_sizes[component_of] >= size)
    neighbours = neighbour_table(mask).tolist()  # Python lists: the growth loop reads scalars
    rng = np.random.default_rng(seed)
    seeds = eligible[rng.integers(0, len(eligible), size=count)].tolist()
    out = np.zeros((count, n_voxels), dtype=bool)
    seen = [-1] * n_voxels  # the parcel that last saw the voxel (in it or on its frontier)
    for parcel, start in enumerate(seeds):
        draws = rng.random(size).tolist()
        members = []
        frontier = [start]
        seen[start] = parcel
        for u in draws:  # the component holds >= size voxels, so the frontier never runs dry here
            pick = int(u * len(frontier))
            voxel = frontier[pick]
            frontier[pick] = frontier[-1]
            frontier.pop()
            members.append(voxel)
            for neighbour in neighbours[voxel]:
                if neighbour >= 0 and seen[neighbour] != parcel:
                    seen[neighbour] = parcel
                    frontier.append(neighbour)
        out[parcel, members] = True
    return out


def size_classes(sizes: Sequence[int], ratio: float = 1.25) -> Tuple[np.ndarray, np.ndarray]:
    """``(class_of int (N,), class_sizes int (C,))``: parcel sizes in geometric bins, one null per bin.

    Sorted sizes are cut greedily: a class starts at its smallest size s and takes every size
    up to ``s * ratio``, so each class spans at most a factor ``ratio``. Classes are numbered
    by increasing size and all are non-empty; ``class_sizes[c]`` is the rounded geometric mean
    of its parcels' sizes (each parcel counted once), the size its null parcels are drawn at.
    """
    values = np.asarray(sizes)
    if values.ndim != 1:
        raise ValueError(f"sizes is a sequence of parcel sizes, got shape {values.shape}")
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    if values.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if np.any(values != np.round(values)) or values.min() < 1:
        raise ValueError(f"parcel sizes are whole numbers >= 1, got e.g. {values[(values != np.round(values)) | (values < 1)][0]!r}")
    values = values.astype(np.int64)
    unique = np.unique(values)
    class_of_unique = np.empty(len(unique), dtype=np.int64)
    current, start = 0, unique[0]
    for position, value in enumerate(unique):
        if value > start * ratio * (1 + 1e-12):
            current, start = current + 1, value
        class_of_unique[position] = current
    class_of = class_of_unique[np.searchsorted(unique, values)]
    log_sum = np.bincount(class_of, weights=np.log(values))
    class_sizes = np.rint(np.exp(log_sum / np.bincount(class_of))).astype(np.int64)
    return class_of, class_sizes


def cube_atlas(mask: np.ndarray, cube: int) -> np.ndarray:
    """int32 volume of the mask's shape: one label per ``cube``^3 cube of the grid that holds mask voxels.

    Cubes start at voxel (0, 0, 0); labels are 1..K, consecutive, in C order of the cubes;
    voxels outside the mask are 0 (a cube's label covers only its mask voxels).
    """
    mask = _as_mask(mask)
    cube = int(cube)
    if cube < 1:
        raise ValueError(f"cube must be >= 1 voxel, got {cube}")
    ijk = np.argwhere(mask) // cube
    cubes_shape = tuple(-(-n // cube) for n in mask.shape)
    cube_id = np.ravel_multi_index(tuple(ijk.T), cubes_shape) if len(ijk) else np.zeros(0, dtype=np.int64)
    _, label = np.unique(cube_id, return_inverse=True)
    out = np.zeros(mask.shape, dtype=np.int32)
    out[mask] = label.reshape(-1) + 1
    return out

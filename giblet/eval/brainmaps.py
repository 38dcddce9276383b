"""Per-voxel values drawn as brain maps with nilearn: the one place giblet turns a map into a picture.

A map is drawn on anatomy when the store knows where the brain is: on the MNI152 template when the scans are
in MNI space (their NIfTI xform code says so; Sherlock's are), otherwise on the subjects' mean functional image
(kept by ``giblet data prepare``), and on the bare mask for a store made before that image was kept.
``stat_map`` and ``glass_brain`` write PNGs; ``interactive_map`` writes nilearn's ``view_img`` page, which
carries its scripts inline and opens offline.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from giblet.data.store import Store
from giblet.data.volume import grid_of, to_volume

PathLike = Union[str, Path]
CUTS = 6  # axial slices per stat map: enough to see every lobe of a whole-brain map in one row


def _image(values: np.ndarray, grid):
    import nibabel as nib

    mask, affine = grid_of(grid)
    return nib.Nifti1Image(to_volume(np.nan_to_num(np.asarray(values, dtype=np.float32)), mask), affine)


def background(store: Store) -> Tuple[object, str]:
    """(image or ``False`` for none, what it is): the anatomy a map of this store is drawn on."""
    import nibabel as nib

    if store.space == "mni":
        from nilearn.datasets import load_mni152_template

        return load_mni152_template(resolution=2), "the MNI152 template"
    mean = store.mean_image()
    if mean is not None:
        return nib.load(str(mean)), "the subjects' mean functional image"
    mask, affine = store.mask()
    return nib.Nifti1Image(mask.astype(np.float32), affine), "the brain mask (a store made before the mean image was kept)"


def _threshold(threshold: Optional[float]) -> float:
    """The given threshold, or one just above 0: the volume holds 0 outside the mask, which a diverging colour map
    would otherwise paint as a white box over the anatomy."""
    return threshold if threshold is not None else 1e-6


def _limit(values: np.ndarray, vmax: Optional[float]) -> float:
    finite = np.abs(np.asarray(values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    return float(vmax) if vmax else float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def stat_map(values: np.ndarray, store: Store, path: PathLike, title: str, vmax: Optional[float] = None,
             threshold: Optional[float] = None, cmap: str = "RdBu_r", outline: Optional[np.ndarray] = None) -> Path:
    """Axial slices of ``values`` (per voxel, store order) over ``background(store)``; ``threshold`` hides |v| below it;
    ``outline`` (per voxel, bool) is drawn as a black contour (e.g. the parcels with q < 0.05)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    bg, _ = background(store)
    path = Path(path)
    figure = plt.figure(figsize=(12, 2.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's notes on resampling and non-diagonal affines say nothing wrong
        display = plotting.plot_stat_map(_image(values, store.mask()), bg_img=bg, display_mode="z", cut_coords=CUTS,
                                         figure=figure, title=title, vmax=_limit(values, vmax), threshold=_threshold(threshold),
                                         cmap=cmap,
                                         colorbar=True, draw_cross=False, black_bg=False)
        if outline is not None and np.any(outline):
            display.add_contours(_image(np.asarray(outline, dtype=np.float32), store.mask()), levels=[0.5], colors="k",
                                 linewidths=0.8)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def glass_brain(values: np.ndarray, store: Store, path: PathLike, title: str, vmax: Optional[float] = None,
                threshold: Optional[float] = None) -> Optional[Path]:
    """The glass-brain projection of ``values``; None where the store is not in MNI space (the outline is MNI's)."""
    if store.space != "mni":
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    path = Path(path)
    figure = plt.figure(figsize=(9, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plotting.plot_glass_brain(_image(values, store.mask()), figure=figure, title=title, vmax=_limit(values, vmax),
                                  threshold=_threshold(threshold), colorbar=True, plot_abs=False, cmap="RdBu_r")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def interactive_map(values: np.ndarray, store: Store, path: PathLike, title: str, vmax: Optional[float] = None,
                    threshold: Optional[float] = None) -> Path:
    """nilearn's ``view_img`` of ``values`` as one self-contained HTML page (scripts inline, no network)."""
    from nilearn import plotting

    bg, _ = background(store)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = plotting.view_img(_image(values, store.mask()), bg_img=bg, title=title, vmax=_limit(values, vmax),
                                 threshold=_threshold(threshold), symmetric_cmap=True,
                                 cmap="RdBu_r", black_bg=False, colorbar=True)
    view.save_as_html(str(path))
    return path

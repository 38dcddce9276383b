"""The atlas lesion sweep against separate ``--roi`` runs, on a prepared store (``giblet bench --case lesion_atlas``).

Both run on a model of the store's sizes with the defaults' architecture (untrained: the time of a lesion does
not depend on the weights). The atlas is the store's mask cut into cubes (``cube_atlas``), the cube edge chosen
so the parcel count is closest to ``parcels``. The sweep is ``lesion_atlas`` without the top parcels' reports
(nulls included); the separate runs are ``lesion`` (the ``--roi`` command, its files included) on ``roi_runs``
parcels of the median size, with the same number of permutations. Seconds per parcel are compared.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import nibabel as nib
import numpy as np

from giblet.config import Config, load_config
from giblet.data.parcels import cube_atlas
from giblet.data.store import Store
from giblet.eval.atlas import lesion_atlas
from giblet.eval.lesion import lesion
from giblet.models import GibletAutoencoder, dims_from_manifest
from giblet.models.checkpoint import save_checkpoint


def _cube_for(mask: np.ndarray, parcels: int) -> int:
    counts = {edge: int(cube_atlas(mask, edge).max()) for edge in range(1, 17)}
    return min(counts, key=lambda edge: abs(counts[edge] - parcels))


def lesion_atlas_times(store: Store, config: Optional[Config] = None, parcels: int = 150, permutations: int = 39,
                       roi_runs: int = 2, split: str = "test", seed: int = 0) -> Dict[str, object]:
    """Seconds of the atlas sweep and of ``roi_runs`` separate ``--roi`` runs, per parcel, and their ratio."""
    config = config or load_config(None)
    model_config = dataclasses.replace(config.model, linear_branch=False)  # no ridge fit: the lesions' cost alone
    model = GibletAutoencoder(dims_from_manifest(store.manifest, model_config.audio_input, model_config.inputs), model_config)
    model.set_grid(*store.mask())
    mask, affine = store.mask()
    edge = _cube_for(mask, parcels)
    labels = cube_atlas(mask, edge)
    with tempfile.TemporaryDirectory(prefix="giblet-bench-lesion-") as folder:
        folder = Path(folder)
        run = folder / "run"
        save_checkpoint(model, run / "checkpoints" / "best.pt", store_key=store.key)
        atlas = folder / "cubes.nii.gz"
        nib.save(nib.Nifti1Image(labels.astype(np.int32), affine), str(atlas))
        started = time.perf_counter()
        report = lesion_atlas(run, atlas, folder / "atlas", store.path, permutations, split, seed, reports=False, progress=False)
        sweep_s = time.perf_counter() - started
        sizes = np.array([parcel["voxels"] for parcel in report["parcels"]])
        chosen = [report["parcels"][i]["label"] for i in np.argsort(np.abs(sizes - np.median(sizes)))[:roi_runs]]
        roi_s = []
        for label in chosen:
            roi = folder / f"parcel_{label}.nii.gz"
            nib.save(nib.Nifti1Image((labels == label).astype(np.uint8), affine), str(roi))
            started = time.perf_counter()
            lesion(run, roi, folder / f"roi_{label}", store.path, permutations, split, seed, progress=False)
            roi_s.append(time.perf_counter() - started)
    n = len(report["parcels"])
    per_roi = float(np.median(roi_s))
    return {
        "store": str(store.path), "voxels": store.n_voxels, "windows": report["windows"], "parcels": n, "cube_edge": edge,
        "median_parcel_voxels": float(np.median(sizes)), "permutations": permutations,
        "null_classes": len(report["null"]["classes"]), "sweep_s": sweep_s, "sweep_s_per_parcel": sweep_s / n,
        "roi_runs": len(roi_s), "roi_s_per_parcel": per_roi, "speedup_per_parcel": per_roi / (sweep_s / n),
        "roi_runs_s_for_all_parcels": per_roi * n,
    }

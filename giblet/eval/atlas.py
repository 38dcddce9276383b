"""`giblet lesion RUN --atlas LABELS.nii.gz`: what each parcel of an atlas carries, by silencing it.

Every parcel (integer label > 0 of the label image, read onto the store's grid by
``giblet.data.volume``'s one policy) is silenced in turn on the same held-out windows,
many parcels per decoder pass (``GibletAutoencoder.silenced_decoder``). Each modality's
relative loss change is compared with a null of random *contiguous* parcels (grown from
random voxels of the mask through face neighbours) of the parcel's size class: parcels
whose sizes lie within a factor ``SIZE_RATIO`` share one null, drawn at the class's
geometric-mean size. ``p = (1 + #{null >= observed}) / (1 + N)``; ``q`` is the
Benjamini-Hochberg adjustment over all parcels x modalities.

Writes ``OUT/`` (default ``RUN/lesion/atlas-<label image name>/``), atomically:

- ``atlas.json``: ``{"parcels": [{"label", "voxels", "size_class", "modalities": {"video": {"loss_intact",
  "loss_lesioned", "relative_change", "p_value", "q_value", "share_of_brain", "relative_shift", "shift_p_value",
  "shift_q_value"}, ...}}], "null": {...}, "top": {...}, "top_by_shift": {...},
  "whole_brain": {"video": {"loss_intact", "loss_silenced", "relative_change", "parcels_sum_of_shares"}, ...},
  "reliability", "split", "windows", ...}``. ``whole_brain`` is every layer-7 unit silenced at once: how much of each
  reconstruction the decoder reads from the brain at all on these windows, the scale of every parcel's change
  (``share_of_brain``: the parcel's loss increase over the whole brain's). ``parcels_sum_of_shares`` near 1 says
  the parcels hold what the brain gives apart; far below 1, that they hold it redundantly, so silencing any one
  removes little of it and the map is mostly noise;
- ``carries_<modality>.nii.gz`` (each voxel: its parcel's relative change; 0 outside the atlas) and
  ``q_<modality>.nii.gz`` (its parcel's q; 1 outside);
- ``shift_<modality>.nii.gz`` and ``shift_q_<modality>.nii.gz``: the same for the relative shift (how far
  silencing the parcel moves the reconstruction, ``giblet.eval.lesion``), the steadier of the two maps;
- ``carries_<modality>.png``: the map on axial slices (``giblet.eval.brainmaps``), parcels with q < 0.05 outlined;
- ``top_<modality>/``: the ``--roi`` report (frames.mp4, audio, nearest texts) of the parcel that carries
  most of that modality.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from giblet.data import volume
from giblet.data.dataset import WindowDataset, window_index
from giblet.data.parcels import size_classes
from giblet.errors import DataError
from giblet.eval import brainmaps
from giblet.eval.lesion import (LESIONS_PER_PASS, _encode, check_replaceable, contiguous_null, lesion,
                                lesion_effects, p_value, relative_change, relative_shift, roi_name,
                                write_report_folder)
from giblet.eval.runs import PathLike, load_model, open_run, run_folder
from giblet.progress import bar
from giblet.train.losses import GibletLoss, LossScales

MIN_PARCEL_VOXELS = 5  # a smaller parcel is left out (with a warning): too few units for a lesion or a null worth the name
SIZE_RATIO = 1.25  # parcels whose sizes differ by at most this factor share one null
TOP = 10  # parcels listed per modality in atlas.json's "top"
MARKER, KIND = "atlas.json", "atlas lesion report"  # what makes an existing --out replaceable


class AtlasWarning(UserWarning):
    """Part of an atlas that cannot be mapped (e.g. parcels too small) and is left out."""


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of ``p`` (any shape): the smallest false discovery rate at which each is kept."""
    flat = np.asarray(p, dtype=np.float64).ravel()
    n = flat.size
    if n == 0:
        return flat.reshape(np.shape(p))
    order = np.argsort(flat)
    ranked = flat[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = q
    return out.reshape(np.shape(p))


def share_of_brain(intact: float, lesioned: float, silenced: float) -> Optional[float]:
    """A parcel's loss increase as a fraction of the whole brain's (every layer-7 unit silenced), or None where
    silencing the whole brain raises the loss by nothing: then the decoder reads nothing from layer 7 on these
    windows, and no parcel's change is more than noise."""
    whole = silenced - intact
    return float((lesioned - intact) / whole) if whole > 0 else None


def lesion_atlas(run: PathLike, atlas: PathLike, out: Optional[PathLike] = None, store_path: Optional[PathLike] = None,
                 permutations: int = 39, split: str = "test", seed: int = 0, reports: bool = True,
                 progress: Optional[bool] = None) -> Dict[str, object]:
    """Silence every parcel of ``atlas`` in turn; writes ``out`` and returns atlas.json's dict."""
    run, atlas = Path(run), Path(atlas)
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    checkpoint, store = open_run(run, store_path, split)
    grid = store.mask()
    labels = volume.load_labels(atlas, grid, kind="atlas")  # (V,) int, 0 = in no parcel
    found, counts = np.unique(labels[labels > 0], return_counts=True)
    if found.size == 0:
        raise DataError(atlas, "no parcel (label > 0) inside the store's mask", expected="a label image of the store's brain",
                        fix="check that the image is an atlas of this store's space (giblet data atlas cubes STORE makes one)")
    small = found[counts < MIN_PARCEL_VOXELS]
    if small.size:
        warnings.warn(f"{atlas}: {small.size} parcel(s) with fewer than {MIN_PARCEL_VOXELS} voxels inside the mask left out "
                      f"(labels {', '.join(map(str, small[:10].tolist()))}{' ...' if small.size > 10 else ''}): merge them into "
                      "a neighbour or use a coarser atlas to map them", AtlasWarning, stacklevel=2)
        labels = np.where(np.isin(labels, small), 0, labels)
    parcel_labels = found[counts >= MIN_PARCEL_VOXELS]
    if parcel_labels.size == 0:
        raise DataError(atlas, f"every parcel has fewer than {MIN_PARCEL_VOXELS} voxels inside the store's mask",
                        expected=f"parcels of at least {MIN_PARCEL_VOXELS} voxels", fix="use a coarser atlas (e.g. larger cubes)")
    out = Path(out) if out is not None else run_folder(run, checkpoint) / "lesion" / f"atlas-{roi_name(atlas)}"
    if out.exists():
        check_replaceable(out, MARKER, KIND)
    model = load_model(checkpoint, store)
    dataset = WindowDataset(store, split, "cross_subject", window_index(store))
    loss = GibletLoss(scales=LossScales.from_store(store, model))
    encoded = _encode(model, dataset)
    members = torch.from_numpy(labels[None, :] == parcel_labels[:, None])  # (P, V) bool
    sizes = members.sum(dim=1).numpy()
    # Each half of the windows (in time) scored on its own: the whole block's losses are their weighted mean, and how
    # well the halves' maps agree says how much of the map is the block's own noise.
    halves = [h for h in _halves(encoded) if h]
    counts = [sum(brain.shape[0] for _, brain, _ in h) for h in halves]
    # One more lesion beside the parcels: every unit of layer 7 silenced. What the whole brain gives each
    # reconstruction on these windows is the scale a parcel's change is read against (share_of_brain).
    everything = torch.ones(1, members.shape[1], dtype=torch.bool)
    scored = []
    for i, h in enumerate(halves):
        effects = lesion_effects(model, loss, h, torch.cat([members, everything]), progress,
                                 f"{len(parcel_labels)} parcels and the whole brain, windows part {i + 1}/{len(halves)}")
        scored.append((effects.intact, {name: value[:-1] for name, value in effects.losses.items()},
                       {name: float(value[-1]) for name, value in effects.losses.items()},
                       {name: value[:-1] for name, value in effects.shifts.items()}))

    def pooled(k: int) -> Dict[str, object]:
        """Item ``k`` of every half's scores, their mean weighted by the halves' window counts."""
        return {name: sum(n * part[k][name] for n, part in zip(counts, scored)) / sum(counts) for name in scored[0][k]}

    intact, lesioned, silenced, shifted = pooled(0), pooled(1), pooled(2), pooled(3)
    shares = {name: [share_of_brain(intact[name], float(value), silenced[name]) for value in lesioned[name]] for name in intact}
    whole_brain = {name: {"loss_intact": intact[name], "loss_silenced": silenced[name],
                          "relative_change": relative_change(intact[name], silenced[name]),
                          "parcels_sum_of_shares": None if shares[name][0] is None else float(sum(shares[name]))} for name in intact}
    reliability = _split_half([part[:2] for part in scored], counts)
    class_of, class_sizes = size_classes(sizes.tolist(), SIZE_RATIO)
    nulls: List[Tuple[Dict[str, List[float]], Dict[str, List[float]]]] = []
    with bar("nulls", total=len(class_sizes), show=progress) as progress_bar:
        for c, size in enumerate(class_sizes):
            # One seed per class, so a class's null is the same whatever other classes the atlas has.
            nulls.append(contiguous_null(model, loss, encoded, intact, grid[0], int(size), permutations,
                                         seed=seed + int(size), progress=False))
            progress_bar.advance(1)

    names = list(intact)
    change = {name: np.array([relative_change(intact[name], float(v)) for v in lesioned[name]]) for name in names}
    shift = {name: np.array([relative_shift(intact[name], float(v)) for v in shifted[name]]) for name in names}
    p, q = _p_and_q(change, [null[0] for null in nulls], class_of, permutations)
    shift_p, shift_q = _p_and_q(shift, [null[1] for null in nulls], class_of, permutations)

    def number(value: float) -> Optional[float]:
        return None if not np.isfinite(value) else float(value)

    parcels = [
        {
            "label": int(label),
            "voxels": int(sizes[i]),
            "size_class": int(class_of[i]),
            "modalities": {
                name: {"loss_intact": intact[name], "loss_lesioned": float(lesioned[name][i]),
                       "relative_change": float(change[name][i]), "p_value": number(p[name][i]), "q_value": number(q[name][i]),
                       "share_of_brain": shares[name][i],
                       "relative_shift": float(shift[name][i]), "shift_p_value": number(shift_p[name][i]),
                       "shift_q_value": number(shift_q[name][i])}
                for name in names
            },
        }
        for i, label in enumerate(parcel_labels)
    ]
    top = {name: [int(parcel_labels[i]) for i in np.argsort(-change[name], kind="stable")[:TOP]] for name in names}
    top_by_shift = {name: [int(parcel_labels[i]) for i in np.argsort(-shift[name], kind="stable")[:TOP]] for name in names}
    report: Dict[str, object] = {
        "atlas": str(atlas),
        "parcels": parcels,
        "null": {
            "kind": "random contiguous parcels (face neighbours, inside the mask), one null per size class",
            "permutations": permutations, "size_ratio": SIZE_RATIO,
            "classes": [{"size": int(size), "seed": seed + int(size), "parcels": int((class_of == c).sum())}
                        for c, size in enumerate(class_sizes)],
        },
        "top": top,
        "top_by_shift": top_by_shift,
        "reliability": reliability,
        "whole_brain": whole_brain,
        "split": split,
        "windows": len(dataset),
        "trs": [int(t) for t in store.splits[split]],
        "n_units": model.n_units,
        "voxels_in_parcels": int((labels > 0).sum()),
        "left_out_parcels": [int(label) for label in small],
        "lesions_per_pass": LESIONS_PER_PASS,
        "checkpoint": str(checkpoint),
        "out": str(out),
    }
    _write_outputs(out, report, labels, parcel_labels, change, q, shift, shift_q, store, run, store_path or store.path, atlas, split,
                   reports, progress)
    return report


def _p_and_q(values: Dict[str, np.ndarray], nulls: List[Dict[str, List[float]]], class_of: np.ndarray, permutations: int):
    """Per modality, each parcel's p against its size class's null, and the Benjamini-Hochberg q over all parcels x
    modalities (NaN without permutations)."""
    names = list(values)
    if not permutations:
        return ({name: np.full(values[name].size, np.nan) for name in names},) * 2
    p = {name: np.array([p_value(values[name][i], nulls[class_of[i]][name]) for i in range(values[name].size)]) for name in names}
    q_all = benjamini_hochberg(np.stack([p[name] for name in names]))
    return p, {name: q_all[j] for j, name in enumerate(names)}


def _write_outputs(out: Path, report, labels, parcel_labels, change, q, shift, shift_q, store, run, store_path, atlas, split,
                   reports, progress) -> None:
    grid = store.mask()
    inside = labels > 0
    parcel = np.searchsorted(parcel_labels, labels).clip(max=len(parcel_labels) - 1)  # each voxel's parcel, where inside

    def fill(tmp: Path) -> Dict[str, Dict[str, str]]:
        files: Dict[str, Dict[str, str]] = {}
        for name in change:
            carries = np.where(inside, change[name][parcel], 0.0)
            q_map = np.where(inside, np.nan_to_num(q[name][parcel], nan=1.0), 1.0)
            volume.save_volume(carries, grid, tmp / f"carries_{name}.nii.gz")
            volume.save_volume(q_map, grid, tmp / f"q_{name}.nii.gz")
            brainmaps.stat_map(carries, store, tmp / f"carries_{name}.png", f"what each parcel carries: {name} (outlined: q < 0.05)",
                               outline=q_map < 0.05)
            shifts = np.where(inside, shift[name][parcel], 0.0)
            volume.save_volume(shifts, grid, tmp / f"shift_{name}.nii.gz")
            volume.save_volume(np.where(inside, np.nan_to_num(shift_q[name][parcel], nan=1.0), 1.0), grid, tmp / f"shift_q_{name}.nii.gz")
            files[name] = {"carries": f"carries_{name}.nii.gz", "q": f"q_{name}.nii.gz", "png": f"carries_{name}.png",
                           "shift": f"shift_{name}.nii.gz", "shift_q": f"shift_q_{name}.nii.gz"}
        if reports:
            for name, ranked in report["top"].items():
                label = ranked[0]
                roi = tmp / f".parcel-{label}.nii.gz"
                volume.save_volume((labels == label).astype(np.uint8), grid, roi, dtype=np.uint8)
                # The --roi report of the top parcel: frames, sound and texts, intact and lesioned (its p is atlas.json's).
                lesion(run, roi, tmp / f"top_{name}", store_path, permutations=0, split=split, progress=False)
                roi.unlink()
                files[name]["top_report"] = f"top_{name}"
        return files

    write_report_folder(out, MARKER, KIND, fill, report)


def _halves(encoded: List) -> List[List]:
    """The encoded batches in two groups, the first and second half of the windows in time (one group when there is
    a single batch)."""
    total = sum(brain.shape[0] for _, brain, _ in encoded)
    first, seen = [], 0
    for item in encoded:
        if seen and seen + item[1].shape[0] / 2 > total / 2:
            break
        first.append(item)
        seen += item[1].shape[0]
    return [first, encoded[len(first):]]


def _split_half(scored, counts) -> Dict[str, object]:
    """Per modality, Pearson's r over parcels between the two halves' relative changes, and the Spearman-Brown
    reliability of the whole block's map, ``2r / (1 + r)``; None where there is one half or the changes are constant."""
    out: Dict[str, object] = {"windows": [int(n) for n in counts],
                              "how": "the parcels' relative changes on the first vs the second half of the windows"}
    for name in scored[0][0]:
        r = None
        if len(scored) == 2:
            a, b = ([relative_change(intact[name], float(v)) for v in lesioned[name]] for intact, lesioned in scored)
            if np.std(a) > 0 and np.std(b) > 0:
                r = float(np.corrcoef(a, b)[0, 1])
        out[name] = {"split_half_r": r, "spearman_brown": None if r is None else 2 * r / (1 + r) if r > -1 else None}
    return out

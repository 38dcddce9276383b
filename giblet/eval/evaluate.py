"""`giblet evaluate RUN`: the trained brain layer against held-out TRs, beside a ridge baseline.

Writes ``RUN/eval/``: ``metrics.json``, ``prediction_test.nii.gz`` (4-D, the test TRs,
on the input grid, zeros outside the mask), ``r_map.nii.gz``, ``r_map_<baseline>.nii.gz`` for each
baseline, ``noise_ceiling.nii.gz``, ``r_map.png`` (drawn by ``giblet.eval.brainmaps``) and ``r_histogram.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from giblet.config import load_run_config
from giblet.data.dataset import WindowDataset, window_index
from giblet.data.store import Store
from giblet.eval.metrics import BOOTSTRAP_BLOCK_S, mean_subject_r, noise_ceiling, paired_difference, pearson_r
from giblet.eval.runs import load_model, open_run
from giblet.linear import FirRidge, HrfRidge, banded_ridge, fit_splits, regressor_parts

# Voxels whose noise ceiling is below this are left out of the noise-normalized mean (dividing by ~0 is noise).
CEILING_FLOOR = 0.1


@torch.no_grad()
def predict(model, store: Store, split: str = "test", batch_size: int = 32) -> np.ndarray:
    """Layer 7 for every TR of ``split``, in TR order: ``(T, units)`` float32."""
    model.eval()
    dataset = WindowDataset(store, split, "cross_subject", window_index(store))
    device = model.l7_brain.weight.device
    rows = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.batch(np.arange(start, min(len(dataset), start + batch_size)))
        rows.append(model.encode({k: v.to(device) for k, v in batch.items()}).float().cpu().numpy())
    return np.concatenate(rows)


def _truth(store: Store, split: str) -> Optional[Dict[str, object]]:
    """A synthetic dataset's ground truth for ``split``: ``folder``, ``carries (voxels,)`` bool (the voxels with
    signal), ``signal (T, signal voxels)`` (the noise-free response), ``ceiling (signal voxels,)`` (its r against
    the group mean there), ``kinds (signal voxels,)`` (region kinds, None without ``tuning.npz``); ``skipped``
    instead when the store's mask is not the truth's; None without a truth."""
    import nibabel as nib

    movie = store.manifest.get("sources", {}).get("movie", {}).get("path")
    folder = Path(movie).parent / "_truth" if movie else None
    if folder is None or not (folder / "signal.npy").is_file() or not (folder / "brain_mask.nii.gz").is_file():
        return None
    mask, _ = store.mask()
    truth_mask = np.asarray(nib.load(str(folder / "brain_mask.nii.gz")).dataobj) > 0
    if truth_mask.shape != mask.shape or not np.array_equal(truth_mask, mask):
        return {"folder": folder, "skipped": "the store's voxel mask differs from the truth's brain mask"}
    start, stop = store.splits[split]
    signal = np.load(folder / "signal.npy", mmap_mode="r")
    carries = np.asarray(signal).std(axis=0) > 0
    group = np.asarray(store.fmri_mean()[start:stop], dtype=np.float32)
    first = int(store.manifest["alignment"]["first_tr"])  # store TR t is scan TR first + t, the truth's row
    truth_signal = np.asarray(signal[first + start : first + stop], dtype=np.float32)[:, carries]
    kinds = np.load(folder / "tuning.npz")["region_kind"][carries] if (folder / "tuning.npz").is_file() else None
    return {"folder": folder, "carries": carries, "signal": truth_signal, "ceiling": pearson_r(truth_signal, group[:, carries]),
            "kinds": kinds}


def truth_groups(truth: Dict[str, object]) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """The voxel groups a truth scores (``signal`` and each kind of region), as ``(voxels,)`` bool over all the
    store's voxels, and each group's noise-free mean r (``paired_difference``'s ``scales``: fractions of the
    ceiling)."""
    carries, ceiling, kinds = truth["carries"], truth["ceiling"], truth["kinds"]
    inside = {"signal": np.ones(int(carries.sum()), dtype=bool)}
    if kinds is not None:
        inside.update({str(kind): kinds == kind for kind in sorted(set(kinds.tolist()))})
    groups = {}
    for name, members in inside.items():
        groups[name] = np.zeros(carries.size, dtype=bool)
        groups[name][np.flatnonzero(carries)[members]] = True
    return groups, {name: float(ceiling[members].mean()) for name, members in inside.items()}


def truth_metrics(store: Store, split: str, scores: Dict[str, np.ndarray],
                  predictions: Optional[Dict[str, np.ndarray]] = None, subjects: Optional[np.ndarray] = None,
                  loso_ceiling: Optional[np.ndarray] = None, present: Optional[np.ndarray] = None,
                  leads: Optional[Dict[str, Dict[str, Dict[str, object]]]] = None,
                  truth: Optional[Dict[str, object]] = None) -> Optional[Dict[str, object]]:
    """Scores on the voxels a synthetic dataset's ground truth says carry signal; None without a truth.

    ``scores`` maps a name (``model``, ``ridge``, ...) to per-voxel r against the group mean. Two ceilings:
    ``noise_ceiling`` (``_truth/noise_ceiling.npy``, expected over the whole movie) and
    ``true_signal_r``, the r that the noise-free signal itself reaches against the same group mean on
    the same TRs: what a perfect model scores here. ``fraction_of_ceiling`` divides by the latter. With the
    model's and the baselines' ``predictions``, each baseline's ``model_minus_this`` (on the signal voxels and per
    kind): the model's lead in fraction of the ceiling, with a 95% interval from a block bootstrap of the TRs;
    ``leads[baseline]``, where given, is that bootstrap already run over ``truth_groups`` (``evaluate`` runs one
    per baseline for all voxels and these groups at once; ``truth``: ``_truth(store, split)``, read here when not
    given). With ``subjects`` (the split's responses,
    ``(subjects, TRs, voxels)``), the model's prediction and the leave-one-subject-out ``loso_ceiling``, also
    ``per_subject`` (``_per_subject_truth``; ``present``: which subject has which TR, ``Store.present``).
    """
    truth = _truth(store, split) if truth is None else truth
    if truth is None or "skipped" in truth:
        return None if truth is None else {"folder": str(truth["folder"]), "skipped": truth["skipped"]}
    folder, carries, truth_signal, ceiling, kinds = (truth[key] for key in ("folder", "carries", "signal", "ceiling", "kinds"))
    result: Dict[str, object] = {
        "folder": str(folder),
        "signal_voxels": int(carries.sum()),
        "noise_ceiling": float(np.load(folder / "noise_ceiling.npy")[carries].mean()),
        "true_signal_r": float(ceiling.mean()),
    }
    if subjects is not None and subjects.shape[0] > 1 and predictions is not None and "model" in predictions:
        result["per_subject"] = _per_subject_truth(np.asarray(predictions["model"])[:, carries], truth_signal,
                                                   subjects[:, :, carries], loso_ceiling[carries], present)
    for name, r in scores.items():
        result[name] = {"mean_r": float(r[carries].mean()), "fraction_of_ceiling": float(r[carries].mean() / ceiling.mean()),
                        "mean_r_noise_voxels": float(r[~carries].mean()) if (~carries).any() else math.nan}
        if predictions is not None and name in predictions:
            # Against the noise-free signal itself: no measurement noise in the target, so a steadier comparison
            # of two models than r against the group mean (1 for a perfect model).
            result[name]["r_vs_signal"] = float(pearson_r(np.asarray(predictions[name], dtype=np.float32)[:, carries], truth_signal).mean())
    # The same per kind of region (visual, auditory, language, mixed): where a model falls short.
    if kinds is not None:
        by_kind: Dict[str, Dict[str, object]] = {}
        for kind in sorted(set(kinds.tolist())):
            inside = kinds == kind
            entry: Dict[str, object] = {"voxels": int(inside.sum()), "true_signal_r": float(ceiling[inside].mean())}
            for name, r in scores.items():
                mean_r = float(r[carries][inside].mean())
                entry[name] = {"mean_r": mean_r, "fraction_of_ceiling": mean_r / float(ceiling[inside].mean())}
            by_kind[str(kind)] = entry
        result["by_kind"] = by_kind
    # The model against each baseline with the block's own uncertainty, in fractions of the ceiling.
    if predictions is not None and "model" in predictions:
        leads = dict(leads or {})
        if any(name != "model" and name not in leads for name in predictions):  # evaluate passes them all
            groups, scales = truth_groups(truth)
            start, stop = store.splits[split]
            group = np.asarray(store.fmri_mean()[start:stop], dtype=np.float32)
        for name, baseline in predictions.items():
            if name == "model":
                continue
            if name not in leads:
                leads[name] = paired_difference(np.asarray(predictions["model"], dtype=np.float32), np.asarray(baseline, dtype=np.float32),
                                                group, groups, block_trs(store), scales=scales)
            result[name]["model_minus_this"] = leads[name]["signal"]
            for kind in result.get("by_kind", {}):
                result["by_kind"][kind][name]["model_minus_this"] = leads[name][kind]
    return result


def block_trs(store: Store) -> int:
    """TRs per block of the bootstrap that puts an interval on the model's lead over a baseline."""
    return int(math.ceil(BOOTSTRAP_BLOCK_S / store.tr_s))


def _per_subject_truth(prediction: np.ndarray, truth_signal: np.ndarray, subjects: np.ndarray,
                       loso_ceiling: np.ndarray, present: Optional[np.ndarray] = None) -> Dict[str, float]:
    """On the signal voxels (every argument already restricted to them): the model's and the noise-free
    signal's mean r against each subject, over the mean leave-one-subject-out ceiling. The ceiling correlates
    a subject with the mean of the others, itself noisy, so it sits below what a perfect model reaches: the
    noise-free signal's ratio says by how much."""

    def mean_r_subject(values: np.ndarray) -> float:
        return float(mean_subject_r(values, subjects, present).mean())

    model, perfect, loso = mean_r_subject(prediction), mean_r_subject(truth_signal), float(loso_ceiling.mean())
    return {"model_mean_r_subject": model, "noise_free_signal_mean_r_subject": perfect, "noise_ceiling_mean": loso,
            "model_over_noise_ceiling": model / loso, "noise_free_signal_over_noise_ceiling": perfect / loso}


def _plots(r: np.ndarray, store: Store, out: Path) -> None:
    """``r_map.png`` (nilearn, on the anatomy ``brainmaps.background`` picks) and ``r_histogram.png``."""
    import matplotlib

    from giblet.eval.brainmaps import stat_map

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stat_map(r, store, out / "r_map.png", "test r per voxel", vmax=1.0)
    figure, axis = plt.subplots(figsize=(5, 3.4))
    axis.hist(r, bins=50, color="#4c72b0")
    axis.axvline(float(np.mean(r)), color="k", linestyle="--", label=f"mean {np.mean(r):.3f}")
    axis.set_xlabel("per-voxel r on the test TRs")
    axis.set_ylabel("voxels")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "r_histogram.png", dpi=100)
    plt.close(figure)


def evaluate(run: Union[str, Path], store_path: Optional[Union[str, Path]] = None, baseline: Optional[str] = "ridge",
             split: str = "test") -> Dict[str, object]:
    """Score a run's best checkpoint on the held-out TRs; writes ``RUN/eval/`` and returns the metrics."""
    from giblet.data.volume import save_volume

    run = Path(run)
    checkpoint, store = open_run(run, store_path, split)
    model = load_model(checkpoint, store)
    mask, affine = store.mask()
    start, stop = store.splits[split]
    prediction = predict(model, store, split)
    group = np.asarray(store.fmri_mean()[start:stop], dtype=np.float32)
    subjects = np.asarray(store.fmri()[:, start:stop], dtype=np.float32)
    r = pearson_r(prediction, group)
    present = store.present(start, stop)  # a subject cut short is scored on the TRs it has
    r_subject = mean_subject_r(prediction, subjects, present)
    ceiling = noise_ceiling(subjects, present) if subjects.shape[0] > 1 else np.full(r.shape, np.nan)
    reliable = ceiling >= CEILING_FLOOR
    metrics: Dict[str, object] = {
        "split": split,
        "checkpoint": str(checkpoint),
        "n_voxels": int(r.size),
        "test_trs": [int(start), int(stop)],
        "mean_r": float(r.mean()),
        "median_r": float(np.median(r)),
        "mean_r_subject": float(r_subject.mean()),
        "noise_ceiling_mean": float(np.nanmean(ceiling)),
        "noise_normalized_r": float(np.mean(r_subject[reliable] / ceiling[reliable])) if reliable.any() else math.nan,
        "n_voxels_above_ceiling_floor": int(reliable.sum()),
        "ceiling_floor": CEILING_FLOOR,
        "baselines": {},
    }
    scores, predictions = {"model": r}, {"model": prediction}
    truth = _truth(store, split)
    groups, scales = truth_groups(truth) if truth is not None and "skipped" not in truth else ({}, {})
    leads: Dict[str, Dict[str, Dict[str, object]]] = {}
    if baseline == "ridge":
        # A model that reads no frames is compared with linear models that read none either.
        parts = regressor_parts(store, model.stimuli.frame_targets, video=model.dims.present("video"))
        features = np.concatenate(list(parts.values()), axis=1)
        delays = int(math.ceil(store.manifest["window"]["lookback_s"] / store.tr_s))
        everything = np.asarray(store.fmri_mean(), dtype=np.float32)
        hrf = load_run_config(run / "config.yaml").alignment.hrf  # the run's HRF: the baselines see what its branch saw
        # The FIR ridge learns a time course per feature; the HRF ridge assumes the canonical one (one weight
        # per feature): with few training TRs the second is often the stronger linear model.
        fits = {
            "ridge": (fit_splits(store, FirRidge(delays), features, (split,), everything)[split], {"fir_delays_trs": delays}),
            "ridge_hrf": (fit_splits(store, HrfRidge(store.tr_s, hrf), features, (split,), everything)[split], {"hrf": hrf}),
        }
        # The same blocks, one kernel each: every voxel weighs video, audio and text and shrinks them on its own.
        banded, shares = banded_ridge(store, parts, hrf, (split,), everything)
        fits["ridge_banded"] = (banded[split], {"hrf": hrf, "block_weight_shares": shares})
        for name, (fitted, about) in fits.items():
            fitted_r = pearson_r(fitted, group)
            metrics["baselines"][name] = {
                "mean_r": float(fitted_r.mean()),
                "median_r": float(np.median(fitted_r)),
                "features": int(features.shape[1]),
                **about,
            }
            scores[name], predictions[name] = fitted_r, fitted
            # Is the model ahead of this baseline by more than the held-out block's own luck? (metrics.paired_difference)
            # One bootstrap per baseline serves every voxel group: all voxels in mean r, and the truth's groups in
            # fractions of their ceiling (the same resamples; the figures are each group's own).
            leads[name] = paired_difference(prediction, fitted, group, {"all": np.ones(r.size, dtype=bool), **groups},
                                            block_trs(store), scales=scales)
            metrics["baselines"][name]["model_minus_this"] = leads[name].pop("all")
    if truth is not None:
        metrics["truth"] = truth_metrics(store, split, scores, predictions, subjects, ceiling, present, leads, truth)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    grid = (mask, affine)
    save_volume(prediction.T, grid, out / f"prediction_{split}.nii.gz", tr_s=store.tr_s)
    save_volume(r, grid, out / "r_map.nii.gz")
    save_volume(np.nan_to_num(ceiling), grid, out / "noise_ceiling.nii.gz")
    for name in metrics["baselines"]:
        save_volume(scores[name], grid, out / f"r_map_{name}.nii.gz")
    _plots(r, store, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

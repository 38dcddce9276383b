"""`giblet evaluate RUN`: the trained brain layer against held-out TRs, beside a ridge baseline.

Writes ``RUN/eval/``: ``metrics.json``, ``prediction_test.nii.gz`` (4-D, the test TRs,
on the input grid, zeros outside the mask), ``r_map.nii.gz``, ``noise_ceiling.nii.gz``,
``r_map.png`` and ``r_histogram.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from giblet.config import load_config
from giblet.data.dataset import WindowDataset, text_slots_for, window_index
from giblet.data.store import Store, open_store
from giblet.eval.metrics import noise_ceiling, pearson_r
from giblet.models import Stimuli
from giblet.models.checkpoint import find_checkpoint, load, read_checkpoint

# Voxels whose noise ceiling is below this are left out of the noise-normalized mean (dividing by ~0 is noise).
CEILING_FLOOR = 0.1
# Block weightings tried per voxel by the banded ridge's random search.
BANDED_SEARCH = 20


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


def tr_feature_parts(store: Store, small_frames: Optional[torch.Tensor]) -> Dict[str, np.ndarray]:
    """Fixed per-TR stimulus features of the linear baselines, one block per stream: ``video`` (coarse
    frames, 3x4 RGB), ``audio`` (mel bands), ``text`` (mean annotation embedding); a stream the store
    lacks (or ``small_frames`` None) has no block."""
    from giblet import ops

    manifest = store.manifest
    onsets = store.onsets()
    tr = store.tr_s
    parts: Dict[str, np.ndarray] = {}
    if small_frames is not None:
        coarse = torch.nn.functional.adaptive_avg_pool2d(small_frames.float() / 255.0, (3, 4)).flatten(1)  # (n_frames, 36)
        v = manifest["video"]
        parts["video"] = ops.grid_average(coarse, v["rate_hz"], torch.from_numpy(onsets - v["start_s"]), tr, 1)[:, 0].numpy()
    if "mel" in manifest["audio"]:
        m = manifest["audio"]["mel"]
        mel = torch.from_numpy(np.asarray(store.mel(), dtype=np.float32))
        parts["audio"] = ops.grid_average(mel, m["rate_hz"], torch.from_numpy(onsets - m["start_s"]), tr, 1)[:, 0].numpy()
    times = store.text_times()
    slots = text_slots_for(times[:, 0], times[:, 1], onsets, tr, 4)
    embeddings = np.asarray(store.text_embeddings(), dtype=np.float32)
    present = slots >= 0
    parts["text"] = (embeddings[slots.clip(0)] * present[..., None]).sum(axis=1) / np.maximum(present.sum(axis=1, keepdims=True), 1)
    return {name: part.astype(np.float64) for name, part in parts.items()}


def tr_features(store: Store, small_frames: Optional[torch.Tensor]) -> np.ndarray:
    """Fixed per-TR stimulus features for the ridge baselines: ``tr_feature_parts`` side by side."""
    return np.concatenate(list(tr_feature_parts(store, small_frames).values()), axis=1)


def ridge_baseline(store: Store, features: np.ndarray, delays: int, target: np.ndarray, split: str = "test") -> np.ndarray:
    """himalaya kernel ridge on FIR-delayed features, fit on the train TRs; predictions for the TRs of ``split``."""
    from himalaya.kernel_ridge import KernelRidgeCV

    from giblet.data.alignment import fir_delays

    train, test = store.splits["train"], store.splits[split]
    delayed = fir_delays(features, list(range(delays + 1)))
    mean = delayed[train[0] : train[1]].mean(axis=0)
    std = delayed[train[0] : train[1]].std(axis=0)
    delayed = (delayed - mean) / np.where(std > 0, std, 1.0)
    model = KernelRidgeCV(alphas=np.logspace(-1, 6, 15), kernel="linear")
    model.fit(delayed[train[0] : train[1]], target[train[0] : train[1]])
    return np.asarray(model.predict(delayed[test[0] : test[1]]), dtype=np.float32)


def hrf_ridge(store: Store, features: np.ndarray, hrf: str, split: str = "test",
              target: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``ridge_hrf`` baseline: per-TR ``features`` (``tr_features``) through the canonical HRF, a kernel
    ridge fit on the train TRs of ``target`` (default: the group mean); its predictions for ``split`` (for
    ``train``, the in-sample fit)."""
    from giblet.data.alignment import convolve_hrf

    target = np.asarray(store.fmri_mean(), dtype=np.float32) if target is None else target
    return ridge_baseline(store, convolve_hrf(features, store.tr_s, hrf), 0, target, split)


def banded_ridge(store: Store, parts: Dict[str, np.ndarray], hrf: Optional[str], splits: Sequence[str] = ("test",),
                 target: Optional[np.ndarray] = None, n_iter: int = BANDED_SEARCH, seed: int = 0
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """The ``ridge_banded`` baseline: the blocks of ``tr_feature_parts`` through the canonical HRF, one kernel
    per block, and a banded (multiple-kernel) ridge fit on the train TRs of ``target`` (default: the group
    mean). Each voxel gets its own weight per block and its own shrinkage, both chosen by 5-fold
    cross-validation on the training TRs (himalaya's random search over ``n_iter`` block weightings,
    seeded): a voxel that only hears is not diluted by 400 text dimensions, as it is in ``ridge_hrf``'s
    single kernel. Returns the predictions for each of ``splits`` (``train``: the in-sample fit) and the
    mean share of each block's kernel weight over the voxels. ``hrf`` None: the blocks are per-TR regressors
    already (convolved by the caller), used as they are.
    """
    target = np.asarray(store.fmri_mean(), dtype=np.float32) if target is None else target
    a, b = store.splits["train"]
    blocks, _ = _standardized_blocks(store, parts, hrf)
    model, offset = _fit_banded(store, blocks, target, n_iter, seed)
    predictions = {}
    for split in splits:
        c, d = store.splits[split]
        kernels = np.stack([x[c:d] @ x[a:b].T for x in blocks.values()])
        predictions[split] = (np.asarray(model.predict(kernels), dtype=np.float32) + offset).astype(np.float32)
    deltas = np.asarray(model.deltas_, dtype=np.float64)  # (blocks, voxels), log kernel weights
    shares = np.exp(deltas - deltas.max(axis=0))
    shares /= shares.sum(axis=0)
    return predictions, {name: float(share) for name, share in zip(blocks, shares.mean(axis=1))}


def banded_linear_map(store: Store, parts: Dict[str, np.ndarray], hrf: str, target: Optional[np.ndarray] = None,
                      n_iter: int = BANDED_SEARCH, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``banded_ridge``'s fit as one linear map ``(weight (features, voxels), bias (voxels,))`` float32 on the
    blocks of ``parts`` through the HRF, side by side (``hrf_regressors``): ``hrf_regressors(...) @ weight +
    bias`` is its prediction for every TR of the store (the model's linear branch)."""
    target = np.asarray(store.fmri_mean(), dtype=np.float32) if target is None else target
    a, b = store.splits["train"]
    blocks, scales = _standardized_blocks(store, parts, hrf)
    model, offset = _fit_banded(store, blocks, target, n_iter, seed)
    dual = np.asarray(model.dual_coef_, dtype=np.float64)  # (train TRs, voxels)
    weights = np.exp(np.asarray(model.deltas_, dtype=np.float64))  # (blocks, voxels)
    columns, bias = [], offset.astype(np.float64)
    for i, (name, x) in enumerate(blocks.items()):
        # Prediction = sum over blocks of exp(delta) K_block(new, train) @ dual; K = x_new x_train^T.
        w = (x[a:b].T.astype(np.float64) @ dual) * weights[i]  # on the standardized block
        mean, scale = scales[name]
        w = w / scale[:, None]  # on the raw regressors (a constant one has scale inf: weight 0)
        bias = bias - mean @ w
        columns.append(w)
    return np.concatenate(columns, axis=0).astype(np.float32), bias.astype(np.float32)


def _fit_banded(store: Store, blocks: Dict[str, np.ndarray], target: np.ndarray, n_iter: int, seed: int):
    """(himalaya's fitted MultipleKernelRidgeCV on the blocks' training-TR kernels, the target's training mean)."""
    from himalaya.kernel_ridge import MultipleKernelRidgeCV

    a, b = store.splits["train"]
    offset = target[a:b].mean(axis=0)
    model = MultipleKernelRidgeCV(
        kernels="precomputed", solver="random_search", random_state=seed,
        solver_params=dict(n_iter=n_iter, alphas=np.logspace(-4, 4, 17), progress_bar=False),
    )
    model.fit(np.stack([x[a:b] @ x[a:b].T for x in blocks.values()]), (target[a:b] - offset).astype(np.float32))
    return model, offset


def _standardized_blocks(store: Store, parts: Dict[str, np.ndarray], hrf: Optional[str]):
    """Each block through the HRF (``hrf`` None: as given), standardized on the training TRs and scaled so that
    its kernel has a mean diagonal of 1 (the search weighs blocks, not their widths); a column that is constant
    over the training TRs (to float32 precision) is left out (scale inf). ``(blocks, {name: (mean, scale)})``."""
    a, b = store.splits["train"]
    blocks, scales = {}, {}
    for name, part in parts.items():
        # Through hrf_regressors: exactly the float32 regressors the model's linear branch reads.
        x = (hrf_regressors(store, {name: part}, hrf) if hrf is not None else np.asarray(part, dtype=np.float32)).astype(np.float64)
        mean, std = x[a:b].mean(axis=0), x[a:b].std(axis=0)
        constant = std <= 1e-6 * np.maximum(np.abs(mean), 1e-3)
        scale = np.where(constant, np.inf, std) * math.sqrt(x.shape[1])
        blocks[name] = ((x - mean) / scale).astype(np.float32)
        scales[name] = (mean, scale)
    return blocks, scales


def hrf_regressors(store: Store, parts: Dict[str, np.ndarray], hrf: str) -> np.ndarray:
    """The blocks of ``tr_feature_parts`` through the canonical HRF, side by side: ``(TRs, features)`` float32."""
    from giblet.data.alignment import convolve_hrf

    return np.concatenate([convolve_hrf(part, store.tr_s, hrf) for part in parts.values()], axis=1).astype(np.float32)


def truth_metrics(store: Store, split: str, scores: Dict[str, np.ndarray],
                  predictions: Optional[Dict[str, np.ndarray]] = None, subjects: Optional[np.ndarray] = None,
                  loso_ceiling: Optional[np.ndarray] = None) -> Optional[Dict[str, object]]:
    """Scores on the voxels a synthetic dataset's ground truth says carry signal; None without a truth.

    ``scores`` maps a name (``model``, ``ridge``, ...) to per-voxel r against the group mean. Two ceilings:
    ``noise_ceiling`` (``_truth/noise_ceiling.npy``, expected over the whole movie) and
    ``true_signal_r``, the r that the noise-free signal itself reaches against the same group mean on
    the same TRs: what a perfect model scores here. ``fraction_of_ceiling`` divides by the latter.
    With ``subjects`` (the split's responses, ``(subjects, TRs, voxels)``), the model's prediction and the
    leave-one-subject-out ``loso_ceiling``, also ``per_subject`` (``_per_subject_truth``).
    """
    import nibabel as nib

    movie = store.manifest.get("sources", {}).get("movie", {}).get("path")
    truth = Path(movie).parent / "_truth" if movie else None
    if truth is None or not (truth / "signal.npy").is_file() or not (truth / "brain_mask.nii.gz").is_file():
        return None
    mask, _ = store.mask()
    truth_mask = np.asarray(nib.load(str(truth / "brain_mask.nii.gz")).dataobj) > 0
    if truth_mask.shape != mask.shape or not np.array_equal(truth_mask, mask):
        return {"folder": str(truth), "skipped": "the store's voxel mask differs from the truth's brain mask"}
    start, stop = store.splits[split]
    signal = np.load(truth / "signal.npy", mmap_mode="r")
    carries = np.asarray(signal).std(axis=0) > 0
    group = np.asarray(store.fmri_mean()[start:stop], dtype=np.float32)
    first = int(store.manifest["alignment"]["first_tr"])  # store TR t is scan TR first + t, the truth's row
    truth_signal = np.asarray(signal[first + start : first + stop], dtype=np.float32)[:, carries]
    ceiling = pearson_r(truth_signal, group[:, carries])
    if subjects is not None and subjects.shape[0] > 1 and predictions is not None and "model" in predictions:
        per_subject = _per_subject_truth(np.asarray(predictions["model"])[:, carries], truth_signal,
                                         subjects[:, :, carries], loso_ceiling[carries])
    result: Dict[str, object] = {
        "folder": str(truth),
        "signal_voxels": int(carries.sum()),
        "noise_ceiling": float(np.load(truth / "noise_ceiling.npy")[carries].mean()),
        "true_signal_r": float(ceiling.mean()),
    }
    if subjects is not None and subjects.shape[0] > 1 and predictions is not None and "model" in predictions:
        result["per_subject"] = per_subject
    for name, r in scores.items():
        result[name] = {"mean_r": float(r[carries].mean()), "fraction_of_ceiling": float(r[carries].mean() / ceiling.mean()),
                        "mean_r_noise_voxels": float(r[~carries].mean()) if (~carries).any() else math.nan}
        if predictions is not None and name in predictions:
            # Against the noise-free signal itself: no measurement noise in the target, so a steadier comparison
            # of two models than r against the group mean (1 for a perfect model).
            result[name]["r_vs_signal"] = float(pearson_r(np.asarray(predictions[name], dtype=np.float32)[:, carries], truth_signal).mean())
    # The same per kind of region (visual, auditory, language, mixed): where a model falls short.
    if (truth / "tuning.npz").is_file():
        kinds = np.load(truth / "tuning.npz")["region_kind"][carries]
        by_kind: Dict[str, Dict[str, object]] = {}
        for kind in sorted(set(kinds.tolist())):
            inside = kinds == kind
            entry: Dict[str, object] = {"voxels": int(inside.sum()), "true_signal_r": float(ceiling[inside].mean())}
            for name, r in scores.items():
                mean_r = float(r[carries][inside].mean())
                entry[name] = {"mean_r": mean_r, "fraction_of_ceiling": mean_r / float(ceiling[inside].mean())}
            by_kind[str(kind)] = entry
        result["by_kind"] = by_kind
    return result


def _per_subject_truth(prediction: np.ndarray, truth_signal: np.ndarray, subjects: np.ndarray,
                       loso_ceiling: np.ndarray) -> Dict[str, float]:
    """On the signal voxels (every argument already restricted to them): the model's and the noise-free
    signal's mean r against each subject, over the mean leave-one-subject-out ceiling. The ceiling correlates
    a subject with the mean of the others, itself noisy, so it sits below what a perfect model reaches: the
    noise-free signal's ratio says by how much."""

    def mean_r_subject(values: np.ndarray) -> float:
        return float(np.mean([pearson_r(values, subject) for subject in subjects]))

    model, perfect, loso = mean_r_subject(prediction), mean_r_subject(truth_signal), float(loso_ceiling.mean())
    return {"model_mean_r_subject": model, "noise_free_signal_mean_r_subject": perfect, "noise_ceiling_mean": loso,
            "model_over_noise_ceiling": model / loso, "noise_free_signal_over_noise_ceiling": perfect / loso}


def _volume(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-ordered values ``(V,)`` or ``(V, T)`` onto the grid, zeros outside the mask."""
    out = np.zeros(mask.shape + values.shape[1:], dtype=np.float32)
    out[mask] = values
    return out


def _plots(r: np.ndarray, mask: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = _volume(r, mask)
    z_slices = [int(z) for z in np.linspace(mask.shape[2] * 0.3, mask.shape[2] * 0.7, 3)]
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for axis, z in zip(axes, z_slices):
        shown = np.where(mask[:, :, z], volume[:, :, z], np.nan).T
        image = axis.imshow(shown, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        axis.set_title(f"z = {z}")
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="test r")
    figure.savefig(out / "r_map.png", dpi=100)
    plt.close(figure)
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
    import nibabel as nib

    run = Path(run)
    checkpoint = find_checkpoint(run)
    store = open_store(store_path or run / "store")
    expected = read_checkpoint(checkpoint).get("store_key")
    if expected and expected != store.key:
        from giblet.errors import DataError

        raise DataError(store.path, f"store key {store.key}", expected=f"the store the run was trained on, {expected}")
    config = load_config(run / "config.yaml")
    model = load(checkpoint)
    mask, affine = store.mask()
    model.attach(Stimuli.from_store(store, model.dims, config.model.decoded_frame_height, config.model.decoded_frame_width,
                                    hrf=config.alignment.hrf if model.config.linear_branch else None))
    start, stop = store.splits[split]
    prediction = predict(model, store, split)
    group = np.asarray(store.fmri_mean()[start:stop], dtype=np.float32)
    subjects = np.asarray(store.fmri()[:, start:stop], dtype=np.float32)
    if model.parcel_of_voxel is not None:
        raise NotImplementedError("evaluation of parcel models maps parcels back to voxels; not available yet")
    r = pearson_r(prediction, group)
    r_subject = np.mean([pearson_r(prediction, subjects[s]) for s in range(subjects.shape[0])], axis=0)
    ceiling = noise_ceiling(subjects) if subjects.shape[0] > 1 else np.full(r.shape, np.nan)
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
    if baseline == "ridge":
        parts = tr_feature_parts(store, model.stimuli.small_frames)
        features = np.concatenate(list(parts.values()), axis=1)
        delays = int(math.ceil(store.manifest["window"]["lookback_s"] / store.tr_s))
        everything = np.asarray(store.fmri_mean(), dtype=np.float32)
        # The FIR ridge learns a time course per feature; the HRF ridge assumes the canonical one (one weight
        # per feature): with few training TRs the second is often the stronger linear model.
        fits = {
            "ridge": (ridge_baseline(store, features, delays, everything, split), {"fir_delays_trs": delays}),
            "ridge_hrf": (hrf_ridge(store, features, config.alignment.hrf, split, everything), {"hrf": config.alignment.hrf}),
        }
        # The same blocks, one kernel each: every voxel weighs video, audio and text and shrinks them on its own.
        banded, shares = banded_ridge(store, parts, config.alignment.hrf, (split,), everything)
        fits["ridge_banded"] = (banded[split], {"hrf": config.alignment.hrf, "block_weight_shares": shares})
        for name, (fitted, about) in fits.items():
            fitted_r = pearson_r(fitted, group)
            metrics["baselines"][name] = {
                "mean_r": float(fitted_r.mean()),
                "median_r": float(np.median(fitted_r)),
                "features": int(features.shape[1]),
                **about,
            }
            scores[name], predictions[name] = fitted_r, fitted
    truth = truth_metrics(store, split, scores, predictions, subjects, ceiling)
    if truth is not None:
        metrics["truth"] = truth
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_volume(prediction.T, mask), affine), str(out / f"prediction_{split}.nii.gz"))
    nib.save(nib.Nifti1Image(_volume(r, mask), affine), str(out / "r_map.nii.gz"))
    nib.save(nib.Nifti1Image(_volume(np.nan_to_num(ceiling), mask), affine), str(out / "noise_ceiling.nii.gz"))
    _plots(r, mask, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

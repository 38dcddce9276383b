"""What a model could score on a synthetic dataset, from its ground truth: how hard the accuracy target is.

    python benchmarks/accuracy_bounds.py DATA STORE        # e.g. small_data runs/small/store

DATA is a folder from ``giblet data synth`` (it holds ``_truth/``); STORE is a store prepared from it. On the
store's test TRs, over the voxels that carry signal, every line is a fraction of the ceiling (the r of the
noise-free signal itself against the test group mean, what ``giblet evaluate`` reports as ``true_signal_r``):

- ridge on the truth's own stimulus features (visual, auditory, language per TR, FIR delays over the lookback),
  the same kernel ridge as ``giblet evaluate``'s baseline: a linear model that needs no feature learning;
  then per kind of signal region, that ridge and one on the kind's own modality alone (a mixed region has two
  or three modalities, so it gets the first line only);
- the same ridge on the truth's features at the fine time step convolved with the canonical HRF the data
  were made with (no delays to estimate), the same as a banded ridge (one kernel per modality, weighed per
  voxel), and a ridge on the exact noise-free responses of every neural unit: what a model that knew the
  features, or the units themselves, would score with this many training TRs;
- ``giblet evaluate``'s ridge baseline on its own fixed features (coarse frames, mel, mean text embedding per
  TR) with FIR delays, the same features convolved with the canonical HRF instead (one weight per feature
  rather than one per delay, ``ridge_hrf``), and those blocks as a banded ridge (``ridge_banded``): the
  linear encoding models that a learned one has to beat;
- least squares from the k leading components of the noise-free signal (computed over the whole movie, so
  they are the exact response space), fit per voxel on the training TRs: a perfect shared representation read
  out by a k-wide linear layer, which shows what the width in front of layer 7 costs with this many training TRs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from giblet.data import synth
from giblet.data.alignment import convolve_hrf
from giblet.data.store import open_store
from giblet.eval.metrics import pearson_r
from giblet.linear import FirRidge, HrfRidge, banded_ridge, fit_splits, regressor_parts


def main(data: Path, store_path: Path) -> None:
    store = open_store(store_path)
    truth = data / "_truth"
    first = int(store.manifest["alignment"]["first_tr"])  # store TR t is scan TR first + t
    group = np.asarray(store.fmri_mean(), dtype=np.float32)
    n = group.shape[0]
    signal = np.load(truth / "signal.npy")[first : first + n]
    carries = signal.std(axis=0) > 0
    (train0, train1), (test0, test1) = store.splits["train"], store.splits["test"]
    tested = group[test0:test1]
    r_signal = pearson_r(signal[test0:test1], tested)  # per voxel; the ceiling is its mean over the signal voxels
    ceiling = float(r_signal[carries].mean())
    print(f"{store_path}: {int(carries.sum())} signal voxels, test TRs {test0}-{test1 - 1}, "
          f"{train1 - train0} training TRs; ceiling (noise-free signal's r) {ceiling:.3f}")

    def fraction(prediction: np.ndarray) -> float:
        return float(pearson_r(np.asarray(prediction, dtype=np.float32), tested)[carries].mean()) / ceiling

    def fir_ridge(x: np.ndarray, delays: int) -> np.ndarray:  # giblet evaluate's `ridge`, on the test TRs
        return fit_splits(store, FirRidge(delays), x, ("test",), group)["test"]

    def hrf_ridge(x: np.ndarray) -> np.ndarray:  # giblet evaluate's `ridge_hrf`, on the test TRs
        return fit_splits(store, HrfRidge(store.tr_s, synth.HRF_KIND), x, ("test",), group)["test"]

    features = np.load(truth / "features.npz")
    true_features = np.concatenate([features["visual_tr"], features["auditory_tr"], features["language_tr"]], axis=1)
    delays = int(math.ceil(store.manifest["window"]["lookback_s"] / store.tr_s))
    ridge = fir_ridge(true_features[first : first + n].astype(np.float64), delays)
    r_all = pearson_r(ridge, tested)
    print(f"  ridge on the truth's {true_features.shape[1]} stimulus features, {delays + 1} delays: {r_all[carries].mean() / ceiling:.3f}")

    about = json.loads((truth / "truth.json").read_text())
    world = synth._build_world(synth.SynthPreset(**about["preset_sizes"]), int(about["seed"]))
    preset, fine = world.preset, world.fine_features
    steps = int(round(preset.tr_s / synth.FINE_STEP_S))
    middles = (np.arange(preset.scan_trs) * steps + steps // 2)[first : first + n]

    def bold(activity: np.ndarray) -> np.ndarray:
        return convolve_hrf(activity, synth.FINE_STEP_S, synth.HRF_KIND)[middles]

    true_blocks = {m: bold(fine[m]) for m in synth.MODALITIES}
    linear = np.concatenate(list(true_blocks.values()), axis=1)
    print(f"  ridge on the truth's features through the true HRF: {fraction(fir_ridge(linear, 0)):.3f}")
    banded_truth = banded_ridge(store, true_blocks, None, ("test",), group)[0]["test"]
    print(f"  the same, banded (a kernel per modality, weighed per voxel): {fraction(banded_truth):.3f}")
    k = preset.units_per_region
    units = np.concatenate([bold(synth._unit_activity(preset, fine, world.units, region * k + np.arange(k)))
                            for region, kind in enumerate(world.region_kinds) if kind != "noise"], axis=1)
    print(f"  ridge on the exact responses of the {units.shape[1]} neural units: "
          f"{fraction(fir_ridge(units, 0)):.3f}")

    blocks = regressor_parts(store)
    fixed = np.concatenate(list(blocks.values()), axis=1)
    print(f"  the baseline's fixed features ({fixed.shape[1]}), {delays + 1} FIR delays: "
          f"{fraction(fir_ridge(fixed, delays)):.3f}")
    print(f"  the same features through the canonical HRF (ridge_hrf): {fraction(hrf_ridge(fixed)):.3f}")
    banded = banded_ridge(store, blocks, synth.HRF_KIND, ("test",), group)[0]["test"]
    print(f"  the same, banded (ridge_banded: a kernel per stream, weighed per voxel): {fraction(banded):.3f}")
    region_kinds = np.load(truth / "tuning.npz")["region_kind"]

    def by_kind(prediction: np.ndarray) -> str:
        r = pearson_r(np.asarray(prediction, dtype=np.float32), tested)
        return ", ".join(f"{kind} {r[carries & (region_kinds == kind)].mean() / r_signal[carries & (region_kinds == kind)].mean():.3f}"
                         for kind in sorted(set(region_kinds[carries].tolist())))

    print(f"    by region kind: ridge_hrf {by_kind(hrf_ridge(fixed))}; ridge_banded {by_kind(banded)}")
    for name, block in blocks.items():
        print(f"    the {name} block alone through the HRF ({block.shape[1]} features): "
              f"{by_kind(hrf_ridge(block))}")

    kinds = region_kinds
    for kind in sorted(set(kinds[carries].tolist())):
        inside = carries & (kinds == kind)
        line = f"  {kind} regions ({int(inside.sum())} voxels): that ridge {r_all[inside].mean() / r_signal[inside].mean():.3f}"
        if f"{kind}_tr" in features:
            own = fir_ridge(features[f"{kind}_tr"][first : first + n].astype(np.float64), delays)
            line += f"; on the {kind} features alone {pearson_r(own, tested)[inside].mean() / r_signal[inside].mean():.3f}"
        print(line)

    centred = signal[:, carries] - signal[:, carries].mean(axis=0)
    components, _, _ = np.linalg.svd(centred, full_matrices=False)
    for k in (8, 16, 24, 32, 48, 64, 128):
        if k > components.shape[1]:
            break
        design = np.concatenate([components[:, :k], np.ones((n, 1))], axis=1)
        weights, *_ = np.linalg.lstsq(design[train0:train1], group[train0:train1], rcond=None)
        print(f"  least squares from the signal's {k:3d} leading components: {fraction(design[test0:test1] @ weights):.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))

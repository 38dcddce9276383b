"""How much of a synthetic movie's visual ground truth the input frames and a model's L1 frame features hold.

    python benchmarks/probe_frames.py DATA STORE [RUN]      # e.g. small_data runs/small/store runs/small

DATA is a folder from ``giblet data synth`` (it holds ``_truth/``); STORE a store prepared from it; RUN a trained
run on that store. Every 5th frame of the store is paired with the truth's visual features (background
brightness and tint, the disk's colour, size, position and speed) at the frame's time. A ridge (alpha by
cross-validation) is fit on the first 70% of those frames and scored on the rest: one Pearson r per feature,
from the raw pixels and, given RUN, from the model's L1 frame features (its ``gather_project`` and GELU).
Motion speed needs more than one frame: no single-frame probe can recover it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from giblet.data.store import open_store


def probe(features: np.ndarray, truth: np.ndarray, fit: slice, test: slice) -> np.ndarray:
    from sklearn.linear_model import RidgeCV

    mean, std = features[fit].mean(axis=0), features[fit].std(axis=0) + 1e-6
    model = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit((features[fit] - mean) / std, truth[fit])
    predicted = model.predict((features[test] - mean) / std)
    return np.array([np.corrcoef(predicted[:, j], truth[test][:, j])[0, 1] for j in range(truth.shape[1])])


def main(data: Path, store_path: Path, run: Path | None) -> None:
    store = open_store(store_path)
    video = store.manifest["video"]
    frames = store.frames()
    picks = np.arange(0, frames.shape[0], 5)
    table = np.asarray(frames[picks]).reshape(len(picks), -1).astype(np.float32)  # the uint8 values L1 reads
    pixels = table / 255.0 - 0.5
    times = np.asarray(store.video_times())[picks]
    truth = np.load(data / "_truth" / "features.npz")
    step = float(truth["fine_step_s"])
    fine = np.clip(np.round(times / step).astype(int), 0, truth["visual_fine"].shape[0] - 1)
    target = truth["visual_fine"][fine]
    names = [str(name) for name in truth["visual_names"]]
    cut = int(0.7 * len(picks))
    fit, test = slice(0, cut), slice(cut, None)
    rows = [("raw pixels", pixels.shape[1], probe(pixels, target, fit, test))]
    if run is not None:
        from giblet.models.checkpoint import find_checkpoint, load

        model = load(find_checkpoint(run))
        layer = model.l1_video
        with torch.no_grad():  # the same map as gather_project: (pixel * scale + shift) @ weight.T + bias, then GELU
            raw = torch.from_numpy(table) * layer.scale + layer.shift
            l1 = torch.nn.functional.gelu(raw @ layer.weight.T + layer.bias).numpy()
        rows.append((f"L1 of {run}", l1.shape[1], probe(l1, target, fit, test)))
    print(f"{store_path}: {len(picks)} frames ({video['shape'][2]}x{video['shape'][1]}), fit on {cut}, scored on "
          f"{len(picks) - cut}; r per visual feature")
    print(f"{'features':40s} {'width':>6s} " + " ".join(f"{name[:12]:>12s}" for name in names))
    for label, width, r in rows:
        print(f"{label[:40]:40s} {width:6d} " + " ".join(f"{value:12.2f}" for value in r))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)

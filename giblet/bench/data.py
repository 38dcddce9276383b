"""How fast a training loop can read batches from a store (random TRs, warm page cache): ``giblet bench --case data``."""

from __future__ import annotations

import time
from typing import Dict, List

import numpy as np

from giblet.data.dataset import WindowDataset, window_index
from giblet.data.store import Store


def _times(fn, repeats: int) -> Dict[str, float]:
    fn()  # first call maps the pages
    samples: List[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    values = np.array(samples) * 1e3
    return {"median_ms": float(np.median(values)), "p95_ms": float(np.percentile(values, 95)), "max_ms": float(values.max())}


def batch_read_times(store: Store, batch_size: int = 16, repeats: int = 100, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Median / p95 / max milliseconds to read a random batch of ``batch_size`` windows.

    ``cross_subject`` and ``per_subject``: the batch a data loader hands the model
    (window indices for every stream + fMRI targets). ``with frames``: the same plus the
    batch's frames copied out of the store, as a loader that materialized windows would.
    """
    index = window_index(store)
    rng = np.random.default_rng(seed)
    results = {}
    frames = store.frames()
    for mode in ("cross_subject", "per_subject"):
        dataset = WindowDataset(store, "train", mode=mode, index=index)
        results[f"{mode}: indices + fMRI"] = _times(lambda: dataset.batch(rng.integers(0, len(dataset), batch_size)), repeats)
    dataset = WindowDataset(store, "train", index=index)

    def with_frames():
        batch = dataset.batch(rng.integers(0, len(dataset), batch_size))
        picks = batch["video_index"].numpy().clip(0)
        return frames[np.sort(picks.ravel())]

    results["cross_subject: + frames copied"] = _times(with_frames, max(10, repeats // 4))
    return results

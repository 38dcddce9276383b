"""The fixed per-TR stimulus features of the linear encoding models, and those features through the HRF.

``regressor_parts`` is the one place they are computed and ``hrf_convolve`` the one HRF filter: the ridge
baselines of ``giblet evaluate``, the model's linear branch and the trainer's linear teacher all read its blocks
through it, advanced by the store's ``alignment.preshift_trs`` when the scans were already shifted.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from giblet import ops
from giblet.data.alignment import convolve_hrf
from giblet.data.dataset import text_slots_for
from giblet.data.store import Store


def regressor_parts(store: Store, frames: Optional[torch.Tensor] = None, video: bool = True) -> Dict[str, np.ndarray]:
    """The fixed per-TR features of the linear models, one float64 ``(TRs, features)`` block per stream:
    ``video`` (the frames averaged to 3x4 RGB, in [0, 1]), ``audio`` (mel bands), ``text`` (the mean
    embedding of the annotations in the TR). A stream the store lacks has no block, nor video when ``video``
    is false.

    ``frames``: the store's frames as uint8 ``(n_frames, 3, H, W)`` when they are already in memory (a model's
    ``Stimuli.frame_targets``); None reads them from the store.
    """
    manifest = store.manifest
    if not manifest.get("video", {}).get("shape"):
        video = False
    if video and frames is None:
        frames = torch.from_numpy(np.array(store.frames())).permute(0, 3, 1, 2)  # a writable copy of the memmap
    onsets = store.onsets()
    tr = store.tr_s
    parts: Dict[str, np.ndarray] = {}
    if video:
        # Pooled where the frames are (a model's copy may be on a GPU); the 36 columns come back for the numpy blocks.
        coarse = torch.nn.functional.adaptive_avg_pool2d(frames.float() / 255.0, (3, 4)).flatten(1).cpu()  # (n_frames, 36)
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


def hrf_convolve(signal: np.ndarray, tr_s: float, hrf: str, preshift_trs: int = 0) -> np.ndarray:
    """Per-TR rows (a series sampled every ``tr_s`` seconds) through the canonical HRF ``hrf`` along axis 0,
    float64, same length: the one HRF filter of every HRF-based linear part.

    ``preshift_trs`` 0: the causal response, ``out[t] = sum_k h[k] x[t - k]`` (``convolve_hrf``). ``preshift_trs
    P``: the response of scans shifted earlier by P TRs, whose row t was acquired at TR t + P: the HRF advanced
    by P TRs, ``out[t] = sum_{k >= -P} h[k + P] x[t - k]`` (the unshifted response P rows later). The whole HRF
    is kept: its first P TRs fall on the features of the P rows after t (cutting them off would drop the
    response's first 4.5 s at Sherlock's 3 x 1.5 s, 31% of its positive area). The last P rows read features
    past the end, held at the last row's.
    """
    x = np.asarray(signal, dtype=np.float64)
    if preshift_trs < 0:
        raise ValueError(f"preshift_trs is {preshift_trs}; expected >= 0 TRs")
    if preshift_trs == 0 or x.shape[0] == 0:
        return convolve_hrf(x, tr_s, hrf)
    held = np.repeat(x[-1:], preshift_trs, axis=0)
    return convolve_hrf(np.concatenate([x, held]), tr_s, hrf)[preshift_trs:]


def convolve_parts(parts: Dict[str, np.ndarray], tr_s: float, hrf: str, preshift_trs: int = 0) -> np.ndarray:
    """Each per-TR block (a series sampled every ``tr_s`` seconds) through the canonical HRF ``hrf``
    (``hrf_convolve``, advanced by ``preshift_trs`` TRs for pre-shifted scans), side by side in the order of
    ``parts``: ``(TRs, features)`` float32."""
    return np.concatenate([hrf_convolve(part, tr_s, hrf, preshift_trs) for part in parts.values()], axis=1).astype(np.float32)


def hrf_regressors(store: Store, parts: Dict[str, np.ndarray], hrf: str) -> np.ndarray:
    """The blocks of ``regressor_parts`` through the canonical HRF at the store's TR (advanced by its
    ``alignment.preshift_trs``), side by side: ``(TRs, features)`` float32, the regressors a model's linear
    branch reads."""
    return convolve_parts(parts, store.tr_s, hrf, store.preshift_trs)

"""The fixed per-TR stimulus features of the linear encoding models, and those features through the HRF.

``regressor_parts`` is the one place they are computed: the ridge baselines of ``giblet evaluate``, the
model's linear branch and the trainer's linear teacher all read its blocks.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from giblet import ops
from giblet.data.alignment import convolve_hrf
from giblet.data.dataset import text_slots_for
from giblet.data.store import Store


def area_resize(frames: np.ndarray, height: int, width: int, chunk: int = 512) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, height, width), area-averaged, a chunk at a time."""
    out = torch.empty((frames.shape[0], 3, height, width), dtype=torch.uint8)
    for start in range(0, frames.shape[0], chunk):
        block = torch.from_numpy(np.array(frames[start : start + chunk])).permute(0, 3, 1, 2).float()
        small = F.interpolate(block, size=(height, width), mode="area")
        out[start : start + chunk] = small.round_().clamp_(0, 255).to(torch.uint8)
    return out


def regressor_parts(store: Store, small_frames: Optional[torch.Tensor], height: Optional[int] = None,
                    width: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The fixed per-TR features of the linear models, one float64 ``(TRs, features)`` block per stream:
    ``video`` (the frames averaged to 3x4 RGB, in [0, 1]), ``audio`` (mel bands), ``text`` (the mean
    embedding of the annotations in the TR). A stream the store lacks has no block.

    Frames from ``small_frames`` (uint8 ``(n_frames, 3, h, w)``, the model's decoded-frame targets); when it
    is None, with ``height`` and ``width`` the store's frames area-averaged to that size (the same blocks
    whichever modalities a network reads), without them no ``video`` block.
    """
    manifest = store.manifest
    if small_frames is None and height is not None and width is not None and manifest.get("video", {}).get("shape"):
        small_frames = area_resize(store.frames(), height, width)
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


def convolve_parts(parts: Dict[str, np.ndarray], tr_s: float, hrf: str) -> np.ndarray:
    """Each per-TR block (a series sampled every ``tr_s`` seconds) through the canonical HRF ``hrf``, side by
    side in the order of ``parts``: ``(TRs, features)`` float32."""
    return np.concatenate([convolve_hrf(part, tr_s, hrf) for part in parts.values()], axis=1).astype(np.float32)


def hrf_regressors(store: Store, parts: Dict[str, np.ndarray], hrf: str) -> np.ndarray:
    """The blocks of ``regressor_parts`` through the canonical HRF at the store's TR, side by side:
    ``(TRs, features)`` float32, the regressors a model's linear branch reads."""
    return convolve_parts(parts, store.tr_s, hrf)

"""TR-indexed samples over a prepared store: window indices per modality and the fMRI target, never copies.

A sample for TR ``t`` is the stimulus window ``[onset(t) - lookback, onset(t) + TR)``
and the response at ``t``. Its frames, code frames and mel frames are named by
indices into the store's streams (from ``giblet.ops.grid_index``, exact times, -1
outside the stream) and its annotation segments by segment numbers (-1 = empty
slot); the model gathers them (``gather_project``, ``resample_codes``) so a batch
never materializes its windows in the data loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from giblet.data.store import Store
from giblet.errors import DataError

MODES = ("cross_subject", "per_subject")


@dataclass
class WindowIndex:
    """Indices of every stored TR's window into each stream: int64 ``(n_trs, slots)``, -1 = nothing there."""

    window_onsets: np.ndarray  # float64 (n_trs,) stimulus-clock start of each window
    window_s: float
    video: np.ndarray
    codes: Optional[np.ndarray]
    mel: Optional[np.ndarray]
    text: np.ndarray


def _grid(n_samples: int, rate: float, start_s: float, onsets: np.ndarray, window_s: float, slots: int) -> np.ndarray:
    from giblet import ops

    return ops.grid_index(n_samples, rate, torch.from_numpy(onsets - start_s), window_s, slots).numpy()


def text_slots_for(starts: np.ndarray, ends: np.ndarray, onsets: np.ndarray, window_s: float, slots: int) -> np.ndarray:
    """The latest ``slots`` segments overlapping each window, in time order, right-aligned (-1 pads the left).

    Segment ``j`` overlaps ``[w, w + window)`` when ``start_j < w + window`` and ``end_j > w``;
    segments may overlap each other or leave gaps. ``starts`` must be sorted.
    """
    out = np.full((onsets.size, slots), -1, dtype=np.int64)
    if starts.size == 0:
        return out
    longest = float(np.max(ends - starts))
    upper = np.searchsorted(starts, onsets + window_s, side="left")
    for i, (w, hi) in enumerate(zip(onsets, upper)):
        found: List[int] = []
        j = hi - 1
        while j >= 0 and len(found) < slots and starts[j] >= w - longest:
            if ends[j] > w:
                found.append(j)
            j -= 1
        if found:
            out[i, slots - len(found) :] = found[::-1]
    return out


def text_grid_for(starts: np.ndarray, ends: np.ndarray, onsets: np.ndarray, window_s: float, slots: int) -> np.ndarray:
    """Per window, slot ``s`` holds the segment on screen at ``w + (s + 0.5) * window / slots``: the one that
    started last among those covering that time, -1 where none does. ``starts`` must be sorted."""
    times = onsets[:, None] + (np.arange(slots) + 0.5) * (window_s / slots)
    out = np.full(times.shape, -1, dtype=np.int64)
    if starts.size == 0:
        return out
    longest = float(np.max(ends - starts))
    # The latest segment starting at or before t, then earlier ones while one could still cover t.
    latest = np.searchsorted(starts, times, side="right") - 1
    pending = np.ones(times.shape, dtype=bool)
    j = latest.copy()
    while pending.any():
        valid = pending & (j >= 0)
        valid[valid] &= starts[j[valid]] >= times[valid] - longest
        pending &= valid
        covers = np.zeros(times.shape, dtype=bool)
        covers[pending] = ends[j[pending]] > times[pending]
        out[covers] = j[covers]
        pending &= ~covers
        j -= 1
    return out


def text_index_for(times: np.ndarray, onsets: np.ndarray, window_s: float, window: Dict) -> np.ndarray:
    """The text slots of each window: ``text_slots`` on the window's time grid (``text_grid_for``); stores
    whose manifest says ``text_timing: latest`` (prepared when that was a setting) keep their latest segments."""
    timing = window.get("text_timing", "latest")
    pick = text_grid_for if timing == "grid" else text_slots_for
    return pick(times[:, 0], times[:, 1], onsets, window_s, window["text_slots"])


def window_index(store: Store) -> WindowIndex:
    """Window indices for every TR of ``store``, from the window settings it was prepared with."""
    manifest = store.manifest
    window = manifest["window"]
    lookback, window_s = window["lookback_s"], window["window_s"]
    # Scans shifted earlier by P TRs (alignment.preshift_trs): TR t holds the response acquired at TR t + P, so it
    # reads the window of TR t + P; otherwise the window would miss the response's first P TRs of lag.
    onsets = store.onsets() + store.preshift_trs * store.tr_s - lookback
    v = manifest["video"]
    video = _grid(v["shape"][0], v["rate_hz"], v["start_s"], onsets, window_s, window["video_slots"])
    codes = mel = None
    audio = manifest["audio"]
    if "codes" in audio:
        c = audio["codes"]
        codes = _grid(c["shape"][1], c["rate_hz"], c["start_s"], onsets, window_s, window["code_slots"])
    if "mel" in audio:
        m = audio["mel"]
        mel = _grid(m["shape"][0], m["rate_hz"], m["start_s"], onsets, window_s, window["mel_slots"])
    times = store.text_times()
    text = text_index_for(times, onsets, window_s, window)
    return WindowIndex(onsets, window_s, video, codes, mel, text)


class WindowDataset(Dataset):
    """Samples of one split of a store.

    ``cross_subject``: one sample per TR, target = mean of the z-scored subjects.
    ``per_subject``: one sample per (subject, TR) the subject has (``Store.present``: a subject cut short has
    none for the TRs it lacks), target = that subject's z-scored response.
    Items are dicts of tensors: ``tr``, ``subject`` (-1 for the mean), ``window_onset``
    (float64 seconds), ``video_index``, ``code_index``, ``mel_index``, ``text_index``
    (int64 slots, -1 = empty) and ``fmri`` (float32 ``(n_voxels,)``).
    """

    def __init__(self, store: Store, split: str = "train", mode: str = "cross_subject", index: Optional[WindowIndex] = None):
        if mode not in MODES:
            raise ValueError(f"dataset mode {mode!r}; expected one of {', '.join(MODES)}")
        if split not in store.splits:
            raise ValueError(f"split {split!r}; expected one of {', '.join(store.splits)}")
        self.store = store
        self.split = split
        self.mode = mode
        self.index = index if index is not None else window_index(store)
        start, stop = store.splits[split]
        self.trs = np.arange(start, stop, dtype=np.int64)
        self.n_subjects = len(store.subjects)
        # Subject-major (subject, TR offset) pairs of the per-subject samples.
        self._pairs = np.nonzero(store.present(start, stop)) if mode == "per_subject" else None
        self._targets = store.fmri_mean() if mode == "cross_subject" else store.fmri()
        self._teacher: Optional[np.ndarray] = None
        self._teacher_weight = 0.0
        self._offset: Optional[np.ndarray] = None

    def blend_targets(self, teacher: np.ndarray, weight: float) -> None:
        """From now on each sample's target is ``(1 - weight) x`` its response ``+ weight x teacher[t]``.

        ``teacher`` is ``(TRs of the split, n_voxels)``, in the split's TR order: e.g. a linear model's
        fit of the group mean (``loss.fmri_teacher``); in per-subject mode every subject blends with it.
        """
        teacher = np.asarray(teacher, dtype=np.float32)
        if teacher.shape != (self.trs.size, self.store.n_voxels):
            raise ValueError(f"teacher targets have shape {teacher.shape}; expected ({self.trs.size}, {self.store.n_voxels})")
        if not 0 <= weight <= 1:
            raise ValueError(f"teacher weight {weight}; expected a share in [0, 1]")
        self._teacher, self._teacher_weight = teacher, float(weight)

    def offset_targets(self, offset: np.ndarray) -> None:
        """From now on ``offset[t]`` (``(TRs of the split, n_voxels)``) is added to each sample's target."""
        offset = np.asarray(offset, dtype=np.float32)
        if offset.shape != (self.trs.size, self.store.n_voxels):
            raise ValueError(f"target offsets have shape {offset.shape}; expected ({self.trs.size}, {self.store.n_voxels})")
        self._offset = offset

    def __len__(self) -> int:
        return self.trs.size if self.mode == "cross_subject" else int(self._pairs[0].size)

    def _locate(self, items: np.ndarray):
        if self.mode == "cross_subject":
            return np.full(items.shape, -1, dtype=np.int64), self.trs[items]
        return self._pairs[0][items].astype(np.int64), self.trs[self._pairs[1][items]]

    def batch(self, items: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Samples ``items`` as one batch, read with one fancy index per array (faster than collating items)."""
        items = np.asarray(items, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {items.tolist()}")
        subjects, trs = self._locate(items)
        if self.mode == "cross_subject":
            order = np.argsort(trs, kind="stable")
            rows = np.empty((trs.size, self.store.n_voxels), dtype=np.float32)
            rows[order] = self._targets[trs[order]]
        else:
            rows = np.stack([self._targets[s, t] for s, t in zip(subjects, trs)]).astype(np.float32, copy=False)
        if self._teacher is not None:
            w = self._teacher_weight
            rows = (1 - w) * rows + w * self._teacher[trs - self.trs[0]]
        if self._offset is not None:
            rows = rows + self._offset[trs - self.trs[0]]
        index = self.index
        batch = {
            "tr": torch.from_numpy(trs),
            "subject": torch.from_numpy(subjects),
            "window_onset": torch.from_numpy(index.window_onsets[trs]),
            "video_index": torch.from_numpy(index.video[trs]),
            "text_index": torch.from_numpy(index.text[trs]),
            "fmri": torch.from_numpy(rows),
        }
        if index.codes is not None:
            batch["code_index"] = torch.from_numpy(index.codes[trs])
        if index.mel is not None:
            batch["mel_index"] = torch.from_numpy(index.mel[trs])
        return batch

    def __getitem__(self, item: int) -> Dict[str, torch.Tensor]:
        if not 0 <= item < len(self):
            raise IndexError(f"sample {item} out of range [0, {len(self)})")
        return {key: value[0] for key, value in self.batch([item]).items()}


class ShardSampler(Sampler[int]):
    """Each rank's share of a dataset, reshuffled per epoch with a shared seed.

    With ``pad=True`` (training) every rank gets the same number of samples, repeating
    a few so DDP steps stay in lockstep; with ``pad=False`` (evaluation) each sample is
    seen exactly once across ranks, so summed metrics count every TR once.
    """

    def __init__(self, n_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.n_samples, self.rank, self.world_size = n_samples, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_samples)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.n_samples)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad and order.size:
            total = math.ceil(order.size / self.world_size) * self.world_size
            order = np.concatenate([order, order[: total - order.size]])
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n_samples / self.world_size)
        return len(range(self.rank, self.n_samples, self.world_size))


def check_split_isolation(store: Store, index: Optional[WindowIndex] = None) -> None:
    """Raise if any window of one split reaches into the TRs of another (by stimulus time)."""
    index = index or window_index(store)
    spans = {}
    for name, (start, stop) in store.splits.items():
        if stop > start:
            spans[name] = (index.window_onsets[start], index.window_onsets[stop - 1] + index.window_s)
    names = list(spans)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            (a0, a1), (b0, b1) = spans[names[a]], spans[names[b]]
            if a0 < b1 and b0 < a1:
                raise DataError(store.path, f"windows of split {names[a]} and {names[b]} overlap in stimulus time")

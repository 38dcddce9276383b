"""`giblet lesion RUN --roi ROI.nii.gz`: what the decoder loses when a region of layer 7 is silenced.

The held-out windows are encoded once; their layer 7 is decoded intact and with the
ROI's units at 0 (what ``model.lesion`` does: a lesioned unit of the bottleneck outputs
exactly 0). Each modality's reconstruction loss is the matching term of
``GibletLoss`` (frames MSE, mel MSE or code cross-entropy, text cosine distance) over
the same windows. Its relative change is compared with the changes that random contiguous
parcels of the same size cause (grown from random voxels of the mask through face neighbours): ``p = (1 + #{random change >= observed}) / (1 + N)``.

The relative shift is how far the lesion moves the reconstruction (``GibletLoss.shift``: the loss's own distance
with the intact reconstruction as the target) over the intact loss: what the decoder reads from the region,
whether or not it helps on these windows. It is never negative and carries no term of the windows' own error,
so it is steadier than the loss change on a short block; it has its own p from the same random parcels.

Writes ``OUT/`` (default ``RUN/lesion/<roi name>/``), atomically:

- ``lesion.json``: ``{"roi_voxels": N, "modalities": {"video": {"loss_intact", "loss_lesioned",
  "relative_change", "p_value", "relative_shift", "shift_p_value"}, "audio": {...}, "text": {...}}, ...}``;
- ``frames.mp4``: one frame per held-out TR, original | intact | lesioned (H.264);
- ``audio_intact.wav``, ``audio_lesioned.wav`` (and ``audio_original.wav`` for mel):
  decoded mel through Griffin-Lim, or decoded codes through the store's EnCodec model;
- ``nearest_text.json`` and ``nearest_text.txt``: per window and text slot, the
  annotation whose embedding is nearest (cosine) to the decoded one, intact and lesioned.

Reconstructions of overlapping windows are merged on the stream's own clock: a moment
that several windows cover gets the mean of their slots that cover it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from giblet.data import volume
from giblet.data.parcels import random_contiguous_parcels
from giblet.data.dataset import WindowDataset, window_index
from giblet.data.store import Store, replace_folder
from giblet.errors import DataError
from giblet.eval.runs import PathLike, load_model, open_run, run_folder
from giblet.progress import bar
from giblet.train.losses import GibletLoss, LossScales

# The GibletLoss term that scores each reported modality; "audio" is whichever audio stream the model decodes.
LOSS_TERMS = {"video": "frames", "mel": "mel", "codes": "codes", "text": "text"}
REPORTED = {"video": "video", "mel": "audio", "codes": "audio", "text": "text"}
VIDEO_FPS = 2
VIDEO_SCALE = 6  # decoded frames are small (18x32 by default): enlarged for viewing
GRIFFIN_LIM_ITERATIONS = 16
BATCH_SIZE = 16


# --------------------------------------------------------------------------- the run and the ROI


def roi_voxels(path: PathLike, store: Store) -> Tuple[np.ndarray, int]:
    """(bool ``(n_voxels,)`` in mask order, voxels of the ROI on the store's grid outside its mask) for an ROI NIfTI.

    Read by ``giblet.data.volume``'s one policy: an ROI on the store's grid is used as is, one on
    another grid is resampled onto it by nearest neighbour with a warning; any value > 0 is in
    the ROI (NaN is not). An unreadable file, an image that is not 3-D or an ROI with no voxel
    inside the mask is a ``DataError`` naming the file.
    """
    grid = store.mask()
    on_grid = volume.read_on_grid(path, grid, kind="ROI")
    inside = volume.roi_in_mask(on_grid, grid, path, kind="ROI")
    with np.errstate(invalid="ignore"):
        in_roi = int(((on_grid > 0) & np.isfinite(on_grid)).sum())
    return inside, in_roi - int(inside.sum())


# --------------------------------------------------------------------------- reconstructions and losses


class SlotAverage:
    """Reconstructions of overlapping windows merged onto one clock.

    ``times`` are the moments to fill; a window starting at ``onset`` covers slot ``k``
    over ``[onset + k * slot_s, onset + (k + 1) * slot_s)``. Each moment gets the mean
    of the slots that cover it, over every window added.
    """

    def __init__(self, times: np.ndarray, slot_s: float, n_slots: int) -> None:
        self.times, self.slot_s, self.n_slots = np.asarray(times, dtype=np.float64), slot_s, n_slots
        self.sums: Optional[torch.Tensor] = None
        self.counts = torch.zeros(len(self.times), dtype=torch.float64)

    def add(self, onsets: torch.Tensor, values: torch.Tensor) -> None:
        """``onsets (B,)`` seconds, ``values (B, n_slots, ...)``."""
        values = values.detach().float().cpu()
        if self.sums is None:
            self.sums = torch.zeros((len(self.times),) + tuple(values.shape[2:]), dtype=torch.float64)
        slot = np.floor((self.times[None, :] - onsets.cpu().numpy()[:, None]) / self.slot_s).astype(np.int64)
        for b in range(slot.shape[0]):
            covered = np.flatnonzero((slot[b] >= 0) & (slot[b] < self.n_slots))
            self.sums[covered] += values[b, slot[b, covered]].double()
            self.counts[covered] += 1

    def mean(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.sums.dim() - 1)
        return (self.sums / self.counts.clamp(min=1).view(shape)).float()


class SlotVote:
    """Code logits of overlapping windows merged onto one clock, without holding a probability per code.

    Each window proposes, per moment and codebook, the most probable code of the slot that
    covers it; a moment takes the proposal whose probabilities, summed over the windows
    proposing it, are highest. ``max_windows`` bounds how many windows cover one moment.
    """

    def __init__(self, times: np.ndarray, slot_s: float, n_slots: int, max_windows: int) -> None:
        self.times, self.slot_s, self.n_slots, self.max_windows = np.asarray(times, dtype=np.float64), slot_s, n_slots, max_windows
        self.proposals: Optional[torch.Tensor] = None  # (T, max_windows, n_codebooks) codes, -1 = none
        self.weights: Optional[torch.Tensor] = None
        self.counts = torch.zeros(len(self.times), dtype=torch.int64)

    def add(self, onsets: torch.Tensor, logits: torch.Tensor) -> None:
        """``onsets (B,)`` seconds, ``logits (B, n_slots, n_codebooks, codebook_size)``."""
        probability, code = logits.detach().float().softmax(dim=-1).max(dim=-1)
        probability, code = probability.cpu(), code.cpu()
        if self.proposals is None:
            shape = (len(self.times), self.max_windows, code.shape[2])
            self.proposals, self.weights = torch.full(shape, -1, dtype=torch.int64), torch.zeros(shape)
        slot = np.floor((self.times[None, :] - onsets.cpu().numpy()[:, None]) / self.slot_s).astype(np.int64)
        for b in range(slot.shape[0]):
            covered = np.flatnonzero((slot[b] >= 0) & (slot[b] < self.n_slots))
            if covered.size and int(self.counts[covered].max()) >= self.max_windows:
                raise ValueError(f"more than {self.max_windows} windows cover one moment")
            at = self.counts[covered]
            self.proposals[covered, at] = code[b, slot[b, covered]]
            self.weights[covered, at] = probability[b, slot[b, covered]]
            self.counts[covered] += 1

    def codes(self) -> torch.Tensor:
        """``(n_codebooks, T)`` int64: the winning code per moment (0 where no window reaches)."""
        same = self.proposals[:, :, None, :] == self.proposals[:, None, :, :]  # (T, M, M, n_codebooks)
        score = (same * self.weights[:, None, :, :]).sum(dim=2)  # each proposal's summed probability
        best = score.argmax(dim=1, keepdim=True)
        return self.proposals.gather(1, best)[:, 0].clamp(min=0).T.contiguous()


def _stream_times(start_s: float, rate: float, n_samples: int, first: float, last: float) -> np.ndarray:
    """Centres of a stream's samples from time ``first`` to ``last``, clipped to the stream."""
    low = max(0, int(math.floor((first - start_s) * rate)))
    high = min(n_samples, int(math.ceil((last - start_s) * rate)))
    return start_s + (np.arange(low, high) + 0.5) / rate


@torch.no_grad()
def _encode(model, dataset: WindowDataset):
    """Per batch: (the batch, layer 7 intact, the targets without the fMRI)."""
    device = model.l7_brain.weight.device
    out = []
    for start in range(0, len(dataset), BATCH_SIZE):
        batch = dataset.batch(np.arange(start, min(len(dataset), start + BATCH_SIZE)))
        batch = {k: v.to(device) for k, v in batch.items() if k != "fmri"}
        out.append((batch, model.encode(batch), model.targets(batch)))
    return out


def reported(model, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """A GibletLoss's terms (loss or shift) as the reported modalities: the term that scores each modality the
    model decodes, by the name it is reported under ("audio" for mel or codes; both, if a model had both, add up)."""
    out: Dict[str, float] = {}
    for modality in model.modalities:
        out[REPORTED[modality]] = out.get(REPORTED[modality], 0.0) + float(terms[LOSS_TERMS[modality]])
    return out


@torch.no_grad()
def modality_losses(model, loss: GibletLoss, encoded, silenced: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Each reported modality's GibletLoss term over all encoded windows, with ``silenced`` units at 0.

    Zeroing the encoded layer 7 equals encoding under ``model.lesion(silenced)``: a lesioned
    bottleneck unit outputs exactly 0, and layer 7 feeds only the decoder. The terms are
    means over samples, so batches are combined weighted by their size.
    """
    keep = None if silenced is None else (~silenced).to(encoded[0][1].dtype)
    sums: Dict[str, float] = {}
    total = 0
    for batch, brain, targets in encoded:
        recon = model.decode(brain if keep is None else brain * keep)
        _, parts = loss({"brain": brain, "reconstructions": recon, "targets": targets})
        n = brain.shape[0]
        total += n
        for name, value in reported(model, parts).items():
            sums[name] = sums.get(name, 0.0) + value * n
    return {name: value / total for name, value in sums.items()}


def _timelines(model, store: Store, encoded) -> Dict[str, Union[SlotAverage, SlotVote]]:
    """Empty merges for what is written: a frame per TR, the audio stream's own clock, the text per window."""
    dims, manifest = model.dims, store.manifest
    onsets = torch.cat([batch["window_onset"] for batch, _, _ in encoded]).cpu().numpy()
    lookback = manifest["window"]["lookback_s"]
    first, last = float(onsets.min()), float(onsets.max()) + dims.window_s
    out: Dict[str, SlotAverage] = {}
    if "video" in model.modalities:
        middles = onsets + lookback + store.tr_s / 2  # each window's own TR is its last TR
        out["video"] = SlotAverage(middles, dims.window_s / dims.video_slots, dims.video_slots)
    if "mel" in model.modalities:
        m = manifest["audio"]["mel"]
        times = _stream_times(m["start_s"], m["rate_hz"], m["shape"][0], first, last)
        out["mel"] = SlotAverage(times, dims.window_s / dims.mel_slots, dims.mel_slots)
    if "codes" in model.modalities:
        c = manifest["audio"]["codes"]
        times = _stream_times(c["start_s"], c["rate_hz"], c["shape"][1], first, last)
        out["codes"] = SlotVote(times, dims.window_s / dims.code_slots, dims.code_slots, int(math.ceil(dims.window_s / store.tr_s)) + 1)
    return out


# --------------------------------------------------------------------------- the lesion report


LESIONS_PER_PASS = 16  # unit sets decoded together by decode_silenced: (16 x batch) rows through the narrow layers


# observe(batch, intact reconstructions, set index, that set's reconstructions): lesion_effects' per-batch view.
Observer = Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor], int, Dict[str, torch.Tensor]], None]


class LesionEffects(NamedTuple):
    """``lesion_effects``'s result, means over the windows: the intact reconstruction's loss per reported modality,
    and per modality ``(M,)`` arrays of each unit set's loss and shift."""

    intact: Dict[str, float]
    losses: Dict[str, np.ndarray]
    shifts: Dict[str, np.ndarray]


@torch.no_grad()
def lesion_effects(model, loss: GibletLoss, encoded, silenced: torch.Tensor, progress: Optional[bool] = None,
                   label: str = "lesions", observe: Optional[Observer] = None) -> LesionEffects:
    """For every unit set of ``silenced (M, units)``, each reported modality's loss (as ``modality_losses``) and
    its reconstruction's shift from the intact one (``GibletLoss.shift``), with the intact loss from the same
    decode the shifts are measured against. Sets go through the decoder ``LESIONS_PER_PASS`` at a time
    (``model.silenced_decoder``: layer 8's product once per batch). ``observe(batch, intact, k, lesioned)``, when
    given, sees each batch's intact reconstructions and set ``k``'s, so a caller that writes them out needs no decode
    of its own."""
    device = encoded[0][1].device
    silenced = silenced.to(device)
    n_sets = silenced.shape[0]
    # A set of units the decoder does not read (decoder gain 0 at each: voxels the stimulus does not predict beyond
    # chance) moves nothing: its reconstruction is the intact one, exactly. Decoded, it would differ by the rounding
    # of another batch shape, and parcels that move nothing would be ranked by that rounding.
    read = silenced[:, model.decoder_gain.to(device) != 0].any(dim=1)
    decoded = read.nonzero().squeeze(1)
    unread = (~read).cpu().numpy()
    intact_sums: Dict[str, float] = {}
    sums: Dict[str, np.ndarray] = {}
    shifts: Dict[str, np.ndarray] = {}
    total = 0
    with bar(label, total=n_sets * len(encoded), show=progress) as progress_bar:
        for batch, brain, targets in encoded:
            n = brain.shape[0]
            total += n
            intact = model.decode(brain)
            _, base = loss({"brain": brain, "reconstructions": intact, "targets": targets})
            for name, value in reported(model, base).items():
                intact_sums[name] = intact_sums.get(name, 0.0) + value * n
                sums.setdefault(name, np.zeros(n_sets))[unread] += value * n
                shifts.setdefault(name, np.zeros(n_sets))
            if observe is not None:
                for k in np.flatnonzero(unread).tolist():
                    observe(batch, intact, k, intact)
            progress_bar.advance(n_sets - decoded.numel())
            decode_silenced = model.silenced_decoder(brain)  # layer 8's product of this batch, once for all chunks
            for first in range(0, decoded.numel(), LESIONS_PER_PASS):
                sets = decoded[first : first + LESIONS_PER_PASS]
                recon = decode_silenced(silenced[sets])
                for k, index in enumerate(sets.tolist()):
                    moved = {m: v[k * n : (k + 1) * n] for m, v in recon.items()}
                    _, parts = loss({"brain": brain, "reconstructions": moved, "targets": targets})
                    if observe is not None:
                        observe(batch, intact, index, moved)
                    for name, value in reported(model, parts).items():
                        sums[name][index] += value * n
                    for name, value in reported(model, loss.shift(moved, intact, targets)).items():
                        shifts[name][index] += value * n
                progress_bar.advance(sets.numel())
    return LesionEffects({name: value / total for name, value in intact_sums.items()},
                         {name: value / total for name, value in sums.items()}, {name: value / total for name, value in shifts.items()})


def lesion_losses(model, loss: GibletLoss, encoded, silenced: torch.Tensor, progress: Optional[bool] = None,
                  label: str = "lesions") -> Dict[str, np.ndarray]:
    """Each reported modality's loss for every unit set of ``silenced (M, units)``: ``lesion_effects``'s losses."""
    return lesion_effects(model, loss, encoded, silenced, progress, label).losses


def contiguous_null(model, loss: GibletLoss, encoded, intact: Dict[str, float], mask: np.ndarray, size: int,
                    permutations: int, seed: int = 0, progress: Optional[bool] = None
                    ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Each modality's relative change and relative shift (``relative_shift``) when random contiguous parcels of
    ``size`` voxels are silenced, one per draw: grown from random seed voxels inside ``mask`` through face
    neighbours (``random_contiguous_parcels``), so the null has the spatial structure of a real region rather than
    scattered voxels."""
    if permutations == 0:
        return {name: [] for name in intact}, {name: [] for name in intact}
    parcels = torch.from_numpy(random_contiguous_parcels(mask, size, permutations, seed))
    effects = lesion_effects(model, loss, encoded, parcels, progress, f"random parcels of {size} voxels")
    return ({name: [relative_change(intact[name], float(value)) for value in effects.losses[name]] for name in intact},
            {name: [relative_shift(intact[name], float(value)) for value in effects.shifts[name]] for name in intact})


def relative_change(intact: float, lesioned: float) -> float:
    return (lesioned - intact) / intact if intact != 0 else math.inf if lesioned > intact else 0.0


def relative_shift(intact: float, shift: float) -> float:
    """How far a lesion moves the reconstruction, over how far the intact one lies from the movie."""
    return shift / intact if intact != 0 else math.inf if shift > 0 else 0.0


def p_value(observed: float, null: List[float]) -> float:
    """``(1 + #{null >= observed}) / (1 + N)``: never 0, at least ``1 / (1 + N)``."""
    return (1 + sum(value >= observed for value in null)) / (1 + len(null))


def lesion(run: PathLike, roi: PathLike, out: Optional[PathLike] = None, store_path: Optional[PathLike] = None,
           permutations: int = 39, split: str = "test", seed: int = 0, progress: Optional[bool] = None) -> Dict[str, object]:
    """Silence the ROI's units of a trained run; writes ``out`` (default ``RUN/lesion/<roi name>``) and returns lesion.json's dict."""
    run, roi = Path(run), Path(roi)
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    checkpoint, store = open_run(run, store_path, split)
    # A wrong ROI or output folder fails at once, before the model is loaded.
    voxels, outside = roi_voxels(roi, store)
    out = Path(out) if out is not None else run_folder(run, checkpoint) / "lesion" / roi_name(roi)
    if out.exists():
        check_replaceable(out)
    model = load_model(checkpoint, store)
    units = model.lesion_mask(torch.from_numpy(voxels))

    dataset = WindowDataset(store, split, "cross_subject", window_index(store))
    loss = GibletLoss(scales=LossScales.from_store(store, model))
    encoded = _encode(model, dataset)
    intact_lines, lesioned_lines = _timelines(model, store, encoded), _timelines(model, store, encoded)
    intact_texts: List[torch.Tensor] = []
    lesioned_texts: List[torch.Tensor] = []

    def collect(batch, intact_recon, _set, lesioned_recon) -> None:
        # What the report writes out (frames, sound, nearest texts), from the one decode of each that is scored.
        for lines, texts, recon in ((intact_lines, intact_texts, intact_recon), (lesioned_lines, lesioned_texts, lesioned_recon)):
            for modality, timeline in lines.items():
                timeline.add(batch["window_onset"], recon[modality])
            if "text" in recon:
                texts.append(recon["text"].float().cpu())

    effects = lesion_effects(model, loss, encoded, units[None], progress=False, observe=collect)
    intact = effects.intact
    lesioned = {name: float(value[0]) for name, value in effects.losses.items()}
    observed = {name: relative_change(intact[name], lesioned[name]) for name in intact}
    shift = {name: relative_shift(intact[name], float(value[0])) for name, value in effects.shifts.items()}

    n_silenced = int(units.sum())
    null, null_shift = contiguous_null(model, loss, encoded, intact, store.mask()[0], n_silenced, permutations, seed, progress)

    audio_feature = next((m for m in model.modalities if m in ("mel", "codes")), None)
    report: Dict[str, object] = {
        "roi_voxels": int(voxels.sum()),
        "modalities": {
            name: {
                "loss_intact": intact[name],
                "loss_lesioned": lesioned[name],
                "relative_change": observed[name],
                "p_value": p_value(observed[name], null[name]) if permutations else None,
                "relative_shift": shift[name],
                "shift_p_value": p_value(shift[name], null_shift[name]) if permutations else None,
            }
            for name in intact
        },
        "roi": str(roi),
        "roi_voxels_outside_mask": outside,
        "lesioned_units": n_silenced,
        "n_units": model.n_units,
        "audio_feature": audio_feature,
        "split": split,
        "windows": len(dataset),
        "trs": [int(t) for t in store.splits[split]],
        "permutations": permutations,
        "seed": seed,
        "null": {"kind": "random contiguous parcels (face neighbours, inside the mask)", "size": n_silenced,
                 "permutations": permutations, "seed": seed},
        "null_relative_change": null,
        "null_relative_shift": null_shift,
        "checkpoint": str(checkpoint),
        "out": str(out),
    }
    _write_outputs(out, report, model, store, loss.scales, encoded, (intact_lines, lesioned_lines), (intact_texts, lesioned_texts))
    return report


def roi_name(path: PathLike) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# --------------------------------------------------------------------------- files


def check_replaceable(out: Path, marker: str = "lesion.json", kind: str = "lesion report") -> None:
    """``out`` may be replaced only when it is a report of this kind (it holds ``marker``) or an empty folder."""
    if not out.is_dir() or (not (out / marker).is_file() and any(out.iterdir())):
        raise DataError(out, f"exists and is not a {kind}", expected=f"a new folder, or a {kind} to replace",
                        fix="choose another --out")


def write_report_folder(out: Path, marker: str, kind: str, fill: Callable[[Path], Dict[str, object]], report: Dict[str, object]) -> None:
    """``fill(tmp)`` writes the files into a hidden folder beside ``out`` and returns ``report["files"]``; the report is
    written as ``marker`` and the folder renamed to ``out`` at the end: a crash leaves no half-written report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.report-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # with the user's umask, as the finished folder should have
    try:
        report["files"] = fill(tmp)
        (tmp / marker).write_text(json.dumps(report, indent=2))
        if out.exists():
            check_replaceable(out, marker, kind)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_outputs(out: Path, report, model, store: Store, scales: LossScales, encoded, lines, texts) -> None:
    intact_lines, lesioned_lines = lines

    def fill(tmp: Path) -> Dict[str, object]:
        files: Dict[str, object] = {}
        if "video" in intact_lines:
            files["video"] = _write_frames(tmp / "frames.mp4", encoded, intact_lines["video"], lesioned_lines["video"], model.dims)
        audio = report["audio_feature"]
        if audio == "mel":
            files["audio"] = _write_mel_audio(tmp, store, scales, intact_lines["mel"], lesioned_lines["mel"])
        elif audio == "codes":
            files["audio"] = _write_code_audio(tmp, store, intact_lines["codes"], lesioned_lines["codes"])
        if "text" in model.modalities:
            files["text"] = _write_texts(tmp, store, encoded, texts)
        return files

    write_report_folder(out, "lesion.json", "lesion report", fill, report)


def _write_frames(path: Path, encoded, intact: SlotAverage, lesioned: SlotAverage, dims) -> Dict[str, object]:
    """One frame per window's own TR: original | intact | lesioned, enlarged, H.264 at VIDEO_FPS."""
    import av

    original = SlotAverage(intact.times, intact.slot_s, intact.n_slots)
    for batch, _brain, targets in encoded:
        original.add(batch["window_onset"], targets["video"] * targets["video_valid"][..., None, None, None])
    panels = [original.mean(), intact.mean(), lesioned.mean()]  # (T, 3, h, w) each, in [0, 1]
    gap = 4
    frames = []
    for t in range(panels[0].shape[0]):
        row = []
        for i, panel in enumerate(panels):
            image = panel[t].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            row.append(image.repeat(VIDEO_SCALE, axis=0).repeat(VIDEO_SCALE, axis=1))
            if i < len(panels) - 1:
                row.append(np.full((row[-1].shape[0], gap, 3), 255, dtype=np.uint8))
        frames.append(np.ascontiguousarray(np.concatenate(row, axis=1)))
    height, width = frames[0].shape[:2]
    container = av.open(str(path), "w", format="mp4")
    try:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        stream.options = {"crf": "18"}
        for index, image in enumerate(frames):
            if width % 2 or height % 2:
                image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)))
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, VIDEO_FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        container.close()
    return {"file": path.name, "frames": len(frames), "fps": VIDEO_FPS, "panels": ["original", "intact", "lesioned"],
            "frame_of": "the middle of each window's own TR"}


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM, peak-normalised to 0.9 (Griffin-Lim and a random EnCodec decoder give arbitrary levels)."""
    import soundfile

    samples = np.asarray(samples, dtype=np.float64).reshape(-1)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 0:
        samples = samples * (0.9 / peak)
    # Converted here (x 32767, rounded to the nearest step): libsndfile's float conversion scales by 32768 and rounds down.
    soundfile.write(str(path), np.round(samples * 32767).astype(np.int16), int(rate), subtype="PCM_16", format="WAV")


def mel_to_sound(decibels: np.ndarray, rate: int, hop: int, iterations: int = GRIFFIN_LIM_ITERATIONS,
                 seed: int = 0) -> Tuple[np.ndarray, int]:
    """(samples, sample rate) for log-mel frames ``(T, n_mels)`` made as ``giblet.data.audio.mel_spectrogram`` makes them.

    The STFT magnitude is librosa's non-negative least-squares inverse of the store's mel filters (the same
    ``n_fft``, the zero-padded FFT of each ``hop``-sample frame), then librosa's fast Griffin-Lim finds phases
    (``iterations`` rounds, momentum 0.99, seeded random start: the same sound every call). The store's frames do
    not overlap (each is a Hann window of ``hop`` samples), and Griffin-Lim needs overlapping frames to find
    phases, so the magnitudes are interpolated onto a hop of half the window, each frame at its own centre.
    Audio at 32 kHz or more is rebuilt at half its rate (the same frequency bins up to a quarter of the original
    rate, a quarter of the work). ``T * hop`` samples (at the rebuilt rate: ``T * hop / 2``) come back.
    """
    import librosa
    from scipy.interpolate import interp1d

    n_fft = 1 << (2 * hop - 1).bit_length()
    power = librosa.db_to_power(np.asarray(decibels, dtype=np.float32).T)
    magnitude = librosa.feature.inverse.mel_to_stft(power, sr=rate, n_fft=n_fft, power=2.0)
    factor = 2 if rate >= 32000 and rate % 2 == 0 and hop % 2 == 0 else 1
    n_fft, window, rate = n_fft // factor, hop // factor, rate // factor
    magnitude = magnitude[: n_fft // 2 + 1]
    frames = magnitude.shape[1]
    synthesis_hop = max(1, window // 2)
    # Griffin-Lim's frame j (centred STFT) is centred on sample j * synthesis_hop; the store's frame t on (t + 0.5) * window.
    centres = np.arange(1 + frames * window // synthesis_hop) * synthesis_hop / window - 0.5
    if frames > 1:
        magnitude = interp1d(np.arange(frames), magnitude, axis=1, assume_sorted=True)(np.clip(centres, 0, frames - 1))
    else:
        magnitude = np.repeat(magnitude, centres.size, axis=1)
    samples = librosa.griffinlim(magnitude.astype(np.float32), n_iter=iterations, hop_length=synthesis_hop,
                                 win_length=window, n_fft=n_fft, window="hann", center=True, length=frames * window,
                                 momentum=0.99, init="random", random_state=seed)
    return samples, rate


def _write_mel_audio(folder: Path, store: Store, scales: LossScales, intact: SlotAverage, lesioned: SlotAverage) -> Dict[str, object]:
    """Decoded log-mel (standardized per band) back to decibels, then Griffin-Lim with the store's mel settings."""
    from giblet.data.audio import mel_hop

    manifest = store.manifest["audio"]
    m = manifest["mel"]
    hop = mel_hop(int(manifest["sample_rate"]), m["rate_hz"])  # the stored rate is exactly sample_rate / hop
    mean, std = np.asarray(scales.mel_mean, dtype=np.float32), np.asarray(scales.mel_std, dtype=np.float32)
    first = int(round((intact.times[0] - m["start_s"]) * m["rate_hz"] - 0.5))
    original = np.asarray(store.mel()[first : first + len(intact.times)], dtype=np.float32)
    low, high = float(original.min()), float(original.max())
    decibels = {"intact": intact.mean().numpy() * std + mean, "lesioned": lesioned.mean().numpy() * std + mean, "original": original}
    files = {}
    for name, values in decibels.items():
        # Decoded values outside the range of the heard mel are noise: clipped to it.
        samples, rate = mel_to_sound(np.clip(values, low, high), int(manifest["sample_rate"]), hop)
        files[name] = f"audio_{name}.wav"
        _write_wav(folder / files[name], samples, rate)
    return {"files": files, "method": f"librosa: mel_to_stft, then Griffin-Lim ({GRIFFIN_LIM_ITERATIONS} iterations) of the decoded mel", "sample_rate": rate,
            "start_s": float(intact.times[0] - 0.5 / m["rate_hz"])}


def _write_code_audio(folder: Path, store: Store, intact: SlotVote, lesioned: SlotVote) -> Dict[str, object]:
    """The voted code per codebook and code frame, through the EnCodec model the store's codes came from.

    That model is loaded as the store loaded it (``audio.encodec_model``); when it cannot be
    (pretrained weights and no internet), the wav files are left out and the reason recorded.
    """
    from giblet.data.audio import load_encodec

    c = store.manifest["audio"]["codes"]
    try:
        codec = load_encodec(c["model"], c["bandwidth_kbps"])
    except DataError as error:
        return {"files": {}, "skipped": f"EnCodec model {c['model']!r} unavailable: {error}"}
    files = {}
    for name, timeline in (("intact", intact), ("lesioned", lesioned)):
        codes = timeline.codes()  # (n_codebooks, n_code_frames)
        with torch.no_grad():
            samples = codec.decode([(codes[None].long(), None)])[0].mean(dim=0).numpy()
        files[name] = f"audio_{name}.wav"
        _write_wav(folder / files[name], samples, codec.sample_rate)
    return {"files": files, "method": f"EnCodec decoder ({c['model']}, {c['bandwidth_kbps']} kbps)",
            "sample_rate": int(codec.sample_rate), "start_s": float(intact.times[0] - 0.5 / c["rate_hz"])}


def _write_texts(folder: Path, store: Store, encoded, texts) -> Dict[str, object]:
    """Per window and filled text slot: the annotation nearest (cosine) to the decoded embedding, intact and lesioned."""
    annotations = store.texts()
    table = F.normalize(torch.from_numpy(np.asarray(store.text_embeddings(), dtype=np.float32)), dim=1)
    nearest = {}
    for name, decoded in zip(("intact", "lesioned"), texts):
        similarity = F.normalize(torch.cat(decoded), dim=-1) @ table.T  # (windows, slots, segments)
        nearest[name] = similarity.max(dim=-1)
    trs = torch.cat([batch["tr"] for batch, _, _ in encoded]).cpu()
    onsets = torch.cat([batch["window_onset"] for batch, _, _ in encoded]).cpu()
    index = torch.cat([batch["text_index"] for batch, _, _ in encoded]).cpu()
    windows, hits, lines = [], {"intact": 0, "lesioned": 0}, []
    for w in range(index.shape[0]):
        slots = []
        for s in np.flatnonzero(index[w].numpy() >= 0):
            truth = int(index[w, s])
            entry = {"slot": int(s), "segment": truth, "text": annotations[truth]}
            for name, (values, rows) in nearest.items():
                row = int(rows[w, s])
                entry[name] = {"segment": row, "text": annotations[row], "cosine": round(float(values[w, s]), 4)}
                hits[name] += row == truth
            slots.append(entry)
        windows.append({"tr": int(trs[w]), "window_s": [float(onsets[w]), float(onsets[w]) + store.manifest["window"]["window_s"]],
                        "slots": slots})
        lines.append(f"TR {int(trs[w])}")
        for entry in slots:
            lines.append(f"  annotation: {entry['text']}")
            lines.append(f"    intact:   {entry['intact']['text']}  (cosine {entry['intact']['cosine']:.3f})")
            lines.append(f"    lesioned: {entry['lesioned']['text']}  (cosine {entry['lesioned']['cosine']:.3f})")
    filled = sum(len(w["slots"]) for w in windows)
    summary = {"slots": filled, **{f"nearest_is_true_{name}": (hits[name] / filled if filled else None) for name in hits}}
    (folder / "nearest_text.json").write_text(json.dumps({**summary, "windows": windows}, indent=2))
    (folder / "nearest_text.txt").write_text("\n".join(lines) + "\n")
    return {"files": {"json": "nearest_text.json", "text": "nearest_text.txt"}, **summary}

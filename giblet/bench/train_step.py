"""Training throughput of the model, with giblet's native ops and with their plain-PyTorch references.

One training step is what ``giblet.train.trainer`` does per optimizer step on one
process: forward, ``GibletLoss``, backward, gradient clipping, AdamW step, zeroed
gradients. It is timed twice on the same batch from the same initial weights:

* ``giblet``: the model as it is, calling the native ops (``giblet.ops``);
* ``reference``: the same model with ``giblet.ops_reference`` swapped in for the
  ops it calls (``reference_ops()``): gathers materialized, dense averaging
  weights, unfused bottleneck.

Before any timing, both variants compute the loss and every gradient on that
batch with the same random draws (dropout, modality dropout); they must agree
within ``LOSS_RTOL`` / ``GRAD_RTOL`` or ``VariantsDisagree`` is raised, so a
speed-up is never reported for a path that computes something else.

The data is synthetic and in memory by default, at the sizes of the ``tiny``
synthetic preset (``giblet data synth --preset tiny``) prepared with the default
settings: 4,000 voxels, frames of the settings' video size (32x18 by default) at 25 fps, 64-band log-mel at 50 Hz (or
EnCodec codes, 8 codebooks of 1,024 at 75 Hz, when the settings' audio input is
codes), 1.5 s TRs, 1.5-3 s annotation segments embedded in 384 dimensions,
windows of ``lookback_s + TR`` with the settings' slots. The frame table holds only the frames that the batch's windows
show (the ops read nothing else), so the whole movie is never generated. With a
prepared store, the batch is drawn from its training split and the model reads
the store's full tables, as in training.

TRs/s is ``batch_size / median step time``: compute only, batches are built
beforehand (the trainer reads them from the store between steps).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import statistics
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from giblet import ops, ops_reference
from giblet.bench.ops import PASSES, time_calls
from giblet.config import Config, load_config
from giblet.data.audio import MEL_RATE_HZ
from giblet.data.dataset import WindowDataset, text_index_for, window_index
from giblet.data.synth import PRESETS
from giblet.errors import ConfigError, DataError
from giblet.models import GibletAutoencoder, ModelDims, Stimuli, dims_from_manifest
from giblet.models import autoencoder as autoencoder_module
from giblet.train.losses import GibletLoss, LossScales
from giblet.train.trainer import make_optimizer

PRESET = "tiny"
EMBEDDING_SIZE = 384  # the default embedder's width (all-MiniLM-L6-v2)
SEGMENT_S = (1.5, 3.0)  # annotation segment lengths of the synthetic data
N_CODEBOOKS, CODEBOOK_SIZE, CODE_RATE_HZ = 8, 1024, 75.0  # EnCodec 24 kHz at 6 kbps

# How close the two variants must be on the same batch (float32, different summation orders).
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3  # of each gradient's largest magnitude

VARIANTS = ("giblet", "reference")

REFERENCE_OPS = types.SimpleNamespace(
    gather_project=ops_reference.gather_project,
    grid_index=ops_reference.grid_index,
    resample_codes=ops_reference.resample_codes,
    grid_average=ops_reference.grid_average,
    bottleneck=ops_reference.bottleneck,
)


class VariantsDisagree(AssertionError):
    """The native and the reference training step computed different losses or gradients."""


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Inside the block the model calls ``giblet.ops_reference`` instead of the native ops."""
    native = autoencoder_module.ops
    autoencoder_module.ops = REFERENCE_OPS
    try:
        yield
    finally:
        autoencoder_module.ops = native


def variant_context(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return reference_ops() if variant == "reference" else contextlib.nullcontext()


@contextlib.contextmanager
def num_threads(threads: Optional[int]) -> Iterator[int]:
    """torch's intra-op thread count set to ``threads`` (None: every CPU this process may use), then restored."""
    before = torch.get_num_threads()
    wanted = threads or len(os.sched_getaffinity(0))
    if wanted < 1:
        raise ValueError(f"threads must be >= 1, got {wanted}")
    torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """What one training step needs besides the model: dimensions, stream tables, one batch, loss scales."""

    dims: ModelDims
    stimuli: Stimuli
    batch: Dict[str, torch.Tensor]
    scales: LossScales
    description: str


def steps_to_fit(model, loss, optimizer, batch, max_steps: int, factor: float = 10.0) -> Tuple[int, float, float]:
    """Train on one ``batch`` until its fMRI loss is below ``1 / factor`` of the first step's, at most ``max_steps``
    steps: ``(steps taken, first fMRI loss, last)``. A model that cannot overfit a few TRs has a bug (the test), and
    how many steps it takes is a figure of the recipe (the benchmark)."""
    first = last = math.nan
    step = 0
    for step in range(1, max_steps + 1):
        total, parts = loss(model(batch))
        last = parts["fmri"].item()
        first = last if step == 1 else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if last < first / factor:
            break
    return step, first, last


def audio_input(config: Config) -> str:
    """The model's audio input for a store prepared with ``config``: codes, mel or none (as ``dims_from_manifest``)."""
    features, wanted = config.audio.features, config.model.audio_input
    if wanted == "auto":
        return "codes" if "codes" in features else "mel" if "mel" in features else "none"
    if wanted not in features:
        raise ConfigError(f"model.audio_input is {wanted!r} but audio.features is {features}; expected one of those")
    return wanted


def synthetic_data(config: Config, batch_size: int, seed: int = 0) -> TrainData:
    """Random streams and one batch at the ``tiny`` preset's sizes (see the module docstring).

    The audio stream is the one a store prepared with ``config`` would give the model.
    """
    audio = audio_input(config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preset = PRESETS[PRESET]
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr, fps, movie_s = preset.tr_s, float(preset.fps), preset.movie_duration_s
    lookback, window = config.window.lookback_s, config.window.lookback_s + preset.tr_s
    height, width = config.video.height, config.video.width

    # One batch of training windows: random TRs of the movie, as the trainer's shuffled sampler draws them.
    n_trs = preset.movie_trs
    if batch_size > n_trs:
        raise ValueError(f"batch_size {batch_size} is more than the {n_trs} TRs of the {PRESET} preset")
    trs = torch.randperm(n_trs, generator=generator)[:batch_size].sort().values
    onsets = trs.double() * tr - lookback

    # Frames: only those the windows show, renumbered (the same unique rows and sharing as on the full movie).
    video_index = ops.grid_index(preset.n_frames, fps, onsets, window, config.window.video_slots)
    shown, inverse = torch.unique(video_index[video_index >= 0], return_inverse=True)
    compact = torch.full_like(video_index, -1)
    compact[video_index >= 0] = inverse
    frames = torch.randint(0, 256, (shown.numel(), height * width * 3), dtype=torch.uint8, generator=generator)

    # Annotation segments back to back over the movie, unit-norm embeddings.
    lengths = rng.uniform(*SEGMENT_S, size=int(movie_s / SEGMENT_S[0]) + 1)
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    keep = starts < movie_s
    starts, ends = starts[keep], np.minimum(starts[keep] + lengths[keep], movie_s)
    text = torch.nn.functional.normalize(torch.randn(starts.size, EMBEDDING_SIZE, generator=generator), dim=1)
    text_index = torch.from_numpy(text_index_for(np.stack([starts, ends], axis=1), onsets.numpy(), window,
                                                 dataclasses.asdict(config.window)))

    codes = mel = None
    audio_dims: Dict[str, object] = {}
    scales = LossScales(frames=float(frames.float().div(255).var()))
    if audio == "mel":
        n_mel = int(round(movie_s * MEL_RATE_HZ))
        mel = torch.randn(n_mel, config.audio.n_mels, generator=generator) * 10 - 40  # log-mel-like decibels
        audio_dims = dict(mel_slots=config.window.mel_slots, n_mels=config.audio.n_mels, mel_rate_hz=MEL_RATE_HZ)
        scales.mel_mean = mel.mean(dim=0).tolist()
        scales.mel_std = mel.std(dim=0).tolist()
    elif audio == "codes":
        n_codes = int(round(movie_s * CODE_RATE_HZ))
        codes = torch.randint(0, CODEBOOK_SIZE, (N_CODEBOOKS, n_codes), dtype=torch.int16, generator=generator)
        audio_dims = dict(code_slots=config.window.code_slots, n_codebooks=N_CODEBOOKS, codebook_size=CODEBOOK_SIZE,
                          code_rate_hz=CODE_RATE_HZ)
        scales.codes = [math.log(CODEBOOK_SIZE)] * N_CODEBOOKS
    dims = ModelDims(
        n_voxels=preset.mask_voxels, window_s=window, video_slots=config.window.video_slots, frame_height=height,
        frame_width=width, text_slots=config.window.text_slots, embedding_size=EMBEDDING_SIZE, **audio_dims,
    )
    batch = {
        "window_onset": onsets,
        "video_index": compact,
        "text_index": text_index,
        "fmri": torch.randn(batch_size, preset.mask_voxels, generator=generator),
    }
    description = (
        f"synthetic {PRESET}-preset data: {dims.n_voxels} voxels, {width}x{height} frames "
        f"({shown.numel()} shown in the batch), {audio}, {starts.size} segments, {window:g} s windows"
    )
    return TrainData(dims, Stimuli(frames, (height, width), codes, mel, text), batch, scales, description)


def store_data(store, config: Config, batch_size: int, seed: int = 0) -> TrainData:
    """One batch of random training windows of a prepared store, with its full stream tables."""
    dims = dims_from_manifest(store.manifest, config.model.audio_input, config.model.inputs)
    dataset = WindowDataset(store, "train", config.dataset.mode, window_index(store))
    if batch_size > len(dataset):
        raise DataError(store.path, f"{len(dataset)} training samples", expected=f"at least the batch size, {batch_size}")
    picks = np.sort(np.random.default_rng(seed).choice(len(dataset), batch_size, replace=False))
    batch = dataset.batch(picks)
    stimuli = Stimuli.from_store(store, dims)
    probe = GibletAutoencoder(dims, config.model).attach(stimuli)
    scales = LossScales.from_store(store, probe)
    audio = "codes" if dims.present("codes") else "mel" if dims.present("mel") else "no audio"
    description = f"store {store.path}: {dims.n_voxels} voxels, {audio}, training windows"
    return TrainData(dims, stimuli, batch, scales, description)


# --------------------------------------------------------------------------- the step


@dataclass
class Trainee:
    """A model with its loss and optimizer, built like ``giblet.train.trainer.train`` builds them."""

    model: GibletAutoencoder
    loss_fn: GibletLoss
    optimizer: torch.optim.Optimizer
    batch: Dict[str, torch.Tensor]
    clip_grad_norm: float


def build_trainees(data: TrainData, config: Config, device: torch.device, seed: int = 0) -> Dict[str, Trainee]:
    """One trainee per variant, with identical initial weights (one model, copied)."""
    t = config.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GibletAutoencoder(data.dims, config.model)
        model.set_input_statistics(data.scales.mel_mean, data.scales.mel_std)
    model.to(device).train()
    stimuli = data.stimuli.to(device)
    batch = {key: value.to(device) for key, value in data.batch.items()}
    trainees = {}
    for variant in VARIANTS:
        copy_of = model if variant == VARIANTS[-1] else copy.deepcopy(model)  # the stream tables are attached after
        copy_of.attach(stimuli)
        trainees[variant] = Trainee(copy_of, GibletLoss(config.loss, data.scales), make_optimizer(copy_of, t), batch, t.clip_grad_norm)
    return trainees


def loss_and_gradients(trainee: Trainee, variant: str, seed: int = 0):
    """Loss and every parameter's gradient on the trainee's batch, with fixed random draws; no optimizer step."""
    trainee.optimizer.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]), variant_context(variant):
        torch.manual_seed(seed)
        total, parts = trainee.loss_fn(trainee.model(trainee.batch))
        total.backward()
    loss = total.detach().item()
    grads = {name: p.grad.detach().clone() for name, p in trainee.model.named_parameters() if p.grad is not None}
    trainee.optimizer.zero_grad(set_to_none=True)
    return loss, {k: v.detach().item() for k, v in parts.items()}, grads


@dataclass
class Agreement:
    loss_giblet: float
    loss_reference: float
    loss_rel_diff: float
    grad_rel_diff: float  # the largest, over parameters, of max |difference| / max |giblet's gradient|
    worst_parameter: str
    parts: Dict[str, List[float]] = field(default_factory=dict)  # term -> [giblet, reference]


def check_agreement(trainee: Trainee, seed: int = 0) -> Agreement:
    """Both variants' loss and gradients on the same batch and weights; ``VariantsDisagree`` beyond tolerance."""
    loss_a, parts_a, grads_a = loss_and_gradients(trainee, "giblet", seed)
    loss_b, parts_b, grads_b = loss_and_gradients(trainee, "reference", seed)
    if not (math.isfinite(loss_a) and math.isfinite(loss_b)):
        raise VariantsDisagree(f"non-finite training loss: giblet {loss_a}, reference {loss_b}")
    if set(grads_a) != set(grads_b):
        raise VariantsDisagree(f"the variants give gradients to different parameters: {sorted(set(grads_a) ^ set(grads_b))}")
    loss_rel = abs(loss_a - loss_b) / max(abs(loss_a), 1e-12)
    worst, worst_name = 0.0, ""
    for name, grad in grads_a.items():
        scale = float(grad.abs().max())
        difference = float((grad - grads_b[name]).abs().max())
        relative = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
        if relative > worst or not worst_name:
            worst, worst_name = relative, name
    agreement = Agreement(loss_a, loss_b, loss_rel, worst, worst_name,
                          {k: [parts_a[k], parts_b.get(k, math.nan)] for k in parts_a})
    if loss_rel > LOSS_RTOL:
        raise VariantsDisagree(
            f"training loss differs between the native ops and the references: {loss_a:.6g} vs {loss_b:.6g} "
            f"(relative {loss_rel:.2e} > {LOSS_RTOL:g}); terms giblet/reference: {agreement.parts}"
        )
    if worst > GRAD_RTOL:
        raise VariantsDisagree(
            f"gradient of {worst_name} differs between the native ops and the references by {worst:.2e} "
            f"of its largest magnitude (> {GRAD_RTOL:g})"
        )
    return agreement


def train_step(trainee: Trainee) -> float:
    """One optimizer step as the trainer takes it (one process, no accumulation): returns the loss."""
    total, _parts = trainee.loss_fn(trainee.model(trainee.batch))
    total.backward()
    if trainee.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), trainee.clip_grad_norm)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    return total.item()


def step_runner(trainee: Trainee, variant: str) -> Callable[[], float]:
    def run() -> float:
        with variant_context(variant):
            return train_step(trainee)

    return run


# --------------------------------------------------------------------------- timing



@dataclass
class TrainRow:
    variant: str
    median_s: float
    trs_per_s: float
    step_s: List[float]


@dataclass
class TrainBench:
    description: str
    device: str
    threads: int
    load_average: List[float]  # 1, 5, 15 min, when the timing ended
    omp_wait_policy: Optional[str]  # OMP_WAIT_POLICY: with threads spinning at barriers a busy machine slows parallel code most
    batch_size: int
    n_parameters: int
    steps: int  # timed steps per variant
    rows: List[TrainRow]
    speedup: float  # reference median / giblet median
    agreement: Agreement

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_steps(runs: List[Callable[[], float]], steps: int, device: torch.device) -> List[List[float]]:
    """Seconds of each of ``steps`` timed calls per run (rounded up to whole passes), timed as ``giblet bench`` times ops."""
    return time_calls(runs, -(-steps // PASSES), device)


def run_train_bench(
    repeats: int = 8,
    batch_size: Optional[int] = None,
    store=None,
    config: Optional[Config] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> TrainBench:
    """Check that both variants agree, then time ``repeats`` (rounded up to whole passes) steps of each.

    ``config``: model, loss, optimizer and window settings (default: the defaults, what
    ``giblet train`` uses without ``--config``); ``batch_size`` defaults to its
    ``train.batch_size``. ``store``: an opened prepared store, else synthetic data
    (its audio stream: the one a store prepared with ``config`` would give).
    """
    config = config or load_config(None)
    batch_size = batch_size or config.train.batch_size
    dev = torch.device(device)
    say = progress or (lambda text: None)
    with num_threads(threads) as used:
        say("training step: data")
        data = store_data(store, config, batch_size, seed) if store is not None else synthetic_data(config, batch_size, seed)
        say("training step: agreement of giblet and reference")
        trainees = build_trainees(data, config, dev, seed)
        agreement = check_agreement(trainees["giblet"], seed)
        say("training step: timing")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            spent = time_steps([step_runner(trainees[v], v) for v in VARIANTS], repeats, dev)
    rows = []
    for variant, times in zip(VARIANTS, spent):
        median = statistics.median(times)
        rows.append(TrainRow(variant, median, batch_size / median, times))
    return TrainBench(
        description=data.description,
        device=str(dev),
        threads=used,
        load_average=list(os.getloadavg()),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        batch_size=batch_size,
        n_parameters=trainees["giblet"].model.n_parameters(),
        steps=len(spent[0]),
        rows=rows,
        speedup=rows[1].median_s / rows[0].median_s,
        agreement=agreement,
    )

"""The training loop: DistributedDataParallel over torchrun processes, readable top to bottom.

Run by ``giblet train`` (one process in place, or ``torchrun`` with N processes):
``python -m giblet.train.trainer --store STORE --out RUN [--resume]`` reads the resolved
``RUN/config.yaml``. Ranks come from torchrun's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``
(the global rank is ``RANK``, never ``LOCAL_RANK``); NCCL on GPUs, gloo on CPUs.
Every metric is all-reduced as sums and counts. Checkpoints hold everything a resume
needs and are written atomically by rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import socket
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from giblet.config import Config, TrainConfig, dump_config, from_dict, load_config, resume_differences
from giblet.data.dataset import ShardSampler, WindowDataset, window_index
from giblet.data.store import Store, open_store, record_run_store
from giblet.errors import DataError
from giblet.linear import linear_prior, regressor_parts
from giblet.models import GibletAutoencoder, Stimuli, dims_from_manifest
from giblet.models.checkpoint import read_checkpoint, save_checkpoint
from giblet.progress import bar
from giblet.train.losses import GibletLoss, LossScales

CONFIG_NAME = "config.yaml"


WARMUP_FRACTION = 0.05  # of all optimizer steps
MIN_LR_FRACTION = 0.1  # of train.lr, where the cosine ends


def lr_factor(step: int, total_steps: int, warmup_fraction: float = WARMUP_FRACTION, min_lr_fraction: float = MIN_LR_FRACTION) -> float:
    """Linear warmup, then cosine from 1 down to ``min_lr_fraction``; stepped once per optimizer step."""
    warmup = max(1, int(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_fraction + (1 - min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class VoxelCorrelation:
    """Per-voxel Pearson r over time from running sums, so ranks combine by all-reducing sums."""

    def __init__(self, n_voxels: int, device) -> None:
        self.sums = torch.zeros(6, n_voxels, dtype=torch.float64, device=device)  # n, Σp, Σt, Σp², Σt², Σpt

    def add(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        p, t = prediction.double(), target.double()
        self.sums[0] += p.shape[0]
        self.sums[1] += p.sum(0)
        self.sums[2] += t.sum(0)
        self.sums[3] += (p * p).sum(0)
        self.sums[4] += (t * t).sum(0)
        self.sums[5] += (p * t).sum(0)

    def r(self) -> torch.Tensor:
        n, sp, st, spp, stt, spt = self.sums
        cov = spt - sp * st / n
        var = (spp - sp * sp / n).clamp(min=0) * (stt - st * st / n).clamp(min=0)
        return torch.where(var > 0, cov / var.sqrt(), torch.zeros_like(cov))


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def rng_state() -> Dict[str, object]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def validate(model: GibletAutoencoder, dataset: WindowDataset, batch_size: int, procs: "Processes", autocast) -> Dict[str, float]:
    """Validation fMRI loss and per-voxel r (over the split's TRs) against the targets, all ranks together.

    Only layer 7 is computed: the decoder plays no part in these scores.
    """
    model.eval()
    order = list(ShardSampler(len(dataset), procs.rank, procs.world, shuffle=False, pad=False))
    correlation = VoxelCorrelation(model.n_units, procs.device)
    totals = torch.zeros(2, dtype=torch.float64, device=procs.device)  # Σ loss * samples, samples
    for start in range(0, len(order), batch_size):
        batch = to_device(dataset.batch(order[start : start + batch_size]), procs.device)
        with autocast():
            brain = model.encode(batch).float()
        target = batch["fmri"].float()  # one layer-7 unit per voxel: the response itself
        correlation.add(brain, target)
        loss = torch.nn.functional.mse_loss(brain, target)  # the fMRI term of GibletLoss
        totals += torch.stack([loss.double() * len(batch["tr"]), totals.new_tensor(len(batch["tr"]))])
    all_reduce(correlation.sums)
    all_reduce(totals)
    model.train()
    r = correlation.r()
    return {"val_fmri_loss": float(totals[0] / totals[1].clamp(min=1)), "val_r": float(r.mean()), "val_r_median": float(r.median())}


class WeightAverage:
    """An exponential moving average of a model's floating-point weights and buffers.

    ``update(step)`` after each optimizer step, with the decay ramped as ``min(decay, (1 + step) / (10 + step))``
    so the first steps are not averaged with the random initialisation; ``swapped_in()`` puts the average
    into the model for validation or saving and restores the optimizer's weights afterwards. Every DDP rank
    holds the same weights after a step, so every rank keeps the same average without communication.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step))
        state = self.model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], weight)

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        for key, average in self.average.items():
            average.copy_(state[key])

    @contextlib.contextmanager
    def swapped_in(self):
        state = self.model.state_dict()
        raw = {key: state[key].detach().clone() for key in self.average}
        with torch.no_grad():
            for key, average in self.average.items():
                state[key].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in raw.items():
                    state[key].copy_(value)


# --------------------------------------------------------------------------- setup, build, checkpoints


@dataclass(frozen=True)
class Processes:
    """Who this process is: torchrun's global ``rank`` (never ``LOCAL_RANK``), ``local_rank``, ``world`` size, device."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(t: TrainConfig) -> Processes:
    """Join the process group (NCCL on GPUs, gloo on CPUs), pick the device, seed every generator."""
    rank, local_rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() and os.environ.get("GIBLET_DEVICE", "") != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if t.deterministic:
        # cuBLAS is repeatable only with a fixed workspace; without one, deterministic mode fails at the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # Data and model come out identical on every rank (same seed); DDP then keeps them in step.
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    return Processes(rank, local_rank, world, device)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' scales)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)


@dataclass
class Parts:
    """Everything the loop uses, built once (``build``)."""

    model: GibletAutoencoder
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel over more than one process
    train_set: WindowDataset
    val_set: WindowDataset
    loss_fn: GibletLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[WeightAverage]
    per_rank: int  # samples per process per micro-batch
    steps_per_epoch: int
    total_steps: int
    autocast: Callable[[], contextlib.AbstractContextManager]


def build(config: Config, store: Store, procs: Processes) -> Parts:
    """Data, model, the linear prior, loss, optimizer and schedule, the same on every rank."""
    t, m = config.train, config.model
    index = window_index(store)
    train_set = WindowDataset(store, "train", config.dataset.mode, index)
    val_set = WindowDataset(store, "val", "cross_subject", index)
    dims = dims_from_manifest(store.manifest, m.audio_input, m.inputs)
    model = GibletAutoencoder(dims, m)
    model.set_grid(*store.mask())
    model.to(procs.device)
    model.attach(Stimuli.from_store(store, dims, hrf=config.alignment.hrf if m.linear_branch else None).to(procs.device))
    scales = LossScales.from_store(store, model)
    model.set_input_statistics(scales.mel_mean, scales.mel_std)
    teacher = config.loss.fmri_teacher > 0
    if m.linear_branch or teacher:
        # One banded fit for both the branch and the banded teacher. Every process fits the same (seeded) ridge
        # on the same data: no broadcast needed.
        prior = linear_prior(store, regressor_parts(store, model.stimuli.frame_targets), config.alignment.hrf,
                             branch=m.linear_branch, teacher=teacher)
        if m.linear_branch:
            model.set_linear_branch(prior.weight, prior.bias)
            # On a training TR the branch gives its in-sample fit, which has absorbed part of that TR's noise; on
            # new TRs it will not. Each training target moves by (in-sample - cross-fitted), so the network learns
            # what the linear model misses on TRs it has not seen.
            train_set.offset_targets(prior.fit - prior.cross_fit)
        if teacher:
            train_set.blend_targets(prior.cross_fit, config.loss.fmri_teacher)
        # The decoder reads each unit by how well the stimulus predicts its voxel on TRs the linear model did not
        # see, and not at all within chance (decoder_gain): a voxel of noise is ridge-fit noise in layer 7, which
        # the decoder could otherwise read like any unit, and would then carry in every lesion map.
        model.set_decoder_gain(prior.reliability)
        if m.stream_trunks:
            # Each unit reads the trunks of the streams the banded ridge weighs at its voxel (model.stream_trunks).
            model.set_stream_gate(prior.block_weights)
    # Every buffer (lesion mask, input statistics, the grid, the linear branch) is set the same on every rank
    # and never changes in training: nothing to broadcast each step.
    use_cuda = procs.device.type == "cuda"
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[procs.local_rank] if use_cuda else None, broadcast_buffers=False)
           if procs.world > 1 else model)
    per_rank = t.batch_size // (procs.world * t.grad_accum)
    if per_rank < 1 or per_rank * procs.world * t.grad_accum != t.batch_size:
        raise DataError(None, f"train.batch_size {t.batch_size} cannot be split over {procs.world} processes x {t.grad_accum} accumulation steps",
                        expected=f"a multiple of {procs.world * t.grad_accum}")
    steps_per_epoch = len(train_set) // t.batch_size  # the shuffled tail is left out, the same for any process count
    if steps_per_epoch == 0:
        raise DataError(store.path, f"{len(train_set)} training samples", expected=f"at least train.batch_size = {t.batch_size}")
    total_steps = t.epochs * steps_per_epoch
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and t.bf16)  # noqa: E731
    ema = WeightAverage(model, t.ema_decay) if t.ema_decay > 0 else None
    return Parts(model, ddp, train_set, val_set, GibletLoss(config.loss, scales), optimizer, scheduler, ema,
                 per_rank, steps_per_epoch, total_steps, autocast)


@dataclass
class Position:
    """Where training stands: optimizer steps and epochs done, the best validation r, epochs without a better one."""

    step: int = 0
    epoch: int = 0
    best_r: float = -math.inf
    stale: int = 0


class Checkpointer:
    """``RUN/checkpoints/{last,best}.pt``: everything a resume needs, written atomically by rank 0.

    With a weight average, ``model`` holds the averaged weights (what ``giblet.load`` returns) and
    ``raw_model`` the optimizer's, from which training resumes.
    """

    def __init__(self, folder: Path, parts: Parts, config: Config, store: Store, procs: Processes) -> None:
        self.folder, self.parts, self.config, self.store, self.procs = folder, parts, config, store, procs

    def resume(self) -> Position:
        path = self.folder / "last.pt"
        if not path.is_file():
            raise DataError(self.folder, "has no last.pt to resume from", expected="a run folder that has trained at least one checkpoint",
                            fix="drop --resume to start this run, or give the folder of the run to continue")
        state = read_checkpoint(path)  # to the CPU first: no GPU memory spike
        if state["store_key"] != self.store.key:
            raise DataError(path, f"was trained on store {state['store_key']}", expected=f"this store, {self.store.key}",
                            fix="resume with the data and settings of that run, or start a new run folder")
        changed = resume_differences(from_dict(state["config"], str(path)), self.config)
        if changed:
            raise DataError(path, f"the run's settings differ from this config in {', '.join(changed)}",
                            expected="the config the run was started with", fix=f"use {self.folder.parent / CONFIG_NAME}")
        parts = self.parts
        parts.model.load_state_dict(state.get("raw_model", state["model"]))
        if parts.ema is not None:
            parts.ema.load(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(self.procs.rank, len(state["rng"]) - 1)])
        return Position(state["step"], state["epoch"], state["best_r"], state["stale"])

    def save_best(self, at: Position) -> None:
        """``best.pt``: the model as predicting, evaluating and lesioning read it (the averaged weights, without the
        optimizer state, the raw weights and the training-only readouts: at Sherlock's shapes 0.5 GiB of the 2.6 GiB
        ``last.pt`` holds)."""
        if self.procs.master:
            self._write("best.pt", at, inference_only=True)

    def save_last(self, at: Position) -> None:
        """``last.pt``: everything ``resume`` reads."""
        states = [None] * self.procs.world
        if self.procs.world > 1:
            dist.all_gather_object(states, rng_state())  # every rank's generators: an exact resume
        else:
            states = [rng_state()]
        if not self.procs.master:
            return
        model = self.parts.model
        raw = {"raw_model": {k: v.clone() for k, v in model.state_dict().items()}} if self.parts.ema is not None else {}
        self._write("last.pt", at, optimizer=self.parts.optimizer.state_dict(), scheduler=self.parts.scheduler.state_dict(),
                    rng=states, **raw)

    def _write(self, name: str, at: Position, **extra) -> None:
        """The model with the weight average swapped in, where training's position and settings are, and ``extra``."""
        ema = self.parts.ema
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            save_checkpoint(self.parts.model, self.folder / name, step=at.step, epoch=at.epoch, best_r=at.best_r,
                            stale=at.stale, config=self.config.to_dict(), store_key=self.store.key, **extra)


class MetricsLog:
    """``RUN/metrics.jsonl`` (one JSON record per line) and TensorBoard scalars, on rank 0 only."""

    def __init__(self, out: Path, master: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a") if master else None
        self.board = _tensorboard(out / "tensorboard") if master else None

    def write(self, prefix: str, record: Dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        _board_scalars(self.board, prefix, record, record["step"])

    def close(self) -> None:
        for sink in (self.file, self.board):
            if sink is not None:
                sink.close()


# --------------------------------------------------------------------------- the loop


def train(config: Config, store: Store, out: Path, resume: bool = False) -> Dict[str, float]:
    """Train on ``store``, writing checkpoints and metrics under ``out``; returns the last validation metrics."""
    t = config.train
    procs = setup(t)
    parts = build(config, store, procs)
    model, ddp, optimizer, scheduler, ema = parts.model, parts.ddp, parts.optimizer, parts.scheduler, parts.ema
    checkpoints = Checkpointer(out / "checkpoints", parts, config, store, procs)
    at = checkpoints.resume() if resume else Position()
    log = MetricsLog(out, procs.master)
    if procs.master:
        record_run_store(out, store)
    result: Dict[str, float] = {}
    started, samples_seen, unlogged = time.perf_counter(), 0, 0
    # Loss sums stay on the device and are read once per logging interval: the host never waits on a step.
    sums = torch.zeros(2, dtype=torch.float64, device=procs.device)  # Σ total loss * samples, Σ fMRI loss * samples
    with bar("train", total=parts.total_steps, show=procs.master) as progress:
        progress.advance(at.step)
        while at.epoch < t.epochs and at.stale < t.patience:
            sampler = ShardSampler(len(parts.train_set), procs.rank, procs.world, shuffle=True, seed=t.seed, pad=False)
            sampler.set_epoch(at.epoch)
            order = list(sampler)
            first = at.step - at.epoch * parts.steps_per_epoch  # optimizer steps already done in this epoch (resume mid-epoch)
            for step_in_epoch in range(first, parts.steps_per_epoch):
                for micro in range(t.grad_accum):
                    offset = (step_in_epoch * t.grad_accum + micro) * parts.per_rank
                    batch = to_device(parts.train_set.batch(order[offset : offset + parts.per_rank]), procs.device)
                    last_micro = micro == t.grad_accum - 1 or procs.world == 1
                    with ddp.no_sync() if not last_micro else contextlib.nullcontext():  # gradients meet once per step
                        with parts.autocast():
                            total, terms = parts.loss_fn(ddp(batch))
                        (total / t.grad_accum).backward()
                    sums += torch.stack([total.detach(), terms["fmri"].detach()]).double() * parts.per_rank
                if t.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update(at.step)
                optimizer.zero_grad(set_to_none=True)
                at.step += 1
                samples_seen += t.batch_size
                progress.advance(1)
                unlogged += 1
                if at.step % t.log_every_steps == 0 or step_in_epoch == parts.steps_per_epoch - 1:  # the same steps on every rank
                    all_reduce(sums)
                    rate = samples_seen / (time.perf_counter() - started)
                    mean_loss, mean_fmri = (sums / (unlogged * t.batch_size)).tolist()  # means over the steps since the last record
                    record = {"step": at.step, "epoch": at.epoch, "lr": scheduler.get_last_lr()[0], "loss": mean_loss,
                              "fmri_loss": mean_fmri, "trs_per_s": rate}
                    sums.zero_()
                    unlogged = 0
                    log.write("train", record)
                    best = at.best_r if at.best_r > -math.inf else math.nan
                    progress.describe(f"train loss {mean_loss:.3f} | val r {best:.3f} | {rate:.1f} TRs/s")
                if t.checkpoint_every_steps and at.step % t.checkpoint_every_steps == 0:
                    checkpoints.save_last(at)
            at.epoch += 1
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                result = validate(model, parts.val_set, parts.per_rank * t.grad_accum, procs, parts.autocast)
            improved = result["val_r"] > at.best_r
            at.best_r, at.stale = (result["val_r"], 0) if improved else (at.best_r, at.stale + 1)
            result.update(epoch=at.epoch, step=at.step, best_val_r=at.best_r)
            log.write("val", result)
            if improved:
                checkpoints.save_best(at)
            checkpoints.save_last(at)
    log.close()
    return result


def _tensorboard(folder: Path):
    """A TensorBoard event writer (``tensorboard --logdir RUN/tensorboard``), or None without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _board_scalars(board, prefix: str, record: Dict[str, float], step: int) -> None:
    if board is None:
        return
    for key, value in record.items():
        if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
            board.add_scalar(f"{prefix}/{key}", value, step)
    board.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="giblet's training process (started by `giblet train`)")
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.out / CONFIG_NAME)
    result = train(config, open_store(args.store), args.out, resume=args.resume)
    # Who took part: each process's global rank, local rank and host, gathered on rank 0.
    me = {"rank": int(os.environ.get("RANK", 0)), "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "host": socket.gethostname()}
    everyone = [me]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
    if me["rank"] == 0:
        print(json.dumps({"world_size": int(os.environ.get("WORLD_SIZE", 1)), "ranks": everyone, **result}))
    if dist.is_initialized():
        shut_down_process_group()


def shut_down_process_group() -> None:
    """Leave the process group without gloo aborting at exit.

    A DistributedDataParallel wrapper still alive when the group goes (its reducer sits in a
    reference cycle, so leaving ``train`` does not free it) makes about one gloo run in five
    end in ``terminate called without an active exception``. Collect it first, then meet
    the other ranks and destroy the group.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def write_run_config(config: Config, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_NAME
    path.write_text(dump_config(config))
    return path


if __name__ == "__main__":
    main()

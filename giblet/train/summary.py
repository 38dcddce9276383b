"""Size of a model: parameters per layer and the activation memory one training sample costs."""

from __future__ import annotations

from typing import Dict

import torch

from giblet.models.autoencoder import GibletAutoencoder, _placeholder_batch
from giblet.models.stimuli import ModelDims, Stimuli
from giblet.train.losses import GibletLoss


def sherlock_dims(embedding_size: int = 384, frame_height: int = 18, frame_width: int = 32) -> ModelDims:
    """The Sherlock dataset's shapes: 85,810 voxels; per 11.5 s window (10 s lookback + 1.5 s TR) 48 frame
    slots of RGB frames as the store holds them (``video.height`` x ``video.width``), 112 code slots of 8 EnCodec
    codebooks (6 kbps, 75 Hz) and 3 annotation segments."""
    return ModelDims(
        n_voxels=85_810, window_s=11.5, video_slots=48, frame_height=frame_height, frame_width=frame_width, code_slots=112,
        n_codebooks=8, codebook_size=1024, code_rate_hz=75.0, text_slots=3, embedding_size=embedding_size,
    )


def _random_stimuli(dims: ModelDims, rows: int = 512) -> Stimuli:
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (rows, dims.frame_size), dtype=torch.uint8, generator=generator) if dims.present("video") else None
    return Stimuli(
        frames,
        (dims.frame_height, dims.frame_width),
        torch.randint(0, dims.codebook_size, (dims.n_codebooks, rows * 4), generator=generator).to(torch.int16) if dims.present("codes") else None,
        torch.randn(rows * 4, dims.n_mels, generator=generator) if dims.present("mel") else None,
        torch.nn.functional.normalize(torch.randn(rows, dims.embedding_size, generator=generator), dim=1) if dims.present("text") else None,
    )


def activation_bytes(model: GibletAutoencoder, batch_size: int) -> int:
    """Bytes of the tensors autograd keeps from the forward pass (and loss) of one batch, each storage once."""
    dims = model.dims
    model.attach(_random_stimuli(dims))
    batch = _placeholder_batch(dims, batch_size, "cpu")
    rows = model.stimuli.frames.shape[0] if model.stimuli.frames is not None else 1
    generator = torch.Generator().manual_seed(1)
    if "video_index" in batch:
        batch["video_index"] = torch.randint(0, rows, batch["video_index"].shape, generator=generator)
    if "text_index" in batch:
        batch["text_index"] = torch.randint(0, model.stimuli.text.shape[0], batch["text_index"].shape, generator=generator)
    batch["window_onset"] = torch.rand(batch_size, dtype=torch.float64, generator=generator) * 10
    batch["fmri"] = torch.randn(batch_size, dims.n_voxels, generator=generator)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        total, _ = GibletLoss()(model(batch))
    del total
    return sum(seen.values())


def activation_bytes_per_sample(model: GibletAutoencoder) -> float:
    """Activation memory per sample: the growth from batch 2 to batch 4, halved (what is fixed cancels)."""
    return (activation_bytes(model, 4) - activation_bytes(model, 2)) / 2

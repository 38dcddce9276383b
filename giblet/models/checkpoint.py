"""Checkpoints that carry their architecture: ``load`` rebuilds the model without the original YAML.

A checkpoint is a plain dict of tensors, numbers and strings, read with
``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code.
Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from giblet.config import REMOVED, ModelConfig
from giblet.errors import DataError
from giblet.models.autoencoder import TRAINING_ONLY, GibletAutoencoder
from giblet.models.stimuli import ModelDims

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("best.pt", "last.pt")


def architecture(model: GibletAutoencoder) -> Dict[str, Any]:
    return {"dims": model.dims.to_dict(), "model": dataclasses.asdict(model.config), "n_units": model.n_units}


def save_checkpoint(model: GibletAutoencoder, path: Union[str, Path], inference_only: bool = False, **extra: Any) -> Path:
    """Write the model (weights, architecture, voxel grid) and ``extra`` entries atomically; ``inference_only``:
    without the training-only modality readouts (``GibletAutoencoder.inference_state_dict``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.inference_state_dict() if inference_only else model.state_dict()
    payload = {"format": FORMAT_VERSION, "architecture": architecture(model), "model": weights, **extra}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError from its writer
        if tmp.exists():
            tmp.unlink()  # before measuring: the partial file is not the disk's to count
        need = _tensor_bytes(payload) / 2**20  # weights, optimizer state, averages: everything the file holds
        free = shutil.disk_usage(path.parent).free / 2**20
        previous = path.is_file()
        raise DataError(
            path, f"could not be written ({str(error).splitlines()[0]}); {free:,.0f} MiB free on its disk",
            expected=f"room for about {need:,.0f} MiB (the weights{' and the optimizer state' if 'optimizer' in extra else ''})",
            fix="free disk space or write the run elsewhere, then continue with --resume: the checkpoint there before is intact"
            if previous else "free disk space or write the run elsewhere, then train again: no checkpoint of this run was written yet",
        ) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def find_checkpoint(run: Union[str, Path]) -> Path:
    """A checkpoint file, or the best (else last) one of a run folder."""
    run = Path(run)
    if run.is_file():
        return run
    for folder in (run / "checkpoints", run):
        for name in CHECKPOINT_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise DataError(run, "no checkpoint found", expected=f"a .pt file, or a run folder with checkpoints/{' or '.join(CHECKPOINT_NAMES)}")


def _loads(path: Path) -> bool:
    try:
        return path.is_file() and isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    except Exception:
        return False


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint's dict, loaded to the CPU with ``weights_only=True``."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refuses anything but tensors and plain values
        # torch's own text advises weights_only=False: wrong for a damaged file, unsafe for a hostile one. Keep its first line.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        intact = [other.name for other in (path.with_name(n) for n in CHECKPOINT_NAMES) if other != path and _loads(other)]
        raise DataError(path, f"is damaged or not a giblet checkpoint ({type(error).__name__}: {reason[:200]})",
                        expected="a checkpoint written by giblet (read without running any code it holds)",
                        fix=f"use {path.with_name(intact[0])}, which loads" if intact else
                            "retrain, or restore the file from a copy; never load it with weights_only=False") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise DataError(path, f"checkpoint format {payload.get('format') if isinstance(payload, dict) else '?'}",
                        expected=f"format {FORMAT_VERSION}")
    return payload


OPTIONAL_BUFFERS = ("l1_mel.mean", "l1_mel.std", "decoder_gain")
# Model settings that older checkpoints carry and the model no longer has (config.REMOVED lists every removed key):
# model.parcels is checked to be unset; the others are training-only or change no weight's shape, except the L1
# widths that are now model.slot_features, with which a checkpoint loads when each equals it (as every shipped file had),
# and the decoded frame size, now the store's frame size, with which it loads when the two were equal (the defaults).
REMOVED_SETTINGS = tuple(key.split(".", 1)[1] for key in REMOVED if key.startswith("model."))
MERGED_INTO_SLOT_FEATURES = ("code_features", "mel_features", "segment_features")
SETTINGS_BEFORE_THEY_EXISTED = {"stream_trunks": False}  # layers 4-6 were one fused trunk


def _model_settings(saved: Dict[str, Any], dims: ModelDims, path: Path) -> Dict[str, Any]:
    """The saved model settings, less the removed ones that ``ModelConfig`` no longer takes."""
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    decoded = (saved.get("decoded_frame_height", dims.frame_height), saved.get("decoded_frame_width", dims.frame_width))
    if dims.present("video") and decoded != (dims.frame_height, dims.frame_width):
        raise DataError(path, f"a model decoding {decoded[1]}x{decoded[0]} frames from a store of "
                        f"{dims.frame_width}x{dims.frame_height} frames",
                        expected="decoded frames the size of the store's (model.decoded_frame_width and _height were "
                                 "removed: layer 13 reconstructs the store's frames)",
                        fix="retrain with this version (set video.width and video.height to the size to decode)")
    slot = saved.get("slot_features", ModelConfig.slot_features)
    for key in MERGED_INTO_SLOT_FEATURES:
        if key in saved and saved[key] != slot:
            raise DataError(path, f"a model with model.{key} {saved[key]} and model.slot_features {slot}",
                            expected=f"one width for both (model.{key} is now model.slot_features)", fix="retrain with this version")
    settings = {key: value for key, value in saved.items() if key in fields or key not in REMOVED_SETTINGS}
    # Settings added since: the value that reproduces what a checkpoint from before them was (not today's default).
    return {**SETTINGS_BEFORE_THEY_EXISTED, **settings}


def load(run: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> GibletAutoencoder:
    """Rebuild the model of a run folder (or checkpoint file) from the architecture stored inside it."""
    path = find_checkpoint(run)
    payload = read_checkpoint(path)
    arch = payload["architecture"]
    dims = ModelDims.from_dict(arch["dims"])
    state = payload["model"]
    if "parcel_of_voxel" in state or (arch["model"].get("parcels") or None) is not None:
        raise DataError(path, "checkpoint of a parcel model (one layer-7 unit per parcel)",
                        expected="a model with one layer-7 unit per voxel: parcel models are no longer supported")
    config = ModelConfig(**_model_settings(arch["model"], dims, path))
    model = GibletAutoencoder(dims, config)
    # The grid buffers are sized by the store's mask; make room before loading them.
    model.grid_mask = torch.empty_like(state["grid_mask"])
    if model.linear_weight is not None and "linear_weight" in state:
        model.linear_weight = torch.empty_like(state["linear_weight"])  # sized by the store's regressors
    if model.modality_readouts is not None and not any(key.startswith(TRAINING_ONLY) for key in state):
        model.modality_readouts = None  # saved for inference (best.pt): the readouts only ever served training
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Checkpoints from before the mel input was standardized have no statistics: they read raw mel (mean 0, std 1).
    missing = [key for key in missing if key not in OPTIONAL_BUFFERS]
    if missing or unexpected:
        raise DataError(path, f"model weights that do not fit its architecture (missing {missing}, "
                        f"unexpected {unexpected})", expected="a checkpoint written by this version of giblet")
    return model.to(device) if device is not None else model

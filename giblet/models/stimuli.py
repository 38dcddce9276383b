"""What the model reads the windows from: the store's streams as tensors, and the sizes of the data.

``ModelDims`` is every data dimension the model needs, read from a store's
manifest (never typed by hand). ``Stimuli`` holds the stream tables the native
ops gather from: frames stay uint8, codes int16, embeddings as stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from giblet.linear import hrf_regressors, regressor_parts

MODALITIES = ("video", "codes", "mel", "text")
# The input (model.inputs; the linear models' regressor block) each modality belongs to: codes and mel are audio.
INPUT_OF = {"video": "video", "codes": "audio", "mel": "audio", "text": "text"}


@dataclass(frozen=True)
class ModelDims:
    """Data dimensions of a store; a modality with 0 slots is absent."""

    n_voxels: int
    window_s: float
    video_slots: int = 0
    frame_height: int = 0
    frame_width: int = 0
    code_slots: int = 0
    n_codebooks: int = 0
    codebook_size: int = 0
    code_rate_hz: float = 0.0
    code_start_s: float = 0.0
    mel_slots: int = 0
    n_mels: int = 0
    mel_rate_hz: float = 0.0
    mel_start_s: float = 0.0
    text_slots: int = 0
    embedding_size: int = 0

    @property
    def frame_size(self) -> int:
        return self.frame_height * self.frame_width * 3

    def present(self, modality: str) -> bool:
        return getattr(self, f"{modality if modality != 'codes' else 'code'}_slots") > 0

    def without(self, modality: str) -> "ModelDims":
        return dataclasses.replace(self, **{f"{modality if modality != 'codes' else 'code'}_slots": 0})

    def restricted_to(self, inputs: Sequence[str]) -> "ModelDims":
        """These dimensions with no slots for the input modalities (video, audio, text) not in ``inputs``."""
        dims = self
        for stream, name in INPUT_OF.items():
            if name not in inputs:
                dims = dims.without(stream)
        return dims

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelDims":
        return cls(**values)


def dims_from_manifest(manifest: Dict[str, Any], audio_input: str = "auto",
                       inputs: Sequence[str] = ("video", "audio", "text")) -> ModelDims:
    """The model's data dimensions from a store's manifest.

    ``audio_input``: ``codes`` or ``mel`` (the store must have it), or ``auto``: codes
    when the store has them, else mel, else no audio. ``inputs``: the modalities the
    model reads (``video``, ``audio``, ``text``); the others get no slots.
    """
    window = manifest["window"]
    video, audio, text = manifest["video"], manifest["audio"], manifest["text"]
    has_codes, has_mel = "codes" in audio, "mel" in audio
    if "audio" not in inputs:
        audio_input = "none"
    elif audio_input == "auto":
        audio_input = "codes" if has_codes else "mel" if has_mel else "none"
    if audio_input == "codes" and not has_codes or audio_input == "mel" and not has_mel:
        from giblet.errors import ConfigError

        raise ConfigError(
            f"model.audio_input is {audio_input!r} but the store has audio features {audio.get('features', [])}; "
            f"expected one the store has (set audio.features in the data settings and prepare again)"
        )
    values: Dict[str, Any] = dict(
        n_voxels=manifest["fmri"]["n_voxels"],
        window_s=window["window_s"],
        video_slots=window["video_slots"],
        frame_height=video["shape"][1],
        frame_width=video["shape"][2],
        text_slots=window["text_slots"],
        embedding_size=text["embedding_size"],
    )
    if audio_input == "codes":
        c = audio["codes"]
        values.update(
            code_slots=window["code_slots"], n_codebooks=c["n_codebooks"], codebook_size=c["codebook_size"],
            code_rate_hz=c["rate_hz"], code_start_s=c["start_s"],
        )
    elif audio_input == "mel":
        m = audio["mel"]
        values.update(mel_slots=window["mel_slots"], n_mels=m["n_mels"], mel_rate_hz=m["rate_hz"], mel_start_s=m["start_s"])
    return ModelDims(**values).restricted_to(inputs)


@dataclass
class Stimuli:
    """The stream tables of one store, on one device.

    ``frames`` uint8 (n_frames, H*W*3) rows for ``gather_project``, of ``frame_shape`` (H, W) frames;
    ``frame_targets`` (a property) the same table channel-first, the decoder's targets: a view, so the table is
    held once on any device;
    ``codes`` int16 (n_codebooks, n_code_frames); ``mel`` float32 (n_mel_frames, n_mels);
    ``text`` (n_segments, embedding_size) as stored; ``regressors`` float32 (n_TRs, features): the fixed
    per-TR features through the HRF that a model's linear branch reads (``model.linear_branch``), or None.
    """

    frames: Optional[torch.Tensor]
    frame_shape: Tuple[int, int]
    codes: Optional[torch.Tensor]
    mel: Optional[torch.Tensor]
    text: Optional[torch.Tensor]
    regressors: Optional[torch.Tensor] = None

    @property
    def frame_targets(self) -> Optional[torch.Tensor]:
        """uint8 (n_frames, 3, H, W): ``frames`` channel-first, as the decoder reconstructs them (a view)."""
        if self.frames is None:
            return None
        return self.frames.view(-1, *self.frame_shape, 3).permute(0, 3, 1, 2)

    @classmethod
    def from_store(cls, store, dims: ModelDims, hrf: Optional[str] = None) -> "Stimuli":
        """The tables of ``store`` for a model with ``dims``; with ``hrf`` (a canonical HRF name) also the
        regressors of a linear branch (``giblet.linear.hrf_regressors`` of ``regressor_parts``)."""
        frames = codes = mel = text = None
        if dims.present("video"):
            array = store.frames()
            # Read-only memmap: torch wants writable memory, and a copy keeps the table in RAM (uint8, 62 MB at
            # sherlock-scale's 35,650 frames of 32x18).
            frames = torch.from_numpy(np.array(array).reshape(array.shape[0], -1))
        if dims.present("codes"):
            codes = torch.from_numpy(np.array(store.codes()))
        if dims.present("mel"):
            mel = torch.from_numpy(np.asarray(store.mel(), dtype=np.float32))
        if dims.present("text"):
            text = torch.from_numpy(np.asarray(store.text_embeddings(), dtype=np.float32))
        stimuli = cls(frames, (dims.frame_height, dims.frame_width), codes, mel, text)
        if hrf is not None:
            parts = regressor_parts(store, stimuli.frame_targets)
            stimuli.regressors = torch.from_numpy(hrf_regressors(store, parts, hrf))
        return stimuli

    @classmethod
    def placeholder(cls, dims: ModelDims, n_rows: int = 8, n_regressors: int = 0) -> "Stimuli":
        """Zero tables with the right widths: enough to trace shapes (the layer table) without a store."""
        return cls(
            torch.zeros((n_rows, dims.frame_size), dtype=torch.uint8) if dims.present("video") else None,
            (dims.frame_height, dims.frame_width),
            torch.zeros((max(dims.n_codebooks, 1), n_rows), dtype=torch.int16) if dims.present("codes") else None,
            torch.zeros((n_rows, max(dims.n_mels, 1)), dtype=torch.float32) if dims.present("mel") else None,
            torch.zeros((n_rows, max(dims.embedding_size, 1)), dtype=torch.float32) if dims.present("text") else None,
            torch.zeros((n_rows, n_regressors), dtype=torch.float32) if n_regressors else None,
        )

    def to(self, device) -> "Stimuli":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Stimuli(move(self.frames), self.frame_shape, move(self.codes), move(self.mel), move(self.text),
                       move(self.regressors))

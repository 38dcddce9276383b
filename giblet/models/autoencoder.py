"""The 13-layer multimodal autoencoder whose layer 7 is the brain.

::

    L1  per modality: frames -> gather_project (shared per-frame projection, uint8 in memory);
        codes -> resample_codes + per-codebook embeddings; mel -> grid_average + shared projection;
        segments -> gather_project (shared per-segment projection)
    L2  per modality: slots concatenated -> one modality vector
    L3  fusion: modality vectors concatenated
    L4-L6  encoder blocks (Linear, LayerNorm, GELU, dropout)
    L7  bottleneck = brain space: one unit per voxel, identity activation,
        lesion mask (native bottleneck op); the fMRI loss is applied here; the decoder
        reads it detached (the reconstruction gradient never reaches L1-L7)
    L8-L10 decoder blocks
    L11 split per modality
    L12 modality decoders: one vector per slot
    L13 outputs: every frame slot (sigmoid, small frames), per-codebook code logits,
        mel frames, segment embeddings

Every layer is a named module (``l1_video`` ... ``l13_text``), so ``layer_table``
can list them with their shapes and parameter counts.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from giblet import ops
from giblet.config import ModelConfig
from giblet.models.stimuli import INPUT_OF, MODALITIES, ModelDims, Stimuli

Batch = Dict[str, torch.Tensor]


class Block(nn.Module):
    """Linear, LayerNorm, GELU, dropout: one encoder or decoder layer (LayerNorm, not BatchNorm: batches are small)."""

    def __init__(self, width_in: int, width_out: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)
        self.norm = nn.LayerNorm(width_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.gelu(self.norm(self.linear(x))))


class GatherProjection(nn.Module):
    """L1 for table rows (frames, segment embeddings): ``gather_project`` with a shared projection."""

    def __init__(self, row_size: int, features: int, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, row_size) / math.sqrt(row_size))
        self.bias = nn.Parameter(torch.zeros(features))
        self.scale, self.shift = scale, shift

    def forward(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.gelu(ops.gather_project(table, index, self.weight, self.bias, self.scale, self.shift))


class CodeEmbedding(nn.Module):
    """L1 for EnCodec codes: one embedding table per codebook, summed over the codebooks of a code frame."""

    def __init__(self, n_codebooks: int, codebook_size: int, features: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.pad = n_codebooks * codebook_size  # one shared row for "no code here"
        self.embedding = nn.Embedding(self.pad + 1, features, padding_idx=self.pad)
        self.register_buffer("offsets", torch.arange(n_codebooks).view(1, n_codebooks, 1) * codebook_size, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (B, n_codebooks, slots)`` int64, -1 = pad -> ``(B, slots, features)``."""
        ids = torch.where(codes < 0, torch.full_like(codes, self.pad), codes + self.offsets)
        return F.gelu(self.embedding(ids).sum(dim=1))


class SlotProjection(nn.Module):
    """L1 for mel slots: a shared projection of each slot's averaged mel frame, standardized per band.

    Log-mel frames are decibels (about -100 to +20): unscaled, they would put the projection
    far outside GELU's curved range. The band means and deviations are buffers, set from the
    training split by ``set_input_statistics`` and saved with the weights.
    """

    def __init__(self, n_mels: int, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_mels, features)
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear((mel - self.mean.to(mel.dtype)) / self.std.to(mel.dtype)))


class TemporalConcat(nn.Module):
    """L2: the slots of a window concatenated in time order, projected to one modality vector.

    With ``kernels`` = 0 every (slot, feature) pair has its own weight. With ``kernels`` = k > 0
    the slots are first weighted by k temporal kernels shared by all features (k x slots
    weights, like a learned HRF basis), and only the k x features result is projected: the
    same map with far fewer parameters, for datasets too short to learn a time course per feature.
    The LayerNorm puts every modality on the same footing at fusion, whatever the scale
    of its input (uint8 pixels, log-mel decibels, unit-norm embeddings).
    """

    def __init__(self, slots: int, features: int, width: int, kernels: int = 0) -> None:
        super().__init__()
        if kernels > 0:
            self.kernels = nn.Parameter(torch.randn(slots, kernels) / math.sqrt(slots))
        else:
            self.kernels = None
        self.linear = nn.Linear((kernels or slots) * features, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            slots = torch.einsum("bsf,sk->bkf", slots, self.kernels.to(slots.dtype))
        return F.gelu(self.norm(self.linear(slots.flatten(1))))


class Fusion(nn.Module):
    """L3: the modality vectors side by side (a module of its own so the layer table can trace it)."""

    def forward(self, vectors: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(vectors, dim=1)


class Brain(nn.Module):
    """L7: one unit per voxel; native ``bottleneck`` with identity activation and the lesion mask.

    With one trunk per modality (``model.stream_trunks``) it reads a list of their L6 outputs, each through its
    own block of columns, times each unit's gate for that trunk: ``(trunks, units)``."""

    def __init__(self, width_in: int, n_units: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_units, width_in) / math.sqrt(width_in))
        self.bias = nn.Parameter(torch.zeros(n_units))
        self.register_buffer("keep", torch.ones(n_units, dtype=torch.bool))

    def forward(self, x: Union[torch.Tensor, List[torch.Tensor]], gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return ops.bottleneck(x, self.weight, self.bias, self.keep, "identity")
        brain, share = self.bias, self.weight.shape[1] // len(x)
        for i, trunk in enumerate(x):
            brain = brain + F.linear(trunk, self.weight[:, i * share : (i + 1) * share]) * gate[i]
        return brain * self.keep.to(brain.dtype)


class SlotDecoder(nn.Module):
    """L12: a modality's vector -> one feature vector per slot."""

    def __init__(self, width: int, slots: int, features: int) -> None:
        super().__init__()
        self.slots, self.features = slots, features
        self.linear = nn.Linear(width, slots * features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(x)).view(x.shape[0], self.slots, self.features)


class Head(nn.Module):
    """L13: a shared output layer applied to every slot."""

    def __init__(self, features: int, shape: Tuple[int, ...], sigmoid: bool = False) -> None:
        super().__init__()
        self.shape, self.sigmoid = shape, sigmoid
        self.linear = nn.Linear(features, math.prod(shape))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        out = self.linear(slots).view(*slots.shape[:2], *self.shape)
        # In place: the frames are the largest output (a lesion sweep decodes 16 x batch of them at once), and a
        # second buffer of that size costs more in fresh pages than the sigmoid itself. The linear's backward does
        # not need its output, so autograd allows it.
        return out.sigmoid_() if self.sigmoid else out


# The modules only training reads (model.modality_readouts): left out of an inference checkpoint.
TRAINING_ONLY = "modality_readouts."

CHANCE_SPREADS = 2.0  # how many spreads of chance r a voxel's r must pass for the decoder to read its unit


def chance_spread(reliability: np.ndarray) -> float:
    """The spread of r that chance alone gives a voxel: the root mean square of the negative r's. A voxel the
    stimulus does not drive has a cross-fitted r spread about 0, so the negative half of the map is chance and
    its spread is chance's, whatever the TR count and the noise's autocorrelation; 0 when no r is negative."""
    negative = reliability[reliability < 0]
    return float(np.sqrt(np.mean(negative**2))) if negative.size else 0.0


def decoder_gain(reliability: np.ndarray) -> np.ndarray:
    """Each unit's weight into the decoder: its voxel's r where r passes ``CHANCE_SPREADS`` spreads of chance
    (``chance_spread``), else 0. A voxel of noise still has a layer-7 unit (ridge-fit noise, a function of the
    stimulus like any other unit) that the decoder could read and a lesion map would then show; weighting by r
    alone leaves noise voxels with chance r (0.1-0.3 on 150 training TRs) as much weight as poorly predicted
    signal voxels."""
    reliability = np.asarray(reliability, dtype=np.float64)
    return np.where(reliability > CHANCE_SPREADS * chance_spread(reliability), reliability, 0.0)


class GibletAutoencoder(nn.Module):
    """Stimulus windows -> brain (L7, one unit per voxel) -> reconstructed windows.

    ``encode(batch) -> brain (B, units)``, ``decode(brain) -> reconstructions``,
    ``forward(batch) -> {"brain", "reconstructions", "targets"}``. The stream tables
    come from ``attach(Stimuli)``: they are data, not parameters, so they are neither
    saved in checkpoints nor broadcast by DDP.
    """

    def __init__(self, dims: ModelDims, config: Optional[ModelConfig] = None):
        super().__init__()
        config = config or ModelConfig()
        self.dims, self.config = dims, config
        self.modalities = [m for m in MODALITIES if dims.present(m)]
        if not self.modalities:
            raise ValueError("the model needs at least one input modality; the store has none")
        width = config.modality_width
        if dims.present("video"):
            self.l1_video = GatherProjection(dims.frame_size, config.frame_features, scale=1 / 255, shift=-0.5)
            self.l2_video = TemporalConcat(dims.video_slots, config.frame_features, width, config.temporal_kernels)
        if dims.present("codes"):
            self.l1_codes = CodeEmbedding(dims.n_codebooks, dims.codebook_size, config.slot_features)
            self.l2_codes = TemporalConcat(dims.code_slots, config.slot_features, width, config.temporal_kernels)
        if dims.present("mel"):
            self.l1_mel = SlotProjection(dims.n_mels, config.slot_features)
            self.l2_mel = TemporalConcat(dims.mel_slots, config.slot_features, width, config.temporal_kernels)
        if dims.present("text"):
            self.l1_text = GatherProjection(dims.embedding_size, config.slot_features)
            self.l2_text = TemporalConcat(dims.text_slots, config.slot_features, width, config.temporal_kernels)
        self.l3_fusion = Fusion()
        self.n_units = dims.n_voxels
        # Training only (deep supervision of L2): each modality vector alone, read out to layer 7's units.
        self.modality_readouts = (
            nn.ModuleDict({m: nn.Linear(width, self.n_units) for m in self.modalities}) if config.modality_readouts else None
        )
        hidden = list(config.hidden)
        if config.stream_trunks:
            share = [-(-h // len(self.modalities)) for h in hidden]
            widths = [width] + share
            self.l4_l6 = nn.ModuleDict({
                m: nn.ModuleList(Block(widths[i], widths[i + 1], config.dropout) for i in range(len(hidden)))
                for m in self.modalities
            })
            # Columns [i * share, (i + 1) * share) of layer 7's weight read modality i's trunk.
            self.l7_brain = Brain(share[-1] * len(self.modalities), self.n_units)
            self.register_buffer("stream_gate", torch.ones(len(self.modalities), self.n_units))
        else:
            widths = [width * len(self.modalities)] + hidden
            self.l4_l6 = nn.ModuleList(Block(widths[i], widths[i + 1], config.dropout) for i in range(len(hidden)))
            self.l7_brain = Brain(hidden[-1], self.n_units)
            self.stream_gate = None
        if config.linear_branch:
            # Empty until set_linear_branch: the width is the store's number of regressors.
            self.register_buffer("linear_weight", torch.zeros(0, self.n_units))
            self.register_buffer("linear_bias", torch.zeros(self.n_units))
            # The network starts at 0: layer 7 begins as the linear model and learns what it misses.
            nn.init.zeros_(self.l7_brain.weight)
        else:
            self.linear_weight = self.linear_bias = None
        back = [self.n_units] + hidden[::-1]
        self.l8_l10 = nn.ModuleList(Block(back[i], back[i + 1], config.dropout) for i in range(len(hidden)))
        self.l11_split = nn.Linear(hidden[0], width * len(self.modalities))
        h, w = dims.frame_height, dims.frame_width  # L13 reconstructs the store's frames
        slot = config.slot_features
        if dims.present("video"):
            self.l12_video = SlotDecoder(width, dims.video_slots, slot)
            self.l13_video = Head(slot, (3, h, w), sigmoid=True)
        if dims.present("codes"):
            self.l12_codes = SlotDecoder(width, dims.code_slots, slot)
            self.l13_codes = Head(slot, (dims.n_codebooks, dims.codebook_size))
        if dims.present("mel"):
            self.l12_mel = SlotDecoder(width, dims.mel_slots, slot)
            self.l13_mel = Head(slot, (dims.n_mels,))
        if dims.present("text"):
            self.l12_text = SlotDecoder(width, dims.text_slots, slot)
            self.l13_text = Head(slot, (dims.embedding_size,))
        self.register_buffer("grid_mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("grid_affine", torch.eye(4, dtype=torch.float64))
        # Each unit's weight into the decoder (set_decoder_gain); 1 = read as is.
        self.register_buffer("decoder_gain", torch.ones(self.n_units))
        self.stimuli: Optional[Stimuli] = None

    # ------------------------------------------------------------------ data

    def attach(self, stimuli: Stimuli) -> "GibletAutoencoder":
        """Use these stream tables (move them to the model's device first)."""
        self.stimuli = stimuli
        return self

    def set_input_statistics(self, mel_mean: Sequence[float], mel_std: Sequence[float]) -> None:
        """Per-band mel statistics of the training split (``LossScales.mel_mean``, ``mel_std``) for L1's input."""
        if "mel" in self.modalities and len(mel_mean):
            self.l1_mel.mean.copy_(torch.as_tensor(mel_mean, dtype=torch.float32))
            self.l1_mel.std.copy_(torch.as_tensor(mel_std, dtype=torch.float32))

    def set_decoder_gain(self, reliability) -> None:
        """Read unit v into the decoder as ``brain[v] * decoder_gain(reliability)[v]`` (``LinearPrior.reliability``:
        the linear model's cross-fitted r of the voxel on the training TRs). Layer 7 itself, the fMRI loss and the
        prediction are unchanged; only what the decoder (and so a lesion) reads of each unit is."""
        values = np.asarray(reliability, dtype=np.float64)
        if values.shape != (self.n_units,):
            raise ValueError(f"reliability has shape {values.shape}; expected ({self.n_units},), one value per unit")
        gain = torch.as_tensor(decoder_gain(values), dtype=torch.float32)
        self.decoder_gain.copy_(gain.to(self.decoder_gain.device))

    def set_stream_gate(self, block_weights: Dict[str, np.ndarray]) -> None:
        """How much each unit reads each modality's trunk (``model.stream_trunks``): ``block_weights`` is the banded
        ridge's ``{video, audio, text: (units,)}`` kernel weights (``LinearPrior.block_weights``; audio serves codes
        or mel); unit v reads trunk m by its block's weight over the largest block's weight at v."""
        if self.stream_gate is None:
            raise RuntimeError("this model has one fused trunk (model.stream_trunks is false): there is no stream gate")
        blocks = [INPUT_OF[m] for m in self.modalities]
        missing = [b for b in blocks if b not in block_weights]
        if missing:
            raise ValueError(f"block weights for {sorted(block_weights)}; the model's streams need {missing} too")
        rows = np.stack([np.asarray(block_weights[b], dtype=np.float64) for b in blocks])
        if rows.shape != (len(blocks), self.n_units) or not np.all(rows >= 0) or not np.all(rows.max(axis=0) > 0):
            raise ValueError(f"block weights of shape {rows.shape}; expected ({len(blocks)}, {self.n_units}), >= 0 with a "
                             f"positive weight at every unit")
        gate = torch.as_tensor(rows / rows.max(axis=0, keepdims=True), dtype=torch.float32)
        self.stream_gate.copy_(gate.to(self.stream_gate.device))

    def set_linear_branch(self, weight, bias) -> None:
        """The linear branch's map: ``weight (regressors, units)``, ``bias (units,)`` (``banded_linear_map``)."""
        if self.linear_weight is None:
            raise RuntimeError("this model has no linear branch (model.linear_branch is false)")
        weight = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
        bias = torch.as_tensor(np.asarray(bias), dtype=torch.float32)
        if weight.dim() != 2 or weight.shape[1] != self.n_units or bias.shape != (self.n_units,):
            raise ValueError(f"linear branch weight {tuple(weight.shape)} / bias {tuple(bias.shape)}; "
                             f"expected (regressors, {self.n_units}) / ({self.n_units},)")
        device = self.linear_bias.device
        self.linear_weight, self.linear_bias = weight.to(device), bias.to(device)

    def _linear(self, batch: Batch) -> torch.Tensor:
        """The linear branch's prediction for the batch's TRs, ``(B, units)``."""
        regressors = self.stimuli.regressors
        if regressors is None or regressors.shape[1] != self.linear_weight.shape[0]:
            raise RuntimeError(
                f"the model's linear branch reads {self.linear_weight.shape[0]} regressors per TR; attach "
                f"Stimuli.from_store(store, dims, hrf=<the run's alignment.hrf>) (got "
                f"{None if regressors is None else regressors.shape[1]})"
            )
        return torch.addmm(self.linear_bias, regressors[batch["tr"]], self.linear_weight)

    def set_grid(self, mask: np.ndarray, affine: np.ndarray) -> None:
        """The voxel grid of the units (the store's mask and affine), for lesions given as ROI images."""
        self.grid_mask = torch.as_tensor(np.asarray(mask, dtype=bool))
        self.grid_affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))

    def _windows(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Each modality's window contents: what L1 reads and what L13 is compared with."""
        stimuli, dims = self.stimuli, self.dims
        if stimuli is None:
            raise RuntimeError("no stream tables attached: call model.attach(Stimuli.from_store(...)) first")
        windows: Dict[str, torch.Tensor] = {}
        onsets = batch["window_onset"]
        if dims.present("codes"):
            windows["codes"] = ops.resample_codes(
                stimuli.codes, dims.code_rate_hz, onsets - dims.code_start_s, dims.window_s, dims.code_slots, -1
            )
        if dims.present("mel"):
            windows["mel"] = ops.grid_average(stimuli.mel, dims.mel_rate_hz, onsets - dims.mel_start_s, dims.window_s, dims.mel_slots)
        return windows

    # ------------------------------------------------------------------ passes

    def _encode(self, batch: Batch, windows: Dict[str, torch.Tensor],
                vectors_out: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """Layer 7; ``vectors_out``, if given, receives each modality's L2 vector."""
        stimuli = self.stimuli
        vectors = []
        for modality in self.modalities:
            if modality == "video":
                slots = self.l1_video(stimuli.frames, batch["video_index"])
            elif modality == "codes":
                slots = self.l1_codes(windows["codes"])
            elif modality == "mel":
                slots = self.l1_mel(windows["mel"])
            else:
                slots = self.l1_text(stimuli.text, batch["text_index"])
            vectors.append(getattr(self, f"l2_{modality}")(slots))
        if vectors_out is not None:
            vectors_out.update(zip(self.modalities, vectors))
        if self.stream_gate is not None:
            brain = self._stream_brain(vectors)
        else:
            x = self.l3_fusion(vectors)
            for block in self.l4_l6:
                x = block(x)
            brain = self.l7_brain(x)
        if self.linear_weight is not None and self.linear_weight.numel():
            # Lesioned units stay exactly 0: the branch is silenced with them.
            brain = brain + self._linear(batch).to(brain.dtype) * self.l7_brain.keep.to(brain.dtype)
        return brain

    def _stream_brain(self, vectors: List[torch.Tensor]) -> torch.Tensor:
        """Layer 7 from one trunk per modality: unit v = bias_v + the sum over modalities m of gate[m, v] x trunk
        m's L6 output through its columns of the weight; lesioned units 0."""
        trunks = []
        for modality, x in zip(self.modalities, vectors):
            for block in self.l4_l6[modality]:
                x = block(x)
            trunks.append(x)
        return self.l7_brain(trunks, self.stream_gate)

    def encode(self, batch: Batch) -> torch.Tensor:
        """Layer 7 for a batch of windows: ``(B, units)``, lesioned units exactly 0."""
        return self._encode(batch, self._windows(batch))

    def decode(self, brain: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Reconstructions from layer 7: ``video (B, S, 3, h, w)`` in [0, 1], ``codes (B, S, n_codebooks, K)``
        logits, ``mel (B, S, n_mels)``, ``text (B, S, embedding_size)``."""
        x = brain * self.decoder_gain.to(brain.dtype)
        for block in self.l8_l10:
            x = block(x)
        return self._decode_after_l10(x)

    def decode_silenced(self, brain: torch.Tensor, silenced: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``decode(brain * ~silenced[k])`` for each of ``K`` unit sets at once: ``silenced (K, units)`` bool, the
        outputs ``(K * B, ...)`` lesion-major (rows ``k * B .. (k + 1) * B`` are set ``k``'s). One call of
        ``silenced_decoder``: a sweep over many chunks of sets should hold on to that."""
        return self.silenced_decoder(brain)(silenced)

    def silenced_decoder(self, brain: torch.Tensor) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
        """A function that decodes ``brain`` with each of a chunk of unit sets silenced (as ``decode_silenced``).

        Layer 8's product runs here, once, on the intact layer 7; each set's share is then subtracted from it
        (``B x |set| x width``; a set of more than half the units: the kept units' share added to the bias), so a
        sweep over many lesions costs one layer-8 product per batch plus the narrow layers after it per lesion, not
        a full decoder pass each. Equal to the one-by-one decode up to float rounding (the sums run in another
        order).
        """
        first = self.l8_l10[0]
        gained = brain * self.decoder_gain.to(brain.dtype)
        product = first.linear(gained)  # (B, width)
        rows = first.linear.weight.T.contiguous()  # (units, width): a set's rows are gathered, not strided columns

        def decode(silenced: torch.Tensor) -> Dict[str, torch.Tensor]:
            if silenced.dim() != 2 or silenced.shape[1] != self.n_units or silenced.dtype != torch.bool:
                raise ValueError(f"silenced must be bool (sets, {self.n_units}); got {silenced.dtype} {tuple(silenced.shape)}")
            inputs = []
            for units in silenced:
                index = units.nonzero().squeeze(1)
                if 2 * index.numel() <= self.n_units:
                    inputs.append(product - gained.index_select(1, index) @ rows.index_select(0, index))
                else:  # most units silenced: the kept ones added up, fewer of them and no cancellation (all: the bias alone)
                    kept = (~units).nonzero().squeeze(1)
                    inputs.append(first.linear.bias + gained.index_select(1, kept) @ rows.index_select(0, kept))
            x = torch.stack(inputs).reshape(-1, product.shape[1])
            x = first.dropout(F.gelu(first.norm(x)))
            for block in self.l8_l10[1:]:
                x = block(x)
            return self._decode_after_l10(x)

        return decode

    def _decode_after_l10(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        parts = self.l11_split(x).chunk(len(self.modalities), dim=1)
        out = {}
        for modality, part in zip(self.modalities, parts):
            out[modality] = getattr(self, f"l13_{modality}")(getattr(self, f"l12_{modality}")(part))
        return out

    @torch.no_grad()
    def targets(self, batch: Batch, windows: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """What each output is compared with, and which slots hold something."""
        windows = self._windows(batch) if windows is None else windows
        stimuli, out = self.stimuli, {}
        fmri = batch.get("fmri")
        if fmri is not None:
            out["fmri"] = fmri.float()  # one layer-7 unit per voxel: the response itself
        if "video" in self.modalities:
            index = batch["video_index"]
            frames = stimuli.frame_targets[index.clamp(min=0)].float() / 255.0
            out["video"], out["video_valid"] = frames, index >= 0
        if "codes" in self.modalities:
            out["codes"] = windows["codes"].transpose(1, 2)  # (B, slots, n_codebooks), -1 = pad
        if "mel" in self.modalities:
            out["mel"] = windows["mel"]
        if "text" in self.modalities:
            index = batch["text_index"]
            out["text"], out["text_valid"] = stimuli.text[index.clamp(min=0)].float(), index >= 0
        return out

    def forward(self, batch: Batch) -> Dict[str, object]:
        windows = self._windows(batch)
        vectors: Dict[str, torch.Tensor] = {}
        brain = self._encode(batch, windows, vectors)
        # The decoder learns to read layer 7 without bending it: the reconstruction losses' gradient stops here,
        # so layers 1-7 learn from the fMRI terms alone.
        out = {"brain": brain, "reconstructions": self.decode(brain.detach()), "targets": self.targets(batch, windows)}
        if self.modality_readouts is not None and self.training:
            out["modality_brain"] = {m: self.modality_readouts[m](vector) for m, vector in vectors.items()}
        return out

    # ------------------------------------------------------------------ lesions

    def lesion_mask(self, spec: Union[torch.Tensor, np.ndarray, Sequence[int], str]) -> torch.Tensor:
        """Units to silence, as bool ``(units,)``, from a bool vector, unit indices, or an ROI NIfTI path.

        An ROI image is read onto the model's voxel grid (``set_grid``) by ``giblet.data.volume.load_roi``:
        as is on the same grid, resampled by nearest neighbour (with a warning) from another; value > 0 is in.
        """
        if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
            from giblet.data.volume import load_roi

            if self.grid_mask.numel() == 0:
                raise RuntimeError("the model has no voxel grid: call model.set_grid(mask, affine) with the store's mask")
            spec = os.fsdecode(spec)
            voxels = load_roi(spec, (self.grid_mask.cpu().numpy(), self.grid_affine.cpu().numpy()))
            return torch.from_numpy(voxels).to(self.l7_brain.keep.device)
        tensor = torch.as_tensor(np.asarray(spec))
        if tensor.dtype == torch.bool:
            if tensor.shape != (self.n_units,):
                raise ValueError(f"a bool lesion mask must have shape ({self.n_units},), got {tuple(tensor.shape)}")
            return tensor.to(self.l7_brain.keep.device)
        indices = tensor.to(torch.int64).flatten()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.n_units):
            raise ValueError(f"lesion unit indices must be in [0, {self.n_units}), got {indices.min()}..{indices.max()}")
        mask = torch.zeros(self.n_units, dtype=torch.bool)
        mask[indices] = True
        return mask.to(self.l7_brain.keep.device)

    def set_lesion(self, spec=None) -> None:
        """Silence these units from now on (None: none)."""
        keep = torch.ones_like(self.l7_brain.keep)
        if spec is not None:
            keep &= ~self.lesion_mask(spec)
        self.l7_brain.keep.copy_(keep)

    @contextlib.contextmanager
    def lesion(self, spec) -> Iterator["GibletAutoencoder"]:
        """``with model.lesion(mask): ...``: units silenced inside the block only."""
        before = self.l7_brain.keep.clone()
        self.l7_brain.keep.copy_(before & ~self.lesion_mask(spec))
        try:
            yield self
        finally:
            self.l7_brain.keep.copy_(before)

    # ------------------------------------------------------------------ description

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """``state_dict`` less the training-only modality readouts: what predicting, evaluating and lesioning read
        (at Sherlock's shapes the readouts are 66 M of the 159 M parameters)."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith(TRAINING_ONLY)}

    def layer_table(self, batch_size: int = 1) -> List[Tuple[str, str, str, int]]:
        """(layer, input shape, output shape, parameters) for every named layer, traced with placeholder tables."""
        entries = []
        for name, module in self.named_children():
            if name == "l4_l6" and isinstance(module, nn.ModuleDict):  # one trunk per modality
                entries += [(f"L{4 + i} encoder {m}", layer) for m, trunk in module.items() for i, layer in enumerate(trunk)]
            elif name in ("l4_l6", "l8_l10"):
                first, kind = (4, "encoder") if name == "l4_l6" else (8, "decoder")
                entries += [(f"L{first + i} {kind}", layer) for i, layer in enumerate(module)]
            elif name[0] == "l" and name[1:].split("_")[0].isdigit():
                number, what = name[1:].split("_", 1)
                entries.append((f"L{number} {what}", module))
        entries.sort(key=lambda entry: int(entry[0].split()[0][1:]))  # stable: modalities keep their order

        def shape(value) -> str:
            if isinstance(value, torch.Tensor):
                return "x".join(str(d) for d in value.shape)
            if isinstance(value, (list, tuple)):
                return " + ".join(filter(None, (shape(v) for v in value)))
            return ""

        shapes: Dict[str, Tuple[str, str]] = {}
        hooks = [
            module.register_forward_hook(lambda _m, i, o, label=label: shapes.__setitem__(label, (shape(i), shape(o))))
            for label, module in entries
        ]
        saved_stimuli, was_training = self.stimuli, self.training
        device = self.l7_brain.weight.device
        branch = self.linear_weight.shape[0] if self.linear_weight is not None else 0
        self.attach(Stimuli.placeholder(self.dims, n_regressors=branch).to(device))
        try:
            self.eval()
            with torch.no_grad():
                self.decode(self.encode(_placeholder_batch(self.dims, batch_size, device)))
        finally:
            for handle in hooks:
                handle.remove()
            self.stimuli = saved_stimuli
            self.train(was_training)
        return [(label, *shapes.get(label, ("", "")), sum(p.numel() for p in module.parameters())) for label, module in entries]


def _placeholder_batch(dims: ModelDims, batch_size: int, device) -> Batch:
    batch: Batch = {"window_onset": torch.zeros(batch_size, dtype=torch.float64, device=device),
                    "tr": torch.zeros(batch_size, dtype=torch.int64, device=device)}
    if dims.present("video"):
        batch["video_index"] = torch.zeros(batch_size, dims.video_slots, dtype=torch.int64, device=device)
    if dims.present("text"):
        batch["text_index"] = torch.zeros(batch_size, dims.text_slots, dtype=torch.int64, device=device)
    return batch

"""Every loss of the model in one place, computed in float32 (also under bf16 autocast).

- fMRI, at layer 7: MSE against the z-scored targets, plus optionally the negative
  per-voxel Pearson correlation over the batch.
- Reconstructions, at layer 13: frames MSE, per-codebook cross-entropy of the code
  logits (pad ignored), mel MSE, text cosine distance, each averaged over the valid
  slots of a sample and then over samples. Each is divided by a constant
  computed once from the training split (``LossScales.from_store``), the loss of a
  predictor that knows only the training data's average, so the weights in the
  config compare like with like and no batch statistic leaks into the scale. Mel
  targets are standardized per band with training statistics (the decoder predicts
  standardized mel).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from giblet.config import LossConfig


@dataclass
class LossScales:
    """Reconstruction-loss divisors from the training split (1.0 where a modality is absent)."""

    frames: float = 1.0  # variance of the decoded-size training frames (pixels in [0, 1])
    codes: List[float] = dataclasses.field(default_factory=list)  # entropy (nats) of each codebook's training codes
    mel_mean: List[float] = dataclasses.field(default_factory=list)  # per mel band, over the training mel slots
    mel_std: List[float] = dataclasses.field(default_factory=list)  # mel targets are standardized with these
    text: float = 1.0  # mean cosine distance of the training segments to their mean

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_store(cls, store, model, split: str = "train") -> "LossScales":
        """The constants from the windows of ``split`` (train) only: nothing from validation or test TRs."""
        from giblet.data.dataset import WindowDataset, window_index

        dataset = WindowDataset(store, split, index=window_index(store))
        batch = {key: value.to(model.l7_brain.weight.device) for key, value in dataset.batch(np.arange(len(dataset))).items()}
        targets = model.targets(batch)
        scales = cls()
        if "video" in targets:
            rows = torch.unique(batch["video_index"][targets["video_valid"]])
            scales.frames = _positive(model.stimuli.frame_targets[rows].float().div(255.0).var().item())
        if "codes" in targets:
            codes = targets["codes"]
            scales.codes = []
            for q in range(codes.shape[2]):
                values = codes[:, :, q][codes[:, :, q] >= 0]
                counts = torch.bincount(values, minlength=model.dims.codebook_size).double()
                p = counts[counts > 0] / counts.sum()
                scales.codes.append(_positive(float(-(p * p.log()).sum())))
        if "mel" in targets:
            bands = targets["mel"].float().flatten(0, 1)
            scales.mel_mean = bands.mean(dim=0).tolist()
            scales.mel_std = [_positive(v) for v in bands.std(dim=0).tolist()]
        if "text" in targets:
            rows = torch.unique(batch["text_index"][targets["text_valid"]])
            embeddings = F.normalize(model.stimuli.text[rows].float(), dim=1)
            centre = F.normalize(embeddings.mean(dim=0, keepdim=True), dim=1)
            scales.text = _positive(float((1 - embeddings @ centre.T).mean()))
        return scales


def _positive(value: float) -> float:
    """A scale of 0 (a constant stream) would divide by zero; such a loss is left unscaled."""
    return value if value > 1e-8 and math.isfinite(value) else 1.0


def _sample_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid slots of each sample, then over the samples (a sample with none counts 0).

    Every sample weighs the same, so the mean of per-process means over equal shares
    of a batch (what DDP's gradient averaging computes) is the mean over the whole batch.
    """
    valid = valid.to(values.dtype)
    per_sample = (values * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_sample.mean()


def _frames_distance(frames: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pixel MSE per slot ``(B, slots, ...)``, averaged over each sample's valid slots, then the samples."""
    return _sample_mean((frames - reference).pow(2).flatten(2).mean(dim=2), valid)


def _text_distance(embeddings: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cosine distance per slot, averaged over each sample's valid slots, then the samples."""
    return _sample_mean(1 - F.cosine_similarity(embeddings, reference, dim=-1), valid)


# A lesion's shift compares two reconstructions that are nearly equal. Written as the losses write them, the
# distances would cancel: 1 - cos of two such vectors, and a KL divergence summed from log-probabilities, carry
# float32 rounding of about 1e-7, while the real distance is second order in the move and often far below it (a
# parcel's share of what the text decoder reads). The two below are the same numbers in exact arithmetic, computed
# from the difference itself: exactly 0 for equal inputs, and as precise for a small move as for a large one.


def _cosine_shift(moved: torch.Tensor, intact: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - cos per slot as half the squared distance of the unit vectors, averaged as ``_text_distance``."""
    gap = F.normalize(moved, dim=-1) - F.normalize(intact, dim=-1)
    return _sample_mean(0.5 * gap.pow(2).sum(dim=-1), valid)


def _code_divergence(moved: torch.Tensor, intact: torch.Tensor) -> torch.Tensor:
    """KL(intact || moved) of the code distributions from their logits ``(..., K)``, per leading index.

    With d = moved - intact logits and c = d - E_p[d] (p the intact distribution), KL = log E_p[exp(c)] =
    log1p(E_p[expm1(c)]): no first-order term left to cancel. Where some |c| reaches 20 (expm1 loses nothing
    then, but a large move needs no such care) the sum over log-probabilities is used."""
    p = F.softmax(intact, dim=-1)
    c = moved - intact
    c -= (p * c).sum(dim=-1, keepdim=True)
    far = c.abs().amax(dim=-1) >= 20
    divergence = torch.log1p((p * torch.expm1(c.clamp_(max=20))).sum(dim=-1))
    if bool(far.any()):  # rare (a large move): only then the second softmax
        log_ratio = F.log_softmax(intact, dim=-1) - F.log_softmax(moved, dim=-1)
        divergence = torch.where(far, (p * log_ratio).sum(dim=-1), divergence)
    return divergence.clamp(min=0)


def pearson_per_unit(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Correlation over the batch (time) for each unit: ``(units,)``."""
    p = prediction - prediction.mean(dim=0, keepdim=True)
    t = target - target.mean(dim=0, keepdim=True)
    return (p * t).sum(dim=0) / (p.norm(dim=0) * t.norm(dim=0) + eps)


# The terms whose weight is not a setting: the fMRI MSE is the unit the other weights are measured in, and the
# modality readouts (model.modality_readouts) are fit to the same targets with the same weight.
UNIT_WEIGHT = {"fmri": 1.0, "fmri_per_modality": 1.0}


class GibletLoss(nn.Module):
    """``loss(output) -> (total, parts)`` for ``output = model(batch)``; ``parts`` holds each term, unweighted."""

    def __init__(self, weights: Optional[LossConfig] = None, scales: Optional[LossScales] = None) -> None:
        super().__init__()
        self.weights = weights or LossConfig()
        self.scales = scales or LossScales()

    def forward(self, output: Dict[str, object]):
        brain = output["brain"].float()
        recon = {k: v.float() for k, v in output["reconstructions"].items()}
        targets = output["targets"]
        parts: Dict[str, torch.Tensor] = {}
        w = self.weights
        if "fmri" in targets:
            target = targets["fmri"].float()
            parts["fmri"] = F.mse_loss(brain, target)
            if w.fmri_correlation > 0 and brain.shape[0] > 1:
                parts["fmri_correlation"] = -pearson_per_unit(brain, target).mean()
            if "modality_brain" in output:  # the training-only readouts of model.modality_readouts
                parts["fmri_per_modality"] = torch.stack(
                    [F.mse_loss(readout.float(), target) for readout in output["modality_brain"].values()]
                ).mean()
        if "video" in recon:
            parts["frames"] = _frames_distance(recon["video"], targets["video"], targets["video_valid"]) / self.scales.frames
        if "codes" in recon:
            logits, codes = recon["codes"], targets["codes"]  # (B, S, n_q, K), (B, S, n_q)
            n_q = logits.shape[2]
            scales = logits.new_tensor(self.scales.codes or [1.0] * n_q)
            entropy = F.cross_entropy(logits.permute(0, 3, 1, 2), codes.clamp(min=0), reduction="none")  # (B, S, n_q)
            parts["codes"] = torch.stack(
                [_sample_mean(entropy[:, :, q], codes[:, :, q] >= 0) / scales[q] for q in range(n_q)]
            ).mean()
        if "mel" in recon:
            # Standardized per band (decibels are far from 0): predicting the training average scores 1.
            target = targets["mel"].float()
            if self.scales.mel_mean:
                target = (target - target.new_tensor(self.scales.mel_mean)) / target.new_tensor(self.scales.mel_std)
            parts["mel"] = F.mse_loss(recon["mel"], target)
        if "text" in recon:
            parts["text"] = _text_distance(recon["text"], targets["text"].float(), targets["text_valid"]) / self.scales.text
        total = brain.new_zeros(())
        for name, value in parts.items():
            total = total + (UNIT_WEIGHT[name] if name in UNIT_WEIGHT else getattr(w, name)) * value
        return total, parts

    def shift(self, moved: Dict[str, torch.Tensor], intact: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]
              ) -> Dict[str, torch.Tensor]:
        """How far the ``moved`` reconstructions lie from the ``intact`` ones, per term (``frames``, ``codes``,
        ``mel``, ``text``), each measured as its loss measures the distance to the movie, with the intact
        reconstruction in the movie's place: frames and mel MSE, the codes' KL divergence from the intact
        distribution (its cross-entropy less its entropy), text cosine distance; over the same valid slots and
        divided by the same scales. 0 when nothing moved, never negative."""
        parts: Dict[str, torch.Tensor] = {}
        if "video" in moved:
            parts["frames"] = _frames_distance(moved["video"].float(), intact["video"].float(), targets["video_valid"]) / self.scales.frames
        if "codes" in moved:
            divergence = _code_divergence(moved["codes"].float(), intact["codes"].float())  # (B, S, n_q)
            n_q = divergence.shape[2]
            scales = divergence.new_tensor(self.scales.codes or [1.0] * n_q)
            parts["codes"] = torch.stack([_sample_mean(divergence[:, :, q], targets["codes"][:, :, q] >= 0) / scales[q]
                                          for q in range(n_q)]).mean()
        if "mel" in moved:
            parts["mel"] = F.mse_loss(moved["mel"].float(), intact["mel"].float())
        if "text" in moved:
            parts["text"] = _cosine_shift(moved["text"].float(), intact["text"].float(), targets["text_valid"]) / self.scales.text
        return parts

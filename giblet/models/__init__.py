"""The 13-layer multimodal autoencoder whose layer 7 is the brain, its data dimensions and checkpoints."""

from giblet.models.autoencoder import GibletAutoencoder
from giblet.models.stimuli import ModelDims, Stimuli, dims_from_manifest

__all__ = ["GibletAutoencoder", "ModelDims", "Stimuli", "dims_from_manifest"]

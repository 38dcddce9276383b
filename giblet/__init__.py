"""giblet: a multimodal autoencoder whose layer 7 is the brain."""

__version__ = "0.1.0"

"""giblet: a multimodal autoencoder whose layer 7 is the brain."""

__version__ = "0.1.0"


def load(run, device=None):
    """Rebuild a trained model from a run folder or checkpoint file (see giblet.models.checkpoint.load)."""
    from giblet.models.checkpoint import load as load_checkpoint

    return load_checkpoint(run, device)

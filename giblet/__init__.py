"""giblet: a multimodal autoencoder whose layer 7 is the brain."""

from giblet.version import __version__  # noqa: F401


def load(run, device=None):
    """Rebuild a trained model from a run folder or checkpoint file (see giblet.models.checkpoint.load)."""
    from giblet.models.checkpoint import load as load_checkpoint

    return load_checkpoint(run, device)

"""`giblet model`: the layers, their shapes and parameters, and the memory of training; the layer table (also `giblet validate`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli.common import console, fail_cleanly


@fail_cleanly
def model(
    store: Optional[Path] = typer.Option(None, help="Size the model for this store; default: Sherlock's shapes."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration (model widths)."),
    embedding_size: int = typer.Option(384, help="Without --store: the text embedder's width (384 MiniLM, 1024 bge-large)."),
) -> None:
    """The 13 layers with their shapes and parameters, and the activation memory one training sample costs (CPU, float32)."""
    from giblet.config import load_config
    from giblet.models import GibletAutoencoder, dims_from_manifest
    from giblet.train.summary import activation_bytes_per_sample, sherlock_dims

    settings = load_config(config)
    if store is not None:
        from giblet.data.store import open_store

        dims, where = dims_from_manifest(open_store(store).manifest, settings.model.audio_input, settings.model.inputs), str(store)
    else:
        dims, where = sherlock_dims(embedding_size, settings.video.height, settings.video.width).restricted_to(settings.model.inputs), f"Sherlock's shapes ({embedding_size}-d text)"
    network = GibletAutoencoder(dims, settings.model)
    print_layer_table(network, f"giblet model for {escape(where)}")
    per_sample = activation_bytes_per_sample(network)
    state = network.n_parameters() * 4 * 4  # float32 weights, gradients and two AdamW moments
    console.print(f"parameters: {network.n_parameters():,} ({network.n_parameters() / 1e6:.1f} M)")
    console.print(f"activation memory per training sample (float32, saved for backward): {per_sample / 2**20:.2f} MiB")
    console.print(
        f"weights + gradients + AdamW state: {state / 2**30:.2f} GiB; with 32 samples of activations: "
        f"{(state + 32 * per_sample) / 2**30:.2f} GiB"
    )


def print_layer_table(model, title: str) -> None:
    table = Table(title=title)
    for column in ("layer", "input", "output", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name, shape_in, shape_out, n_params in model.layer_table():
        table.add_row(name, shape_in, shape_out, f"{n_params:,}")
    table.add_row("total", "", "", f"{model.n_parameters():,}")
    console.print(table)

"""Opening a trained run: its checkpoint, the store it was trained on, and its model ready to score.

``giblet evaluate``, ``giblet lesion`` and the atlas sweep all open a run this way: the best (else last)
checkpoint, the run's store (or another given one, refused unless its key is the run's), the model intact, on
the store's grid, with the store's stream tables and, for a linear branch, the regressors through the run's HRF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

from giblet.data.store import Store, open_store, run_store_path
from giblet.errors import DataError
from giblet.models import Stimuli
from giblet.models.checkpoint import find_checkpoint, load, read_checkpoint

PathLike = Union[str, Path]


def run_folder(run: Path, checkpoint: Path) -> Path:
    """The run folder of ``run``: itself when a folder, else the folder above its checkpoint."""
    return run if run.is_dir() else checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def open_run(run: PathLike, store_path: Optional[PathLike] = None, split: Optional[str] = None) -> Tuple[Path, Store]:
    """(checkpoint, store) of a run folder or checkpoint file, as ``giblet evaluate`` finds them: the best (else
    last) checkpoint and the store it was trained on (default ``RUN/store``; another store is refused by its key).
    With ``split``, a store without that split is refused too."""
    run = Path(run)
    checkpoint = find_checkpoint(run)
    store = open_store(store_path or run_store_path(run_folder(run, checkpoint)))
    expected = read_checkpoint(checkpoint).get("store_key")
    if expected and expected != store.key:
        raise DataError(store.path, f"store key {store.key}", expected=f"the store the run was trained on, {expected}")
    if split is not None and split not in store.splits:
        raise DataError(store.path, f"no split {split!r}", expected=f"one of {', '.join(store.splits)}")
    return checkpoint, store


def load_model(checkpoint: Path, store: Store):
    """The model in eval mode on the store's grid, its stream tables attached (frame size from its saved architecture)."""
    model = load(checkpoint)
    model.set_lesion(None)  # intact, whatever lesion the checkpoint was saved with
    model.set_grid(*store.mask())
    hrf = None
    if model.linear_weight is not None and model.linear_weight.numel():  # a fitted linear branch reads the run's HRF
        saved = read_checkpoint(checkpoint).get("config")
        if not saved:
            raise DataError(checkpoint, "a model with a linear branch but no run configuration",
                            expected="a checkpoint written by `giblet train` (it carries alignment.hrf)")
        hrf = saved["alignment"]["hrf"]
    model.attach(Stimuli.from_store(store, model.dims, hrf=hrf))
    return model.eval()


def load_run(run: PathLike, store_path: Optional[PathLike] = None):
    """(model, store, checkpoint) of a run folder or checkpoint file."""
    checkpoint, store = open_run(run, store_path)
    return load_model(checkpoint, store), store, checkpoint

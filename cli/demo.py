"""`giblet demo`: the whole pipeline on the built-in synthetic dataset, offline, on the CPU.

synth tiny -> validate (build, ops, data) -> prepare the store -> train a small model for a few
minutes -> evaluate against the held-out TRs and the ground truth -> silence every parcel of a cube
atlas (``giblet lesion --atlas``) -> write the report (``giblet report``) and print its path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape

from giblet_cli.common import console, fail_cleanly

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_CUBE = 5  # ~70 parcels of up to 125 voxels on the tiny preset's 4,000 voxels
DEMO_PERMUTATIONS = 19  # the smallest p is 1/20: enough for a demo, half the sweep's time of the default 39


@fail_cleanly
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the dataset (OUT/data) and the run (OUT/run)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration (default: configs/demo.yaml)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override train.epochs."),
    fresh: bool = typer.Option(False, "--fresh", help="Start the run over (the dataset and store are reused)."),
) -> None:
    """Run the pipeline end to end on a tiny synthetic movie: synth, validate, train, evaluate, lesion every parcel, report."""
    import shutil

    from giblet.config import load_config
    from giblet.data.store import open_store, prepare
    from giblet.data.synth import TRUTH_FOLDER, synthesize
    from giblet.errors import DataError
    from giblet.data.parcels import cube_atlas
    from giblet.data.volume import save_volume
    from giblet.eval.atlas import lesion_atlas
    from giblet.eval.evaluate import evaluate
    from giblet.eval.report import write_report
    from giblet.train.trainer import train, write_run_config
    from giblet_cli.evaluate import print_metrics
    from giblet_cli.validate import validate

    config = config or DEMO_CONFIG
    settings = load_config(config)
    if epochs is not None:
        settings.train.epochs = epochs
    data, run = out / "data", out / "run"
    started = time.perf_counter()

    def stage(number: int, text: str) -> None:
        console.rule(f"[bold]{number}/7 {text}[/bold]  ({time.perf_counter() - started:.0f} s)")

    stage(1, "synthetic dataset (tiny preset, known ground truth)")
    if (data / TRUTH_FOLDER).is_dir():
        console.print(f"reusing {escape(str(data))}")
    else:
        synthesize(data, "tiny", seed=0)
        console.print(f"wrote {escape(str(data))}")
    stage(2, "validate: native build, ops against their references, the data")
    validate(data=data, config=config, quick=False)
    stage(3, "prepare the store")
    store_path = out / "store"
    try:
        prepare(data, settings, store_path)
    except DataError:
        if not fresh:
            raise
        prepare(data, settings, store_path, force=True)  # --fresh: the run starts over, so its old store may go
    store = open_store(store_path)
    console.print(f"store {escape(str(store_path))}: {store.n_voxels:,} voxels, {store.n_trs} TRs, splits {store.splits}")
    stage(4, f"train (CPU, up to {settings.train.epochs} epochs, early stopping)")
    if fresh and run.exists():
        shutil.rmtree(run)
    resume = (run / "checkpoints" / "last.pt").is_file()
    if resume:
        console.print("resuming the run already in OUT/run (--fresh starts over)")
    write_run_config(settings, run)
    result = train(settings, store, run, resume=resume)
    if result:
        console.print(f"best validation r {result['best_val_r']:.3f} after {result['epoch']} epochs")
    else:
        console.print("the run in OUT/run had already finished (--fresh starts over)")
    stage(5, "evaluate on the held-out test TRs")
    metrics = evaluate(run, store_path, "ridge", "test")
    print_metrics(metrics, run, "test")
    stage(6, f"what each region carries: every parcel of a cube atlas silenced in turn ({DEMO_CUBE}^3-voxel cubes)")
    mask, affine = store.mask()
    atlas = out / f"cubes{DEMO_CUBE}.nii.gz"
    save_volume(cube_atlas(mask, DEMO_CUBE)[mask], (mask, affine), atlas, dtype=np.int32)
    atlas_report = lesion_atlas(run, atlas, store_path=store_path, permutations=DEMO_PERMUTATIONS)
    for name, ranked in atlas_report["top"].items():
        values = next(p for p in atlas_report["parcels"] if p["label"] == ranked[0])["modalities"][name]
        console.print(f"carries most {name}: parcel {ranked[0]} ({values['relative_change']:+.2%} when silenced, "
                      f"q {values['q_value']:.3f})" if values["q_value"] is not None else f"carries most {name}: parcel {ranked[0]}")
    stage(7, "report")
    index = write_report(run, store_path=store_path)
    console.print(
        f"\ndone in {time.perf_counter() - started:.0f} s. Open the report: {escape(str(index))}\n"
        f"metrics: {escape(str(run / 'eval' / 'metrics.json'))}; lesion atlas: {escape(atlas_report['out'])}; "
        f"training curves: tensorboard --logdir {escape(str(run / 'tensorboard'))}"
    )

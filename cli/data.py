"""`giblet data ...`: make, fetch and prepare Sherlock-layout datasets."""

from __future__ import annotations

import logging
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from giblet_cli.bench import run_data_bench
from giblet_cli.common import console, fail_cleanly

app = typer.Typer(help="Make, fetch and prepare Sherlock-layout datasets.", no_args_is_help=True)


class Preset(str, Enum):
    tiny = "tiny"
    small = "small"
    sherlock_scale = "sherlock-scale"
    sherlock_quirks = "sherlock-quirks"


@app.command()
@fail_cleanly
def synth(
    out: Path = typer.Argument(..., help="New folder to write (must not exist or be empty)."),
    preset: Preset = typer.Option(Preset.tiny, help="tiny: demo-sized, under a minute; small: ~10k voxels; sherlock-scale: Sherlock's sizes; "
                                                 "sherlock-quirks: small, with the real release's quirks (configs/sherlock.yaml)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same dataset."),
    tr: Optional[float] = typer.Option(None, "--tr", help="Another TR in seconds (e.g. 2.0); the scan keeps its duration."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Another frame rate (e.g. 23.976)."),
    noise: Optional[float] = typer.Option(None, "--noise", help="Multiply every noise level by this (e.g. 1.5: lower ceilings)."),
    preshift: Optional[int] = typer.Option(None, "--preshift", help="Write the fMRI shifted earlier by this many TRs, as the "
                                           "published Sherlock data were by 3 (read with alignment.preshift_trs)."),
) -> None:
    """Write a dataset in the Sherlock layout from a known ground truth (truth in OUT/_truth/)."""
    from giblet.data.synth import preset_variant, synthesize

    started = time.perf_counter()
    sizes = preset_variant(preset.value, tr_s=tr, fps=fps, noise_scale=noise, preshift_trs=preshift)
    path = synthesize(out, sizes, seed=seed)
    console.print(f"wrote {path} ({sizes.name}, seed {seed}) in {time.perf_counter() - started:.1f} s; ground truth in {path / '_truth'}")


@app.command()
@fail_cleanly
def prepare(
    data: Path = typer.Argument(..., help="Folder in the Sherlock layout."),
    out: Path = typer.Option(..., "--out", help="Store folder to write (reused when inputs and settings are unchanged)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration; defaults otherwise."),
    force: bool = typer.Option(False, help="Rebuild even when an up-to-date store exists."),
) -> None:
    """Decode, encode and embed the stimuli once and write the fMRI as one memory-mapped array, atomically."""
    from giblet.config import load_config
    from giblet.data.store import directory_size, prepare as prepare_store

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    store = prepare_store(data, load_config(config), out, force=force)
    m = store.manifest
    elapsed = time.perf_counter() - started
    console.print(f"store {store.path} (key {store.key}) ready in {elapsed:.1f} s, {directory_size(store.path) / 2**20:,.1f} MiB")
    f = m["fmri"]
    console.print(
        f"  fMRI {tuple(f['shape'])} {f['dtype']} ({f['n_voxels']} voxels), frames {tuple(m['video']['shape'])}, "
        f"text {tuple(m['text']['shape'])}"
        + (f", codes {tuple(m['audio']['codes']['shape'])}" if "codes" in m["audio"] else "")
        + (f", mel {tuple(m['audio']['mel']['shape'])}" if "mel" in m["audio"] else "")
    )
    console.print("  splits " + ", ".join(f"{k} TRs {v[0]}-{v[1] - 1}" for k, v in m["splits"]["blocks"].items() if v[1] > v[0]))


@app.command()
@fail_cleanly
def verify(
    store: Path = typer.Argument(..., help="A store made by `giblet data prepare`."),
) -> None:
    """Hash every file of a store again and compare with the hashes its manifest recorded (exit 0 only if all match)."""
    from rich.markup import escape

    from giblet.data.verify import OK, verify as verify_store

    started = time.perf_counter()
    checks, error = verify_store(store)
    for check in checks:
        style = "green" if check.status == OK else "red"
        console.print(f"  [{style}]{check.status:<8}[/{style}] {escape(check.name):<22} {escape(check.detail)}")
    if error is not None:
        raise error
    console.print(f"store {store}: all {len(checks)} files match the manifest ({time.perf_counter() - started:.1f} s)")


@app.command()
@fail_cleanly
def download(
    data: Path = typer.Argument(..., help="Folder to create with the dataset."),
    url: Optional[str] = typer.Option(None, help="Address of the dataset's zip (default: $GIBLET_DATA_URL)."),
    sha256: Optional[str] = typer.Option(None, help="Expected sha256 of the zip; the download fails on a mismatch."),
) -> None:
    """Download a zipped dataset: resumable, checksum-verified, unzipped atomically into DATA."""
    from giblet.data.download import download as fetch

    path = fetch(data, url, sha256)
    console.print(f"dataset in {path}")


@app.command()
@fail_cleanly
def bench(
    store: Path = typer.Argument(..., help="A store made by `giblet data prepare`."),
    batch: int = typer.Option(16, min=1, help="Windows per batch."),
    repeats: int = typer.Option(100, min=1, help="Timed batches per case."),
) -> None:
    """Time reading random batches of windows from a store (warm page cache)."""
    run_data_bench(store, batch, repeats)


atlas_app = typer.Typer(help="Label images of a store's grid, for `giblet lesion --atlas` (any integer label image works too).",
                        no_args_is_help=True)
app.add_typer(atlas_app, name="atlas")


@atlas_app.command("cubes")
@fail_cleanly
def atlas_cubes(
    store: Path = typer.Argument(..., help="A store made by `giblet data prepare`."),
    out: Path = typer.Option(..., "--out", help="Label image to write (.nii.gz): one label per cube, 0 outside the mask."),
    size: int = typer.Option(5, "--size", min=1, help="Cube edge in voxels: the grid is cut into cubes of N^3 voxels."),
    force: bool = typer.Option(False, help="Overwrite OUT if it exists."),
) -> None:
    """Write a cube atlas of the store's mask (labels 1..K, in C order of the cubes) on the store's grid."""
    import numpy as np

    from giblet.data.parcels import cube_atlas
    from giblet.data.store import open_store
    from giblet.data.volume import save_volume
    from giblet.errors import DataError

    if out.exists() and not force:
        raise DataError(out, "already exists", fix="pass --force to overwrite it, or choose another path")
    mask, affine = open_store(store).mask()
    labels = cube_atlas(mask, size)[mask]
    sizes = np.bincount(labels)[1:]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_volume(labels, (mask, affine), out, dtype=np.int32)
    console.print(f"wrote {out}: {sizes.size} parcels of up to {size}^3 voxels, median size {float(np.median(sizes)):g} voxels "
                  f"({int(mask.sum())} mask voxels)")

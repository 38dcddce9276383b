"""`giblet lesion`: reconstruct the held-out windows with and without an ROI's layer-7 units."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli.common import console, fail_cleanly


@fail_cleanly
def lesion(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint) or a checkpoint file."),
    roi: Path = typer.Option(..., "--roi", help="ROI NIfTI: voxels with a value > 0 are silenced (their layer-7 units). On another grid it is resampled by nearest neighbour, with a warning."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/lesion/<roi name>)."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
    permutations: int = typer.Option(39, min=0, help="Random ROIs of the same size behind each p-value (the smallest p is 1 / (N + 1))."),
    split: str = typer.Option("test", help="Windows to reconstruct: test or val."),
    seed: int = typer.Option(0, help="Seed of the random ROIs."),
) -> None:
    """Reconstruct the held-out windows with and without an ROI's units: losses, p-values, frames, audio, nearest texts."""
    from giblet.eval.lesion import lesion as run_lesion

    if split not in ("test", "val"):
        raise typer.BadParameter(f"{split!r}; expected test or val", param_hint="--split")
    report = run_lesion(run, roi, out, store, permutations, split, seed)
    table = Table(title=f"giblet lesion {escape(str(run))}: {escape(roi.name)}, {report['roi_voxels']} voxels "
                        f"({report['lesioned_units']} of {report['n_units']} units), {split} TRs {report['trs'][0]}-{report['trs'][1] - 1}")
    for column in ("modality", "loss intact", "loss lesioned", "relative change", f"p ({permutations} random ROIs)"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for name, values in report["modalities"].items():
        shown = name if name != "audio" else f"audio ({report['audio_feature']})"
        p = "-" if values["p_value"] is None else f"{values['p_value']:.3f}"
        table.add_row(shown, f"{values['loss_intact']:.4f}", f"{values['loss_lesioned']:.4f}", f"{values['relative_change']:+.2%}", p)
    console.print(table)
    folder = Path(report["out"])
    console.print(f"report in {escape(str(folder))}:")
    for name, entry in report["files"].items():
        files = [entry["file"]] if "file" in entry else list(entry["files"].values())
        note = f" ({escape(entry['skipped'])})" if entry.get("skipped") else ""
        console.print(f"  {name}: {escape(', '.join(files) or 'none')}{note}")
    console.print("  lesion.json")

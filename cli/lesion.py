"""`giblet lesion`: reconstruct the held-out windows with and without an ROI's (or every atlas parcel's) layer-7 units."""

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
    roi: Optional[Path] = typer.Option(None, "--roi", help="ROI NIfTI: voxels with a value > 0 are silenced (their layer-7 units). On another grid it is resampled by nearest neighbour, with a warning."),
    atlas: Optional[Path] = typer.Option(None, "--atlas", help="Label NIfTI: every parcel (integer label > 0) silenced in turn; a map of what each carries."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/lesion/<roi name> or RUN/lesion/atlas-<atlas name>)."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
    permutations: int = typer.Option(39, min=0, help="Random contiguous parcels of the same size behind each p-value (the smallest p is 1 / (N + 1))."),
    split: str = typer.Option("test", help="Windows to reconstruct: test or val."),
    seed: int = typer.Option(0, help="Seed of the random parcels."),
) -> None:
    """Reconstruct the held-out windows with and without an ROI's units (or each atlas parcel's): losses, p- and q-values, maps, frames, audio, nearest texts."""
    if split not in ("test", "val"):
        raise typer.BadParameter(f"{split!r}; expected test or val", param_hint="--split")
    if (roi is None) == (atlas is None):
        raise typer.BadParameter("give --roi ROI.nii.gz (one region) or --atlas LABELS.nii.gz (every parcel), not both", param_hint="--roi / --atlas")
    if atlas is not None:
        _print_atlas(run, atlas, out, store, permutations, split, seed)
        return
    from giblet.eval.lesion import lesion as run_lesion

    report = run_lesion(run, roi, out, store, permutations, split, seed)
    table = Table(title=f"giblet lesion {escape(str(run))}: {escape(roi.name)}, {report['roi_voxels']} voxels "
                        f"({report['lesioned_units']} of {report['n_units']} units), {split} TRs {report['trs'][0]}-{report['trs'][1] - 1}")
    for column in ("modality", "loss intact", "loss lesioned", "relative change", f"p ({permutations} random parcels)",
                   "relative shift", "shift p"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for name, values in report["modalities"].items():
        shown = name if name != "audio" else f"audio ({report['audio_feature']})"
        p = "-" if values["p_value"] is None else f"{values['p_value']:.3f}"
        shift_p = "-" if values["shift_p_value"] is None else f"{values['shift_p_value']:.3f}"
        table.add_row(shown, f"{values['loss_intact']:.4f}", f"{values['loss_lesioned']:.4f}", f"{values['relative_change']:+.2%}", p,
                      f"{values['relative_shift']:.3%}", shift_p)
    console.print(table)
    folder = Path(report["out"])
    console.print(f"report in {escape(str(folder))}:")
    for name, entry in report["files"].items():
        files = [entry["file"]] if "file" in entry else list(entry["files"].values())
        note = f" ({escape(entry['skipped'])})" if entry.get("skipped") else ""
        console.print(f"  {name}: {escape(', '.join(files) or 'none')}{note}")
    console.print("  lesion.json")


def _print_atlas(run: Path, atlas: Path, out, store, permutations: int, split: str, seed: int) -> None:
    from giblet.eval.atlas import lesion_atlas

    report = lesion_atlas(run, atlas, out, store, permutations, split, seed)
    by_label = {parcel["label"]: parcel for parcel in report["parcels"]}
    console.print(f"giblet lesion {escape(str(run))} --atlas {escape(atlas.name)}: {len(report['parcels'])} parcels, "
                  f"{report['voxels_in_parcels']:,} of {report['n_units']:,} units, {report['windows']} {split} windows, "
                  f"{len(report['null']['classes'])} null size classes x {permutations} random contiguous parcels")
    whole = report["whole_brain"]
    console.print("the whole brain silenced (every layer-7 unit; a parcel's share_of_brain is its part of this): "
                  + ", ".join(f"{name} {whole[name]['relative_change']:+.2%}" for name in report["top"] if name in whole)
                  + "; the parcels one at a time add up to " + ", ".join(f"{name} {_two_places(whole[name]['parcels_sum_of_shares'])}"
                                                                       for name in report["top"] if name in whole)
                  + " of it (1: each holds its own part; near 0: they hold it redundantly)")
    reliability = report["reliability"]
    console.print("map reliability (r over parcels, first vs second half of the windows; Spearman-Brown for the whole map): "
                  + ", ".join(f"{name} {_two_places(reliability[name]['split_half_r'])} ({_two_places(reliability[name]['spearman_brown'])})"
                              for name in report["top"] if name in reliability))
    for name, ranked in report["top"].items():
        table = Table(title=f"parcels that carry most {name}")
        for column in ("label", "voxels", "relative change", "share of brain", "p", "q", "relative shift", "shift q"):
            table.add_column(column, justify="right")
        for label in ranked[:5]:
            values = by_label[label]["modalities"][name]
            p, q, share = values["p_value"], values["q_value"], values["share_of_brain"]
            table.add_row(str(label), str(by_label[label]["voxels"]), f"{values['relative_change']:+.2%}",
                          "-" if share is None else f"{share:+.1%}", "-" if p is None else f"{p:.3f}", "-" if q is None else f"{q:.3f}",
                          f"{values['relative_shift']:.3%}", "-" if values["shift_q_value"] is None else f"{values['shift_q_value']:.3f}")
        console.print(f"parcels that move the {name} reconstruction most (relative shift): "
                      + ", ".join(f"{label} ({by_label[label]['modalities'][name]['relative_shift']:.3%})"
                                  for label in report["top_by_shift"][name][:5]))
        console.print(table)
    console.print(f"report in {escape(report['out'])}: atlas.json, " + ", ".join(
        f"{files['carries']}, {files['q']}, {files['png']}, {files['shift']}, {files['shift_q']}"
        + (f", {files['top_report']}/" if "top_report" in files else "")
        for files in report["files"].values()))


def _two_places(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"

"""`giblet evaluate`: score a run's best checkpoint on the held-out TRs; the metrics table (also `giblet demo`'s)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli.common import console, fail_cleanly


class Baseline(str, Enum):
    ridge = "ridge"
    none = "none"


@fail_cleanly
def evaluate(
    run: Path = typer.Argument(..., help="Run folder (its best checkpoint is scored)."),
    store: Optional[Path] = typer.Option(None, help="The run's store (default: RUN/store)."),
    split: str = typer.Option("test", help="Held-out split to score: test or val."),
    baseline: Baseline = typer.Option(Baseline.ridge, help="Also fit and score a baseline on the same split."),
) -> None:
    """Per-voxel r over the held-out TRs (group mean and each subject), noise ceilings, a ridge baseline, maps."""
    from giblet.eval.evaluate import evaluate as run_evaluation

    if split not in ("test", "val"):
        raise typer.BadParameter(f"{split!r}; expected test or val", param_hint="--split")
    metrics = run_evaluation(run, store, None if baseline is Baseline.none else baseline.value, split)
    print_metrics(metrics, run, split)


def print_metrics(metrics: dict, run: Path, split: str) -> None:
    """The table of `giblet evaluate` (also printed by `giblet demo`)."""
    from giblet.eval.metrics import format_lead

    table = Table(title=f"giblet evaluate {escape(str(run))}: {split} TRs {metrics['test_trs'][0]}-{metrics['test_trs'][1] - 1}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_voxels", "mean_r", "median_r", "mean_r_subject", "noise_ceiling_mean", "noise_normalized_r"):
        value = metrics[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for name, values in metrics["baselines"].items():
        table.add_row(f"baseline {name}: mean_r", f"{values['mean_r']:.4f}")
        if "model_minus_this" in values:
            table.add_row(f"model - {name}: mean_r (95% interval)", format_lead(values["model_minus_this"], 4))
    truth = metrics.get("truth")
    if truth and "skipped" not in truth:
        table.add_row("truth: signal voxels", str(truth["signal_voxels"]))
        table.add_row("truth: r of the noise-free signal (ceiling)", f"{truth['true_signal_r']:.4f}")
        for name in ("model", "ridge", "ridge_hrf", "ridge_banded"):
            if name in truth:
                table.add_row(f"truth: {name} mean_r on signal voxels", f"{truth[name]['mean_r']:.4f}")
                table.add_row(f"truth: {name} fraction of the ceiling", f"{truth[name]['fraction_of_ceiling']:.3f}")
                if "r_vs_signal" in truth[name]:
                    table.add_row(f"truth: {name} r against the noise-free signal", f"{truth[name]['r_vs_signal']:.3f}")
        per_subject = truth.get("per_subject")
        if per_subject:
            table.add_row("truth: model per-subject r / leave-one-out ceiling, signal voxels",
                          f"{per_subject['model_over_noise_ceiling']:.3f}")
            table.add_row("truth: noise-free signal per-subject r / that ceiling", f"{per_subject['noise_free_signal_over_noise_ceiling']:.3f}")
        for kind, entry in truth.get("by_kind", {}).items():
            names = [name for name in ("model", "ridge", "ridge_hrf", "ridge_banded") if name in entry]
            fractions = " / ".join(f"{entry[name]['fraction_of_ceiling']:.3f}" for name in names)
            table.add_row(f"truth: {kind} ({entry['voxels']} voxels) fraction, {' / '.join(names)}", fractions)
        strongest = "ridge_banded"  # the linear model to beat
        if "model_minus_this" in truth.get(strongest, {}):
            table.add_row(f"truth: model - {strongest}, fraction (95% interval)", format_lead(truth[strongest]["model_minus_this"]))
            for kind, entry in truth.get("by_kind", {}).items():
                table.add_row(f"truth: {kind}: model - {strongest}", format_lead(entry[strongest]["model_minus_this"]))
    console.print(table)
    console.print(f"maps and plots in {escape(str(Path(run) / 'eval'))}: r_map.nii.gz, prediction_{split}.nii.gz, r_map.png, r_histogram.png")

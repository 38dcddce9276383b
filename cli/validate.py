"""`giblet validate`: the native build, every op against its reference, and optionally a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from giblet_cli.common import console, fail_cleanly
from giblet_cli.model import print_layer_table


@fail_cleanly
def validate(
    data: Optional[Path] = typer.Option(None, "--data", help="Also check this Sherlock-layout folder: files, times, TRs, voxels."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML configuration (checked for unknown keys too)."),
    quick: bool = typer.Option(False, help="With --data: read headers only, not every fMRI volume, and load no models."),
) -> None:
    """Check giblet before spending GPU time: the native build, every op against its reference, and the data."""
    from giblet import ops
    from giblet.config import load_config
    from giblet.validate import check_ops

    settings = load_config(config)

    console.print(build_table(ops.build_info()))
    checks = check_ops()
    table = Table(title="native ops vs reference (forward and backward)")
    for column in ("op", "device", "max |error|", "tolerance", "result"):
        table.add_column(column)
    for check in checks:
        verdict = "[green]PASS[/green]" if check.passed else "[red]FAIL[/red]"
        table.add_row(check.op, check.device, f"{check.max_error:.2e}", f"{check.tolerance:.0e}", verdict)
    console.print(table)
    failed = [f"{c.op} on {c.device}" for c in checks if not c.passed]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} op checks failed[/red]: " + ", ".join(failed))
    else:
        console.print(f"[green]all {len(checks)} op checks passed[/green]")
    if data is not None:
        failed += validate_data(data, settings, quick)
    if failed:
        raise typer.Exit(1)


def build_table(info: dict) -> Table:
    """The "giblet build" table: the extension, torch, which kernels were compiled, the GPU and CPU."""
    table = Table(title="giblet build", show_header=False)
    table.add_row("extension", info["extension"])
    table.add_row("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    table.add_row("CPU kernels", "yes" if info["cpu_kernels"] else "NO")
    table.add_row("CUDA kernels", "yes" if info["cuda_kernels"] else "no (CPU-only build)")
    gpu = info["device_name"] or "none visible"
    table.add_row("GPU", gpu)
    table.add_row("CPU", f"{info['cpu_capability']}, {info['threads']} threads")
    return table


def validate_data(data: Path, settings, quick: bool) -> List[str]:
    """Check a Sherlock-layout folder, print the checks (and the model it sizes); the names of those that failed."""
    from giblet.data.check import FAIL, PASS, WARN, check_data

    facts: dict = {}
    with console.status(f"checking {data}"):
        checks = check_data(data, settings, deep=not quick, load_models=not quick, facts=facts)
    table = Table(title=f"data: {escape(str(data))}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    colours = {PASS: "green", FAIL: "red"}
    for check in checks:
        colour = colours.get(check.status, "yellow")
        table.add_row(escape(check.name), f"[{colour}]{check.status}[/{colour}]", escape(check.detail))
    console.print(table)
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} data checks failed[/red]: " + ", ".join(failed))
    else:
        warned = [c.name for c in checks if c.status == WARN]
        note = f" ({len(warned)} with a warning: {', '.join(warned)})" if warned else ""
        console.print(f"[green]all {len(checks)} data checks passed[/green]{escape(note)}")
    if "manifest" in facts:
        import torch

        from giblet.models import GibletAutoencoder, dims_from_manifest

        dims = dims_from_manifest(facts["manifest"], settings.model.audio_input, settings.model.inputs)
        with torch.device("meta"):  # shapes and counts only: no memory for the weights
            model = GibletAutoencoder(dims, settings.model)
        print_layer_table(model, f"the model for {escape(str(data))} (batch of 1)")
    return failed
